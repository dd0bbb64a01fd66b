"""Turn ``tools/gpu_check.sh`` output (JSON lines) into the table and the plot of docs/performance.md.

    python tools/report_gpu_check.py gpu_check.jsonl --plot docs/gpu_check.png >> table.md

Prints a Markdown table of every ``bench_train`` result (GPU, model, masking, batch, compile, engine,
attention backend, clips/s, step ms, peak GiB, model TFLOP/s, MFU against bench_train's peak and
against the issue's 790 TFLOP/s; skipped and failed runs say so) and, with ``--plot``, draws clips/s
per run as horizontal bars labelled with the MFU (PIL only, no plotting library).
Runs profiled with ``bench_train.py --profile-steps`` get a second table: kernel time and launches
per step, how busy the device was, and the share of each kind of kernel. The other lines (environment,
CUDA tests, skipped groups) follow as a list.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from hpm_video.profiling import KERNEL_CATEGORY_ORDER

COLUMNS = ("GPU", "model", "masking", "batch", "compile", "ckpt", "engine", "attention", "clips/s", "step ms",
           "peak GiB", "model TFLOP/s", "MFU", "MFU @790")  # fmt: skip
# The GPU-speed issue states its MFU figures against 790 TFLOP/s (about what a large bf16 matrix
# product reaches on the H200), bench_train against the datasheet's 989: both are shown.
ISSUE_PEAK_TFLOPS = 790.0


def read_lines(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a gpu_check log; other lines (warnings) are ignored."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:  # one bad line must not cost the rest of the run
                print(f"{path}:{number}: skipped, not JSON ({err})", file=sys.stderr)
    return rows


def short_model(name: str) -> str:
    for size in ("tiny", "small", "base", "large", "huge"):
        if f"_{size}_" in name:
            return "ViT-" + {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}[size]
    return name


def label(row: dict[str, Any]) -> str:
    parts = [short_model(row["model"]), row["masking"], f"b{row['batch']}"]
    if row.get("compile"):
        parts.append("compile")
    if row.get("grad_ckpt"):
        parts.append("ckpt")
    if row.get("engine", "plain") != "plain":
        parts.append(row["engine"].replace("deepspeed_", ""))
    if row.get("sdpa_backend", "auto") != "auto":
        parts.append(f"only-{row['sdpa_backend']}")
    return " ".join(parts)


def attention(row: dict[str, Any]) -> str:
    """The attention backend: the one ``--sdpa-backend`` allowed, else torch's pick as the profiled
    kernels show it (``auto (cudnn)``), else ``auto``."""
    allowed = row.get("sdpa_backend", "auto")
    if allowed != "auto":
        return allowed
    ran = (row.get("kernels") or {}).get("attention_backends")  # absent when the profiler failed
    return f"auto ({', '.join(ran)})" if ran else "auto"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for row in rows:
        if row.get("check") == "bench_train" and "clips_per_s" not in row:
            reason = row.get("skipped") or row.get("error") or "no result"
            lines.append(f"| - | `{row.get('args', '')}` | {'skipped' if 'skipped' in row else 'failed'}: {reason} "
                         + "| " * (len(COLUMNS) - 3) + "|")  # fmt: skip
            continue
        if "clips_per_s" not in row:
            continue
        mfu = row.get("mfu")
        cells = (
            row.get("device_name", "?"), short_model(row["model"]), row["masking"], row["batch"],
            "yes" if row.get("compile") else "no", "yes" if row.get("grad_ckpt") else "no",
            row.get("engine", "plain"), attention(row), f"{row['clips_per_s']:.1f}", f"{row['step_time_ms']:.1f}",
            f"{row['peak_memory_gib']:.1f}", f"{row['model_tflops']:.1f}",
            "-" if mfu is None else f"{100 * mfu:.1f}%",
            "-" if row.get("device") == "cpu" else f"{100 * row['model_tflops'] / ISSUE_PEAK_TFLOPS:.1f}%",
        )  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def kernel_table(rows: list[dict[str, Any]]) -> str:
    """Where the profiled runs spend their kernel time; empty when no run was profiled."""
    profiled = [r for r in rows if "clips_per_s" in r and isinstance(r.get("kernels"), dict)]
    if not profiled:
        return ""
    seen = {c for row in profiled for c in row["kernels"].get("share", {})}
    categories = [c for c in KERNEL_CATEGORY_ORDER if c in seen]
    header = ["run", "kernel ms/step", "busy", "kernels/step", *categories]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in profiled:
        kernels = row["kernels"]
        if "error" in kernels:
            lines.append(f"| {label(row)} | profiler failed: {kernels['error']} " + "| " * (len(header) - 2) + "|")
            continue
        share, busy = kernels["share"], kernels.get("busy_fraction")
        cells = [
            label(row), f"{kernels['kernel_ms_per_step']:.1f}", "-" if busy is None else f"{100 * busy:.0f}%",
            f"{kernels['kernels_per_step']:.0f}", *(f"{100 * share.get(c, 0.0):.1f}%" for c in categories),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def other_checks(rows: list[dict[str, Any]]) -> str:
    """Everything that is not a benchmark run (environment, CUDA tests, skipped groups), one line each."""
    lines = []
    for row in rows:
        check = row.get("check")
        if check is None or check == "bench_train":
            continue
        details = ", ".join(f"{k}: {json.dumps(v)}" for k, v in row.items() if k != "check")
        lines.append(f"* {check}: {details}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    results = [r for r in rows if "clips_per_s" in r]
    if not results:
        print(f"no bench_train results: {path} not written", file=sys.stderr)
        return
    font = ImageFont.load_default()
    bar_h, gap, left, right, top = 22, 8, 260, 140, 40
    width = 1000
    height = top + len(results) * (bar_h + gap) + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    devices = sorted({r.get("device_name", "?") for r in results})
    draw.text((10, 10), f"training clips/s per run ({', '.join(devices)}); label: MFU", fill="black", font=font)
    longest = max(r["clips_per_s"] for r in results)
    span = width - left - right
    for i, row in enumerate(results):
        y = top + i * (bar_h + gap)
        draw.text((10, y + 5), label(row), fill="black", font=font)
        length = max(1, int(span * row["clips_per_s"] / longest))
        colour = (70, 130, 180) if row["masking"] == "random" else (205, 92, 92)
        draw.rectangle([left, y, left + length, y + bar_h], fill=colour)
        mfu = row.get("mfu")
        text = f"{row['clips_per_s']:.0f} clips/s" + ("" if mfu is None else f"  {100 * mfu:.1f}% MFU")
        draw.text((left + length + 6, y + 5), text, fill="black", font=font)
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="gpu_check.sh output (JSON lines)")
    parser.add_argument("--plot", help="write a PNG bar chart here")
    args = parser.parse_args(argv)
    rows = read_lines(args.log)
    print(markdown(rows))
    kernels = kernel_table(rows)
    if kernels:
        print("\n" + kernels)
    others = other_checks(rows)
    if others:
        print("\n" + others)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
