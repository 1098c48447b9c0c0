"""Input validation shared by the public primitives.

Every public function validates at its boundary and raises one clear ``TypeError`` or
``ValueError`` naming the argument, what was expected and what was received. Checks that would need
the tensor's *values* (NaN/Inf, label range) cost a device-to-host synchronisation, so they are
gated by :func:`set_value_checks` and are on by default; a training loop that has validated its data
once may switch them off to keep the hot path free of syncs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_VALUE_CHECKS = True


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks (NaN/Inf inputs, out-of-range labels) on or off globally.

    They are on by default. Each costs one host synchronisation per call; shape and dtype checks
    are free and always run.

    >>> set_value_checks(False); set_value_checks(True)
    """
    global _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether value checks (NaN/Inf, label range) currently run."""
    return _VALUE_CHECKS


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_value_checks`.

    >>> with value_checks(False):
    ...     pass
    """
    previous = _VALUE_CHECKS
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(
    name: str, x: object, ndim: int | None = None, shape_hint: str = ""
) -> torch.Tensor:
    t = check_tensor(name, x)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{name} must have {ndim} dimensions{hint}, got shape {tuple(t.shape)}")
    return t


def check_finite(name: str, x: torch.Tensor) -> None:
    if _VALUE_CHECKS and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_labels(
    name: str,
    labels: object,
    shape: tuple[int, ...] | torch.Size,
    num_classes: int,
    ignore_index: int,
) -> torch.Tensor:
    """Labels must be an integer tensor of ``shape`` with values in ``[0, num_classes) ∪ {ignore}``."""
    t = check_tensor(name, labels)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 or uint8), got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if _VALUE_CHECKS and t.numel() > 0:
        bad = (t != ignore_index) & ((t < 0) | (t >= num_classes))
        if bool(bad.any()):
            value = int(t[bad].flatten()[0])
            raise ValueError(
                f"{name} has value {value} outside [0, {num_classes}) that is not the ignore "
                f"index {ignore_index}"
            )
    return t


def check_unit_interval(
    name: str, value: float, *, open_low: bool = False, open_high: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    low_ok = v > 0 if open_low else v >= 0
    high_ok = v < 1 if open_high else v <= 1
    if not (low_ok and high_ok):
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        raise ValueError(f"{name} must lie in {lo}0, 1{hi}, got {v}")
    return v


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
