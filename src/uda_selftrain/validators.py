"""Label-free validators: scores of a segmentation model on *unlabelled* target images.

Unsupervised domain adaptation has no target labels, so which checkpoint to keep (the warm-up,
round 1, round 3 …) has to be decided from the model's behaviour on target images alone. Each
validator here is a function holding the math plus an accumulator (``update`` over batches,
``compute()`` at the end, summed across ranks like :class:`~uda_selftrain.ConfusionMatrix`):

| validator | score | better |
|---|---|---|
| :func:`prediction_entropy` | mean normalised entropy of the softmax | lower |
| ``prediction_entropy(class_balanced=True)`` | its mean over the *predicted classes* | lower |
| :func:`information_maximization` | ``H(mean p) − mean H(p)`` (normalised) | higher |
| :func:`soft_neighbourhood_density` | SND on sampled pixels' probabilities | higher |
| :func:`agreement_miou` (augmentation) | mIoU between predictions on two views | higher |
| :func:`ensemble_agreement` | each candidate's mIoU against the ensemble | higher |
| :func:`mixval_probe` + agreement (MixVal) | mIoU on ClassMix-ed images vs mixed labels | higher |

:func:`score_candidates` runs all of them over a set of candidate models and a stream of target
image batches; :func:`select_candidate` picks the best candidate by one validator. The docs page
``components/validators.md`` has the equations and which validator the benchmark supports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_finite,
    check_float,
    check_positive_int,
    check_tensor,
    value_checks_enabled,
)
from .augment import IMAGENET_MEAN, IMAGENET_STD
from .distributed import all_reduce_sum
from .metrics import confusion_matrix
from .mixing import classmix_masks

__all__ = [
    "COMBINED",
    "VALIDATORS",
    "AugmentationAgreement",
    "EnsembleAgreement",
    "InformationMaximization",
    "MixValProbe",
    "MixValScore",
    "PredictionEntropy",
    "SoftNeighbourhoodDensity",
    "agreement_miou",
    "ensemble_agreement",
    "information_maximization",
    "mean_ranks",
    "mixval_probe",
    "prediction_entropy",
    "score_candidates",
    "select_candidate",
    "soft_neighbourhood_density",
]

#: Every validator :func:`score_candidates` computes, and whether a higher score is better.
VALIDATORS: dict[str, bool] = {
    "entropy": False,
    "class_balanced_entropy": False,
    "information_maximization": True,
    "snd": True,
    "augmentation_agreement": True,
    "ensemble_agreement": True,
    "mixval": True,
}


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_probabilities(name: str, probabilities: object, ndim: int = 4) -> torch.Tensor:
    hint = "(N, C, H, W)" if ndim == 4 else f"with {ndim} dimensions"
    p = check_float(name, probabilities, ndim, hint)
    if p.shape[-3] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got shape {tuple(p.shape)}")
    check_finite(name, p)
    if value_checks_enabled() and p.numel() > 0:
        # Probabilities, not logits: non-negative and summing to 1 over the class dimension.
        if bool((p < 0).any()) or not bool(
            torch.allclose(p.sum(-3), torch.ones((), dtype=p.dtype, device=p.device), atol=1e-3)
        ):
            raise ValueError(
                f"{name} must be probabilities (non-negative, summing to 1 over the class "
                "dimension); apply a softmax to logits first"
            )
    return p


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_valid(
    valid: object, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor | None:
    if valid is None:
        return None
    v = check_tensor("valid", valid)
    if v.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got dtype {v.dtype}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"valid must have shape {tuple(shape)}, got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"valid must be on the probabilities' device {device}, got {v.device}")
    return v


def _check_prediction(name: str, x: object) -> torch.Tensor:
    t = check_tensor(name, x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {t.dtype}")
    return t


# ---------------------------------------------------------------------------------------------
# Entropy and information maximisation
# ---------------------------------------------------------------------------------------------


def _pixel_entropy(p: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` entropy normalised by ``log C`` (0 log 0 = 0), float64."""
    q = p.double()
    return -(q * torch.log(q.clamp(min=1e-30))).sum(1) / math.log(p.shape[1])


def _entropy_sums(
    probabilities: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted class: summed normalised entropy (float64) and pixel count (int64)."""
    c = probabilities.shape[1]
    ent = _pixel_entropy(probabilities).reshape(-1)
    pred = probabilities.argmax(1).reshape(-1)
    if valid is not None:
        keep = valid.reshape(-1)
        ent = torch.where(keep, ent, torch.zeros_like(ent))
        pred = torch.where(keep, pred, torch.full_like(pred, c))  # an extra bin drops the pixel
    sums = torch.zeros(c + 1, dtype=torch.float64, device=probabilities.device)
    sums.index_add_(0, pred, ent)
    counts = torch.bincount(pred, minlength=c + 1)
    return sums[:c], counts[:c]


def _reduce_entropy(sums: torch.Tensor, counts: torch.Tensor, class_balanced: bool) -> torch.Tensor:
    if class_balanced:
        seen = counts > 0
        per_class = sums / counts.clamp(min=1)
        return per_class[seen].mean() if bool(seen.any()) else sums.new_tensor(math.nan)
    total = counts.sum()
    return sums.sum() / total if int(total) > 0 else sums.new_tensor(math.nan)


def prediction_entropy(
    probabilities: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    class_balanced: bool = False,
) -> torch.Tensor:
    """Mean normalised prediction entropy (lower = more confident); optionally class-balanced.

    Per pixel ``H(p) = −Σ_c p_c log p_c / log C`` ∈ [0, 1]. The plain score is the mean over
    pixels; ``class_balanced=True`` takes the mean over the pixels *predicted* as each class, then
    the mean over the predicted classes, so that one dominant class (background, road) cannot set
    the score alone. Entropy minimisation as a selection criterion: Grandvalet & Bengio (NeurIPS
    2004); as a UDA validator: Morerio et al. (ICLR 2018).

    Args:
        probabilities: ``(N, C, H, W)`` softmax probabilities, ``C ≥ 2``.
        valid: optional ``(N, H, W)`` bool mask of the pixels to score (e.g. not padding).

    Returns:
        a float64 scalar; NaN when no pixel is scored.

    >>> import torch
    >>> p = torch.tensor([[[[0.5, 1.0]], [[0.5, 0.0]]]])  # (1, 2, 1, 2): uniform, then certain
    >>> round(prediction_entropy(p).item(), 3), round(prediction_entropy(p, class_balanced=True).item(), 3)
    (0.5, 0.5)
    """
    p = _check_probabilities("probabilities", probabilities)
    v = _check_valid(valid, (p.shape[0], *p.shape[2:]), p.device)
    sums, counts = _entropy_sums(p, v)
    return _reduce_entropy(sums, counts, class_balanced)


class PredictionEntropy(nn.Module):
    """Accumulating :func:`prediction_entropy` over batches; :meth:`compute` sums across ranks.

    Shape:
        - update: ``probabilities`` ``(N, C, H, W)``, ``valid`` ``(N, H, W)`` bool or None.
        - compute: scalar float64.

    >>> import torch
    >>> acc = PredictionEntropy(3, class_balanced=True)
    >>> acc.update(torch.full((2, 3, 4, 4), 1 / 3))
    >>> round(acc.compute().item(), 6)
    1.0
    """

    higher_is_better = False
    sums: torch.Tensor
    counts: torch.Tensor

    def __init__(self, num_classes: int, *, class_balanced: bool = False) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.class_balanced = bool(class_balanced)
        self.register_buffer("sums", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64))

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    @torch.no_grad()
    def update(self, probabilities: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        p = _check_probabilities("probabilities", probabilities)
        _check_num_classes(p.shape[1], self.num_classes)
        v = _check_valid(valid, (p.shape[0], *p.shape[2:]), p.device)
        sums, counts = _entropy_sums(p, v)
        self.sums.add_(sums.to(self.sums.device))
        self.counts.add_(counts.to(self.counts.device))

    def compute(self) -> torch.Tensor:
        return _reduce_entropy(
            all_reduce_sum(self.sums), all_reduce_sum(self.counts), self.class_balanced
        )


def _check_num_classes(got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(f"probabilities have {got} classes, the accumulator {expected}")


def _im_sums(
    probabilities: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed class probabilities ``(C,)``, summed normalised entropy and the pixel count."""
    p = probabilities.double()
    ent = _pixel_entropy(probabilities)
    if valid is not None:
        w = valid.to(p.dtype)
        return (p * w[:, None]).sum((0, 2, 3)), (ent * w).sum(), valid.sum()
    n = torch.tensor(ent.numel(), device=p.device)
    return p.sum((0, 2, 3)), ent.sum(), n


def _reduce_im(
    class_sums: torch.Tensor, entropy_sum: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    if int(count) == 0:
        return entropy_sum.new_tensor(math.nan)
    marginal = class_sums / count
    diversity = -(marginal * torch.log(marginal.clamp(min=1e-30))).sum() / math.log(len(marginal))
    return diversity - entropy_sum / count


def information_maximization(
    probabilities: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Information maximisation ``IM = H(p̄) − mean H(p)`` (higher is better), in ``[−1, 1]``.

    ``p̄`` is the mean class distribution over all scored pixels, both entropies normalised by
    ``log C``. The first term rewards *diverse* predictions, the second *confident* ones; a model
    that collapses onto the dominant class lowers the first, which plain entropy would reward. The
    objective of SHOT (Liang et al., ICML 2020); as a validator it ranks among the better ones in
    Musgrave et al., "Benchmarking Validation Methods for Unsupervised Domain Adaptation" (2022).

    Args:
        probabilities: ``(N, C, H, W)`` softmax probabilities.
        valid: optional ``(N, H, W)`` bool mask of the pixels to score.

    Returns:
        a float64 scalar; NaN when no pixel is scored.

    >>> import torch
    >>> one_hot = torch.eye(2).view(2, 2, 1, 1)  # two confident pixels of different classes
    >>> information_maximization(one_hot).item()
    1.0
    """
    p = _check_probabilities("probabilities", probabilities)
    v = _check_valid(valid, (p.shape[0], *p.shape[2:]), p.device)
    return _reduce_im(*_im_sums(p, v))


class InformationMaximization(nn.Module):
    """Accumulating :func:`information_maximization`; :meth:`compute` sums across ranks.

    Shape:
        - update: ``probabilities`` ``(N, C, H, W)``, ``valid`` ``(N, H, W)`` bool or None.
        - compute: scalar float64.

    >>> import torch
    >>> acc = InformationMaximization(2)
    >>> acc.update(torch.eye(2).view(2, 2, 1, 1))
    >>> acc.compute().item()
    1.0
    """

    higher_is_better = True
    class_sums: torch.Tensor
    entropy_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.register_buffer("class_sums", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def reset(self) -> None:
        for b in (self.class_sums, self.entropy_sum, self.count):
            b.zero_()

    @torch.no_grad()
    def update(self, probabilities: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        p = _check_probabilities("probabilities", probabilities)
        _check_num_classes(p.shape[1], self.num_classes)
        v = _check_valid(valid, (p.shape[0], *p.shape[2:]), p.device)
        cs, es, n = _im_sums(p, v)
        self.class_sums.add_(cs.to(self.class_sums.device))
        self.entropy_sum.add_(es.to(self.entropy_sum.device))
        self.count.add_(n.to(self.count.device))

    def compute(self) -> torch.Tensor:
        return _reduce_im(
            all_reduce_sum(self.class_sums),
            all_reduce_sum(self.entropy_sum),
            all_reduce_sum(self.count),
        )


# ---------------------------------------------------------------------------------------------
# Soft neighbourhood density
# ---------------------------------------------------------------------------------------------


def soft_neighbourhood_density(
    features: torch.Tensor, *, temperature: float = 0.05, chunk_size: int = 1024
) -> torch.Tensor:
    """Soft neighbourhood density (SND; Saito et al., ICCV 2021), higher is better.

    With ``f_i`` the L2-normalised rows of ``features`` (``M`` samples: pixels' probabilities or
    features), ``s_ij = f_i·f_j / τ`` for ``j ≠ i``, ``P_ij = softmax_j(s_ij)`` and

    ``SND = (1/M) Σ_i −Σ_{j≠i} P_ij log P_ij``.

    A model whose target samples sit in dense, well-separated clusters has neighbours of similar
    similarity (high entropy of ``P_i``). Rows are processed ``chunk_size`` at a time, so memory
    is ``O(chunk_size · M)`` rather than ``O(M²)``.

    Args:
        features: ``(M, D)`` float, ``M ≥ 2``.
        temperature: ``τ`` (the paper's 0.05).

    Returns:
        a float64 scalar; NaN for fewer than 2 samples.

    >>> import torch
    >>> f = torch.eye(3)  # three orthogonal samples: each sees two equally similar neighbours
    >>> round(soft_neighbourhood_density(f).item(), 4) == round(math.log(2), 4)
    True
    """
    f = check_float("features", features, 2, "(M, D)")
    _check_positive("temperature", temperature)
    check_positive_int("chunk_size", chunk_size)
    check_finite("features", f)
    m = f.shape[0]
    if m < 2:
        return torch.tensor(math.nan, dtype=torch.float64, device=f.device)
    f = F.normalize(f.double(), dim=1)
    total = torch.zeros((), dtype=torch.float64, device=f.device)
    for start in range(0, m, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, m), device=f.device)
        s = f[rows] @ f.T / temperature
        s[torch.arange(len(rows), device=f.device), rows] = -math.inf  # no self-neighbour
        logp = torch.log_softmax(s, dim=1)
        total += -(logp.exp() * torch.where(torch.isinf(logp), 0.0, logp)).sum()
    return total / m


class SoftNeighbourhoodDensity(nn.Module):
    """:func:`soft_neighbourhood_density` on pixels sampled from each batch's probabilities.

    Each :meth:`update` draws ``pixels_per_image`` scored pixels per image with a CPU generator
    seeded by ``seed`` (the same pixels on any device); :meth:`compute` scores up to
    ``max_samples`` of them (evenly spaced over all drawn) on this rank.

    Shape:
        - update: ``probabilities`` ``(N, C, H, W)``, ``valid`` ``(N, H, W)`` bool or None.
        - compute: scalar float64.

    >>> import torch
    >>> acc = SoftNeighbourhoodDensity(pixels_per_image=4)
    >>> acc.update(torch.softmax(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), 1))
    >>> acc.compute().shape
    torch.Size([])
    """

    higher_is_better = True

    def __init__(
        self,
        *,
        pixels_per_image: int = 64,
        max_samples: int = 4096,
        temperature: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.pixels_per_image = check_positive_int("pixels_per_image", pixels_per_image)
        self.max_samples = check_positive_int("max_samples", max_samples)
        self.temperature = _check_positive("temperature", temperature)
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(self.seed)

    @torch.no_grad()
    def update(self, probabilities: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        p = _check_probabilities("probabilities", probabilities)
        n, c, h, w = p.shape
        v = _check_valid(valid, (n, h, w), p.device)
        keys = torch.rand(n, h * w, generator=self.generator).to(p.device)
        if v is not None:
            keys = torch.where(v.reshape(n, -1), keys, torch.full_like(keys, 2.0))
        k = min(self.pixels_per_image, h * w)
        idx = keys.topk(k, dim=1, largest=False).indices  # k random pixels per image
        picked = p.reshape(n, c, -1).gather(2, idx[:, None].expand(n, c, k))
        ok = keys.gather(1, idx) <= 1.0  # drop picks that fell on unscored pixels
        self.samples.append(picked.transpose(1, 2)[ok].float())

    def compute(self) -> torch.Tensor:
        if not self.samples:
            return torch.tensor(math.nan, dtype=torch.float64)
        x = torch.cat(self.samples)
        if len(x) > self.max_samples:
            x = x[torch.linspace(0, len(x) - 1, self.max_samples, device=x.device).long()]
        return soft_neighbourhood_density(x, temperature=self.temperature)


# ---------------------------------------------------------------------------------------------
# Agreement: two views, an ensemble, a mixed probe
# ---------------------------------------------------------------------------------------------


def _agreement_confusion(
    prediction: torch.Tensor, reference: torch.Tensor, num_classes: int, valid: torch.Tensor | None
) -> torch.Tensor:
    p = _check_prediction("prediction", prediction)
    r = _check_prediction("reference", reference)
    if p.shape != r.shape:
        raise ValueError(
            f"prediction shape {tuple(p.shape)} differs from reference shape {tuple(r.shape)}"
        )
    if p.device != r.device:
        raise ValueError(f"reference must be on the prediction's device {p.device}, got {r.device}")
    v = _check_valid(valid, tuple(p.shape), p.device)
    if v is not None:
        r = torch.where(v, r.long(), torch.full_like(r, 255, dtype=torch.long))
    return confusion_matrix(p, r, num_classes, ignore_index=255)


def _miou_present(cm: torch.Tensor) -> torch.Tensor:
    """mIoU over the classes present in either map (absent ones excluded, not counted as 0)."""
    cm = cm.double()
    tp = cm.diagonal(dim1=-2, dim2=-1)
    union = cm.sum(-1) + cm.sum(-2) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    n = present.sum(-1)
    return torch.where(n > 0, iou.sum(-1) / n.clamp(min=1), torch.full_like(iou[..., 0], math.nan))


def agreement_miou(
    prediction: torch.Tensor,
    reference: torch.Tensor,
    num_classes: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """mIoU between two label maps, over the classes present in either (higher = more agreement).

    ``IoU_c = |{a = c} ∩ {b = c}| / |{a = c} ∪ {b = c}|``, averaged over the classes with a
    non-empty union; symmetric in its two maps. The math behind three validators: augmentation
    agreement (predictions on two views of the same images, mapped back to one frame), ensemble
    agreement (a candidate against the ensemble) and MixVal (a prediction on a mixed image against
    the mixed labels).

    Args:
        prediction, reference: integer ``(N, H, W)`` (any one shape) class maps, values in
            ``[0, C)``.
        num_classes: ``C``.
        valid: optional bool mask of the pixels to score, the maps' shape.

    Returns:
        a float64 scalar; NaN when no pixel is scored.

    >>> import torch
    >>> agreement_miou(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 3).item()
    0.5833333333333333
    """
    check_positive_int("num_classes", num_classes)
    return _miou_present(_agreement_confusion(prediction, reference, num_classes, valid))


class AugmentationAgreement(nn.Module):
    """Accumulating :func:`agreement_miou` between a prediction and a view's prediction.

    Feed the predictions on the images and on an augmented view of them, mapped back to the
    images' frame (e.g. flip the mirrored view's prediction back). The validator of consistency
    under augmentation (e.g. the flip/scale test-time consistency used for UDA segmentation model
    selection, and the weak/strong agreement of FixMatch-style methods).

    Shape:
        - update: ``prediction``, ``view_prediction`` integer ``(N, H, W)``; ``valid`` bool.
        - compute: scalar float64.

    >>> import torch
    >>> acc = AugmentationAgreement(2)
    >>> acc.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    >>> acc.compute().item()
    1.0
    """

    higher_is_better = True
    matrix: torch.Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.register_buffer("matrix", torch.zeros(num_classes, num_classes, dtype=torch.int64))

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(
        self,
        prediction: torch.Tensor,
        view_prediction: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        cm = _agreement_confusion(prediction, view_prediction, self.num_classes, valid)
        self.matrix.add_(cm.to(self.matrix.device))

    def compute(self) -> torch.Tensor:
        return _miou_present(all_reduce_sum(self.matrix))


class MixValScore(AugmentationAgreement):
    """Accumulating MixVal agreement: predictions on :func:`mixval_probe` images vs its labels.

    Shape:
        - update: ``prediction`` (on the mixed images), ``mixed_labels`` integer ``(N, H, W)``.
        - compute: scalar float64.

    >>> import torch
    >>> acc = MixValScore(2)
    >>> acc.update(torch.tensor([[[0, 1]]]), torch.tensor([[[1, 1]]]))
    >>> acc.compute().item()
    0.25
    """

    @torch.no_grad()
    def update(  # type: ignore[override]
        self,
        prediction: torch.Tensor,
        mixed_labels: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        super().update(prediction, mixed_labels, valid)


def _ensemble_confusions(probabilities: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    k, c = probabilities.shape[0], probabilities.shape[2]
    vote = probabilities.double().mean(0).argmax(1)  # (N, H, W): the ensemble's prediction
    preds = probabilities.argmax(2)  # (K, N, H, W)
    ref = vote if valid is None else torch.where(valid, vote, torch.full_like(vote, 255))
    return torch.stack([confusion_matrix(preds[i], ref, c, ignore_index=255) for i in range(k)])


def ensemble_agreement(
    probabilities: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Each candidate's :func:`agreement_miou` against the candidates' mean prediction (EnsV).

    The ensemble's label per pixel is ``argmax_c (1/K) Σ_k p^k_c``; candidate ``k`` scores
    ``agreement_miou(argmax p^k, ensemble)``. EnsV (Hu et al., NeurIPS 2024) validates a
    classifier by its accuracy against the ensemble of all candidates; the ensemble is more
    accurate than most of its members and never collapses as a single candidate can.

    Args:
        probabilities: ``(K, N, C, H, W)``: ``K ≥ 1`` candidates' softmax probabilities on the same
            images.
        valid: optional ``(N, H, W)`` bool mask of the pixels to score.

    Returns:
        ``(K,)`` float64.

    >>> import torch
    >>> a = torch.eye(2).view(1, 2, 2, 1).expand(1, 2, 2, 2).clone()  # predicts 0 | 1 by row
    >>> p = torch.stack([a, a, a.flip(2)])  # two candidates agree, one is the opposite
    >>> ensemble_agreement(p).tolist()
    [1.0, 1.0, 0.0]
    """
    p = _check_probabilities("probabilities", probabilities, ndim=5)
    v = _check_valid(valid, (p.shape[1], *p.shape[3:]), p.device)
    return _miou_present(_ensemble_confusions(p, v))


class EnsembleAgreement(nn.Module):
    """Accumulating :func:`ensemble_agreement` over batches (``K`` confusion matrices).

    Shape:
        - update: ``probabilities`` ``(K, N, C, H, W)``, ``valid`` ``(N, H, W)`` bool or None.
        - compute: ``(K,)`` float64.

    >>> import torch
    >>> acc = EnsembleAgreement(2, 2)
    >>> a = torch.eye(2).view(1, 2, 2, 1)
    >>> acc.update(torch.stack([a, a]))
    >>> acc.compute().tolist()
    [1.0, 1.0]
    """

    higher_is_better = True
    matrices: torch.Tensor

    def __init__(self, num_candidates: int, num_classes: int) -> None:
        super().__init__()
        self.num_candidates = check_positive_int("num_candidates", num_candidates)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.register_buffer(
            "matrices", torch.zeros(num_candidates, num_classes, num_classes, dtype=torch.int64)
        )

    def reset(self) -> None:
        self.matrices.zero_()

    @torch.no_grad()
    def update(self, probabilities: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        p = _check_probabilities("probabilities", probabilities, ndim=5)
        if p.shape[0] != self.num_candidates or p.shape[2] != self.num_classes:
            raise ValueError(
                f"probabilities must have shape ({self.num_candidates}, N, {self.num_classes}, H, "
                f"W), got {tuple(p.shape)}"
            )
        v = _check_valid(valid, (p.shape[1], *p.shape[3:]), p.device)
        self.matrices.add_(_ensemble_confusions(p, v).to(self.matrices.device))

    def compute(self) -> torch.Tensor:
        return _miou_present(all_reduce_sum(self.matrices))


class MixValProbe(NamedTuple):
    """Mixed images and their labels (the candidate's own predictions, mixed the same way)."""

    images: torch.Tensor
    labels: torch.Tensor


def mixval_probe(
    images: torch.Tensor,
    prediction: torch.Tensor,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
) -> MixValProbe:
    """ClassMix probes for MixVal: paste half of a partner image's predicted classes onto each image.

    Image ``i``'s partner is image ``i − 1`` of the batch (cyclically), mirrored; the pasted
    classes are drawn as in ClassMix (:func:`~uda_selftrain.classmix_masks` of the partner's
    predicted map). The labels are the candidate's predictions mixed by the same masks, so a
    candidate scores high when its predictions survive a change of context. MixVal (Hu et al.,
    NeurIPS 2023) probes a classifier with mixup of target samples labelled by its own
    predictions; ClassMix is the form of mixing that suits segmentation.

    Args:
        images: ``(N, 3, H, W)`` uint8 or float.
        prediction: ``(N, H, W)`` integer: the candidate's prediction on ``images``.
        num_classes: ``C``.
        generator: CPU generator for the class draw.

    Returns:
        :class:`MixValProbe` (``images`` like the input, ``labels`` int64 ``(N, H, W)``).

    >>> import torch
    >>> x = torch.zeros(2, 3, 2, 2, dtype=torch.uint8); x[1] = 255
    >>> pred = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [2, 2]]])
    >>> probe = mixval_probe(x, pred, 3, generator=torch.Generator().manual_seed(0))
    >>> probe.images.shape, probe.labels.shape
    (torch.Size([2, 3, 2, 2]), torch.Size([2, 2, 2]))
    """
    x = check_tensor("images", images)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
    pred = _check_prediction("prediction", prediction)
    n, _, h, w = x.shape
    if tuple(pred.shape) != (n, h, w):
        raise ValueError(f"prediction must have shape {(n, h, w)}, got {tuple(pred.shape)}")
    if pred.device != x.device:
        raise ValueError(f"prediction must be on the images' device {x.device}, got {pred.device}")
    partner_x = x.roll(1, 0).flip(-1)
    partner_y = pred.long().roll(1, 0).flip(-1)
    mask = classmix_masks(partner_y, num_classes, generator=generator)
    return MixValProbe(
        torch.where(mask[:, None], partner_x, x), torch.where(mask, partner_y, pred.long())
    )


# ---------------------------------------------------------------------------------------------
# Every validator over a set of candidates
# ---------------------------------------------------------------------------------------------


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x).float()
    if tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return torch.softmax(logits, 1)


def _view_prediction(model: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
    """The prediction on the mirrored, rescaled images, mapped back to the images' frame."""
    v = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False).flip(-1)
    logits = model(v).float().flip(-1)
    logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)


@torch.no_grad()
def score_candidates(
    candidates: Sequence[nn.Module],
    batches: Iterable[torch.Tensor],
    num_classes: int,
    *,
    view_scale: float = 0.75,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> list[dict[str, float]]:
    """Every validator of :data:`VALIDATORS` for each candidate model, on unlabelled images.

    For each batch and candidate: the probabilities on the images (entropy, class-balanced entropy,
    information maximisation, SND), the prediction on a mirrored view rescaled by ``view_scale``
    (augmentation agreement), the prediction on MixVal probes made from its own prediction
    (MixVal); and across candidates the ensemble agreement. Models are put in eval mode and
    restored. Randomness (SND pixels, ClassMix classes) comes from CPU generators seeded by
    ``seed``, the same for every candidate.

    Args:
        candidates: ``K ≥ 1`` models mapping normalised ``(N, 3, H, W)`` images to logits.
        batches: ``(N, 3, H, W)`` uint8 (or float in ``[0, 1]``) target images, on the models'
            device.
        num_classes: ``C``.

    Returns:
        one dict per candidate, validator name → score (see :data:`VALIDATORS` for the direction).

    >>> import torch
    >>> from torch import nn
    >>> models = [nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)]
    >>> images = [torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)]
    >>> scores = score_candidates(models, images, 3)
    >>> sorted(scores[0]) == sorted(VALIDATORS)
    True
    """
    models = list(candidates)
    if not models:
        raise ValueError("candidates must hold at least one model")
    k = len(models)
    c = check_positive_int("num_classes", num_classes)
    _check_positive("view_scale", view_scale)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    ent = [PredictionEntropy(c) for _ in models]
    cb_ent = [PredictionEntropy(c, class_balanced=True) for _ in models]
    im = [InformationMaximization(c) for _ in models]
    snd = [SoftNeighbourhoodDensity(seed=seed) for _ in models]
    aug = [AugmentationAgreement(c) for _ in models]
    mix = [MixValScore(c) for _ in models]
    ens = EnsembleAgreement(k, c)
    seen = 0
    try:
        for b, images in enumerate(batches):
            x = _normalise(check_tensor("batches", images), mean, std)
            probs = []
            for i, model in enumerate(models):
                p = _probabilities(model, x)
                if p.shape[1] != c:
                    raise ValueError(f"candidate {i} predicts {p.shape[1]} classes, not {c}")
                pred = p.argmax(1)
                ent[i].update(p)
                cb_ent[i].update(p)
                im[i].update(p)
                snd[i].update(p)
                aug[i].update(pred, _view_prediction(model, x, view_scale))
                gen = torch.Generator().manual_seed(seed * 100003 + b)
                probe = mixval_probe(images, pred, c, generator=gen)
                mixed = _probabilities(model, _normalise(probe.images, mean, std)).argmax(1)
                mix[i].update(mixed, probe.labels)
                probs.append(p)
            ens.update(torch.stack(probs))
            seen += 1
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    if seen == 0:
        raise ValueError("batches yielded no images to score")
    ensemble = ens.compute().tolist()
    return [
        {
            "entropy": float(ent[i].compute()),
            "class_balanced_entropy": float(cb_ent[i].compute()),
            "information_maximization": float(im[i].compute()),
            "snd": float(snd[i].compute()),
            "augmentation_agreement": float(aug[i].compute()),
            "ensemble_agreement": float(ensemble[i]),
            "mixval": float(mix[i].compute()),
        }
        for i in range(k)
    ]


#: Policies :func:`select_candidate` knows besides the validators themselves.
COMBINED = ("mean_rank",)


def mean_ranks(scores: Sequence[dict[str, float]]) -> list[float]:
    """Each candidate's rank under every validator of :data:`VALIDATORS`, averaged (0 = best).

    Ranks follow each validator's direction; a NaN score ranks last; ties share their mean rank.
    A candidate that no single validator favours but that none ranks badly scores well: a vote of
    validators whose failures differ.

    >>> s = [{k: 0.0 for k in VALIDATORS}, {k: (1.0 if VALIDATORS[k] else -1.0) for k in VALIDATORS}]
    >>> mean_ranks(s)
    [1.0, 0.0]
    """
    if not scores:
        raise ValueError("scores must hold at least one candidate")
    n = len(scores)
    total = [0.0] * n
    for name, higher in VALIDATORS.items():
        keyed = []
        for s in scores:
            v = s[name]
            keyed.append(-math.inf if math.isnan(v) else (v if higher else -v))
        order = sorted(range(n), key=lambda i: -keyed[i])
        i = 0
        while i < n:  # average rank over ties
            j = i
            while j + 1 < n and keyed[order[j + 1]] == keyed[order[i]]:
                j += 1
            for k in range(i, j + 1):
                total[order[k]] += (i + j) / 2
            i = j + 1
    return [t / len(VALIDATORS) for t in total]


def select_candidate(scores: Sequence[dict[str, float]], validator: str) -> int:
    """Index of the best candidate by ``validator`` (NaN scores lose; ties go to the earliest).

    ``validator`` is a name of :data:`VALIDATORS` or ``"mean_rank"`` (:func:`mean_ranks`).

    >>> select_candidate([{"entropy": 0.3}, {"entropy": 0.1}, {"entropy": 0.2}], "entropy")
    1
    """
    if validator not in VALIDATORS and validator not in COMBINED:
        raise ValueError(
            f"unknown validator {validator!r}; choose one of {sorted(VALIDATORS) + list(COMBINED)}"
        )
    if not scores:
        raise ValueError("scores must hold at least one candidate")
    if validator == "mean_rank":
        ranks = mean_ranks(scores)
        return min(range(len(ranks)), key=lambda i: (ranks[i], i))
    sign = 1.0 if VALIDATORS[validator] else -1.0
    keyed = [sign * s[validator] if not math.isnan(s[validator]) else -math.inf for s in scores]
    return max(range(len(keyed)), key=lambda i: (keyed[i], -i))
