"""A procedurally generated synthetic-to-real street benchmark over the 19 Cityscapes classes.

``python -m uda_selftrain.datasets.synthetic --out DIR`` writes, in the real on-disk formats:

- ``DIR/source``: a GTA5-layout source domain (``images/*.png``, ``labels/*.png`` in Cityscapes
  label ids), rendered "game-like": flat shading, clean edges, saturated palette;
- ``DIR/target``: a Cityscapes-layout target domain (``leftImg8bit/{train,val}/synth/...``,
  ``gtFine/{train,val}/synth/..._gtFine_labelIds.png``), rendered "real-like": another palette and
  lighting, texture, sensor noise, blur, and different object scales.

Scenes share one layout model (sky above a horizon, a road in perspective with sidewalks, buildings
and vegetation at the sides, thin poles carrying small signs and lights, people, riders on bikes,
vehicles of several sizes placed far to near), so the label statistics are as imbalanced as the real
task: the rare, small classes are the hard ones. Everything is drawn from ``numpy`` generators
seeded per image, so the output is identical for a seed on any machine.

Presets (images are ``H × W``):

======== ========= ============= ============= ===========
preset   size      source        target train  target val
======== ========= ============= ============= ===========
default  96 × 192  400           400           100
large    192 × 384 400           400           100
tiny     48 × 96   16            12            6
======== ========= ============= ============= ===========

The default preset is written in about 10 s on 2 cores. ``large`` draws the same layouts (same
seeds, relative coordinates) at twice the resolution, so that the thin classes are wide enough to
be learnt (poles 3–5 pixels wide instead of 1–2; signs and lights twice as tall).
``meta.json`` records the configuration; rerunning with the same configuration finds the data
complete and does nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..atomic import atomic_save_json
from .labels import CITYSCAPES_LABELID_TO_TRAINID

__all__ = [
    "PRESETS",
    "REAL_SIZES",
    "SyntheticCityConfig",
    "generate",
    "generate_real_resolution",
    "render_image",
    "sample_layout",
]

#: train id → Cityscapes label id, for writing labels in the real format.
TRAINID_TO_LABELID = {v: k for k, v in CITYSCAPES_LABELID_TO_TRAINID.items()}
_TO_LABELID = np.zeros(256, dtype=np.uint8)  # ignore (255) → label id 0 ("unlabeled")
for _t, _l in TRAINID_TO_LABELID.items():
    _TO_LABELID[_t] = _l

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)


@dataclass(frozen=True)
class SyntheticCityConfig:
    """What :func:`generate` writes."""

    height: int = 96
    width: int = 192
    num_source: int = 400
    num_target_train: int = 400
    num_target_val: int = 100
    seed: int = 0
    version: int = 1


PRESETS = {
    "default": SyntheticCityConfig(),
    "large": SyntheticCityConfig(height=192, width=384),
    "tiny": SyntheticCityConfig(
        height=48, width=96, num_source=16, num_target_train=12, num_target_val=6
    ),
}


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def _rect(lab: np.ndarray, y0: float, y1: float, x0: float, x1: float, c: int) -> None:
    h, w = lab.shape
    r0, r1 = int(np.clip(round(y0 * h), 0, h)), int(np.clip(round(y1 * h), 0, h))
    c0, c1 = int(np.clip(round(x0 * w), 0, w)), int(np.clip(round(x1 * w), 0, w))
    if r1 > r0 and c1 > c0:
        lab[r0:r1, c0:c1] = c


def _ellipse(lab: np.ndarray, yy: np.ndarray, xx: np.ndarray, cy, cx, ry, rx, c: int) -> None:
    lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = c


def sample_layout(
    rng: np.random.Generator, height: int, width: int, *, scale: float = 1.0
) -> np.ndarray:
    """One scene's ``(H, W)`` uint8 train-id map. ``scale`` multiplies the size of objects."""
    h, w = height, width
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    lab = np.full((h, w), SKY, dtype=np.uint8)
    horizon = rng.uniform(0.36, 0.5)
    vp = rng.uniform(0.4, 0.6)  # vanishing point
    depth = np.clip((yy - horizon) / (1 - horizon), 0, 1)  # 0 at the horizon, 1 at the bottom
    ground = yy >= horizon
    road_half = rng.uniform(0.3, 0.5) * depth
    walk = rng.uniform(0.12, 0.25) * depth
    off = np.abs(xx - vp)
    lab[ground] = TERRAIN if rng.random() < 0.5 else VEGETATION
    lab[ground & (off < road_half + walk)] = SIDEWALK
    lab[ground & (off < road_half)] = ROAD
    scene = _Scene(lab, yy, xx, ground, depth, horizon, vp, road_half, walk)
    for side in (-1, 1):
        _roadside(rng, scene, side)
    # Far first, near last (painter's order); the draws keep their order.
    for d, kind, info in sorted(_objects(rng), key=lambda o: o[0]):
        _paint_object(rng, scene, d, kind, info, d * scale, (h, w))
    return lab


class _Scene(NamedTuple):
    """The layout being painted and the geometry every element is placed by."""

    lab: np.ndarray
    yy: np.ndarray
    xx: np.ndarray
    ground: np.ndarray
    depth: np.ndarray
    horizon: float
    vp: float
    road_half: np.ndarray
    walk: np.ndarray


def _roadside(rng: np.random.Generator, sc: _Scene, side: int) -> None:
    """Buildings along one side, vegetation between some, a wall or fence along the sidewalk."""
    lab, horizon, vp = sc.lab, sc.horizon, sc.vp
    x = 0.0 if side < 0 else 1.0
    inner = vp - 0.08 if side < 0 else vp + 0.08
    pos = 0.0
    span = abs(inner - x)
    while pos < span:
        bw = rng.uniform(0.06, 0.2)
        top = horizon - rng.uniform(0.08, 0.38) * (1 - pos / (span + 1e-6) * 0.6)
        a, b = sorted((x - side * pos, x - side * min(pos + bw, span)))
        cls = BUILDING if rng.random() < 0.8 else VEGETATION
        _rect(lab, top, horizon + 0.02, a, b, cls)
        if cls == BUILDING and rng.random() < 0.35:  # a tree in front
            cx = rng.uniform(a, b)
            ry, rx = rng.uniform(0.05, 0.12), rng.uniform(0.03, 0.08)
            _ellipse(lab, sc.yy, sc.xx, top + 0.05, cx, ry, rx, VEGETATION)
        pos += bw
    if rng.random() < 0.7:
        cls = WALL if rng.random() < 0.5 else FENCE
        x_edge = vp + side * (sc.road_half + sc.walk)
        band = (
            sc.ground
            & (np.abs(sc.xx - x_edge) < 0.04 + 0.25 * sc.depth)
            & (side * (sc.xx - x_edge) > 0)
            & (sc.yy < horizon + rng.uniform(0.08, 0.2))
        )
        lab[band & (rng.random() < 0.9)] = cls


def _objects(rng: np.random.Generator) -> list[tuple[float, str, dict]]:
    """(depth, kind, info) of the scene's poles, people and vehicles, in drawing order."""
    objects: list[tuple[float, str, dict]] = []
    for _ in range(rng.integers(1, 5)):  # poles with signs / lights on the sidewalks
        side = rng.choice((-1, 1))
        d = rng.uniform(0.1, 1.0)
        objects.append((d, "pole", {"side": side}))
    for _ in range(rng.poisson(2.0)):
        objects.append((rng.uniform(0.05, 1.0), "person", {"side": rng.choice((-1, 1))}))
    for _ in range(rng.poisson(2.5)):
        kind = rng.choice(
            ["car", "car", "car", "truck", "bus", "bike", "motorbike", "train"],
            p=[0.24, 0.24, 0.24, 0.08, 0.07, 0.06, 0.05, 0.02],
        )
        objects.append((rng.uniform(0.05, 1.0), str(kind), {}))
    return objects


#: Vehicles drawn as boxes: class, height (a + b · size) and width-to-height ratio.
_BOXES = {
    "car": (CAR, 0.04, 0.16, 1.8),
    "truck": (TRUCK, 0.07, 0.27, 1.4),
    "bus": (BUS, 0.08, 0.3, 2.2),
    "train": (TRAIN, 0.08, 0.3, 3.5),
}


def _paint_object(
    rng: np.random.Generator,
    sc: _Scene,
    d: float,
    kind: str,
    info: dict,
    s: float,
    size: tuple[int, int],
) -> None:
    """One pole (with a sign or a light), person, two-wheeler with its rider, or vehicle at depth
    ``d`` and size ``s``; ``size`` is the image's (height, width)."""
    lab, yy, xx = sc.lab, sc.yy, sc.xx
    y = sc.horizon + d * (1 - sc.horizon)  # ground contact
    rh = road_half_at(d, sc.road_half, sc.depth)
    if kind == "pole":
        x = sc.vp + info["side"] * (rh + walk_at(d, sc.walk, sc.depth) * 0.5)
        ph = 0.1 + 0.45 * s
        pw = max(0.004, 0.006 * s)
        _rect(lab, y - ph, y, x - pw, x + pw, POLE)
        r = rng.random()
        if r < 0.45:
            left, right = x - 0.012 * s - 0.006, x + 0.012 * s + 0.006
            _rect(lab, y - ph, y - ph + 0.06 * s + 0.02, left, right, SIGN)
        elif r < 0.85:
            left, right = x - 0.008 * s - 0.004, x + 0.008 * s + 0.004
            _rect(lab, y - ph, y - ph + 0.09 * s + 0.02, left, right, LIGHT)
    elif kind == "person":
        x = sc.vp + info["side"] * (rh + walk_at(d, sc.walk, sc.depth) * rng.uniform(0.2, 0.8))
        ph, pw = 0.06 + 0.25 * s, 0.01 + 0.03 * s
        _ellipse(lab, yy, xx, y - ph / 2, x, ph / 2, pw, PERSON)
    else:
        x = sc.vp + rng.uniform(-0.8, 0.8) * rh
        if kind in ("bike", "motorbike"):
            bh, bw = 0.03 + 0.1 * s, 0.02 + 0.09 * s
            cls = BICYCLE if kind == "bike" else MOTORCYCLE
            _ellipse(lab, yy, xx, y - bh / 2, x, bh / 2, bw / 2, cls)
            ry, rx = 0.04 + 0.1 * s, 0.01 + 0.025 * s
            _ellipse(lab, yy, xx, y - bh - 0.05 - 0.1 * s, x, ry, rx, RIDER)
            return
        cls, base, grow, wscale = _BOXES[kind]
        hh = base + grow * s
        ww = hh * wscale * size[0] / size[1]
        _rect(lab, y - hh, y, x - ww / 2, x + ww / 2, cls)


def road_half_at(d: float, road_half: np.ndarray, depth: np.ndarray) -> float:
    i = int(np.argmin(np.abs(depth[:, 0] - d)))
    return float(road_half[i, 0])


def walk_at(d: float, walk: np.ndarray, depth: np.ndarray) -> float:
    i = int(np.argmin(np.abs(depth[:, 0] - d)))
    return float(walk[i, 0])


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

_BASE = np.array(
    [
        (110, 100, 115), (190, 150, 190), (150, 120, 100), (170, 170, 200), (200, 170, 140),
        (220, 220, 90), (250, 140, 20), (240, 240, 0), (60, 170, 50), (160, 210, 110),
        (120, 180, 250), (230, 60, 70), (250, 40, 200), (40, 60, 220), (30, 110, 110),
        (30, 160, 240), (150, 60, 40), (130, 40, 250), (200, 110, 40),
    ],
    dtype=np.float64,
)  # fmt: skip


def _palettes(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    source = _BASE
    # Target: a different camera (colour matrix), duller and warmer, plus per-class shifts.
    mix = np.array([[0.75, 0.2, 0.05], [0.1, 0.7, 0.2], [0.1, 0.25, 0.6]])
    target = source @ mix.T * 0.85 + np.array([25.0, 15.0, 0.0])
    target += rng.normal(0, 22, size=target.shape)
    return np.clip(source, 0, 255), np.clip(target, 0, 255)


def _box_blur(img: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return img
    pad = k // 2
    p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    c = p.cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0), (0, 0)))
    h, w = img.shape[:2]
    s = c[k : k + h, k : k + w] - c[:h, k : k + w] - c[k : k + h, :w] + c[:h, :w]
    return s / (k * k)


def render_image(
    lab: np.ndarray, rng: np.random.Generator, palette: np.ndarray, *, real: bool
) -> np.ndarray:
    """``(H, W, 3)`` uint8 image of a train-id map in the source ("game") or target ("real") style."""
    h, w = lab.shape
    colours = palette + rng.normal(0, 12 if real else 6, size=palette.shape)
    img = colours[lab.astype(np.int64)]
    yy = np.linspace(0, 1, h)[:, None, None]
    xx = np.linspace(0, 1, w)[None, :, None]
    if real:
        # Lighting: a vertical gradient, a side light and vignetting; texture and sensor noise.
        light = 0.75 + 0.45 * rng.random()
        img = img * (light * (1.1 - 0.3 * yy) * (1 + 0.2 * rng.uniform(-1, 1) * (xx - 0.5)))
        img *= 1 - 0.35 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
        texture = rng.normal(0, 1, size=(h, w, 1))
        amp = np.array([6, 8, 14, 10, 12, 6, 6, 6, 30, 20, 4, 10, 10, 8, 8, 8, 8, 8, 8.0])
        img = img + _box_blur(texture, 3) * amp[lab.astype(np.int64)][..., None] * 2
        img = _box_blur(img, 3)
        img = img + rng.normal(0, 7, size=img.shape)
    else:
        img = img * (0.95 + 0.1 * rng.random())
    return np.clip(img, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write_pair(image_path: Path, label_path: Path, img: np.ndarray, lab: np.ndarray) -> None:
    from .image_io import write_label, write_rgb

    write_rgb(image_path, img)
    write_label(label_path, _TO_LABELID[lab])


def generate(
    out: str | Path, config: SyntheticCityConfig = PRESETS["default"], *, progress: bool = True
) -> Path:
    """Write the benchmark into ``out`` (skipped when ``out/meta.json`` has the same config).

    Returns ``out``. Images are written atomically and ``meta.json`` last, so an interrupted run
    is redone from the start of the missing files on the next call.
    """
    out = Path(out)
    meta_path = out / "meta.json"
    wanted = asdict(config)
    if meta_path.is_file():
        existing = json.loads(meta_path.read_text())
        if existing == wanted:
            return out
        raise FileExistsError(
            f"{out} holds a synthetic city with another configuration ({existing}); "
            "choose another folder or delete it"
        )
    src_pal, tgt_pal = _palettes(config.seed)
    h, w = config.height, config.width
    jobs: list[tuple[str, int]] = (
        [("source", i) for i in range(config.num_source)]
        + [("train", i) for i in range(config.num_target_train)]
        + [("val", i) for i in range(config.num_target_val)]
    )
    start = time.perf_counter()
    for k, (part, i) in enumerate(jobs):
        stream = {"source": 0, "train": 1, "val": 2}[part]
        rng = np.random.default_rng([config.seed, stream, i])
        if part == "source":
            lab = sample_layout(rng, h, w, scale=1.0)
            img = render_image(lab, rng, src_pal, real=False)
            name = f"{i:05d}.png"
            image_path = out / "source" / "images" / name
            label_path = out / "source" / "labels" / name
        else:
            lab = sample_layout(rng, h, w, scale=0.8)
            img = render_image(lab, rng, tgt_pal, real=True)
            stem = f"synth_{i:06d}_000019"
            image_path = out / "target" / "leftImg8bit" / part / "synth" / f"{stem}_leftImg8bit.png"
            label_path = out / "target" / "gtFine" / part / "synth" / f"{stem}_gtFine_labelIds.png"
        if not (image_path.is_file() and label_path.is_file()):
            _write_pair(image_path, label_path, img, lab)
        if progress and (k + 1) % max(1, len(jobs) // 10) == 0:
            rate = (k + 1) / (time.perf_counter() - start)
            eta = (len(jobs) - k - 1) / rate
            print(
                f"synthetic city: {k + 1}/{len(jobs)} images, {rate:.0f} img/s, ETA {eta:.0f}s",
                file=sys.stderr,
            )
    atomic_save_json(meta_path, wanted)
    return out


#: (height, width) of the real datasets' images.
REAL_SIZES = {"gta5": (1052, 1914), "synthia": (760, 1280), "cityscapes": (1024, 2048)}


def generate_real_resolution(
    out: str | Path, *, num_images: int = 3, seed: int = 0, progress: bool = True
) -> Path:
    """The synthetic city at the real datasets' resolutions, in their real layouts.

    Writes ``out/GTA5`` (``images``/``labels``, 1914 × 1052, Cityscapes label ids),
    ``out/SYNTHIA`` (``RGB``/``GT/LABELS``, 1280 × 760, 16-bit labels with SYNTHIA's class ids in
    channel 0; terrain, truck and train absent as in SYNTHIA) and ``out/cityscapes``
    (``leftImg8bit``/``gtFine`` ``train`` and ``val``, 2048 × 1024, ``*_gtFine_labelIds.png``),
    ``num_images`` each — enough to run every stage of a paper preset for a few iterations
    (``examples/hiast_full.py --max-iters``). Needs the ``data`` extra (OpenCV writes the 16-bit
    labels). Returns ``out``; an existing complete folder is kept.
    """
    from .image_io import write_label16, write_rgb
    from .labels import SYNTHIA_ID_TO_TRAINID

    out = Path(out)
    meta_path = out / "meta.json"
    wanted = {"real_resolution": True, "num_images": num_images, "seed": seed, "version": 1}
    if meta_path.is_file() and json.loads(meta_path.read_text()) == wanted:
        return out
    to_synthia = np.zeros(256, dtype=np.uint16)  # void (0) for ignore and SYNTHIA's absent classes
    for synthia_id, train_id in SYNTHIA_ID_TO_TRAINID.items():
        if train_id not in (TERRAIN, TRUCK, TRAIN):
            to_synthia[train_id] = synthia_id
    src_pal, tgt_pal = _palettes(seed)
    jobs = [("gta5", i) for i in range(num_images)] + [("synthia", i) for i in range(num_images)]
    jobs += [("train", i) for i in range(num_images)] + [("val", i) for i in range(num_images)]
    for k, (part, i) in enumerate(jobs):
        rng = np.random.default_rng([seed, 10 + ["gta5", "synthia", "train", "val"].index(part), i])
        h, w = REAL_SIZES["cityscapes" if part in ("train", "val") else part]
        lab = sample_layout(rng, h, w, scale=0.8 if part in ("train", "val") else 1.0)
        img = render_image(
            lab,
            rng,
            tgt_pal if part in ("train", "val") else src_pal,
            real=part in ("train", "val"),
        )
        if part == "gta5":
            _write_pair(
                out / "GTA5" / "images" / f"{i:05d}.png",
                out / "GTA5" / "labels" / f"{i:05d}.png",
                img,
                lab,
            )
        elif part == "synthia":
            lab = np.where(np.isin(lab, (TERRAIN, TRUCK, TRAIN)), 255, lab)
            write_rgb(out / "SYNTHIA" / "RGB" / f"{i:07d}.png", img)
            write_label16(out / "SYNTHIA" / "GT" / "LABELS" / f"{i:07d}.png", to_synthia[lab])
        else:
            stem = f"synth_{i:06d}_000019"
            _write_pair(
                out / "cityscapes" / "leftImg8bit" / part / "synth" / f"{stem}_leftImg8bit.png",
                out / "cityscapes" / "gtFine" / part / "synth" / f"{stem}_gtFine_labelIds.png",
                img,
                lab,
            )
        if progress:
            print(f"real-resolution city: {k + 1}/{len(jobs)} images", file=sys.stderr)
    atomic_save_json(meta_path, wanted)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uda_selftrain.datasets.synthetic",
        description="Write the synthetic-to-real street benchmark in GTA5 and Cityscapes layouts.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--num-source", type=int, default=None)
    parser.add_argument("--num-target-train", type=int, default=None)
    parser.add_argument("--num-target-val", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--real-resolution",
        type=int,
        metavar="N",
        default=None,
        help="instead: N images each of GTA5, SYNTHIA and Cityscapes at their real sizes and layouts",
    )
    args = parser.parse_args(argv)
    if args.real_resolution is not None:
        generate_real_resolution(
            args.out, num_images=args.real_resolution, seed=args.seed or 0, progress=not args.quiet
        )
        return 0
    cfg = asdict(PRESETS[args.preset])
    for key in ("seed", "num_source", "num_target_train", "num_target_val"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.size is not None:
        cfg["height"], cfg["width"] = args.size
    start = time.perf_counter()
    generate(args.out, SyntheticCityConfig(**cfg), progress=not args.quiet)
    if not args.quiet:
        print(f"synthetic city in {args.out} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
