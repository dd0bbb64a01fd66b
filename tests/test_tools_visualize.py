import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tool_helpers import load_tool

import hpm_video  # noqa: F401
from hpm_video.checkpoint import save_model_file
from hpm_video.models import create_model
from hpm_video.objective import patchify_targets
from hpm_video.visualize import (
    CLIP_GAP,
    GAP,
    LABEL_WIDTH,
    MASK_GREY,
    compute_pretrain_panels,
    render_pretrain_grid,
    save_pretrain_visualization,
)

NAME = "hpm_pretrain_vit_tiny_patch16"
TINY = dict(
    img_size=32, patch_size=8, num_frames=4, tubelet_size=2,
    encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75,
)  # fmt: skip
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
    torch.manual_seed(0)
    return create_model(NAME, **{**TINY, **kw})


def smooth_clip(batch=2, frames=4, size=32):
    """Normalised clips with structure (gradients and a moving square), unlike white noise."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    clips = []
    for b in range(batch):
        frames_ = []
        for t in range(frames):
            square = torch.zeros(size, size)
            square[8:16, 4 + 4 * t + b : 12 + 4 * t + b] = 1
            frames_.append(torch.stack([xx, yy, square]))
        clips.append(torch.stack(frames_, 1))
    clip = torch.stack(clips)  # (B, 3, T, H, W) in [0, 1]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    return (clip - mean) / std


def cells(image, row, clips=1, rows=4, frames=4, size=32, clip=0):
    """The frame cells of one row of the grid as an array (frames, size, size, 3)."""
    array = np.asarray(image.convert("RGB"))
    block = rows * size + (rows - 1) * GAP
    top = clip * (block + CLIP_GAP) + row * (size + GAP)
    out = []
    for t in range(frames):
        left = LABEL_WIDTH + t * (size + GAP)
        out.append(array[top : top + size, left : left + size])
    return np.stack(out).astype(np.int16)


def test_png_is_readable_and_rows_differ(tmp_path):
    model = tiny(masking="hpm")
    videos = smooth_clip()
    png, gif = str(tmp_path / "grid.png"), str(tmp_path / "grid.gif")
    written = save_pretrain_visualization(model, videos, png, alpha=0.5, gif_path=gif)
    assert written == [png, gif]
    image = Image.open(png)
    image.load()
    rows = image.text["rows"].split(",")
    assert rows == ["input", "mask", "predicted loss", "reconstruction"]
    height = 2 * (4 * 32 + 3 * GAP) + CLIP_GAP
    assert image.size == (LABEL_WIDTH + 4 * 32 + 3 * GAP, height)
    grids = [cells(image, r, clips=2) for r in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(grids[i] - grids[j]).mean() > 1.0, (rows[i], rows[j])
    # The mask row is grey on exactly the masked tubes: 75% of 16 spatial tubes, in every frame.
    grey = np.all(grids[1] == round(MASK_GREY * 255), axis=-1)  # (T, H, W)
    assert grey.mean() == pytest.approx(0.75, abs=0.02)
    assert np.array_equal(grey[0], grey[1])  # same tube mask for every frame
    # Visible pixels of the reconstruction are the input's.
    visible = ~grey
    assert np.abs(grids[3] - grids[0])[visible].max() <= 1
    animation = Image.open(gif)
    assert animation.n_frames == 4
    assert model.training  # mode restored


def test_no_predictor_leaves_out_the_heatmap_row():
    model = tiny(masking="random", use_predictor=False)
    image = render_pretrain_grid(model, smooth_clip(batch=3), max_clips=2)
    assert image.info["rows"] == "input,mask,reconstruction"
    assert image.size == (LABEL_WIDTH + 4 * 32 + 3 * GAP, 2 * (3 * 32 + 2 * GAP) + CLIP_GAP)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_reconstruction_is_unnormalised_per_patch(norm_pix_loss):
    """A decoder that outputs the exact targets must give back the input picture."""
    model = tiny(masking="random", norm_pix_loss=norm_pix_loss).eval()
    videos = smooth_clip()
    targets = patchify_targets(videos, 2, 8, model.mean, model.std, normalize=norm_pix_loss)

    def perfect_decoder(latent, ids_keep, ids_masked):
        index = ids_masked[..., None].expand(-1, -1, targets.shape[-1])
        return torch.gather(targets, 1, index), None

    model.forward_decoder = perfect_decoder
    panels = compute_pretrain_panels(model, videos)
    diff = np.abs(panels.rows["reconstruction"].astype(int) - panels.rows["input"].astype(int))
    assert diff.max() <= 1
    # ... whereas a decoder that outputs zeros in normalised units shows flat tubes, not the input.
    model.forward_decoder = lambda latent, ids_keep, ids_masked: (torch.zeros_like(torch.gather(
        targets, 1, ids_masked[..., None].expand(-1, -1, targets.shape[-1]))), None)  # fmt: skip
    panels = compute_pretrain_panels(model, videos)
    diff = np.abs(panels.rows["reconstruction"].astype(int) - panels.rows["input"].astype(int))
    assert diff.max() > 10


def test_image_batch_is_a_one_frame_clip():
    model = tiny(masking="hpm", num_frames=1, tubelet_size=1)
    image = render_pretrain_grid(model, smooth_clip(batch=1, frames=1)[:, :, 0])
    assert image.size == (LABEL_WIDTH + 32, 4 * 32 + 3 * GAP)


def _cli():
    return load_tool("visualize")


def write_video(path, frames=12, height=40, width=48):
    av = pytest.importorskip("av")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            array = np.zeros((height, width, 3), np.uint8)
            array[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]
            array[10:26, i : i + 16, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_cli_video_image_and_official_checkpoint(tmp_path, capsys):
    cli = _cli()
    video = str(tmp_path / "clip.mp4")
    write_video(video)
    photo = str(tmp_path / "photo.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photo)

    video_model = tiny(masking="hpm")
    model_file = str(tmp_path / "video_model.pth")
    save_model_file(model_file, video_model, NAME, **TINY, masking="hpm")
    out = str(tmp_path / "out")
    assert cli.main(["--checkpoint", model_file, "--video", video, "--out-dir", out, "--stride", "3"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert [os.path.basename(p) for p in written] == ["clip.png", "clip.gif"]
    assert Image.open(written[0]).size == (LABEL_WIDTH + 4 * 32 + 3 * GAP, 4 * 32 + 3 * GAP)

    # An image needs an image model (tubelet 1) unless repeated into a still clip.
    assert cli.main(["--checkpoint", model_file, "--video", photo, "--out-dir", out]) == 2
    assert "tubelets of 2 frames" in capsys.readouterr().err
    image_kwargs = {**TINY, "num_frames": 1, "tubelet_size": 1}
    image_file = str(tmp_path / "image_model.pth")
    save_model_file(image_file, tiny(num_frames=1, tubelet_size=1), NAME, **image_kwargs)
    assert cli.main(["--checkpoint", image_file, "--video", photo, "--out-dir", out, "--no-gif"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert Image.open(written[0]).size == (LABEL_WIDTH + 32, 3 * 32 + 2 * GAP)  # random mode: no heatmap

    # An official VideoMAE pretraining file: bare state dict under "model", built in random mode.
    official = str(tmp_path / "videomae.pth")
    torch.save({"model": tiny(masking="random", use_predictor=False).state_dict()}, official)
    args = ["--checkpoint", official, "--video", video, "--out-dir", out, "--num-frames", "4", "--img-size", "32",
            "--num-heads", "2", "--decoder-num-heads", "2", "--no-gif"]  # fmt: skip
    assert cli.main(args) == 0
    capsys.readouterr()


def test_cli_refuses_unknown_layout_naming_prefixes(tmp_path, capsys):
    cli = _cli()
    bad = str(tmp_path / "weird.pth")
    torch.save({"backbone.layer1.weight": torch.zeros(1), "neck.fc.bias": torch.zeros(1)}, bad)
    photo = str(tmp_path / "p.png")
    Image.new("RGB", (32, 32)).save(photo)
    assert cli.main(["--checkpoint", bad, "--video", photo]) == 2
    err = capsys.readouterr().err
    assert "weird.pth" in err and "backbone.layer1" in err and "neck.fc" in err
    # A fine-tuned classifier has no decoder to picture.
    classifier = str(tmp_path / "ft.pth")
    vit = create_model("hpm_vit_tiny_patch16", embed_dim=64, depth=1, num_heads=2, num_classes=5, img_size=32)
    torch.save({"module": vit.state_dict()}, classifier)
    assert cli.main(["--checkpoint", classifier, "--video", photo]) == 2
    assert "needs a pretraining checkpoint" in capsys.readouterr().err
