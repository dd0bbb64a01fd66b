#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels tools/gpu_check.sh needs on a GPU machine that has torch,
# timm, einops and triton but no internet: DeepSpeed and fvcore (bench_train --zero runs the
# training loop's step, which reads our fvcore config) and what they need beyond that machine's own
# packages. Versions are the ones installed in this checkout's .venv, i.e. the ones the tests ran
# with. Binary wheels are fetched for CPython $PY_VERSION (default 3.12) on x86-64 Linux.
#
#   tools/gpu_wheels.sh            # then carry .whl with the GPU run; gpu_check.sh installs it
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
rm -rf .whl && mkdir -p .whl

version() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pins() { for name in "$@"; do echo "$name==$(version "$name")"; done; }

# Published as source only and pure Python: built here into wheels. DS_BUILD_OPS=0: no op is
# compiled (the training path uses torch's fused AdamW, so DeepSpeed's own ops are never needed).
# shellcheck disable=SC2046
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl \
    $(pins deepspeed fvcore iopath hjson yacs)

# Binary (or universal) wheels for the GPU machine's interpreter.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
# shellcheck disable=SC2046
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${platforms[@]}" -d .whl $(pins pydantic pydantic_core annotated-types typing-inspection typing_extensions termcolor)

du -sh .whl
ls .whl
