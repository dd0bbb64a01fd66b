#!/usr/bin/env bash
# The one script to run on a GPU machine. Prints JSON lines (and appends them to $OUT/gpu_check.jsonl
# when OUT is set):
#   1. the environment (torch, CUDA device, which optional packages are present);
#   2. the tools/bench_train.py sweep of the GPU-speed issue, most important first (ViT-B 16x224,
#      mask 0.9, bf16): random and hpm compiled at batch 128, each with two more steps under
#      torch.profiler (where the kernel time goes: GEMM, attention, fused, ...); then the
#      CUDA-marked tests (`pytest -m cuda`, one JSON line, full log on stderr); then random eager
#      (profiled too) at batch 128, hpm eager at 64, ViT-L batch 32 with activation checkpointing,
#      random eager again with only cuDNN's and only FlashAttention's attention, and (where
#      DeepSpeed imports) the training loop's step on DeepSpeed ZeRO 0, 2 and 3 against plain training.
# tools/report_gpu_check.py turns the lines into the Markdown table and the plot of docs/performance.md.
# Every run has its own time limit and the whole script a budget (BUDGET_S, default 420 s): a run
# that would start after the budget is reported as skipped instead, so the script always ends in time
# and what ran is never lost.
#
# A bare GPU box may have only torch, timm, einops and triton. DeepSpeed and fvcore come from .whl/
# when that folder is there (tools/gpu_wheels.sh fills it; carry it with the run).
#
#   tools/gpu_check.sh [--quick]
# Environment: PYTHON (interpreter), BUDGET_S (420), STEPS (10), WARMUP (3), RUN_LIMIT_S (240),
# TESTS_S (200, the CUDA tests' limit), TESTS_MIN_S (90, their time on a spent budget).
set -u
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
BUDGET_S=${BUDGET_S:-420}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
RUN_LIMIT_S=${RUN_LIMIT_S:-240}
TESTS_S=${TESTS_S:-200}
TESTS_MIN_S=${TESTS_MIN_S:-90}  # two DeepSpeed subprocesses and three small compiles
for arg in "$@"; do
    case "$arg" in
        --quick) STEPS=3; WARMUP=1 ;;
        *) echo "{\"error\": \"unknown argument $arg\"}"; exit 2 ;;
    esac
done
START=$(date +%s)
LOG=${OUT:+$OUT/gpu_check.jsonl}
emit() { echo "$1"; if [ -n "$LOG" ]; then echo "$1" >>"$LOG"; fi; }

# The repository root must be importable even where the package is not pip-installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! "$PYTHON" -c "import deepspeed, fvcore" >/dev/null 2>&1; then
    site=$(mktemp -d)
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl >&2; then
        export PYTHONPATH="$site:$PYTHONPATH"
    fi
fi
status=0

emit "$("$PYTHON" - <<'EOF'
import importlib.util, json, torch
info = {"check": "environment", "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
if torch.cuda.is_available():
    info["device_name"] = torch.cuda.get_device_name(0)
    info["capability"] = list(torch.cuda.get_device_capability(0))
    info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
info["packages"] = {m: importlib.util.find_spec(m) is not None
                    for m in ("timm", "einops", "triton", "fvcore", "deepspeed", "av", "transformers", "pytest")}
print(json.dumps(info))
EOF
)"

# bench NEEDS_S ARGS...: one bench_train run, unless fewer than NEEDS_S seconds of the budget remain.
bench() {
    local needs=$1; shift
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt "$needs" ]; then
        emit "{\"check\": \"bench_train\", \"skipped\": \"budget: ${left}s left, needs ~${needs}s\", \"args\": \"$*\"}"
        return
    fi
    local limit=$((left < RUN_LIMIT_S ? left : RUN_LIMIT_S))
    local line
    line=$(timeout "$limit" "$PYTHON" tools/bench_train.py --frames 16 --size 224 --mask-ratio 0.9 --precision bf16 \
        --warmup "$WARMUP" --steps "$STEPS" "$@")
    local rc=$?
    if [ -z "$line" ]; then
        line="{\"check\": \"bench_train\", \"error\": \"no result (exit $rc, limit ${limit}s)\", \"args\": \"$*\"}"
    fi
    emit "$line"
    if [ "$rc" -ne 0 ]; then status=1; fi
}

# cuda_tests: the CUDA-marked tests, with what is left of the budget but at least TESTS_MIN_S and
# at most TESTS_S, so the script ends within BUDGET_S + TESTS_MIN_S. Collecting other test files may
# fail where optional packages are missing; that must not stop the CUDA tests, so collection errors
# are tolerated and reported.
cuda_tests() {
    if "$PYTHON" -c "import pytest" 2>/dev/null; then
        local left=$((BUDGET_S - ($(date +%s) - START)))
        local limit=$((left < TESTS_MIN_S ? TESTS_MIN_S : left))
        limit=$((limit > TESTS_S ? TESTS_S : limit))
        local log rc
        log=$(mktemp)
        timeout "$limit" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors tests >"$log" 2>&1
        rc=$?
        cat "$log" >&2
        # Python writes the JSON: pytest's lines may hold quotes, backslashes, anything.
        emit "$("$PYTHON" - "$rc" "$log" <<'EOF'
import json, sys
lines = open(sys.argv[2], errors="replace").read().splitlines()
problems = [line for line in lines if line.startswith(("FAILED ", "ERROR "))][:20]
summary = lines[-1].strip("= ") if lines else ""
print(json.dumps({"check": "pytest -m cuda", "rc": int(sys.argv[1]), "summary": summary, "problems": problems}))
EOF
)"
        # rc 5: nothing collected (no CUDA-marked tests) is not a failure of this machine.
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=1; fi
        rm -f "$log"
    else
        emit '{"check": "pytest -m cuda", "rc": null, "summary": "pytest not installed; skipped"}'
    fi
}

B=hpm_pretrain_vit_base_patch16
L=hpm_pretrain_vit_large_patch16
bench 120 --model $B --batch 128 --masking random --compile --profile-steps 2
bench 150 --model $B --batch 128 --masking hpm --compile --profile-steps 2
cuda_tests  # after the two headline figures, so a slow compile cannot starve them
bench 30 --model $B --batch 128 --masking random --profile-steps 2  # eager: what compiling changes
bench 40 --model $B --batch 64 --masking hpm
bench 60 --model $L --batch 32 --masking random --grad-ckpt
bench 80 --model $L --batch 32 --masking hpm --grad-ckpt
# Attention backends head to head, each allowed alone. torch prefers cuDNN's on Hopper only with a
# cuDNN newer than 9.15 (the environment line says which is loaded), else FlashAttention-2's.
for attn in cudnn flash; do
    bench 30 --model $B --batch 128 --masking random --profile-steps 2 --sdpa-backend "$attn"
done
if "$PYTHON" -c "import deepspeed, fvcore" >/dev/null 2>&1; then
    bench 30 --model $B --batch 64 --masking random  # the plain baseline of the ZeRO runs
    for stage in 0 2 3; do
        bench 60 --model $B --batch 64 --masking random --zero "$stage"
    done
else
    emit '{"check": "bench_train --zero", "skipped": "deepspeed or fvcore missing (tools/gpu_wheels.sh, carry .whl)"}'
fi
emit "{\"check\": \"done\", \"seconds\": $(($(date +%s) - START)), \"status\": $status}"
exit $status
