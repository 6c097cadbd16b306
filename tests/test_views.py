"""Weak and strong views (METHODS.md 1.3): labels stay under their pixels, randomness is real and seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corte_ray.methods.views import hsv_to_rgb, rgb_to_hsv, strong_view, weak_view

H, W = 12, 14


def position_batch(batch: int = 2):
    """Images whose channels encode the (row, col) of each pixel centre, and maps that are functions of it.

    Channel 0 = (row + 0.5) / H, channel 1 = (col + 0.5) / W: linear in position, so bilinear resizing
    keeps them exact readings of the source position. labels = row * W + col (< 255);
    colmap = col as float; topk = (row, col) as a (B, 2, H, W) long map.
    """
    rows = torch.arange(H).view(H, 1).expand(H, W)
    cols = torch.arange(W).view(1, W).expand(H, W)
    image = torch.stack([(rows + 0.5) / H, (cols + 0.5) / W, torch.full((H, W), 0.5)]).float()
    images = image.expand(batch, 3, H, W).clone()
    labels = (rows * W + cols).expand(batch, H, W).clone()
    colmap = cols.float().expand(batch, H, W).clone()
    topk = torch.stack([rows, cols]).expand(batch, 2, H, W).clone()
    return images, labels, colmap, topk


def decode(images):
    """Continuous source (row, col) read back from the image channels."""
    return images[:, 0] * H - 0.5, images[:, 1] * W - 0.5


@pytest.mark.parametrize("seed", range(12))
def test_weak_view_keeps_maps_aligned(seed):
    images, labels, colmap, topk = position_batch()
    inputs = [t.clone() for t in (images, labels, colmap, topk)]
    out, (out_labels, out_colmap, out_topk) = weak_view(
        images, [labels, colmap, topk], (10, 10), generator=torch.Generator().manual_seed(seed)
    )
    assert out.shape == (2, 3, 10, 10) and out_labels.shape == (2, 10, 10) and out_topk.shape == (2, 2, 10, 10)
    assert out_labels.dtype == torch.long and out_colmap.dtype == torch.float32 and out_topk.dtype == torch.long
    kept = out_labels != 255
    assert kept.any()
    row, col = decode(out)
    label_row, label_col = out_labels // W, out_labels % W
    # Nearest (centre-aligned) vs bilinear at the same place: at most half a pixel apart.
    assert (label_row - row)[kept].abs().max() <= 0.5 + 1e-4
    assert (label_col - col)[kept].abs().max() <= 0.5 + 1e-4
    # Every map moved with the labels (float maps copied, not interpolated).
    assert torch.equal(out_colmap[kept], label_col[kept].float())
    assert torch.equal(out_topk[:, 0][kept], label_row[kept]) and torch.equal(out_topk[:, 1][kept], label_col[kept])
    assert all(torch.equal(a, b) for a, b in zip(inputs, (images, labels, colmap, topk)))


def test_weak_view_flips_and_scales_across_seeds():
    images, labels, _, _ = position_batch(batch=1)
    flipped, scales = set(), []
    for seed in range(30):
        out, (out_labels,) = weak_view(images, [labels], (6, 6), generator=torch.Generator().manual_seed(seed))
        _, col = decode(out)
        flipped.add(bool(col[0, 0, 0] > col[0, 0, -1]))
        row, _ = decode(out)
        # One output pixel spans 1/scale source pixels; read it where no border clamping happens.
        scales.append(1.0 / float(row[0, 3, 2] - row[0, 2, 2]))
    assert flipped == {True, False}
    assert min(scales) < 0.8 and max(scales) > 1.5


def test_weak_view_is_reproducible_and_per_image():
    images, labels, _, _ = position_batch(batch=4)
    a = weak_view(images, [labels], (8, 8), generator=torch.Generator().manual_seed(3))
    b = weak_view(images, [labels], (8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
    # Same input images, different random transforms per image.
    assert not all(torch.equal(a[0][0], a[0][i]) for i in range(1, 4))


def test_weak_view_pads_with_fill_values():
    images, labels, colmap, _ = position_batch(batch=1)
    # Scale 0.5: 12x14 -> 6x7, crop 8x9 -> 2 rows and 2 columns of padding at bottom/right.
    out, (out_labels, out_colmap) = weak_view(images, [labels, colmap], (8, 9), scale_range=(0.5, 0.5), flip_p=0.0)
    pad = torch.ones(8, 9, dtype=torch.bool)
    pad[:6, :7] = False
    assert (out[0][:, pad] == 0).all() and (out_labels[0][pad] == 255).all() and (out_colmap[0][pad] == 0.0).all()
    assert (out_labels[0][~pad] != 255).all()
    _, (out_labels, out_colmap) = weak_view(
        images, [labels, colmap], (8, 9), scale_range=(0.5, 0.5), flip_p=0.0, fill_values=[7, -1.0]
    )
    assert (out_labels[0][pad] == 7).all() and (out_colmap[0][pad] == -1.0).all()


def test_weak_view_rejects_misaligned_maps():
    images, labels, _, _ = position_batch()
    with pytest.raises(ValueError):
        weak_view(images, [labels[:, :-1]], (8, 8))
    with pytest.raises(ValueError):
        weak_view(images, [labels], (8, 8), fill_values=[255, 0])


def random_images(seed=0, batch=3, size=16):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_strong_view_shape_range_seeded_and_changes_pixels():
    images = random_images()
    before = images.clone()
    a = strong_view(images, generator=torch.Generator().manual_seed(1))
    b = strong_view(images, generator=torch.Generator().manual_seed(1))
    c = strong_view(images, generator=torch.Generator().manual_seed(2))
    assert a.shape == images.shape and a.dtype == images.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - images).abs().mean() > 1e-2
    assert torch.equal(images, before)


def test_strong_view_with_zero_strength_is_identity():
    images = random_images()
    out = strong_view(images, torch.Generator().manual_seed(0), 0.0, 0.0, 0.0, 0.0, blur_p=0.0, grayscale_p=0.0)
    torch.testing.assert_close(out, images)


def test_strong_view_grayscale_and_blur():
    images = random_images()
    gray = strong_view(images, torch.Generator().manual_seed(0), 0.0, 0.0, 0.0, 0.0, blur_p=0.0, grayscale_p=1.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    torch.testing.assert_close(gray[:, 0], 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])
    # Blur keeps constant images constant and the total mass of an impulse, and spreads it.
    impulse = torch.zeros(1, 3, 15, 15)
    impulse[:, :, 7, 7] = 1.0
    blurred = strong_view(impulse, torch.Generator().manual_seed(0), 0.0, 0.0, 0.0, 0.0, blur_p=1.0,
                          blur_sigma=(1.0, 1.0), grayscale_p=0.0)
    torch.testing.assert_close(blurred.sum(dim=(2, 3)), torch.ones(1, 3))
    assert blurred[0, 0, 7, 7] < 0.5 and blurred[0, 0, 7, 8] > 0.05
    torch.testing.assert_close(blurred[0, 0, 7, 8], blurred[0, 0, 7, 6])  # symmetric: nothing moved
    flat = torch.full((1, 3, 6, 6), 0.3)
    torch.testing.assert_close(strong_view(flat, None, 0.0, 0.0, 0.0, 0.0, blur_p=1.0, grayscale_p=0.0), flat)


def test_hsv_round_trip_and_hue_shift_against_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    images = random_images(batch=2, size=8)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(images)), images, atol=1e-5, rtol=0)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    hsv = rgb_to_hsv(red)
    hsv[:, 0] = (hsv[:, 0] + 1 / 3) % 1
    torch.testing.assert_close(hsv_to_rgb(hsv), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1))
    for shift in (0.1, -0.07):
        hsv = rgb_to_hsv(images)
        hsv[:, 0] = (hsv[:, 0] + shift) % 1
        torch.testing.assert_close(hsv_to_rgb(hsv), tvf.adjust_hue(images, shift), atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_weak_and_strong_views():
    images, labels, colmap, _ = position_batch()
    g = torch.Generator().manual_seed(0)
    out, (out_labels, _) = weak_view(images.cuda(), [labels.cuda(), colmap.cuda()], (10, 10), generator=g)
    ref, (ref_labels, _) = weak_view(images, [labels, colmap], (10, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out_labels.cpu(), ref_labels)
    torch.testing.assert_close(out.cpu(), ref)
    strong = strong_view(images.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    assert strong.is_cuda and strong.shape == images.shape


def test_one_nearest_geometry_for_the_store_the_loader_and_the_views():
    """resize_map (the loader, on the store's maps) and the views' nearest resize are one centre-aligned
    geometry, PyTorch's 'nearest-exact': a label resized either way sits under the bilinearly resized image."""
    from corte_ray.data.transforms import nearest_index, resize_map
    from corte_ray.methods.views import _resize_nearest

    labels = torch.arange(7 * 9, dtype=torch.uint8).reshape(7, 9)
    for size in [(3, 4), (14, 18), (10, 5), (7, 9)]:
        exact = torch.nn.functional.interpolate(labels[None, None].float(), size=size, mode="nearest-exact")
        np.testing.assert_array_equal(resize_map(labels.numpy(), size), exact[0, 0].byte().numpy())
        assert torch.equal(_resize_nearest(labels, size), exact[0, 0].byte())
    assert nearest_index(2, 4).tolist() == [1, 3]   # centres 1.0 and 3.0, not the top-left 0 and 2


def test_strong_view_jitter_probability_skips_the_jitter_on_some_images():
    images = random_images(batch=64)
    jitter_only = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, blur_p=0.0, grayscale_p=0.0)
    never = strong_view(images, torch.Generator().manual_seed(3), jitter_p=0.0, **jitter_only)
    torch.testing.assert_close(never, images)
    always = strong_view(images, torch.Generator().manual_seed(3), jitter_p=1.0, **jitter_only)
    assert all((always[i] - images[i]).abs().mean() > 1e-3 for i in range(64))
    half = strong_view(images, torch.Generator().manual_seed(3), jitter_p=0.5, **jitter_only)
    untouched = [bool(torch.equal(half[i], images[i])) for i in range(64)]
    assert 16 <= sum(untouched) <= 48
    # The jittered images get the same jitter as with jitter_p = 1: the extra draw comes after the others.
    for i in range(64):
        if not untouched[i]:
            torch.testing.assert_close(half[i], always[i])


def test_the_default_jitter_probability_draws_nothing_more():
    images = random_images(batch=4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(strong_view(images, g1), strong_view(images, g2, jitter_p=1.0))
    assert torch.equal(g1.get_state(), g2.get_state())
    g3 = torch.Generator().manual_seed(5)
    strong_view(images, g3, jitter_p=0.5)
    assert not torch.equal(g1.get_state(), g3.get_state())
