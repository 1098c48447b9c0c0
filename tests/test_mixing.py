from __future__ import annotations

import numpy as np
import pytest
import torch

from uda_selftrain.class_statistics import class_difficulty, sampling_probabilities


def test_golden_probabilities_and_hard_set(golden):
    v = torch.from_numpy(golden["hpla_class_values"])
    np.testing.assert_allclose(
        sampling_probabilities(v).numpy(), golden["hpla_sampling_probs"], rtol=1e-12
    )
    d = class_difficulty(v, num_hard=14)
    np.testing.assert_array_equal(d.hard_classes.numpy(), golden["hpla_hard_classes_k14"])
    q = golden["hpla_sampling_probs"][golden["hpla_hard_classes_k14"]]
    np.testing.assert_allclose(d.probabilities[d.hard_classes].numpy(), q / q.sum(), rtol=1e-12)
    assert d.probabilities.sum().item() == pytest.approx(1.0)


def test_synthia_absent_classes_and_no_donor_never_nan():
    v = torch.rand(19, generator=torch.Generator().manual_seed(0))
    v[[9, 14, 16]] = 0.0  # never observed: would be the "hardest" without exclusion
    has_donor = torch.ones(19, dtype=torch.bool)
    has_donor[2] = False
    d = class_difficulty(v, num_hard=14, absent_classes=(9, 14, 16), has_donor=has_donor)
    assert torch.isfinite(d.probabilities).all()
    assert d.probabilities[[2, 9, 14, 16]].eq(0).all()
    assert len(d.hard_classes) == 14 and not d.hard_mask[[2, 9, 14, 16]].any()
    assert d.probabilities.sum().item() == pytest.approx(1.0)


def test_fewer_eligible_than_k_and_none_eligible():
    v = torch.tensor([0.2, 0.5, 0.9])
    d = class_difficulty(v, num_hard=3, absent_classes=(0,))
    assert d.hard_classes.tolist() == [1, 2]
    none = class_difficulty(v, num_hard=2, has_donor=torch.zeros(3, dtype=torch.bool))
    assert none.hard_classes.numel() == 0 and none.probabilities.eq(0).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="absent_classes"):
        class_difficulty(torch.rand(3), num_hard=2, absent_classes=(5,))
    with pytest.raises(ValueError, match="num_hard"):
        class_difficulty(torch.rand(3), num_hard=0)
    with pytest.raises(TypeError, match="floating-point"):
        class_difficulty(torch.arange(3), num_hard=2)
    with pytest.raises(ValueError, match="has_donor"):
        class_difficulty(torch.rand(3), num_hard=2, has_donor=torch.ones(4, dtype=torch.bool))


# --- class statistics, donor pools and files -------------------------------------------------

from uda_selftrain.class_statistics import ClassStatistics  # noqa: E402
from uda_selftrain.donors import DonorSampler  # noqa: E402
from uda_selftrain.paste import HardAwarePaste, hard_paste, paste_views  # noqa: E402


def _stats(num_samples=20, num_classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 100, (num_samples, num_classes), generator=g)
    pixels[pixels < 40] = 0
    stats = ClassStatistics(num_classes)
    stats.add([f"img_{i:03d}.png" for i in range(num_samples)], pixels)
    stats.class_values = torch.rand(num_classes, generator=g, dtype=torch.float64)
    stats.thresholds = torch.rand(num_classes, generator=g, dtype=torch.float64)
    return stats


def test_donor_pools_drop_smallest_tenth_like_public():
    stats = _stats()
    pixels = stats.sample_class_pixels
    for c, pool in enumerate(stats.donor_pools(drop_fraction=0.1)):
        # Independent computation of the public rule: sort (name, n) by n, drop round(len * 0.1).
        items = [(i, int(pixels[i, c])) for i in range(len(stats)) if pixels[i, c] > 0]
        items = sorted(items, key=lambda t: t[1])
        expected = [i for i, _ in items][round(len(items) * 0.1) :]
        assert pool.tolist() == expected


def test_statistics_save_load_round_trip_and_public_format(tmp_path):
    stats = _stats()
    stats.save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "class_mean_probabilities.npy",
        "class_threshold.npy",
        "sample_class_stats.json",
        "samples_with_class.json",
        "statics_class.npy",
    ]
    import json

    with open(tmp_path / "samples_with_class.json") as f:
        with_class = json.load(f)
    assert sorted(with_class, key=int) == [str(c) for c in range(6)]  # every class present
    back = ClassStatistics.load(tmp_path)
    assert back.names == stats.names
    assert torch.equal(back.sample_class_pixels, stats.sample_class_pixels)
    assert torch.equal(back.class_values, stats.class_values)
    assert torch.equal(back.thresholds, stats.thresholds)
    np.testing.assert_array_equal(np.load(tmp_path / "statics_class.npy"), stats.class_pixels)
    # A public-style folder with only samples_with_class.json (paths as names) still loads.
    (tmp_path / "sample_class_stats.json").unlink()
    public = ClassStatistics.load(tmp_path, num_classes=6)
    present = stats.sample_class_pixels.sum(1) > 0
    assert len(public) == int(present.sum())
    assert torch.equal(public.class_pixels, stats.class_pixels)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"class_mean_probabilities\.npy"):
        ClassStatistics.load(tmp_path)
    np.save(tmp_path / "class_mean_probabilities.npy", np.zeros(4))
    with pytest.raises(FileNotFoundError, match=r"samples_with_class\.json"):
        ClassStatistics.load(tmp_path)
    with pytest.raises(ValueError, match="expected 19"):
        ClassStatistics.load(tmp_path, num_classes=19)


def test_statistics_add_validation_and_merge():
    stats = ClassStatistics(3)
    with pytest.raises(ValueError, match="class_pixels"):
        stats.add(["a"], torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="names"):
        stats.add(["a", "b"], torch.zeros(1, 3, dtype=torch.long))
    stats.add(["a"], torch.tensor([[1, 0, 2]]))
    with pytest.raises(ValueError, match="already"):
        stats.add(["a"], torch.tensor([[1, 0, 2]]))
    other = ClassStatistics(3)
    other.add(["b"], torch.tensor([[0, 5, 0]]))
    merged = ClassStatistics.merge([stats, other])
    assert merged.names == ["a", "b"] and merged.class_pixels.tolist() == [1, 5, 2]
    assert merged.index("b") == 1


# --- donor sampling --------------------------------------------------------------------------


def test_sampler_only_draws_hard_classes_from_their_pools():
    stats = _stats(num_samples=40, num_classes=8, seed=1)
    sampler = DonorSampler(stats, num_hard=4, max_donors=3, drop_fraction=0.1)
    pools = stats.donor_pools(drop_fraction=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        draw = sampler.draw(generator=g)
        assert 1 <= len(draw.donors) <= 3
        for c, d in zip(draw.classes.tolist(), draw.donors.tolist(), strict=True):
            assert sampler.hard_mask[c]
            assert d in pools[c].tolist()


def test_sampler_class_frequencies_follow_probabilities():
    stats = _stats(num_samples=50, num_classes=6, seed=2)
    sampler = DonorSampler(stats, num_hard=3, max_donors=1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    n = 4000
    for _ in range(n):
        counts[int(sampler.draw(generator=g).classes[0])] += 1
    expected = sampler.probabilities.float() * n
    assert torch.all((counts - expected).abs() <= 4 * expected.clamp(min=1).sqrt() + 1)


def test_coverage_loop_stops_as_specified():
    # Four hard classes; each sample contains exactly one class, so one donor covers one class.
    pixels = torch.zeros(8, 5, dtype=torch.long)
    for i in range(8):
        pixels[i, i % 4] = 10
    stats = ClassStatistics(5)
    stats.add([str(i) for i in range(8)], pixels)
    stats.class_values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    # Half of 4 hard classes = 2 → exactly two donors, of two different classes.
    s = DonorSampler(stats, num_hard=4, max_donors=3, min_coverage=0.5, drop_fraction=0.0)
    for _ in range(50):
        d = s.draw(generator=g)
        assert len(d.classes) == 2 and len(set(d.classes.tolist())) == 2
    # Full coverage wanted but only 3 donors allowed → 3 distinct classes.
    s = DonorSampler(stats, num_hard=4, max_donors=3, min_coverage=1.0, drop_fraction=0.0)
    d = s.draw(generator=g)
    assert len(d.classes) == 3 and len(set(d.classes.tolist())) == 3
    # max_donors=1 is the public behaviour.
    s = DonorSampler(stats, num_hard=4, max_donors=1, drop_fraction=0.0)
    assert len(s.draw(generator=g).classes) == 1
    # A donor holding every hard class covers the whole set at once.
    pixels2 = torch.full((3, 5), 10, dtype=torch.long)
    stats2 = ClassStatistics(5)
    stats2.add(["a", "b", "c"], pixels2)
    stats2.class_values = stats.class_values
    s = DonorSampler(stats2, num_hard=4, max_donors=3, min_coverage=1.0, drop_fraction=0.0)
    assert len(s.draw(generator=g).classes) == 1


def test_hard_class_without_donor_is_skipped_and_absent_classes():
    pixels = torch.zeros(4, 5, dtype=torch.long)
    pixels[:, 0] = 5
    pixels[:2, 3] = 7  # class 1 and 2 have no donor, class 4 is declared absent
    pixels[:, 4] = 1
    stats = ClassStatistics(5)
    stats.add(list("abcd"), pixels)
    stats.class_values = torch.tensor([0.9, 0.0, 0.1, 0.2, 0.05], dtype=torch.float64)
    s = DonorSampler(stats, num_hard=3, absent_classes=[4], drop_fraction=0.0)
    assert s.hard_classes.tolist() == [3, 0]
    assert torch.isfinite(s.probabilities).all()
    batch = s.draw_batch(16, generator=torch.Generator().manual_seed(0))
    assert set(batch.classes[batch.classes >= 0].tolist()) <= {0, 3}


def test_sampler_without_any_hard_class_draws_nothing():
    stats = ClassStatistics(3)
    stats.add(["a"], torch.zeros(1, 3, dtype=torch.long))
    s = DonorSampler(stats, num_hard=2)
    assert s.draw().donors.numel() == 0
    assert s.draw_batch(2).donors.eq(-1).all()


def test_sampler_deterministic_per_seed():
    s = DonorSampler(_stats(num_samples=30, seed=3), num_hard=4)
    a = s.draw_batch(8, generator=torch.Generator().manual_seed(5))
    b = s.draw_batch(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.donors, b.donors) and torch.equal(a.classes, b.classes)


# --- paste -----------------------------------------------------------------------------------


def _paste_inputs(device, n=3, d=2, h=12, w=16, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, 3, h, w, generator=g).to(device)
    lab = torch.randint(0, c, (n, h, w), generator=g).to(device)
    lab[:, :2] = 255
    dimg = torch.rand(n, d, 3, h, w, generator=g).to(device)
    dlab = torch.randint(0, c, (n, d, h, w), generator=g).to(device)
    dlab[:, :, -3:] = 255
    hard = torch.tensor([False, True, False, True, True, False], device=device)
    return img, lab, dimg, dlab, hard


def test_paste_exact_against_loop(device):
    img, lab, dimg, dlab, hard = _paste_inputs(device)
    valid = torch.tensor([[True, True], [True, False], [False, False]], device=device)
    out = hard_paste(img, lab, dimg, dlab, hard, valid)
    e_img, e_lab = img.clone(), lab.clone()
    e_pasted = torch.full_like(lab, 255)
    for i in range(img.shape[0]):
        for k in range(dimg.shape[1]):
            if not valid[i, k]:
                continue
            for c in torch.nonzero(hard).flatten().tolist():
                m = dlab[i, k] == c
                e_img[i][:, m] = dimg[i, k][:, m]
                e_lab[i][m] = c
                e_pasted[i][m] = c
    assert torch.equal(out.images, e_img)
    assert torch.equal(out.labels, e_lab)
    assert torch.equal(out.pasted, e_pasted)
    # Nothing outside the pasted pixels changes.
    outside = out.pasted == 255
    assert torch.equal(out.labels[outside], lab[outside])
    assert torch.equal(
        out.images.permute(1, 0, 2, 3)[:, outside], img.permute(1, 0, 2, 3)[:, outside]
    )


def test_paste_resizes_donors_of_another_size(device):
    img, lab, _, _, hard = _paste_inputs(device, h=12, w=16)
    g = torch.Generator().manual_seed(1)
    dimg = torch.rand(3, 1, 3, 6, 8, generator=g).to(device)
    dlab = torch.randint(0, 6, (3, 1, 6, 8), generator=g).to(device)
    out = hard_paste(img, lab, dimg, dlab, hard)
    expected_lab = dlab[:, 0].repeat_interleave(2, 1).repeat_interleave(2, 2)  # nearest ×2
    m = hard[expected_lab]
    assert torch.equal(out.pasted[m], expected_lab[m])
    assert torch.equal(out.labels[~m], lab[~m])
    assert out.images.shape == img.shape


def test_paste_uint8_images_and_module(device):
    img, lab, dimg, dlab, hard = _paste_inputs(device)
    img8 = (img * 255).to(torch.uint8)
    dimg8 = (dimg * 255).to(torch.uint8)
    out = HardAwarePaste(hard).to(device)(img8, lab, dimg8, dlab)
    assert out.images.dtype == torch.uint8
    ref = hard_paste(img8, lab, dimg8, dlab, hard)
    assert torch.equal(out.images, ref.images)


def test_paste_no_hard_class_changes_nothing():
    img, lab, dimg, dlab, hard = _paste_inputs("cpu")
    out = hard_paste(img, lab, dimg, dlab, torch.zeros_like(hard))
    assert torch.equal(out.images, img) and torch.equal(out.labels, lab)
    assert out.pasted.eq(255).all()


def test_paste_validation():
    img, lab, dimg, dlab, hard = _paste_inputs("cpu")
    with pytest.raises(ValueError, match="images"):
        hard_paste(img[0], lab, dimg, dlab, hard)
    with pytest.raises(TypeError, match="labels"):  # a dtype fault: TypeError
        hard_paste(img, lab.float(), dimg, dlab, hard)
    with pytest.raises(TypeError, match="donor_labels"):
        hard_paste(img, lab, dimg, dlab.float(), hard)
    with pytest.raises(ValueError, match="donor_images"):
        hard_paste(img, lab, dimg[:, 0], dlab, hard)
    with pytest.raises(ValueError, match="donor_labels"):
        hard_paste(img, lab, dimg, dlab[:, :1], hard)
    with pytest.raises(TypeError, match="hard_mask"):
        hard_paste(img, lab, dimg, dlab, hard.long())
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        hard_paste(img.numpy(), lab, dimg, dlab, hard)
    bad = dlab.clone()
    bad[0, 0, 0, 0] = 300
    with pytest.raises(ValueError, match="donor_labels"):
        hard_paste(img, lab, dimg, bad, hard)


def test_paste_views_equals_paste_after_shared_geometry(device):
    from uda_selftrain.augment import WeakStrongViews, denormalize, weak_geometry

    img, lab, dimg, dlab, hard = _paste_inputs(device, n=4, d=2, h=32, w=64)
    views = WeakStrongViews((16, 32))
    out = paste_views(
        img, lab, dimg, dlab, hard, views=views, generator=torch.Generator().manual_seed(2)
    )
    crop = out.crop
    _, (ref_lab,) = weak_geometry(img, crop, (16, 32), [lab])
    for k in range(2):
        _, (dl,) = weak_geometry(dimg[:, k], crop, (16, 32), [dlab[:, k]])
        dw, _ = weak_geometry(dimg[:, k], crop, (16, 32))
        m = hard[dl.long().clamp(max=5)] & (dl != 255)
        ref_lab = torch.where(m, dl, ref_lab)
        # Pasted pixels carry the donor's (resized) values in the weak view.
        got = denormalize(out.weak).permute(1, 0, 2, 3)[:, m]
        if k == 1:
            torch.testing.assert_close(got, dw.permute(1, 0, 2, 3)[:, m], atol=1e-5, rtol=0)
    assert torch.equal(out.labels, ref_lab)
    pasted = out.pasted
    assert torch.equal(pasted[pasted != 255], out.labels[pasted != 255])


def test_paste_views_donors_of_another_size():
    from uda_selftrain.augment import WeakStrongViews

    img, lab, _, _, hard = _paste_inputs("cpu", n=2, d=1, h=32, w=64)
    dimg = torch.rand(2, 1, 3, 16, 32)
    dlab = torch.randint(0, 6, (2, 1, 16, 32))
    out = paste_views(img, lab, dimg, dlab, hard, views=WeakStrongViews((8, 16)))
    assert out.weak.shape == (2, 3, 8, 16) and out.pasted.shape == (2, 8, 16)


def test_atomic_files_get_default_permissions(tmp_path):
    import os

    from uda_selftrain.atomic import atomic_save_json

    atomic_save_json(tmp_path / "x.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask
