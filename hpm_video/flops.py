"""Parameters and FLOPs per clip of the pretraining and fine-tuning models.

Convention: fvcore counts one fused multiply-add as one "flop". Here that number is called **GMACs**
(1e9 multiply-adds) and **GFLOPs = 2 x GMACs**, the hardware convention that peak TFLOP/s figures
and MFU use. Both are reported.

Per clip:
  * pretraining forward (the "student"): patch embedding, encoder and ``encoder_to_decoder`` on the
    visible tokens (the official VideoMAE code embeds every token: 3.3 GFLOPs more per ViT-B clip),
    the reconstruction decoder (and the loss predictor when the model has one) on all tokens, heads
    on the masked tokens;
  * HPM teacher pass (``masking='hpm'``): the EMA teacher's encoder, ``encoder_to_decoder`` and loss
    predictor on the *whole* clip, forward only;
  * training = 3 x student forward (forward + backward at about twice the forward) + teacher pass;
  * fine-tuning: classifier forward on all tokens; training = 3 x forward.

Two methods: ``fvcore`` (``FlopCountAnalysis`` on a traced forward, with a handler for
``aten::scaled_dot_product_attention``, which fvcore otherwise skips silently) and ``analytic``
(closed form from the architecture: linear layers, the two attention matmuls, LayerNorms at 5
per element as fvcore counts them; needs no extra package). Softmax, GELU, residual adds and the
losses are not counted by either.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpm_video import masking as masklib
from hpm_video.models.layers import check_divisible

CONVENTION = "GMACs = 1e9 multiply-adds (what fvcore calls flops); GFLOPs = 2 x GMACs"
NORM_MACS_PER_ELEMENT = 5  # fvcore's estimate for an affine LayerNorm


# --------------------------------------------------------------------------------------- fvcore
def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: ``Q K^T`` plus ``P V`` multiply-adds.

    For query ``(..., L, E)``, key ``(..., S, E)`` and value ``(..., S, Ev)`` that is
    ``batch * L * S * (E + Ev)``; the softmax is not counted, like other element-wise ops.
    """
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(v) for v in inputs[:3])
    batch = math.prod(query[:-2])
    return batch * query[-2] * key[-2] * (query[-1] + value[-1])


def fvcore_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, dict[str, int]]:
    """Total multiply-adds of ``module(*inputs)`` counted by fvcore, and the count per submodule name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import uses the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about the host-side mask count
        total = int(analysis.total())
        by_module = analysis.by_module()
    return total, {name: int(value) for name, value in by_module.items()}


class _StudentForward(nn.Module):
    """One pretraining forward with a fixed mask, returning a tensor so that it can be traced."""

    def __init__(self, model: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.model(videos, mask=self.mask)["loss"]


class _TeacherPass(nn.Module):
    """The HPM teacher's scoring of the full clip (what ``generate_mask`` runs before each step)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.model.score_tokens(videos, use_teacher=True)


# ------------------------------------------------------------------------------------- analytic
@dataclass(frozen=True)
class StackSpec:
    """A stack of pre-LN blocks: width, depth, MLP hidden width, q/v biases, LayerScale."""

    dim: int
    depth: int
    hidden: int
    qkv_bias: bool = True
    layer_scale: bool = False


@dataclass(frozen=True)
class ArchSpec:
    """What the closed-form counts need, from a model (``arch_from_model``) or a name (``arch_from_name``)."""

    kind: str  # "pretrain" or "finetune"
    in_chans: int
    tubelet: int
    patch: int
    encoder: StackSpec
    decoder: StackSpec | None = None  # pretraining: the reconstruction decoder (and predictor, same sizes)
    predictor: bool = False
    teacher: bool = False
    masking: str = "random"
    mask_ratio: float = 0.9
    mask_unit: str = "tube"
    num_classes: int = 0
    mean_pooling: bool = True

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.tubelet * self.patch * self.patch


def _stack_from_blocks(blocks: nn.Module) -> StackSpec:
    first = blocks[0]
    return StackSpec(
        dim=first.norm1.normalized_shape[0],
        depth=len(blocks),
        hidden=first.mlp.fc1.out_features,
        qkv_bias=first.attn.q_bias is not None,
        layer_scale=getattr(first, "gamma_1", None) is not None,
    )


def arch_from_model(model: nn.Module) -> ArchSpec:
    """The spec of a built ``HPMPretrainModel`` or ``VisionTransformer``."""
    if hasattr(model, "encoder"):
        embed = model.encoder.patch_embed
        return ArchSpec(
            kind="pretrain", in_chans=embed.in_chans, tubelet=embed.tubelet_size, patch=embed.patch_size,
            encoder=_stack_from_blocks(model.encoder.blocks), decoder=_stack_from_blocks(model.decoder.blocks),
            predictor=model.loss_predictor is not None, teacher=model.teacher is not None, masking=model.masking,
            mask_ratio=model.mask_ratio, mask_unit=model.mask_unit,
        )  # fmt: skip
    embed = model.patch_embed
    head = model.head
    return ArchSpec(
        kind="finetune", in_chans=embed.in_chans, tubelet=embed.tubelet_size, patch=embed.patch_size,
        encoder=_stack_from_blocks(model.blocks), num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
        mean_pooling=bool(model.use_mean_pooling),
    )  # fmt: skip


def arch_from_name(model_name: str, **kwargs: Any) -> ArchSpec:
    """The spec of ``create_model(model_name, **kwargs)`` without building it (no memory, no init time).

    Defaults are read from the model classes' signatures and the size table, so they cannot drift.
    """
    from hpm_video.models import PRETRAIN_MODELS
    from hpm_video.models.registry import size_kwargs

    cls, size_args = size_kwargs(model_name)
    pretrain = model_name in PRETRAIN_MODELS
    args = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    args.update(size_args)
    args.update(kwargs)

    def stack(width: int, blocks: int) -> StackSpec:
        hidden = int(width * args["mlp_ratio"])  # as the blocks compute it
        return StackSpec(width, blocks, hidden, bool(args["qkv_bias"]), bool(args["init_values"]))

    common = dict(in_chans=args["in_chans"], tubelet=args["tubelet_size"], patch=args["patch_size"])
    if not pretrain:
        return ArchSpec(
            kind="finetune", encoder=stack(args["embed_dim"], args["depth"]), num_classes=args["num_classes"],
            mean_pooling=bool(args["use_mean_pooling"]), **common,
        )  # fmt: skip
    predictor = args["use_predictor"]
    if predictor is None:
        predictor = args["masking"] == "hpm"
    return ArchSpec(
        kind="pretrain", encoder=stack(args["encoder_embed_dim"], args["encoder_depth"]),
        decoder=stack(args["decoder_embed_dim"], args["decoder_depth"]), predictor=bool(predictor),
        teacher=args["masking"] == "hpm", masking=args["masking"], mask_ratio=args["mask_ratio"],
        mask_unit=args["mask_unit"], **common,
    )  # fmt: skip


def _stack_macs(stack: StackSpec, tokens: int) -> int:
    """Pre-LN blocks: q/k/v/proj linears, the MLP, the two attention matmuls, two LayerNorms per block."""
    dim, hidden = stack.dim, stack.hidden
    linears = tokens * (4 * dim * dim + 2 * dim * hidden)
    attention = 2 * tokens * tokens * dim
    norms = 2 * NORM_MACS_PER_ELEMENT * tokens * dim
    return stack.depth * (linears + attention + norms)


def _stack_params(stack: StackSpec) -> int:
    dim, hidden = stack.dim, stack.hidden
    per_block = 4 * dim * dim + dim  # qkv (no bias) + proj
    per_block += 2 * dim if stack.qkv_bias else 0
    per_block += 2 * dim * hidden + hidden + dim  # MLP
    per_block += 4 * dim  # two LayerNorms
    per_block += 2 * dim if stack.layer_scale else 0
    return stack.depth * per_block


def _head_macs(stack: StackSpec, out_dim: int, tokens: int) -> int:
    """Final LayerNorm and linear head of a decoder on ``tokens`` tokens."""
    return tokens * (NORM_MACS_PER_ELEMENT * stack.dim + stack.dim * out_dim)


def analytic_macs(spec: ArchSpec, grid: tuple[int, int, int]) -> dict[str, int]:
    """Multiply-adds of one clip on token grid ``grid`` = (T', H', W'), by part.

    Pretraining parts: ``encoder``, ``encoder_to_decoder``, ``decoder``, ``loss_predictor`` (the
    student forward) and ``teacher`` (HPM's full-clip pass); fine-tuning: ``classifier``.
    """
    tokens = math.prod(grid)
    dim = spec.encoder.dim
    embed = tokens * dim * spec.patch_dim
    if spec.kind == "finetune":
        macs = embed + _stack_macs(spec.encoder, tokens)
        macs += NORM_MACS_PER_ELEMENT * dim * (1 if spec.mean_pooling else tokens)
        return {"classifier": macs + dim * spec.num_classes}
    masked = masklib.num_masked_tokens((grid[0], grid[1] * grid[2]), spec.mask_ratio, spec.mask_unit)
    visible = tokens - masked
    dec = spec.decoder
    parts = {
        "encoder": visible * dim * spec.patch_dim + _stack_macs(spec.encoder, visible)
        + NORM_MACS_PER_ELEMENT * visible * dim,
        "encoder_to_decoder": visible * dim * dec.dim,
        "decoder": _stack_macs(dec, tokens) + _head_macs(dec, spec.patch_dim, masked),
        "loss_predictor": _stack_macs(dec, tokens) + _head_macs(dec, 1, masked) if spec.predictor else 0,
        "teacher": 0,
    }
    if spec.teacher:
        parts["teacher"] = (
            embed + _stack_macs(spec.encoder, tokens) + NORM_MACS_PER_ELEMENT * tokens * dim
            + tokens * dim * dec.dim + _stack_macs(dec, tokens) + _head_macs(dec, 1, tokens)
        )  # fmt: skip
    return parts


def analytic_params(spec: ArchSpec) -> tuple[int, int]:
    """(trainable parameters, teacher parameters) of the spec'd model."""
    dim = spec.encoder.dim
    embed = dim * spec.patch_dim + dim
    if spec.kind == "finetune":
        final_norm = 2 * dim  # fc_norm with mean pooling, norm without
        head = dim * spec.num_classes + spec.num_classes
        return embed + _stack_params(spec.encoder) + final_norm + head, 0
    dec = spec.decoder
    encoder = embed + _stack_params(spec.encoder) + 2 * dim
    to_decoder = dim * dec.dim
    decoder = _stack_params(dec) + 2 * dec.dim + dec.dim * spec.patch_dim + spec.patch_dim
    predictor = _stack_params(dec) + 2 * dec.dim + dec.dim + 1 if spec.predictor else 0
    trainable = encoder + to_decoder + dec.dim + decoder + predictor  # dec.dim: the mask token
    teacher = encoder + to_decoder + predictor if spec.teacher else 0
    return trainable, teacher


# ------------------------------------------------------------------------------------- reports
def _params(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _frame_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    height, width = img_size
    return int(height), int(width)


def _resolve_method(method: str) -> str:
    if method not in ("auto", "fvcore", "analytic"):
        raise ValueError(f"unknown FLOP counting method {method!r}; valid: auto, fvcore, analytic")
    if method != "auto":
        return method
    try:
        import fvcore  # noqa: F401
    except ImportError:
        return "analytic"
    return "fvcore"


def _report(
    spec: ArchSpec,
    method: str,
    model_name: str,
    num_frames: int,
    size: tuple[int, int],
    parts: dict[str, int],
    params: tuple[int, int],
) -> dict[str, Any]:
    """One row of results: shapes, parameters, and MACs/FLOPs of forward, teacher pass and training."""
    grid = (num_frames // spec.tubelet, size[0] // spec.patch, size[1] // spec.patch)
    tokens = math.prod(grid)
    report: dict[str, Any] = {"model": model_name, "kind": spec.kind, "method": method}
    parts = dict(parts)
    teacher = parts.pop("teacher", 0)
    forward = sum(parts.values())
    if spec.kind == "pretrain":
        masked = masklib.num_masked_tokens((grid[0], grid[1] * grid[2]), spec.mask_ratio, spec.mask_unit)
        report.update(masking=spec.masking, mask_ratio=spec.mask_ratio, mask_unit=spec.mask_unit,
                      use_predictor=spec.predictor)  # fmt: skip
    else:
        masked = 0
    report.update(
        num_frames=num_frames,
        img_size=list(size),
        tokens=tokens,
        visible_tokens=tokens - masked,
        params=params[0],
        teacher_params=params[1],
        parts_gmacs={k: v / 1e9 for k, v in parts.items()},
    )
    for name, value in {"forward": forward, "teacher": teacher, "train": 3 * forward + teacher}.items():
        report[f"{name}_gmacs"] = value / 1e9
        report[f"{name}_gflops"] = 2 * value / 1e9
    report["convention"] = CONVENTION
    return report


@torch.no_grad()
def count_flops(
    model: nn.Module,
    num_frames: int | None = None,
    img_size: int | Sequence[int] | None = None,
    method: str = "fvcore",
    model_name: str | None = None,
) -> dict[str, Any]:
    """FLOPs and parameters per clip of a built ``HPMPretrainModel`` or ``VisionTransformer``.

    A pretraining model is counted with its own mask ratio, mask unit and masking mode; the clip
    defaults to the model's size. ``method`` is ``fvcore``, ``analytic`` or ``auto`` (fvcore when
    installed). The model is left in the train/eval mode it had.
    """
    method = _resolve_method(method)
    spec = arch_from_model(model)
    embed = model.encoder.patch_embed if spec.kind == "pretrain" else model.patch_embed
    frames = num_frames or embed.num_frames
    size = _frame_size(embed.img_size if img_size is None else img_size)
    grid = embed.token_grid(torch.empty(1, spec.in_chans, frames, *size, device="meta"))
    if method == "analytic":
        parts = analytic_macs(spec, grid)
        params = (_params(model, trainable_only=True), _params(getattr(model, "teacher", None)))
        return _report(spec, method, model_name or type(model).__name__, frames, size, parts, params)
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    videos = torch.randn(1, spec.in_chans, frames, *size, generator=generator).to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    try:
        if spec.kind == "finetune":
            parts = {"classifier": fvcore_macs(model, (videos,))[0]}
        else:
            spatial = (grid[0], grid[1] * grid[2])
            mask = masklib.random_mask(1, spatial, model.mask_ratio, model.mask_unit, generator).to(param.device)
            _, by_module = fvcore_macs(_StudentForward(model, mask), (videos,))
            names = ("encoder", "encoder_to_decoder", "decoder", "loss_predictor")
            parts = {name: by_module.get(f"model.{name}", 0) for name in names}
            # Anything the student ran outside those modules (none today) still counts.
            parts["other"] = by_module.get("", 0) - sum(parts.values())
            parts["teacher"] = fvcore_macs(_TeacherPass(model), (videos,))[0] if spec.teacher else 0
    finally:
        model.train(was_training)
    params = (_params(model, trainable_only=True), _params(getattr(model, "teacher", None)))
    return _report(spec, method, model_name or type(model).__name__, frames, size, parts, params)


def model_flops(
    model_name: str,
    num_frames: int = 16,
    img_size: int = 224,
    mask_ratio: float = 0.9,
    masking: str = "random",
    use_predictor: bool | None = None,
    mask_unit: str = "tube",
    num_classes: int = 400,
    method: str = "fvcore",
    **model_kwargs: Any,
) -> dict[str, Any]:
    """FLOPs and parameters per clip of a registered model at this clip size.

    Pretraining options (``mask_ratio``, ``masking``, ``use_predictor``, ``mask_unit``) are ignored
    for classifiers, ``num_classes`` for pretraining models. ``analytic`` does not build the model
    (instant even for ViT-H); ``fvcore`` builds it on the CPU and traces one forward.
    """
    from hpm_video.models import MODEL_NAMES, PRETRAIN_MODELS, create_model

    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; valid: {', '.join(MODEL_NAMES)}")
    method = _resolve_method(method)
    kwargs = dict(num_frames=num_frames, img_size=img_size, **model_kwargs)
    if model_name in PRETRAIN_MODELS:
        kwargs.update(mask_ratio=mask_ratio, masking=masking, use_predictor=use_predictor, mask_unit=mask_unit)
    else:
        kwargs.update(num_classes=num_classes)
    if method == "fvcore":
        return count_flops(create_model(model_name, **kwargs), method=method, model_name=model_name)
    spec = arch_from_name(model_name, **kwargs)
    size = _frame_size(img_size)
    check_divisible(num_frames, *size, spec.tubelet, spec.patch)  # as the model would refuse it
    parts = analytic_macs(spec, (num_frames // spec.tubelet, size[0] // spec.patch, size[1] // spec.patch))
    return _report(spec, method, model_name, num_frames, size, parts, analytic_params(spec))


def format_table(reports: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of ``model_flops`` reports, with the unit convention underneath."""
    header = ("model", "kind", "masking", "ratio", "params(M)", "tokens vis/all", "fwd GMACs", "fwd GFLOPs",
              "teacher GFLOPs", "train GFLOPs/clip")  # fmt: skip
    rows = [header]
    for r in reports:
        pretrain = r["kind"] == "pretrain"
        masking = "-"
        if pretrain:
            masking = r["masking"] + ("+pred" if r["use_predictor"] and r["masking"] == "random" else "")
        rows.append((
            r["model"], r["kind"], masking, f"{r['mask_ratio']:g}" if pretrain else "-",
            f"{r['params'] / 1e6:.1f}", f"{r['visible_tokens']}/{r['tokens']}", f"{r['forward_gmacs']:.1f}",
            f"{r['forward_gflops']:.1f}",
            f"{r['teacher_gflops']:.1f}", f"{r['train_gflops']:.1f}",
        ))  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"per clip; {CONVENTION}; training = 3 x forward + teacher pass")
    return "\n".join(lines)
