"""The HPM pretraining model: masked tube autoencoder plus a loss predictor and an EMA teacher.

One step (``forward``):
  1. mask: ``random`` (VideoMAE/MAE) or ``hpm`` (the EMA teacher scores every token of the full clip,
     then ``masking.hard_mask`` masks the hardest, easy-to-hard over training via ``alpha``);
  2. encoder on the visible tokens only;
  3. two decoders on [visible, mask tokens]: reconstruction (pixels) and loss predictor (one scalar
     per token), sharing ``encoder_to_decoder``, ``mask_token`` and the decoder position table;
  4. ``loss = loss_rec + loss_pred``, the predictor learning the student's own (detached) per-token
     reconstruction loss.

Without a predictor and with ``random`` masking, the state-dict keys are exactly those of VideoMAE's
released pretrain checkpoints (``encoder.*``, ``encoder_to_decoder.weight``, ``mask_token``,
``decoder.*``). The predictor lives under ``loss_predictor.*`` and the teacher under ``teacher.*``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from einops import rearrange
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from torch import nn

from hpm_video import masking as masklib
from hpm_video.models.layers import SinCosPositionTable, TubePatchEmbed, as_clip, init_vit_weights, make_blocks
from hpm_video.objective import (
    PRED_LOSSES,
    patchify_targets,
    per_token_mse,
    prediction_loss,
    rank_correlation,
)


def ema_decay(epoch: float) -> float:
    """Teacher EMA decay: 0.999 rising linearly to 0.9999 over the first 100 epochs, then 0.9999."""
    if epoch < 100:
        return 0.999 + 0.0009 * epoch / 100
    return 0.9999


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, ids[b, i]]`` for ``x`` ``(B, N, D)`` and ``ids`` ``(B, M)`` -> ``(B, M, D)``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class PretrainEncoder(nn.Module):
    """ViT encoder that sees only the visible tubes (keys ``patch_embed``, ``blocks``, ``norm``)."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        num_frames: int = 16,
        tubelet_size: int = 2,
    ) -> None:
        super().__init__()
        self.patch_embed = TubePatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, tubelet_size)
        self.pos_embed = SinCosPositionTable(self.patch_embed.num_patches, embed_dim)
        self.blocks = make_blocks(
            depth, embed_dim, num_heads, mlp_ratio, qkv_bias, 0.0, drop_path_rate, init_values
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Clip ``(B, C, T, H, W)`` -> latent ``(B, N_vis, D)``; every token when ``ids_keep`` is None.

        Only the visible tubes are embedded: the others would be dropped right after.
        """
        num_tokens = math.prod(self.patch_embed.token_grid(x))
        pos = self.pos_embed(num_tokens)  # (1, N, D)
        x = self.patch_embed(x, ids_keep)  # (B, N_vis, D)
        if ids_keep is not None:
            pos = pos[0][ids_keep]  # (B, N_vis, D)
        x = x + pos.to(x.dtype)
        x = self.blocks(x)
        return self.norm(x)


class PretrainDecoder(nn.Module):
    """Shallow ViT decoder ending in a per-token linear head (keys ``blocks``, ``norm``, ``head``)."""

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 4,
        num_heads: int = 6,
        out_dim: int = 1536,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
    ) -> None:
        super().__init__()
        self.blocks = make_blocks(
            depth, embed_dim, num_heads, mlp_ratio, qkv_bias, 0.0, drop_path_rate, init_values
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, out_dim)

    def forward(self, x: torch.Tensor, num_last: int | None = None) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, num_last, out_dim)`` for the last ``num_last`` tokens (all if None)."""
        x = self.blocks(x)
        if num_last is not None:
            x = x[:, -num_last:]
        return self.head(self.norm(x))


class HPMPretrainModel(nn.Module):
    """Masked tube autoencoder with Hard Patches Mining; ``forward`` returns the losses of one step."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_frames: int = 16,
        tubelet_size: int = 2,
        encoder_embed_dim: int = 768,
        encoder_depth: int = 12,
        encoder_num_heads: int = 12,
        decoder_embed_dim: int = 384,
        decoder_depth: int = 4,
        decoder_num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        mask_ratio: float = 0.9,
        masking: str = "random",
        mask_unit: str = "tube",
        use_predictor: bool | None = None,
        pred_loss: str = "relative",
        norm_pix_loss: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        grad_checkpointing: bool = False,
        **unused,
    ) -> None:
        super().__init__()
        masklib.check_choice("masking mode", masking, masklib.MASKING_MODES)
        masklib.check_choice("mask unit", mask_unit, masklib.MASK_UNITS)
        masklib.check_choice("prediction loss", pred_loss, PRED_LOSSES)
        if use_predictor is None:
            use_predictor = masking == "hpm"
        if masking == "hpm" and not use_predictor:
            raise ValueError("masking 'hpm' needs the loss predictor (use_predictor=True)")
        self.masking = masking
        self.mask_unit = mask_unit
        self.mask_ratio = mask_ratio
        self.pred_loss = pred_loss
        self.norm_pix_loss = norm_pix_loss
        self.mean = tuple(mean)
        self.std = tuple(std)
        # The same values on the model's device, for the targets: a tensor made from Python numbers
        # in the step would be a blocking host-to-device copy on a GPU. Not saved in checkpoints.
        self.register_buffer("pixel_mean", torch.tensor(self.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std, dtype=torch.float32), persistent=False)
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.in_chans = in_chans
        patch_dim = in_chans * tubelet_size * patch_size**2

        self.encoder = PretrainEncoder(
            img_size, patch_size, in_chans, encoder_embed_dim, encoder_depth, encoder_num_heads,
            mlp_ratio, qkv_bias, drop_path_rate, init_values, num_frames, tubelet_size,
        )  # fmt: skip
        num_patches = self.encoder.patch_embed.num_patches
        self.encoder_to_decoder = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = SinCosPositionTable(num_patches, decoder_embed_dim)
        decoder_args = (decoder_embed_dim, decoder_depth, decoder_num_heads)
        self.decoder = PretrainDecoder(*decoder_args, patch_dim, mlp_ratio, qkv_bias, drop_path_rate, init_values)
        self.loss_predictor = (
            PretrainDecoder(*decoder_args, 1, mlp_ratio, qkv_bias, drop_path_rate, init_values)
            if use_predictor
            else None
        )

        self.apply(init_vit_weights)
        trunc_normal_(self.mask_token, std=0.02)
        self.teacher = self._make_teacher() if masking == "hpm" else None
        self._mask_generators: dict[tuple[int, int], masklib.MaskGenerator] = {}
        self._ema_params: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None
        self.set_grad_checkpointing(grad_checkpointing)
        self.mask_generator(self.encoder.patch_embed.grid_size)  # refuse a ratio that masks nothing now

    # ----------------------------------------------------------------------------------- set-up
    def _student_parts(self) -> dict[str, nn.Module]:
        """The modules the teacher mirrors: all it needs to score a full clip."""
        return {
            "encoder": self.encoder,
            "encoder_to_decoder": self.encoder_to_decoder,
            "loss_predictor": self.loss_predictor,
        }

    def _make_teacher(self) -> nn.ModuleDict:
        teacher = nn.ModuleDict({k: copy.deepcopy(m) for k, m in self._student_parts().items()})
        teacher.requires_grad_(False)
        teacher.eval()
        return teacher

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Copy the student into the teacher (after loading student-only weights)."""
        if self.teacher is None:
            return
        for name, module in self._student_parts().items():
            self.teacher[name].load_state_dict(module.state_dict())

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) tensors in matching order, for the EMA update.

        The parameter pairs are matched by name once and kept (a parameter object survives ``.to()``
        and DeepSpeed re-pointing its ``.data``); the tensors are read from them at every call. Under
        ZeRO-3 parameters are partitioned: each rank updates its own partition (``ds_tensor``), which
        lines up because teacher and student tensors have the same shapes.
        """
        if self._ema_params is None:
            self._ema_params = self._match_ema_params()
        teacher, student = self._ema_params
        return [getattr(p, "ds_tensor", p) for p in teacher], [getattr(p, "ds_tensor", p) for p in student]

    def _match_ema_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        if self.teacher is None:
            return [], []
        teacher, student = [], []
        for name, module in self._student_parts().items():
            for (tn, tp), (sn, sp) in zip(
                self.teacher[name].named_parameters(), module.named_parameters(), strict=True
            ):
                assert tn == sn, (tn, sn)
                teacher.append(tp)
                student.append(sp)
        return teacher, student

    @torch.no_grad()
    def update_teacher(self, decay: float, applied: torch.Tensor | None = None) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, in a few fused ``_foreach`` kernels.

        ``applied``: a 0-d device tensor, 0.0 when the student's last update was skipped (the
        teacher then stays as it is). Read on the device, as a weight, so there is no host sync.
        """
        teacher, student = self.ema_pairs()
        if not teacher:
            return
        if teacher[0].dtype != student[0].dtype:
            student = [s.to(teacher[0].dtype) for s in student]
        if applied is None:
            torch._foreach_lerp_(teacher, student, 1.0 - decay)
            return
        # lerp takes a tensor weight only per tensor (or through .item()); t + w * (s - t) is the
        # same formula in three fused passes.
        delta = torch._foreach_sub(student, teacher)
        torch._foreach_mul_(delta, applied.to(teacher[0].dtype) * (1.0 - decay))
        torch._foreach_add_(teacher, delta)

    def train(self, mode: bool = True) -> HPMPretrainModel:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never uses drop path
        return self

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in (self.encoder, self.decoder, self.loss_predictor):
            if module is not None:
                module.blocks.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    # ---------------------------------------------------------------------------------- masking
    def token_grid(self, videos: torch.Tensor) -> tuple[int, int, int]:
        """``(T', H', W')`` of a clip, refusing sizes the tube does not divide."""
        return self.encoder.patch_embed.token_grid(videos)

    def mask_generator(self, grid: tuple[int, int, int]) -> masklib.MaskGenerator:
        key = (grid[0], grid[1] * grid[2])
        if key not in self._mask_generators:
            self._mask_generators[key] = masklib.MaskGenerator(key, self.mask_ratio, self.mask_unit)
        return self._mask_generators[key]

    @torch.no_grad()
    def score_tokens(self, videos: torch.Tensor, use_teacher: bool = True) -> torch.Tensor:
        """Predicted reconstruction loss of every token of the full clip, ``(B, T', H'*W')``."""
        parts = self.teacher if (use_teacher and self.teacher is not None) else self._student_parts()
        if parts["loss_predictor"] is None:
            raise ValueError("this model has no loss predictor to score tokens with")
        videos = as_clip(videos)
        t, h, w = self.token_grid(videos)
        latent = parts["encoder"](videos)  # (B, N, D)
        x = parts["encoder_to_decoder"](latent)
        x = x + self.decoder_pos_embed(x.shape[1]).to(x.dtype)
        scores = parts["loss_predictor"](x).squeeze(-1)  # (B, N)
        return rearrange(scores, "b (t s) -> b t s", t=t, s=h * w)

    def mask_noise(
        self, videos: torch.Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)
    ) -> torch.Tensor:
        """The uniform noise ``(B, U)`` the step's mask draws from, on the clips' device.

        The training loop draws it here, outside the (possibly compiled) forward, and passes it as
        ``noise=``: a ``torch.Generator`` argument would break a ``torch.compile`` graph.
        ``shard=(rank, world)`` with a generator shared by all ranks makes the masks of N processes
        those of one process with the global batch (see ``masking.uniform_noise``).
        """
        videos = as_clip(videos)
        gen = self.mask_generator(self.token_grid(videos))
        return gen.noise(videos.shape[0], generator, videos.device, shard)

    @torch.no_grad()
    def generate_mask(
        self,
        videos: torch.Tensor,
        alpha: float | torch.Tensor = 0.0,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step's mask ``(B, N)``: uniform for ``random``, teacher-guided for ``hpm``.

        The randomness is ``noise`` when given (from ``mask_noise``), else drawn here from
        ``generator`` and ``shard`` exactly as ``mask_noise`` would.
        """
        videos = as_clip(videos)
        gen = self.mask_generator(self.token_grid(videos))
        if self.masking == "hpm":
            return gen.hard(self.score_tokens(videos, use_teacher=True), alpha, generator, shard, noise)
        return gen.random(videos.shape[0], videos.device, generator, shard, noise)

    # ---------------------------------------------------------------------------------- forward
    def forward_encoder(self, videos: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        return self.encoder(videos, ids_keep)  # (B, N_vis, D_enc)

    def forward_decoder(
        self, latent: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reconstruction ``(B, M, patch_dim)`` and predicted loss ``(B, M)`` of the masked tokens."""
        x_vis = self.encoder_to_decoder(latent)  # (B, N_vis, D_dec)
        batch, num_masked = ids_masked.shape
        pos = self.decoder_pos_embed(ids_keep.shape[1] + num_masked)[0].to(x_vis.dtype)  # (N, D_dec)
        x = torch.cat(
            [x_vis + pos[ids_keep], self.mask_token.to(x_vis.dtype) + pos[ids_masked]], dim=1
        )  # (B, N, D_dec): visible first, then masked, each in token order
        reconstruction = self.decoder(x, num_masked)
        predicted = None
        if self.loss_predictor is not None:
            predicted = self.loss_predictor(x, num_masked).squeeze(-1)  # (B, M)
        return reconstruction, predicted

    def forward_loss(
        self,
        videos: torch.Tensor,
        reconstruction: torch.Tensor,
        predicted: torch.Tensor | None,
        ids_masked: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = patchify_targets(
                videos, self.tubelet_size, self.patch_size, self.pixel_mean, self.pixel_std, self.norm_pix_loss
            )
            target = gather_tokens(target, ids_masked)  # (B, M, patch_dim)
        token_loss = per_token_mse(reconstruction, target)  # (B, M)
        loss_rec = token_loss.mean()
        out = {"loss_rec": loss_rec, "token_loss": token_loss.detach()}
        if predicted is None:
            out["loss"] = loss_rec
            return out
        loss_pred = prediction_loss(predicted, token_loss.detach(), self.pred_loss)
        out.update(
            loss=loss_rec + loss_pred,
            loss_pred=loss_pred,
            rank_corr=rank_correlation(predicted, token_loss),
            predicted_loss=predicted.detach(),
        )
        return out

    def forward(
        self,
        videos: torch.Tensor,
        alpha: float | torch.Tensor = 0.0,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
        num_masked: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One pretraining step's forward on clips ``(B, C, T, H, W)``.

        Without ``mask`` one is drawn (``generate_mask``); a compiled step passes ``noise`` from
        ``mask_noise`` rather than a ``generator``, which would break the graph. A given ``mask`` is
        checked on the host unless its per-sample count ``num_masked`` is passed too (the check
        reads values back, another graph break).

        Returns ``loss`` (to backpropagate), ``loss_rec``, and with a predictor ``loss_pred`` and
        ``rank_corr``; also ``mask`` ``(B, N)`` and detached per-token values for visualisation.
        """
        videos = as_clip(videos)
        batch = videos.shape[0]
        t, h, w = self.token_grid(videos)
        num_tokens = t * h * w
        if mask is None:
            mask = self.generate_mask(videos, alpha, generator, shard, noise)
            num_masked = self.mask_generator((t, h, w)).num_masked
        elif num_masked is None:
            num_masked = masklib.check_mask(mask, batch, num_tokens)
        ids_keep, ids_masked = masklib.visible_and_masked_ids(mask, num_masked)
        latent = self.forward_encoder(videos, ids_keep)
        reconstruction, predicted = self.forward_decoder(latent, ids_keep, ids_masked)
        out = self.forward_loss(videos, reconstruction, predicted, ids_masked)
        out.update(mask=mask, ids_masked=ids_masked, reconstruction=reconstruction.detach())
        return out

