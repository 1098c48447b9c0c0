from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from uda_selftrain import augment
from uda_selftrain.augment import (
    COLOUR_OPS,
    ColourParams,
    CropParams,
    WeakStrongViews,
    _apply_op,
    colour_params,
    crop_params,
    denormalize,
    jitter_matrices,
    normalize,
    strong_colour,
    weak_geometry,
)

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageOps  # noqa: E402


def test_crop_params_follow_spec_ranges():
    p = crop_params(2000, (1024, 2048), generator=torch.Generator().manual_seed(0))
    top, left, h, w = p.boxes.unbind(1)
    assert h.min() >= 341 and h.max() <= 1000
    assert torch.equal(w, 2 * h)
    assert (top >= 0).all() and (top + h <= 1024).all()
    assert (left >= 0).all() and (left + w <= 2048).all()
    assert 0.45 < p.flips.float().mean() < 0.55
    # Crop wider than the image is clipped to it.
    q = crop_params(50, (100, 120), height_range=(0.9, 1.0), generator=torch.Generator())
    assert (q.boxes[:, 3] <= 120).all() and (q.boxes[:, 1] == 0).all()


def test_crop_params_validation():
    with pytest.raises(ValueError, match="height_range"):
        crop_params(1, (10, 10), height_range=(0.5, 1.5))
    with pytest.raises(ValueError, match="aspect"):
        crop_params(1, (10, 10), aspect=0)
    with pytest.raises(ValueError, match="n must"):
        crop_params(0, (10, 10))


def test_weak_view_keeps_image_label_alignment(device):
    # Image channels are the x and y coordinates (linear, so bilinear sampling is exact); the
    # label is the pixel's flat index. After any crop/flip/resize, the label sampled at a pixel
    # must name an input pixel within half a pixel of the image's interpolated coordinates.
    n, h, w = 6, 48, 96
    ys, xs = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    img = torch.stack([xs, ys, torch.zeros_like(xs)]).float().expand(n, -1, -1, -1).to(device)
    lab = (ys * w + xs).long().expand(n, -1, -1).to(device)
    p = crop_params(n, (h, w), height_range=(0.3, 1.0), generator=torch.Generator().manual_seed(3))
    out, (olab,) = weak_geometry(img, p, (20, 40), [lab])
    lx, ly = (olab % w).double(), (olab // w).double()
    assert (lx - out[:, 0].double()).abs().max() <= 0.5 + 1e-3
    assert (ly - out[:, 1].double()).abs().max() <= 0.5 + 1e-3
    # The crop box is where the samples come from, mirrored when flipped.
    for i in range(n):
        top, left, bh, bw = p.boxes[i].tolist()
        assert ly[i].min() >= top and ly[i].max() <= top + bh - 1
        assert lx[i].min() >= left and lx[i].max() <= left + bw - 1
        row = lx[i, 0]
        assert (row.diff() <= 0).all() if p.flips[i] else (row.diff() >= 0).all()


def test_weak_view_maps_keep_dtype_and_values():
    img = torch.rand(2, 3, 32, 64)
    lab = torch.randint(0, 19, (2, 32, 64), dtype=torch.uint8)
    lab[:, :4] = 255
    mask = torch.full((2, 32, 64), 255, dtype=torch.long)
    p = crop_params(2, (32, 64), generator=torch.Generator().manual_seed(0))
    _, (olab, omask) = weak_geometry(img, p, (16, 32), [lab, mask])
    assert olab.dtype == torch.uint8 and omask.dtype == torch.long
    assert set(olab.unique().tolist()) <= set(lab.unique().tolist())
    assert omask.eq(255).all()


def test_weak_geometry_validation():
    img = torch.rand(2, 3, 8, 8)
    p = crop_params(2, (8, 8))
    with pytest.raises(TypeError, match=r"maps\[0\]"):  # a dtype fault: TypeError
        weak_geometry(img, p, (4, 4), [torch.zeros(2, 8, 8)])
    with pytest.raises(ValueError, match=r"maps\[0\]"):
        weak_geometry(img, p, (4, 4), [torch.zeros(2, 8, 7, dtype=torch.long)])
    with pytest.raises(ValueError, match="params"):
        weak_geometry(img, crop_params(3, (8, 8)), (4, 4))
    with pytest.raises(ValueError, match="images"):
        weak_geometry(img[:, :2], p, (4, 4))
    with pytest.raises(TypeError, match="uint8"):
        weak_geometry(img.long(), p, (4, 4))


def _params_for(op: int, n: int, seed: int = 0) -> ColourParams:
    p = colour_params(n, generator=torch.Generator().manual_seed(seed))
    return p._replace(ops=torch.full((n, 1), op), apply=torch.ones(n, 1, dtype=torch.bool))


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy())


def _quantised(n=3, h=24, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255.0


def test_equalize_posterize_solarize_grayscale_match_pil():
    x = _quantised()
    x[1] = x[1] * 0.3 + 0.2  # low-contrast image, where equalize matters
    x[2, :, :, :] = 0.5  # a flat image: equalize leaves it unchanged
    for op, pil in [
        ("equalize", ImageOps.equalize),
        ("posterize", lambda im: ImageOps.posterize(im, 4)),
        ("solarize", lambda im: ImageOps.solarize(im, 128)),
    ]:
        out = strong_colour(x, _params_for(COLOUR_OPS.index(op), 3))
        for i in range(3):
            expected = np.asarray(pil(_to_pil(x[i]))).astype(np.float64)
            got = (out[i].permute(1, 2, 0) * 255).round().numpy()
            np.testing.assert_allclose(got, expected, atol=1.0, err_msg=op)
    out = strong_colour(x, _params_for(COLOUR_OPS.index("grayscale"), 3))
    for i in range(3):
        expected = np.asarray(_to_pil(x[i]).convert("L")).astype(np.float64)
        got = (out[i, 0] * 255).numpy()
        np.testing.assert_allclose(got, expected, atol=1.0)
        assert torch.equal(out[i, 0], out[i, 1]) and torch.equal(out[i, 1], out[i, 2])


@pytest.mark.parametrize("batched", [False, True], ids=["cpu-loop", "accelerator-conv"])
def test_gaussian_blur_matches_scipy_per_sample_kernels(monkeypatch, batched):
    """Both forms (the CPU's per-sample shifted adds, the accelerators' one depthwise convolution
    per direction, forced on the CPU here) against scipy."""
    monkeypatch.setattr(augment, "_BATCHED_BLUR_ON_CPU", batched)
    x = torch.rand(3, 3, 30, 50, dtype=torch.float64)
    p = _params_for(COLOUR_OPS.index("gaussian_blur"), 3)
    p = p._replace(blur_kernel=torch.tensor([3, 9, 41]))
    out = strong_colour(x, p)
    for i, k in enumerate([3, 9, 41]):
        sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
        t = np.arange(k) - k // 2
        kern = np.exp(-0.5 * (t / sigma) ** 2)
        kern /= kern.sum()
        ref = ndimage.correlate1d(x[i].numpy(), kern, axis=2, mode="nearest")
        ref = ndimage.correlate1d(ref, kern, axis=1, mode="nearest")
        np.testing.assert_allclose(out[i].numpy(), np.clip(ref, 0, 1), atol=1e-10)


def test_colour_jitter_equals_sequential_operations():
    # Mid-range image and mild factors, so no intermediate value leaves [0, 1] and the folded
    # affine map must equal the four operations applied one after the other.
    x = 0.35 + 0.3 * torch.rand(3, 3, 10, 12, dtype=torch.float64)
    j = torch.tensor([[1.1, 0.9, 1.2, 0.05], [0.8, 1.3, 0.7, -0.08], [1.0, 1.0, 1.0, 0.0]])
    p = _params_for(COLOUR_OPS.index("colour_jitter"), 3)._replace(jitter=j)
    out = strong_colour(x, p)
    gray_w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
        dtype=torch.float64,
    )
    for i in range(3):
        b, c, s_, h = j[i].double().tolist()
        y = x[i : i + 1] * b
        y = c * y + (1 - c) * (y * gray_w).sum(1, keepdim=True).mean()
        y = s_ * y + (1 - s_) * (y * gray_w).sum(1, keepdim=True)
        q = torch.einsum("ij,njhw->nihw", yiq, y)
        a = 2 * np.pi * h
        i2 = np.cos(a) * q[:, 1] - np.sin(a) * q[:, 2]
        q2 = np.sin(a) * q[:, 1] + np.cos(a) * q[:, 2]
        y = torch.einsum("ij,njhw->nihw", torch.linalg.inv(yiq), torch.stack([q[:, 0], i2, q2], 1))
        torch.testing.assert_close(out[i : i + 1], y.clamp(0, 1), atol=1e-9, rtol=0)
    # Hue rotation keeps grey pixels grey.
    grey = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    m = jitter_matrices(torch.tensor([[1.0, 1.0, 1.0, 0.1]]))
    torch.testing.assert_close(torch.einsum("mij,mjhw->mihw", m, grey), grey)


def test_contrast_brightness_and_jitter_identity():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    idx = torch.arange(2)
    p = colour_params(2)
    same = p._replace(
        contrast=torch.ones(2),
        brightness=torch.zeros(2),
        jitter=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2),
    )
    for op in ("contrast", "brightness", "colour_jitter"):
        torch.testing.assert_close(_apply_op(COLOUR_OPS.index(op), x, same, idx), x)
    zero = p._replace(contrast=torch.zeros(2))
    flat = _apply_op(COLOUR_OPS.index("contrast"), x, zero, idx)
    assert torch.allclose(flat, flat[:, :, :1, :1].expand_as(flat))
    dark = p._replace(brightness=torch.full((2,), -0.5))
    torch.testing.assert_close(_apply_op(COLOUR_OPS.index("brightness"), x, dark, idx), x * 0.5)


@pytest.mark.parametrize("op", range(len(COLOUR_OPS)))
def test_every_op_keeps_range_shape_dtype(op, device):
    x = torch.rand(3, 3, 20, 30, device=device)
    out = strong_colour(x, _params_for(op, 3, seed=op))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(out).all()


def test_colour_params_draws_without_replacement_and_probability():
    p = colour_params(3000, generator=torch.Generator().manual_seed(0))
    assert all(len(set(r)) == 3 for r in p.ops.tolist())
    freq = torch.bincount(p.ops.flatten(), minlength=8).float() / p.ops.numel()
    assert (freq - 1 / 8).abs().max() < 0.02
    assert 0.47 < p.apply.float().mean() < 0.53
    assert set(p.blur_kernel.unique().tolist()) <= set(range(3, 42, 2))
    assert p.contrast.min() >= 0 and p.contrast.max() <= 3
    assert p.brightness.abs().max() <= 0.5
    with pytest.raises(ValueError, match="num_ops"):
        colour_params(2, num_ops=9)


def test_views_deterministic_labels_untouched_and_normalised(device):
    views = WeakStrongViews((16, 32))
    img = torch.rand(4, 3, 32, 64, device=device)
    lab = torch.randint(0, 19, (4, 32, 64), device=device)
    a = views(img, [lab], generator=torch.Generator().manual_seed(7))
    b = views(img, [lab], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.weak, b.weak) and torch.equal(a.strong, b.strong)
    assert torch.equal(a.maps[0], b.maps[0])
    # Labels follow the geometry only: the same as the weak geometry alone.
    _, (geo,) = weak_geometry(img, a.crop, (16, 32), [lab])
    assert torch.equal(a.maps[0], geo)
    # The normalised views are the plain [0, 1] views, normalised (denormalize clamps, so the
    # range is checked on the plain views themselves).
    plain = WeakStrongViews((16, 32), mean=None, std=None)(
        img, [lab], generator=torch.Generator().manual_seed(7)
    )
    for v in (plain.weak, plain.strong):
        assert v.min() >= 0 and v.max() <= 1
    torch.testing.assert_close(denormalize(a.weak), plain.weak, atol=1e-5, rtol=0)
    torch.testing.assert_close(denormalize(a.strong), plain.strong, atol=1e-5, rtol=0)
    # Samples whose drawn ops were all skipped have identical weak and strong views.
    skipped = ~a.colour.apply.any(1)
    for i in torch.nonzero(skipped).flatten().tolist():
        assert torch.allclose(a.weak[i], a.strong[i])
    c = views(img, [lab], generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a.strong, c.strong)


def test_views_same_randomness_on_every_device(device):
    img = torch.rand(3, 3, 24, 48)
    cpu = WeakStrongViews((12, 24))(img, generator=torch.Generator().manual_seed(1))
    dev = WeakStrongViews((12, 24))(img.to(device), generator=torch.Generator().manual_seed(1))
    assert torch.equal(cpu.crop.boxes, dev.crop.boxes)
    torch.testing.assert_close(dev.strong.cpu(), cpu.strong, atol=2e-3, rtol=0)


def test_normalize_uint8_and_inverse():
    x8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(denormalize(normalize(x8)), x8.float() / 255, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        denormalize(torch.rand(2, 4, 4, 4))


def test_strong_colour_param_mismatch():
    with pytest.raises(ValueError, match="drawn for"):
        strong_colour(torch.rand(2, 3, 4, 4), colour_params(3))


def test_crop_params_identity_box():
    img = torch.rand(1, 3, 6, 10)
    p = CropParams(torch.tensor([[0, 0, 6, 10]]), torch.tensor([False]))
    out, _ = weak_geometry(img, p, (6, 10))
    torch.testing.assert_close(out, img)


@pytest.mark.parametrize("keep_uint8", [False, True])
def test_uint8_images_float_path_matches_native_path(monkeypatch, keep_uint8, device):
    # Off a CPU (or with the native uint8 kernel switched off) uint8 crops are resized in float on
    # the 0-255 scale: the result must still come back in [0, 1] and match the uint8 kernel.
    from uda_selftrain import augment

    gen = torch.Generator().manual_seed(21)
    img = torch.randint(0, 256, (2, 3, 40, 80), generator=gen, dtype=torch.uint8)
    lab = torch.randint(0, 19, (2, 40, 80), generator=gen)
    params = CropParams(torch.tensor([[3, 5, 30, 60], [0, 0, 40, 80]]), torch.tensor([True, False]))
    native, (nlab,) = weak_geometry(img, params, (20, 40), [lab])
    monkeypatch.setattr(augment, "_NATIVE_UINT8_ON_CPU", False)
    out, (olab,) = weak_geometry(
        img.to(device), params, (20, 40), [lab.to(device)], keep_uint8=keep_uint8
    )
    assert out.is_floating_point() and out.device.type == device.type
    assert 0.0 <= out.min() and out.max() <= 1.0
    # The uint8 kernel works in fixed point and rounds to integers: within one grey level.
    torch.testing.assert_close(out.cpu(), native, rtol=0, atol=1.0 / 255 + 1e-6)
    assert torch.equal(olab.cpu(), nlab)


def test_paste_views_uint8_float_path_matches_native_path(monkeypatch):
    from uda_selftrain import augment
    from uda_selftrain.paste import paste_views

    gen = torch.Generator().manual_seed(22)
    img = torch.randint(0, 256, (2, 3, 32, 64), generator=gen, dtype=torch.uint8)
    lab = torch.randint(0, 5, (2, 32, 64), generator=gen)
    dimg = torch.randint(0, 256, (2, 1, 3, 32, 64), generator=gen, dtype=torch.uint8)
    dlab = torch.randint(0, 5, (2, 1, 32, 64), generator=gen)
    hard = torch.tensor([False, True, False, True, False])
    views = WeakStrongViews((16, 32))

    def run():
        return paste_views(
            img, lab, dimg, dlab, hard, views=views, generator=torch.Generator().manual_seed(0)
        )

    native = run()
    monkeypatch.setattr(augment, "_NATIVE_UINT8_ON_CPU", False)
    other = run()
    assert torch.equal(native.labels, other.labels)
    assert torch.equal(native.pasted, other.pasted)
    # Normalised views: one grey level is 1/(255·0.224) ≈ 0.0175 at most.
    torch.testing.assert_close(other.weak, native.weak, rtol=0, atol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
@pytest.mark.parametrize("out_size", [(20, 40), (57, 90)], ids=["down", "up"])
def test_batched_geometry_matches_per_sample_interpolate(monkeypatch, dtype, out_size, device):
    """The accelerators' batched gathers (forced on the CPU) against the CPU's per-sample
    ``interpolate``: images up to float rounding, maps exactly, for flips, downscaling and
    upscaling, crops of different sizes in one batch."""
    monkeypatch.setattr(augment, "_NATIVE_UINT8_ON_CPU", False)
    gen = torch.Generator().manual_seed(31)
    if dtype == torch.uint8:
        img = torch.randint(0, 256, (3, 3, 40, 80), generator=gen, dtype=torch.uint8)
    else:
        img = torch.rand(3, 3, 40, 80, generator=gen, dtype=dtype)
    lab = torch.randint(0, 19, (3, 40, 80), generator=gen)
    mask = torch.randint(0, 2, (3, 40, 80), generator=gen, dtype=torch.uint8)
    params = CropParams(
        torch.tensor([[3, 5, 30, 60], [0, 0, 40, 80], [11, 17, 13, 29]]),
        torch.tensor([True, False, True]),
    )
    looped, looped_maps = weak_geometry(img, params, out_size, [lab, mask])
    monkeypatch.setattr(augment, "_BATCHED_GEOMETRY_ON_CPU", True)
    batched, batched_maps = weak_geometry(
        img.to(device), params, out_size, [lab.to(device), mask.to(device)]
    )
    assert batched.dtype == looped.dtype and batched.shape == (3, 3, *out_size)
    assert batched.device.type == device.type
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 weights round differently
    torch.testing.assert_close(batched.cpu(), looped, rtol=0, atol=tol)
    for a, b in zip(batched_maps, looped_maps, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b)


def test_batched_geometry_identity_box_is_exact(monkeypatch):
    monkeypatch.setattr(augment, "_BATCHED_GEOMETRY_ON_CPU", True)
    img = torch.rand(2, 3, 8, 16)
    lab = torch.arange(256).view(2, 8, 16)
    p = CropParams(torch.tensor([[0, 0, 8, 16], [0, 0, 8, 16]]), torch.tensor([True, False]))
    out, (lab_out,) = weak_geometry(img, p, (8, 16), [lab])
    assert torch.equal(out[0], img[0].flip(-1)) and torch.equal(out[1], img[1])
    assert torch.equal(lab_out[0], lab[0].flip(-1)) and torch.equal(lab_out[1], lab[1])


@pytest.mark.parametrize("batched", [False, True])
def test_views_ignore_a_callers_autocast(device, batched, monkeypatch):
    # Mixed-precision training wraps the step in autocast; the colour matrix product and the blur
    # convolution must still run in float32 (under autocast they returned bfloat16, which
    # index_copy_ refused on the GPU dry run).
    monkeypatch.setattr(augment, "_BATCHED_BLUR_ON_CPU", batched)
    monkeypatch.setattr(augment, "_BATCHED_GEOMETRY_ON_CPU", batched)
    views = WeakStrongViews((16, 32))
    img = torch.rand(8, 3, 32, 64, device=device)
    lab = torch.randint(0, 19, (8, 32, 64), device=device)
    plain = views(img, [lab], generator=torch.Generator().manual_seed(3))
    low = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.autocast(device.type, dtype=low):
        mixed = views(img, [lab], generator=torch.Generator().manual_seed(3))
        ones = torch.ones(2, 2, device=device)
        assert (ones @ ones).dtype == low  # the caller's autocast is back after the views
    assert mixed.weak.dtype == mixed.strong.dtype == torch.float32
    assert torch.equal(mixed.weak, plain.weak) and torch.equal(mixed.strong, plain.strong)
    assert torch.equal(mixed.maps[0], plain.maps[0])
