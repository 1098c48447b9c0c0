"""Pseudo-label selectors: the Instance Adaptive Selector (IAS) of IAST/HIAST and the baselines.

Every selector turns the segmentation network's scores on target images into pseudo-labels
``(N, H, W)`` int64 with ``ignore_index`` (255) where a pixel is not selected.

* :class:`InstanceAdaptiveSelector` / :func:`ias_update` and :func:`select_with_thresholds` —
  per-class thresholds updated instance by instance (HIAST §3.2, IAST Eq. 4–6; method §2).
* :class:`ConstantThresholdSelector` / :func:`select_constant` — one threshold for every class.
* :class:`ArgmaxSelector` / :func:`select_argmax` — no threshold.
* :class:`CBSTSelector` — one threshold per class fitted over the whole target set, keeping the top
  ``proportion`` of each class's confidences (Zou et al., ECCV 2018).

Scores are logits by default; pass ``probabilities=True`` when they are already softmax outputs.
Confidences are computed in float32 whatever the input dtype, so selectors work under autocast.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from ._checks import (
    check_finite,
    check_float,
    check_ignore_index,
    check_positive_int,
    check_tensor,
    check_unit_interval,
    value_checks_enabled,
)
from ._histogram import count, weighted_sum
from ._scratch import Scratch
from .distributed import all_reduce_max, all_reduce_sum, is_distributed
from .quantiles import _grouped_quantile

__all__ = [
    "ArgmaxSelector",
    "CBSTSelector",
    "ConstantThresholdSelector",
    "InstanceAdaptiveSelector",
    "Selection",
    "Selector",
    "cbst_thresholds",
    "confidence_and_prediction",
    "ias_update",
    "select_argmax",
    "select_constant",
    "select_with_thresholds",
    "selected_class_statistics",
]

Granularity = Literal["image", "batch"]


class Selection(NamedTuple):
    """Output of a selector.

    Attributes:
        labels: ``(N, H, W)`` int64 pseudo-labels, ``ignore_index`` where not selected.
        confidence: ``(N, H, W)`` float32 maximum class probability of every pixel.
        prediction: ``(N, H, W)`` int64 arg-max class of every pixel (before selection).
        class_pixels: ``(N, C)`` int64 number of selected pixels of each class in each image
            (the per-image statistics that hard-aware copy-paste needs for its donor pools).
    """

    labels: torch.Tensor
    confidence: torch.Tensor
    prediction: torch.Tensor
    class_pixels: torch.Tensor


def _check_scores(scores: object, num_classes: int | None = None) -> torch.Tensor:
    s = check_float("scores", scores, ndim=4, shape_hint="(N, C, H, W)")
    if num_classes is not None and s.shape[1] != num_classes:
        raise ValueError(
            f"scores must have {num_classes} classes on dim 1 (N, C, H, W), got shape {tuple(s.shape)}"
        )
    if s.shape[1] < 1:
        raise ValueError(
            f"scores must have at least one class on dim 1, got shape {tuple(s.shape)}"
        )
    return s


def _check_prediction(
    name: str, prediction: object, shape: torch.Size, num_classes: int, device: torch.device
) -> torch.Tensor:
    pred = check_tensor(name, prediction)
    if pred.is_floating_point() or pred.is_complex() or pred.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {pred.dtype}")
    if pred.shape != shape:
        raise ValueError(
            f"{name} must have the confidence's shape {tuple(shape)}, got {tuple(pred.shape)}"
        )
    if pred.device != device:
        raise ValueError(f"{name} must be on the confidence's device {device}, got {pred.device}")
    if value_checks_enabled() and pred.numel():
        lo, hi = (int(v) for v in torch.aminmax(pred))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} values must lie in [0, {num_classes}), got [{lo}, {hi}]")
    return pred


def _check_thresholds(thresholds: object, num_classes: int | None = None) -> torch.Tensor:
    th = check_float("thresholds", thresholds, ndim=1, shape_hint="(C,)")
    if num_classes is not None and th.shape[0] != num_classes:
        raise ValueError(f"thresholds must have shape ({num_classes},), got {tuple(th.shape)}")
    if value_checks_enabled() and th.numel() and not bool(((th >= 0) & (th <= 1)).all()):
        raise ValueError(f"thresholds must lie in [0, 1], got {th.tolist()}")
    return th


def _check_scores_kind(scores: torch.Tensor, probabilities: bool) -> None:
    """Catch logits passed as probabilities and the reverse, on a strided sample (cheap).

    Softmax outputs passed as logits give confidences near 1/C, below every threshold: every
    selector would keep nothing, silently.
    """
    if not value_checks_enabled() or scores.numel() == 0:
        return
    sample = scores[:1, :, ::16, ::16].float()
    sums = sample.sum(1)
    looks_like_probabilities = bool(
        (sample.min() >= 0) & (sample.max() <= 1) & ((sums - 1).abs() <= 1e-3).all()
    )
    if probabilities and not looks_like_probabilities:
        raise ValueError(
            "scores were passed with probabilities=True but are not probabilities (NaN or Inf, "
            "values outside [0, 1], or pixels whose values do not sum to 1 over the classes); "
            "pass logits with probabilities=False"
        )
    # Logits summing to 1 at a few pixels happen in toy examples; at many sampled pixels, never.
    if not probabilities and looks_like_probabilities and scores.shape[1] > 1 and sums.numel() >= 4:
        raise ValueError(
            "scores look like softmax probabilities (in [0, 1], summing to 1 over the classes) "
            "but probabilities=False treats them as logits, which would select almost nothing; "
            "pass probabilities=True"
        )


def _check_confidence(conf: torch.Tensor) -> None:
    # NaN/Inf anywhere in a pixel's scores makes its confidence NaN (or > 1), so checking the
    # (N, H, W) confidences is as strict as checking the (N, C, H, W) scores and C times cheaper.
    if value_checks_enabled() and conf.numel() and not bool(((conf >= 0) & (conf <= 1)).all()):
        raise ValueError(
            "scores contain NaN or Inf values (or probabilities outside [0, 1]): "
            "the confidence of some pixel is not a probability"
        )


def confidence_and_prediction(
    scores: torch.Tensor, *, probabilities: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence ``max_c softmax(scores)_c`` and prediction ``argmax_c`` per pixel.

    Args:
        scores: ``(N, C, H, W)`` logits, or probabilities when ``probabilities=True``. Any float dtype.
        probabilities: the scores are already probabilities.

    Returns:
        ``confidence`` ``(N, H, W)`` float32 and ``prediction`` ``(N, H, W)`` int64.

    For logits the softmax is never materialised: ``conf = exp(max − logsumexp)``.

    >>> import torch
    >>> conf, pred = confidence_and_prediction(torch.tensor([[[[0.0]], [[1.0]]]]))
    >>> pred.tolist(), round(conf.item(), 4)
    ([[[1]]], 0.7311)
    """
    s = _check_scores(scores)
    _check_scores_kind(s, probabilities)
    if s.device.type == "cpu":
        conf, pred = _confidence_and_prediction_by_class(s, probabilities)
    else:
        conf, pred = _confidence_and_prediction_reduced(s, probabilities)
    _check_confidence(conf)
    return conf, pred


def _confidence_and_prediction_reduced(
    scores: torch.Tensor, probabilities: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU form of :func:`confidence_and_prediction`: fused reductions over the class dim."""
    s32 = scores.float()
    top, pred = s32.max(dim=1)
    conf = top if probabilities else torch.exp(top - torch.logsumexp(s32, dim=1))
    return conf, pred


def _confidence_and_prediction_by_class(
    scores: torch.Tensor, probabilities: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU form of :func:`confidence_and_prediction`: one ``(N, H, W)`` plane per class.

    On a CPU, ``max``/``logsumexp`` over the strided class dimension are 5–10× slower than
    ``amax`` plus a few plane-wise passes: the arg-max counts the leading classes below the maximum
    (so the first maximal class wins, ``torch.max``'s tie rule) and the confidence is
    ``1 / Σ_c exp(s_c − max)``, within 6e-7 of the float64 softmax maximum. Half inputs are
    widened plane by plane, never as a whole copy.
    """
    num_classes = scores.shape[1]
    top = scores.amax(dim=1)
    top32 = top.float()
    # pred = number of leading classes whose score is below the maximum.
    pred = torch.zeros(
        top.shape, dtype=torch.uint8 if num_classes <= 256 else torch.int32, device=top.device
    )
    searching = torch.ones(top.shape, dtype=torch.bool, device=top.device)
    below = torch.empty_like(searching)
    if not probabilities:
        total = torch.zeros_like(top32)
        term = torch.empty_like(top32)
    for k in range(num_classes):
        plane = scores[:, k]
        if k < num_classes - 1:
            torch.ne(plane, top, out=below)
            pred.add_(searching.logical_and_(below))
        if not probabilities:
            torch.sub(plane, top32, out=term)
            total.add_(term.exp_())
    return (top32 if probabilities else total.reciprocal_()), pred.long()


def select_with_thresholds(
    confidence: torch.Tensor,
    prediction: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Keep ``prediction`` where ``confidence ≥ thresholds[prediction]``, else ``ignore_index``.

    Args:
        confidence: ``(N, H, W)`` float.
        prediction: ``(N, H, W)`` integer classes in ``[0, C)``.
        thresholds: ``(C,)`` per-class thresholds.

    Returns:
        ``(N, H, W)`` int64 pseudo-labels.

    >>> import torch
    >>> select_with_thresholds(torch.tensor([[[0.95, 0.5]]]), torch.tensor([[[0, 1]]]),
    ...                        torch.tensor([0.9, 0.6]))
    tensor([[[  0, 255]]])
    """
    conf = check_float("confidence", confidence)
    check_finite("confidence", conf)  # a NaN confidence would silently drop its pixel
    th = _check_thresholds(thresholds)
    _check_prediction("prediction", prediction, conf.shape, th.shape[0], conf.device)
    if th.device != conf.device:
        raise ValueError(
            f"thresholds must be on the confidence's device {conf.device}, got {th.device}"
        )
    per_pixel = thresholds.to(confidence.dtype).index_select(0, prediction.reshape(-1))
    keep = confidence >= per_pixel.view_as(confidence)
    return torch.where(keep, prediction.long(), ignore_index)


def selected_class_statistics(
    labels: torch.Tensor, confidence: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image selected-pixel counts ``(N, C)`` int64 and confidence sums ``(N, C)`` float64.

    Pixels whose label is outside ``[0, C)`` (the ignore index) are not counted.

    >>> import torch
    >>> n, s = selected_class_statistics(torch.tensor([[[0, 255, 1, 1]]]),
    ...                                  torch.tensor([[[0.9, 0.2, 0.8, 0.6]]]), 2)
    >>> n.tolist(), [round(x, 2) for x in s[0].tolist()]
    ([[1, 2]], [0.9, 1.4])
    """
    lab = check_tensor("labels", labels)
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {lab.dtype}")
    check_float("confidence", confidence)
    if confidence.shape != labels.shape:
        raise ValueError(
            f"confidence must have the labels' shape {tuple(labels.shape)}, got {tuple(confidence.shape)}"
        )
    n = labels.shape[0]
    c = num_classes
    flat = labels.reshape(n, labels[0].numel() if n else 0).to(torch.int32)
    dump = n * c
    # Unselected pixels (and any label outside [0, C)) go to one extra bin that is dropped.
    flat = torch.where((flat >= 0) & (flat < c), flat, dump)
    flat.add_(torch.arange(n, device=labels.device, dtype=torch.int32)[:, None] * c).clamp_(
        max=dump
    )
    index = flat.reshape(-1)
    counts = count(index, dump + 1)[:dump].view(n, c)
    # float64 accumulation: the sum over millions of pixels stays order-independent to ~1e-12.
    sums = weighted_sum(index, confidence.reshape(-1).double(), dump + 1)
    return counts, sums[:dump].view(n, c)


_LANES = 1024  # statistic lanes per image (see _select_and_count)
_LANE_PIXELS = 2048  # at most this many float32 additions per lane counter on a CPU


def _select_and_count(
    confidence: torch.Tensor,
    prediction: torch.Tensor,
    prediction32: torch.Tensor,
    thresholds: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    labels: torch.Tensor,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_with_thresholds` and :func:`selected_class_statistics` in one set of passes.

    ``confidence`` float32 and ``prediction`` (values in ``[0, C)``, an arg-max) are ``(k, …)``;
    ``prediction32`` is the flat int32 copy of ``prediction``, which this function **overwrites**.
    Writes the int64 pseudo-labels into ``labels`` (shape of ``prediction``) and returns the
    ``(k, C)`` int64 counts and ``(k, C)`` float64 confidence sums of the selected pixels.
    ``scratch`` holds the full-size temporaries (fresh ones when not given).
    """
    k = confidence.shape[0]
    c = num_classes
    hw = prediction.shape[1:].numel()
    m = k * hw
    flat_conf = confidence.reshape(m)
    if scratch is None:
        scratch = Scratch()
    per_pixel = scratch.get("per_pixel_threshold", m, torch.float32, flat_conf.device)
    rejected = scratch.get("rejected", m, torch.bool, flat_conf.device)
    torch.index_select(thresholds.float(), 0, prediction32, out=per_pixel)
    torch.lt(flat_conf, per_pixel, out=rejected)
    # code = class (selected) or C + class (rejected): an add instead of a masked fill, and the
    # labels are then a lookup in a 2C-entry table instead of a three-input where (3-5x faster).
    code = prediction32.add_(rejected.view(torch.uint8), alpha=c)
    table = torch.full((2 * c,), ignore_index, dtype=labels.dtype, device=labels.device)
    table[:c] = torch.arange(c, device=labels.device)
    torch.index_select(table, 0, code, out=labels.view(m))

    # Statistics: one histogram over (image, lane, code) bins. Neighbouring pixels go to different
    # lanes (pixel index mod L): on a CPU a run of pixels of one class would otherwise be a serial
    # chain of increments on one counter, and each lane accumulates at most _LANE_PIXELS float32
    # confidences, so the float64 total of the lanes is within 3e-7 relative (measured worst
    # case: 2048 values near 1 per lane) without a float64 copy of the confidences; larger lanes
    # fall back to float64 weights.
    lanes = math.gcd(hw, _LANES)
    bins = 2 * c
    offsets = torch.arange(k * lanes, device=code.device, dtype=torch.int32).mul_(bins)
    code.view(k, hw // lanes, lanes).add_(offsets.view(k, 1, lanes))
    size = k * lanes * bins
    counts = count(code, size).view(k, lanes, bins).sum(1)[:, :c]
    if confidence.device.type == "cpu" and hw // lanes <= _LANE_PIXELS:
        weights = flat_conf
    else:
        weights = flat_conf.double()  # GPU: cheap, and atomics stay accurate in any order
    sums = weighted_sum(code, weights, size).double().view(k, lanes, bins).sum(1)[:, :c]
    return counts, sums


def ias_update(
    confidence: torch.Tensor,
    prediction: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 0.9,
    gamma: float = 8.0,
    sync: bool = True,
) -> torch.Tensor:
    """One Instance Adaptive Selector threshold update from one instance (HIAST Eq. 3–4; method §2).

    For each class ``c``: ``S_c = {θ_c} ∪ {conf(i) : pred(i) = c}``,
    ``ψ_c = quantile(S_c, 1 − α θ_c^γ)`` (linear interpolation, exact), then
    ``θ_c ← β θ_c + (1 − β) ψ_c``, clamped to 0.999 when it reaches 1. A class absent from the
    instance keeps its threshold (its only sample is ``θ_c`` itself).

    Args:
        confidence: any shape, float; all pixels of the instance (e.g. ``(H, W)`` or ``(N, H, W)``).
        prediction: same shape, integer classes in ``[0, C)``.
        thresholds: ``(C,)`` current thresholds in ``[0, 1]``.
        alpha: selected proportion α in ``(0, 1]``.
        beta: threshold momentum β in ``[0, 1)``.
        gamma: hard-class weight decay γ ``≥ 0``.
        sync: with a process group, the instance is the union of every rank's pixels.

    Returns:
        ``(C,)`` updated thresholds (float32, same device).

    >>> import torch
    >>> conf = torch.tensor([0.99, 0.97, 0.95, 0.6])
    >>> pred = torch.tensor([0, 0, 0, 1])
    >>> ias_update(conf, pred, torch.full((2,), 0.9), alpha=0.5, beta=0.9, gamma=8.0)
    tensor([0.9077, 0.8935])
    """
    alpha, beta, gamma = _check_ias_parameters(alpha, beta, gamma)
    conf = check_float("confidence", confidence)
    th = _check_thresholds(thresholds)
    if th.device != conf.device:
        raise ValueError(
            f"thresholds must be on the confidence's device {conf.device}, got {th.device}"
        )
    _check_prediction("prediction", prediction, conf.shape, th.shape[0], conf.device)
    if value_checks_enabled() and conf.numel() and not bool(((conf >= 0) & (conf <= 1)).all()):
        raise ValueError("confidence must lie in [0, 1] (no NaN or Inf)")
    return _ias_update(conf, prediction, th, alpha, beta, gamma, sync)


def _check_ias_parameters(alpha: float, beta: float, gamma: float) -> tuple[float, float, float]:
    a = check_unit_interval("alpha", alpha, open_low=True)
    b = check_unit_interval("beta", beta, open_high=True)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be finite and non-negative, got {gamma!r}")
    return a, b, float(gamma)


def _ias_update(
    confidence: torch.Tensor,
    prediction: torch.Tensor,
    thresholds: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    sync: bool,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    th = thresholds.float()
    num_classes = th.shape[0]
    q = 1.0 - alpha * th.pow(gamma)
    psi, counts = _grouped_quantile(
        confidence.reshape(-1), prediction, num_classes, q, extra=th, sync=sync, scratch=scratch
    )
    new = beta * th + (1.0 - beta) * psi
    new = torch.where(new >= 1.0, torch.full_like(new, 0.999), new)
    # An absent class's only sample is θ itself: keep it bit-exact rather than β·θ + (1 − β)·θ.
    return torch.where(counts > 0, new, th)


def select_constant(
    scores: torch.Tensor,
    *,
    threshold: float = 0.9,
    probabilities: bool = False,
    ignore_index: int = 255,
) -> Selection:
    """Constant-threshold baseline: keep the arg-max where its confidence is ``≥ threshold``.

    Args:
        scores: ``(N, C, H, W)`` logits (or probabilities with ``probabilities=True``).
        threshold: the one threshold for every class, in ``[0, 1]``.

    >>> import torch
    >>> select_constant(torch.tensor([[[[4.0, 0.0]], [[0.0, 0.0]]]])).labels
    tensor([[[  0, 255]]])
    """
    check_unit_interval("threshold", threshold)
    conf, pred = confidence_and_prediction(scores, probabilities=probabilities)
    labels = _threshold_labels(conf, pred, threshold, ignore_index)
    counts, _ = selected_class_statistics(labels, conf, scores.shape[1])
    return Selection(labels, conf, pred, counts)


def _threshold_labels(
    confidence: torch.Tensor, prediction: torch.Tensor, threshold: float, ignore_index: int
) -> torch.Tensor:
    return torch.where(confidence >= threshold, prediction, ignore_index)


def select_argmax(scores: torch.Tensor, *, probabilities: bool = False) -> Selection:
    """No-threshold baseline: every pixel takes its arg-max class.

    >>> import torch
    >>> select_argmax(torch.tensor([[[[4.0, 0.0]], [[0.0, 1.0]]]])).labels
    tensor([[[0, 1]]])
    """
    conf, pred = confidence_and_prediction(scores, probabilities=probabilities)
    counts, _ = selected_class_statistics(pred, conf, scores.shape[1])
    return Selection(pred, conf, pred, counts)


def cbst_thresholds(histogram: torch.Tensor, *, proportion: float = 0.2) -> torch.Tensor:
    """CBST thresholds from per-class confidence histograms.

    Args:
        histogram: ``(C, B)`` counts of confidences in ``B`` equal bins over ``[0, 1]`` for the
            pixels predicted as each class.
        proportion: ``p``, the fraction of each class's pixels to keep (top confidences).

    Returns:
        ``(C,)`` thresholds: the lower edge of the bin holding the ``1 − p`` quantile, so at least
        the top ``p`` of the class is kept and the error against the exact quantile is below
        ``1 / B``. A class never predicted gets 1.0.

    >>> import torch
    >>> h = torch.zeros(1, 10, dtype=torch.long); h[0, 5] = 8; h[0, 9] = 2
    >>> cbst_thresholds(h, proportion=0.2)
    tensor([0.9000])
    """
    check_unit_interval("proportion", proportion, open_low=True)
    hist = check_tensor("histogram", histogram)
    if hist.dim() != 2 or hist.is_floating_point() or hist.dtype == torch.bool:
        raise ValueError(
            f"histogram must be an integer (C, B) tensor of counts, got {tuple(hist.shape)} {hist.dtype}"
        )
    bins = histogram.shape[1]
    total = histogram.sum(1)
    # Count from the top: the first bin (from the top) where the kept count reaches p · total.
    from_top = histogram.flip(1).cumsum(1)
    need = (proportion * total.double()).ceil().clamp(min=1)
    first = (from_top.double() < need[:, None]).sum(1).clamp(max=bins - 1)
    edge = (bins - 1 - first).double() / bins
    return torch.where(total > 0, edge, torch.ones_like(edge)).float()


def _check_granularity(granularity: str) -> Granularity:
    if granularity not in ("image", "batch"):
        raise ValueError(f"granularity must be 'image' or 'batch', got {granularity!r}")
    return granularity  # type: ignore[return-value]


class _SelectorMeta(type(Protocol)):  # type: ignore[misc]
    # From Python 3.12 on, isinstance() against a runtime-checkable protocol looks attributes up
    # statically, and so never finds an nn.Module's buffers (they live in ``_buffers``, reached
    # through ``__getattr__``): every selector would fail the check. Look them up normally.
    def __instancecheck__(cls, instance: object) -> bool:
        if cls is Selector:
            members = (*Selector.__annotations__, "reset")  # the protocol's own member list
            return callable(instance) and all(hasattr(instance, m) for m in members)
        return super().__instancecheck__(instance)


@runtime_checkable
class Selector(Protocol, metaclass=_SelectorMeta):
    """What every selector implements: the same call, the same state.

    ``selector(scores, probabilities=False)`` returns a :class:`Selection`; ``thresholds``
    ``(C,)`` are the per-class thresholds in force (constant for the constant selector, 0 for
    arg-max); ``class_values`` ``(C,)`` are the momentum-0.99 averages of each class's mean
    selected confidence per image (what hard-aware copy-paste ranks classes by), ``class_pixels``
    ``(C,)`` the selected pixels so far; ``reset()`` restores the initial state. Pipelines and
    :func:`~uda_selftrain.online.online_targets` take any ``Selector``.

    >>> import uda_selftrain as ust
    >>> all(isinstance(s, ust.Selector) for s in (ust.InstanceAdaptiveSelector(3),
    ...     ust.ConstantThresholdSelector(3), ust.ArgmaxSelector(3), ust.CBSTSelector(3)))
    True
    """

    num_classes: int
    ignore_index: int
    thresholds: torch.Tensor
    class_values: torch.Tensor
    class_pixels: torch.Tensor

    def __call__(self, scores: torch.Tensor, *, probabilities: bool = False) -> Selection: ...

    def reset(self) -> None: ...


class _SelectorState(nn.Module):
    """The state every selector keeps (see :class:`Selector`) and its class-value update.

    Class values live here and only here: a class's value starts at the mean confidence of the
    pixels first selected as it and then follows ``v ← m·v + (1 − m)·mean`` per instance.
    """

    thresholds: torch.Tensor
    class_values: torch.Tensor
    class_seen: torch.Tensor
    class_pixels: torch.Tensor
    num_instances: torch.Tensor

    def _init_state(
        self,
        num_classes: int,
        initial_threshold: float,
        *,
        class_value_momentum: float,
        ignore_index: int,
        sync: bool,
    ) -> None:
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.class_value_momentum = check_unit_interval(
            "class_value_momentum", class_value_momentum
        )
        self.ignore_index = check_ignore_index(ignore_index, num_classes)
        self.sync = bool(sync)
        self._initial_threshold = float(initial_threshold)
        self.register_buffer("thresholds", torch.full((num_classes,), self._initial_threshold))
        self.register_buffer("class_values", torch.zeros(num_classes))
        self.register_buffer("class_seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("class_pixels", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("num_instances", torch.zeros((), dtype=torch.int64))

    def reset(self) -> None:
        """Restore the initial state (initial thresholds, statistics to zero)."""
        self.thresholds.fill_(self._initial_threshold)
        self.class_values.zero_()
        self.class_seen.zero_()
        self.class_pixels.zero_()
        self.num_instances.zero_()

    def _check_device(self, confidence: torch.Tensor) -> None:
        # A clear error instead of a device mismatch deep inside the update (no host sync).
        if confidence.device != self.thresholds.device:
            raise ValueError(
                f"{type(self).__name__}'s state is on {self.thresholds.device} but the scores are "
                f"on {confidence.device}: move the module with .to({str(confidence.device)!r})"
            )

    def _update_class_values(self, counts: torch.Tensor, sums: torch.Tensor, sync: bool) -> None:
        if sync:
            counts, sums = all_reduce_sum(counts), all_reduce_sum(sums)
        present = counts > 0
        mean = (sums / counts.clamp(min=1)).float()
        m = self.class_value_momentum
        updated = torch.where(self.class_seen, m * self.class_values + (1.0 - m) * mean, mean)
        self.class_values.copy_(torch.where(present, updated, self.class_values))
        self.class_seen.logical_or_(present)
        self.class_pixels.add_(counts)
        self.num_instances.add_(1)

    def _record(
        self, labels: torch.Tensor, confidence: torch.Tensor, prediction: torch.Tensor
    ) -> Selection:
        """Count a selection once and update the class values image by image (the baselines)."""
        self._check_device(confidence)
        counts, sums = selected_class_statistics(labels, confidence, self.num_classes)
        sync = self.sync and is_distributed()
        n = counts.shape[0]
        if sync:
            # Every rank takes part in as many updates as the rank with the most images.
            n_max = int(all_reduce_max(torch.tensor([n], device=counts.device)).item())
            pad = n_max - n
            if pad:
                counts = torch.cat([counts, counts.new_zeros(pad, self.num_classes)])
                sums = torch.cat([sums, sums.new_zeros(pad, self.num_classes)])
            n = n_max
        for i in range(n):
            self._update_class_values(counts[i], sums[i], sync)
        return Selection(labels, confidence, prediction, counts[: labels.shape[0]])


class InstanceAdaptiveSelector(_SelectorState):
    """Instance Adaptive Selector (IAS) with the class statistics hard-aware copy-paste needs.

    State (registered buffers, so ``state_dict()`` checkpoints it):
        ``thresholds`` ``(C,)`` θ, initialised to ``init_threshold``;
        ``class_values`` ``(C,)`` v: momentum average of the mean confidence of the pixels selected
        as each class in each instance (0 until first observed, then initialised with that value);
        ``class_seen`` ``(C,)`` bool; ``class_pixels`` ``(C,)`` int64 total selected pixels;
        ``num_instances`` number of updates so far.

    Args:
        num_classes: ``C``.
        alpha: selected proportion α (0.5 in HIAST's configs, 0.2 in IAST's).
        beta: threshold momentum β.
        gamma: hard-class weight decay γ.
        init_threshold: initial θ.
        class_value_momentum: momentum of the class values (0.99).
        granularity: ``"image"`` (default; the paper: θ updated image by image, in batch order) or
            ``"batch"`` (the public implementation: one update per batch).
        min_threshold: a floor under every θ after each update (0 = none, the paper). A guard
            against minority-class thresholds falling so low in a weak model that their
            pseudo-labels are mostly wrong.
        ignore_index: label of unselected pixels.
        sync: with a ``torch.distributed`` process group, each update uses the union of every rank's
            instance (per image: every rank's j-th image of the batch; per batch: the global batch),
            so θ and v are identical on all ranks and equal one process's on that union. The
            histograms are exact integer counts: agreement is exact.

    Shapes:
        scores ``(N, C, H, W)`` → :class:`Selection` (labels ``(N, H, W)``, confidence, prediction,
        per-image class pixel counts ``(N, C)``).

    >>> import torch
    >>> selector = InstanceAdaptiveSelector(num_classes=3)
    >>> out = selector(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 5)
    >>> out.labels.shape, selector.thresholds.shape
    (torch.Size([2, 8, 8]), torch.Size([3]))
    """

    thresholds: torch.Tensor
    class_values: torch.Tensor
    class_seen: torch.Tensor
    class_pixels: torch.Tensor
    num_instances: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        *,
        alpha: float = 0.5,
        beta: float = 0.9,
        gamma: float = 8.0,
        init_threshold: float = 0.9,
        class_value_momentum: float = 0.99,
        granularity: Granularity = "image",
        min_threshold: float = 0.0,
        ignore_index: int = 255,
        sync: bool = True,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = _check_ias_parameters(alpha, beta, gamma)
        self.min_threshold = check_unit_interval("min_threshold", min_threshold)
        self.init_threshold = check_unit_interval("init_threshold", init_threshold)
        self.granularity = _check_granularity(granularity)
        self._init_state(
            num_classes,
            self.init_threshold,
            class_value_momentum=class_value_momentum,
            ignore_index=ignore_index,
            sync=sync,
        )
        # CPU temporaries reused across calls: 17 bytes per pixel of the largest instance plus a
        # 2.5 MiB lookup table (for 19 classes).
        self._scratch = Scratch()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, alpha={self.alpha}, beta={self.beta}, "
            f"gamma={self.gamma}, granularity={self.granularity!r}"
        )

    def release_scratch(self) -> None:
        """Free the scratch memory a CPU selector keeps between calls (re-created when needed)."""
        self._scratch.release()

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, *, probabilities: bool = False) -> Selection:
        """Update θ instance by instance and select pseudo-labels with the updated thresholds.

        Args:
            scores: ``(N, C, H, W)`` logits, or probabilities with ``probabilities=True``.
        """
        _check_scores(scores, self.num_classes)
        conf, pred = confidence_and_prediction(scores, probabilities=probabilities)
        return self._select(conf, pred)  # already validated by confidence_and_prediction

    @torch.no_grad()
    def select_from_confidence(
        self, confidence: torch.Tensor, prediction: torch.Tensor
    ) -> Selection:
        """Same as calling the module, from per-pixel confidence and prediction.

        Useful when the caller already reduced the scores (e.g. averaged over flips or scales).

        Args:
            confidence: ``(N, H, W)`` float in ``[0, 1]``.
            prediction: ``(N, H, W)`` integer classes in ``[0, C)``.
        """
        conf = check_float("confidence", confidence, ndim=3, shape_hint="(N, H, W)").float()
        pred = _check_prediction(
            "prediction", prediction, conf.shape, self.num_classes, conf.device
        )
        _check_confidence(conf)
        return self._select(conf, pred.long())

    def _select(self, conf: torch.Tensor, pred: torch.Tensor) -> Selection:
        self._check_device(conf)
        sync = self.sync and is_distributed()
        if self.granularity == "batch":
            groups = [slice(0, conf.shape[0])]
        else:
            count = conf.shape[0]
            if sync:
                # Ranks may hold different batch sizes (the last batch); every rank must take part
                # in every update, so the short ones contribute empty instances.
                count = int(all_reduce_max(torch.tensor([count], device=conf.device)).item())
            groups = [slice(i, i + 1) for i in range(count)]
        labels = torch.empty_like(pred)
        counts = torch.zeros(pred.shape[0], self.num_classes, dtype=torch.int64, device=pred.device)
        for group in groups:
            c, p = conf[group], pred[group]
            m = p.numel()
            # One int32 copy of the prediction serves the quantile and the selection, which then
            # turns it into its statistics index.
            p32 = self._scratch.get("prediction32", m, torch.int32, p.device).copy_(p.reshape(-1))
            self.thresholds.copy_(
                _ias_update(
                    c, p32, self.thresholds, self.alpha, self.beta, self.gamma, sync, self._scratch
                )
            )
            if self.min_threshold > 0:
                self.thresholds.clamp_(min=self.min_threshold)
            group_counts, group_sums = _select_and_count(
                c,
                p,
                p32,
                self.thresholds,
                self.num_classes,
                self.ignore_index,
                labels[group],
                self._scratch,
            )
            counts[group] = group_counts
            self._update_class_values(group_counts.sum(0), group_sums.sum(0), sync)
        return Selection(labels, conf, pred, counts)


class ConstantThresholdSelector(_SelectorState):
    """Module form of :func:`select_constant`: one threshold for every class.

    Args:
        num_classes: ``C``.
        threshold: the threshold, in ``[0, 1]`` (0.9 in the paper's comparison).
        class_value_momentum: momentum of the class values (0.99).
        ignore_index: label of unselected pixels.
        sync: under a process group, class-value updates use every rank's image.

    Shape:
        scores ``(N, C, H, W)`` → :class:`Selection`.

    >>> import torch
    >>> sel = ConstantThresholdSelector(num_classes=2)
    >>> sel(torch.zeros(1, 2, 2, 2)).labels.unique().tolist(), sel.thresholds.tolist()
    ([255], [0.8999999761581421, 0.8999999761581421])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        threshold: float = 0.9,
        class_value_momentum: float = 0.99,
        ignore_index: int = 255,
        sync: bool = True,
    ) -> None:
        super().__init__()
        self.threshold = check_unit_interval("threshold", threshold)
        self._init_state(
            num_classes,
            self.threshold,
            class_value_momentum=class_value_momentum,
            ignore_index=ignore_index,
            sync=sync,
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, threshold={self.threshold}"

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, *, probabilities: bool = False) -> Selection:
        _check_scores(scores, self.num_classes)
        # select_constant's labels; the counts (and confidence sums) are _record's, made once.
        conf, pred = confidence_and_prediction(scores, probabilities=probabilities)
        labels = _threshold_labels(conf, pred, self.threshold, self.ignore_index)
        return self._record(labels, conf, pred)


class ArgmaxSelector(_SelectorState):
    """Module form of :func:`select_argmax`: every pixel takes its arg-max class (threshold 0).

    Shape:
        scores ``(N, C, H, W)`` → :class:`Selection`.

    >>> import torch
    >>> ArgmaxSelector(num_classes=2)(torch.tensor([[[[0.0]], [[1.0]]]])).labels.tolist()
    [[[1]]]
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_value_momentum: float = 0.99,
        ignore_index: int = 255,
        sync: bool = True,
    ) -> None:
        super().__init__()
        self._init_state(
            num_classes,
            0.0,
            class_value_momentum=class_value_momentum,
            ignore_index=ignore_index,
            sync=sync,
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, *, probabilities: bool = False) -> Selection:
        _check_scores(scores, self.num_classes)
        # select_argmax's labels are the arg-max itself; the counts are _record's, made once.
        conf, pred = confidence_and_prediction(scores, probabilities=probabilities)
        return self._record(pred, conf, pred)


class CBSTSelector(_SelectorState):
    """Class-balanced self-training thresholds (CBST): one threshold per class over the target set.

    Usage is two passes: :meth:`observe` every target image (accumulates per-class confidence
    histograms of ``bins`` equal bins; all-reduced at :meth:`fit` under a process group), then
    :meth:`fit`, then call the module to select. The threshold keeps the top ``proportion`` of each
    class's confidences, to within ``1 / bins``.

    Shape:
        scores ``(N, C, H, W)`` → :class:`Selection`.

    >>> import torch
    >>> sel = CBSTSelector(num_classes=2)
    >>> x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    >>> sel.observe(x); _ = sel.fit(); sel(x).labels.shape
    torch.Size([1, 4, 4])
    """

    histogram: torch.Tensor
    fitted: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        *,
        proportion: float = 0.2,
        bins: int = 65536,
        class_value_momentum: float = 0.99,
        ignore_index: int = 255,
        sync: bool = True,
    ) -> None:
        super().__init__()
        self.proportion = check_unit_interval("proportion", proportion, open_low=True)
        self.bins = check_positive_int("bins", bins)
        self._init_state(
            num_classes,
            1.0,
            class_value_momentum=class_value_momentum,
            ignore_index=ignore_index,
            sync=sync,
        )
        self.register_buffer("histogram", torch.zeros(num_classes, bins, dtype=torch.int64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._known_fitted = False  # a host-side copy: one read of the buffer, not one per call

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, proportion={self.proportion}, bins={self.bins}"

    def reset(self) -> None:
        """Forget the observed histograms and the fitted thresholds."""
        super().reset()
        self.histogram.zero_()
        self.fitted.fill_(False)
        self._known_fitted = False

    @torch.no_grad()
    def observe(self, scores: torch.Tensor, *, probabilities: bool = False) -> None:
        """Accumulate the confidences of ``scores`` ``(N, C, H, W)`` into the class histograms."""
        _check_scores(scores, self.num_classes)
        conf, pred = confidence_and_prediction(scores, probabilities=probabilities)
        self._check_device(conf)
        b = (conf * self.bins).long().clamp_(0, self.bins - 1)
        index = (pred * self.bins + b).reshape(-1)
        size = self.num_classes * self.bins
        self.histogram.add_(count(index, size).view(self.num_classes, self.bins))

    @torch.no_grad()
    def fit(self) -> torch.Tensor:
        """Compute the thresholds from everything observed (on every rank's data); returns them."""
        hist = all_reduce_sum(self.histogram) if self.sync else self.histogram
        self.thresholds.copy_(cbst_thresholds(hist, proportion=self.proportion))
        self.fitted.fill_(True)
        self._known_fitted = True
        return self.thresholds.clone()

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, *, probabilities: bool = False) -> Selection:
        _check_scores(scores, self.num_classes)
        if not self._known_fitted:
            self._known_fitted = bool(self.fitted)  # e.g. restored by load_state_dict
        if not self._known_fitted:
            raise RuntimeError(
                "CBSTSelector: call observe() on the target set and fit() before selecting"
            )
        conf, pred = confidence_and_prediction(scores, probabilities=probabilities)
        labels = select_with_thresholds(conf, pred, self.thresholds, ignore_index=self.ignore_index)
        return self._record(labels, conf, pred)
