from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("cv2")
from PIL import Image

from uda_selftrain.class_statistics import ClassStatistics
from uda_selftrain.datasets import (
    CITYSCAPES_LABELID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    CITYSCAPES_TO_OXFORD,
    GTA5,
    OXFORD_ID_TO_TRAINID,
    SYNTHIA,
    SYNTHIA_ID_TO_TRAINID,
    Cityscapes,
    DatasetLayoutError,
    OxfordRobotCar,
    PseudoLabelDataset,
    colorize,
    decolorize,
    lookup_table,
    map_labels,
    pseudo_label_path,
    synthetic,
)
from uda_selftrain.donors import DonorSampler


def write_png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit RGBA PNG as SYNTHIA ships them (written by hand: Pillow cannot write one)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def ids(h: int, w: int, seed: int, high: int = 34) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (h, w), dtype=np.uint8)


def expected_train_ids(raw: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.full(raw.shape, 255, dtype=np.uint8)
    for k, v in mapping.items():
        out[raw == k] = v
    return out


# --- label protocols -------------------------------------------------------------------------


def test_lookup_tables_are_exact():
    for mapping, size in [
        (CITYSCAPES_LABELID_TO_TRAINID, 256),
        (SYNTHIA_ID_TO_TRAINID, 65536),
        (OXFORD_ID_TO_TRAINID, 256),
        (CITYSCAPES_TO_OXFORD, 256),
    ]:
        table = lookup_table(mapping, size=size)
        raw = np.arange(size)
        np.testing.assert_array_equal(map_labels(raw, table), expected_train_ids(raw, mapping))
    t = lookup_table(CITYSCAPES_LABELID_TO_TRAINID)
    x = torch.tensor([[7, 33, -1, 1000]])
    assert map_labels(x, t).tolist() == [[0, 18, 255, 255]]
    assert set(CITYSCAPES_TO_OXFORD.values()) == set(range(9))
    with pytest.raises(TypeError):
        map_labels(np.zeros((2, 2)), t)


def test_colorize_round_trip():
    lab = np.random.default_rng(0).integers(0, 19, (20, 30)).astype(np.uint8)
    lab[0] = 255
    rgb_img = colorize(lab)
    assert rgb_img.shape == (20, 30, 3) and rgb_img.dtype == np.uint8
    np.testing.assert_array_equal(rgb_img[5, 5], CITYSCAPES_PALETTE[lab[5, 5]])
    np.testing.assert_array_equal(decolorize(rgb_img), lab)
    np.testing.assert_array_equal(colorize(torch.from_numpy(lab).long()), rgb_img)


# --- readers ---------------------------------------------------------------------------------


def test_gta5_reader_maps_ids_and_resizes_mismatched_label(tmp_path):
    root = tmp_path / "GTA5"
    raws = {}
    for i, (h, w) in enumerate([(20, 40), (20, 40)]):
        save(root / "images" / f"{i:05d}.png", rgb(h, w, i))
        raw = ids(h, w, 10 + i)
        raws[i] = raw
        if i == 1:  # a label of another size than its image: stored at 10 × 20
            raw = raw[::2, ::2]
            raws[i] = raw
        save(root / "labels" / f"{i:05d}.png", raw, "L")
    ds = GTA5(root)
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (3, 20, 40) and item["image"].dtype == torch.uint8
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), rgb(20, 40, 0))
    np.testing.assert_array_equal(
        item["label"].numpy(), expected_train_ids(raws[0], CITYSCAPES_LABELID_TO_TRAINID)
    )
    small = ds[1]["label"]
    assert small.shape == (20, 40)
    np.testing.assert_array_equal(
        small.numpy()[::2, ::2], expected_train_ids(raws[1], CITYSCAPES_LABELID_TO_TRAINID)
    )
    resized = GTA5(root, size=(10, 20))[0]
    assert resized["image"].shape == (3, 10, 20) and resized["label"].shape == (10, 20)
    (tmp_path / "list.txt").write_text("00001.png\n")
    assert len(GTA5(root, split_list=tmp_path / "list.txt")) == 1


def test_gta5_palette_label_read_as_indices(tmp_path):
    root = tmp_path / "GTA5"
    save(root / "images" / "a.png", rgb(8, 8, 0))
    raw = ids(8, 8, 1)
    im = Image.fromarray(raw, "P")
    im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    (root / "labels").mkdir(parents=True)
    im.save(root / "labels" / "a.png")
    np.testing.assert_array_equal(
        GTA5(root)[0]["label"].numpy(), expected_train_ids(raw, CITYSCAPES_LABELID_TO_TRAINID)
    )


def test_synthia_reads_16bit_channel0(tmp_path):
    root = tmp_path / "SYNTHIA"
    save(root / "RGB" / "0000000.png", rgb(12, 16, 0))
    cls = np.random.default_rng(1).integers(0, 23, (12, 16)).astype(np.uint16)
    cls[np.isin(cls, [16, 18, 20])] = 3  # ids of terrain, truck, train never occur in SYNTHIA
    label = np.stack(
        [cls, np.full_like(cls, 4000), np.full_like(cls, 7), np.full_like(cls, 65535)], -1
    )
    write_png16(root / "GT" / "LABELS" / "0000000.png", label)
    # The trap the reader avoids: Pillow truncates 16-bit colour PNGs to 8 bits and reads zeros.
    assert np.asarray(Image.open(root / "GT" / "LABELS" / "0000000.png"))[..., 0].max() == 0
    item = SYNTHIA(root)[0]
    np.testing.assert_array_equal(
        item["label"].numpy(), expected_train_ids(cls, SYNTHIA_ID_TO_TRAINID)
    )
    assert not np.isin(item["label"].numpy(), [9, 14, 16]).any()


def _cityscapes(tmp_path: Path, split: str, n: int, with_train_ids: bool = False) -> Path:
    root = tmp_path / "cityscapes"
    for i in range(n):
        city = ["aachen", "bochum"][i % 2]
        stem = f"{city}_{i:06d}_000019"
        save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(8, 16, i))
        raw = ids(8, 16, 100 + i)
        save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raw, "L")
        if with_train_ids:
            tid = expected_train_ids(raw, CITYSCAPES_LABELID_TO_TRAINID)
            save(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", tid, "L")
    return root


def test_cityscapes_reader(tmp_path):
    root = _cityscapes(tmp_path, "val", 3, with_train_ids=True)
    a = Cityscapes(root, "val")
    b = Cityscapes(root, "val", label_type="labelTrainIds")
    c = Cityscapes(root, "val", label_type=None)
    assert len(a) == len(b) == len(c) == 3
    for i in range(3):
        assert torch.equal(a[i]["label"], b[i]["label"])
        assert c[i]["label"].eq(255).all()
    assert a.name(0) == "aachen/aachen_000000_000019_leftImg8bit.png"
    with pytest.raises(ValueError, match="label_type"):
        Cityscapes(root, "val", label_type="color")


def test_oxford_reader(tmp_path):
    root = tmp_path / "Oxford_Robot_ICCV19"
    save(root / "train" / "2014-12-09" / "a.png", rgb(8, 8, 0))
    save(root / "train" / "2015-05-19" / "b.png", rgb(8, 8, 1))
    save(root / "val" / "c.png", rgb(8, 8, 2))
    anno = np.random.default_rng(3).integers(0, 20, (8, 8)).astype(np.uint8)
    rgba = np.stack([anno, anno * 2, anno * 3, np.full_like(anno, 255)], -1)
    save(root / "anno" / "c.png", rgba, "RGBA")
    train = OxfordRobotCar(root, "train")
    assert len(train) == 2 and train[0]["label"].eq(255).all()
    val = OxfordRobotCar(root, "val")
    np.testing.assert_array_equal(
        val[0]["label"].numpy(), expected_train_ids(anno, OXFORD_ID_TO_TRAINID)
    )


def test_reader_errors_name_path_and_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)images not found.*<root>/labels"):
        GTA5(tmp_path / "nothing")
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"no files matching '\*\.png'"):
        GTA5(empty)
    unpaired = tmp_path / "unpaired"
    save(unpaired / "images" / "a.png", rgb(4, 4, 0))
    save(unpaired / "images" / "b.png", rgb(4, 4, 1))
    save(unpaired / "labels" / "a.png", ids(4, 4, 0), "L")
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 images have no label, e\.g\. .*b\.png"):
        GTA5(unpaired)
    broken = tmp_path / "broken"
    save(broken / "labels" / "a.png", ids(4, 4, 0), "L")
    (broken / "images").mkdir()
    (broken / "images" / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(OSError, match=r"cannot read image .*a\.png"):
        GTA5(broken)[0]
    with pytest.raises(DatasetLayoutError, match="split list"):
        GTA5(unpaired, split_list=tmp_path / "missing.txt")
    with pytest.raises(DatasetLayoutError, match=r"gtFine"):
        root = tmp_path / "cs"
        save(root / "leftImg8bit" / "train" / "x" / "x_0_0_leftImg8bit.png", rgb(4, 4, 0))
        Cityscapes(root, "train")


# --- pseudo-label dataset --------------------------------------------------------------------


def test_pseudo_label_dataset_with_donors(tmp_path):
    root = _cityscapes(tmp_path, "train", 6)
    images = Cityscapes(root, "train", label_type=None)
    pseudo = tmp_path / "pseudo"
    stats = ClassStatistics(19)
    rng = np.random.default_rng(0)
    for i in range(len(images)):
        lab = rng.integers(0, 19, (8, 16)).astype(np.uint8)
        lab[:2] = 255
        path = pseudo_label_path(pseudo, images.name(i))
        save(path, lab, "L")
        counts = torch.from_numpy(np.bincount(lab[lab != 255], minlength=19)).view(1, -1)
        stats.add([images.name(i)], counts)
    stats.class_values = torch.linspace(0.1, 0.95, 19, dtype=torch.float64)
    sampler = DonorSampler(stats, num_hard=5, max_donors=2)
    ds = PseudoLabelDataset(images, pseudo, sampler=sampler, seed=3)
    item = ds[1]
    assert item["label"].shape == (8, 16) and item["label"][:2].eq(255).all()
    assert item["donor_images"].shape == (2, 3, 8, 16) and item["donor_valid"].any()
    assert torch.equal(ds[1]["donor_images"], item["donor_images"])  # deterministic
    ds.set_epoch(1)
    draws = {tuple(ds[i]["donor_valid"].tolist()) for i in range(6)}
    assert draws
    plain = PseudoLabelDataset(images, pseudo)
    assert "donor_images" not in plain[0]
    (pseudo / images.name(0)).with_suffix(".png").unlink()
    with pytest.raises(DatasetLayoutError, match="no pseudo-label"):
        PseudoLabelDataset(images, pseudo)


# --- synthetic city --------------------------------------------------------------------------


def test_synthetic_city_is_deterministic_and_loads(tmp_path):
    cfg = synthetic.PRESETS["tiny"]
    a = synthetic.generate(tmp_path / "a", cfg, progress=False)
    b = synthetic.generate(tmp_path / "b", cfg, progress=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files_a) == 2 * (cfg.num_source + cfg.num_target_train + cfg.num_target_val)
    for rel in files_a:
        np.testing.assert_array_equal(
            np.asarray(Image.open(a / rel)), np.asarray(Image.open(b / rel))
        )
    src = GTA5(a / "source")
    train = Cityscapes(a / "target", "train")
    val = Cityscapes(a / "target", "val")
    assert (len(src), len(train), len(val)) == (16, 12, 6)
    labels = torch.stack([src[i]["label"] for i in range(len(src))])
    present = set(labels.unique().tolist())
    assert {0, 1, 2, 10, 13} <= present and present <= set(range(19)) | {255}
    assert src[0]["image"].shape == (3, cfg.height, cfg.width)
    # A rerun with the same configuration does nothing; another configuration is refused.
    synthetic.generate(a, cfg, progress=False)
    with pytest.raises(FileExistsError, match="another configuration"):
        synthetic.generate(a, synthetic.PRESETS["default"], progress=False)


def test_large_synthetic_city_draws_the_same_scenes_with_wider_thin_classes():
    small, large = synthetic.PRESETS["default"], synthetic.PRESETS["large"]
    assert (large.height, large.width) == (2 * small.height, 2 * small.width)
    for i in range(5):
        a = synthetic.sample_layout(np.random.default_rng([0, 0, i]), small.height, small.width)
        b = synthetic.sample_layout(np.random.default_rng([0, 0, i]), large.height, large.width)
        # The same layout in relative coordinates: downsampled, the large map mostly agrees.
        assert (b[::2, ::2] == a).mean() > 0.9
        poles_a = (a == synthetic.POLE).sum(axis=0)
        poles_b = (b == synthetic.POLE).sum(axis=0)
        if poles_a.any():  # twice as many pole columns at twice the width
            assert (poles_b > 0).sum() >= 1.5 * (poles_a > 0).sum()


def test_synthetic_domains_differ():
    rng = np.random.default_rng(0)
    lab = synthetic.sample_layout(rng, 48, 96)
    src_pal, tgt_pal = synthetic._palettes(0)
    s = synthetic.render_image(lab, np.random.default_rng(1), src_pal, real=False).astype(float)
    t = synthetic.render_image(lab, np.random.default_rng(1), tgt_pal, real=True).astype(float)
    assert np.abs(s - t).mean() > 20


def test_synthetic_cli(tmp_path):
    assert (
        synthetic.main(
            ["--out", str(tmp_path / "c"), "--preset", "tiny", "--quiet", "--num-source", "3"]
        )
        == 0
    )
    assert len(list((tmp_path / "c" / "source" / "images").glob("*.png"))) == 3


def test_things_protocol_maps_every_city_class_once():
    from uda_selftrain.datasets import (
        CITYSCAPES_CLASSES,
        CITYSCAPES_TO_THINGS,
        THINGS_CLASSES,
        MappedLabels,
    )

    assert sorted(CITYSCAPES_TO_THINGS) == list(range(19))
    assert sorted(set(CITYSCAPES_TO_THINGS.values())) == list(range(len(THINGS_CLASSES)))
    for city, thing in CITYSCAPES_TO_THINGS.items():
        # The kept classes keep their names; the eight stuff classes become the background.
        expected = CITYSCAPES_CLASSES[city] if thing else "background"
        assert THINGS_CLASSES[thing] == expected
    base = [{"image": torch.zeros(3, 1, 3), "label": torch.tensor([[0, 11, 255]]), "name": "a"}]
    mapped = MappedLabels(base, lookup_table(CITYSCAPES_TO_THINGS))
    assert len(mapped) == 1 and mapped[0]["label"].tolist() == [[0, 4, 255]]
    assert base[0]["label"].tolist() == [[0, 11, 255]]  # the wrapped item is not changed


def test_atomic_text_and_barrier_without_a_process_group(tmp_path):
    from uda_selftrain.atomic import atomic_save_text
    from uda_selftrain.distributed import barrier

    atomic_save_text(tmp_path / "sub" / "a.txt", "line\n")
    assert (tmp_path / "sub" / "a.txt").read_text() == "line\n"
    assert not list((tmp_path / "sub").glob(".*.tmp"))
    barrier()  # a no-op without torch.distributed
