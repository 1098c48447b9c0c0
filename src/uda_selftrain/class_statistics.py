"""Pseudo-label statistics and class difficulty for hard-aware copy-paste (HPLA; method §3).

The *class value* ``v_c`` (momentum average of the mean confidence of the pixels selected as ``c``,
kept by :class:`~uda_selftrain.selection.InstanceAdaptiveSelector`) measures how easy a class is.
The hard classes are the ``K`` with the smallest values, and a hard class is drawn for copy-paste
with probability ``π_c ∝ (1 − v_c)²`` renormalised over the hard set.

:class:`ClassStatistics` holds what a round of pseudo-labelling records (the class values and
thresholds, each image's selected pixels per class) and reads and writes the public
implementation's statistics files.

Unlike the public implementation, classes that can never occur (e.g. SYNTHIA's terrain, truck and
train) and classes without a donor image are excluded *before* normalising, so the probabilities
never become NaN.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ._checks import (
    check_float,
    check_positive_int,
    check_tensor,
    check_unit_interval,
    value_checks_enabled,
)
from .atomic import atomic_save_json, atomic_save_npy

__all__ = [
    "ClassDifficulty",
    "ClassStatistics",
    "class_difficulty",
    "default_num_hard",
    "sampling_probabilities",
]


def _check_class_values(class_values: object) -> torch.Tensor:
    v = check_float("class_values", class_values, ndim=1, shape_hint="(C,)")
    if value_checks_enabled() and v.numel() and not bool(((v >= 0) & (v <= 1)).all()):
        raise ValueError(f"class_values must lie in [0, 1] (no NaN), got {v.tolist()}")
    return v


def sampling_probabilities(
    class_values: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``π_c ∝ (1 − v_c)²`` over the classes where ``mask`` is true (all by default), 0 elsewhere.

    Args:
        class_values: ``(C,)`` class values in ``[0, 1]``.
        mask: optional ``(C,)`` bool, the classes that may be drawn.

    Returns:
        ``(C,)`` float64 probabilities summing to 1, or all zeros when no class may be drawn (or
        every allowed class has value 1).

    >>> import torch
    >>> sampling_probabilities(torch.tensor([0.5, 0.0, 1.0])).tolist()
    [0.2, 0.8, 0.0]
    """
    v = _check_class_values(class_values).double()
    weight = (1.0 - v.clamp(0.0, 1.0)) ** 2
    if mask is not None:
        weight = torch.where(mask.to(weight.device), weight, torch.zeros_like(weight))
    total = weight.sum()
    return torch.where(total > 0, weight / total.clamp(min=torch.finfo(torch.float64).tiny), weight)


class ClassDifficulty(NamedTuple):
    """Hard classes and how to draw them.

    Attributes:
        hard_classes: ``(K',)`` int64 hard classes in increasing class value (``K' ≤ K`` when
            classes were excluded).
        probabilities: ``(C,)`` float64 drawing probability of every class (0 outside the hard set).
        hard_mask: ``(C,)`` bool membership of the hard set.
    """

    hard_classes: torch.Tensor
    probabilities: torch.Tensor
    hard_mask: torch.Tensor


#: The published setting pastes K = 14 hard classes of C = 19; other class counts scale it.
PAPER_HARD_FRACTION = 14 / 19


def default_num_hard(num_classes: int) -> int:
    """The one default number of hard classes: ``round(14/19 · C)``, at least 1 (14 of 19).

    >>> default_num_hard(19), default_num_hard(16), default_num_hard(9)
    (14, 12, 7)
    """
    return max(1, round(PAPER_HARD_FRACTION * check_positive_int("num_classes", num_classes)))


def class_difficulty(
    class_values: torch.Tensor,
    *,
    num_hard: int | None = None,
    absent_classes: Sequence[int] = (),
    has_donor: torch.Tensor | None = None,
) -> ClassDifficulty:
    """The hard classes (the ``num_hard`` smallest class values) and their drawing probabilities.

    Args:
        class_values: ``(C,)`` class values ``v``.
        num_hard: ``K``; default :func:`default_num_hard` (``round(14/19 · C)``: 14 of 19, the
            published setting).
        absent_classes: classes that can never occur (SYNTHIA: 9, 14, 16); never hard.
        has_donor: optional ``(C,)`` bool, whether any target image contains the class; classes
            without a donor are never hard.

    Ties in value keep the lower class index first (stable sort), as ``numpy.argsort(kind="stable")``.

    >>> import torch
    >>> d = class_difficulty(torch.tensor([0.9, 0.3, 0.6, 0.2]), num_hard=2, absent_classes=[3])
    >>> d.hard_classes.tolist(), [round(p, 3) for p in d.probabilities.tolist()]
    ([1, 2], [0.0, 0.754, 0.246, 0.0])
    """
    v = _check_class_values(class_values)
    c = v.shape[0]
    if num_hard is None:
        num_hard = default_num_hard(c)
    check_positive_int("num_hard", num_hard)
    if num_hard > c:
        raise ValueError(
            f"num_hard must be at most the {c} classes, got {num_hard} (every class, the majority "
            "one included, would be hard); the paper's 14 is for 19 classes"
        )
    eligible = torch.ones(c, dtype=torch.bool, device=v.device)
    for a in absent_classes:
        if not 0 <= int(a) < c:
            raise ValueError(f"absent_classes must lie in [0, {c}), got {a}")
        eligible[int(a)] = False
    if has_donor is not None:
        if has_donor.shape != (c,):
            raise ValueError(f"has_donor must have shape ({c},), got {tuple(has_donor.shape)}")
        eligible &= has_donor.to(device=v.device, dtype=torch.bool)
    # Ineligible classes sort last; among eligible ones, stable ascending order of value.
    key = torch.where(eligible, v.double(), torch.full_like(v, float("inf"), dtype=torch.float64))
    order = torch.sort(key, stable=True).indices
    k = min(num_hard, int(eligible.sum()))
    hard = order[:k]
    hard_mask = torch.zeros(c, dtype=torch.bool, device=v.device)
    hard_mask[hard] = True
    return ClassDifficulty(hard, sampling_probabilities(v, hard_mask), hard_mask)


#: File names written by the public implementation's pseudo-label generation, kept so that
#: statistics produced by either implementation can be read by the other.
CLASS_VALUES_FILE = "class_mean_probabilities.npy"


THRESHOLDS_FILE = "class_threshold.npy"


CLASS_PIXELS_FILE = "statics_class.npy"


SAMPLES_WITH_CLASS_FILE = "samples_with_class.json"


SAMPLE_CLASS_STATS_FILE = "sample_class_stats.json"


def _read_npy(path: Path) -> np.ndarray:
    """A 1-D float64 array from ``path``; a damaged file is an error naming it."""
    try:
        return np.load(path, allow_pickle=False).astype(np.float64).reshape(-1)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(
            f"{path} is damaged or not a .npy array ({err}); delete the statistics folder and "
            "generate the pseudo-labels again"
        ) from None


def _read_json(path: Path) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} is damaged or not JSON ({err}); delete the statistics folder and generate "
            "the pseudo-labels again"
        ) from None


class ClassStatistics:
    """Per-class statistics of one round of pseudo-labels, the input of HPLA.

    Holds, for ``S`` target samples and ``C`` classes:

    - ``names``: the ``S`` sample identifiers (file names), unique;
    - ``sample_class_pixels``: ``(S, C)`` int64, pseudo-labelled pixels of each class per sample;
    - ``class_values``: ``(C,)`` float64 class values ``v`` (0 for a class never observed);
    - ``thresholds``: ``(C,)`` float64 final thresholds ``θ`` (informational).

    Build it with :meth:`add` while generating pseudo-labels (``Selection.class_pixels`` is exactly
    the per-sample count), then :meth:`save` it; :meth:`load` reads both our files and the public
    implementation's.

    >>> import torch
    >>> stats = ClassStatistics(num_classes=3)
    >>> stats.add(["a.png", "b.png"], torch.tensor([[10, 0, 5], [2, 7, 0]]))
    >>> stats.class_values = torch.tensor([0.9, 0.5, 0.7], dtype=torch.float64)
    >>> [p.tolist() for p in stats.donor_pools(drop_fraction=0.0)] == [[1, 0], [1], [0]]
    True
    >>> stats.class_pixels.tolist()
    [12, 7, 5]
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._chunks: list[torch.Tensor] = []
        self._pixels: torch.Tensor | None = torch.zeros(0, num_classes, dtype=torch.int64)
        self.class_values = torch.zeros(num_classes, dtype=torch.float64)
        self.thresholds = torch.zeros(num_classes, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ClassStatistics(num_classes={self.num_classes}, samples={len(self)})"

    def add(self, names: Sequence[str], class_pixels: torch.Tensor) -> None:
        """Record ``N`` samples: ``names`` and their ``(N, C)`` per-class pixel counts."""
        names = [str(n) for n in names]
        counts = check_tensor("class_pixels", class_pixels)
        if counts.is_floating_point() or counts.dim() != 2 or counts.shape[1] != self.num_classes:
            raise ValueError(
                f"class_pixels must be an integer (N, {self.num_classes}) tensor, got "
                f"{tuple(counts.shape)} {counts.dtype}"
            )
        if counts.shape[0] != len(names):
            raise ValueError(f"got {len(names)} names for {counts.shape[0]} rows of class_pixels")
        if counts.numel() and bool((counts < 0).any()):
            raise ValueError("class_pixels must be non-negative pixel counts")
        if len(set(names)) != len(names):
            raise ValueError("names must be unique: a sample is recorded once")
        for n in names:
            if n in self._index:
                raise ValueError(f"sample {n!r} was already recorded")
            self._index[n] = len(self.names)
            self.names.append(n)
        self._chunks.append(counts.detach().to("cpu", torch.int64))
        self._pixels = None

    @property
    def sample_class_pixels(self) -> torch.Tensor:
        """``(S, C)`` int64 pseudo-labelled pixels of each class in each sample."""
        if self._pixels is None:
            self._pixels = torch.cat(self._chunks) if self._chunks else self._pixels_empty()
            self._chunks = [self._pixels]
        return self._pixels

    def _pixels_empty(self) -> torch.Tensor:
        return torch.zeros(0, self.num_classes, dtype=torch.int64)

    @property
    def class_pixels(self) -> torch.Tensor:
        """``(C,)`` int64 total pseudo-labelled pixels per class."""
        return self.sample_class_pixels.sum(0)

    def index(self, name: str) -> int:
        """Position of the sample called ``name``."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no sample named {name!r} in these statistics") from None

    @classmethod
    def merge(cls, parts: Sequence[ClassStatistics]) -> ClassStatistics:
        """Concatenate the samples of several parts (e.g. one per rank); values from the first."""
        if not parts:
            raise ValueError("merge needs at least one ClassStatistics")
        out = cls(parts[0].num_classes)
        for p in parts:
            if p.num_classes != out.num_classes:
                raise ValueError("cannot merge statistics with different class counts")
            out.add(p.names, p.sample_class_pixels)
        out.class_values = parts[0].class_values.clone()
        out.thresholds = parts[0].thresholds.clone()
        return out

    def donor_pools(self, *, drop_fraction: float = 0.1) -> list[torch.Tensor]:
        """Per class, the int64 indices of the samples that contain it, fewest pixels first, after
        dropping the ``round(drop_fraction · n)`` samples with the fewest pixels of the class.

        Ties keep sample order (stable sort), and ``round`` is Python's, as in the public code.
        """
        check_unit_interval("drop_fraction", drop_fraction, open_high=True)
        pixels = self.sample_class_pixels
        pools = []
        for c in range(self.num_classes):
            idx = torch.nonzero(pixels[:, c] > 0).flatten()
            order = torch.sort(pixels[idx, c], stable=True).indices
            idx = idx[order]
            pools.append(idx[round(len(idx) * drop_fraction) :])
        return pools

    def has_donor(self, *, drop_fraction: float = 0.1) -> torch.Tensor:
        """``(C,)`` bool: whether a class's donor pool is non-empty."""
        return torch.tensor([len(p) > 0 for p in self.donor_pools(drop_fraction=drop_fraction)])

    def difficulty(
        self,
        *,
        num_hard: int | None = None,
        absent_classes: Sequence[int] = (),
        drop_fraction: float = 0.1,
    ) -> ClassDifficulty:
        """:func:`class_difficulty` of these class values, excluding classes without donors."""
        return class_difficulty(
            self.class_values,
            num_hard=num_hard,
            absent_classes=absent_classes,
            has_donor=self.has_donor(drop_fraction=drop_fraction),
        )

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the five statistics files (atomically) into ``folder``.

        ``samples_with_class.json`` maps every class (as a string key, present even when empty,
        because the public loader indexes every class) to ``[[name, pixels], ...]``;
        ``sample_class_stats.json`` is a list of ``{"file": name, "<class>": pixels, ...}``.
        """
        folder = Path(folder)
        pixels = self.sample_class_pixels.tolist()
        with_class: dict[str, list[list[object]]] = {str(c): [] for c in range(self.num_classes)}
        per_sample = []
        for name, row in zip(self.names, pixels, strict=True):
            entry: dict[str, object] = {"file": name}
            for c, n in enumerate(row):
                if n > 0:
                    with_class[str(c)].append([name, n])
                    entry[str(c)] = n
            per_sample.append(entry)
        atomic_save_json(folder / SAMPLES_WITH_CLASS_FILE, with_class)
        atomic_save_json(folder / SAMPLE_CLASS_STATS_FILE, per_sample)
        atomic_save_npy(folder / CLASS_VALUES_FILE, self.class_values.numpy())
        atomic_save_npy(folder / THRESHOLDS_FILE, self.thresholds.numpy())
        atomic_save_npy(folder / CLASS_PIXELS_FILE, self.class_pixels.numpy())

    @classmethod
    def load(
        cls, folder: str | os.PathLike[str], num_classes: int | None = None
    ) -> ClassStatistics:
        """Read statistics written by :meth:`save` or by the public implementation.

        Per-sample counts come from ``sample_class_stats.json`` when present (it also lists samples
        without any pseudo-labelled pixel), else from ``samples_with_class.json``. Sample names are
        kept as written (the public code stores paths; use :func:`os.path.basename` to match
        files). ``class_threshold.npy`` is optional.
        """
        folder = Path(folder)
        values_path = folder / CLASS_VALUES_FILE
        if not values_path.is_file():
            raise FileNotFoundError(
                f"{values_path} not found: expected the statistics files {CLASS_VALUES_FILE}, "
                f"{SAMPLES_WITH_CLASS_FILE} (and optionally {SAMPLE_CLASS_STATS_FILE}, "
                f"{THRESHOLDS_FILE}, {CLASS_PIXELS_FILE}) in {folder}"
            )
        values = _read_npy(values_path)
        c = int(num_classes) if num_classes is not None else values.shape[0]
        if values.shape[0] != c:
            raise ValueError(f"{values_path} holds {values.shape[0]} class values, expected {c}")
        if not np.all((values >= 0) & (values <= 1)):
            raise ValueError(
                f"{values_path}: class values must lie in [0, 1] (no NaN), got {values}"
            )
        rows: dict[str, dict[int, int]] = {}
        per_sample_path = folder / SAMPLE_CLASS_STATS_FILE
        with_class_path = folder / SAMPLES_WITH_CLASS_FILE
        if per_sample_path.is_file():
            entries = _read_json(per_sample_path)
            try:
                for entry in entries:
                    entry = dict(entry)
                    name = str(entry.pop("file"))
                    if name in rows:
                        raise ValueError(f"sample {name!r} is listed twice")
                    rows[name] = {int(k): int(n) for k, n in entry.items()}
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise ValueError(
                    f"{per_sample_path} is not a list of {{'file': name, '<class>': pixels}} "
                    f"entries ({type(err).__name__}: {err}); delete the statistics folder and "
                    "generate the pseudo-labels again"
                ) from None
        elif with_class_path.is_file():
            table = _read_json(with_class_path)
            try:
                for k, items in table.items():
                    for name, n in items:
                        row = rows.setdefault(str(name), {})
                        if int(k) in row:
                            raise ValueError(f"sample {name!r} is listed twice for class {k}")
                        row[int(k)] = int(n)
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise ValueError(
                    f"{with_class_path} is not a {{class: [[name, pixels], ...]}} table "
                    f"({type(err).__name__}: {err})"
                ) from None
        else:
            raise FileNotFoundError(
                f"neither {SAMPLE_CLASS_STATS_FILE} nor {SAMPLES_WITH_CLASS_FILE} found in {folder}"
            )
        pixels = torch.zeros(len(rows), c, dtype=torch.int64)
        for i, counts in enumerate(rows.values()):
            for k, n in counts.items():
                if not 0 <= k < c:
                    raise ValueError(f"class {k} in {folder} is outside [0, {c})")
                if n < 0:
                    raise ValueError(f"negative pixel count {n} for class {k} in {folder}")
                pixels[i, k] = n
        out = cls(c)
        out.add(list(rows), pixels)
        out.class_values = torch.from_numpy(values.copy())
        thresholds_path = folder / THRESHOLDS_FILE
        if thresholds_path.is_file():
            thresholds = _read_npy(thresholds_path)
            if thresholds.shape[0] != c:
                raise ValueError(
                    f"{thresholds_path} holds {thresholds.shape[0]} thresholds, expected {c}"
                )
            out.thresholds = torch.from_numpy(thresholds.copy())
        return out
