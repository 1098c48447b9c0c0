"""Bad inputs to every public primitive end in a clear error naming the argument (or file).

Each case is (primitive, call, expected exception type, a word the message must contain). The
cases are the kinds a new user meets: wrong dtypes and shapes, NaN/Inf, out-of-range labels and
parameters, empty batches, mismatched devices or architectures, damaged statistics files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import uda_selftrain as ust
from uda_selftrain.class_statistics import ClassStatistics
from uda_selftrain.models import FCDiscriminator, deeplabv2_small

NAN = float("nan")


def _x(n=2, c=4, h=6, w=8):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def _y(n=2, h=6, w=8, c=4):
    return torch.randint(0, c, (n, h, w), generator=torch.Generator().manual_seed(1))


def _img(n=2, h=16, w=32):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(2))


def _fitted_augmenter():
    aug = ust.HardAwareAugmenter(4, (8, 16), num_hard=2)
    aug.update(torch.tensor([0.9, 0.2, 0.5, 0.8]))
    return aug


def _student_pair():
    teacher = ust.EMATeacher(nn.Sequential(nn.Conv2d(3, 4, 1)))
    return teacher


class _Renamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.other = nn.Conv2d(3, 4, 1)


def _nan_student():
    m = nn.Sequential(nn.Conv2d(3, 4, 1))
    with torch.no_grad():
        m[0].weight[0, 0] = NAN
    return m


CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # losses
    ("pseudo_label_ce", lambda: ust.pseudo_label_ce(_x().long(), _y()), TypeError, "logits"),
    ("pseudo_label_ce", lambda: ust.pseudo_label_ce(_x()[0], _y()), ValueError, "logits"),
    ("pseudo_label_ce", lambda: ust.pseudo_label_ce(_x() * NAN, _y()), ValueError, "NaN"),
    ("pseudo_label_ce", lambda: ust.pseudo_label_ce(_x(), _y() + 4), ValueError, "labels"),
    ("pseudo_label_ce", lambda: ust.pseudo_label_ce(_x(), _y().float()), TypeError, "labels"),
    ("pseudo_label_ce", lambda: ust.pseudo_label_ce(_x(), _y()[:1]), ValueError, "labels"),
    (
        "smoothing_loss",
        lambda: ust.smoothing_loss(_x(), _y(), normalization="x"),
        ValueError,
        "normalization",
    ),
    ("entropy_loss", lambda: ust.entropy_loss(_x(), _y() - 2), ValueError, "labels"),
    (
        "consistency_loss",
        lambda: ust.consistency_loss(_x(), _y(), _x()[:1]),
        ValueError,
        "teacher_logits",
    ),
    (
        "consistency_loss",
        lambda: ust.consistency_loss(_x(), _y(), _x() * NAN),
        ValueError,
        "teacher_logits",
    ),
    (
        "consistency_loss",
        lambda: ust.consistency_loss(_x(), _y(), _x(), region="x"),
        ValueError,
        "region",
    ),
    ("ConsistencyLoss", lambda: ust.ConsistencyLoss(region="both"), ValueError, "region"),
    (
        "region_adaptive_loss",
        lambda: ust.region_adaptive_loss(_x(), _y(), entropy_weight=NAN),
        ValueError,
        "entropy_weight",
    ),
    (
        "RegionAdaptiveLoss",
        lambda: ust.RegionAdaptiveLoss(smoothing_weight=-1),
        ValueError,
        "smoothing_weight",
    ),
    (
        "hiast_loss",
        lambda: ust.hiast_loss(_x(), _y(), consistency_weight=float("inf")),
        ValueError,
        "consistency_weight",
    ),
    ("HIASTLoss", lambda: ust.HIASTLoss(ce_weight=NAN), ValueError, "ce_weight"),
    ("HIASTLoss", lambda: ust.HIASTLoss(consistency_region="x"), ValueError, "region"),
    # selection
    (
        "InstanceAdaptiveSelector",
        lambda: ust.InstanceAdaptiveSelector(0),
        ValueError,
        "num_classes",
    ),
    (
        "InstanceAdaptiveSelector",
        lambda: ust.InstanceAdaptiveSelector(4, alpha=5),
        ValueError,
        "alpha",
    ),
    (
        "InstanceAdaptiveSelector",
        lambda: ust.InstanceAdaptiveSelector(4, beta=1.5),
        ValueError,
        "beta",
    ),
    (
        "InstanceAdaptiveSelector",
        lambda: ust.InstanceAdaptiveSelector(4, gamma=-2),
        ValueError,
        "gamma",
    ),
    (
        "InstanceAdaptiveSelector",
        lambda: ust.InstanceAdaptiveSelector(4)(_x(c=5)),
        ValueError,
        "scores",
    ),
    (
        "InstanceAdaptiveSelector",
        lambda: ust.InstanceAdaptiveSelector(4)(_x() * NAN),
        ValueError,
        "NaN",
    ),
    (
        "InstanceAdaptiveSelector",
        lambda: ust.InstanceAdaptiveSelector(4)(_x().long()),
        TypeError,
        "scores",
    ),
    (
        "InstanceAdaptiveSelector",
        lambda: ust.InstanceAdaptiveSelector(4)(_x(h=32, w=32), probabilities=True),
        ValueError,
        "probabilities",
    ),
    (
        "InstanceAdaptiveSelector",
        lambda: ust.InstanceAdaptiveSelector(4)(_x(h=32, w=32).softmax(1)),
        ValueError,
        "probabilities=True",
    ),
    (
        "ConstantThresholdSelector",
        lambda: ust.ConstantThresholdSelector(4, threshold=1.5),
        ValueError,
        "threshold",
    ),
    ("CBSTSelector", lambda: ust.CBSTSelector(4, proportion=0), ValueError, "proportion"),
    ("CBSTSelector", lambda: ust.CBSTSelector(4)(_x()), RuntimeError, "fit"),
    ("ArgmaxSelector", lambda: ust.ArgmaxSelector(4)(_x()[0]), ValueError, "scores"),
    (
        "ias_update",
        lambda: ust.ias_update(
            torch.rand(9), torch.zeros(9, dtype=torch.long), torch.full((3,), 0.9), alpha=5
        ),
        ValueError,
        "alpha",
    ),
    (
        "ias_update",
        lambda: ust.ias_update(
            torch.full((9,), 1.7), torch.zeros(9, dtype=torch.long), torch.full((3,), 0.9)
        ),
        ValueError,
        "confidence",
    ),
    (
        "ias_update",
        lambda: ust.ias_update(
            torch.ones(9, dtype=torch.long), torch.zeros(9, dtype=torch.long), torch.full((3,), 0.9)
        ),
        TypeError,
        "confidence",
    ),
    (
        "ias_update",
        lambda: ust.ias_update(
            torch.full((9,), NAN), torch.zeros(9, dtype=torch.long), torch.full((3,), 0.9)
        ),
        ValueError,
        "confidence",
    ),
    (
        "ias_update",
        lambda: ust.ias_update(torch.rand(9), torch.full((9,), -1), torch.full((3,), 0.9)),
        ValueError,
        "prediction",
    ),
    (
        "select_with_thresholds",
        lambda: ust.select_with_thresholds(
            torch.rand(4), torch.full((4,), 7), torch.full((3,), 0.9)
        ),
        ValueError,
        "prediction",
    ),
    (
        "select_with_thresholds",
        lambda: ust.select_with_thresholds(torch.rand(4), torch.zeros(4), torch.full((3,), 0.9)),
        TypeError,
        "prediction",
    ),
    (
        "confidence_and_prediction",
        lambda: ust.confidence_and_prediction(_x()[0]),
        ValueError,
        "scores",
    ),
    (
        "grouped_quantile",
        lambda: ust.grouped_quantile(torch.rand(5), torch.full((5,), 3), 2, torch.full((2,), 0.5)),
        ValueError,
        "groups",
    ),
    (
        "grouped_quantile",
        lambda: ust.grouped_quantile(torch.rand(5), torch.zeros(5), 2, torch.full((2,), 0.5)),
        TypeError,
        "groups",
    ),
    (
        "grouped_quantile",
        lambda: ust.grouped_quantile(
            torch.rand(5), torch.zeros(5, dtype=torch.long), 2, torch.full((3,), 0.5)
        ),
        ValueError,
        "q",
    ),
    # HPLA and views
    (
        "sampling_probabilities",
        lambda: ust.sampling_probabilities(torch.tensor([0.5, NAN])),
        ValueError,
        "class_values",
    ),
    (
        "class_difficulty",
        lambda: ust.class_difficulty(torch.tensor([0.5, NAN]), num_hard=1),
        ValueError,
        "class_values",
    ),
    (
        "class_difficulty",
        lambda: ust.class_difficulty(torch.rand(11), num_hard=14),
        ValueError,
        "num_hard",
    ),
    (
        "class_difficulty",
        lambda: ust.class_difficulty(torch.rand(3), num_hard=0),
        ValueError,
        "num_hard",
    ),
    (
        "ClassStatistics",
        lambda: ClassStatistics(3).add(["a"], torch.tensor([[1, -2, 0]])),
        ValueError,
        "non-negative",
    ),
    (
        "ClassStatistics",
        lambda: ClassStatistics(3).add(["a", "a"], torch.zeros(2, 3, dtype=torch.long)),
        ValueError,
        "unique",
    ),
    (
        "HardAwareAugmenter",
        lambda: ust.HardAwareAugmenter(11, (8, 16), num_hard=14),
        ValueError,
        "num_hard",
    ),
    (
        "HardAwareAugmenter",
        lambda: _fitted_augmenter()(_img() * 255, _y(h=16, w=32)),
        ValueError,
        "[0, 1]",
    ),
    (
        "HardAwareAugmenter",
        lambda: _fitted_augmenter()(_img(), _y(h=16, w=32) + 9),
        ValueError,
        "labels",
    ),
    (
        "HardAwareAugmenter",
        lambda: _fitted_augmenter()(
            _img(), _y(h=16, w=32), (_img() * 255).byte()[:, None], _y(h=16, w=32)[:, None]
        ),
        TypeError,
        "donor_images",
    ),
    (
        "HardAwareAugmenter",
        lambda: ust.HardAwareAugmenter(4, (8, 16))(_img(), _y(h=16, w=32)),
        RuntimeError,
        "update",
    ),
    (
        "hard_aware_augment",
        lambda: ust.hard_aware_augment(
            _img(), _y(h=16, w=32), torch.ones(4, dtype=torch.bool), views=(8, 16)
        ),
        TypeError,
        "views",
    ),
    (
        "hard_paste",
        lambda: ust.hard_paste(
            _img(),
            _y(h=16, w=32),
            (_img() * 255).byte()[:, None],
            _y(h=16, w=32)[:, None],
            torch.ones(4, dtype=torch.bool),
        ),
        TypeError,
        "donor_images",
    ),
    (
        "hard_paste",
        lambda: ust.hard_paste(
            _img(),
            _y(h=16, w=32),
            _img()[:, None],
            _y(h=16, w=32)[:, None],
            torch.ones(4, dtype=torch.bool),
            torch.ones(2, 2, dtype=torch.bool),
        ),
        ValueError,
        "donor_valid",
    ),
    (
        "paste_views",
        lambda: ust.paste_views(
            _img() * 255,
            _y(h=16, w=32),
            _img()[:, None],
            _y(h=16, w=32)[:, None],
            torch.ones(4, dtype=torch.bool),
            views=ust.WeakStrongViews((8, 16)),
        ),
        ValueError,
        "images",
    ),
    ("WeakStrongViews", lambda: ust.WeakStrongViews((8, 16))(_img() * 255), ValueError, "[0, 1]"),
    ("WeakStrongViews", lambda: ust.WeakStrongViews((0, 16)), ValueError, "out_size"),
    ("WeakStrongViews", lambda: ust.WeakStrongViews((8, 16), num_ops=9), ValueError, "num_ops"),
    (
        "WeakStrongViews",
        lambda: ust.WeakStrongViews((8, 16), op_probability=2),
        ValueError,
        "op_probability",
    ),
    ("normalize", lambda: ust.normalize(_img() * 255), ValueError, "images"),
    ("normalize", lambda: ust.normalize(_img().long()), TypeError, "images"),
    ("denormalize", lambda: ust.denormalize((_img() * 255).byte()), TypeError, "images"),
    # online
    (
        "classmix",
        lambda: ust.classmix(
            _img(),
            _y(h=16, w=32),
            (_img() * 255).byte(),
            _y(h=16, w=32),
            torch.ones(2, 16, 32, dtype=torch.bool),
        ),
        TypeError,
        "dtype",
    ),
    (
        "ClassMix",
        lambda: ust.ClassMix(4)(_img(0), _y(0, 16, 32), _img(0), _y(0, 16, 32)),
        ValueError,
        "N >= 1",
    ),
    ("ClassMix", lambda: ust.ClassMix(0), ValueError, "num_classes"),
    ("online_targets", lambda: ust.online_targets(_x() * NAN), ValueError, "NaN"),
    (
        "online_targets",
        lambda: ust.online_targets(_x(), selector=nn.Identity()),
        TypeError,
        "Selector",
    ),
    ("confidence_weight", lambda: ust.confidence_weight(_x().long()), TypeError, "scores"),
    # teacher
    ("EMATeacher", lambda: ust.EMATeacher(nn.Linear(2, 2), momentum=1.5), ValueError, "momentum"),
    ("EMATeacher", lambda: _student_pair().update(_Renamed()), ValueError, "names"),
    (
        "EMATeacher",
        lambda: _student_pair().update(nn.Sequential(nn.Conv2d(3, 5, 1))),
        ValueError,
        "student",
    ),
    (
        "EMATeacher",
        lambda: _student_pair().update(nn.Sequential(nn.Conv2d(3, 4, 1)).half()),
        ValueError,
        "float16",
    ),
    ("EMATeacher", lambda: _student_pair().update(_nan_student()), ValueError, "NaN"),
    ("EMATeacher", lambda: _student_pair().update("model"), TypeError, "student"),
    # metrics
    (
        "confusion_matrix",
        lambda: ust.confusion_matrix(torch.full((4,), 255), torch.zeros(4, dtype=torch.long), 19),
        ValueError,
        "255",
    ),
    (
        "confusion_matrix",
        lambda: ust.confusion_matrix(torch.full((4,), -1), torch.zeros(4, dtype=torch.long), 19),
        ValueError,
        "-1",
    ),
    (
        "confusion_matrix",
        lambda: ust.confusion_matrix(torch.zeros(4), torch.zeros(4, dtype=torch.long), 19),
        TypeError,
        "prediction",
    ),
    (
        "confusion_matrix",
        lambda: ust.confusion_matrix(
            torch.zeros(4, dtype=torch.long),
            torch.zeros(4, dtype=torch.long),
            19,
            out_of_range="clamp",
        ),
        ValueError,
        "out_of_range",
    ),
    (
        "ConfusionMatrix",
        lambda: ust.ConfusionMatrix(19).update(
            torch.full((2, 2), 19), torch.zeros(2, 2, dtype=torch.long)
        ),
        ValueError,
        "19",
    ),
    (
        "protocol_scores",
        lambda: ust.protocol_scores(torch.eye(19), "cityscape19"),
        ValueError,
        "unknown protocol",
    ),
    (
        "iou_from_confusion",
        lambda: ust.iou_from_confusion(torch.zeros(3, 5)),
        ValueError,
        "confusion",
    ),
    # models
    ("deeplabv2_small", lambda: deeplabv2_small(0), ValueError, "num_classes"),
    ("deeplabv2_small", lambda: deeplabv2_small(width=0), ValueError, "width"),
    (
        "deeplabv2_small",
        lambda: deeplabv2_small(width=4)((_img() * 255).byte()),
        TypeError,
        "normalize",
    ),
    ("FCDiscriminator", lambda: FCDiscriminator(0), ValueError, "num_classes"),
]


MORE_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("DonorSampler", lambda: ust.DonorSampler([1, 2]), TypeError, "stats"),
    (
        "DonorSampler",
        lambda: ust.DonorSampler(ClassStatistics(3), num_hard=0),
        ValueError,
        "num_hard",
    ),
    ("HardAwarePaste", lambda: ust.HardAwarePaste(torch.ones(3)), TypeError, "hard_mask"),
    (
        "batch_donors",
        lambda: ust.batch_donors(torch.rand(3, 8, 8), _y(3, 8, 8)),
        ValueError,
        "images",
    ),
    ("cbst_thresholds", lambda: ust.cbst_thresholds(torch.zeros(5)), ValueError, "histogram"),
    (
        "cbst_thresholds",
        lambda: ust.cbst_thresholds(torch.zeros(2, 5, dtype=torch.long), proportion=2.0),
        ValueError,
        "proportion",
    ),
    ("class_counts", lambda: ust.class_counts(torch.zeros(3), 2), TypeError, "labels"),
    (
        "class_prior",
        lambda: ust.class_prior(torch.zeros(3, dtype=torch.long), 0),
        ValueError,
        "num_classes",
    ),
    ("classmix_masks", lambda: ust.classmix_masks(torch.zeros(1, 4, 4), 3), TypeError, "labels"),
    ("colour_params", lambda: ust.colour_params(0), ValueError, "n"),
    (
        "crop_params",
        lambda: ust.crop_params(2, (8, 8), height_range=(0.5, 2)),
        ValueError,
        "height_range",
    ),
    (
        "generate_pseudo_labels",
        lambda: ust.generate_pseudo_labels(nn.Conv2d(3, 2, 1), [], nn.Identity(), "unused"),
        TypeError,
        "Selector",
    ),
    ("get_protocol", lambda: ust.get_protocol("cityscape"), ValueError, "unknown protocol"),
    ("miou", lambda: ust.miou(torch.zeros(3)), ValueError, "confusion"),
    ("pixel_accuracy", lambda: ust.pixel_accuracy(torch.zeros(2, 2, 2)), ValueError, "confusion"),
    ("pixel_weights", lambda: ust.pixel_weights(torch.zeros(2, 2), (4, 4)), ValueError, "weight"),
    (
        "pixel_weights",
        lambda: ust.pixel_weights(torch.zeros(2), (4, 4), torch.ones(2, 4, 4)),
        ValueError,
        "mix_mask",
    ),
    (
        "predict_probabilities",
        lambda: ust.predict_probabilities(nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 4, 4), scales=(0,)),
        ValueError,
        "scales",
    ),
    (
        "predict_probabilities",
        lambda: ust.predict_probabilities(nn.Conv2d(3, 2, 1), torch.full((1, 3, 4, 4), 200.0)),
        ValueError,
        "[0, 1]",
    ),
    (
        "pseudo_label_diagnostics",
        lambda: ust.pseudo_label_diagnostics(
            torch.tensor([-1, 1]), torch.tensor([0.5, 0.5]), total_pixels=4
        ),
        ValueError,
        "class_pixels",
    ),
    ("CollapseMonitor", lambda: ust.CollapseMonitor(torch.tensor([NAN])), ValueError, "prior"),
    ("region_masks", lambda: ust.region_masks(torch.zeros(1, 2, 2)), TypeError, "labels"),
    ("select_argmax", lambda: ust.select_argmax(torch.zeros(2, 3, 3)), ValueError, "scores"),
    ("select_constant", lambda: ust.select_constant(_x(), threshold=2.0), ValueError, "threshold"),
    (
        "selected_class_statistics",
        lambda: ust.selected_class_statistics(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), 3),
        TypeError,
        "labels",
    ),
    (
        "strong_colour",
        lambda: ust.strong_colour(torch.rand(2, 3, 4, 4), ust.colour_params(3)),
        ValueError,
        "params",
    ),
    (
        "weak_geometry",
        lambda: ust.weak_geometry(
            torch.rand(1, 3, 4, 4),
            ust.CropParams(torch.tensor([[0, 0, 9, 9]]), torch.tensor([False])),
            (2, 2),
        ),
        ValueError,
        "boxes",
    ),
    ("unwrap_model", lambda: ust.unwrap_model("model"), TypeError, "model"),
    ("set_value_checks", lambda: ust.set_value_checks("no"), TypeError, "enabled"),
    ("value_checks", lambda: ust.value_checks("no").__enter__(), TypeError, "enabled"),
]
CASES += MORE_CASES


class _Unnamed(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 4, 4, dtype=torch.uint8)}


#: Inputs that used to be accepted silently (a wrong result, or an error from deep inside torch).
SILENT_BEFORE = [
    (
        "ConfusionMatrix.update",
        lambda: ust.ConfusionMatrix(19).update(
            torch.zeros(1, 2, dtype=torch.long), torch.tensor([[3, 25]])
        ),
        ValueError,
        "target has value 25",
    ),
    (
        "confusion_matrix",
        lambda: ust.confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([0, -1]), 3),
        ValueError,
        "target has value -1",
    ),
    (
        "miou",
        lambda: ust.miou(torch.eye(3, dtype=torch.long), classes=(0, 5)),
        ValueError,
        "classes",
    ),
    ("miou", lambda: ust.miou(torch.eye(3, dtype=torch.long), classes=()), ValueError, "classes"),
    (
        "select_with_thresholds",
        lambda: ust.select_with_thresholds(
            torch.tensor([[[NAN, 0.5]]]), torch.tensor([[[0, 1]]]), torch.tensor([0.9, 0.6])
        ),
        ValueError,
        "confidence",
    ),
    (
        "pseudo_label_diagnostics",
        lambda: ust.pseudo_label_diagnostics(
            torch.tensor([10, 1]), torch.tensor([900.0, 100.0]), total_pixels=20
        ),
        ValueError,
        "prior must be class frequencies",
    ),
    (
        "CollapseMonitor",
        lambda: ust.CollapseMonitor(torch.tensor([900.0, 100.0])),
        ValueError,
        "divide raw pixel counts",
    ),
    (
        "generate_pseudo_labels",
        lambda: ust.generate_pseudo_labels(
            nn.Conv2d(3, 2, 1), _Unnamed(), ust.ArgmaxSelector(2), Path("/nonexistent-unused")
        ),
        ValueError,
        "has no 'name'",
    ),
]
SILENT_BEFORE += [
    (
        "hard_paste",
        lambda: ust.hard_paste(
            torch.rand(1, 3, 4, 4),
            torch.full((1, 4, 4), 5),
            torch.rand(1, 1, 3, 4, 4),
            torch.full((1, 1, 4, 4), 1),
            torch.tensor([True, False, True]),
        ),
        ValueError,
        "labels has value 5 outside the hard mask",
    ),
    (
        "hard_paste",
        lambda: ust.hard_paste(
            torch.rand(1, 3, 4, 4),
            torch.full((1, 4, 4), 1),
            torch.rand(1, 1, 3, 4, 4),
            torch.full((1, 1, 4, 4), 7, dtype=torch.uint8),
            torch.tensor([True, False, True]),
        ),
        ValueError,
        "donor_labels has value 7",
    ),
    (
        "masked_consistency_loss",
        lambda: ust.masked_consistency_loss(
            torch.zeros(0, 3, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long)
        ),
        ValueError,
        "empty batch",
    ),
    (
        "downscale_labels",
        lambda: ust.downscale_labels(
            torch.zeros(0, 8, 8, dtype=torch.long), (2, 2), num_classes=19
        ),
        ValueError,
        "empty batch",
    ),
    (
        "thing_feature_distance",
        lambda: ust.thing_feature_distance(
            torch.zeros(0, 4, 2, 2),
            torch.zeros(0, 4, 2, 2),
            torch.zeros(0, 8, 8, dtype=torch.long),
            num_classes=19,
        ),
        ValueError,
        "empty batch",
    ),
]
CASES += SILENT_BEFORE


@pytest.mark.parametrize(
    ("name", "call", "error", "word"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_gives_a_clear_error(name, call, error, word):
    with pytest.raises(error) as info:
        call()
    assert word in str(info.value), f"{name}: {info.value!r} does not mention {word!r}"


# --------------------------------------------------------------------------------------------
# Damaged statistics files: the error names the file
# --------------------------------------------------------------------------------------------


def _saved_stats(folder: Path) -> Path:
    stats = ClassStatistics(3)
    stats.add(["a.png", "b.png"], torch.tensor([[4, 0, 2], [1, 3, 0]]))
    stats.class_values = torch.tensor([0.9, 0.5, 0.7], dtype=torch.float64)
    stats.thresholds = torch.tensor([0.9, 0.8, 0.85], dtype=torch.float64)
    stats.save(folder)
    return folder


DAMAGES = {
    "truncated_npy": ("class_mean_probabilities.npy", lambda p: p.write_bytes(p.read_bytes()[:20])),
    "empty_npy": ("class_mean_probabilities.npy", lambda p: p.write_bytes(b"")),
    "nan_values": (
        "class_mean_probabilities.npy",
        lambda p: np.save(p, np.array([0.5, np.nan, 0.5])),
    ),
    "truncated_json": ("sample_class_stats.json", lambda p: p.write_text(p.read_text()[:15])),
    "entry_without_file": (
        "sample_class_stats.json",
        lambda p: p.write_text(json.dumps([{"0": 3}])),
    ),
    "duplicate_names": (
        "sample_class_stats.json",
        lambda p: p.write_text(json.dumps([{"file": "a", "0": 1}, {"file": "a", "1": 2}])),
    ),
    "threshold_class_count": ("class_threshold.npy", lambda p: np.save(p, np.array([0.9, 0.9]))),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_statistics_name_the_file(tmp_path, damage):
    folder = _saved_stats(tmp_path)
    name, damage_fn = DAMAGES[damage]
    damage_fn(folder / name)
    with pytest.raises(ValueError) as info:
        ClassStatistics.load(folder, 3)
    assert name in str(info.value)


def test_undamaged_statistics_load(tmp_path):
    stats = ClassStatistics.load(_saved_stats(tmp_path), 3)
    assert stats.names == ["a.png", "b.png"] and stats.class_pixels.tolist() == [5, 3, 2]


# A tensor on another device fails with both devices named, before any value is read. The "meta"
# device stands in for a second device on a CPU-only machine (no data, so a value read would fail).
_META = torch.device("meta")


@pytest.mark.parametrize(
    ("name", "call", "argument"),
    [
        (
            "hiast_loss labels",
            lambda: ust.hiast_loss(_x(), _y().to(_META), _x()),
            "labels",
        ),
        (
            "hiast_loss teacher_logits",
            lambda: ust.hiast_loss(_x(), _y(), _x().to(_META)),
            "teacher_logits",
        ),
        (
            "consistency_loss teacher_logits",
            lambda: ust.consistency_loss(_x(), _y(), _x().to(_META)),
            "teacher_logits",
        ),
        (
            "RegionAdaptiveLoss labels",
            lambda: ust.RegionAdaptiveLoss()(_x(), _y().to(_META)),
            "labels",
        ),
        (
            "WeakStrongViews maps",
            lambda: ust.WeakStrongViews((4, 8))(
                torch.rand(2, 3, 8, 16), [torch.zeros(2, 8, 16, dtype=torch.long, device=_META)]
            ),
            r"maps\[0\]",
        ),
        (
            "hard_paste labels",
            lambda: ust.hard_paste(
                torch.rand(1, 3, 4, 4),
                torch.zeros(1, 4, 4, dtype=torch.long, device=_META),
                torch.rand(1, 1, 3, 4, 4),
                torch.zeros(1, 1, 4, 4, dtype=torch.long),
                torch.tensor([True, False]),
            ),
            "labels",
        ),
        (
            "classmix target_labels",
            lambda: ust.classmix(
                torch.rand(1, 3, 4, 4),
                torch.zeros(1, 4, 4, dtype=torch.long),
                torch.rand(1, 3, 4, 4),
                torch.zeros(1, 4, 4, dtype=torch.long, device=_META),
                torch.zeros(1, 4, 4, dtype=torch.bool),
            ),
            "target_labels",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_tensor_on_another_device_names_both_devices(name, call, argument):
    with pytest.raises(ValueError, match=argument) as info:
        call()
    message = str(info.value)
    assert "meta" in message and "cpu" in message, message


def test_paste_views_names_the_labels_not_maps():
    """paste_views' labels reach weak_geometry as maps[0]; the error names what the user passed."""
    views = ust.WeakStrongViews((4, 8))
    args = (
        torch.rand(1, 3, 8, 16),
        torch.zeros(1, 8, 16),  # float labels
        torch.rand(1, 1, 3, 8, 16),
        torch.zeros(1, 1, 8, 16, dtype=torch.long),
        torch.tensor([True, False]),
    )
    with pytest.raises(TypeError, match="labels") as info:
        ust.paste_views(*args, views=views)
    assert "maps" not in str(info.value)
    with pytest.raises(TypeError, match="donor_labels"):
        ust.paste_views(*args[:1], args[3][:, 0], args[2], args[3].float(), args[4], views=views)


# One ignore_index check everywhere: an int, and not a class index when the classes are known.
@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("hiast_loss", lambda ii: ust.hiast_loss(_x(), _y(), _x(), ignore_index=ii)),
        ("pseudo_label_ce", lambda ii: ust.pseudo_label_ce(_x(), _y(), ignore_index=ii)),
        ("RegionAdaptiveLoss", lambda ii: ust.RegionAdaptiveLoss(ignore_index=ii)(_x(), _y())),
        ("confusion_matrix", lambda ii: ust.confusion_matrix(_y(), _y(), 4, ignore_index=ii)),
        ("ConfusionMatrix", lambda ii: ust.ConfusionMatrix(4, ignore_index=ii)),
        ("InstanceAdaptiveSelector", lambda ii: ust.InstanceAdaptiveSelector(4, ignore_index=ii)),
        ("classmix_masks", lambda ii: ust.classmix_masks(_y(), 4, ignore_index=ii)),
    ],
)
def test_ignore_index_checked_once_everywhere(name, make):
    with pytest.raises(TypeError, match="ignore_index"):
        make(255.0)
    with pytest.raises(ValueError, match="ignore_index"):
        make(1)  # a class index
    make(-1)  # outside [0, C): a valid ignore index


def test_region_masks_checks_ignore_index_type():
    with pytest.raises(TypeError, match="ignore_index"):
        ust.region_masks(_y(), ignore_index=True)
