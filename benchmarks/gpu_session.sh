#!/usr/bin/env bash
# The whole GPU check in one command, for a lent CUDA machine: goal 8 (gpu_check.py), goal 2 on the
# card (refine_overhead.py --device cuda) and the test files that exercise the device path.
#
#   GIT_COMMIT=<sha> OUT=<folder> bash benchmarks/gpu_session.sh
#
# Needs torch, numpy and scipy. Wheels found in .whl/ (nibabel, dask, isal and their needs, fetched with
# `pip download` on a machine with a registry) are installed into a scratch folder first, so that the
# test files can run; without them only the two benchmarks run. GIT_COMMIT names the commit in the
# results (a copied tree's .git may be stale). Results and logs are copied into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/apl_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
tests=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/apl_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/apl_site" || tests=0
else
    tests=0
fi
nvidia-smi -L || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
python3 benchmarks/gpu_check.py --out "$OUT" --profile "$OUT/gpu_check_refine_profile.txt" 2>&1 \
    | tee "$OUT/gpu_check.log" || status=1
python3 benchmarks/refine_overhead.py --device cuda --rounds 10 2>&1 | tee "$OUT/refine_overhead_cuda.log" \
    || status=1
cp benchmarks/results/refine_overhead_cuda.md benchmarks/results/refine_overhead_cuda.json "$OUT"/ 2>/dev/null
if [ "$tests" = 1 ]; then
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_long_run.py tests/test_refine.py \
        tests/test_infer.py tests/test_checkpoint.py tests/test_models.py tests/test_pseudo.py 2>&1 \
        | tee "$OUT/tests.log" | tail -25 || status=1
else
    echo "no wheels in .whl/: the test files were not run (they need nibabel and dask)"
fi
exit "$status"
