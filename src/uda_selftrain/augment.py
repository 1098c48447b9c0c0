"""Weak and strong views for self-training, batched on the input's device (method §1.4).

- **Weak view**: horizontal flip (p 0.5) and a random-sized crop (height uniform in
  ``[341/1024, 1000/1024]`` of the image height, width = 2 × height, clipped to the image), resized
  to the output size. The same geometry is applied to the image (bilinear), the pseudo-label and any
  per-pixel mask (nearest), in one ``grid_sample`` for the whole batch.
- **Strong view**: the weak view followed by 3 colour operations drawn uniformly without replacement
  from 8 (colour jitter, Gaussian blur, contrast, brightness, posterize, equalize, solarize,
  grayscale), each applied with probability 0.5, in the drawn order. The teacher sees the weak view,
  the student the strong one; their geometry is identical.

Every random choice is drawn on the CPU from a ``torch.Generator`` (so the same seed gives the same
views on any device) and the image work runs batched on the images' device: per operation, one call
on the subset of samples that drew it. Images are float in ``[0, 1]`` (or uint8) until the end,
where :func:`normalize` applies the ImageNet mean and std; :func:`denormalize` inverts it for
visualisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_label_map,
    check_positive_int,
    check_tensor,
    check_unit_interval,
    value_checks_enabled,
)
from ._histogram import count

__all__ = [
    "COLOUR_OPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ColourParams",
    "CropParams",
    "Views",
    "WeakStrongViews",
    "colour_params",
    "crop_params",
    "denormalize",
    "jitter_matrices",
    "normalize",
    "strong_colour",
    "weak_geometry",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The strong view's colour operations, in the index order used by :class:`ColourParams`.
COLOUR_OPS = (
    "colour_jitter",
    "gaussian_blur",
    "contrast",
    "brightness",
    "posterize",
    "equalize",
    "solarize",
    "grayscale",
)


def check_image_scale(name: str, images: torch.Tensor) -> None:
    """The image contract: uint8 in ``[0, 255]`` or floating point in ``[0, 1]``.

    A float image on the 0-255 scale is the commonest silent mistake (it gives white strong views
    and normalised values in the hundreds), so it is an error. Reading the range is a host sync and
    runs only while value checks are on.
    """
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be uint8 in [0, 255] or floating point in [0, 1], got {images.dtype}"
        )
    if value_checks_enabled() and images.numel():
        lo, hi = torch.aminmax(images.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= -1e-3 and hi <= 1.0 + 1e-3):  # also false for NaN
            hint = " (divide by 255, or pass uint8)" if hi > 1.5 else ""
            raise ValueError(
                f"{name} must be floating point in [0, 1] or uint8, got values in [{lo:g}, {hi:g}]{hint}"
            )


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast disabled on ``device`` for the enclosed image operations.

    A caller's ``torch.autocast`` region (mixed-precision training) would otherwise run the colour
    matrix product and the blur convolution in bfloat16/float16: a dtype mismatch when the result
    is copied back into the float32 batch, and image arithmetic at 8 bits of mantissa. Views are
    data preparation, so they keep the images' dtype whatever the caller's autocast state.
    """
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _as_unit_float(name: str, images: object) -> torch.Tensor:
    x = check_tensor(name, images)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be uint8 or floating point in [0, 1], got {x.dtype}")
    return x


def normalize(
    images: torch.Tensor,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(x − mean) / std`` per channel, ImageNet's statistics by default.

    Args:
        images: ``(N, 3, H, W)`` uint8 in ``[0, 255]`` or float in ``[0, 1]``.
        mean: RGB mean.
        std: RGB standard deviation.

    >>> import torch
    >>> x = torch.rand(2, 3, 4, 4)
    >>> torch.allclose(denormalize(normalize(x)), x, atol=1e-6)
    True
    """
    x = _as_unit_float("images", images)
    check_image_scale("images", x)
    m, sd = _check_mean_std(mean, std)
    return _normalize_(x.clone(), m, sd)


def _normalize_(
    x: torch.Tensor,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> torch.Tensor:
    # In place on a tensor this module owns: avoids a fresh (N, 3, h, w) allocation per view.
    if mean is None or std is None:
        return x
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _check_mean_std(
    mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if (mean is None) != (std is None):
        raise ValueError("mean and std must both be given or both be None (no normalisation)")
    if mean is None or std is None:
        return None, None
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(m) != 3 or len(s) != 3:
        raise ValueError(f"mean and std must hold 3 values (RGB), got {len(m)} and {len(s)}")
    if not all(v > 0 and v == v and v != float("inf") for v in s):
        raise ValueError(f"std must be positive and finite, got {s}")
    return m, s


def denormalize(
    images: torch.Tensor,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x · std + mean`` clamped to ``[0, 1]``, for visualisation.

    >>> import torch
    >>> [round(v, 3) for v in denormalize(torch.zeros(1, 3, 1, 1)).flatten().tolist()]
    [0.485, 0.456, 0.406]
    """
    x = check_tensor("images", images)
    if not x.is_floating_point():
        raise TypeError(f"images must be floating point (normalised), got {x.dtype}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
    m, sd = _check_mean_std(mean, std)
    assert m is not None and sd is not None
    mean_t = torch.tensor(m, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(sd, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * std_t + mean_t).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Weak view: flip + random-sized crop + resize
# --------------------------------------------------------------------------------------------


class CropParams(NamedTuple):
    """Per-sample geometry of the weak view.

    Attributes:
        boxes: ``(N, 4)`` int64 ``(top, left, height, width)`` of the crop in input pixels.
        flips: ``(N,)`` bool, whether the crop is mirrored horizontally.
    """

    boxes: torch.Tensor
    flips: torch.Tensor


def crop_params(
    n: int,
    in_size: tuple[int, int],
    *,
    height_range: tuple[float, float] = (341 / 1024, 1000 / 1024),
    aspect: float = 2.0,
    flip_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> CropParams:
    """Draw the weak view's geometry for ``n`` images of size ``in_size = (H, W)``.

    Crop height ``h ~ U(height_range) · H`` (the paper's 341–1000 of 1024), width ``min(aspect · h,
    W)``, position uniform inside the image. Draws on the CPU from ``generator``.

    >>> import torch
    >>> p = crop_params(2, (1024, 2048), generator=torch.Generator().manual_seed(0))
    >>> p.boxes.shape, bool((p.boxes[:, 2] >= 341).all() and (p.boxes[:, 2] <= 1000).all())
    (torch.Size([2, 4]), True)
    """
    check_positive_int("n", n)
    h_in, w_in = (int(s) for s in in_size)
    lo, hi = (float(v) for v in height_range)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"height_range must satisfy 0 < low <= high <= 1, got {height_range}")
    if aspect <= 0:
        raise ValueError(f"aspect must be positive, got {aspect}")
    check_unit_interval("flip_probability", flip_probability)
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    h = (lo + (hi - lo) * u[:, 0]) * h_in
    h = h.round().clamp(1, h_in)
    w = (h * aspect).round().clamp(1, w_in)
    top = (u[:, 1] * (h_in - h + 1)).floor().clamp(max=h_in - h)
    left = (u[:, 2] * (w_in - w + 1)).floor().clamp(max=w_in - w)
    boxes = torch.stack([top, left, h, w], 1).long()
    return CropParams(boxes, u[:, 3] < flip_probability)


def _nearest_index(start: int, length: int, out: int, device: torch.device) -> torch.Tensor:
    # Pixel-centre nearest neighbour ("nearest-exact"): source = floor((u + 0.5) · length / out).
    u = torch.arange(out, device=device, dtype=torch.float64)
    return (start + ((u + 0.5) * (length / out)).floor().clamp(max=length - 1)).long()


# Tests switch this off to run the float resize of uint8 images on a CPU.
_NATIVE_UINT8_ON_CPU = True
# Tests switch this on to run the accelerator (batched gather) geometry on a CPU.
_BATCHED_GEOMETRY_ON_CPU = False


def weak_geometry(
    images: torch.Tensor,
    params: CropParams,
    out_size: tuple[int, int],
    maps: Sequence[torch.Tensor] = (),
    *,
    keep_uint8: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Apply crop, flip and resize: images bilinearly, each integer map (labels, masks) nearest.

    Only the crop is read and converted to float, so the cost follows the output size, not the
    input's. On a CPU each sample's crop is a view resized by one ``interpolate``; on accelerators
    the whole batch is resized at once by separable two-tap gathers (a fixed handful of kernels,
    equal up to float rounding), since a loop over samples would be bound by kernel launches. Bilinear sampling uses
    pixel centres (``align_corners=False``); nearest sampling picks the pixel whose centre is closest
    to the output pixel's, so a label stays within half an output pixel of its image content.

    Args:
        images: ``(N, 3, H, W)`` float (or uint8, returned as float in ``[0, 1]``).
        params: :class:`CropParams` from :func:`crop_params` (boxes in this image's pixels).
        out_size: ``(h, w)`` of the output.
        maps: ``(N, H, W)`` integer tensors (pseudo-labels, paste masks).
        keep_uint8: return uint8 images when resized natively in uint8 (uint8 on a CPU), for
            callers that paste before converting; float in ``[0, 1]`` otherwise.

    Returns:
        ``(N, 3, h, w)`` float images (see ``keep_uint8``) and the list of ``(N, h, w)`` maps in their dtypes.

    >>> import torch
    >>> img, lab = torch.rand(1, 3, 8, 16), torch.arange(128).view(1, 8, 16)
    >>> p = CropParams(torch.tensor([[0, 0, 8, 16]]), torch.tensor([True]))
    >>> out, (l,) = weak_geometry(img, p, (8, 16), [lab])
    >>> torch.equal(l, lab.flip(-1)), torch.allclose(out, img.flip(-1), atol=1e-5)
    (True, True)
    """
    x = check_tensor("images", images)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(f"images must be uint8 or floating point in [0, 1], got {x.dtype}")
    n, _, h_in, w_in = x.shape
    if params.boxes.shape != (n, 4) or params.flips.shape != (n,):
        raise ValueError(f"params must hold ({n}, 4) boxes and ({n},) flips")
    out_h, out_w = int(out_size[0]), int(out_size[1])
    for i, m in enumerate(maps):
        check_label_map(f"maps[{i}]", m, (n, h_in, w_in), device=x.device)
    boxes = params.boxes.tolist()  # CPU parameters: no device sync
    if any(
        t < 0 or x0 < 0 or h < 1 or w < 1 or t + h > h_in or x0 + w > w_in for t, x0, h, w in boxes
    ):
        raise ValueError(f"params.boxes must lie inside the {h_in}x{w_in} images")
    flips = params.flips.tolist()
    with _autocast_off(x.device):
        if x.device.type != "cpu" or _BATCHED_GEOMETRY_ON_CPU:
            out, out_maps = _geometry_batched(x, params, (out_h, out_w), maps)
        else:
            out, out_maps = _geometry_looped(x, boxes, flips, (out_h, out_w), maps)
    if out.dtype == torch.uint8 and not keep_uint8:
        out = _to_unit(out)
    return out, out_maps


def _geometry_looped(
    x: torch.Tensor,
    boxes: list[list[int]],
    flips: list[bool],
    out_size: tuple[int, int],
    maps: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CPU form: one ``interpolate`` per sample on a view of its crop."""
    n = x.shape[0]
    out_h, out_w = out_size
    # uint8 on the CPU is resized in uint8 (as PIL does; bilinear uint8 kernels exist there) and
    # converted once at the output size; elsewhere the crop is converted, then resized in float on
    # the 0-255 scale and divided by 255 at the output size.
    native_u8 = x.dtype == torch.uint8 and _NATIVE_UINT8_ON_CPU
    work = torch.uint8 if native_u8 else (x.dtype if x.is_floating_point() else torch.float32)
    out = torch.empty(n, 3, out_h, out_w, device=x.device, dtype=work)
    out_maps = [torch.empty(n, out_h, out_w, device=m.device, dtype=m.dtype) for m in maps]
    for i, (top, left, h, w) in enumerate(boxes):
        crop = x[i : i + 1, :, top : top + h, left : left + w]
        if not native_u8:
            crop = crop.to(work)
        r = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", align_corners=False)
        out[i] = r[0].flip(-1) if flips[i] else r[0]
        if maps:
            # The same source rows/columns serve every map of this sample.
            ys = _nearest_index(top, h, out_h, x.device)
            xs = _nearest_index(left, w, out_w, x.device)
            if flips[i]:
                xs = xs.flip(0)
        for m, o in zip(maps, out_maps, strict=True):
            rows = m[i].index_select(0, ys.to(m.device))
            # gather along the last dim is ~9x faster than index_select(1, …) on a CPU.
            o[i] = rows.gather(1, xs.to(m.device).expand(out_h, -1))
    if x.dtype == torch.uint8 and not native_u8:
        out.div_(255.0)  # resized in float on the 0-255 scale: to [0, 1] at the output size
    return out, out_maps


def _bilinear_taps(
    start: torch.Tensor, length: torch.Tensor, out: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample, the two source indices and the weight of the second for ``out`` output pixels
    of a ``length``-pixel window at ``start`` (``interpolate``'s ``align_corners=False`` rule:
    source ``(u + 0.5)·length/out − 0.5``, clamped at 0, last index repeated at the edge)."""
    u = torch.arange(out, dtype=torch.float64)
    src = ((u + 0.5) * (length.double() / out)[:, None] - 0.5).clamp(min=0.0)
    i0 = src.floor()
    frac = src - i0
    i0 = i0.long()
    i1 = torch.minimum(i0 + 1, length[:, None] - 1)
    return start[:, None] + i0, start[:, None] + i1, frac


def _geometry_batched(
    x: torch.Tensor,
    params: CropParams,
    out_size: tuple[int, int],
    maps: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Accelerator form: the whole batch's crops resized at once by separable two-tap gathers
    (bilinear rows, then columns), and every map by one gather per axis: a fixed handful of
    kernels instead of a loop over samples. Equals the per-sample ``interpolate`` up to float
    rounding (bilinear without antialiasing is separable)."""
    n, w_in = x.shape[0], x.shape[3]
    out_h, out_w = out_size
    top, left, h, w = params.boxes.long().cpu().unbind(1)
    flips = params.flips.cpu()
    y0, y1, fy = _bilinear_taps(top, h, out_h)
    x0, x1, fx = _bilinear_taps(left, w, out_w)
    # A flipped sample reads its columns right to left.
    x0, x1, fx = (torch.where(flips[:, None], t.flip(1), t) for t in (x0, x1, fx))
    dev = x.device
    work = x.dtype if x.is_floating_point() else torch.float32

    def rows(idx: torch.Tensor) -> torch.Tensor:
        return x.gather(
            2, idx.to(dev, non_blocking=True).view(n, 1, out_h, 1).expand(n, 3, out_h, w_in)
        )

    def cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.gather(
            3, idx.to(dev, non_blocking=True).view(n, 1, 1, out_w).expand(n, 3, out_h, out_w)
        )

    wy = fy.to(dev, work, non_blocking=True).view(n, 1, out_h, 1)
    wx = fx.to(dev, work, non_blocking=True).view(n, 1, 1, out_w)
    r0, r1 = rows(y0).to(work), rows(y1).to(work)
    r = r0.lerp_(r1, wy)
    out = cols(r, x0).lerp_(cols(r, x1), wx)
    if x.dtype == torch.uint8:
        out.div_(255.0)
    out_maps = []
    if maps:
        u_h = torch.arange(out_h, dtype=torch.float64)
        u_w = torch.arange(out_w, dtype=torch.float64)
        ys = top[:, None] + ((u_h + 0.5) * (h.double() / out_h)[:, None]).floor().long().clamp(
            max=(h - 1)[:, None]
        )
        xs = left[:, None] + ((u_w + 0.5) * (w.double() / out_w)[:, None]).floor().long().clamp(
            max=(w - 1)[:, None]
        )
        xs = torch.where(flips[:, None], xs.flip(1), xs)
        for m in maps:
            md = m.device
            r = m.gather(1, ys.to(md, non_blocking=True)[:, :, None].expand(n, out_h, w_in))
            out_maps.append(
                r.gather(2, xs.to(md, non_blocking=True)[:, None, :].expand(n, out_h, out_w))
            )
    return out, out_maps


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x


# --------------------------------------------------------------------------------------------
# Strong view: colour operations
# --------------------------------------------------------------------------------------------


class ColourParams(NamedTuple):
    """Per-sample randomness of the strong view (all drawn, used or not, so streams stay aligned).

    Attributes:
        ops: ``(N, k)`` int64 indices into :data:`COLOUR_OPS`, drawn without replacement.
        apply: ``(N, k)`` bool, whether each drawn op is applied.
        jitter: ``(N, 4)`` brightness, contrast, saturation factors in ``[0.6, 1.4]`` and hue
            shift in ``[−0.1, 0.1]`` (turns), combined by :func:`jitter_matrices`.
        blur_kernel: ``(N,)`` odd Gaussian kernel size in ``[3, 41]`` (σ by OpenCV's rule).
        contrast: ``(N,)`` contrast factor in ``[0, 3]``.
        brightness: ``(N,)`` brightness change in ``[−0.5, 0.5]`` (factor ``1 + δ``).
    """

    ops: torch.Tensor
    apply: torch.Tensor
    jitter: torch.Tensor
    blur_kernel: torch.Tensor
    contrast: torch.Tensor
    brightness: torch.Tensor


def colour_params(
    n: int,
    *,
    num_ops: int = 3,
    probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> ColourParams:
    """Draw the strong view's operations and their parameters for ``n`` samples (on the CPU).

    >>> import torch
    >>> p = colour_params(4, generator=torch.Generator().manual_seed(0))
    >>> p.ops.shape, bool((p.ops.sort(1).values.diff(dim=1) > 0).all())
    (torch.Size([4, 3]), True)
    """
    check_positive_int("n", n)
    if not 0 <= num_ops <= len(COLOUR_OPS):
        raise ValueError(f"num_ops must lie in [0, {len(COLOUR_OPS)}], got {num_ops}")
    check_unit_interval("probability", probability)
    ops = torch.rand(n, len(COLOUR_OPS), generator=generator).argsort(dim=1)[:, :num_ops]
    apply = torch.rand(n, num_ops, generator=generator) < probability
    u = torch.rand(n, 7, generator=generator)
    jitter = torch.stack(
        [0.6 + 0.8 * u[:, 0], 0.6 + 0.8 * u[:, 1], 0.6 + 0.8 * u[:, 2], 0.2 * u[:, 3] - 0.1], 1
    )
    blur = 3 + 2 * (u[:, 4] * 20).floor().clamp(max=19).long()
    return ColourParams(ops, apply, jitter, blur, 3.0 * u[:, 5], u[:, 6] - 0.5)


_GRAY = (0.299, 0.587, 0.114)
# RGB -> YIQ: luma plus two chroma axes; a hue shift is a rotation of the chroma plane.
_YIQ = ((0.299, 0.587, 0.114), (0.595716, -0.274453, -0.321263), (0.211456, -0.522591, 0.311135))


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def jitter_matrices(jitter: torch.Tensor) -> torch.Tensor:
    """``(M, 3, 3)`` linear colour maps of the colour-jitter operation (float64).

    ``jitter`` is ``(M, 4)``: brightness ``b``, contrast ``c``, saturation ``s``, hue ``h`` (turns).
    The map is ``R_h · S_s · (c · b)``: brightness scales, saturation blends with the grey level,
    and the hue is a rotation by ``2πh`` of the chroma plane in YIQ space (it keeps grey levels
    fixed). Contrast's other part, the image mean, is the offset ``(1 − c) · b · mean(grey(x))``.

    >>> import torch
    >>> m = jitter_matrices(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    >>> torch.allclose(m, torch.eye(3, dtype=torch.float64))
    True
    """
    j = jitter.double()
    b, c, sat, hue = j.unbind(1)
    m = len(j)
    eye = torch.eye(3, dtype=torch.float64).expand(m, 3, 3)
    gray = torch.tensor(_GRAY, dtype=torch.float64).expand(3, 3)
    s_mat = sat.view(-1, 1, 1) * eye + (1 - sat).view(-1, 1, 1) * gray
    yiq = torch.tensor(_YIQ, dtype=torch.float64)
    cos, sin = torch.cos(2 * torch.pi * hue), torch.sin(2 * torch.pi * hue)
    rot = torch.zeros(m, 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    r_mat = torch.linalg.inv(yiq) @ rot @ yiq
    return r_mat @ s_mat * (b * c).view(-1, 1, 1)


# Tests switch this on to run the accelerator (batched convolution) blur on a CPU.
_BATCHED_BLUR_ON_CPU = False


def _blur_weights(k: int) -> torch.Tensor:
    """The normalised 1-D Gaussian of an odd kernel size ``k`` (OpenCV's sigma for ``k``), float64."""
    radius = k // 2
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weight = torch.exp(-0.5 * (t / sigma) ** 2)
    return weight / weight.sum()


def _gaussian_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or _BATCHED_BLUR_ON_CPU:
        return _gaussian_blur_batched(x, kernel)
    return _gaussian_blur_looped(x, kernel)


def _gaussian_blur_batched(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Accelerator form: every sample's kernel zero-padded to the largest, one depthwise
    convolution per direction for the whole batch (two launches instead of a loop over samples).

    Zero weights beyond a sample's own radius read only replicate-padded values that its own
    padding would have produced, so the result equals the per-sample form up to float rounding.
    """
    n, c, h, w = x.shape
    sizes = kernel.tolist()
    big = max(sizes)
    radius = big // 2
    weights = torch.zeros(n, big, dtype=torch.float64)
    for i, k in enumerate(sizes):
        off = (big - k) // 2
        weights[i, off : off + k] = _blur_weights(k)
    wt = weights.to(device=x.device, dtype=x.dtype).repeat_interleave(c, 0)  # (n·c, K)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(
        F.pad(y, (radius, radius, 0, 0), mode="replicate"), wt.view(n * c, 1, 1, big), groups=n * c
    )
    y = F.conv2d(
        F.pad(y, (0, 0, radius, radius), mode="replicate"), wt.view(n * c, 1, big, 1), groups=n * c
    )
    return y.view(n, c, h, w).clamp_(0.0, 1.0)


def _gaussian_blur_looped(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    # Separable, per sample with its own kernel size, as shifted multiply-adds: on CPUs this is
    # several times faster than a depthwise convolution, and the cost follows each kernel's size.
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i, k in enumerate(kernel.tolist()):
        radius = k // 2
        weight = _blur_weights(k).tolist()
        y = F.pad(x[i : i + 1], (radius, radius, 0, 0), mode="replicate")
        row = torch.zeros_like(x[i : i + 1])
        for j, wj in enumerate(weight):
            row.add_(y[..., j : j + w], alpha=wj)
        y = F.pad(row, (0, 0, radius, radius), mode="replicate")
        col = out[i : i + 1].zero_()
        for j, wj in enumerate(weight):
            col.add_(y[..., j : j + h, :], alpha=wj)
    return out.clamp_(0.0, 1.0)


def _posterize(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    # floor(round(255 x) / 2^(8-bits)) · 2^(8-bits) / 255, with floor(floor(a) / n) = floor(a / n).
    step = 2 ** (8 - bits)
    return x.mul(255.0 / step).add_(0.5 / step).floor_().mul_(step / 255.0)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    # torchvision/PIL's algorithm, per image and channel, for the whole subset at once: one
    # bincount over (row, level) pairs, a per-row lookup table, one int32 index_select.
    m, ch = x.shape[:2]
    rows = m * ch
    idx = x.reshape(rows, -1).mul(255.0).round_().to(torch.int32).clamp_(0, 255)
    last = idx.amax(1, keepdim=True).long()
    idx.add_(torch.arange(rows, device=x.device, dtype=torch.int32).mul_(256).view(-1, 1))
    hist = count(idx.view(-1), rows * 256).view(rows, 256).float()
    step = torch.div(hist.sum(1, keepdim=True) - hist.gather(1, last), 255, rounding_mode="floor")
    lut = torch.div(
        hist.cumsum(1) + torch.div(step, 2, rounding_mode="floor"),
        step.clamp(min=1),
        rounding_mode="floor",
    )
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device, dtype=lut.dtype))
    return lut.div_(255.0).to(x.dtype).view(-1).index_select(0, idx.view(-1)).view_as(x)


def _apply_op(op: int, x: torch.Tensor, p: ColourParams, idx: torch.Tensor) -> torch.Tensor:
    dev = x.device
    if op == 0:
        # Brightness, contrast, saturation and hue folded into one affine map per image.
        j = p.jitter[idx]
        mats = jitter_matrices(j).to(dev, x.dtype)
        offset = ((1 - j[:, 1]) * j[:, 0]).to(dev, x.dtype)
        mean = _gray(x).mean(dim=(1, 2, 3))
        y = torch.einsum("mij,mjhw->mihw", mats, x)
        return y.add_((offset * mean).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if op == 1:
        return _gaussian_blur(x, p.blur_kernel[idx])
    if op == 2:
        f = p.contrast[idx].to(dev, x.dtype).view(-1, 1, 1, 1)
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        return x.mul(f).add_((1 - f) * mean).clamp_(0.0, 1.0)
    if op == 3:
        f = (1 + p.brightness[idx].to(dev, x.dtype)).view(-1, 1, 1, 1)
        return x.mul(f).clamp_(0.0, 1.0)
    if op == 4:
        return _posterize(x)
    if op == 5:
        return _equalize(x)
    if op == 6:
        # Solarize at 0.5: x below it, 1 − x from it on, i.e. 0.5 − |x − 0.5|.
        return x.sub(0.5).abs_().neg_().add_(0.5)
    return _gray(x).expand(-1, 3, -1, -1).clone()


def strong_colour(images: torch.Tensor, params: ColourParams) -> torch.Tensor:
    """Apply the drawn colour operations to ``(N, 3, H, W)`` images in ``[0, 1]``.

    Each operation runs once per drawing position on the subset of samples that drew and applied
    it (indices known on the host from ``params``, so no device synchronisation). Output stays in
    ``[0, 1]``; shape and dtype are kept (uint8 input comes back as float), also inside a
    caller's ``torch.autocast`` region (autocast is off for these operations).

    >>> import torch
    >>> x = torch.rand(4, 3, 16, 16)
    >>> y = strong_colour(x, colour_params(4, generator=torch.Generator().manual_seed(1)))
    >>> y.shape == x.shape and bool((y >= 0).all() and (y <= 1).all())
    True
    """
    x = _as_unit_float("images", images)
    n = x.shape[0]
    if params.ops.shape[0] != n:
        raise ValueError(f"params were drawn for {params.ops.shape[0]} samples, images hold {n}")
    out = x.clone() if x is images else x
    with _autocast_off(x.device):
        for step in range(params.ops.shape[1]):
            for op in range(len(COLOUR_OPS)):
                chosen = (params.ops[:, step] == op) & params.apply[:, step]
                idx = torch.nonzero(chosen).flatten()  # CPU tensor: no device sync
                if len(idx) == 0:
                    continue
                dev_idx = idx.to(x.device)
                sub = _apply_op(op, out.index_select(0, dev_idx), params, idx)
                out.index_copy_(0, dev_idx, sub)
    return out


# --------------------------------------------------------------------------------------------
# Both views together
# --------------------------------------------------------------------------------------------


class Views(NamedTuple):
    """Output of :class:`WeakStrongViews`.

    Attributes:
        weak: ``(N, 3, h, w)`` normalised weak view (teacher input).
        strong: ``(N, 3, h, w)`` normalised strong view (student input), same geometry.
        maps: the ``(N, h, w)`` integer maps (pseudo-labels, paste masks) in the weak geometry.
        crop: the :class:`CropParams` used.
        colour: the :class:`ColourParams` used.
    """

    weak: torch.Tensor
    strong: torch.Tensor
    maps: list[torch.Tensor]
    crop: CropParams
    colour: ColourParams


class WeakStrongViews(nn.Module):
    """Weak and strong views of a batch (method §1.4), normalised with the ImageNet statistics.

    Images must be uint8 in ``[0, 255]`` or float in ``[0, 1]`` (a float image on the 0-255 scale
    raises ``ValueError`` while value checks are on). Both views come out normalised with ``mean``
    and ``std`` (ImageNet's by default, what ImageNet-initialised backbones expect: train the
    model on inputs normalised the same way); ``mean=None, std=None`` returns them in ``[0, 1]``.

    The crop is ``height_range`` of the input height with width ``aspect`` × height, resized to
    ``out_size``: on images much smaller than ``out_size`` this zooms in (e.g. 64 × 96 inputs and
    the default ``(512, 1024)`` output zoom 5-16×), and a non-2:1 input loses the width it does not
    fit, so choose ``out_size`` near the crop size your images give.

    Args:
        out_size: ``(h, w)`` output size (512 × 1024 in the paper).
        height_range: crop height as a fraction of the input height (341/1024 to 1000/1024).
        aspect: crop width / height (2).
        flip_probability: horizontal flip probability (0.5).
        num_ops: colour operations drawn per sample (3).
        op_probability: probability of applying each drawn operation (0.5).
        mean: RGB mean subtracted from both views (ImageNet's), or ``None`` with ``std=None``.
        std: RGB standard deviation dividing both views (ImageNet's), or ``None``.

    Shape:
        images ``(N, 3, H, W)``, maps ``(N, H, W)`` → views ``(N, 3, h, w)``, maps ``(N, h, w)``.

    >>> import torch
    >>> views = WeakStrongViews((32, 64))
    >>> out = views(torch.rand(2, 3, 64, 128), [torch.zeros(2, 64, 128, dtype=torch.long)],
    ...             generator=torch.Generator().manual_seed(0))
    >>> out.weak.shape, out.strong.shape, out.maps[0].shape
    (torch.Size([2, 3, 32, 64]), torch.Size([2, 3, 32, 64]), torch.Size([2, 32, 64]))
    """

    def __init__(
        self,
        out_size: tuple[int, int],
        *,
        height_range: tuple[float, float] = (341 / 1024, 1000 / 1024),
        aspect: float = 2.0,
        flip_probability: float = 0.5,
        num_ops: int = 3,
        op_probability: float = 0.5,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if len(out_size) != 2:
            raise ValueError(f"out_size must be (height, width), got {out_size!r}")
        self.out_size = (
            check_positive_int("out_size[0]", out_size[0]),
            check_positive_int("out_size[1]", out_size[1]),
        )
        lo, hi = (float(v) for v in height_range)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"height_range must satisfy 0 < low <= high <= 1, got {height_range}")
        if not aspect > 0:
            raise ValueError(f"aspect must be positive, got {aspect}")
        self.height_range = (lo, hi)
        self.aspect = float(aspect)
        self.flip_probability = check_unit_interval("flip_probability", flip_probability)
        if (
            isinstance(num_ops, bool)
            or not isinstance(num_ops, int)
            or not 0 <= num_ops <= len(COLOUR_OPS)
        ):
            raise ValueError(
                f"num_ops must be an integer in [0, {len(COLOUR_OPS)}], got {num_ops!r}"
            )
        self.num_ops = num_ops
        self.op_probability = check_unit_interval("op_probability", op_probability)
        self.mean, self.std = _check_mean_std(mean, std)

    def extra_repr(self) -> str:
        return f"out_size={self.out_size}, num_ops={self.num_ops}"

    def draw(
        self, n: int, in_size: tuple[int, int], *, generator: torch.Generator | None = None
    ) -> tuple[CropParams, ColourParams]:
        """Draw the geometry and colour parameters of ``n`` samples of size ``in_size``."""
        crop = crop_params(
            n,
            in_size,
            height_range=self.height_range,
            aspect=self.aspect,
            flip_probability=self.flip_probability,
            generator=generator,
        )
        colour = colour_params(
            n, num_ops=self.num_ops, probability=self.op_probability, generator=generator
        )
        return crop, colour

    def forward(
        self,
        images: torch.Tensor,
        maps: Sequence[torch.Tensor] = (),
        *,
        generator: torch.Generator | None = None,
    ) -> Views:
        x = check_tensor("images", images)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
        check_image_scale("images", x)
        crop, colour = self.draw(x.shape[0], (x.shape[2], x.shape[3]), generator=generator)
        weak, out_maps = weak_geometry(x, crop, self.out_size, maps)
        strong = strong_colour(weak, colour)
        return Views(
            _normalize_(weak, self.mean, self.std),
            _normalize_(strong, self.mean, self.std),
            out_maps,
            crop,
            colour,
        )
