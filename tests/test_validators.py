"""Label-free validators: values against independent NumPy/loop computations, accumulators against
their functions, edge cases, errors, determinism and the model-level driver."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import uda_selftrain as ust


def _probs(n: int, c: int, h: int, w: int, seed: int, sharp: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(n, c, h, w, generator=g), 1)


# ------------------------------------------------------------------ independent computations


def _np_entropy(p: np.ndarray, class_balanced: bool) -> float:
    n, c, h, w = p.shape
    per_pixel, pred = [], []
    for i in range(n):
        for y in range(h):
            for x in range(w):
                q = p[i, :, y, x]
                per_pixel.append(-sum(v * math.log(v) for v in q if v > 0) / math.log(c))
                pred.append(int(np.argmax(q)))
    if not class_balanced:
        return float(np.mean(per_pixel))
    means = [
        np.mean([e for e, k in zip(per_pixel, pred, strict=True) if k == cls])
        for cls in sorted(set(pred))
    ]
    return float(np.mean(means))


def _np_im(p: np.ndarray) -> float:
    c = p.shape[1]
    q = p.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    marginal = q.mean(0)
    div = -sum(v * math.log(v) for v in marginal if v > 0) / math.log(c)
    ent = np.mean([-sum(v * math.log(v) for v in row if v > 0) for row in q]) / math.log(c)
    return div - ent


def _np_snd(f: np.ndarray, tau: float) -> float:
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    s = f @ f.T / tau
    m = len(f)
    total = 0.0
    for i in range(m):
        row = np.array([s[i, j] for j in range(m) if j != i])
        e = np.exp(row - row.max())
        pr = e / e.sum()
        total += -(pr * np.log(pr)).sum()
    return total / m


def _py_agreement(a: list[int], b: list[int]) -> float:
    ious = []
    for c in sorted(set(a) | set(b)):
        inter = sum(1 for x, y in zip(a, b, strict=True) if x == c and y == c)
        union = sum(1 for x, y in zip(a, b, strict=True) if x == c or y == c)
        ious.append(inter / union)
    return float(np.mean(ious))


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("class_balanced", [False, True])
def test_entropy_matches_loop(device, class_balanced):
    p = _probs(2, 4, 3, 5, seed=1)
    got = ust.prediction_entropy(p.to(device), class_balanced=class_balanced)
    assert got.device.type == device.type
    assert got.item() == pytest.approx(_np_entropy(p.numpy(), class_balanced), abs=1e-6)


def test_class_balanced_entropy_is_not_set_by_the_dominant_class():
    # 99 confident background pixels and one uncertain minority pixel.
    p = torch.zeros(1, 2, 1, 100)
    p[0, 0] = 1.0
    p[0, :, 0, 99] = torch.tensor([0.4, 0.6])
    plain = ust.prediction_entropy(p).item()
    balanced = ust.prediction_entropy(p, class_balanced=True).item()
    assert plain < 0.01 < 0.4 < balanced


def test_information_maximization_matches_numpy(device):
    p = _probs(2, 3, 4, 4, seed=2)
    got = ust.information_maximization(p.to(device)).item()
    assert got == pytest.approx(_np_im(p.numpy()), abs=1e-6)
    # A collapsed model (every pixel one class, confident) scores 0; a diverse confident one 1.
    collapsed = torch.zeros(1, 3, 2, 2)
    collapsed[:, 0] = 1
    assert ust.information_maximization(collapsed).item() == pytest.approx(0.0, abs=1e-9)


def test_snd_matches_numpy(device):
    g = torch.Generator().manual_seed(3)
    f = torch.randn(37, 5, generator=g)
    got = ust.soft_neighbourhood_density(f.to(device), temperature=0.05, chunk_size=8).item()
    assert got == pytest.approx(_np_snd(f.double().numpy(), 0.05), rel=1e-9)


def test_agreement_miou_matches_sets(device):
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 4, (2, 3, 7), generator=g)
    b = torch.randint(0, 4, (2, 3, 7), generator=g)
    got = ust.agreement_miou(a.to(device), b.to(device), 5).item()
    assert got == pytest.approx(_py_agreement(a.flatten().tolist(), b.flatten().tolist()))
    # Symmetric, and 1 against itself.
    assert ust.agreement_miou(b, a, 5).item() == pytest.approx(got)
    assert ust.agreement_miou(a, a, 5).item() == 1.0


def test_ensemble_agreement_matches_numpy(device):
    p = torch.stack([_probs(2, 3, 4, 4, seed=s) for s in range(4)])
    got = ust.ensemble_agreement(p.to(device)).cpu()
    vote = p.double().mean(0).argmax(1).flatten().tolist()
    expected = [_py_agreement(p[k].argmax(1).flatten().tolist(), vote) for k in range(4)]
    assert got.tolist() == pytest.approx(expected)


def test_mixval_probe_mixes_images_and_labels_alike(device):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (3, 3, 6, 8), dtype=torch.uint8, generator=g).to(device)
    pred = torch.randint(0, 4, (3, 6, 8), generator=g).to(device)
    probe = ust.mixval_probe(x, pred, 4, generator=torch.Generator().manual_seed(0))
    partner_x, partner_y = x.roll(1, 0).flip(-1), pred.roll(1, 0).flip(-1)
    pasted = (probe.labels != pred) | (probe.images != x).any(1)
    # Every pixel is the image's own or its mirrored partner's, image and label together.
    own = (probe.images == x).all(1) & (probe.labels == pred)
    theirs = (probe.images == partner_x).all(1) & (probe.labels == partner_y)
    assert bool((own | theirs).all())
    assert bool(pasted.any())
    # Per image, what is pasted is whole classes of the partner's map: ceil(k/2) of its k classes.
    for i in range(3):
        take = theirs[i] & ~own[i]
        classes = set(partner_y[i][take].tolist())
        for c in classes:
            region = partner_y[i] == c
            assert bool(theirs[i][region].all())
        k = len(set(partner_y[i].flatten().tolist()))
        assert len(classes) <= (k + 1) // 2


# ------------------------------------------------------------------ accumulators = functions


def test_accumulators_equal_functions_over_batches(device):
    batches = [_probs(2, 3, 4, 6, seed=s).to(device) for s in (10, 11, 12)]
    allp = torch.cat(batches)
    for cb in (False, True):
        acc = ust.PredictionEntropy(3, class_balanced=cb).to(device)
        for b in batches:
            acc.update(b)
        assert acc.compute().item() == pytest.approx(
            ust.prediction_entropy(allp, class_balanced=cb).item()
        )
    im = ust.InformationMaximization(3).to(device)
    for b in batches:
        im.update(b)
    assert im.compute().item() == pytest.approx(ust.information_maximization(allp).item())
    ens = ust.EnsembleAgreement(3, 3).to(device)
    stacks = [torch.stack([b, b.roll(1, -1), b.flip(-1)]) for b in batches]
    for s in stacks:
        ens.update(s)
    assert ens.compute().tolist() == pytest.approx(
        ust.ensemble_agreement(torch.cat(stacks, 1)).tolist()
    )
    aug = ust.AugmentationAgreement(3).to(device)
    for b in batches:
        aug.update(b.argmax(1), b.flip(-1).argmax(1))
    full = ust.agreement_miou(allp.argmax(1), allp.flip(-1).argmax(1), 3)
    assert aug.compute().item() == pytest.approx(full.item())
    acc.reset()
    assert math.isnan(acc.compute().item())


def test_snd_accumulator_samples_deterministically(device):
    batches = [_probs(2, 3, 8, 8, seed=s).to(device) for s in (1, 2)]
    scores = []
    for _ in range(2):
        acc = ust.SoftNeighbourhoodDensity(pixels_per_image=5, seed=7)
        for b in batches:
            acc.update(b)
        assert sum(len(s) for s in acc.samples) == 20
        scores.append(acc.compute().item())
    assert scores[0] == scores[1]
    # The samples are pixels of the batches: scoring them directly gives the same number.
    acc = ust.SoftNeighbourhoodDensity(pixels_per_image=64, seed=0)
    acc.update(batches[0])  # every pixel of both images (8 x 8 = 64)
    direct = ust.soft_neighbourhood_density(batches[0].permute(0, 2, 3, 1).reshape(-1, 3))
    assert acc.compute().item() == pytest.approx(direct.item(), rel=1e-5)


# ------------------------------------------------------------------ edge cases


def test_empty_and_masked_inputs(device):
    p = _probs(1, 3, 2, 2, seed=0).to(device)
    none = torch.zeros(1, 2, 2, dtype=torch.bool, device=device)
    assert math.isnan(ust.prediction_entropy(p, none).item())
    assert math.isnan(ust.prediction_entropy(p, none, class_balanced=True).item())
    assert math.isnan(ust.information_maximization(p, none).item())
    pred = p.argmax(1)
    assert math.isnan(ust.agreement_miou(pred, pred, 3, none).item())
    assert math.isnan(ust.soft_neighbourhood_density(torch.ones(1, 3, device=device)).item())
    # A mask keeps only its pixels: the same as scoring those pixels alone.
    one = none.clone()
    one[0, 0, 1] = True
    assert ust.prediction_entropy(p, one).item() == pytest.approx(
        ust.prediction_entropy(p[..., :1, 1:2]).item()
    )
    acc = ust.SoftNeighbourhoodDensity(pixels_per_image=4)
    acc.update(p, none)
    assert math.isnan(acc.compute().item())
    assert math.isnan(ust.SoftNeighbourhoodDensity().compute().item())
    # An empty batch scores nothing.
    assert math.isnan(ust.prediction_entropy(torch.zeros(0, 3, 2, 2, device=device)).item())


def test_unseen_classes_are_left_out_of_agreement():
    a = torch.tensor([0, 0, 1, 1])
    assert ust.agreement_miou(a, a, 19).item() == 1.0  # 17 classes nobody predicts


def test_errors_name_the_argument(device):
    p = _probs(1, 3, 2, 2, seed=0).to(device)
    with pytest.raises(TypeError, match="probabilities"):
        ust.prediction_entropy(p.argmax(1, keepdim=True))
    with pytest.raises(ValueError, match="probabilities"):
        ust.prediction_entropy(p[0])
    with pytest.raises(ValueError, match="NaN"):
        ust.prediction_entropy(torch.full_like(p, math.nan))
    with pytest.raises(ValueError, match="softmax"):
        ust.information_maximization(p * 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ust.prediction_entropy(torch.ones(1, 1, 2, 2, device=device))
    with pytest.raises(TypeError, match="valid"):
        ust.prediction_entropy(p, torch.ones(1, 2, 2, device=device))
    with pytest.raises(ValueError, match="valid"):
        ust.prediction_entropy(p, torch.ones(1, 3, 2, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="prediction"):
        ust.agreement_miou(p.argmax(1).float(), p.argmax(1), 3)
    with pytest.raises(ValueError, match="shape"):
        ust.agreement_miou(p.argmax(1), p.argmax(1)[:, :1], 3)
    with pytest.raises(ValueError, match="outside"):
        ust.agreement_miou(p.argmax(1) + 5, p.argmax(1), 3)
    with pytest.raises(ValueError, match="temperature"):
        ust.soft_neighbourhood_density(torch.ones(3, 2), temperature=0)
    with pytest.raises(ValueError, match="features"):
        ust.soft_neighbourhood_density(torch.tensor([[math.inf, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        ust.EnsembleAgreement(2, 3).update(p[None])
    with pytest.raises(ValueError, match="classes"):
        ust.PredictionEntropy(4).update(p)
    with pytest.raises(ValueError, match="prediction"):
        ust.mixval_probe(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="unknown validator"):
        ust.select_candidate([{"entropy": 0.0}], "accuracy")
    with pytest.raises(ValueError, match="candidates"):
        ust.score_candidates([], [torch.zeros(1, 3, 4, 4)], 3)


def test_device_mismatch_is_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    a = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="device"):
        ust.agreement_miou(a, a.cuda(), 2)


# ------------------------------------------------------------------ selection and the driver


def test_select_candidate_direction_nan_and_ties():
    scores = [
        {"entropy": 0.2, "mixval": math.nan},
        {"entropy": 0.1, "mixval": 0.5},
        {"entropy": 0.1, "mixval": 0.5},
    ]
    assert ust.select_candidate(scores, "entropy") == 1  # lower is better, ties to the earliest
    assert ust.select_candidate(scores, "mixval") == 1  # NaN loses


class _Fixed(nn.Module):
    """A model that predicts from the image's colour channels (so views and mixes matter)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, weight.shape[0], 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(weight.view(weight.shape[0], 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_score_candidates_identical_models_and_determinism(device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g) * 4
    models = [_Fixed(w).to(device), _Fixed(w).to(device), _Fixed(-w).to(device)]
    models[0].eval()  # models[1] stays in train mode
    blocks = [torch.randint(0, 256, (2, 3, 2, 3), dtype=torch.uint8, generator=g) for _ in "ab"]
    # Piecewise-constant images (4 x 4 blocks): rescaling changes only the blocks' borders.
    images = [b.repeat_interleave(4, 2).repeat_interleave(4, 3).to(device) for b in blocks]
    first = ust.score_candidates(models, images, 4, seed=3)
    again = ust.score_candidates(models, images, 4, seed=3)
    assert first == again
    assert first[0] == first[1]  # same weights, same scores (mode restored afterwards)
    assert models[1].training and not models[0].training
    assert first[0]["ensemble_agreement"] == 1.0  # two of three agree: they are the vote
    assert first[2]["ensemble_agreement"] < 1.0
    for s in first:
        assert set(s) == set(ust.VALIDATORS)
        assert 0.0 <= s["entropy"] <= 1.0 and 0.0 <= s["augmentation_agreement"] <= 1.0
    # A per-pixel colour model is equivariant to the flip: its views agree apart from resampling.
    assert first[0]["augmentation_agreement"] > 0.5


def test_score_candidates_gradients_untouched():
    model = _Fixed(torch.randn(3, 3))
    ust.score_candidates([model], [torch.zeros(1, 3, 4, 4, dtype=torch.uint8)], 3)
    assert all(p.grad is None for p in model.parameters())


def test_docs_page_example_runs():
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "components" / "validators.md"
    code = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, str(page), "exec"), namespace)
    assert namespace["best"] in range(3)
    assert len(namespace["scores"]) == 3


def test_mean_ranks_match_scipy_rankdata():
    from scipy.stats import rankdata

    g = torch.Generator().manual_seed(9)
    scores = [
        {k: float(torch.randint(0, 4, (), generator=g)) for k in ust.VALIDATORS} for _ in range(6)
    ]
    scores[2]["snd"] = math.nan
    expected = np.zeros(6)
    for k, higher in ust.VALIDATORS.items():
        v = np.array([s[k] for s in scores])
        key = np.where(np.isnan(v), -np.inf, v if higher else -v)
        expected += rankdata(-key, method="average") - 1
    expected /= len(ust.VALIDATORS)
    assert ust.mean_ranks(scores) == pytest.approx(expected.tolist())
    best = ust.select_candidate(scores, "mean_rank")
    assert best == int(np.flatnonzero(expected == expected.min())[0])
