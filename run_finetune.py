"""Fine-tune a pretrained tube-patch ViT for action recognition (or image classification), then test it.

    python run_finetune.py --config configs/finetune/demo.yaml                    # one process (CPU or GPU)
    deepspeed run_finetune.py --config configs/finetune/k400_vit_base.yaml FINETUNE.INIT out/pretrain/model_final.pth
    torchrun --nproc_per_node 8 run_finetune.py --config configs/finetune/ssv2_vit_base.yaml ...
    python run_finetune.py --config ... --eval                                    # test this run's model
    python run_finetune.py --config ... --eval --checkpoint videomae_k400_ft.pth  # test any checkpoint

Any config key can be overridden after the options: ``SOLVER.EPOCHS 10 OUTPUT_DIR output/x``.
Linear probing: ``FINETUNE.LINEAR_PROBE True`` (frozen encoder, BatchNorm + linear head).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="HPM video fine-tuning and evaluation",
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--config", required=True, help="YAML config (may inherit with _BASE_)")
    parser.add_argument("--eval", action="store_true",
                        help="only run the multi-view test: --checkpoint, else this run's model_final.pth /\n"
                             "model_best.pth (FINETUNE.TEST_WEIGHTS picks which first) / latest checkpoint,\n"
                             "else FINETUNE.INIT")  # fmt: skip
    parser.add_argument("--checkpoint", default=None, help="with --eval: the weights to test (file or folder)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, e.g. SOLVER.EPOCHS 10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hpm_video.config import load_config
    from hpm_video.engine.distributed import is_main
    from hpm_video.engine.finetune import evaluate_only, train

    if args.checkpoint and not args.eval:
        print("error: --checkpoint only goes with --eval (training starts from FINETUNE.INIT)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.opts)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    paths = evaluate_only(cfg, args.checkpoint) if args.eval else train(cfg)
    if is_main():
        print("\nwrote:")
        for name in ("checkpoint", "best", "model", "init_report", "eval", "predictions", "log"):
            if name in paths:
                print(f"  {name:<12} {paths[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
