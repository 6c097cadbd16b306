"""Tests of STvM's metric network pieces against direct, loop-by-loop evaluations of METHODS.md 2.2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from corte_ray.models import ClassProxies, MetricHead, class_balanced_pixel_sample, pixel_reliability, proxy_anchor_loss


def _proxy_anchor_by_loops(embeddings, labels, proxies, alpha, delta) -> float:
    """The formula of Kim et al. (CVPR 2020) written out term by term, in float64 Python."""
    embeddings = F.normalize(embeddings.double(), dim=1).tolist()
    proxies = F.normalize(proxies.double(), dim=1).tolist()
    labels = labels.tolist()

    def cosine(x, p):
        return sum(a * b for a, b in zip(x, p))

    positive_sum, num_with_positives, negative_sum = 0.0, 0, 0.0
    for c, proxy in enumerate(proxies):
        positives = [x for x, y in zip(embeddings, labels) if y == c]
        negatives = [x for x, y in zip(embeddings, labels) if y != c]
        if positives:
            num_with_positives += 1
            positive_sum += math.log(1 + sum(math.exp(-alpha * (cosine(x, proxy) - delta)) for x in positives))
        negative_sum += math.log(1 + sum(math.exp(alpha * (cosine(x, proxy) + delta)) for x in negatives))
    return positive_sum / num_with_positives + negative_sum / len(proxies)


@pytest.mark.parametrize("alpha,delta", [(32.0, 0.1), (4.0, 0.3)])
def test_proxy_anchor_equals_the_formula(alpha: float, delta: float) -> None:
    generator = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(12, 6, generator=generator), dim=1)
    proxies = F.normalize(torch.randn(5, 6, generator=generator), dim=1)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 0, 1, 4, 4, 1, 0])  # class 3 has no positive
    loss = proxy_anchor_loss(embeddings, labels, proxies, alpha=alpha, delta=delta)
    expected = _proxy_anchor_by_loops(embeddings, labels, proxies, alpha, delta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_proxy_anchor_ignores_255_and_normalises_its_inputs() -> None:
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(10, 4, generator=generator) * 3  # not unit norm: normalised inside
    proxies = torch.randn(3, 4, generator=generator) * 0.5
    labels = torch.tensor([0, 1, 2, 255, 0, 1, 255, 2, 2, 0])
    kept = labels != 255
    loss = proxy_anchor_loss(embeddings, labels, proxies)
    expected = _proxy_anchor_by_loops(embeddings[kept], labels[kept], proxies, 32.0, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_proxy_anchor_gradients_reach_embeddings_and_proxies_and_stay_finite() -> None:
    generator = torch.Generator().manual_seed(2)
    embeddings = torch.randn(16, 8, generator=generator, requires_grad=True)
    proxy_module = ClassProxies(num_classes=4, embed_dim=8)
    labels = torch.tensor([0, 1, 2] * 5 + [0])  # class 3: no positives, still a negative anchor
    loss = proxy_anchor_loss(embeddings, labels, proxy_module(), alpha=500.0)  # exp(500 * ...) overflows naively
    assert torch.isfinite(loss)
    loss.backward()
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0
    proxy_grad = proxy_module.weight.grad
    assert proxy_grad is not None and torch.isfinite(proxy_grad).all()
    assert (proxy_grad.abs().sum(dim=1) > 0).all(), "every proxy, positives or not, must get a gradient"


def test_proxy_anchor_of_an_all_ignored_batch_is_zero() -> None:
    embeddings = torch.randn(4, 3, requires_grad=True)
    loss = proxy_anchor_loss(embeddings, torch.full((4,), 255), torch.randn(2, 3))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph


def test_class_balanced_sample_balances_limits_and_skips_ignored() -> None:
    labels = torch.full((2, 10, 10), 255, dtype=torch.long)
    flat = labels.view(-1)
    flat[:100] = 0  # 100 pixels of class 0
    flat[100:103] = 1  # 3 of class 1
    flat[120:140] = 2  # 20 of class 2; class 3 absent; the other 77 pixels are ignored
    generator = torch.Generator().manual_seed(0)
    indices = class_balanced_pixel_sample(labels, max_pixels=30, num_classes=4, generator=generator)
    assert indices.numel() == 30 and indices.unique().numel() == 30
    sampled = flat[indices]
    assert (sampled != 255).all()
    counts = torch.bincount(sampled, minlength=4).tolist()
    # Water filling: class 1 gives its 3, the remaining 27 split 13 / 14 between classes 2 and 0.
    assert counts[1] == 3 and counts[3] == 0 and sorted([counts[0], counts[2]]) == [13, 14]

    everything = class_balanced_pixel_sample(labels, max_pixels=1000, num_classes=4)
    assert sorted(everything.tolist()) == (flat != 255).nonzero().squeeze(1).tolist()


def test_class_balanced_sample_is_random_within_a_class_and_reproducible() -> None:
    labels = torch.zeros(1, 20, 20, dtype=torch.long)
    labels[0, :, 10:] = 1
    first = class_balanced_pixel_sample(labels, 10, 2, generator=torch.Generator().manual_seed(5))
    again = class_balanced_pixel_sample(labels, 10, 2, generator=torch.Generator().manual_seed(5))
    other = class_balanced_pixel_sample(labels, 10, 2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.bincount(labels.view(-1)[first], minlength=2).tolist() == [5, 5]
    # Random, not the first pixels of each class in raster order.
    assert not torch.equal(first.sort().values[:5], labels.view(-1).eq(0).nonzero().squeeze(1)[:5])


def test_class_balanced_sample_of_nothing_is_empty() -> None:
    assert class_balanced_pixel_sample(torch.full((1, 4, 4), 255), 10, 3).numel() == 0
    assert class_balanced_pixel_sample(torch.zeros(1, 4, 4, dtype=torch.long), 0, 3).numel() == 0


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_pixel_reliability_by_hand_on_a_1x1_map(gamma: float) -> None:
    # Proxies at 0, 90 and 180 degrees in 2-D; image 0 embeds along the first, image 1 at 45 degrees.
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    embeddings = torch.tensor([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]]).view(2, 2, 1, 1)
    labels = torch.tensor([[[0, 1], [2, 255]], [[1, 1], [0, 2]]])
    reliability = pixel_reliability(embeddings, proxies, labels, scale=16.0, gamma=gamma)

    probabilities_0 = _softmax([16 * 1.0, 16 * 0.0, 16 * -1.0])
    h = math.sqrt(0.5)
    probabilities_1 = _softmax([16 * h, 16 * h, 16 * -h])
    expected = torch.tensor(
        [
            [[probabilities_0[0], probabilities_0[1]], [probabilities_0[2], 0.0]],
            [[probabilities_1[1], probabilities_1[1]], [probabilities_1[0], probabilities_1[2]]],
        ]
    )
    expected = torch.where(labels == 255, torch.zeros(()), expected**gamma)
    assert reliability.shape == (2, 2, 2)
    assert torch.allclose(reliability, expected, atol=1e-6)
    assert reliability[0, 1, 1] == 0.0


def test_pixel_reliability_upsamples_probabilities_bilinearly() -> None:
    # A 1x2 map upsampled to 1x4 (align_corners=False): weights 1 | 3/4, 1/4 | 1/4, 3/4 | 1 on the two cells.
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # cell 0 -> class 0, cell 1 -> class 1
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    reliability = pixel_reliability(embeddings, proxies, labels, scale=2.0)
    p_left, p_right = _softmax([2.0, 0.0])[0], _softmax([0.0, 2.0])[0]  # P(class 0) in each cell
    expected = [p_left, 0.75 * p_left + 0.25 * p_right, 0.25 * p_left + 0.75 * p_right, p_right]
    assert torch.allclose(reliability.flatten(), torch.tensor(expected), atol=1e-6)


def test_metric_head_output_is_unit_norm_and_proxies_too() -> None:
    head = MetricHead(in_dim=16)
    embeddings = head(torch.randn(2, 16, 5, 7))
    assert embeddings.shape == (2, 128, 5, 7)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2, 5, 7), atol=1e-5)
    proxies = ClassProxies(num_classes=19)()
    assert proxies.shape == (19, 128)
    assert torch.allclose(proxies.norm(dim=1), torch.ones(19), atol=1e-5)
    assert MetricHead(in_dim=8, hidden_dim=32, embed_dim=4)(torch.randn(2, 8, 3, 3)).shape == (2, 4, 3, 3)


def test_class_normalised_reliability_keeps_class_weight_and_ranks_within_a_class():
    from corte_ray.models.metric import class_normalised_reliability

    rel = torch.tensor([[[0.1, 0.3, 0.8, 0.9], [0.2, 0.6, 0.5, 0.4]]])
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 255, 2]]])
    out = class_normalised_reliability(rel, labels, num_classes=3)
    for c in range(3):
        m = labels == c
        assert out[m].sum().item() == pytest.approx(m.sum().item())        # each class weighs its pixel count
    assert out[labels == 255].item() == 0.0
    zero = labels == 0
    assert torch.equal(out[zero].argsort(), rel[zero].argsort())            # the order within a class is kept
