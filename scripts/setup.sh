#!/usr/bin/env bash
# Set up napari-apl on a fresh Debian/Ubuntu machine: system libraries for Qt/OpenGL, a CPU build of
# PyTorch, and the package itself (editable). `--test` also installs what the test suite needs.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[[ "${1:-}" == "--test" ]] && want_tests=1

# Qt + OpenGL runtime libraries (and Xvfb for headless tests/screenshots). Needs root or sudo.
debs=(xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
      libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0
      libdbus-1-3 libfontconfig1 x11-utils libgl1 libopengl0 libxkbcommon0 libglib2.0-0)
if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for d in "${debs[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
  if ((${#missing[@]})); then
    sudo_cmd=""
    [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

PY=${PYTHON:-python3}
# A CPU build of PyTorch unless one is installed already (a CUDA machine keeps its own build): from
# PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build), or pip's own sources (a local
# mirror or wheel folder) when that index cannot be reached.
if ! $PY -c "import torch" >/dev/null 2>&1; then
  cpu_index=https://download.pytorch.org/whl/cpu
  $PY -m pip install -q "torch==2.13.0" --index-url "$cpu_index" --retries 1 --timeout 30 2>/dev/null \
    || $PY -m pip install -q "torch==2.13.0"
fi
if ((want_tests)); then
  $PY -m pip install -q -e ".[testing]"
else
  $PY -m pip install -q -e ".[qt]"
fi
echo "napari-apl is installed: $($PY -c 'import napari_apl; print(napari_apl.__version__)')"
