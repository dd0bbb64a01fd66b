"""Convert weights between official VideoMAE ``.pth``, hpm-video model files and Hugging Face folders.

    python tools/convert_checkpoint.py SRC DST --to {hpm,videomae,hf} [options]

The source format is detected:
  * a folder with ``config.json``                      -> Hugging Face VideoMAE (``hf``);
  * a file holding ``model_name`` (``save_model_file``) -> hpm-video model file (``hpm``);
  * a file with VideoMAE keys (under ``model``/``module``) -> official VideoMAE (``videomae``),
    pretraining or fine-tuned; its clip length, frame size and head counts are not stored, so they
    come from ``--num-frames``/``--img-size`` (defaults 16/224) and the size table (or
    ``--num-heads``/``--decoder-num-heads``).

Targets: ``hpm`` writes a model file, ``videomae`` a ``{"model": state_dict}`` file (the loss predictor
and teacher of HPM models need ``--drop-extras``), ``hf`` a folder loadable with
``VideoMAEForPreTraining/VideoMAEForVideoClassification.from_pretrained`` and ``AutoImageProcessor``.
Unless ``--no-verify``, the written result is read back and every tensor compared with the source
(bit-exact); the summary is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
from torch import nn

from hpm_video.checkpoint import key_prefixes, load_file, save_model_file, unwrap_state_dict
from hpm_video.hf import EXTRA_PREFIXES, build_model_from_state, load_hf_folder, load_videomae_checkpoint

FORMATS = ("hpm", "videomae", "hf")


def detect_format(path: str) -> str:
    """``hf``, ``hpm`` or ``videomae`` for an existing source path; refuses anything else."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        raise ValueError(f"{path}: a folder without config.json; found {sorted(os.listdir(path))[:12]}")
    obj = load_file(path)
    if "model_name" in obj:
        return "hpm"
    state = unwrap_state_dict(obj)
    if not state:
        raise ValueError(f"{path}: no tensors found; top-level keys {key_prefixes(list(obj))}")
    if any(k.startswith("videomae.") for k in state):
        raise ValueError(
            f"{path}: Hugging Face VideoMAE weights without their folder; convert the folder holding config.json"
        )
    return "videomae"


def read_model(path: str, fmt: str, args: argparse.Namespace) -> tuple[nn.Module, str, dict[str, Any]]:
    """(model, model_name, model_kwargs) from a source in format ``fmt``."""
    if fmt == "hf":
        return load_hf_folder(path)
    if fmt == "videomae":
        return load_videomae_checkpoint(path, args.num_frames, args.img_size, args.num_heads, args.decoder_num_heads)
    obj = load_file(path)
    name, kwargs = obj["model_name"], dict(obj.get("model_kwargs") or {})
    return build_model_from_state(unwrap_state_dict(obj), name, kwargs, source=path), name, kwargs


def write_model(
    model: nn.Module, name: str, kwargs: dict[str, Any], dst: str, fmt: str, drop_extras: bool
) -> list[str]:
    """Write ``model`` to ``dst`` in format ``fmt``; returns the state-dict keys left out."""
    from hpm_video.hf import save_hf_folder, save_videomae_checkpoint

    if fmt == "hpm":
        save_model_file(dst, model, name, **kwargs)
        return []
    if fmt == "videomae":
        return save_videomae_checkpoint(model, dst, drop_extras=drop_extras)
    save_hf_folder(model, dst, name, kwargs)
    return []


def unstored_geometry(model: nn.Module) -> dict[str, Any]:
    """Clip length, frame size and head counts of a model: what an official file leaves out."""
    encoder = getattr(model, "encoder", model)
    embed = encoder.patch_embed
    geometry = {
        "num_frames": embed.num_frames,
        "img_size": embed.img_size[0],
        "num_heads": encoder.blocks[0].attn.num_heads,
        "decoder_num_heads": None,
    }
    decoder = getattr(model, "decoder", None)
    if decoder is not None and len(decoder.blocks):
        geometry["decoder_num_heads"] = decoder.blocks[0].attn.num_heads
    return geometry


def compare_states(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], skip: list[str]) -> dict[str, Any]:
    """Bit-exact comparison of two state dicts (``skip``: keys the target format cannot hold)."""
    expected = {k: v for k, v in src.items() if k not in set(skip)}
    missing = sorted(set(expected) - set(dst))
    unexpected = sorted(set(dst) - set(expected))
    different = sorted(k for k in set(expected) & set(dst) if not torch.equal(expected[k], dst[k]))
    return {
        "identical": not (missing or unexpected or different),
        "tensors": len(expected),
        "missing": missing[:8],
        "unexpected": unexpected[:8],
        "different": different[:8],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="source: hpm-video model file, official VideoMAE .pth, or HF folder")
    parser.add_argument("dst", help="target file (hpm, videomae) or folder (hf)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="target format")
    parser.add_argument("--from", dest="src_format", choices=FORMATS, help="source format (default: detected)")
    parser.add_argument("--num-frames", type=int, default=16, help="clip length, for official files (not stored)")
    parser.add_argument("--img-size", type=int, default=224, help="frame size, for official files (not stored)")
    parser.add_argument("--num-heads", type=int, help="encoder heads, for official files of unlisted widths")
    parser.add_argument("--decoder-num-heads", type=int, help="decoder heads, for official files of unlisted widths")
    parser.add_argument("--drop-extras", action="store_true", help="allow dropping loss predictor/teacher (videomae)")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the result back")
    args = parser.parse_args(argv)

    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one-line JSON output, no shard bars
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        if args.to == "hf":
            print("error: converting to Hugging Face needs `pip install transformers`", file=sys.stderr)
            return 2

    try:
        src_format = args.src_format or detect_format(args.src)
        model, name, kwargs = read_model(args.src, src_format, args)
        dropped = write_model(model, name, kwargs, args.dst, args.to, args.drop_extras)
        summary: dict[str, Any] = {
            "src": args.src,
            "src_format": src_format,
            "dst": args.dst,
            "dst_format": args.to,
            "model_name": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dropped": key_prefixes(dropped, depth=1) if dropped else [],
        }
        if not args.no_verify:
            if args.to == "videomae":
                # The official file does not store these; read it back with the source's own.
                args = argparse.Namespace(**{**vars(args), **unstored_geometry(model)})
            back, _, _ = read_model(args.dst, args.to, args)
            source_state = model.state_dict()
            back_state = back.state_dict()
            if args.to == "videomae":
                # Read back without the dropped parts, the model is rebuilt in random mode.
                back_state = {k: v for k, v in back_state.items() if not k.startswith(EXTRA_PREFIXES)}
            summary["verify"] = compare_states(source_state, back_state, dropped)
            if not summary["verify"]["identical"]:
                print(json.dumps(summary), file=sys.stderr)
                print(f"error: {args.dst} does not read back identical to {args.src}", file=sys.stderr)
                return 1
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
