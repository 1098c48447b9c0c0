"""Exponential-moving-average (mean) teacher (HIAST §3.4; method §5).

After every optimiser step ``θ̄ ← m θ̄ + (1 − m) θ`` with ``m = 0.999``; buffers (batch-norm
statistics) are copied from the student (or averaged the same way, by option). The teacher runs in
eval mode without gradients.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from ._checks import check_unit_interval, value_checks_enabled

__all__ = ["EMATeacher", "unwrap_model"]

BufferMode = Literal["copy", "ema"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (or ``model`` itself).

    >>> from torch import nn
    >>> m = nn.Linear(2, 2)
    >>> unwrap_model(nn.DataParallel(m)) is m
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class EMATeacher(nn.Module):
    """EMA copy of a student network.

    Args:
        student: the student (may be wrapped in ``DistributedDataParallel``); deep-copied.
        momentum: ``m`` (0.999).
        warmup: use ``min(1 − 1/(step + 1), m)`` so the teacher follows the student early on.
        buffers: ``"copy"`` (the student's buffers, as the public implementation) or ``"ema"``
            (floating buffers averaged with the same momentum; integer buffers copied).

    Parameters are updated in place with one fused ``torch._foreach_lerp_`` call (no clones).
    ``state_dict()`` holds the teacher network under ``module.`` and the step counter.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> student = nn.Linear(2, 2)
    >>> teacher = EMATeacher(student, momentum=0.9)
    >>> with torch.no_grad():
    ...     _ = student.weight.add_(1.0)
    >>> teacher.update(student)
    >>> bool(torch.allclose(teacher.module.weight, student.weight - 0.9, atol=1e-6))
    True
    """

    step: torch.Tensor

    def __init__(
        self,
        student: nn.Module,
        *,
        momentum: float = 0.999,
        warmup: bool = False,
        buffers: BufferMode = "copy",
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        self.momentum = check_unit_interval("momentum", momentum)
        if buffers not in ("copy", "ema"):
            raise ValueError(f"buffers must be 'copy' or 'ema', got {buffers!r}")
        self.warmup = bool(warmup)
        self.buffer_mode: BufferMode = buffers
        self.module = copy.deepcopy(unwrap_model(student))
        self.module.eval()
        self.module.requires_grad_(False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def train(self, mode: bool = True) -> EMATeacher:
        # The teacher always predicts in eval mode (running BN statistics, no dropout).
        super().train(mode)
        self.module.eval()
        return self

    def current_momentum(self) -> float:
        """Momentum used by the next :meth:`update` (reads the step counter from the host)."""
        if not self.warmup:
            return self.momentum
        step = int(self.step)
        return min(1.0 - 1.0 / (step + 1), self.momentum)

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        """Copy the student's weights and buffers (start of a self-training round); step to 0."""
        self.module.load_state_dict(unwrap_model(student).state_dict())
        self.step.zero_()

    def _check_student(self, student: nn.Module) -> None:
        """Same parameter and buffer names, shapes, dtypes and devices as the teacher (once per
        student object: the check walks every tensor's metadata, reads no values)."""
        key = id(student)
        if getattr(self, "_checked_student", None) == key:
            return
        for kind, t_named, s_named in (
            ("parameter", self.module.named_parameters(), student.named_parameters()),
            ("buffer", self.module.named_buffers(), student.named_buffers()),
        ):
            t_map, s_map = dict(t_named), dict(s_named)
            if t_map.keys() != s_map.keys():
                missing = sorted(t_map.keys() - s_map.keys())[:3]
                extra = sorted(s_map.keys() - t_map.keys())[:3]
                raise ValueError(
                    f"student is not the teacher's architecture: {kind} names differ "
                    f"(missing {missing}, unexpected {extra})"
                )
            for name, t in t_map.items():
                s = s_map[name]
                if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
                    raise ValueError(
                        f"student {kind} {name!r} is {tuple(s.shape)} {s.dtype} on {s.device}, "
                        f"the teacher's {tuple(t.shape)} {t.dtype} on {t.device} (cast or move "
                        "the teacher with the student, e.g. teacher.to(device))"
                    )
        self._checked_student = key

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student``; call after every optimiser step.

        While value checks are on, a student with NaN or Inf weights is an error (one host sync)
        instead of being averaged into the teacher.
        """
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        student = unwrap_model(student)
        self._check_student(student)
        m = self.current_momentum()
        t_params = list(self.module.parameters())
        s_params = list(student.parameters())
        if value_checks_enabled() and s_params:
            floats = [p.detach() for p in s_params if p.is_floating_point()]
            # A NaN or Inf anywhere makes that tensor's norm non-finite: one fused reduction.
            norms = torch._foreach_norm(floats) if floats else []
            if norms and not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
                raise ValueError("student has NaN or Inf parameters: not averaged into the teacher")
        float_t = [t for t in t_params if t.is_floating_point()]
        float_s = [
            s.detach() for t, s in zip(t_params, s_params, strict=True) if t.is_floating_point()
        ]
        if float_t:
            torch._foreach_lerp_(float_t, float_s, 1.0 - m)
        for tb, sb in zip(self.module.buffers(), student.buffers(), strict=True):
            if self.buffer_mode == "ema" and tb.is_floating_point():
                tb.lerp_(sb.detach(), 1.0 - m)
            else:
                tb.copy_(sb)
        self.step.add_(1)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher network (eval mode, no gradients)."""
        return self.module(*args, **kwargs)
