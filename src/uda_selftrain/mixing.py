"""Hard-aware pseudo-label augmentation (HPLA): class difficulty, donors and paste (method §3).

The *class value* ``v_c`` (momentum average of the mean confidence of the pixels selected as ``c``,
kept by :class:`~uda_selftrain.selection.InstanceAdaptiveSelector`) measures how easy a class is.
The hard classes are the ``K`` with the smallest values, and a hard class is drawn for copy-paste
with probability ``π_c ∝ (1 − v_c)²`` renormalised over the hard set.

Unlike the public implementation, classes that can never occur (e.g. SYNTHIA's terrain, truck and
train) and classes without a donor image are excluded *before* normalising, so the probabilities
never become NaN.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_float,
    check_label_map,
    check_positive_int,
    check_tensor,
    check_unit_interval,
    value_checks_enabled,
)
from .atomic import atomic_save_json, atomic_save_npy
from .augment import (
    ColourParams,
    CropParams,
    WeakStrongViews,
    _normalize_,
    _to_unit,
    check_image_scale,
    strong_colour,
    weak_geometry,
)

__all__ = [
    "ClassDifficulty",
    "ClassStatistics",
    "DonorDraw",
    "DonorSampler",
    "HardAwarePaste",
    "HardAwareViews",
    "PasteResult",
    "class_difficulty",
    "hard_paste",
    "paste_views",
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


def class_difficulty(
    class_values: torch.Tensor,
    *,
    num_hard: int = 14,
    absent_classes: Sequence[int] = (),
    has_donor: torch.Tensor | None = None,
) -> ClassDifficulty:
    """The hard classes (the ``num_hard`` smallest class values) and their drawing probabilities.

    Args:
        class_values: ``(C,)`` class values ``v``.
        num_hard: ``K`` (14 of 19 in the published setting).
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


# --------------------------------------------------------------------------------------------
# Class statistics recorded while generating pseudo-labels (method §3.1)
# --------------------------------------------------------------------------------------------

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
        self, *, num_hard: int = 14, absent_classes: Sequence[int] = (), drop_fraction: float = 0.1
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


# --------------------------------------------------------------------------------------------
# Donor sampling: index logic only, usable inside a Dataset (method §3.2)
# --------------------------------------------------------------------------------------------


class DonorDraw(NamedTuple):
    """The donors drawn for one sample (or a batch).

    Attributes:
        classes: int64 class that drew each donor, ``(D,)`` (or ``(N, D)`` padded with -1).
        donors: int64 sample index of each donor in the statistics, same shape, -1 = none.
    """

    classes: torch.Tensor
    donors: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """bool, same shape: the real donors (false on the -1 padding of :meth:`DonorSampler.draw_batch`).

        Pass it as ``donor_valid``: without it, padding slots would paste whatever image index
        they are clamped to.
        """
        return self.donors >= 0


class DonorSampler:
    """Draws hard classes and donor samples for hard-aware copy-paste (method §3.2).

    For each receiving sample: draw a hard class ``c ~ π`` (``π ∝ (1 − v)²`` over the hard set),
    a donor uniformly from ``c``'s pool; the donor covers every hard class it contains. Repeat, each
    next class drawn among the hard classes not yet covered, until ``min_coverage`` of the hard set is
    covered or ``max_donors`` were drawn. ``max_donors=1`` is the public implementation's behaviour.

    Cheap and CPU-only (a few hundred microseconds), so a ``Dataset`` can call :meth:`draw` in its
    ``__getitem__`` and load the donor images in its workers.

    Args:
        stats: the round's :class:`ClassStatistics`.
        num_hard: ``K``, the number of hard classes (14 of 19 in the paper).
        absent_classes: classes that can never occur in the source domain (SYNTHIA: 9, 14, 16).
        max_donors: most donors per sample (default 3).
        min_coverage: stop once this fraction of the hard set is covered (default 0.5).
        drop_fraction: fraction of each pool (fewest pixels first) dropped (default 0.1).

    >>> import torch
    >>> stats = ClassStatistics(3)
    >>> stats.add(["a", "b", "c"], torch.tensor([[5, 1, 0], [9, 0, 4], [3, 2, 2]]))
    >>> stats.class_values = torch.tensor([0.95, 0.4, 0.5], dtype=torch.float64)
    >>> sampler = DonorSampler(stats, num_hard=2, drop_fraction=0.0)
    >>> draw = sampler.draw(generator=torch.Generator().manual_seed(0))
    >>> draw.donors.numel() >= 1 and set(draw.classes.tolist()) <= {1, 2}
    True
    """

    def __init__(
        self,
        stats: ClassStatistics,
        *,
        num_hard: int = 14,
        absent_classes: Sequence[int] = (),
        max_donors: int = 3,
        min_coverage: float = 0.5,
        drop_fraction: float = 0.1,
    ) -> None:
        if not isinstance(stats, ClassStatistics):
            raise TypeError(f"stats must be a ClassStatistics, got {type(stats).__name__}")
        self.max_donors = check_positive_int("max_donors", max_donors)
        self.min_coverage = check_unit_interval("min_coverage", min_coverage)
        self.difficulty = stats.difficulty(
            num_hard=num_hard, absent_classes=absent_classes, drop_fraction=drop_fraction
        )
        self.pools = stats.donor_pools(drop_fraction=drop_fraction)
        self.hard_mask = self.difficulty.hard_mask.cpu()
        self.probabilities = self.difficulty.probabilities.cpu()
        # Which hard classes each sample would paste, i.e. cover.
        self._covers = (stats.sample_class_pixels > 0) & self.hard_mask
        num_hard_eligible = int(self.hard_mask.sum())
        self._needed = max(1, math.ceil(self.min_coverage * num_hard_eligible - 1e-9))

    @property
    def hard_classes(self) -> torch.Tensor:
        """``(K',)`` the hard classes, in increasing class value."""
        return self.difficulty.hard_classes

    def draw(self, *, generator: torch.Generator | None = None) -> DonorDraw:
        """Draw the donors of one sample; ``(D,)`` tensors with ``0 ≤ D ≤ max_donors``."""
        classes: list[int] = []
        donors: list[int] = []
        covered = torch.zeros_like(self.hard_mask)
        for _ in range(self.max_donors):
            weight = torch.where(covered, torch.zeros_like(self.probabilities), self.probabilities)
            if not bool((weight > 0).any()):
                break
            c = int(torch.multinomial(weight, 1, generator=generator))
            pool = self.pools[c]
            d = int(pool[int(torch.randint(len(pool), (1,), generator=generator))])
            classes.append(c)
            donors.append(d)
            covered |= self._covers[d]
            covered[c] = True
            if int(covered.sum()) >= self._needed:
                break
        return DonorDraw(
            torch.tensor(classes, dtype=torch.int64), torch.tensor(donors, dtype=torch.int64)
        )

    def draw_batch(self, n: int, *, generator: torch.Generator | None = None) -> DonorDraw:
        """Draw for ``n`` samples; ``(n, max_donors)`` tensors padded with -1."""
        check_positive_int("n", n)
        classes = torch.full((n, self.max_donors), -1, dtype=torch.int64)
        donors = torch.full_like(classes, -1)
        for i in range(n):
            d = self.draw(generator=generator)
            classes[i, : len(d.classes)] = d.classes
            donors[i, : len(d.donors)] = d.donors
        return DonorDraw(classes, donors)


# --------------------------------------------------------------------------------------------
# Batched paste on the device (method §3.2)
# --------------------------------------------------------------------------------------------


class PasteResult(NamedTuple):
    """Output of :func:`hard_paste`.

    Attributes:
        images: ``(N, 3, H, W)`` receivers with the donors' hard-class pixels pasted.
        labels: ``(N, H, W)`` pseudo-labels with the pasted labels.
        pasted: ``(N, H, W)`` (the labels' dtype), the pasted class per pixel, ``ignore_index``
            elsewhere.
    """

    images: torch.Tensor
    labels: torch.Tensor
    pasted: torch.Tensor


def hard_paste(
    images: torch.Tensor,
    labels: torch.Tensor,
    donor_images: torch.Tensor,
    donor_labels: torch.Tensor,
    hard_mask: torch.Tensor,
    donor_valid: torch.Tensor | None = None,
    *,
    ignore_index: int = 255,
) -> PasteResult:
    """Paste every donor pixel whose label is a hard class onto its receiver, at the same position.

    Donors are pasted in order (a later donor wins where two overlap). Donors whose size differs
    from the receiver are resized first (bilinear for images, nearest for labels). One pass per
    donor slot, no loop over samples or pixels.

    Args:
        images: ``(N, 3, H, W)`` receivers (any float or uint8 dtype).
        labels: ``(N, H, W)`` integer pseudo-labels (``ignore_index`` = none).
        donor_images: ``(N, D, 3, H', W')`` donors of each receiver.
        donor_labels: ``(N, D, H', W')`` their pseudo-labels.
        hard_mask: ``(C,)`` bool, the hard classes.
        donor_valid: optional ``(N, D)`` bool; invalid slots (padding) paste nothing.
        ignore_index: label of unlabelled pixels.

    Returns:
        :class:`PasteResult` with the mixed images and labels and the pasted-class map.

    >>> import torch
    >>> img, lab = torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 0], [255, 0]]])
    >>> dimg, dlab = torch.ones(1, 1, 3, 2, 2), torch.tensor([[[[1, 2], [1, 255]]]])
    >>> out = hard_paste(img, lab, dimg, dlab, torch.tensor([False, True, False]))
    >>> out.labels.tolist(), out.pasted.tolist()
    ([[[1, 0], [1, 0]]], [[[1, 255], [1, 255]]])
    """
    img = check_tensor("images", images)
    if img.dim() != 4:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(img.shape)}")
    n, ch, h, w = img.shape
    lab = check_label_map("labels", labels, (n, h, w), device=img.device)
    dimg = check_tensor("donor_images", donor_images)
    if dimg.dim() != 5 or dimg.shape[0] != n or dimg.shape[2] != ch:
        raise ValueError(
            f"donor_images must have shape ({n}, D, {ch}, H', W'), got {tuple(dimg.shape)}"
        )
    d = dimg.shape[1]
    dlab = check_label_map("donor_labels", donor_labels, (n, d, *dimg.shape[-2:]))
    hm = check_tensor("hard_mask", hard_mask)
    if hm.dtype != torch.bool or hm.dim() != 1:
        raise TypeError(f"hard_mask must be a (C,) bool tensor, got {tuple(hm.shape)} {hm.dtype}")
    _check_donor_valid(donor_valid, n, d)
    _check_same_images(img, dimg, [lab, dlab])
    if dimg.shape[-2:] != (h, w):
        dimg, dlab = _resize_donors(dimg, dlab, (h, w))
    # Lookup table over every possible label value: hard classes true, the rest (ignore) false.
    lut = torch.zeros(max(hm.shape[0], ignore_index + 1, 256), dtype=torch.bool, device=img.device)
    lut[: hm.shape[0]] = hm.to(img.device)
    # Labels of classes the hard mask does not cover would paste (or keep) a class the model
    # does not have: every label must be a class of the mask or the ignore index (one host sync).
    if value_checks_enabled():
        c = hm.shape[0]
        for name, t in (("labels", lab), ("donor_labels", dlab)):
            bad = (t != ignore_index) & ((t < 0) | (t >= c))
            if t.numel() and bool(bad.any()):
                raise ValueError(
                    f"{name} has value {int(t[bad].flatten()[0])} outside the hard mask's "
                    f"{c} classes that is not the ignore index {ignore_index}"
                )
    out_img, out_lab = img, lab
    pasted = torch.full((n, h, w), ignore_index, dtype=lab.dtype, device=img.device)
    for k in range(d):
        src_lab = dlab[:, k].to(img.device)
        m = lut[src_lab.long()]
        if donor_valid is not None:
            m &= donor_valid[:, k].to(img.device).view(n, 1, 1)
        out_img = torch.where(m.unsqueeze(1), dimg[:, k].to(img.device, img.dtype), out_img)
        out_lab = torch.where(m, src_lab.to(lab.dtype), out_lab)
        pasted = torch.where(m, src_lab.to(lab.dtype), pasted)
    return PasteResult(out_img, out_lab, pasted)


def _check_donor_valid(donor_valid: torch.Tensor | None, n: int, d: int) -> None:
    if donor_valid is None:
        return
    check_tensor("donor_valid", donor_valid)
    if donor_valid.dtype != torch.bool:
        raise TypeError(f"donor_valid must be a bool tensor, got {donor_valid.dtype}")
    if tuple(donor_valid.shape) != (n, d):
        raise ValueError(f"donor_valid must have shape ({n}, {d}), got {tuple(donor_valid.shape)}")


def _check_same_images(
    images: torch.Tensor, donor_images: torch.Tensor, labels: Sequence[torch.Tensor]
) -> None:
    """Receivers and donors share dtype (a uint8/float mix pastes 0s or 204s) and device."""
    if donor_images.dtype != images.dtype:
        raise TypeError(
            f"donor_images must have the images' dtype {images.dtype}, got {donor_images.dtype}"
        )
    for name, t in (
        ("donor_images", donor_images),
        *zip(("labels", "donor_labels"), labels, strict=True),
    ):
        if t.device != images.device:
            raise ValueError(
                f"{name} must be on the images' device {images.device}, got {t.device}"
            )
    check_image_scale("images", images)
    check_image_scale("donor_images", donor_images)


def _resize_donors(
    images: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = images.shape[:2]
    flat = images.flatten(0, 1)
    resized = F.interpolate(flat.float(), size=size, mode="bilinear", align_corners=False)
    if not images.is_floating_point():
        info = torch.iinfo(images.dtype)
        resized = resized.round_().clamp_(info.min, info.max)
    resized = resized.to(images.dtype).view(n, d, images.shape[2], *size)
    lab = F.interpolate(labels.flatten(0, 1).unsqueeze(1).float(), size=size, mode="nearest")
    return resized, lab.squeeze(1).to(labels.dtype).view(n, d, *size)


class HardAwarePaste(nn.Module):
    """Module form of :func:`hard_paste`, holding the hard-class mask as a buffer.

    Args:
        hard_mask: ``(C,)`` bool hard classes (e.g. ``DonorSampler(...).hard_mask``).
        ignore_index: label of unlabelled pixels.

    >>> import torch
    >>> paste = HardAwarePaste(torch.tensor([False, True]))
    >>> out = paste(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long),
    ...             torch.ones(2, 1, 3, 8, 8), torch.ones(2, 1, 8, 8, dtype=torch.long))
    >>> bool(out.images.eq(1).all()), out.pasted.unique().tolist()
    (True, [1])
    """

    hard_mask: torch.Tensor

    def __init__(self, hard_mask: torch.Tensor, *, ignore_index: int = 255) -> None:
        super().__init__()
        if hard_mask.dtype != torch.bool or hard_mask.dim() != 1:
            raise TypeError("hard_mask must be a (C,) bool tensor")
        self.register_buffer("hard_mask", hard_mask.clone())
        self.ignore_index = ignore_index

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        donor_images: torch.Tensor,
        donor_labels: torch.Tensor,
        donor_valid: torch.Tensor | None = None,
    ) -> PasteResult:
        return hard_paste(
            images,
            labels,
            donor_images,
            donor_labels,
            self.hard_mask,
            donor_valid,
            ignore_index=self.ignore_index,
        )


class HardAwareViews(NamedTuple):
    """Output of :func:`paste_views`, :func:`~uda_selftrain.hard_aware.hard_aware_augment` and
    :class:`~uda_selftrain.hard_aware.HardAwareAugmenter`.

    Attributes:
        weak: ``(N, 3, h, w)`` normalised weak view (teacher input).
        strong: ``(N, 3, h, w)`` normalised strong view (student input), same geometry.
        labels: ``(N, h, w)`` pseudo-labels after the paste (labels' dtype).
        pasted: ``(N, h, w)`` pasted class per pixel, ``ignore_index`` where nothing was pasted.
        crop: the :class:`~uda_selftrain.augment.CropParams` used.
        colour: the :class:`~uda_selftrain.augment.ColourParams` used.
    """

    weak: torch.Tensor
    strong: torch.Tensor
    labels: torch.Tensor
    pasted: torch.Tensor
    crop: CropParams
    colour: ColourParams


def paste_views(
    images: torch.Tensor,
    labels: torch.Tensor,
    donor_images: torch.Tensor,
    donor_labels: torch.Tensor,
    hard_mask: torch.Tensor,
    donor_valid: torch.Tensor | None = None,
    *,
    views: WeakStrongViews,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> HardAwareViews:
    """HPLA and the two views in one call, in the order that does the least work.

    Mathematically ``views(hard_paste(...))``: the receivers and their donors go through the
    *same* crop, flip and resize, then the donors' hard-class pixels are pasted at the output
    resolution, then the colour operations run. Pasting at the same positions commutes with the
    shared geometry for the labels exactly; for the images the only difference is at the one-pixel
    rim of a pasted region, where bilinear resizing would otherwise blend receiver and donor.
    This costs a quarter of pasting at 1024 × 2048 first.

    Args:
        images: ``(N, 3, H, W)`` receivers (uint8 or float in ``[0, 1]``).
        labels: ``(N, H, W)`` their pseudo-labels.
        donor_images: ``(N, D, 3, H', W')`` donors.
        donor_labels: ``(N, D, H', W')`` donor pseudo-labels.
        hard_mask: ``(C,)`` bool hard classes.
        donor_valid: optional ``(N, D)`` bool, padding slots false (required when the donors
            come from :meth:`DonorSampler.draw_batch`, whose padding would otherwise paste).
        views: the :class:`~uda_selftrain.augment.WeakStrongViews` to apply (keyword-only).
        generator: draws the views' randomness.

    Returns:
        :class:`HardAwareViews`: the views, the mixed pseudo-labels ``labels`` and the pasted
        class per pixel ``pasted`` (``ignore_index`` elsewhere), all in the weak geometry.

    >>> import torch
    >>> from uda_selftrain.augment import WeakStrongViews
    >>> out = paste_views(torch.rand(2, 3, 32, 64), torch.zeros(2, 32, 64, dtype=torch.long),
    ...                   torch.rand(2, 1, 3, 32, 64), torch.ones(2, 1, 32, 64, dtype=torch.long),
    ...                   torch.tensor([False, True]), views=WeakStrongViews((16, 32)),
    ...                   generator=torch.Generator().manual_seed(0))
    >>> out.labels.unique().tolist(), out.pasted.unique().tolist(), out.strong.shape
    ([1], [1], torch.Size([2, 3, 16, 32]))
    """
    img = check_tensor("images", images)
    dimg = check_tensor("donor_images", donor_images)
    dlab = check_tensor("donor_labels", donor_labels)
    if img.dim() != 4 or dimg.dim() != 5 or dlab.dim() != 4:
        raise ValueError(
            "images must be (N, 3, H, W), donor_images (N, D, 3, H', W') and donor_labels "
            f"(N, D, H', W'), got {tuple(img.shape)}, {tuple(dimg.shape)}, {tuple(dlab.shape)}"
        )
    n, _, h, w = img.shape
    if dimg.shape[0] != n or dlab.shape[:2] != dimg.shape[:2]:
        raise ValueError(f"donors must have batch size {n} and matching donor counts")
    if not isinstance(views, WeakStrongViews):
        raise TypeError(f"views must be a WeakStrongViews, got {type(views).__name__}")
    _check_donor_valid(donor_valid, n, dimg.shape[1])
    # Named here: weak_geometry would call them maps[0].
    lab = check_label_map("labels", labels, (n, h, w))
    check_label_map("donor_labels", dlab, dlab.shape)
    _check_same_images(img, dimg, [lab, dlab])
    if dimg.shape[-2:] != (h, w):
        dimg, dlab = _resize_donors(dimg, dlab, (h, w))
    d = dimg.shape[1]
    crop, colour = views.draw(n, (h, w), generator=generator)
    weak, (weak_labels,) = weak_geometry(img, crop, views.out_size, [labels], keep_uint8=True)
    rep = CropParams(crop.boxes.repeat_interleave(d, 0), crop.flips.repeat_interleave(d, 0))
    d_weak, (d_weak_labels,) = weak_geometry(
        dimg.flatten(0, 1), rep, views.out_size, [dlab.flatten(0, 1)], keep_uint8=True
    )
    out_h, out_w = views.out_size
    mixed = hard_paste(
        weak,
        weak_labels,
        d_weak.view(n, d, 3, out_h, out_w),
        d_weak_labels.view(n, d, out_h, out_w),
        hard_mask,
        donor_valid,
        ignore_index=ignore_index,
    )
    weak = _to_unit(mixed.images)
    strong = strong_colour(weak, colour)
    return HardAwareViews(
        _normalize_(weak, views.mean, views.std),
        _normalize_(strong, views.mean, views.std),
        mixed.labels,
        mixed.pasted,
        crop,
        colour,
    )
