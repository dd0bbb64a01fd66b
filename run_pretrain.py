"""Pretrain a tube-patch ViT with (or without) Hard Patches Mining.

    python run_pretrain.py --config configs/demo.yaml                      # one process (CPU or GPU)
    deepspeed run_pretrain.py --config configs/k400/hpm_vit_base.yaml      # all GPUs of this node
    deepspeed --hostfile hosts run_pretrain.py --config ...                # several nodes
    torchrun --nproc_per_node 8 run_pretrain.py --config ...
    sbatch tools/slurm_pretrain.sh configs/k400/hpm_vit_base.yaml          # SLURM

Any config key can be overridden after the options: ``SOLVER.EPOCHS 10 OUTPUT_DIR output/x``.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="HPM video pretraining", formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (may inherit with _BASE_)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, e.g. SOLVER.EPOCHS 10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hpm_video.config import load_config
    from hpm_video.engine.distributed import is_main
    from hpm_video.engine.pretrain import train

    try:
        cfg = load_config(args.config, args.opts)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    paths = train(cfg)
    if is_main():
        print("\nwrote:")
        for name in ("checkpoint", "model", "log", "picture"):
            if name in paths:
                print(f"  {name:<10} {paths[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
