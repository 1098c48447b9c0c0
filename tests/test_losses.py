from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uda_selftrain import (
    HIASTLoss,
    consistency_loss,
    entropy_loss,
    hiast_loss,
    pseudo_label_ce,
    smoothing_loss,
)


def test_golden_terms(golden, golden_loss_inputs):
    x, t, y = golden_loss_inputs()
    close = {"rtol": 1e-5, "atol": 0}
    np.testing.assert_allclose(pseudo_label_ce(x, y).item(), golden["loss_ce"], **close)
    np.testing.assert_allclose(smoothing_loss(x, y).item(), golden["loss_kld_confident"], **close)
    np.testing.assert_allclose(entropy_loss(x, y).item(), golden["loss_entropy_ignored"], **close)
    for region in ("ignored", "confident", "all"):
        np.testing.assert_allclose(
            consistency_loss(x, y, t, region=region).item(),
            golden[f"loss_consistency_softce_{region}"],
            **close,
        )


def test_golden_total_and_gradient(golden, golden_loss_inputs):
    x, t, y = golden_loss_inputs(requires_grad=True)
    out = HIASTLoss()(x, y, t)
    np.testing.assert_allclose(out.total.item(), golden["loss_total_hiast"], rtol=1e-5)
    np.testing.assert_allclose(out.ce.item(), golden["loss_ce"], rtol=1e-5)
    np.testing.assert_allclose(out.smoothing.item(), golden["loss_kld_confident"], rtol=1e-5)
    np.testing.assert_allclose(out.entropy.item(), golden["loss_entropy_ignored"], rtol=1e-5)
    np.testing.assert_allclose(
        out.consistency.item(), golden["loss_consistency_softce_ignored"], rtol=1e-5
    )
    out.total.backward()
    g = golden["loss_total_hiast_grad"]
    err = np.abs(x.grad.cpu().numpy() - g).max() / np.abs(g).max()
    assert err < 1e-5


def _autograd_total(x, y, t, weights=(1.0, 0.1, 1.0, 0.5), region="ignored", norm="reference"):
    """Independent computation of the objective with plain autograd and explicit masks."""
    c = x.shape[1]
    lp = x.log_softmax(1)
    p = lp.exp()
    conf = y != 255
    ign = ~conf
    div = c if norm == "reference" else 1
    n_c = conf.sum().clamp(min=1)
    n_i = ign.sum().clamp(min=1)
    ce = -(lp.gather(1, torch.where(conf, y, 0)[:, None])[:, 0] * conf).sum() / n_c
    sm = (-(lp.mean(1)) * conf).sum() / (div * n_c)
    ent = (-(p * lp).sum(1) * ign).sum() / (div * n_i)
    region_mask = {"ignored": ign, "confident": conf, "all": torch.ones_like(conf)}[region]
    q = t.softmax(1)
    cst = (-(q * lp).sum(1) * region_mask).sum() / (div * region_mask.sum().clamp(min=1))
    return weights[0] * ce + weights[1] * sm + weights[2] * ent + weights[3] * cst


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3),
    c=st.integers(2, 6),
    ignored_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    region=st.sampled_from(["ignored", "confident", "all"]),
    norm=st.sampled_from(["reference", "pixel"]),
)
def test_fused_matches_autograd_value_and_gradient(seed, n, c, ignored_fraction, region, norm):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, 4, 5, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(n, c, 4, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n, 4, 5), generator=gen)
    y[torch.rand(n, 4, 5, generator=gen) < ignored_fraction] = 255
    weights = (1.0, 0.1, 1.0, 0.5)
    ours = hiast_loss(x, y, t, consistency_region=region, normalization=norm).total
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = _autograd_total(x, y, t, weights, region, norm)
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(ours)


@pytest.mark.parametrize("region", ["ignored", "all"])
def test_whole_batch_form_matches_per_image_form(monkeypatch, region, device):
    """The accelerators' whole-batch fused loss (forced on a CPU) against the autograd
    reference and the CPU's image-by-image form, value and gradient."""
    from uda_selftrain import losses

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 5, 6, 7, generator=gen, dtype=torch.float64) * 3).to(device)
    t = torch.randn(3, 5, 6, 7, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(0, 5, (3, 6, 7), generator=gen)
    y[torch.rand(3, 6, 7, generator=gen) < 0.4] = 255
    y = y.to(device)

    def value_and_grad():
        a = x.clone().requires_grad_()
        out = hiast_loss(a, y, t, consistency_region=region)
        (g,) = torch.autograd.grad(out.total, a)
        return torch.stack(list(out)), g

    per_image, g_per_image = value_and_grad()
    monkeypatch.setattr(losses, "_WHOLE_BATCH_LOSS_ON_CPU", True)
    assert losses._chunks(x) == [slice(0, 3)]
    whole, g_whole = value_and_grad()
    a = x.clone().requires_grad_()
    ref = _autograd_total(a, y, t, (1.0, 0.1, 1.0, 0.5), region, "reference")
    (g_ref,) = torch.autograd.grad(ref, a)
    torch.testing.assert_close(whole, per_image, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_whole, g_per_image, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole[0], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_whole, g_ref, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda b: hiast_loss(b, y[:2], t[:2]).total, (x[:2].clone().requires_grad_(),)
    )


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (2, 3, 5), generator=gen)
    y[0, 0] = 255
    assert torch.autograd.gradcheck(lambda a: hiast_loss(a, y, t).total, (x,))
    # Each returned term carries its own gradient too.
    for i in range(1, 5):
        assert torch.autograd.gradcheck(lambda a, i=i: hiast_loss(a, y, t)[i], (x,))
    for fn in (pseudo_label_ce, smoothing_loss, entropy_loss):
        assert torch.autograd.gradcheck(lambda a, fn=fn: fn(a, y), (x,))
    assert torch.autograd.gradcheck(lambda a: consistency_loss(a, y, t), (x,))


@pytest.mark.parametrize("all_ignored", [True, False])
def test_empty_region_gives_zero_and_finite_gradient(all_ignored):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4)
    y = torch.full((2, 4, 4), 255) if all_ignored else torch.zeros(2, 4, 4, dtype=torch.long)
    out = hiast_loss(x, y, t)
    if all_ignored:
        assert out.ce.item() == 0.0 and out.smoothing.item() == 0.0
        assert out.entropy.item() > 0
    else:
        assert out.entropy.item() == 0.0 and out.consistency.item() == 0.0
        assert out.ce.item() > 0
    out.total.backward()
    assert torch.isfinite(x.grad).all()
    assert pseudo_label_ce(x, torch.full((2, 4, 4), 255)).item() == 0.0
    assert entropy_loss(x, torch.zeros(2, 4, 4, dtype=torch.long)).item() == 0.0


def test_without_teacher_and_zero_weights():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 4, generator=gen)
    y = torch.randint(0, 3, (1, 4, 4), generator=gen)
    y[0, :2] = 255
    a = hiast_loss(x, y)
    assert a.consistency.item() == 0.0
    only_ce = hiast_loss(x, y, smoothing_weight=0, entropy_weight=0, consistency_weight=0)
    torch.testing.assert_close(only_ce.total, pseudo_label_ce(x, y))


def test_mixed_precision_inputs():
    gen = torch.Generator().manual_seed(2)
    x32 = torch.randn(2, 4, 6, 6, generator=gen)
    t = torch.randn(2, 4, 6, 6, generator=gen)
    y = torch.randint(0, 4, (2, 6, 6), generator=gen)
    y[:, :3] = 255
    xb = x32.bfloat16().requires_grad_()
    out = hiast_loss(xb, y, t.bfloat16())
    assert out.total.dtype == torch.float32
    ref = hiast_loss(xb.detach().float(), y, t.bfloat16().float())
    torch.testing.assert_close(out.total, ref.total, rtol=1e-5, atol=1e-6)
    out.total.backward()
    assert xb.grad.dtype == torch.bfloat16


def test_deterministic():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 6, generator=gen, requires_grad=True)
    t = torch.randn(2, 4, 6, 6, generator=gen)
    y = torch.randint(0, 4, (2, 6, 6), generator=gen)
    a = hiast_loss(x, y, t).total
    (ga,) = torch.autograd.grad(a, x)
    b = hiast_loss(x, y, t).total
    (gb,) = torch.autograd.grad(b, x)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_bad_inputs():
    x = torch.randn(2, 3, 4, 4)
    y = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"4 dimensions"):
        hiast_loss(x[0], y)
    with pytest.raises(ValueError, match="labels must have shape"):
        hiast_loss(x, y[:, :3])
    with pytest.raises(TypeError, match="integer"):
        hiast_loss(x, y.float())
    with pytest.raises(ValueError, match="outside"):
        hiast_loss(x, torch.full((2, 4, 4), 3))
    with pytest.raises(ValueError, match="outside"):
        pseudo_label_ce(x, torch.full((2, 4, 4), -1))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        hiast_loss(bad, y)
    with pytest.raises(ValueError, match="teacher_logits"):
        hiast_loss(x, y, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="region"):
        consistency_loss(x, y, x, region="everything")
    with pytest.raises(ValueError, match="normalization"):
        HIASTLoss(normalization="mean")
    with pytest.raises(TypeError, match="floating-point"):
        hiast_loss(y, y)


@pytest.mark.cuda
def test_cuda_matches_cpu(golden):
    def inputs(device):
        x = torch.tensor(golden["loss_student_logits"], device=device, requires_grad=True)
        t = torch.tensor(golden["loss_teacher_logits"], device=device)
        return x, t, torch.tensor(golden["loss_pseudo_labels"], device=device)

    x, t, y = inputs("cpu")
    xc, tc, yc = inputs("cuda")
    a, b = hiast_loss(x, y, t).total, hiast_loss(xc, yc, tc).total
    a.backward()
    b.backward()
    torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=0)
    torch.testing.assert_close(xc.grad.cpu(), x.grad, rtol=1e-4, atol=1e-7)
