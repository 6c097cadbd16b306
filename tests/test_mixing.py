"""ClassMix and MOCM (METHODS.md 1.3, 2.3): which way round, alignment, half the classes, r^power sampling."""

from __future__ import annotations

import pytest
import torch

from corte_ray.methods.mixing import classmix_batch, classmix_mask, mix, mocm_mask, partner_index


@pytest.mark.parametrize("batch, expected", [(1, [0]), (2, [1, 0]), (4, [2, 3, 0, 1]), (5, [2, 3, 4, 0, 1])])
def test_partner_index(batch, expected):
    assert partner_index(batch).tolist() == expected


def test_classmix_batch_direction_by_hand():
    images = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])  # (2, 1, 1, 2)
    labels = torch.tensor([[[10, 11]], [[20, 21]]])
    weights = torch.tensor([[[0.125, 0.25]], [[0.5, 0.75]]])
    masks = torch.tensor([[[True, False]], [[True, False]]])
    out_images, out_labels, out_weights = classmix_batch(images, labels, weights, masks)
    # Sample 0's masked pixel lands on sample 1 = partner(0), and sample 1's on sample 0.
    assert out_images.tolist() == [[[[3.0, 2.0]]], [[[1.0, 4.0]]]]
    assert out_labels.tolist() == [[[20, 11]], [[10, 21]]]
    assert out_weights.tolist() == [[[0.5, 0.25]], [[0.125, 0.75]]]
    masks = torch.tensor([[[True, True]], [[False, False]]])
    out_images, out_labels, _ = classmix_batch(images, labels, weights, masks)
    assert out_images.tolist() == [[[[1.0, 2.0]]], [[[1.0, 2.0]]]] and out_labels.tolist() == [[[10, 11]], [[10, 11]]]
    # B = 4: sample 1 is pasted onto sample 3, and sample 3 onto sample 1.
    images4 = torch.arange(4.0).view(4, 1, 1, 1)
    masks4 = torch.tensor([False, True, False, False]).view(4, 1, 1)
    out_images, _, _ = classmix_batch(images4, images4[:, 0].long(), images4[:, 0], masks4)
    assert out_images.flatten().tolist() == [0.0, 1.0, 2.0, 1.0]
    # B = 5, where partner is not its own inverse: sample 0 goes onto sample 2 (not 3).
    images5 = torch.arange(5.0).view(5, 1, 1, 1)
    masks5 = torch.tensor([True, False, False, False, False]).view(5, 1, 1)
    out_images, _, _ = classmix_batch(images5, images5[:, 0].long(), images5[:, 0], masks5)
    assert out_images.flatten().tolist() == [0.0, 1.0, 0.0, 3.0, 4.0]


def test_classmix_batch_keeps_image_label_weight_aligned():
    g = torch.Generator().manual_seed(0)
    batch, height, width = 4, 6, 7
    labels = torch.randint(0, 5, (batch, height, width), generator=g)
    labels[:, 0, :2] = 255
    # Every value names the sample it came from: image = 1000 * b + pixel, weight = b + 0.5.
    pixel = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width)
    images = (1000.0 * torch.arange(batch).view(batch, 1, 1, 1) + pixel).expand(batch, 3, height, width).clone()
    weights = (torch.arange(batch, dtype=torch.float32) + 0.5).view(batch, 1, 1).expand(batch, height, width).clone()
    masks = classmix_mask(labels, generator=g)
    inputs = [t.clone() for t in (images, labels, weights, masks)]
    out_images, out_labels, out_weights = classmix_batch(images, labels, weights, masks)

    source = (out_images[:, 0] // 1000).long()  # which sample each output pixel came from
    assert torch.equal(out_images[:, 0] % 1000, pixel[0, 0].expand(batch, height, width))  # nothing moved spatially
    assert torch.equal(out_images[:, 0], out_images[:, 2])  # channels mixed with the same mask
    assert torch.equal(out_weights, source.float() + 0.5)
    assert torch.equal(out_labels, labels.gather(0, source))
    own = torch.arange(batch).view(batch, 1, 1).expand_as(source)
    partner_of_source = partner_index(batch)[source]
    # A pixel comes from elsewhere exactly where the source's mask says so, and then from the sample pasted onto us.
    assert torch.equal(partner_of_source[source != own], own[source != own])
    for j in range(batch):
        i = int(torch.argsort(partner_index(batch))[j])
        assert torch.equal(source[j] == i, masks[i])
    assert all(torch.equal(a, b) for a, b in zip(inputs, (images, labels, weights, masks)))


def test_classmix_mask_takes_half_the_classes_whole():
    labels = torch.tensor(
        [
            [[0, 1, 2], [3, 4, 255], [0, 1, 2]],  # 5 classes -> 3
            [[0, 0, 1], [1, 2, 2], [3, 3, 255]],  # 4 classes -> 2
            [[255, 255, 255], [255, 255, 255], [255, 255, 255]],  # none -> empty mask
        ]
    )
    for seed in range(10):
        masks = classmix_mask(labels, generator=torch.Generator().manual_seed(seed))
        assert masks.dtype == torch.bool and masks.shape == labels.shape
        for b, expected in enumerate([3, 2, 0]):
            chosen = labels[b][masks[b]].unique()
            assert chosen.numel() == expected and 255 not in chosen.tolist()
            for c in chosen.tolist():
                assert masks[b][labels[b] == c].all()  # whole classes, not part of one
    a = classmix_mask(labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, classmix_mask(labels, generator=torch.Generator().manual_seed(5)))


def mocm_batch(batch: int, class0_r: float, class1_r: float):
    """Images 2x3: class 0 on 3 pixels, class 1 on 1 pixel, 2 ignored pixels of reliability 1."""
    labels = torch.tensor([[0, 0, 255], [0, 1, 255]]).expand(batch, 2, 3).clone()
    reliability = torch.tensor([[class0_r] * 3, [class0_r, class1_r, 1.0]]).expand(batch, 2, 3).clone()
    return labels, reliability


@pytest.mark.parametrize("power, expected", [(2.0, 0.8), (1.0, 2 / 3)])
def test_mocm_frequencies_follow_mean_reliability_to_the_power(power, expected):
    # Mean reliability 0.6 vs 0.3; one of two classes picked: P(class 0) = 0.6^k / (0.6^k + 0.3^k).
    # (Summed instead of averaged, class 0 would win 1.8^2 : 0.3^2, i.e. 97 % of the time.)
    labels, reliability = mocm_batch(1000, 0.6, 0.3)
    masks = mocm_mask(labels, reliability, power=power, generator=torch.Generator().manual_seed(0))
    picked_class0 = masks[:, 0, 0]
    assert torch.equal(picked_class0, ~masks[:, 1, 1])  # exactly one of the two, whole
    assert not masks[:, :, 2].any()  # ignored pixels are never pasted
    assert abs(picked_class0.float().mean().item() - expected) < 0.05  # ~4 standard deviations


def test_mocm_rarely_picks_an_unreliable_class():
    labels = torch.tensor([[0, 1], [2, 3]]).expand(300, 2, 2).clone()
    reliability = torch.tensor([[0.9, 0.6], [0.3, 0.0]]).expand(300, 2, 2).clone()
    masks = mocm_mask(labels, reliability, generator=torch.Generator().manual_seed(1))
    assert (masks.flatten(1).sum(1) == 2).all()  # half of 4 classes
    assert masks[:, 1, 1].float().mean() < 0.01
    # All-zero reliability must still sample (epsilon weights) instead of failing.
    masks = mocm_mask(labels[:2], torch.zeros(2, 2, 2), generator=torch.Generator().manual_seed(1))
    assert (masks.flatten(1).sum(1) == 2).all()


def test_mocm_on_class_normalised_reliability_keeps_hard_classes_in_the_mix():
    """STvM feeds MOCM the class-normalised reliability (docs/methods.md): a class the teacher is less sure of
    everywhere (class 1) is no longer starved, and within a class the images where it is relatively reliable
    are the ones it is pasted from."""
    from corte_ray.models.metric import class_normalised_reliability

    n = 2000
    labels, reliability = mocm_batch(n, 0.6, 0.3)
    reliability[n // 2:, 1, 1] = 0.15                  # class 1 half as reliable in the second half
    g = torch.Generator().manual_seed(0)
    raw = mocm_mask(labels, reliability, power=2.0, generator=g)
    norm = mocm_mask(labels, class_normalised_reliability(reliability, labels, 2), power=2.0, generator=g)
    class1_raw, class1_norm = raw[:, 1, 1].float(), norm[:, 1, 1].float()
    assert class1_raw.mean() < 0.2                      # 0.3^2 / (0.6^2 + 0.3^2) = 0.2 and 0.06
    # Normalised: class 0 -> 1, class 1 -> 4/3 and 2/3: P = (16/9) / (1 + 16/9) = 0.64, (4/9) / (1 + 4/9) = 0.31.
    assert abs(class1_norm[: n // 2].mean().item() - 0.64) < 0.05
    assert abs(class1_norm[n // 2:].mean().item() - 0.31) < 0.05


def test_mix_broadcasts_over_channels():
    masks = torch.tensor([[[True, False]]])
    pasted, base = torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    assert mix(masks, pasted, base).tolist() == [[[[1.0, 0.0]]] * 3]
    assert mix(masks, torch.tensor([[[5, 6]]]), torch.tensor([[[7, 8]]])).tolist() == [[[5, 8]]]
    with pytest.raises(ValueError):
        mix(masks, pasted, torch.zeros(1, 3, 2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_and_mixing():
    labels, reliability = mocm_batch(4, 0.6, 0.3)
    masks = mocm_mask(labels.cuda(), reliability.cuda(), generator=torch.Generator().manual_seed(0))
    ref = mocm_mask(labels, reliability, generator=torch.Generator().manual_seed(0))
    assert masks.is_cuda and torch.equal(masks.cpu(), ref)
    masks = classmix_mask(labels.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    images = torch.rand(4, 3, 2, 3, device="cuda")
    out = classmix_batch(images, labels.cuda(), reliability.cuda(), masks)
    assert all(t.is_cuda for t in out)
