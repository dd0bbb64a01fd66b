"""Export weights from a pretraining checkpoint (any ZeRO stage) to plain files.

    python tools/export_encoder.py output/k400_hpm_vit_base --output vit_base_encoder.pth
    python tools/export_encoder.py output/run/checkpoints/epoch-0799 --full --output pretrain_model.pth

Default: the encoder alone in VideoMAE's fine-tune key layout (``patch_embed.*``, ``blocks.N.*``,
``norm.*``), ready for ``run_finetune.py`` (FINETUNE.INIT). ``--teacher`` takes the EMA teacher's
encoder instead of the student's (HPM runs only). ``--full`` writes the whole pretraining model as a
self-describing model file (for tools/visualize.py and further pretraining).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpm_video.checkpoint import key_prefixes, save_atomic, save_model_file  # noqa: E402
from hpm_video.engine.checkpointing import consolidated_state_dict, read_client_state, resolve_tag_dir  # noqa: E402


def encoder_state(state: dict, teacher: bool = False) -> dict:
    prefix = "teacher.encoder." if teacher else "encoder."
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no '{prefix}*' weights in the checkpoint; key prefixes seen: {key_prefixes(state)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run's OUTPUT_DIR (newest checkpoint) or a checkpoints/epoch-NNNN folder")
    parser.add_argument("--output", required=True)
    parser.add_argument("--full", action="store_true", help="write the whole pretraining model as a model file")
    parser.add_argument("--teacher", action="store_true", help="export the EMA teacher's encoder")
    args = parser.parse_args(argv)

    tag_dir = resolve_tag_dir(args.checkpoint)
    meta = read_client_state(tag_dir)
    state = consolidated_state_dict(tag_dir)
    if args.full:
        save_model_file(args.output, state, meta["model_name"], **meta["model_kwargs"])
    else:
        kwargs = meta["model_kwargs"]
        save_atomic(
            {
                "model": encoder_state(state, args.teacher),
                "source": {"checkpoint": os.path.abspath(tag_dir), "epoch": meta["epoch"], "teacher": args.teacher},
                "pretrain_model_name": meta["model_name"],
                "pretrain_model_kwargs": kwargs,
            },
            args.output,
        )
    print(f"wrote {args.output} from {tag_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
