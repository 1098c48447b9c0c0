"""Loading the public HIAST checkpoints and the standard initial weights by name.

Public checkpoints (``pseudo_resume_from.pth``, ``resume_from.pth``, ``HIAST_final.pth``) hold the
state of a segmentor whose keys start with ``seg_model.`` (and ``module.`` when saved under data
parallelism); the state may be nested under ``"model"``/``"state_dict"``. torchvision's
``resnet101`` file holds a bare ResNet (``conv1.weight`` ... ``fc.bias``). The MS-COCO DeepLab-v2
initialisation that AdaptSegNet, IAST and HIAST start source training from
(``DeepLab_resnet_pretrained_init-f81d91e8.pth``) holds the same ResNet under ``Scale.`` plus a
COCO classifier under ``Scale.layer5.``, and no ``num_batches_tracked`` buffers. All map onto
:class:`~uda_selftrain.models.DeepLabV2`; keys the model does not use are reported, keys the model
needs and the file lacks are an error (except the head when loading a backbone, and batch norm's
step counters, which old files do not have).

That file's network places the stride of a bottleneck's first block on its 1 × 1 convolution and
pools with ``ceil_mode=True`` (a Caffe conversion), where this trunk follows torchvision (stride on
the 3 × 3 convolution): the weights have the same names and shapes and load one to one, as the
public implementations load them into their own trunks; the features are not bit-equal to the
Caffe network's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["LoadReport", "convert_state_dict", "load_backbone", "load_checkpoint"]


class LoadReport(NamedTuple):
    """What :func:`load_checkpoint` did: ``loaded`` keys, ``unused`` keys of the file, and
    ``missing`` model keys that were allowed to stay at their initial value."""

    loaded: list[str]
    unused: list[str]
    missing: list[str]


def _unwrap(obj: object) -> Mapping[str, torch.Tensor]:
    for key in ("state_dict", "model", "seg_model_state", "model_state"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return _unwrap(obj[key])
    if not isinstance(obj, Mapping):
        raise TypeError(f"a checkpoint must hold a state dict, got {type(obj).__name__}")
    return obj


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename public-HIAST or torchvision keys to :class:`DeepLabV2` keys.

    ``module.``, ``seg_model.`` and ``Scale.`` prefixes are dropped; bare ResNet keys (``conv1.``,
    ``layer1.`` ... ``fc.``) move under ``backbone.``; the COCO file's classifier (``layer5.``) keeps
    its name, which no model key has.

    >>> sorted(convert_state_dict({"module.seg_model.aspp.conv2d_list.0.bias": 0, "layer1.0.conv1.weight": 0}))
    ['aspp.conv2d_list.0.bias', 'backbone.layer1.0.conv1.weight']
    >>> sorted(convert_state_dict({"Scale.bn1.weight": 0, "Scale.layer5.conv2d_list.0.bias": 0}))
    ['backbone.bn1.weight', 'layer5.conv2d_list.0.bias']
    """
    out = {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "seg_model.", "Scale."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k.split(".", 1)[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"):
            k = "backbone." + k
        out[k] = value
    return out


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    backbone_only: bool | None = None,
) -> LoadReport:
    """Load a public HIAST checkpoint or torchvision ResNet weights into ``model`` (a DeepLabV2).

    Args:
        model: the model to fill (its ``module.`` wrapper, if any, is unwrapped by the caller).
        checkpoint: a path to a ``.pth`` file or an already loaded state dict.
        backbone_only: allow the head to be missing (ImageNet weights). Default: inferred (true
            when the file has no ``aspp.`` key).

    Returns:
        A :class:`LoadReport`. Raises ``KeyError`` for missing keys and ``ValueError`` for shape
        mismatches, naming the first few.
    """
    state = convert_state_dict(_unwrap(_read(checkpoint)))
    own = model.state_dict()
    if backbone_only is None:
        backbone_only = not any(k.startswith("aspp.") for k in state)

    def may_miss(k: str) -> bool:
        return (backbone_only and not k.startswith("backbone.")) or k.endswith(
            "num_batches_tracked"
        )

    return _load_matching(model, state, own, may_miss, "keys the model needs")


def _load_matching(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    may_miss: Callable[[str], bool],
    what: str,
) -> LoadReport:
    """Load the file's keys that ``own`` has, after checking for missing keys and shapes."""
    missing = sorted(k for k in own if k not in state)
    fatal = [k for k in missing if not may_miss(k)]
    if fatal:
        raise KeyError(f"checkpoint lacks {len(fatal)} {what}, e.g. {fatal[:3]}")
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ValueError(f"{len(bad)} shape mismatches, e.g. {bad[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadReport(
        sorted(k for k in state if k in own),
        sorted(k for k in state if k not in own),
        [k for k in missing if may_miss(k)],
    )


def _read(checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> object:
    if not isinstance(checkpoint, (str, os.PathLike)):
        return checkpoint
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated or foreign file: say which one
        raise ValueError(
            f"cannot read checkpoint {os.fspath(checkpoint)!r} ({type(err).__name__}: {err})"
        ) from None


def load_backbone(
    model: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor]
) -> LoadReport:
    """Initialise only ``model.backbone`` from any supported file; the head keeps its values.

    For source training from standard initial weights: torchvision's ImageNet ``resnet101``
    file, the MS-COCO DeepLab-v2 initialisation (``Scale.`` keys), a public HIAST checkpoint or a
    checkpoint of ours (its head, e.g. for another number of classes, is not read). Every backbone
    parameter and statistic must be in the file (its ``num_batches_tracked`` may be absent).

    Returns:
        A :class:`LoadReport`: ``unused`` lists the file's other keys (``fc.``, ``layer5.``, a
        head). Raises ``KeyError`` for missing backbone keys, ``ValueError`` for shape mismatches
        or an unreadable file.

    >>> from uda_selftrain.models import deeplabv2_small
    >>> src, dst = deeplabv2_small(19, width=8), deeplabv2_small(9, width=8)
    >>> report = load_backbone(dst, src.state_dict())
    >>> report.unused[:2], len(report.missing)
    (['aspp.conv2d_list.0.bias', 'aspp.conv2d_list.0.weight'], 0)
    """
    state = convert_state_dict(_unwrap(_read(checkpoint)))
    own = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    if not own:
        raise ValueError("model has no 'backbone.' parameters to initialise")
    return _load_matching(
        model, state, own, lambda k: k.endswith("num_batches_tracked"), "backbone keys"
    )
