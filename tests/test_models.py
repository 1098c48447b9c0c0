from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import DATA
from uda_selftrain.models import (
    FCDiscriminator,
    convert_state_dict,
    deeplabv2_resnet101,
    deeplabv2_small,
    load_backbone,
    load_checkpoint,
)


def golden_state() -> dict[str, torch.Tensor]:
    """The deterministic weights of the golden README, key by key in the official order."""
    keys = json.loads((DATA / "official_checkpoint_keys.json").read_text())["keys"]
    state = {}
    for i, (key, shape) in enumerate(keys.items()):
        g = torch.Generator().manual_seed(i)
        if key.endswith("num_batches_tracked"):
            t = torch.tensor(0)
        elif key.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            t = torch.randn(shape, generator=g) * 0.1
        elif key.endswith(".weight") and len(shape) == 1:
            t = 0.3 + torch.randn(shape, generator=g) * 0.05
        elif len(shape) > 1:
            t = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        else:
            t = torch.randn(shape, generator=g) * 0.01
        state["module." + key] = t
    return state


@pytest.fixture(scope="module")
def official_state():
    return golden_state()


def test_deeplab_resnet101_matches_golden_forward(golden, official_state):
    model = deeplabv2_resnet101(19)
    report = load_checkpoint(model, official_state)
    assert report.unused == ["representation.0.bias", "representation.0.weight"]
    assert report.missing == []
    model.eval()
    with torch.no_grad():
        out = model.logits(torch.from_numpy(golden["deeplab_input"]))
    expected = golden["deeplab_aspp_logits"]
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_load_checkpoint_file_and_errors(tmp_path, official_state):
    model = deeplabv2_resnet101(19)
    path = tmp_path / "HIAST_final.pth"
    torch.save({"state_dict": official_state}, path)
    load_checkpoint(model, path)
    partial = dict(official_state)
    partial.pop("module.seg_model.backbone.layer4.2.conv3.weight")
    with pytest.raises(KeyError, match=r"layer4\.2\.conv3\.weight"):
        load_checkpoint(model, partial)
    wrong = dict(official_state)
    wrong["module.seg_model.aspp.conv2d_list.0.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_checkpoint(model, wrong)


def test_torchvision_imagenet_layout_loads_backbone_only(official_state):
    # A torchvision resnet101 file: bare keys plus fc.*; the head stays at its initial value.
    tv = {
        k.removeprefix("module.seg_model.backbone."): v
        for k, v in official_state.items()
        if ".backbone." in k
    }
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    model = deeplabv2_resnet101(19)
    head = model.aspp.conv2d_list[0].weight.clone()
    report = load_checkpoint(model, tv)
    assert report.unused == ["backbone.fc.bias", "backbone.fc.weight"]
    assert all(k.startswith("aspp.") for k in report.missing) and len(report.missing) == 8
    assert torch.equal(model.aspp.conv2d_list[0].weight, head)
    assert convert_state_dict({"conv1.weight": 1}) == {"backbone.conv1.weight": 1}


def _backbone_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trunk of the golden public checkpoint, keyed as a bare torchvision ResNet."""
    return {
        k.removeprefix("module.seg_model.backbone."): v
        for k, v in state.items()
        if ".backbone." in k
    }


def _assert_backbone_equals(model, bare: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for k, v in bare.items():
        if not k.endswith("num_batches_tracked") and not k.startswith("fc."):
            assert torch.equal(own["backbone." + k], v), k


def test_initial_weights_torchvision_imagenet_file(official_state):
    """torchvision's resnet101 file (older files have no num_batches_tracked) into a 9-class model."""
    tv = {k: v for k, v in _backbone_of(official_state).items() if "num_batches" not in k}
    tv["fc.weight"], tv["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    model = deeplabv2_resnet101(9)
    head = model.aspp.conv2d_list[0].weight.clone()
    report = load_backbone(model, tv)
    assert report.unused == ["backbone.fc.bias", "backbone.fc.weight"]
    assert all(k.endswith("num_batches_tracked") for k in report.missing)
    _assert_backbone_equals(model, tv)
    assert torch.equal(model.aspp.conv2d_list[0].weight, head)


def test_initial_weights_torchvision_model_gives_the_same_features():
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet101(weights=None).eval()
    model = deeplabv2_resnet101(19).eval()
    load_backbone(model, tv.state_dict())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))
        trunk = model.backbone
        ours = trunk.layer2(trunk.layer1(trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))))
    torch.testing.assert_close(ours, ref)  # layers 3-4 are dilated here, strided in torchvision


def test_initial_weights_mscoco_deeplab_init_file(tmp_path, official_state):
    """The MS-COCO DeepLab-v2 init file of AdaptSegNet / IAST / HIAST: ``Scale.`` + a ResNet-101
    without num_batches_tracked, and a COCO classifier ``Scale.layer5.conv2d_list.{0..3}``."""
    bare = {k: v for k, v in _backbone_of(official_state).items() if "num_batches" not in k}
    coco = {"Scale." + k: v for k, v in bare.items()}
    for i in range(4):
        coco[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.randn(21, 2048, 3, 3) * 0.01
        coco[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.zeros(21)
    path = tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth"
    torch.save(coco, path)
    model = deeplabv2_resnet101(19)
    report = load_backbone(model, path)
    assert report.unused == sorted(
        f"layer5.conv2d_list.{i}.{p}" for i in range(4) for p in ("bias", "weight")
    )
    _assert_backbone_equals(model, bare)
    assert len(report.loaded) == len(bare)
    # The whole-model loader takes it too, as a backbone (no aspp keys in the file).
    report = load_checkpoint(deeplabv2_resnet101(19), path)
    assert len(report.loaded) == len(bare)


def test_initial_weights_from_our_checkpoint_and_errors(tmp_path):
    src = deeplabv2_small(19, width=8)
    path = tmp_path / "model.pt"
    torch.save(src.state_dict(), path)
    dst = deeplabv2_small(12, width=8)  # another number of classes: only the trunk is read
    report = load_backbone(dst, path)
    assert all(k.startswith("aspp.") for k in report.unused) and report.missing == []
    for k, v in src.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(KeyError, match="backbone keys"):
        load_backbone(dst, {"aspp.conv2d_list.0.bias": torch.zeros(12)})
    with pytest.raises(ValueError, match="shape mismatches"):
        load_backbone(deeplabv2_small(19, width=16), path)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"damaged\.pt"):
        load_backbone(dst, damaged)
    with pytest.raises(ValueError, match=r"damaged\.pt"):
        load_checkpoint(dst, damaged)


def test_bn_modes():
    frozen = deeplabv2_small(bn_mode="frozen").train()
    bn = frozen.backbone.bn1
    assert not bn.training and not bn.weight.requires_grad
    before = bn.running_mean.clone()
    frozen(torch.randn(2, 3, 32, 64))
    assert torch.equal(bn.running_mean, before)
    public = deeplabv2_small(bn_mode="public").train()
    public(torch.randn(2, 3, 32, 64))
    assert public.backbone.bn1.training and not public.backbone.bn1.weight.requires_grad
    assert not torch.equal(public.backbone.bn1.running_mean, before)
    with pytest.raises(ValueError, match="bn_mode"):
        deeplabv2_small(bn_mode="sync")


def test_small_model_shapes_gradients_and_groups():
    model = deeplabv2_small(19)
    x = torch.randn(2, 3, 48, 96)
    out = model(x)
    assert out.shape == (2, 19, 48, 96)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    groups = model.parameter_groups(1e-3)
    assert groups[1]["lr"] == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 4, 8, 8))


def test_discriminator_shape():
    d = FCDiscriminator(19, ndf=8)
    assert d(torch.rand(3, 19, 96, 192)).shape == (3, 1, 3, 6)
