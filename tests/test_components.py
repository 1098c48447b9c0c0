"""The four named components and their functional twins: values, composition, state, contracts."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import uda_selftrain as ust
from uda_selftrain.class_statistics import ClassStatistics

# --------------------------------------------------------------------------------------------
# RegionAdaptiveLoss / ConsistencyLoss / HIASTLoss
# --------------------------------------------------------------------------------------------


def test_region_adaptive_loss_golden(golden, golden_loss_inputs):
    x, _, y = golden_loss_inputs()
    out = ust.RegionAdaptiveLoss()(x, y)
    fn = ust.region_adaptive_loss(x, y)
    np.testing.assert_allclose(out.smoothing.item(), golden["loss_kld_confident"], rtol=1e-5)
    np.testing.assert_allclose(out.entropy.item(), golden["loss_entropy_ignored"], rtol=1e-5)
    expected = 0.1 * golden["loss_kld_confident"] + 1.0 * golden["loss_entropy_ignored"]
    np.testing.assert_allclose(out.total.item(), expected, rtol=1e-5)
    assert torch.equal(out.total, fn.total)


@pytest.mark.parametrize("region", ["ignored", "confident", "all"])
def test_consistency_loss_module_golden(golden, golden_loss_inputs, region):
    x, t, y = golden_loss_inputs()
    value = ust.ConsistencyLoss(region=region)(x, y, t)
    np.testing.assert_allclose(value.item(), golden[f"loss_consistency_softce_{region}"], rtol=1e-5)
    assert torch.equal(value, ust.consistency_loss(x, y, t, region=region))


@pytest.mark.parametrize("normalization", ["reference", "pixel"])
@pytest.mark.parametrize("region", ["ignored", "all"])
def test_hiast_loss_is_the_sum_of_its_parts(device, normalization, region):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 9, 11, generator=gen).to(device)
    t = torch.randn(3, 6, 9, 11, generator=gen).to(device)
    y = torch.randint(0, 6, (3, 9, 11), generator=gen).to(device)
    y[:, :4] = 255
    weights = {"ce_weight": 0.7, "smoothing_weight": 0.2, "entropy_weight": 1.3}
    fused = ust.HIASTLoss(
        **weights, consistency_weight=0.4, consistency_region=region, normalization=normalization
    )
    xa = x.clone().requires_grad_(True)
    out = fused(xa, y, t)
    out.total.backward()
    xb = x.clone().requires_grad_(True)
    parts = (
        0.7 * ust.pseudo_label_ce(xb, y)
        + fused.regularisation(xb, y).total
        + 0.4 * fused.consistency(xb, y, t)
    )
    parts.backward()
    torch.testing.assert_close(out.total, parts, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-7)
    assert fused.regularisation.smoothing_weight == 0.2
    assert fused.consistency.region == region


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
@pytest.mark.parametrize(
    "name", ["ce_weight", "smoothing_weight", "entropy_weight", "consistency_weight"]
)
def test_loss_weights_are_validated(name, bad):
    with pytest.raises(ValueError, match=name):
        ust.HIASTLoss(**{name: bad})
    x, y = torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=name):
        ust.hiast_loss(x, y, **{name: bad})
    if name in ("smoothing_weight", "entropy_weight"):
        with pytest.raises(ValueError, match=name):
            ust.RegionAdaptiveLoss(**{name: bad})
        with pytest.raises(ValueError, match=name):
            ust.region_adaptive_loss(x, y, **{name: bad})
    with pytest.raises(TypeError, match=name):
        ust.HIASTLoss(**{name: "0.5"})


def test_region_adaptive_empty_regions_and_validation():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    all_ignored = torch.full((2, 3, 3), 255)
    out = ust.region_adaptive_loss(x, all_ignored)
    assert out.smoothing.item() == 0.0 and out.entropy.item() > 0
    out = ust.region_adaptive_loss(x, torch.zeros(2, 3, 3, dtype=torch.long))
    assert out.entropy.item() == 0.0
    out.total.backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="region"):
        ust.ConsistencyLoss(region="everywhere")
    with pytest.raises(ValueError, match="teacher_logits"):
        ust.ConsistencyLoss()(x, all_ignored, torch.zeros(2, 4, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        ust.region_adaptive_loss(torch.full((1, 2, 1, 1), float("nan")), all_ignored[:1, :1, :1])
    with pytest.raises(TypeError, match="labels"):
        ust.region_adaptive_loss(x, all_ignored.float())


# --------------------------------------------------------------------------------------------
# HardAwareAugmenter / hard_aware_augment
# --------------------------------------------------------------------------------------------


def _stats_and_data(n=6, c=5, h=24, w=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    labels[:, : h // 3] = 255
    stats = ClassStatistics(c)
    counts = torch.stack([torch.bincount(lab[lab != 255], minlength=c) for lab in labels])
    stats.add([f"{i}.png" for i in range(n)], counts)
    stats.class_values = torch.tensor([0.95, 0.5, 0.8, 0.3, 0.9], dtype=torch.float64)
    return stats, images, labels


def test_augmenter_update_from_statistics_selector_and_tensor():
    stats, _, _ = _stats_and_data()
    aug = ust.HardAwareAugmenter(5, (12, 24), num_hard=2)
    assert aug.update(stats).tolist() == [3, 1]
    assert aug.hard_mask.tolist() == [False, True, False, True, False]
    expected = ust.class_difficulty(stats.class_values, num_hard=2).probabilities
    torch.testing.assert_close(aug.probabilities, expected)
    selector = ust.InstanceAdaptiveSelector(5)
    selector.class_values.copy_(torch.tensor([0.1, 0.9, 0.9, 0.9, 0.2]))
    assert aug.update(selector).tolist() == [0, 4]
    assert aug.update(torch.tensor([0.9, 0.9, 0.1, 0.9, 0.2])).tolist() == [2, 4]
    # The state travels with state_dict.
    other = ust.HardAwareAugmenter(5, (12, 24), num_hard=2)
    other.load_state_dict(aug.state_dict())
    assert other.hard_classes.tolist() == [2, 4] and bool(other.fitted)


def test_augmenter_default_num_hard_scales_with_classes_and_is_checked():
    assert ust.HardAwareAugmenter(19, (8, 16)).num_hard == 14
    assert ust.HardAwareAugmenter(11, (8, 16)).num_hard == 8
    with pytest.raises(ValueError, match="num_hard"):
        ust.HardAwareAugmenter(11, (8, 16), num_hard=14)
    with pytest.raises(ValueError, match="absent_classes"):
        ust.HardAwareAugmenter(3, (8, 16), absent_classes=(3,))


def test_augmenter_refuses_statistics_without_class_values():
    stats, _, _ = _stats_and_data()
    stats.class_values = torch.zeros(5, dtype=torch.float64)  # forgot to set them
    aug = ust.HardAwareAugmenter(5, (12, 24), num_hard=2)
    with pytest.raises(ValueError, match="class_values"):
        aug.update(stats)
    with pytest.raises(ValueError, match="class_values"):
        aug.update(torch.tensor([0.5, float("nan"), 0.5, 0.5, 0.5]))
    with pytest.raises(TypeError, match="source"):
        aug.update([0.5] * 5)
    with pytest.raises(RuntimeError, match="update"):
        aug(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long))


def test_augmenter_forward_equals_functional_and_is_deterministic():
    stats, images, labels = _stats_and_data()
    aug = ust.HardAwareAugmenter(5, (12, 24), num_hard=2)
    aug.update(stats)
    sampler = aug.donor_sampler(stats)
    assert torch.equal(sampler.hard_mask, aug.hard_mask)
    draws = sampler.draw_batch(4, generator=torch.Generator().manual_seed(1))
    donors = draws.donors.clamp(min=0)
    args = (images[:4], labels[:4], images[donors], labels[donors], draws.donors >= 0)
    a = aug(*args, generator=torch.Generator().manual_seed(5))
    b = ust.hard_aware_augment(
        args[0],
        args[1],
        aug.hard_mask,
        *args[2:],
        views=aug.views,
        generator=torch.Generator().manual_seed(5),
    )
    c = aug(*args, generator=torch.Generator().manual_seed(5))
    for x, y, z in zip(a[:4], b[:4], c[:4], strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    # Pasted pixels carry hard classes only, and the labels agree with them there.
    pasted = a.pasted != 255
    assert set(a.pasted[pasted].unique().tolist()) <= {1, 3}
    assert torch.equal(a.labels[pasted], a.pasted[pasted])
    assert a.weak.shape == (4, 3, 12, 24) and a.labels.shape == (4, 12, 24)


def test_padding_slots_paste_nothing():
    stats, images, labels = _stats_and_data()
    aug = ust.HardAwareAugmenter(5, (12, 24), num_hard=2)
    aug.update(stats)
    donors = torch.zeros(2, 1, dtype=torch.long)
    out = aug(
        images[:2],
        labels[:2],
        images[donors],
        labels[donors],
        torch.zeros(2, 1, dtype=torch.bool),
        generator=torch.Generator().manual_seed(0),
    )
    assert out.pasted.eq(255).all()


def test_batch_donors_is_a_derangement_and_a_batch_of_one_pastes_nothing():
    gen = torch.Generator().manual_seed(0)
    img = torch.arange(7.0).view(7, 1, 1, 1).expand(7, 3, 4, 8).contiguous() / 7
    lab = torch.arange(7).view(7, 1, 1).expand(7, 4, 8).contiguous()
    d_img, d_lab, valid = ust.batch_donors(img, lab, generator=gen)
    source = d_lab[:, 0, 0, 0]
    assert sorted(source.tolist()) == list(range(7))
    assert (source != torch.arange(7)).all() and valid.all()
    torch.testing.assert_close(d_img[:, 0, 0, 0, 0], source.float() / 7)
    aug = ust.HardAwareAugmenter(7, (4, 8), num_hard=7)
    aug.update(torch.full((7,), 0.5))
    out = aug(img[:1], lab[:1], generator=gen)
    assert out.pasted.eq(255).all()


def test_augmenter_validates_images_and_donors():
    stats, images, labels = _stats_and_data()
    aug = ust.HardAwareAugmenter(5, (12, 24), num_hard=2)
    aug.update(stats)
    float255 = images.float()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        aug(float255, labels)
    donors = images[:, None]
    with pytest.raises(TypeError, match="dtype"):
        aug(images.float() / 255, labels, donors, labels[:, None])
    with pytest.raises(ValueError, match="labels"):
        aug(images, torch.full_like(labels, 7))
    with pytest.raises(ValueError, match="together"):
        aug(images, labels, donors)


def test_views_normalisation_is_configurable():
    img = torch.rand(2, 3, 16, 32)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = ust.WeakStrongViews((8, 16), mean=None, std=None)(img, generator=gen())
    default = ust.WeakStrongViews((8, 16))(img, generator=gen())
    assert plain.weak.min() >= 0 and plain.weak.max() <= 1
    torch.testing.assert_close(ust.normalize(plain.weak), default.weak, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mean and std"):
        ust.WeakStrongViews((8, 16), mean=None)
    with pytest.raises(ValueError, match="std"):
        ust.WeakStrongViews((8, 16), std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ust.WeakStrongViews((8, 16))(img * 255)


# --------------------------------------------------------------------------------------------
# One Selector interface
# --------------------------------------------------------------------------------------------


def _independent_class_values(batches, labels_of, num_classes, momentum=0.99):
    values = np.zeros(num_classes)
    seen = np.zeros(num_classes, dtype=bool)
    for scores in batches:
        conf = scores.softmax(1).max(1).values.double().numpy()
        for lab, cf in zip(labels_of(scores).numpy(), conf, strict=True):
            for c in range(num_classes):
                m = lab == c
                if m.any():
                    mean = cf[m].mean()
                    values[c] = momentum * values[c] + (1 - momentum) * mean if seen[c] else mean
                    seen[c] = True
    return values


@pytest.mark.parametrize("kind", ["ias", "constant", "argmax", "cbst"])
def test_every_selector_implements_the_protocol_and_tracks_class_values(kind):
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 4, 8, 8, generator=gen) * 4 for _ in range(3)]
    selector = {
        "ias": lambda: ust.InstanceAdaptiveSelector(4),
        "constant": lambda: ust.ConstantThresholdSelector(4, threshold=0.8),
        "argmax": lambda: ust.ArgmaxSelector(4),
        "cbst": lambda: ust.CBSTSelector(4, bins=512),
    }[kind]()
    assert isinstance(selector, ust.Selector)
    if kind == "cbst":
        for b in batches:
            selector.observe(b)
        selector.fit()
    labels = [selector(b).labels for b in batches]
    assert selector.thresholds.shape == (4,) and selector.class_values.shape == (4,)
    it = iter(labels)
    expected = _independent_class_values(batches, lambda _: next(it), 4)
    np.testing.assert_allclose(selector.class_values.numpy(), expected, rtol=1e-5)
    assert int(selector.class_pixels.sum()) == sum(int((lab != 255).sum()) for lab in labels)
    # online_targets takes any selector
    t = ust.online_targets(batches[0], selector=selector)
    assert t.labels.shape == (2, 8, 8)
    selector.reset()
    assert selector.class_values.eq(0).all() and selector.num_instances.item() == 0


def test_online_targets_rejects_non_selectors_and_nan():
    with pytest.raises(TypeError, match="Selector"):
        ust.online_targets(torch.randn(1, 3, 4, 4), selector=torch.nn.Identity())
    with pytest.raises(ValueError, match="NaN"):
        ust.online_targets(torch.full((1, 3, 4, 4), float("nan")))


def test_selectors_catch_probabilities_passed_as_logits_and_the_reverse():
    scores = torch.randn(1, 5, 32, 32) * 3
    for selector in (ust.InstanceAdaptiveSelector(5), ust.ConstantThresholdSelector(5)):
        with pytest.raises(ValueError, match="probabilities=True"):
            selector(scores.softmax(1))
        with pytest.raises(ValueError, match="not probabilities"):
            selector(scores, probabilities=True)
        with pytest.raises(ValueError, match="not probabilities"):
            selector(scores.softmax(1) * 0.9, probabilities=True)
        selector(scores.softmax(1), probabilities=True)  # both right: fine


def test_ias_update_and_select_with_thresholds_validate():
    conf = torch.rand(10, generator=torch.Generator().manual_seed(0))
    pred = torch.arange(10) % 3  # holds class 0, so pred - 1 holds -1 (unseeded draws did not)
    th = torch.full((3,), 0.9)
    for kwargs, match in (
        ({"alpha": 5.0}, "alpha"),
        ({"beta": 1.5}, "beta"),
        ({"gamma": -2.0}, "gamma"),
    ):
        with pytest.raises(ValueError, match=match):
            ust.ias_update(conf, pred, th, **kwargs)
    with pytest.raises(ValueError, match="confidence"):
        ust.ias_update(conf + 0.8, pred, th)
    with pytest.raises(ValueError, match="confidence"):
        ust.ias_update(torch.full((10,), float("nan")), pred, th)
    with pytest.raises(TypeError, match="confidence"):
        ust.ias_update(torch.ones(10, dtype=torch.long), pred, th)
    with pytest.raises(ValueError, match="prediction"):
        ust.ias_update(conf, pred - 1, th)
    with pytest.raises(ValueError, match="prediction"):
        ust.select_with_thresholds(conf, pred + 3, th)
    with pytest.raises(ValueError, match="thresholds"):
        ust.select_with_thresholds(conf, pred, th * 2)
    with pytest.raises(ValueError, match="ignore_index"):
        ust.InstanceAdaptiveSelector(3, ignore_index=1)


# --------------------------------------------------------------------------------------------
# Metrics: out-of-range predictions
# --------------------------------------------------------------------------------------------


def test_confusion_matrix_never_clamps_predictions():
    target = torch.full((2, 4, 4), 18)
    prediction = torch.full((2, 4, 4), 255)
    with pytest.raises(ValueError, match="255"):
        ust.confusion_matrix(prediction, target, 19)
    with pytest.raises(ValueError, match="-1"):
        ust.confusion_matrix(torch.full_like(target, -1), target, 19)
    cm = ust.confusion_matrix(prediction, target, 19, out_of_range="wrong")
    assert cm.shape == (19, 20) and cm[18, 19] == 32
    assert ust.iou_from_confusion(cm)[18].item() == 0.0
    assert ust.pixel_accuracy(cm).item() == 0.0
    # Half right, half unselected: accuracy 0.5, IoU of class 18 is 0.5 (misses count).
    prediction[0] = 18
    cm = ust.confusion_matrix(prediction, target, 19, out_of_range="wrong")
    assert ust.pixel_accuracy(cm).item() == 0.5
    assert ust.protocol_scores(cm, "cityscapes19").iou[18] == 0.5
    meter = ust.ConfusionMatrix(19, out_of_range="wrong")
    meter.update(prediction, target)
    assert meter.scores("cityscapes19").iou[18] == 0.5
    with pytest.raises(ValueError, match="unknown protocol"):
        ust.protocol_scores(cm, "cityscape19")


# --------------------------------------------------------------------------------------------
# Value checks: scoped and thread-local
# --------------------------------------------------------------------------------------------


def test_value_checks_context_is_thread_local():
    from uda_selftrain._checks import value_checks_enabled

    seen: dict[str, bool] = {}
    barrier = threading.Barrier(2)

    def other_thread():
        barrier.wait()
        seen["other"] = value_checks_enabled()
        barrier.wait()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with ust.value_checks(False):
        barrier.wait()
        barrier.wait()
        seen["inside"] = value_checks_enabled()
        with ust.value_checks(True):
            seen["nested"] = value_checks_enabled()
    thread.join()
    assert seen == {"other": True, "inside": False, "nested": True}
    assert value_checks_enabled()
    nan = torch.full((1, 2, 1, 1), float("nan"))
    y = torch.zeros(1, 1, 1, dtype=torch.long)
    with ust.value_checks(False):
        ust.pseudo_label_ce(nan, y)  # no check, no error
    with pytest.raises(ValueError, match="NaN"):
        ust.pseudo_label_ce(nan, y)


@pytest.mark.parametrize("kind", ["ias", "constant", "argmax", "cbst"])
def test_selectors_name_a_device_mismatch(kind):
    # The module's state stays where it was made; scores elsewhere get a clear error, not a
    # device mismatch deep inside the update ("meta" stands in for an accelerator).
    selector = {
        "ias": lambda: ust.InstanceAdaptiveSelector(4),
        "constant": lambda: ust.ConstantThresholdSelector(4),
        "argmax": lambda: ust.ArgmaxSelector(4),
        "cbst": lambda: ust.CBSTSelector(4),
    }[kind]().to("meta")
    with pytest.raises(ValueError, match=r"move the module with \.to\('cpu'\)"):
        if kind == "cbst":
            selector.observe(torch.randn(1, 4, 8, 8))
        else:
            selector(torch.randn(1, 4, 8, 8))


def test_augmenter_paste_alone_is_hard_paste_with_its_hard_set():
    """HardAwareAugmenter.paste: the paste without the views (for loops that mix with ClassMix),
    with explicit donors and with batch donors, and only once the hard set is known."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 8, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (3, 8, 16), generator=g)
    aug = ust.HardAwareAugmenter(5, (4, 8), num_hard=2)
    with pytest.raises(RuntimeError):
        aug.paste(images, labels)
    aug.update(torch.tensor([0.9, 0.2, 0.8, 0.3, 0.7]))
    donors_i, donors_l = images.roll(1, 0).unsqueeze(1), labels.roll(1, 0).unsqueeze(1)
    out = aug.paste(images, labels, donors_i, donors_l)
    ref = ust.hard_paste(images, labels, donors_i, donors_l, aug.hard_mask)
    assert torch.equal(out.images, ref.images) and torch.equal(out.labels, ref.labels)
    assert out.images.shape == images.shape  # the input size: no views
    assert set(out.pasted.unique().tolist()) <= {1, 3, 255}  # only the hard classes move
    a = aug.paste(images, labels, generator=torch.Generator().manual_seed(4))
    b = aug.paste(images, labels, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.pasted, b.pasted)
    with pytest.raises(ValueError, match="donor_valid"):
        aug.paste(images, labels, donor_valid=torch.ones(3, 1, dtype=torch.bool))
