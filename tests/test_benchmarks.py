"""The real-scan benchmark's argument checks and its model cache keys (no training, no data)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "mri_to_ct.py"


@pytest.fixture(scope="module")
def mri_to_ct():
    """benchmarks/mri_to_ct.py imported as a module."""
    spec = importlib.util.spec_from_file_location("mri_to_ct_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "apl,bogus"], "unknown row(s) 'bogus'"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(mri_to_ct, argv, message, capsys, tmp_path, monkeypatch):
    """Arguments are checked before the data is looked for or anything is trained."""
    monkeypatch.setenv("NAPARI_APL_DATA", str(tmp_path))  # an empty folder: the data check would say so
    assert mri_to_ct.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_every_row_name_is_known(mri_to_ct):
    """The default rows, and the on-request rows, resolve to a refinement method."""
    from napari_apl.core.refine import METHODS, RefineConfig

    assert set(mri_to_ct.EXPLORE) <= set(mri_to_ct.VARIANTS)
    assert not set(mri_to_ct.EXPLORE) & set(mri_to_ct.ROWS)  # on request only
    for row in (*mri_to_ct.ROWS, *mri_to_ct.EXPLORE):
        method, overrides = mri_to_ct.VARIANTS.get(row, (row, {}))
        assert method in METHODS
        RefineConfig.for_method(method, **overrides).validate()


def test_gpu_models_are_cached_apart_and_cpu_keys_are_unchanged(mri_to_ct):
    """A CUDA-trained source model has its own key; a CPU one keeps the key it was cached under."""
    pairs = [("image_2.nii.gz", "label_2.nii.gz")]
    cpu = dataclasses.replace(mri_to_ct.SOURCE, device="cpu")
    gpu = dataclasses.replace(cpu, device="cuda")
    assert mri_to_ct.cache_path("t", cpu, pairs) != mri_to_ct.cache_path("t", gpu, pairs)
    # the key models were cached under before the device option: the settings without the device
    cfg = {k: v for k, v in dataclasses.asdict(cpu).items() if k != "device"}
    key = json.dumps({"cfg": cfg, "files": ["image_2.nii.gz"]}, sort_keys=True, default=list)
    want = hashlib.sha1(key.encode()).hexdigest()[:12]
    assert mri_to_ct.cache_path("t", cpu, pairs).name == f"t_{want}.pt"


def test_refine_overhead_refuses_an_unknown_or_absent_device_in_one_line(capsys):
    """Goal 2's benchmark checks ``--device`` before building anything (CUDA is absent on CI machines)."""
    spec = importlib.util.spec_from_file_location(
        "refine_overhead_under_test", BENCH.with_name("refine_overhead.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import torch

    cases = [(["--device", "tpu"], "--device must be cpu or cuda, got 'tpu'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device is available"))
    for argv, message in cases:
        assert mod.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_results_are_strict_json_when_an_organ_is_missed(mri_to_ct, tmp_path, monkeypatch):
    """A missed organ's ASSD (inf) and an absent one's Dice (nan) were written as Infinity / NaN, which
    other JSON readers refuse; the Markdown still shows them."""
    results = json.loads((BENCH.parent / "results" / "mri_to_ct.json").read_text())
    run = results["targets"]["ct"]["runs"]["apl"][0]
    run["dice"]["spleen"] = float("nan")
    run["assd"] = float("inf")
    monkeypatch.setattr(mri_to_ct, "RESULTS", tmp_path)
    mri_to_ct.write_results(results, "strict")

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    back = json.loads((tmp_path / "strict.json").read_text(), parse_constant=refuse)
    run = back["targets"]["ct"]["runs"]["apl"][0]
    assert run["dice"]["spleen"] is None and run["assd"] == "inf"
    assert "inf" in (tmp_path / "strict.md").read_text()


@pytest.mark.parametrize("group", ["ablations", "all"])
def test_row_groups_are_known(mri_to_ct, group, capsys, tmp_path, monkeypatch):
    """``--methods ablations`` / ``all`` name row groups (the argument check passes; the data check then
    stops the run in this test)."""
    monkeypatch.setenv("NAPARI_APL_DATA", str(tmp_path))
    assert mri_to_ct.main(["--methods", group]) == 2
    err = capsys.readouterr().err
    assert "unknown row" not in err and "real data folder" in err
    assert set(mri_to_ct.ABLATIONS) <= set(mri_to_ct.VARIANTS) and not set(mri_to_ct.ABLATIONS) & set(
        mri_to_ct.EXPLORE
    )
