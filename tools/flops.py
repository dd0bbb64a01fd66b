"""Parameters and FLOPs per clip of every registered model, as a table (default) or JSON.

    python tools/flops.py [--models NAME ...] [--frames 16] [--size 224] [--mask-ratio 0.9]
        [--masking random hpm] [--use-predictor] [--num-classes 400] [--method fvcore|analytic] [--json]

Pretraining models are counted once per ``--masking`` mode (``hpm`` includes the teacher's full-clip
pass of encoder + loss predictor), classifiers once (fine-tuning). ``fvcore`` traces a real forward
on one clip, which takes a while for the large and huge models on a CPU; ``analytic`` is instant
and agrees with fvcore to the last multiply-add for these architectures.
GFLOPs = 2 x GMACs (fvcore counts a multiply-add as one flop); training = 3 x forward + teacher pass.
"""

from __future__ import annotations

import argparse
import json
import sys

import hpm_video  # noqa: F401  (registers the models)
from hpm_video.flops import format_table, model_flops
from hpm_video.models import CLASSIFIER_MODELS, MODEL_NAMES, PRETRAIN_MODELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), help="registered model names (default: all)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.9)
    parser.add_argument("--mask-unit", default="tube", choices=("tube", "token"))
    parser.add_argument("--masking", nargs="+", default=["random", "hpm"], choices=("random", "hpm"))
    parser.add_argument("--use-predictor", action="store_true", help="random masking with the loss predictor")
    parser.add_argument("--num-classes", type=int, default=400)
    parser.add_argument("--method", default="fvcore", choices=("fvcore", "analytic", "auto"))
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; valid: {', '.join(MODEL_NAMES)}")

    reports = []
    try:
        for name in args.models:
            if name in PRETRAIN_MODELS:
                for masking in args.masking:
                    predictor = True if masking == "hpm" else args.use_predictor
                    reports.append(model_flops(
                        name, args.frames, args.size, args.mask_ratio, masking, predictor, args.mask_unit,
                        method=args.method,
                    ))  # fmt: skip
            elif name in CLASSIFIER_MODELS:
                reports.append(
                    model_flops(name, args.frames, args.size, num_classes=args.num_classes, method=args.method)
                )
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(reports, indent=1) if args.json else format_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
