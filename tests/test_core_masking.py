import pytest
import torch

from hpm_video import masking


@pytest.mark.parametrize("grid", [(8, 196), (4, 16), (1, 49)])
@pytest.mark.parametrize("unit", ["tube", "token"])
def test_random_mask_counts_and_structure(grid, unit):
    mask = masking.random_mask(6, grid, 0.9, unit, generator=torch.Generator().manual_seed(0))
    t, s = grid
    assert mask.shape == (6, t * s) and mask.dtype == torch.bool
    expected = masking.num_masked_tokens(grid, 0.9, unit)
    assert (mask.sum(1) == expected).all()
    if unit == "tube":
        per_slot = mask.view(6, t, s)
        assert (per_slot == per_slot[:, :1]).all(), "a tube mask is the same in every time slot"
        assert (per_slot[:, 0].sum(1) == int(0.9 * s)).all()


def test_videomae_tube_count():
    assert masking.num_masked_tokens((8, 196), 0.9, "tube") == 176 * 8
    mask = masking.random_mask(2, (8, 196), 0.9, "tube")
    assert ((~mask).sum(1) == 160).all()


def test_random_masks_differ_across_samples_and_are_seeded():
    a = masking.random_mask(4, (2, 64), 0.75, "token", generator=torch.Generator().manual_seed(3))
    b = masking.random_mask(4, (2, 64), 0.75, "token", generator=torch.Generator().manual_seed(3))
    c = masking.random_mask(4, (2, 64), 0.75, "token", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("unit", ["tube", "token"])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_hard_mask_contains_top_k_and_follows_alpha(unit, alpha):
    gen = torch.Generator().manual_seed(1)
    batch, t, s = 5, 4, 49
    scores = torch.randn(batch, t, s, generator=gen)
    mask = masking.hard_mask(scores, 0.75, alpha, unit, generator=gen)
    expected = masking.num_masked_tokens((t, s), 0.75, unit)
    assert (mask.sum(1) == expected).all()
    if unit == "tube":
        unit_scores, unit_mask = scores.mean(1), mask.view(batch, t, s)[:, 0]
        assert (mask.view(batch, t, s) == unit_mask[:, None]).all()
    else:
        unit_scores, unit_mask = scores.flatten(1), mask
    n_mask = int(0.75 * unit_scores.shape[1])
    k = int(n_mask * alpha)
    top = unit_scores.topk(k, dim=1).indices
    assert unit_mask.gather(1, top).all(), "the k hardest units are always masked"


def test_hard_mask_rest_is_random():
    # With alpha = 0 the scores must not matter: the hardest unit is masked at about the base rate.
    scores = torch.zeros(2000, 1, 16)
    scores[:, 0, 0] = 10.0
    mask = masking.hard_mask(scores, 0.5, 0.0, "token", generator=torch.Generator().manual_seed(0))
    rate = mask[:, 0].float().mean().item()
    assert 0.4 < rate < 0.6
    # With alpha = 0.5 the hard half is fixed and the other half is spread over the rest.
    scores = torch.arange(16.0).repeat(2000, 1, 1)
    mask = masking.hard_mask(scores, 0.5, 0.5, "token", generator=torch.Generator().manual_seed(0))
    assert mask[:, 12:].all()
    rest = mask[:, :12].float().mean(0)
    assert (rest > 0.2).all() and (rest < 0.47).all()  # 4 of 12 on average = 0.33


def test_hard_mask_seeded():
    scores = torch.randn(3, 2, 16)
    a = masking.hard_mask(scores, 0.75, 0.3, "tube", generator=torch.Generator().manual_seed(9))
    b = masking.hard_mask(scores, 0.75, 0.3, "tube", generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_alpha_schedule():
    assert masking.easy_to_hard_alpha(0, 800) == pytest.approx(0.5 / 800)
    assert masking.easy_to_hard_alpha(399, 800) == pytest.approx(0.25)
    assert masking.easy_to_hard_alpha(799, 800) == pytest.approx(0.5)


def test_visible_and_masked_ids_keep_token_order():
    mask = masking.random_mask(3, (2, 8), 0.5, "token", generator=torch.Generator().manual_seed(0))
    vis, msk = masking.visible_and_masked_ids(mask, 8)
    for b in range(3):
        assert vis[b].tolist() == torch.nonzero(~mask[b]).flatten().tolist()
        assert msk[b].tolist() == torch.nonzero(mask[b]).flatten().tolist()


def test_bad_input_is_refused_with_names():
    with pytest.raises(ValueError, match="valid: tube, token"):
        masking.random_mask(1, (1, 4), 0.5, "cube")
    with pytest.raises(ValueError, match=r"\(B, T', S\)"):
        masking.hard_mask(torch.zeros(2, 16), 0.5, 0.1)
    uneven = torch.zeros(2, 4, dtype=torch.bool)
    uneven[0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        masking.check_mask(uneven, 2, 4)
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        masking.check_mask(uneven, 2, 5)
    gen = masking.MaskGenerator((2, 16), 0.5)
    with pytest.raises(ValueError, match="token grid"):
        gen.hard(torch.zeros(1, 4, 16), 0.1)


@pytest.mark.parametrize("mode", ["random", "hard"])
def test_sharded_masks_equal_the_global_batch(mode):
    scores = torch.randn(8, 2, 16)
    gen = masking.MaskGenerator((2, 16), 0.75, "tube")

    def make(rows, shard):
        g = torch.Generator().manual_seed(5)
        if mode == "random":
            return gen.random(rows.shape[0], generator=g, shard=shard)
        return gen.hard(rows, 0.25, generator=g, shard=shard)

    whole = make(scores, (0, 1))
    parts = [make(scores[r::2], (r, 2)) for r in range(2)]  # a DistributedSampler deals rows r::2
    assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2])


@pytest.mark.parametrize("unit", ["tube", "token"])
def test_noise_drawn_beforehand_gives_the_same_masks(unit):
    """The training loop draws the noise outside the forward; the masks must not change."""
    scores = torch.randn(4, 2, 16)
    gen = masking.MaskGenerator((2, 16), 0.75, unit)
    noise = gen.noise(4, torch.Generator().manual_seed(3), shard=(1, 2))
    assert noise.shape == (4, gen.num_units)
    inline_random = gen.random(4, generator=torch.Generator().manual_seed(3), shard=(1, 2))
    inline_hard = gen.hard(scores, 0.5, generator=torch.Generator().manual_seed(3), shard=(1, 2))
    assert torch.equal(gen.random(4, noise=noise), inline_random)
    assert torch.equal(gen.hard(scores, 0.5, noise=noise), inline_hard)
    with pytest.raises(ValueError, match=r"mask noise must have shape \(4, "):
        gen.random(4, noise=noise[:, :3])


@pytest.mark.parametrize("unit", ["tube", "token"])
def test_compiled_hard_mask_equals_eager_for_every_alpha(unit):
    """A compiled hard mask given alpha as a tensor (as the training loop does) is one graph for
    every alpha, with the masks of eager mode; a float alpha compiles to the same masks."""
    from torch._dynamo.testing import CompileCounterWithBackend

    scores = torch.randn(8, 4, 196, generator=torch.Generator().manual_seed(0))
    for as_tensor in (True, False):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")  # specialises floats as inductor does
        compiled = torch.compile(masking.hard_mask, backend=counter, fullgraph=True)
        compiled_at_first = None
        for alpha in (0.0, 0.01, 0.3, 0.5, 0.8, 1.0):
            noise = torch.rand(8, 196 if unit == "tube" else 4 * 196)
            given = masking.alpha_tensor(alpha) if as_tensor else alpha
            eager = masking.hard_mask(scores, 0.9, alpha, unit, noise=noise)
            assert torch.equal(compiled(scores, 0.9, given, unit, noise=noise), eager), (alpha, as_tensor)
            compiled_at_first = compiled_at_first or counter.frame_count
        if as_tensor:
            # Nothing compiled after the first call (which may trace twice: dynamo restarts once to
            # turn the float mask ratio into a constant). A float alpha is specialised per value by
            # some torch versions (2.11: every value).
            assert counter.frame_count == compiled_at_first <= 2, counter.frame_count


def test_tensor_alpha_picks_as_many_hard_units_as_python_rounding():
    """``rank + 1 <= n * alpha`` in float64 counts exactly ``int(n * alpha)`` hard units, also where
    ``n * alpha`` is a whole number in Python but not in float32 (0.7 * 10)."""
    for num_units in (10, 16, 49, 196):
        scores = torch.arange(float(num_units)).view(1, 1, num_units)  # distinct, so no ties
        for k in range(21):
            alpha = k / 20
            for ratio in (0.5, 0.9):
                eager = masking.hard_mask(scores, ratio, alpha, "tube", noise=torch.zeros(1, num_units))
                as_tensor = masking.hard_mask(scores, ratio, masking.alpha_tensor(alpha), "tube",
                                              noise=torch.zeros(1, num_units))  # fmt: skip
                assert torch.equal(eager, as_tensor), (num_units, alpha, ratio)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        masking.alpha_tensor(1.5)
