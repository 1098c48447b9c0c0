"""HPLA paste + weak/strong views: our batched tensors vs the reference's per-sample host work.

The reference (public implementation, re-created faithfully): in the data-loader worker,
per sample, at full resolution with numpy: for each hard class a boolean mask of the donor's label
and two assignments (image, label); then the transforms on PIL images: random-sized crop, resize
(bilinear image, nearest label), flip, 3 of 8 colour operations (PIL ImageEnhance / ImageOps /
ImageFilter), conversion to a normalised float array. Decoding the donor PNG is excluded on both
sides (the same in both pipelines).

Ours: ``paste_views`` on the batch of uint8 tensors (receivers and donors through the same crop,
then the paste at output size, then batched colour operations), producing both the weak and the
strong view (the reference produces only one view per sample, so it does less work). Also timed:
``hard_paste`` at full size followed by ``WeakStrongViews``, the literal order.

Usage: python benchmarks/bench_mixing.py [--size 6 3 1024 2048] [--out 512 1024] [--device cpu]
Requires Pillow (``pip install -e .[examples]``).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from _common import base_parser, machine, timeit

from uda_selftrain.augment import WeakStrongViews
from uda_selftrain.paste import hard_paste, paste_views

try:
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps
except ImportError as e:  # pragma: no cover
    raise SystemExit("bench_mixing.py needs Pillow: pip install -e .[examples]") from e

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _pil_ops(rng: random.Random):
    def jitter(im):
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4))
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4))
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
        hsv = np.array(im.convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-25, 25))) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")

    def blur(im):
        k = rng.choice(range(3, 42, 2))
        return im.filter(ImageFilter.GaussianBlur(0.3 * ((k - 1) * 0.5 - 1) + 0.8))

    return [
        jitter,
        blur,
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0, 3)),
        lambda im: ImageEnhance.Brightness(im).enhance(1 + rng.uniform(-0.5, 0.5)),
        lambda im: ImageOps.posterize(im, 4),
        ImageOps.equalize,
        lambda im: ImageOps.solarize(im, 128),
        lambda im: ImageOps.grayscale(im).convert("RGB"),
    ]


def reference_sample(img, lab, dimg, dlab, hard, out_hw, rng):
    """One sample, as the public data-loader worker does it (HWC uint8 arrays)."""
    img = img.copy()
    lab = lab.copy()
    for c in hard:
        m = dlab == c
        img[m] = dimg[m]
        lab[m] = c
    h_in, w_in = lab.shape
    h = round(rng.uniform(341 / 1024, 1000 / 1024) * h_in)
    w = min(2 * h, w_in)
    top, left = rng.randint(0, h_in - h), rng.randint(0, w_in - w)
    box = (left, top, left + w, top + h)
    pim = Image.fromarray(img).crop(box).resize(out_hw[::-1], Image.BILINEAR)
    plab = Image.fromarray(lab).crop(box).resize(out_hw[::-1], Image.NEAREST)
    if rng.random() < 0.5:
        pim = pim.transpose(Image.FLIP_LEFT_RIGHT)
        plab = plab.transpose(Image.FLIP_LEFT_RIGHT)
    ops = _pil_ops(rng)
    for k in rng.sample(range(8), 3):
        if rng.random() < 0.5:
            pim = ops[k](pim)
    x = (np.asarray(pim, dtype=np.float32) / 255.0 - MEAN) / STD
    return x.transpose(2, 0, 1), np.asarray(plab, dtype=np.int64)


def main() -> None:
    parser = base_parser(__doc__, [6, 3, 1024, 2048])
    parser.add_argument("--out", type=int, nargs=2, default=[512, 1024])
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--hard", type=int, default=14)
    args = parser.parse_args()
    device = torch.device(args.device)
    n, _, h, w = args.size
    out_hw = tuple(args.out)
    g = torch.Generator().manual_seed(0)
    # Blocky label maps (like real segmentation) rather than i.i.d. pixels.
    coarse = torch.randint(0, args.classes, (2 * n, 1, h // 32, w // 32), generator=g)
    labels = torch.nn.functional.interpolate(coarse.float(), size=(h, w)).squeeze(1).byte()
    images = torch.randint(0, 256, (2 * n, 3, h, w), generator=g, dtype=torch.uint8)
    recv_img, donor_img = images[:n], images[n:]
    recv_lab, donor_lab = labels[:n], labels[n:]
    hard = list(range(args.hard))
    hard_mask = torch.zeros(args.classes, dtype=torch.bool)
    hard_mask[hard] = True

    np_img = [x.permute(1, 2, 0).numpy().copy() for x in recv_img]
    np_dimg = [x.permute(1, 2, 0).numpy().copy() for x in donor_img]
    np_lab = [x.numpy().copy() for x in recv_lab]
    np_dlab = [x.numpy().copy() for x in donor_lab]

    def reference():
        rng = random.Random(0)
        return [
            reference_sample(np_img[i], np_lab[i], np_dimg[i], np_dlab[i], hard, out_hw, rng)
            for i in range(n)
        ]

    views = WeakStrongViews(out_hw)
    r_img, r_lab = recv_img.to(device), recv_lab.to(device)
    d_img, d_lab = donor_img.unsqueeze(1).to(device), donor_lab.unsqueeze(1).to(device)
    hm = hard_mask.to(device)

    def ours():
        gen = torch.Generator().manual_seed(0)
        return paste_views(r_img, r_lab, d_img, d_lab, hm, views=views, generator=gen)

    def ours_paste_first():
        mixed = hard_paste(r_img, r_lab, d_img, d_lab, hm)
        gen = torch.Generator().manual_seed(0)
        return views(mixed.images, [mixed.labels, mixed.pasted], generator=gen)

    torch.set_grad_enabled(False)
    t_ours = timeit(ours, device, args.repeat)
    t_first = timeit(ours_paste_first, device, args.repeat)
    t_ref = timeit(reference, torch.device("cpu"), args.repeat)
    print(machine())
    print(f"batch {n} at {h}x{w} -> {out_hw[0]}x{out_hw[1]}, {args.hard} hard classes")
    print(f"ours, paste_views (geometry first): {t_ours * 1e3:8.1f} ms")
    print(f"ours, hard_paste at full size then views: {t_first * 1e3:8.1f} ms")
    print(f"reference (per-sample numpy/PIL):   {t_ref * 1e3:8.1f} ms")
    print(f"speed-up: {t_ref / t_ours:.1f}x (paste first: {t_ref / t_first:.1f}x)")


if __name__ == "__main__":
    main()
