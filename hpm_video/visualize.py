"""Pictures of what the pretraining model does with a clip.

For every clip the grid has one column per frame and these rows:
  * ``input``          -- the frames, mapped back to [0, 1] with the dataset mean/std;
  * ``mask``           -- the same frames with the masked tubes replaced by flat grey;
  * ``predicted loss`` -- the loss predictor's score of every token over a greyscale copy of the
    frames (teacher when the model has one; the row is left out for models without a predictor);
  * ``reconstruction`` -- visible tubes as in the input, masked tubes from the decoder.

With ``norm_pix_loss`` the decoder predicts each tube standardised per channel; a picture needs
absolute pixels, so the prediction is mapped back with the mean and std of the *input* tube at the
same place (what the visualiser can see, not what the model saw). Without ``norm_pix_loss`` the
prediction already is in [0, 1] pixel units.

``render_pretrain_grid`` returns the grid as a PIL image (the training loop logs it);
``save_pretrain_visualization`` writes it as PNG (row names stored as PNG text) and, optionally, an
animated GIF that plays the rows side by side frame by frame.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torch import nn

from hpm_video.masking import check_mask
from hpm_video.objective import patchify_targets, unpatchify

LABEL_WIDTH = 96  # left column holding the row names
GAP = 2  # pixels between cells
CLIP_GAP = 8  # extra pixels between the blocks of two clips
BACKGROUND = (255, 255, 255)
MASK_GREY = 0.5
HEAT_OPACITY = 0.65
ROW_NAMES = ("input", "mask", "predicted loss", "reconstruction")

# Anchor colours of the heat map, low to high predicted loss (dark blue -> teal -> yellow -> red).
_HEAT_ANCHORS = np.array(
    [[0.05, 0.05, 0.30], [0.10, 0.45, 0.60], [0.30, 0.75, 0.45], [0.95, 0.85, 0.20], [0.85, 0.15, 0.10]],
    dtype=np.float32,
)


@dataclass
class PretrainPanels:
    """Everything a picture needs, as uint8 arrays ``(B, T, H, W, 3)`` keyed by row name."""

    rows: dict[str, np.ndarray]
    mask: torch.Tensor  # (B, N) bool, the mask the pictures show
    scores: torch.Tensor | None  # (B, T', S) predicted loss, None without a predictor

    @property
    def row_names(self) -> list[str]:
        return list(self.rows)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DeepSpeed (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
    return model


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB in [0, 1] by piecewise-linear interpolation of the anchor colours."""
    values = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(values).astype(np.int64).clip(0, len(_HEAT_ANCHORS) - 2)
    frac = (values - low)[..., None]
    return _HEAT_ANCHORS[low] * (1 - frac) + _HEAT_ANCHORS[low + 1] * frac


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """``(B, C, T, H, W)`` in [0, 1] -> ``(B, T, H, W, C)`` uint8 (grey inputs become RGB)."""
    array = video.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array[..., :3]


def _token_map_to_pixels(values: torch.Tensor, grid: tuple[int, int, int], tubelet: int, patch: int) -> torch.Tensor:
    """Per-token values ``(B, N)`` -> ``(B, 1, T, H, W)``, every pixel of a tube carrying its token's value."""
    per_pixel = values.float()[..., None].expand(-1, -1, tubelet * patch * patch)
    return unpatchify(per_pixel, grid, tubelet, patch, channels=1)


@torch.no_grad()
def compute_pretrain_panels(
    model: nn.Module,
    videos: torch.Tensor,
    alpha: float = 0.0,
    max_clips: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> PretrainPanels:
    """Run the model once on up to ``max_clips`` clips and turn its outputs into picture rows.

    The mask is the model's own (``random`` or teacher-guided ``hpm`` at ``alpha``) unless ``mask``
    ``(B, N)`` is given. ``mean``/``std`` default to the ones the model was built with. The model's
    train/eval mode is restored afterwards.
    """
    net = unwrap_model(model)
    if not hasattr(net, "forward_decoder") or not hasattr(net, "score_tokens"):
        raise ValueError(
            f"visualisation needs an HPM pretraining model with a decoder, got {type(net).__name__}"
        )
    if videos.ndim == 4:  # an image batch (B, C, H, W) is a batch of one-frame clips
        videos = videos.unsqueeze(2)
    if videos.ndim != 5:
        raise ValueError(f"expected clips (B, C, T, H, W) or images (B, C, H, W), got {tuple(videos.shape)}")
    if max_clips < 1:
        raise ValueError(f"max_clips must be at least 1, got {max_clips}")
    param = next(net.parameters())
    videos = videos[:max_clips].detach().to(device=param.device, dtype=param.dtype)
    if mask is not None:
        mask = mask[:max_clips].to(param.device)
    mean = tuple(net.mean if mean is None else mean)
    std = tuple(net.std if std is None else std)
    tubelet, patch = net.tubelet_size, net.patch_size
    grid = net.token_grid(videos)

    was_training = net.training
    net.eval()  # no drop path in a picture
    try:
        scores = net.score_tokens(videos, use_teacher=True) if net.loss_predictor is not None else None
        gen = net.mask_generator(grid)
        if mask is None and net.masking == "hpm":  # the mask from these scores: one teacher pass, not two
            mask = gen.hard(scores, alpha, generator)
        elif mask is None:
            mask = gen.random(videos.shape[0], videos.device, generator)
        # Checked here, with the count passed on: a model compiled for training (ENGINE.COMPILE)
        # then runs this forward without a graph break or a generator argument.
        num_masked = check_mask(mask, videos.shape[0], grid[0] * grid[1] * grid[2])
        out = net(videos, alpha=alpha, mask=mask, num_masked=num_masked)
    finally:
        net.train(was_training)

    videos = videos.float()
    token_mask = out["mask"]  # (B, N)
    ids_masked = out["ids_masked"]  # (B, M)
    channels = videos.shape[1]
    # Pixels of every tube in [0, 1], flattened like the decoder's output: (B, N, tubelet*p*p*C).
    tubes = patchify_targets(videos, tubelet, patch, mean, std, normalize=False)
    prediction = out["reconstruction"].float()  # (B, M, tubelet*p*p*C)
    if net.norm_pix_loss:
        shaped = tubes.unflatten(-1, (-1, channels))  # (B, N, tubelet*p*p, C)
        tube_mean = shaped.mean(dim=-2, keepdim=True)
        tube_std = shaped.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6
        index = ids_masked[..., None, None]
        tube_mean = torch.gather(tube_mean, 1, index.expand(-1, -1, *tube_mean.shape[2:]))
        tube_std = torch.gather(tube_std, 1, index.expand(-1, -1, *tube_std.shape[2:]))
        prediction = (prediction.unflatten(-1, (-1, channels)) * tube_std + tube_mean).flatten(2)
    combined = tubes.scatter(1, ids_masked[..., None].expand(-1, -1, tubes.shape[-1]), prediction)

    frames = unpatchify(tubes, grid, tubelet, patch, channels)  # (B, C, T, H, W) in [0, 1]
    reconstruction = unpatchify(combined, grid, tubelet, patch, channels)
    pixel_mask = _token_map_to_pixels(token_mask, grid, tubelet, patch) > 0.5  # (B, 1, T, H, W)
    masked = torch.where(pixel_mask, torch.full_like(frames, MASK_GREY), frames)

    rows = {"input": _to_uint8(frames), "mask": _to_uint8(masked)}
    if scores is not None:
        flat = scores.float().flatten(1)  # (B, N) in (t, s) order, as tokens are flattened
        low = flat.min(dim=1, keepdim=True).values
        high = flat.max(dim=1, keepdim=True).values
        scaled = (flat - low) / (high - low).clamp(min=1e-12)  # per clip, so the ranking shows
        heat = _token_map_to_pixels(scaled, grid, tubelet, patch)[:, 0].cpu().numpy()  # (B, T, H, W)
        grey = frames.mean(dim=1).cpu().numpy()[..., None]  # (B, T, H, W, 1)
        blended = HEAT_OPACITY * heat_colors(heat) + (1 - HEAT_OPACITY) * grey
        rows["predicted loss"] = np.round(blended * 255).astype(np.uint8)
    rows["reconstruction"] = _to_uint8(reconstruction)
    return PretrainPanels(rows=rows, mask=token_mask.cpu(), scores=None if scores is None else scores.float().cpu())


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def grid_image(panels: PretrainPanels) -> Image.Image:
    """Lay out the panels: per clip one block of rows (names on the left), one column per frame."""
    names = panels.row_names
    clips, frames, height, width, _ = panels.rows[names[0]].shape
    block_height = len(names) * height + (len(names) - 1) * GAP
    total_width = LABEL_WIDTH + frames * width + (frames - 1) * GAP
    total_height = clips * block_height + (clips - 1) * CLIP_GAP
    canvas = Image.new("RGB", (total_width, total_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for b in range(clips):
        top = b * (block_height + CLIP_GAP)
        for r, name in enumerate(names):
            y = top + r * (height + GAP)
            draw.text((2, y + max(0, height // 2 - 6)), name, fill=(0, 0, 0), font=font)
            for t in range(frames):
                x = LABEL_WIDTH + t * (width + GAP)
                canvas.paste(Image.fromarray(panels.rows[name][b, t]), (x, y))
    return canvas


def gif_frames(panels: PretrainPanels) -> list[Image.Image]:
    """One image per frame index: the rows side by side (left to right), clips top to bottom."""
    names = panels.row_names
    clips, frames, height, width, _ = panels.rows[names[0]].shape
    size = (len(names) * width + (len(names) - 1) * GAP, clips * height + (clips - 1) * GAP)
    images = []
    for t in range(frames):
        canvas = Image.new("RGB", size, BACKGROUND)
        for b in range(clips):
            for r, name in enumerate(names):
                canvas.paste(Image.fromarray(panels.rows[name][b, t]), (r * (width + GAP), b * (height + GAP)))
        images.append(canvas)
    return images


def render_pretrain_grid(
    model: nn.Module,
    videos: torch.Tensor,
    alpha: float = 0.0,
    max_clips: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Image.Image:
    """The visualisation grid of up to ``max_clips`` clips ``(B, C, T, H, W)`` (or images) as one RGB image.

    Rows per clip: input, mask, predicted loss (models with a loss predictor only), reconstruction;
    one column per frame. Row names are also in ``image.info["rows"]`` (comma separated).
    Under DeepSpeed ZeRO-3 call it on every rank, since the forward gathers parameters collectively.
    """
    panels = compute_pretrain_panels(model, videos, alpha, max_clips, mean, std, mask, generator)
    image = grid_image(panels)
    image.info["rows"] = ",".join(panels.row_names)
    return image


def save_pretrain_visualization(
    model: nn.Module,
    videos: torch.Tensor,
    path_png: str,
    alpha: float = 0.0,
    gif_path: str | None = None,
    max_clips: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    gif_frame_ms: int = 250,
) -> list[str]:
    """Write the grid as PNG (and the animation as GIF when ``gif_path`` is given); returns the paths.

    Both pictures come from the same forward pass, so they show the same mask.
    """
    panels = compute_pretrain_panels(model, videos, alpha, max_clips, mean, std, mask, generator)
    written = []
    info = PngInfo()
    info.add_text("rows", ",".join(panels.row_names))
    info.add_text("alpha", f"{alpha:g}")
    folder = os.path.dirname(os.path.abspath(path_png))
    os.makedirs(folder, exist_ok=True)
    grid_image(panels).save(path_png, format="PNG", pnginfo=info)
    written.append(path_png)
    if gif_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(gif_path)), exist_ok=True)
        images = gif_frames(panels)
        images[0].save(
            gif_path, format="GIF", save_all=True, append_images=images[1:], duration=gif_frame_ms, loop=0
        )
        written.append(gif_path)
    return written
