"""Rare Class Sampling: probabilities, draws, the Sampler, and the cached, resumable, sharded count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import uda_selftrain as ust
from uda_selftrain.rare_class import _eligible


def _counts(seed=0, n=40, c=6):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5000, (n, c)) * (rng.random((n, c)) < 0.5)
    counts[:, 0] += 20000  # a dominant class
    return torch.from_numpy(counts)


def _daformer_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """DAFormer's rule written independently: frequencies over classes present, softmax of
    (1 − f) / T over them."""
    totals = counts.sum(0).astype(np.float64)
    present = np.flatnonzero(totals > 0)
    f = totals[present] / totals[present].sum()
    z = (1 - f) / t
    e = np.exp(z - z.max())
    out = np.zeros(counts.shape[1])
    out[present] = e / e.sum()
    return out


@pytest.mark.parametrize("t", [0.01, 0.1, 1.0])
def test_probabilities_match_daformer_rule(t):
    counts = _counts()
    p = ust.rare_class_probabilities(counts, temperature=t, min_pixels=0)
    np.testing.assert_allclose(p.numpy(), _daformer_probabilities(counts.numpy(), t), atol=1e-12)
    assert p.dtype == torch.float64 and math.isclose(float(p.sum()), 1.0)
    # The dominant class is the least likely.
    assert int(p.argmin()) == 0


def test_classes_without_an_eligible_image_are_never_drawn():
    counts = torch.tensor([[9000, 100, 0], [8000, 50, 4000]])
    p = ust.rare_class_probabilities(counts, min_pixels=3000)
    assert p[1] == 0 and p[2] > 0.99 and math.isclose(float(p.sum()), 1.0)
    # Unseen class (all zeros) and all-below-threshold: probability 0 everywhere.
    assert ust.rare_class_probabilities(torch.zeros(3, 4, dtype=torch.long)).sum() == 0
    with pytest.raises(ValueError, match="min_pixels"):
        ust.rare_class_sample(torch.tensor([[10, 10]]), 4, min_pixels=100)


def test_draws_follow_the_class_probabilities_and_the_pixel_rule():
    counts = _counts(1)
    t, m = 0.1, 3000
    d = ust.rare_class_sample(
        counts, 60_000, temperature=t, min_pixels=m, generator=torch.Generator().manual_seed(0)
    )
    assert d.indices.shape == d.classes.shape == (60_000,)
    assert d.indices.dtype == d.classes.dtype == torch.int64
    # Every image holds more than min_pixels of the class that drew it.
    assert bool((counts[d.indices, d.classes] > m).all())
    p = ust.rare_class_probabilities(counts, temperature=t, min_pixels=m)
    freq = torch.bincount(d.classes, minlength=counts.shape[1]).double() / 60_000
    # Binomial standard error is at most 0.002 here: 5 sigma.
    np.testing.assert_allclose(freq.numpy(), p.numpy(), atol=0.01)
    # Within a class, images are uniform over the eligible ones.
    c = int(p.argmax())
    eligible = torch.nonzero(counts[:, c] > m).flatten()
    picks = d.indices[d.classes == c]
    hist = torch.bincount(picks, minlength=counts.shape[0])[eligible].double()
    expected = picks.numel() / eligible.numel()
    assert float((hist - expected).abs().max()) < 6 * math.sqrt(expected)


def test_eligible_lists_are_grouped_by_class():
    counts = torch.tensor([[5, 0, 9], [0, 7, 9], [5, 7, 0]])
    img, offsets = _eligible(counts, 4)
    assert offsets.tolist() == [0, 2, 4, 6]
    assert img.tolist() == [0, 2, 1, 2, 0, 1]


def test_draws_are_deterministic_and_counts_may_live_on_the_device(device):
    counts = _counts(2)
    a = ust.rare_class_sample(counts, 50, generator=torch.Generator().manual_seed(3))
    b = ust.rare_class_sample(counts.to(device), 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.classes, b.classes)
    c = ust.rare_class_sample(counts, 50, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a.indices, c.indices)


class _Indexed(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_sampler_with_a_dataloader_and_epochs():
    counts = _counts(3)
    sampler = ust.RareClassSampler(counts, num_samples=12, min_pixels=3000, seed=5)
    assert len(sampler) == 12 and "num_samples=12" in repr(sampler)
    loader = DataLoader(_Indexed(counts.shape[0]), batch_size=4, sampler=sampler)
    epoch0 = torch.cat(list(loader)).tolist()
    assert len(epoch0) == 12 and epoch0 == torch.cat(list(loader)).tolist()
    assert bool((counts[sampler.last_draw.indices, sampler.last_draw.classes] > 3000).all())
    sampler.set_epoch(1)
    assert torch.cat(list(loader)).tolist() != epoch0
    assert list(ust.RareClassSampler(counts, min_pixels=3000, seed=5)) != list(
        ust.RareClassSampler(counts, min_pixels=3000, seed=6)
    )


def test_ranks_split_one_draw():
    counts = _counts(4)
    whole = ust.RareClassSampler(counts, num_samples=12, min_pixels=3000, seed=2)
    parts = [
        ust.RareClassSampler(counts, num_samples=4, min_pixels=3000, seed=2, rank=r, world_size=3)
        for r in range(3)
    ]
    drawn = [list(p) for p in parts]
    assert all(len(d) == 4 for d in drawn)
    interleaved = [drawn[i % 3][i // 3] for i in range(12)]
    assert interleaved == list(whole)


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"counts": torch.rand(3, 2)}, TypeError, "counts"),
        ({"counts": torch.ones(3, dtype=torch.long)}, ValueError, "counts"),
        ({"counts": -torch.ones(2, 2, dtype=torch.long)}, ValueError, "negative"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"min_pixels": -1}, ValueError, "min_pixels"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank"),
        ({"world_size": 0}, ValueError, "world_size"),
    ],
)
def test_sampler_validates(kwargs, error, word):
    args = {"counts": torch.tensor([[5000, 4000]]), **kwargs}
    with pytest.raises(error, match=word):
        ust.RareClassSampler(args.pop("counts"), **args)


# --- counting the labels once ----------------------------------------------------------------


class _Labels:
    """A lazy label sequence that records reads and can fail after a number of them."""

    def __init__(self, maps, fail_after=None):
        self.maps, self.reads, self.fail_after = maps, [], fail_after

    def __len__(self):
        return len(self.maps)

    def __getitem__(self, i):
        if self.fail_after is not None and len(self.reads) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.reads.append(i)
        return self.maps[i]


def _maps(n=7, c=5, seed=0):
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, c, (6, 9)).astype(np.uint8) for _ in range(n)]
    out[0][0, :] = 255
    return out


def _expected(maps, c):
    return np.stack([np.bincount(m[m != 255].ravel(), minlength=c) for m in maps])


def test_counts_match_bincount_and_accept_tensors():
    maps = _maps()
    got = ust.class_pixel_counts(maps, num_classes=5)
    np.testing.assert_array_equal(got.numpy(), _expected(maps, 5))
    assert got.dtype == torch.int64
    as_tensors = [torch.from_numpy(m).long() for m in maps]
    assert torch.equal(ust.class_pixel_counts(as_tensors, num_classes=5), got)


def test_cache_is_reused_without_reading_labels(tmp_path):
    maps = _maps()
    cache = tmp_path / "counts.npz"
    first = ust.class_pixel_counts(maps, num_classes=5, cache=cache)
    labels = _Labels(maps)
    again = ust.class_pixel_counts(labels, num_classes=5, cache=cache)
    assert torch.equal(first, again) and labels.reads == []


def test_a_killed_count_resumes_where_it_stopped(tmp_path):
    maps = _maps(n=10)
    cache = tmp_path / "counts.npz"
    seen = []
    with pytest.raises(KeyboardInterrupt):
        ust.class_pixel_counts(
            _Labels(maps, fail_after=7),
            num_classes=5,
            cache=cache,
            checkpoint_every=3,
            progress=lambda done, total: seen.append((done, total)),
        )
    assert seen == [(3, 10), (6, 10)]
    labels = _Labels(maps)
    got = ust.class_pixel_counts(labels, num_classes=5, cache=cache, checkpoint_every=3)
    assert labels.reads == [6, 7, 8, 9]  # the first six were saved
    np.testing.assert_array_equal(got.numpy(), _expected(maps, 5))


def test_shards_merge_without_recounting(tmp_path):
    maps = _maps(n=9)
    cache = tmp_path / "counts.npz"
    parts = [
        ust.class_pixel_counts(maps, num_classes=5, cache=cache, shard=(k, 3)) for k in range(3)
    ]
    for k, part in enumerate(parts):
        rows = np.zeros(9, dtype=bool)
        rows[k::3] = True
        np.testing.assert_array_equal(part.numpy()[rows], _expected(maps, 5)[rows])
        assert int(part[~torch.from_numpy(rows)].abs().sum()) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counts.part0-of-3.npz",
        "counts.part1-of-3.npz",
        "counts.part2-of-3.npz",
    ]
    labels = _Labels(maps)
    merged = ust.class_pixel_counts(labels, num_classes=5, cache=cache)
    assert labels.reads == [] and cache.exists()
    np.testing.assert_array_equal(merged.numpy(), _expected(maps, 5))
    # Two shards of three done: the unsharded call counts only the third's images.
    (tmp_path / "counts.npz").unlink()
    (tmp_path / "counts.part1-of-3.npz").unlink()
    labels = _Labels(maps)
    ust.class_pixel_counts(labels, num_classes=5, cache=cache)
    assert labels.reads == [1, 4, 7]


def test_counting_errors_name_the_problem(tmp_path):
    maps = _maps()
    with pytest.raises(ValueError, match=r"labels\[1\] has value \d+ outside"):
        ust.class_pixel_counts([maps[0], maps[1] + 7], num_classes=5)
    with pytest.raises(ValueError, match="integer label map"):
        ust.class_pixel_counts([np.zeros((2, 2, 3), dtype=np.uint8)], num_classes=5)
    with pytest.raises(ValueError, match="shard"):
        ust.class_pixel_counts(maps, num_classes=5, shard=(3, 3))
    with pytest.raises(TypeError, match="labels"):
        ust.class_pixel_counts(5, num_classes=5)
    cache = tmp_path / "c.npz"
    cache.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"c\.npz"):
        ust.class_pixel_counts(maps, num_classes=5, cache=cache)
    ust.class_pixel_counts(maps[:3], num_classes=5, cache=tmp_path / "d.npz")
    with pytest.raises(ValueError, match="another label set"):
        ust.class_pixel_counts(maps, num_classes=5, cache=tmp_path / "d.npz")


def test_counts_from_a_gta5_folder(tmp_path):
    """The real on-disk layout: GTA5 label ids in PNG files, mapped to train ids lazily."""
    pytest.importorskip("PIL")
    from PIL import Image

    from uda_selftrain.datasets import GTA5

    rng = np.random.default_rng(0)
    root = tmp_path / "GTA5"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    raws = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)).save(
            root / "images" / f"{i:05d}.png"
        )
        raw = rng.choice(
            np.array([7, 26, 0, 24], dtype=np.uint8), (8, 12)
        )  # road, car, void, person
        Image.fromarray(raw, "L").save(root / "labels" / f"{i:05d}.png")
        raws.append(raw)
    got = ust.class_pixel_counts(GTA5(root).label_maps, num_classes=19)
    for i, raw in enumerate(raws):
        assert got[i, 0] == (raw == 7).sum() and got[i, 13] == (raw == 26).sum()
        assert got[i, 11] == (raw == 24).sum() and int(got[i].sum()) == int((raw != 0).sum())
