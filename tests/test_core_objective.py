import itertools

import pytest
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from hpm_video import objective


def _slow_targets(videos, tubelet, patch, mean, std, normalize):
    """Reference: loop over every tube and channel, as the definition reads."""
    b, c, t, h, w = videos.shape
    x = videos.double() * torch.tensor(std, dtype=torch.double).view(1, -1, 1, 1, 1) + torch.tensor(
        mean, dtype=torch.double
    ).view(1, -1, 1, 1, 1)
    out = []
    for bi in range(b):
        tokens = []
        for ti, hi, wi in itertools.product(range(t // tubelet), range(h // patch), range(w // patch)):
            ts, hs, ws = slice(ti * tubelet, (ti + 1) * tubelet), slice(hi * patch, (hi + 1) * patch), slice(
                wi * patch, (wi + 1) * patch
            )
            tube = x[bi, :, ts, hs, ws]
            tube = tube.permute(1, 2, 3, 0).reshape(-1, c)  # (t h w, c)
            if normalize:
                mu = tube.mean(0)
                sd = torch.sqrt(((tube - mu) ** 2).sum(0) / (tube.shape[0] - 1))
                tube = (tube - mu) / (sd + 1e-6)
            tokens.append(tube.reshape(-1))
        out.append(torch.stack(tokens))
    return torch.stack(out).float()


@pytest.mark.parametrize("tubelet,frames", [(2, 4), (1, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_targets_match_direct_computation(tubelet, frames, normalize):
    videos = torch.randn(2, 3, frames, 8, 12)
    fast = objective.patchify_targets(videos, tubelet, 4, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize)
    slow = _slow_targets(videos, tubelet, 4, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize)
    assert fast.shape == (2, (frames // tubelet) * 2 * 3, tubelet * 16 * 3)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_unpatchify_inverts_raw_patchify():
    videos = torch.randn(2, 3, 4, 8, 8)
    tokens = objective.patchify_targets(videos, 2, 4, (0, 0, 0), (1, 1, 1), normalize=False)
    torch.testing.assert_close(objective.unpatchify(tokens, (2, 2, 2), 2, 4), videos)


def _brute_force_relative(pred, target):
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            for j in range(pred.shape[1]):
                gap = float(target[b, j] - target[b, i])
                if gap == 0:
                    continue
                sign = 1.0 if gap > 0 else -1.0
                total += F.softplus(torch.tensor(-sign * float(pred[b, j] - pred[b, i]))).item()
                count += 1
    return total / count


def test_relative_loss_matches_brute_force_with_ties():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 7, generator=gen)
    target = torch.randint(0, 3, (3, 7), generator=gen).float()  # many ties
    target[2] = 1.0  # a sample made only of ties contributes no pairs
    expected = _brute_force_relative(pred, target)
    assert objective.relative_loss(pred, target).item() == pytest.approx(expected, rel=1e-5)


def _dense_relative(pred, target):
    """The loss written with whole B x M x M tensors; autograd differentiates it."""
    order = torch.sign(target.unsqueeze(1) - target.unsqueeze(2))
    valid = order != 0
    return (F.softplus(-order * (pred.unsqueeze(1) - pred.unsqueeze(2))) * valid).sum() / valid.sum().clamp(min=1)


@pytest.mark.parametrize("block", [2**24, 40, 1])  # one block, several, one row per block
def test_blocked_relative_loss_and_its_analytic_gradient_equal_the_dense_form(block):
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 37, dtype=torch.double, generator=gen, requires_grad=True)
    target = torch.randn(3, 37, dtype=torch.double, generator=gen)
    target[:, 5] = target[:, 6]  # ties are skipped
    pred_d = pred.detach().clone().requires_grad_(True)
    loss = objective._PairwiseLogistic.apply(pred, target, block)
    dense = _dense_relative(pred_d, target)
    torch.testing.assert_close(loss, dense, rtol=1e-12, atol=1e-12)
    (loss * 3).backward()
    (dense * 3).backward()
    torch.testing.assert_close(pred.grad, pred_d.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda p: objective._PairwiseLogistic.apply(p, target, block), (pred_d,))


def test_relative_loss_memory_is_linear_in_tokens():
    from hpm_video.profiling import StepProbe

    batch, tokens, block = 4, 1024, 2**16
    pred = torch.randn(batch, tokens, requires_grad=True)
    target = torch.randn(batch, tokens)
    probe = StepProbe()
    with probe:
        objective.relative_loss(pred, target, max_pair_block=block).backward()
    dense_bytes = batch * tokens * tokens * 4  # one fp32 pair matrix: 16 MiB here
    assert probe.peak_bytes < dense_bytes / 8, probe.peak_bytes


def test_relative_loss_is_batch_normalised_not_sample_normalised():
    # Sample 0 has 2 valid ordered pairs, sample 1 has 6 (3 distinct values): the batch mean weights pairs.
    pred = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
    expected = _brute_force_relative(pred, target)
    assert objective.relative_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_relative_loss_prefers_correct_order():
    target = torch.arange(10.0).unsqueeze(0)
    good = objective.relative_loss(target.clone(), target)
    bad = objective.relative_loss(-target, target)
    assert good < bad


def test_absolute_loss_zero_for_standardised_prediction():
    target = torch.randn(4, 20)
    z = (target - target.mean(1, keepdim=True)) / (target.std(1, keepdim=True) + 1e-6)
    assert objective.absolute_loss(z, target).item() == pytest.approx(0.0, abs=1e-8)
    assert objective.prediction_loss(torch.zeros(4, 20), target, "absolute") > 0.5


def test_rank_correlation():
    target = torch.randn(3, 50)
    assert objective.rank_correlation(target * 2 + 1, target).item() == pytest.approx(1.0)
    assert objective.rank_correlation(-target, target).item() == pytest.approx(-1.0)


def test_unknown_prediction_loss():
    with pytest.raises(ValueError, match="valid: relative, absolute"):
        objective.prediction_loss(torch.zeros(1, 2), torch.zeros(1, 2), "hinge")
