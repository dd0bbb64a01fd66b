#!/usr/bin/env bash
# The test suite under the GPU machine's software, on this CPU machine, before spending device time.
#
# The lent H200 runs our code with its own image, not our pins: Python 3.12, torch 2.11.0,
# torchvision 0.26.0, transformers 5.17.0 (docs of the device tool, 2026-11). Version differences
# show up on the CPU too: under torch 2.11 a float alpha recompiled the compiled step at every
# value, and transformers 5.17 lays out the attention biases differently from 5.24. This builds a
# virtual environment with those versions (a CUDA build of torch from PyPI, about 5 GB, a few
# minutes) outside the repository and runs the tests in it.
#
#   tools/gpu_env_mirror.sh [pytest arguments]     # default: the whole suite
# Environment: PY312 (a Python 3.12 interpreter), MIRROR (the venv's folder).
set -euo pipefail
cd "$(dirname "$0")/.."
# The first candidate that really is a Python 3.12 (a pyenv shim may exist and refuse to run).
if [ -z "${PY312:-}" ]; then
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python /usr/bin/python3.12; do
        if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
            PY312=$candidate
            break
        fi
    done
fi
if [ -z "${PY312:-}" ]; then
    echo "no Python 3.12 found; set PY312" >&2
    exit 2
fi
MIRROR=${MIRROR:-${TMPDIR:-/tmp}/hpm-video-gpu-mirror}
PINS=(torch==2.11.0 torchvision==0.26.0 transformers==5.17.0)

if [ ! -f "$MIRROR/.installed" ]; then
    "$PY312" -m venv "$MIRROR"
    "$MIRROR/bin/pip" install -q "${PINS[@]}"
    "$MIRROR/bin/pip" install -q -e ".[dev]" "${PINS[@]}"
    touch "$MIRROR/.installed"
fi
"$MIRROR/bin/python" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
# The subprocesses some tests start (deepspeed launcher, torchrun) come from the mirror too.
PATH="$MIRROR/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$MIRROR/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
