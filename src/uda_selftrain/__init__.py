"""uda-selftrain: composable primitives for self-training domain adaptation of segmentation.

The reference method is HIAST (Hard-aware Instance Adaptive Self-Training, TPAMI 2025). Import the
primitives into your own training loop:

>>> import torch
>>> import uda_selftrain as ust
>>> selector = ust.InstanceAdaptiveSelector(num_classes=19)
>>> augmenter = ust.HardAwareAugmenter(num_classes=19, out_size=(512, 1024))
>>> regularisation, consistency = ust.RegionAdaptiveLoss(), ust.ConsistencyLoss()
>>> loss_fn = ust.HIASTLoss()  # CE + regularisation + 0.5 x consistency, fused
"""

from ._checks import set_value_checks, value_checks
from .augment import (
    ColourParams,
    CropParams,
    Views,
    WeakStrongViews,
    colour_params,
    crop_params,
    denormalize,
    normalize,
    strong_colour,
    weak_geometry,
)
from .diagnostics import (
    CollapseMonitor,
    CollapseWarning,
    PseudoLabelDiagnostics,
    class_counts,
    class_prior,
    pseudo_label_diagnostics,
)
from .hard_aware import HardAwareAugmenter, HardAwareViews, batch_donors, hard_aware_augment
from .losses import (
    ConsistencyLoss,
    HIASTLoss,
    HIASTLossOutput,
    RegionAdaptiveLoss,
    RegionAdaptiveLossOutput,
    consistency_loss,
    entropy_loss,
    hiast_loss,
    pseudo_label_ce,
    region_adaptive_loss,
    region_masks,
    smoothing_loss,
)
from .metrics import (
    PROTOCOLS,
    ConfusionMatrix,
    confusion_matrix,
    get_protocol,
    iou_from_confusion,
    miou,
    pixel_accuracy,
    protocol_scores,
)
from .mixing import (
    ClassDifficulty,
    ClassStatistics,
    DonorDraw,
    DonorSampler,
    HardAwarePaste,
    PasteResult,
    class_difficulty,
    hard_paste,
    paste_views,
    sampling_probabilities,
)
from .online import (
    ClassMix,
    ClassMixResult,
    OnlineTargets,
    classmix,
    classmix_masks,
    confidence_weight,
    online_targets,
    pixel_weights,
)
from .pseudo_labels import generate_pseudo_labels, predict_probabilities
from .quantiles import grouped_quantile
from .selection import (
    ArgmaxSelector,
    CBSTSelector,
    ConstantThresholdSelector,
    InstanceAdaptiveSelector,
    Selection,
    Selector,
    cbst_thresholds,
    confidence_and_prediction,
    ias_update,
    select_argmax,
    select_constant,
    select_with_thresholds,
    selected_class_statistics,
)
from .teacher import EMATeacher, unwrap_model

__version__ = "0.1.0"

__all__ = [
    "PROTOCOLS",
    "ArgmaxSelector",
    "CBSTSelector",
    "ClassDifficulty",
    "ClassMix",
    "ClassMixResult",
    "ClassStatistics",
    "CollapseMonitor",
    "CollapseWarning",
    "ColourParams",
    "ConfusionMatrix",
    "ConsistencyLoss",
    "ConstantThresholdSelector",
    "CropParams",
    "DonorDraw",
    "DonorSampler",
    "EMATeacher",
    "HIASTLoss",
    "HIASTLossOutput",
    "HardAwareAugmenter",
    "HardAwarePaste",
    "HardAwareViews",
    "InstanceAdaptiveSelector",
    "OnlineTargets",
    "PasteResult",
    "PseudoLabelDiagnostics",
    "RegionAdaptiveLoss",
    "RegionAdaptiveLossOutput",
    "Selection",
    "Selector",
    "Views",
    "WeakStrongViews",
    "__version__",
    "batch_donors",
    "cbst_thresholds",
    "class_counts",
    "class_difficulty",
    "class_prior",
    "classmix",
    "classmix_masks",
    "colour_params",
    "confidence_and_prediction",
    "confidence_weight",
    "confusion_matrix",
    "consistency_loss",
    "crop_params",
    "denormalize",
    "entropy_loss",
    "generate_pseudo_labels",
    "get_protocol",
    "grouped_quantile",
    "hard_aware_augment",
    "hard_paste",
    "hiast_loss",
    "ias_update",
    "iou_from_confusion",
    "miou",
    "normalize",
    "online_targets",
    "paste_views",
    "pixel_accuracy",
    "pixel_weights",
    "predict_probabilities",
    "protocol_scores",
    "pseudo_label_ce",
    "pseudo_label_diagnostics",
    "region_adaptive_loss",
    "region_masks",
    "sampling_probabilities",
    "select_argmax",
    "select_constant",
    "select_with_thresholds",
    "selected_class_statistics",
    "set_value_checks",
    "smoothing_loss",
    "strong_colour",
    "unwrap_model",
    "value_checks",
    "weak_geometry",
]
