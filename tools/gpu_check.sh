#!/usr/bin/env bash
# The one script to run on a GPU machine. Prints JSON lines:
#   1. the environment (torch, CUDA device, which optional packages are present);
#   2. the CUDA-marked tests (`pytest -m cuda`), summarised as one JSON line (full log on stderr);
#   3. tools/bench_train.py for ViT-B 16x224, mask 0.9, bf16, batch 64, in random and hpm modes
#      (and with torch.compile when COMPILE=1 or --compile is given).
# A bare GPU box may have only torch, timm, einops and triton: nothing here needs fvcore, deepspeed,
# av or transformers (bench_train falls back to the closed-form FLOP count, which matches fvcore).
#
#   tools/gpu_check.sh [--compile] [--quick]
# Environment: PYTHON (interpreter), BATCH (64), STEPS (10), WARMUP (3), COMPILE (0/1).
set -u
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
BATCH=${BATCH:-64}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
COMPILE=${COMPILE:-0}
for arg in "$@"; do
    case "$arg" in
        --compile) COMPILE=1 ;;
        --quick) STEPS=3; WARMUP=1 ;;
        *) echo "{\"error\": \"unknown argument $arg\"}"; exit 2 ;;
    esac
done
# The repository root must be importable even where the package is not pip-installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

"$PYTHON" - <<'EOF'
import importlib.util, json, torch
info = {"check": "environment", "torch": torch.__version__, "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    info["device_name"] = torch.cuda.get_device_name(0)
    info["capability"] = list(torch.cuda.get_device_capability(0))
    info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
info["packages"] = {m: importlib.util.find_spec(m) is not None
                    for m in ("timm", "einops", "triton", "fvcore", "deepspeed", "av", "transformers", "pytest")}
print(json.dumps(info))
EOF

# CUDA-marked tests: collecting other test files may fail where optional packages are missing;
# that must not stop the CUDA tests, so collection errors are tolerated and reported.
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    log=$(mktemp)
    "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors tests >"$log" 2>&1
    rc=$?
    cat "$log" >&2
    summary=$(tail -n 1 "$log" | tr -d '"=')
    failed=$(grep -E '^(FAILED|ERROR) ' "$log" | head -n 20 | tr -d '"' | sed 's/.*/"&"/' | paste -sd, -)
    echo "{\"check\": \"pytest -m cuda\", \"rc\": $rc, \"summary\": \"${summary}\", \"problems\": [${failed}]}"
    # rc 5: nothing collected (no CUDA-marked tests) is not a failure of this machine.
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=1; fi
    rm -f "$log"
else
    echo '{"check": "pytest -m cuda", "rc": null, "summary": "pytest not installed; skipped"}'
fi

bench() {
    "$PYTHON" tools/bench_train.py --model hpm_pretrain_vit_base_patch16 --frames 16 --size 224 \
        --mask-ratio 0.9 --precision bf16 --batch "$BATCH" --warmup "$WARMUP" --steps "$STEPS" "$@" \
        || status=1
}
bench --masking random
bench --masking hpm
if [ "$COMPILE" = "1" ]; then
    bench --masking random --compile
    bench --masking hpm --compile
fi
exit $status
