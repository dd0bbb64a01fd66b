"""Picture what a pretraining checkpoint does with a video or an image: a PNG grid and an animated GIF.

    python tools/visualize.py --checkpoint CKPT --video clip.mp4 [--video photo.jpg ...] --out-dir vis/
        [--stride 4] [--start 0] [--frames N] [--alpha 0.5] [--seed 0] [--mask-ratio R]

``--checkpoint`` is an hpm-video model file (``save_model_file``) or an official VideoMAE pretraining
``.pth`` (built as a ``random``-mode model; pass ``--num-frames``/``--img-size`` if it was not
trained on 16 x 224^2 clips). Each ``--video`` is decoded with PyAV: ``--frames`` frames (default:
the model's clip length) ``--stride`` apart from frame ``--start``, the shorter side resized to the
model's frame size, then centre-cropped. An image file becomes a one-frame clip, which needs an image
model (tubelet 1); ``--repeat-image`` instead repeats it into a still clip for a video model.
Writes ``<out-dir>/<name>.png`` and ``<name>.gif`` per input and prints the paths as JSON.
See ``hpm_video.visualize`` for what the rows show.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from hpm_video.checkpoint import load_file, load_model_file, unwrap_state_dict
from hpm_video.hf import PRETRAIN, build_model_from_state, detect_layout, model_config_from_state
from hpm_video.visualize import save_pretrain_visualization

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_pretrain_model(
    path: str,
    num_frames: int = 16,
    img_size: int = 224,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    mask_ratio: float | None = None,
) -> nn.Module:
    """An hpm-video pretraining model file, or an official VideoMAE pretraining checkpoint (random mode)."""
    from hpm_video.models import HPMPretrainModel

    overrides = {} if mask_ratio is None else {"mask_ratio": mask_ratio}
    obj = load_file(path)
    if "model_name" in obj:
        model = load_model_file(path, **overrides)
    else:
        state = unwrap_state_dict(obj)
        layout = detect_layout(state, source=path)
        if layout != PRETRAIN:
            raise ValueError(
                f"{path}: a {layout} checkpoint; visualisation needs a pretraining checkpoint with a decoder"
            )
        name, kwargs = model_config_from_state(state, num_frames, img_size, num_heads, decoder_num_heads, source=path)
        model = build_model_from_state(state, name, {**kwargs, **overrides}, source=path)
    if not isinstance(model, HPMPretrainModel):
        raise ValueError(f"{path}: holds a {type(model).__name__}; visualisation needs a pretraining model")
    return model.eval()


def read_video_frames(path: str, num_frames: int, stride: int, start: int = 0) -> list[Image.Image]:
    """``num_frames`` RGB frames ``stride`` apart from ``start``; short videos repeat their last frame."""
    import av

    wanted = [start + i * stride for i in range(num_frames)]
    kept: dict[int, Image.Image] = {}
    last_index = -1
    last_frame = None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            for index, frame in enumerate(container.decode(video=0)):
                last_index, last_frame = index, frame
                if index in wanted:
                    kept[index] = frame.to_image().convert("RGB")
                if index >= wanted[-1]:
                    break
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: cannot decode as video ({err})") from err
    if last_frame is None:
        raise ValueError(f"{path}: no decodable video frames")
    if last_index < wanted[-1]:
        print(
            f"note: {path} has {last_index + 1} frames, fewer than {wanted[-1] + 1} needed; repeating the last",
            file=sys.stderr,
        )
        tail = last_frame.to_image().convert("RGB")
        return [kept.get(i, tail) if i <= last_index else tail for i in wanted]
    return [kept[i] for i in wanted]


def resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Shorter side to the target's (bilinear), then the central ``size`` = (height, width) crop."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BILINEAR
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def frames_to_clip(
    frames: Sequence[Image.Image], size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """PIL frames -> one normalised clip ``(1, 3, T, H, W)``."""
    arrays = [np.asarray(resize_center_crop(f, size), dtype=np.float32) / 255.0 for f in frames]
    clip = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2)  # (3, T, H, W)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
    return ((clip - mean_t) / std_t).unsqueeze(0)


def load_clip(
    path: str, model: nn.Module, num_frames: int | None, stride: int, start: int, repeat_image: bool
) -> torch.Tensor:
    """The clip the model sees for a video or image file."""
    embed = model.encoder.patch_embed
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input not found: {path}")
    if path.lower().endswith(IMAGE_SUFFIXES):
        try:
            image = Image.open(path).convert("RGB")
        except OSError as err:
            raise ValueError(f"{path}: cannot read as an image ({err})") from err
        if embed.tubelet_size == 1 and not repeat_image:
            frames = [image]  # the image path: a one-frame clip
        elif repeat_image:
            frames = [image] * (num_frames or embed.num_frames)
        else:
            raise ValueError(
                f"{path}: an image, but the model uses tubelets of {embed.tubelet_size} frames; use an image "
                "model (tubelet 1) or --repeat-image for a still clip"
            )
    else:
        frames = read_video_frames(path, num_frames or embed.num_frames, stride, start)
    if len(frames) % embed.tubelet_size:
        raise ValueError(f"{path}: {len(frames)} frames do not split into tubelets of {embed.tubelet_size}")
    return frames_to_clip(frames, tuple(embed.img_size), model.mean, model.std)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="hpm-video model file or official VideoMAE pretrain .pth")
    parser.add_argument("--video", required=True, action="append", help="video or image file (repeatable)")
    parser.add_argument("--out-dir", default="visualizations")
    parser.add_argument("--frames", type=int, help="frames to sample (default: the model's clip length)")
    parser.add_argument("--stride", type=int, default=4, help="frame stride (4 Kinetics, 2 Something-Something)")
    parser.add_argument("--start", type=int, default=0, help="first frame index")
    parser.add_argument("--alpha", type=float, default=0.0, help="hard-mask share for hpm masking (0..1)")
    parser.add_argument("--mask-ratio", type=float, help="override the model's mask ratio")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random part of the mask")
    parser.add_argument("--num-frames", type=int, default=16, help="official checkpoints: clip length trained on")
    parser.add_argument("--img-size", type=int, default=224, help="official checkpoints: frame size trained on")
    parser.add_argument("--num-heads", type=int, help="official checkpoints of unlisted width: encoder heads")
    parser.add_argument("--decoder-num-heads", type=int, help="official checkpoints of unlisted width: decoder heads")
    parser.add_argument("--repeat-image", action="store_true", help="repeat an image into a still clip")
    parser.add_argument("--no-gif", action="store_true")
    args = parser.parse_args(argv)
    if args.stride < 1:
        parser.error("--stride must be at least 1")

    try:
        model = load_pretrain_model(
            args.checkpoint, args.num_frames, args.img_size, args.num_heads, args.decoder_num_heads, args.mask_ratio
        )
        written = []
        for path in args.video:
            clip = load_clip(path, model, args.frames, args.stride, args.start, args.repeat_image)
            stem = os.path.splitext(os.path.basename(path))[0]
            png = os.path.join(args.out_dir, f"{stem}.png")
            gif = None if args.no_gif else os.path.join(args.out_dir, f"{stem}.gif")
            generator = torch.Generator().manual_seed(args.seed)
            written += save_pretrain_visualization(
                model, clip, png, alpha=args.alpha, gif_path=gif, generator=generator
            )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": args.checkpoint, "written": written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
