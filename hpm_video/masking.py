"""One masking core for clips and images.

Tokens live on a ``(T', S)`` grid: ``T'`` time slots (frames / tubelet) by ``S`` spatial positions
(``H/p * W/p``), flattened in ``(t, s)`` order exactly as the patch embedding flattens ``(t, h, w)``.
An image is the grid with ``T' = 1``, so it goes through the same code.

A mask is a bool tensor ``(B, T' * S)``, True = masked, with the same masked count in every sample.

Units:
  * ``tube``  -- one spatial position masked for every time slot (VideoMAE tube masking); hard
    selection averages the predicted scores over time and picks whole spatial tubes;
  * ``token`` -- every spacetime token chosen independently.

Everything is vectorised on the device that holds the scores: no per-sample loop, no host sync.
"""

from __future__ import annotations

import torch

MASK_UNITS = ("tube", "token")
MASKING_MODES = ("random", "hpm")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")


def num_masked_per_unit_row(num_units: int, mask_ratio: float) -> int:
    """Masked count over ``num_units`` candidates (rounded down, as VideoMAE does)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(mask_ratio * num_units)


def num_masked_tokens(grid: tuple[int, int], mask_ratio: float, unit: str = "tube") -> int:
    """Masked tokens per sample for a ``(T', S)`` grid, e.g. 176 * 8 = 1408 for 8 x 196 at 0.9."""
    check_choice("mask unit", unit, MASK_UNITS)
    time_slots, spatial = grid
    if unit == "tube":
        return num_masked_per_unit_row(spatial, mask_ratio) * time_slots
    return num_masked_per_unit_row(time_slots * spatial, mask_ratio)


def easy_to_hard_alpha(epoch: float, total_epochs: int, alpha_max: float = 0.5) -> float:
    """Share of the masked budget given to the hardest predicted tokens: rises linearly to alpha_max."""
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be positive, got {total_epochs}")
    return alpha_max * min(1.0, (epoch + 1) / total_epochs)


def _mask_from_priority(priority: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Bool mask ``(B, U)`` marking the ``num_masked`` highest-priority units of each row."""
    mask = torch.zeros_like(priority, dtype=torch.bool)
    if num_masked == 0:
        return mask
    top = torch.topk(priority, num_masked, dim=1, sorted=False).indices
    return mask.scatter_(1, top, True)


def num_mask_units(grid: tuple[int, int], unit: str = "tube") -> int:
    """Candidates per sample: ``S`` spatial tubes, or all ``T' * S`` tokens."""
    check_choice("mask unit", unit, MASK_UNITS)
    return grid[1] if unit == "tube" else grid[0] * grid[1]


def _noise_or_draw(
    noise: torch.Tensor | None, batch: int, num_units: int, generator, device, shard: tuple[int, int]
) -> torch.Tensor:
    """The given ``noise`` (shape checked), or a fresh draw of ``uniform_noise``."""
    if noise is None:
        return uniform_noise(batch, num_units, generator, device, shard)
    if tuple(noise.shape) != (batch, num_units):
        raise ValueError(f"mask noise must have shape ({batch}, {num_units}), got {tuple(noise.shape)}")
    return noise


def _expand_units(unit_mask: torch.Tensor, grid: tuple[int, int], unit: str) -> torch.Tensor:
    """Spatial-tube mask ``(B, S)`` -> token mask ``(B, T' * S)``; token masks pass through."""
    if unit == "tube":
        return unit_mask.unsqueeze(1).expand(-1, grid[0], -1).reshape(unit_mask.shape[0], -1)
    return unit_mask


def uniform_noise(
    batch_size: int,
    num_units: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Uniform noise ``(B, U)``; with ``shard=(rank, world)`` the rows of this rank in a global batch.

    Every rank draws the noise of the whole global batch from the same generator stream and keeps
    rows ``rank::world``, the positions a ``DistributedSampler`` deals to that rank, so N processes
    mask exactly like one process with the N-times batch.
    """
    rank, world = shard
    if world == 1:
        return torch.rand(batch_size, num_units, generator=generator, device=device)
    noise = torch.rand(batch_size * world, num_units, generator=generator, device=device)
    return noise[rank::world]


def random_mask(
    batch_size: int,
    grid: tuple[int, int],
    mask_ratio: float,
    unit: str = "tube",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniformly random mask ``(B, T' * S)`` (VideoMAE tube masking when ``unit='tube'``).

    ``noise`` ``(B, U)``: uniform noise drawn beforehand (``uniform_noise``), used instead of
    drawing it here; that keeps a ``torch.Generator`` out of a compiled forward.
    """
    num_units = num_mask_units(grid, unit)
    noise = _noise_or_draw(noise, batch_size, num_units, generator, device, shard)
    unit_mask = _mask_from_priority(noise, num_masked_per_unit_row(num_units, mask_ratio))
    return _expand_units(unit_mask, grid, unit)


def alpha_tensor(alpha: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``alpha`` as the 0-d float64 tensor a training step passes to the model.

    A compiled step must take alpha as a tensor: as a Python float, dynamo specialises it where it
    meets a tensor comparison (torch 2.11 does so for every value), recompiling the step at each
    epoch and giving up after ``torch._dynamo.config.recompile_limit`` values. ``torch.full`` writes
    the value with a fill kernel, not a host-to-device copy, so this adds no host sync; float64
    makes ``n * alpha`` round exactly as Python's ``int(n * alpha)`` does.
    """
    check_alpha(alpha)
    return torch.full((), alpha, dtype=torch.float64, device=device)


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def hard_mask(
    scores: torch.Tensor,
    mask_ratio: float,
    alpha: float | torch.Tensor,
    unit: str = "tube",
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Easy-to-hard mask from predicted per-token losses ``scores`` ``(B, T', S)``.

    Of the ``n`` masked units, the ``int(n * alpha)`` with the highest predicted loss are always
    masked; the rest are drawn uniformly from the remaining units. Vectorised as: uniform noise in
    [0, 1), the hard units lifted to +inf, then the top ``n`` of that priority. ``noise`` as in
    ``random_mask``. (Ties in ``scores`` at the hard cut are broken by ``topk``.)

    ``alpha`` is a float, or a 0-d tensor from ``alpha_tensor`` (what the training loop passes; a
    tensor is never range-checked here, which would read it back).
    """
    check_choice("mask unit", unit, MASK_UNITS)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (B, T', S), got shape {tuple(scores.shape)}")
    # A tensor alpha, or any alpha under compilation, takes the form in which alpha is only a
    # tensor operand: a Python test or an int(n * alpha) shape would pin a graph to its value.
    alpha_as_operand = isinstance(alpha, torch.Tensor) or torch.compiler.is_compiling()
    if not alpha_as_operand:
        check_alpha(alpha)
    batch, time_slots, spatial = scores.shape
    grid = (time_slots, spatial)
    # (B, S) for tubes: a tube is as hard as its time-averaged tokens; (B, T'*S) for tokens.
    unit_scores = scores.mean(dim=1) if unit == "tube" else scores.flatten(1)
    num_units = unit_scores.shape[1]
    n_mask = num_masked_per_unit_row(num_units, mask_ratio)
    noise = _noise_or_draw(noise, batch, num_units, generator, scores.device, shard)
    if alpha_as_operand:
        # The n best-scored units in order, of which the first int(n * alpha) are lifted
        # (rank + 1 <= n * alpha): one graph for every alpha. Eager float alpha takes the cheaper
        # top-n_hard below; tests check both give the same masks.
        ranked = torch.topk(unit_scores, n_mask, dim=1, sorted=True).indices  # (B, n)
        is_hard = torch.arange(1, n_mask + 1, device=scores.device) <= n_mask * alpha  # (n,)
        noise = noise.scatter(1, ranked, torch.where(is_hard, float("inf"), noise.gather(1, ranked)))
    elif (n_hard := int(n_mask * alpha)) > 0:
        hardest = torch.topk(unit_scores, n_hard, dim=1, sorted=False).indices  # (B, n_hard)
        noise = noise.scatter(1, hardest, float("inf"))
    unit_mask = _mask_from_priority(noise, n_mask)
    return _expand_units(unit_mask, grid, unit)


def visible_and_masked_ids(mask: torch.Tensor, num_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of visible and masked tokens, each in original token order.

    A stable sort of the mask puts visible (False) before masked (True) tokens without reordering
    either group, which is the order ``x[~mask]`` / ``x[mask]`` would give, but with fixed shapes
    and without a host sync. ``num_masked`` must be the (common) masked count per sample.
    """
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    num_visible = mask.shape[1] - num_masked
    return order[:, :num_visible], order[:, num_visible:]


def check_mask(mask: torch.Tensor, batch: int, num_tokens: int) -> int:
    """Validate a user-supplied mask and return its per-sample masked count (one host sync)."""
    if mask.dtype != torch.bool or mask.shape != (batch, num_tokens):
        raise ValueError(
            f"mask must be bool of shape ({batch}, {num_tokens}), got {mask.dtype} {tuple(mask.shape)}"
        )
    counts = mask.sum(dim=1)
    if batch and not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample must mask the same number of tokens, got counts {counts.tolist()}")
    num_masked = int(counts[0]) if batch else 0
    if batch and not 0 < num_masked < num_tokens:
        raise ValueError(f"mask must hide at least one token and keep one visible, got {num_masked} of {num_tokens}")
    return num_masked


class MaskGenerator:
    """Makes masks for one token grid and configuration; see ``random_mask`` and ``hard_mask``."""

    def __init__(self, grid: tuple[int, int], mask_ratio: float, unit: str = "tube") -> None:
        check_choice("mask unit", unit, MASK_UNITS)
        self.grid = grid
        self.mask_ratio = mask_ratio
        self.unit = unit
        self.num_masked = num_masked_tokens(grid, mask_ratio, unit)
        self.num_units = num_mask_units(grid, unit)
        if self.num_masked == 0:
            # Nothing to reconstruct: the decoder's "last M tokens" would be all of them.
            raise ValueError(
                f"mask_ratio {mask_ratio} masks no {unit} of the {grid[0]} x {grid[1]} token grid "
                f"({self.num_units} {unit}s, rounded down); raise it"
            )

    def noise(
        self, batch_size: int, generator: torch.Generator | None = None, device=None, shard: tuple[int, int] = (0, 1)
    ) -> torch.Tensor:
        """The uniform noise ``(B, U)`` a mask of this grid draws (see ``uniform_noise``)."""
        return uniform_noise(batch_size, self.num_units, generator, device, shard)

    def random(
        self,
        batch_size: int,
        device=None,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return random_mask(batch_size, self.grid, self.mask_ratio, self.unit, generator, device, shard, noise)

    def hard(
        self,
        scores: torch.Tensor,
        alpha: float | torch.Tensor,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if tuple(scores.shape[1:]) != self.grid:
            raise ValueError(f"scores of shape {tuple(scores.shape)} do not match the token grid {self.grid}")
        return hard_mask(scores, self.mask_ratio, alpha, self.unit, generator, shard, noise)
