"""Self-training losses of HIAST: pseudo-label CE, region-adaptive regularisation, consistency.

Regions (method §4): the *confident* region ``I`` holds the pixels with a pseudo-label
(``labels ≠ ignore_index``), the *ignored* region ``Ī`` the rest. With ``p = softmax(logits)``:

* pseudo-label CE on ``I``: ``mean_{i∈I} −log p_ŷ(i)``;
* smoothing on ``I`` (KL to the uniform distribution, constant dropped):
  ``R_c = Σ_{i∈I} Σ_c −(1/C) log p_c(i) / (C·|I|)``;
* sharpening on ``Ī`` (entropy): ``R_i = Σ_{i∈Ī} Σ_c −p_c log p_c / (C·|Ī|)``;
* consistency to the teacher on a region ``R``: ``Σ_{i∈R} Σ_c −q_c log p_c / (C·|R|)`` with
  ``q = softmax(teacher_logits)``.

**Normalisation.** The public implementation divides the class-summed terms by the number of
elements of an ``(N, C, H, W)`` mask, i.e. by ``C·|R|``; that extra ``1/C`` is the default here
(``normalization="reference"``) so that the published loss weights transfer. ``"pixel"`` divides
by ``|R|`` alone. An empty region contributes exactly 0 (and a zero gradient), never NaN.

No ``(N, C, H, W)`` weight tensor is built and nothing synchronises with the host. The fused
:func:`hiast_loss` computes every term from one log-softmax per image and recomputes in its
backward pass instead of storing activations, which keeps its peak memory low.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from ._checks import (
    check_finite,
    check_float,
    check_ignore_index,
    check_labels,
    check_tensor,
    check_weight,
)

__all__ = [
    "ConsistencyLoss",
    "HIASTLoss",
    "HIASTLossOutput",
    "RegionAdaptiveLoss",
    "RegionAdaptiveLossOutput",
    "consistency_loss",
    "entropy_loss",
    "hiast_loss",
    "pseudo_label_ce",
    "region_adaptive_loss",
    "region_masks",
    "smoothing_loss",
]

Normalization = Literal["reference", "pixel"]
Region = Literal["ignored", "confident", "all"]


def _check_logits(name: str, logits: object, *, finite: bool = True) -> torch.Tensor:
    t = check_float(name, logits, ndim=4, shape_hint="(N, C, H, W)")
    if finite:
        check_finite(name, t)
    return t


def _check_inputs(
    logits: object, labels: object, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    x = _check_logits("logits", logits)
    n, c, h, w = x.shape
    y = check_labels("labels", labels, (n, h, w), c, ignore_index, device=x.device)
    return x, y


def _check_norm(normalization: str) -> None:
    if normalization not in ("reference", "pixel"):
        raise ValueError(f"normalization must be 'reference' or 'pixel', got {normalization!r}")


def _check_region(name: str, region: str) -> None:
    if region not in ("ignored", "confident", "all"):
        raise ValueError(f"{name} must be 'ignored', 'confident' or 'all', got {region!r}")


def _check_teacher(teacher_logits: object, student: torch.Tensor) -> torch.Tensor:
    # Structure and device first: a teacher on another device fails naming both, before a value read.
    t = _check_logits("teacher_logits", teacher_logits, finite=False)
    if t.shape != student.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student.shape)}, "
            f"got {tuple(t.shape)}"
        )
    if t.device != student.device:
        raise ValueError(
            f"teacher_logits is on {t.device} but logits is on {student.device}: put them on one "
            "device"
        )
    check_finite("teacher_logits", t)
    return t.detach()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs (reductions in float32), float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def region_masks(
    labels: torch.Tensor, *, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident (``labels ≠ ignore_index``) and ignored masks, both ``(N, H, W)`` bool.

    >>> import torch
    >>> conf, ign = region_masks(torch.tensor([[[0, 255]]]))
    >>> conf.tolist(), ign.tolist()
    ([[[True, False]]], [[[False, True]]])
    """
    check_ignore_index(ignore_index)
    t = check_tensor("labels", labels)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {t.dtype}")
    confident = t != ignore_index
    return confident, ~confident


def _region_weight(
    mask: torch.Tensor, denominator_scale: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-pixel weight ``mask / (scale · |mask|)``; an empty mask gives all zeros, no host sync."""
    m = mask.to(dtype)
    return m / (m.sum().clamp(min=1.0) * denominator_scale)


def pseudo_label_ce(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = 255
) -> torch.Tensor:
    """Mean cross-entropy over the pixels with a pseudo-label (0 when there are none).

    Args:
        logits: ``(N, C, H, W)`` student logits (any float dtype; computed in float32).
        labels: ``(N, H, W)`` integer pseudo-labels in ``[0, C)`` or ``ignore_index``.

    Returns:
        Scalar float32 tensor.

    >>> import torch
    >>> round(pseudo_label_ce(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)).item(), 4)
    1.3863
    """
    x, y = _check_inputs(logits, labels, ignore_index)
    confident, _ = region_masks(y, ignore_index=ignore_index)
    logp = torch.log_softmax(x.to(_compute_dtype(x)), dim=1)
    target = torch.where(confident, y, 0).long()
    nll = -logp.gather(1, target[:, None])[:, 0]
    return (nll * _region_weight(confident, 1.0, logp.dtype)).sum()


def smoothing_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = 255,
    normalization: Normalization = "reference",
) -> torch.Tensor:
    """Region-adaptive smoothing on the confident region (KL to uniform without its constant).

    ``Σ_{i∈I} Σ_c −(1/C) log p_c(i) / (C·|I|)`` (``"reference"``) or ``/ |I|`` (``"pixel"``).

    >>> import torch
    >>> round(smoothing_loss(torch.zeros(1, 4, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long)).item(), 4)
    0.3466
    """
    _check_norm(normalization)
    x, y = _check_inputs(logits, labels, ignore_index)
    c = x.shape[1]
    confident, _ = region_masks(y, ignore_index=ignore_index)
    logp = torch.log_softmax(x.to(_compute_dtype(x)), dim=1)
    per_pixel = -logp.sum(1) / c
    scale = float(c) if normalization == "reference" else 1.0
    return (per_pixel * _region_weight(confident, scale, logp.dtype)).sum()


def entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = 255,
    normalization: Normalization = "reference",
) -> torch.Tensor:
    """Region-adaptive sharpening: entropy on the ignored region.

    ``Σ_{i∈Ī} Σ_c −p_c log p_c / (C·|Ī|)`` (``"reference"``) or ``/ |Ī|`` (``"pixel"``).

    >>> import torch
    >>> y = torch.full((1, 1, 1), 255)
    >>> round(entropy_loss(torch.zeros(1, 4, 1, 1), y).item(), 4)
    0.3466
    """
    _check_norm(normalization)
    x, y = _check_inputs(logits, labels, ignore_index)
    c = x.shape[1]
    _, ignored = region_masks(y, ignore_index=ignore_index)
    logp = torch.log_softmax(x.to(_compute_dtype(x)), dim=1)
    per_pixel = -(logp.exp() * logp).sum(1)
    scale = float(c) if normalization == "reference" else 1.0
    return (per_pixel * _region_weight(ignored, scale, logp.dtype)).sum()


def _region_mask(labels: torch.Tensor, region: str, ignore_index: int) -> torch.Tensor:
    confident, ignored = region_masks(labels, ignore_index=ignore_index)
    if region == "ignored":
        return ignored
    if region == "confident":
        return confident
    if region == "all":
        return torch.ones_like(confident)
    raise ValueError(f"region must be 'ignored', 'confident' or 'all', got {region!r}")


def consistency_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    region: Region = "ignored",
    ignore_index: int = 255,
    normalization: Normalization = "reference",
) -> torch.Tensor:
    """Soft cross-entropy from the teacher's softmax to the student, restricted to a region.

    ``Σ_{i∈R} Σ_c −q_c log p_c / (C·|R|)``, ``q = softmax(teacher_logits)`` (no gradient to the
    teacher). HIAST uses ``region="ignored"``.

    Args:
        logits: ``(N, C, H, W)`` student logits.
        labels: ``(N, H, W)`` pseudo-labels defining the regions.
        teacher_logits: ``(N, C, H, W)`` teacher logits (detached).
        region: ``"ignored"``, ``"confident"`` or ``"all"``.

    The argument order is :func:`hiast_loss`'s: logits, labels, teacher logits.

    >>> import torch
    >>> y = torch.full((1, 1, 1), 255)
    >>> round(consistency_loss(torch.zeros(1, 4, 1, 1), y, torch.zeros(1, 4, 1, 1)).item(), 4)
    0.3466
    """
    _check_norm(normalization)
    _check_region("region", region)
    x, y = _check_inputs(logits, labels, ignore_index)
    t = _check_teacher(teacher_logits, x)
    c = x.shape[1]
    mask = _region_mask(y, region, ignore_index)
    logp = torch.log_softmax(x.to(_compute_dtype(x)), dim=1)
    q = torch.softmax(t.to(logp.dtype), dim=1)
    per_pixel = -(q * logp).sum(1)
    scale = float(c) if normalization == "reference" else 1.0
    return (per_pixel * _region_weight(mask, scale, logp.dtype)).sum()


class RegionAdaptiveLossOutput(NamedTuple):
    """Output of :func:`region_adaptive_loss`: the weighted total and its two unweighted terms."""

    total: torch.Tensor
    smoothing: torch.Tensor
    entropy: torch.Tensor


def region_adaptive_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing_weight: float = 0.1,
    entropy_weight: float = 1.0,
    ignore_index: int = 255,
    normalization: Normalization = "reference",
) -> RegionAdaptiveLossOutput:
    """Region-adaptive regularisation: smooth where there are pseudo-labels, sharpen elsewhere.

    ``R = w_sm·R_c + w_ent·R_i`` with (``"reference"`` normalisation)

    * ``R_c = Σ_{i∈I} Σ_c −(1/C) log p_c(i) / (C·|I|)`` on the confident region ``I``
      (KL divergence to the uniform distribution without its constant), and
    * ``R_i = Σ_{i∈Ī} Σ_c −p_c(i) log p_c(i) / (C·|Ī|)`` on the ignored region ``Ī`` (entropy).

    The published weights are ``w_sm = 0.1`` and ``w_ent = 1.0`` (IAST used 3.0). An empty region
    contributes 0. Both terms come from one log-softmax.

    Args:
        logits: ``(N, C, H, W)`` student logits (float16/bfloat16/float32/float64; reduced in at
            least float32).
        labels: ``(N, H, W)`` integer pseudo-labels, ``ignore_index`` where there is none.
        smoothing_weight: ``w_sm``, finite and ≥ 0.
        entropy_weight: ``w_ent``, finite and ≥ 0.
        ignore_index: label of the pixels without a pseudo-label.
        normalization: ``"reference"`` (÷ ``C·|R|``, the published code's) or ``"pixel"`` (÷ ``|R|``).

    Returns:
        :class:`RegionAdaptiveLossOutput` of scalars; ``total`` carries the gradient.

    Shape:
        logits ``(N, C, H, W)``, labels ``(N, H, W)`` → three scalars.

    >>> import torch
    >>> y = torch.tensor([[[0, 255]]])
    >>> out = region_adaptive_loss(torch.zeros(1, 4, 1, 2), y)
    >>> round(out.smoothing.item(), 4), round(out.entropy.item(), 4), round(out.total.item(), 4)
    (0.3466, 0.3466, 0.3812)
    """
    _check_norm(normalization)
    w_sm = check_weight("smoothing_weight", smoothing_weight)
    w_ent = check_weight("entropy_weight", entropy_weight)
    x, y = _check_inputs(logits, labels, ignore_index)
    c = x.shape[1]
    confident, ignored = region_masks(y, ignore_index=ignore_index)
    logp = torch.log_softmax(x.to(_compute_dtype(x)), dim=1)
    scale = float(c) if normalization == "reference" else 1.0
    smoothing = ((-logp.sum(1) / c) * _region_weight(confident, scale, logp.dtype)).sum()
    entropy = (-(logp.exp() * logp).sum(1) * _region_weight(ignored, scale, logp.dtype)).sum()
    return RegionAdaptiveLossOutput(w_sm * smoothing + w_ent * entropy, smoothing, entropy)


class RegionAdaptiveLoss(nn.Module):
    """Module form of :func:`region_adaptive_loss`, holding its weights and options.

    Args:
        smoothing_weight: weight of the smoothing term on the confident region (0.1).
        entropy_weight: weight of the entropy term on the ignored region (1.0).
        ignore_index: label of the pixels without a pseudo-label.
        normalization: ``"reference"`` or ``"pixel"``.

    Shape:
        logits ``(N, C, H, W)``, labels ``(N, H, W)`` → :class:`RegionAdaptiveLossOutput`.

    >>> import torch
    >>> loss = RegionAdaptiveLoss()
    >>> x = torch.randn(2, 5, 8, 8, requires_grad=True)
    >>> y = torch.randint(0, 5, (2, 8, 8)); y[:, :4] = 255
    >>> out = loss(x, y); out.total.backward(); x.grad.shape
    torch.Size([2, 5, 8, 8])
    """

    def __init__(
        self,
        *,
        smoothing_weight: float = 0.1,
        entropy_weight: float = 1.0,
        ignore_index: int = 255,
        normalization: Normalization = "reference",
    ) -> None:
        super().__init__()
        _check_norm(normalization)
        self.smoothing_weight = check_weight("smoothing_weight", smoothing_weight)
        self.entropy_weight = check_weight("entropy_weight", entropy_weight)
        self.ignore_index = check_ignore_index(ignore_index)
        self.normalization: Normalization = normalization

    def extra_repr(self) -> str:
        return (
            f"smoothing_weight={self.smoothing_weight}, entropy_weight={self.entropy_weight}, "
            f"normalization={self.normalization!r}"
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> RegionAdaptiveLossOutput:
        return region_adaptive_loss(
            logits,
            labels,
            smoothing_weight=self.smoothing_weight,
            entropy_weight=self.entropy_weight,
            ignore_index=self.ignore_index,
            normalization=self.normalization,
        )


class ConsistencyLoss(nn.Module):
    """Module form of :func:`consistency_loss`: soft cross-entropy to an EMA teacher on a region.

    Args:
        region: ``"ignored"`` (HIAST: the pixels without a pseudo-label), ``"confident"`` or
            ``"all"``.
        ignore_index: label of the pixels without a pseudo-label.
        normalization: ``"reference"`` (÷ ``C·|R|``) or ``"pixel"`` (÷ ``|R|``).

    Shape:
        logits ``(N, C, H, W)``, labels ``(N, H, W)``, teacher_logits ``(N, C, H, W)`` → scalar.

    >>> import torch
    >>> loss = ConsistencyLoss(region="all")
    >>> x = torch.zeros(1, 4, 2, 2)
    >>> round(loss(x, torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 4, 2, 2)).item(), 4)
    0.3466
    """

    def __init__(
        self,
        *,
        region: Region = "ignored",
        ignore_index: int = 255,
        normalization: Normalization = "reference",
    ) -> None:
        super().__init__()
        _check_region("region", region)
        _check_norm(normalization)
        self.region: Region = region
        self.ignore_index = check_ignore_index(ignore_index)
        self.normalization: Normalization = normalization

    def extra_repr(self) -> str:
        return f"region={self.region!r}, normalization={self.normalization!r}"

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        return consistency_loss(
            logits,
            labels,
            teacher_logits,
            region=self.region,
            ignore_index=self.ignore_index,
            normalization=self.normalization,
        )


# Tests switch this on to run the accelerator (whole-batch) form of the fused loss on a CPU.
_WHOLE_BATCH_LOSS_ON_CPU = False


def _chunks(logits: torch.Tensor) -> list[slice]:
    """Batch slices for the fused loss: one image at a time on a CPU (its buffers stay in cache and
    peak memory stays a few images' worth), the whole batch at once on accelerators (a loop over
    images would be bound by kernel launches there)."""
    n = logits.shape[0]
    if logits.device.type != "cpu" or _WHOLE_BATCH_LOSS_ON_CPU:
        return [slice(0, n)]
    return [slice(i, i + 1) for i in range(n)]


class _FusedHIAST(torch.autograd.Function):
    """Weighted sum of the four HIAST terms, image by image (CPU) or for the whole batch
    (accelerators), recomputing in backward.

    Per pixel with ``s = log p``: CE ``−s_y`` (grad ``p − onehot_y``), smoothing ``−mean_c s_c``
    (grad ``p − 1/C``), entropy ``H = −Σ p s`` (grad ``−p (s + H)``), soft CE ``−Σ q s``
    (grad ``p − q``); each scaled by its per-pixel weight.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,
        teacher: torch.Tensor | None,
        target: torch.Tensor,
        w_ce: torch.Tensor,
        w_sm: torch.Tensor,
        w_ent: torch.Tensor,
        w_cst: torch.Tensor,
    ) -> torch.Tensor:
        dtype = _compute_dtype(logits)
        terms = logits.new_zeros(4, dtype=dtype)
        c = logits.shape[1]
        for i in _chunks(logits):
            s = torch.log_softmax(logits[i].to(dtype), dim=1)
            terms[0] -= (s.gather(1, target[i][:, None])[:, 0] * w_ce[i]).sum()
            terms[1] -= (s.sum(1) * (w_sm[i] / c)).sum()
            terms[2] -= ((s.exp() * s).sum(1) * w_ent[i]).sum()
            if teacher is not None:
                q = torch.softmax(teacher[i].to(dtype), dim=1)
                terms[3] -= ((q * s).sum(1) * w_cst[i]).sum()
        ctx.save_for_backward(logits, teacher, target, w_ce, w_sm, w_ent, w_cst)
        return terms

    @staticmethod
    def backward(ctx, grad_terms: torch.Tensor):  # type: ignore[override]
        logits, teacher, target, w_ce, w_sm, w_ent, w_cst = ctx.saved_tensors
        dtype = _compute_dtype(logits)
        g_ce, g_sm, g_ent, g_cst = grad_terms.to(dtype)
        grad = torch.empty_like(logits)
        c = logits.shape[1]
        for i in _chunks(logits):
            s = torch.log_softmax(logits[i].to(dtype), dim=1)
            p = s.exp()
            a_ce = (g_ce * w_ce[i])[:, None]
            a_sm = (g_sm * w_sm[i])[:, None]
            a_ent = (g_ent * w_ent[i])[:, None]
            total = a_ce + a_sm
            entropy = -(p * s).sum(1, keepdim=True)
            # p·(a_ce + a_sm + a_cst) − a_ent·p·(s + H) − a_ce·onehot − a_sm/C − a_cst·q
            g = s.add_(entropy).mul_(p).mul_(-a_ent)
            if teacher is not None:
                a_cst = (g_cst * w_cst[i])[:, None]
                total = total + a_cst
                g.sub_(torch.softmax(teacher[i].to(dtype), dim=1).mul_(a_cst))
            g.add_(p.mul_(total)).sub_(a_sm / c)
            g.scatter_add_(1, target[i][:, None], -a_ce)
            grad[i] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None


class HIASTLossOutput(NamedTuple):
    """Total HIAST loss and its weighted-before-summing terms (each unweighted, scalar float32)."""

    total: torch.Tensor
    ce: torch.Tensor
    smoothing: torch.Tensor
    entropy: torch.Tensor
    consistency: torch.Tensor


def hiast_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    ce_weight: float = 1.0,
    smoothing_weight: float = 0.1,
    entropy_weight: float = 1.0,
    consistency_weight: float = 0.5,
    consistency_region: Region = "ignored",
    ignore_index: int = 255,
    normalization: Normalization = "reference",
) -> HIASTLossOutput:
    """The HIAST self-training objective, fused (method §4–5, HIAST Eq. 9).

    ``L = w_ce·CE_I + w_sm·R_c + w_ent·R_i + w_cst·R_cst`` with the published weights
    (1, 0.1, 1.0, 0.5). The terms equal :func:`pseudo_label_ce`, :func:`smoothing_loss`,
    :func:`entropy_loss` and :func:`consistency_loss`; the fused form computes them from one
    log-softmax per image and recomputes it in backward rather than keeping ``(N, C, H, W)``
    activations alive, so forward + backward peaks at the gradient plus a few per-image buffers
    on a CPU (one image at a time); on accelerators it runs on the whole batch at once (no loop of
    small kernels) and peaks at a few batch-sized buffers.

    Args:
        logits: ``(N, C, H, W)`` student logits on the strong view (float32/16, bfloat16).
        labels: ``(N, H, W)`` int pseudo-labels (after hard-aware copy-paste), ``ignore_index``
            where there is none.
        teacher_logits: ``(N, C, H, W)`` EMA-teacher logits on the weak view, or ``None`` to drop
            the consistency term.

    Returns:
        :class:`HIASTLossOutput`; ``total`` carries the gradient.

    >>> import torch
    >>> x = torch.randn(2, 5, 4, 4, requires_grad=True)
    >>> y = torch.randint(0, 5, (2, 4, 4)); y[:, :2] = 255
    >>> out = hiast_loss(x, y, torch.randn(2, 5, 4, 4))
    >>> out.total.backward(); x.grad.shape
    torch.Size([2, 5, 4, 4])
    """
    _check_norm(normalization)
    _check_region("consistency_region", consistency_region)
    ce_weight = check_weight("ce_weight", ce_weight)
    smoothing_weight = check_weight("smoothing_weight", smoothing_weight)
    entropy_weight = check_weight("entropy_weight", entropy_weight)
    consistency_weight = check_weight("consistency_weight", consistency_weight)
    x, y = _check_inputs(logits, labels, ignore_index)
    c = x.shape[1]
    teacher = None
    if teacher_logits is not None and consistency_weight != 0.0:
        teacher = _check_teacher(teacher_logits, x)
    confident, ignored = region_masks(y, ignore_index=ignore_index)
    scale = float(c) if normalization == "reference" else 1.0
    dtype = _compute_dtype(x)
    w_ce = _region_weight(confident, 1.0, dtype)
    w_sm = _region_weight(confident, scale, dtype)
    w_ent = _region_weight(ignored, scale, dtype)
    w_cst = _region_weight(_region_mask(y, consistency_region, ignore_index), scale, dtype)
    target = torch.where(confident, y, 0).long()
    terms = _FusedHIAST.apply(x, teacher, target, w_ce, w_sm, w_ent, w_cst)
    weights = terms.new_tensor([ce_weight, smoothing_weight, entropy_weight, consistency_weight])
    if teacher is None:
        weights[3] = 0.0
    total = (terms * weights).sum()
    return HIASTLossOutput(total, terms[0], terms[1], terms[2], terms[3])


class HIASTLoss(nn.Module):
    """The HIAST objective as a composition: pseudo-label CE + :class:`RegionAdaptiveLoss` +
    ``consistency_weight`` × :class:`ConsistencyLoss`.

    ``L = w_ce·CE_I + (w_sm·R_c + w_ent·R_i) + w_cst·R_cst``. The parts are submodules
    (``self.regularisation``, ``self.consistency``), so each can be inspected or called alone;
    the forward pass evaluates them together through the fused kernel of :func:`hiast_loss`
    (one log-softmax per image, recomputed in backward), which equals the sum of the parts in value
    and gradient.

    Args:
        ce_weight: pseudo-label CE weight (published: 1.0).
        smoothing_weight: smoothing weight on the confident region (0.1).
        entropy_weight: entropy weight on the ignored region (1.0; IAST used 3.0).
        consistency_weight: consistency weight (0.5; IAST had no consistency).
        consistency_region: ``"ignored"`` (HIAST), ``"confident"`` or ``"all"``.
        ignore_index: pseudo-label of unselected pixels.
        normalization: ``"reference"`` (÷ C·|R|, default) or ``"pixel"`` (÷ |R|).

    Shape:
        logits ``(N, C, H, W)``, labels ``(N, H, W)``, teacher_logits ``(N, C, H, W)`` or ``None``
        → :class:`HIASTLossOutput` of scalars.

    >>> import torch
    >>> loss = HIASTLoss()
    >>> out = loss(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 255), torch.randn(1, 3, 4, 4))
    >>> out.ce.item()
    0.0
    >>> loss.regularisation, loss.consistency
    (RegionAdaptiveLoss(smoothing_weight=0.1, entropy_weight=1.0, normalization='reference'), ConsistencyLoss(region='ignored', normalization='reference'))
    """

    def __init__(
        self,
        *,
        ce_weight: float = 1.0,
        smoothing_weight: float = 0.1,
        entropy_weight: float = 1.0,
        consistency_weight: float = 0.5,
        consistency_region: Region = "ignored",
        ignore_index: int = 255,
        normalization: Normalization = "reference",
    ) -> None:
        super().__init__()
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.consistency_weight = check_weight("consistency_weight", consistency_weight)
        self.regularisation = RegionAdaptiveLoss(
            smoothing_weight=smoothing_weight,
            entropy_weight=entropy_weight,
            ignore_index=ignore_index,
            normalization=normalization,
        )
        self.consistency = ConsistencyLoss(
            region=consistency_region, ignore_index=ignore_index, normalization=normalization
        )
        self.ignore_index = check_ignore_index(ignore_index)
        self.normalization: Normalization = normalization

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, consistency_weight={self.consistency_weight}"

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> HIASTLossOutput:
        return hiast_loss(
            logits,
            labels,
            teacher_logits,
            ce_weight=self.ce_weight,
            smoothing_weight=self.regularisation.smoothing_weight,
            entropy_weight=self.regularisation.entropy_weight,
            consistency_weight=self.consistency_weight,
            consistency_region=self.consistency.region,
            ignore_index=self.ignore_index,
            normalization=self.normalization,
        )
