"""Input validation shared by the public primitives.

Every public function validates at its boundary and raises one clear ``TypeError`` (wrong type or
dtype) or ``ValueError`` (wrong shape, range, device or option) naming the argument, what was
expected and what was received.

Two kinds of checks:

* **structural** (type, dtype, shape, device, options): free, always on;
* **value** checks (NaN/Inf, label and prediction ranges, the image scale, probabilities that do
  not sum to 1): each reads a result back to the host, i.e. one device synchronisation per check.
  They are on by default. Switch them off where the data is known to be valid — for one block of
  code with the thread-local context manager ``with value_checks(False): ...``, or as the
  process-wide default with :func:`set_value_checks` — to keep a training step free of syncs.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch

_DEFAULT = True
_LOCAL = threading.local()  # per-thread override set by value_checks()


def set_value_checks(enabled: bool) -> None:
    """Set the process-wide default of the value checks (on initially).

    A :func:`value_checks` block overrides it in its own thread.

    >>> set_value_checks(False); set_value_checks(True)
    """
    global _DEFAULT
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _DEFAULT = enabled


def value_checks_enabled() -> bool:
    """Whether value checks (NaN/Inf, ranges; each a host sync) run in this thread now."""
    override = getattr(_LOCAL, "enabled", None)
    return _DEFAULT if override is None else override


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the value checks on or off inside a ``with`` block, in this thread only.

    Blocks nest, and other threads (e.g. data-loading threads) keep their own setting.

    >>> import torch, uda_selftrain as ust
    >>> with ust.value_checks(False):
    ...     loss = ust.pseudo_label_ce(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous = getattr(_LOCAL, "enabled", None)
    _LOCAL.enabled = enabled
    try:
        yield
    finally:
        _LOCAL.enabled = previous


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
    if value_checks_enabled() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_ignore_index(ignore_index: object, num_classes: int | None = None) -> int:
    """The one check of ``ignore_index``: an int, and not a class index in ``[0, num_classes)``."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if num_classes is not None and 0 <= ignore_index < num_classes:
        raise ValueError(
            f"ignore_index must not be a class index in [0, {num_classes}), got {ignore_index}"
        )
    return ignore_index


def check_label_map(
    name: str,
    labels: object,
    shape: tuple[int, ...] | torch.Size,
    *,
    device: torch.device | None = None,
    reference: str = "images",
) -> torch.Tensor:
    """A per-pixel integer map of ``shape``, on ``device`` (``reference``'s) when given.

    Structural only (dtype → ``TypeError``; shape, device → ``ValueError``), no host read.
    """
    t = check_tensor(name, labels)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 or uint8), got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but {reference} is on {device}: put them on one device"
        )
    return t


def check_labels(
    name: str,
    labels: object,
    shape: tuple[int, ...] | torch.Size,
    num_classes: int,
    ignore_index: int,
    *,
    device: torch.device | None = None,
    reference: str = "logits",
) -> torch.Tensor:
    """Labels must be an integer tensor of ``shape`` with values in ``[0, num_classes) ∪ {ignore}``.

    The device (when given) is checked before the values, so a label tensor on another device
    fails with both devices named rather than inside the value check.
    """
    check_ignore_index(ignore_index, num_classes)
    t = check_label_map(name, labels, shape, device=device, reference=reference)
    if value_checks_enabled() and t.numel() > 0:
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


def check_weight(name: str, value: object) -> float:
    """A loss weight: a finite, non-negative real number (a NaN weight would poison the total)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and non-negative, got {v}")
    return v
