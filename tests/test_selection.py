from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_impl import NumpyIAS, softmax
from uda_selftrain import (
    ArgmaxSelector,
    CBSTSelector,
    ConstantThresholdSelector,
    InstanceAdaptiveSelector,
    cbst_thresholds,
    confidence_and_prediction,
    ias_update,
    select_with_thresholds,
    value_checks,
)
from uda_selftrain.selection import (
    _confidence_and_prediction_by_class,
    _confidence_and_prediction_reduced,
)


@pytest.mark.parametrize("tag", ["sl", "default"])
def test_golden_ias_stream_per_batch(golden, tag, device):
    alpha, beta, gamma = golden[f"ias_{tag}_params"]
    sel = InstanceAdaptiveSelector(6, alpha=alpha, beta=beta, gamma=gamma, granularity="batch").to(
        device
    )
    for k, logits in enumerate(golden["ias_logits"]):
        out = sel(torch.from_numpy(logits).to(device))
        np.testing.assert_allclose(
            sel.thresholds.cpu().numpy(), golden[f"ias_{tag}_thresholds"][k], atol=2e-3, rtol=0
        )
        np.testing.assert_allclose(
            sel.class_values.cpu().numpy(),
            golden[f"ias_{tag}_class_mean_probs"][k],
            atol=2e-3,
            rtol=0,
        )
        agree = (out.labels.cpu().numpy() == golden[f"ias_{tag}_pseudo_labels"][k]).mean()
        assert agree >= 0.995
        assert out.labels.device.type == device.type


def test_golden_thresholds_much_tighter_than_tolerance(golden):
    # The only difference from the reference is its float16 cast: we are far inside 2e-3.
    sel = InstanceAdaptiveSelector(6, alpha=0.5, granularity="batch")
    for k, logits in enumerate(golden["ias_logits"]):
        sel(torch.from_numpy(logits))
        assert np.abs(sel.thresholds.numpy() - golden["ias_sl_thresholds"][k]).max() < 1e-4


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3),
    c=st.integers(1, 6),
    alpha=st.floats(0.05, 1.0),
    gamma=st.floats(0.0, 10.0),
    granularity=st.sampled_from(["image", "batch"]),
    scale=st.floats(0.5, 8.0),
)
def test_matches_independent_numpy_ias(seed, n, c, alpha, gamma, granularity, scale):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((2, n, c, 5, 7)) * scale).astype(np.float32)
    sel = InstanceAdaptiveSelector(c, alpha=alpha, gamma=gamma, granularity=granularity)
    ref = NumpyIAS(c, alpha, 0.9, gamma)
    for batch in logits:
        out = sel(torch.from_numpy(batch))
        p = softmax(batch.astype(np.float64))
        conf, pred = p.max(1), p.argmax(1)
        if granularity == "batch":
            labels = ref.step(conf, pred)
        else:
            labels = np.stack([ref.step(conf[i], pred[i]) for i in range(n)])
        np.testing.assert_allclose(sel.thresholds.numpy(), ref.th, atol=1e-5)
        np.testing.assert_allclose(sel.class_values.numpy(), ref.v, atol=1e-5)
        # Pixels within float32 rounding of their threshold may flip; everything else must agree.
        close = np.abs(conf - ref.th[pred]) < 1e-5
        assert (out.labels.numpy() == labels)[~close].all()
        assert ((out.labels == 255) | (out.labels == out.prediction)).all()


def test_per_image_is_sequential_per_batch_is_joint():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=gen) * 4
    per_image = InstanceAdaptiveSelector(3, granularity="image")
    per_image(x)
    sequential = InstanceAdaptiveSelector(3, granularity="batch")
    sequential(x[:1])
    sequential(x[1:])
    torch.testing.assert_close(per_image.thresholds, sequential.thresholds)
    assert int(per_image.num_instances) == 2
    joint = InstanceAdaptiveSelector(3, granularity="batch")
    joint(x)
    assert int(joint.num_instances) == 1


def test_absent_class_keeps_threshold_and_unseen_value():
    logits = torch.zeros(1, 4, 5, 5)
    logits[:, 0] = 5.0  # only class 0 is ever predicted
    sel = InstanceAdaptiveSelector(4)
    sel(logits)
    assert torch.equal(sel.thresholds[1:], torch.full((3,), 0.9))
    assert torch.equal(sel.class_values[1:], torch.zeros(3))
    assert not sel.class_seen[1:].any() and sel.class_seen[0]
    assert sel.class_pixels[0] > 0 and (sel.class_pixels[1:] == 0).all()


def test_threshold_clamped_below_one():
    logits = torch.zeros(1, 2, 8, 8)
    logits[:, 0] = 60.0  # confidence exactly 1.0 in float32
    sel = InstanceAdaptiveSelector(2, init_threshold=1.0, beta=0.0)
    sel(logits)
    assert sel.thresholds[0].item() == pytest.approx(0.999)


def test_probability_input_equals_logit_input():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 9, generator=gen) * 3
    a = InstanceAdaptiveSelector(5)
    b = InstanceAdaptiveSelector(5)
    out_a = a(x)
    out_b = b(x.softmax(1), probabilities=True)
    torch.testing.assert_close(a.thresholds, b.thresholds, atol=1e-6, rtol=0)
    assert (out_a.labels == out_b.labels).float().mean() > 0.99


def test_autocast_and_half_inputs():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen) * 3
    ref = InstanceAdaptiveSelector(4)
    ref(x)
    half = InstanceAdaptiveSelector(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = half(x.bfloat16())
    assert out.confidence.dtype == torch.float32
    torch.testing.assert_close(half.thresholds, ref.thresholds, atol=2e-2, rtol=0)


def test_state_dict_round_trip_and_determinism():
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 3, 7, 7, generator=gen) * 3 for _ in range(4)]
    a = InstanceAdaptiveSelector(3)
    for b in batches[:2]:
        a(b)
    b_sel = InstanceAdaptiveSelector(3)
    b_sel.load_state_dict(a.state_dict())
    outs_a = [a(b).labels for b in batches[2:]]
    outs_b = [b_sel(b).labels for b in batches[2:]]
    for x, y in zip(outs_a, outs_b, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.thresholds, b_sel.thresholds)
    assert set(a.state_dict()) == {
        "thresholds",
        "class_values",
        "class_seen",
        "class_pixels",
        "num_instances",
    }
    a.reset()
    assert torch.equal(a.thresholds, torch.full((3,), 0.9)) and int(a.num_instances) == 0


def test_class_pixels_per_image():
    gen = torch.Generator().manual_seed(6)
    out = InstanceAdaptiveSelector(3)(torch.randn(2, 3, 6, 6, generator=gen) * 5)
    for i in range(2):
        expected = torch.bincount(out.labels[i][out.labels[i] != 255], minlength=3)
        assert torch.equal(out.class_pixels[i], expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"gamma": -1.0}, "gamma"),
        ({"granularity": "pixel"}, "granularity"),
        ({"init_threshold": 2.0}, "init_threshold"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InstanceAdaptiveSelector(3, **kwargs)


def test_bad_inputs():
    sel = InstanceAdaptiveSelector(3)
    with pytest.raises(ValueError, match=r"4 dimensions"):
        sel(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="3 classes"):
        sel(torch.zeros(1, 4, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        sel(torch.zeros(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        sel(np.zeros((1, 3, 4, 4), np.float32))
    bad = torch.zeros(1, 3, 4, 4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sel(bad)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sel(bad)
    with value_checks(False):  # the caller may skip the host-syncing value check
        sel(torch.zeros(1, 3, 4, 4))


def test_constant_and_argmax_baselines():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 6, 6, generator=gen) * 3
    p = x.softmax(1)
    conf, pred = p.max(1)
    ct = ConstantThresholdSelector(4, threshold=0.9)(x)
    assert torch.equal(ct.labels, torch.where(conf >= 0.9, pred, 255))
    am = ArgmaxSelector(4)(x)
    assert torch.equal(am.labels, pred)
    with pytest.raises(ValueError, match="threshold"):
        ConstantThresholdSelector(4, threshold=1.5)


def test_cbst_matches_numpy_percentile_within_bin_width():
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randn(2, 3, 16, 16, generator=gen) * 3 for _ in range(3)]
    sel = CBSTSelector(3, proportion=0.2, bins=4096)
    with pytest.raises(RuntimeError, match="fit"):
        sel(batches[0])
    for b in batches:
        sel.observe(b)
    th = sel.fit()
    conf = torch.cat([confidence_and_prediction(b)[0].reshape(-1) for b in batches]).numpy()
    pred = torch.cat([confidence_and_prediction(b)[1].reshape(-1) for b in batches]).numpy()
    for c in range(3):
        exact = np.quantile(conf[pred == c], 0.8)
        assert exact - 1 / 4096 <= th[c].item() <= exact + 1e-7
        assert (conf[pred == c] >= th[c].item()).mean() >= 0.2
    out = sel(batches[0])
    assert ((out.labels == 255) | (out.labels == out.prediction)).all()


def test_cbst_unseen_class_threshold_is_one():
    h = torch.zeros(2, 10, dtype=torch.long)
    h[0, 3] = 5
    assert cbst_thresholds(h, proportion=0.5)[1].item() == 1.0


def test_select_with_thresholds_and_ias_update_functional(device):
    conf = torch.tensor([0.99, 0.97, 0.95, 0.6], device=device)
    pred = torch.tensor([0, 0, 0, 1], device=device)
    th = ias_update(conf, pred, torch.full((2,), 0.9, device=device))
    assert th.device.type == device.type
    ref = NumpyIAS(2, 0.5, 0.9, 8.0)
    ref.step(conf.cpu().double().numpy(), pred.cpu().numpy())
    np.testing.assert_allclose(th.cpu().numpy(), ref.th, atol=1e-6)
    lab = select_with_thresholds(conf, pred, th)
    assert lab.tolist() == [0, 0, 0, 255]  # θ = (0.9077, 0.8935)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 19, 64, 96, generator=gen) * 4
    cpu = InstanceAdaptiveSelector(19)
    gpu = InstanceAdaptiveSelector(19).cuda()
    a, b = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(gpu.thresholds.cpu(), cpu.thresholds, atol=1e-6, rtol=0)
    assert (a.labels == b.labels.cpu()).float().mean() > 0.999


def test_select_from_confidence_matches_forward_and_validates():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 6, 6, generator=gen) * 3
    a, b = InstanceAdaptiveSelector(4), InstanceAdaptiveSelector(4)
    conf, pred = confidence_and_prediction(x)
    assert torch.equal(a(x).labels, b.select_from_confidence(conf, pred).labels)
    with pytest.raises(ValueError, match="prediction values"):
        b.select_from_confidence(conf, torch.full_like(pred, 4))
    with pytest.raises(ValueError, match="shape"):
        b.select_from_confidence(conf, pred[:1])
    with pytest.raises(TypeError, match="integer"):
        b.select_from_confidence(conf, pred.float())
    with pytest.raises(ValueError, match="NaN or Inf"):
        b.select_from_confidence(torch.full_like(conf, float("nan")), pred)
    with pytest.raises(ValueError, match="NaN or Inf"):
        b(torch.full((1, 4, 2, 2), 2.0), probabilities=True)  # probabilities above 1


def test_scratch_is_reused_and_never_aliases_outputs():
    gen = torch.Generator().manual_seed(11)
    sel = InstanceAdaptiveSelector(5, granularity="batch")
    x1, x2 = (torch.randn(2, 5, 16, 24, generator=gen) * 4 for _ in range(2))
    first = sel(x1)
    kept = [t.clone() for t in first]
    pointers = {k: b.data_ptr() for k, b in sel._scratch._buffers.items()}
    held = sel._scratch.nbytes
    assert held > 0
    second = sel(x2)
    # The second call reuses the same memory and leaves the first call's outputs untouched.
    assert {k: b.data_ptr() for k, b in sel._scratch._buffers.items()} == pointers
    assert sel._scratch.nbytes == held
    for a, b in zip(first, kept, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.labels, second.labels)
    sel.release_scratch()
    assert sel._scratch.nbytes == 0
    # Copies and pickles start empty; the scratch is never part of the state.
    assert copy.deepcopy(sel)._scratch.nbytes == 0
    sel(x1)
    assert pickle.loads(pickle.dumps(sel))._scratch.nbytes == 0
    assert all("scratch" not in k for k in sel.state_dict())


def test_fresh_selector_on_other_sizes_matches_functional_path():
    # The scratch grows and shrinks its views with the instance size; results equal the
    # allocation-per-call functional path.
    gen = torch.Generator().manual_seed(12)
    sel = InstanceAdaptiveSelector(4, granularity="batch")
    th = torch.full((4,), 0.9)
    for shape in [(2, 4, 32, 32), (1, 4, 3, 5), (3, 4, 40, 8)]:
        x = torch.randn(*shape, generator=gen) * 4
        out = sel(x)
        conf, pred = confidence_and_prediction(x)
        th = ias_update(conf, pred, th)
        torch.testing.assert_close(sel.thresholds, th, rtol=0, atol=0)
        assert torch.equal(out.labels, select_with_thresholds(conf, pred, th))


@pytest.mark.parametrize(
    "shape",
    [(2, 64, 64), (1, 512, 1024), (1, 3, 4099), (2, 1, 40961), (1, 1, 1), (3, 0, 5)],
    ids=["lanes-1024", "large", "odd-small", "odd-large-float64", "one-pixel", "empty"],
)
def test_selection_statistics_accurate_for_every_lane_layout(shape, device):
    from uda_selftrain.selection import _select_and_count

    gen = torch.Generator().manual_seed(13)
    c = 7
    pred = torch.randint(0, c, shape, generator=gen)
    # Confidences close to 1, in long runs of one class: the worst case for float32 sums.
    conf = 1.0 - torch.rand(shape, generator=gen) * 0.05
    th = torch.rand(c, generator=gen) * 0.05 + 0.95
    labels = torch.empty_like(pred, device=device)
    counts, sums = _select_and_count(
        conf.to(device),
        pred.to(device),
        pred.reshape(-1).to(device, torch.int32),
        th.to(device),
        c,
        255,
        labels,
    )
    keep = conf >= th[pred]
    assert torch.equal(labels.cpu(), torch.where(keep, pred, 255))
    k = shape[0]
    conf64, onehot = conf.double().reshape(k, -1), torch.nn.functional.one_hot(pred, c)
    sel = (onehot * keep[..., None]).reshape(k, -1, c)
    assert torch.equal(counts.cpu(), sel.sum(1))
    expected = (sel.double() * conf64[..., None]).sum(1)
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums.cpu(), expected, rtol=3e-7, atol=1e-9)


@pytest.mark.parametrize("num_classes", [1, 2, 19, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_confidence_and_prediction_matches_softmax_max(num_classes, dtype, device):
    gen = torch.Generator().manual_seed(14)
    logits = (torch.randn(2, num_classes, 5, 6, generator=gen) * 4).to(dtype)
    # Ties: equal maxima in classes 0 and 1 of one pixel, and in every class of another.
    if num_classes > 1:
        logits[0, :2, 0, 0] = 50.0
        logits[1, :, 2, 3] = 1.0
    for probabilities in (False, True):
        scores = logits.float().softmax(1).to(dtype) if probabilities else logits
        conf, pred = confidence_and_prediction(scores.to(device), probabilities=probabilities)
        assert conf.dtype == torch.float32 and pred.dtype == torch.int64
        assert conf.device.type == device.type and pred.shape == (2, 5, 6)
        top, expected = scores.float().max(1)  # first maximal class on ties
        assert torch.equal(pred.cpu(), expected)
        reference = top if probabilities else scores.double().softmax(1).amax(1).float()
        torch.testing.assert_close(conf.cpu(), reference, rtol=0, atol=1e-6)
    if num_classes > 1:
        assert pred[0, 0, 0] == 0 and pred[1, 2, 3] == 0
    # The CPU (plane-wise) and GPU (fused reduction) forms agree on any device.
    for probabilities in (False, True):
        scores = logits.float().softmax(1).to(dtype) if probabilities else logits
        a = _confidence_and_prediction_by_class(scores, probabilities)
        b = _confidence_and_prediction_reduced(scores, probabilities)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=2e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_confidence_and_prediction_rejects_non_finite_scores(bad):
    x = torch.zeros(1, 3, 2, 2)
    x[0, 1, 1, 0] = bad
    if bad == float("-inf"):
        # A masked class (−inf logit) is a valid input: its probability is 0.
        conf, pred = confidence_and_prediction(x)
        assert conf[0, 1, 0].item() == pytest.approx(0.5) and pred[0, 1, 0].item() == 0
    else:
        with pytest.raises(ValueError, match="NaN or Inf"):
            confidence_and_prediction(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        confidence_and_prediction(torch.full((1, 3, 2, 2), bad))
