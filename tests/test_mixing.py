from __future__ import annotations

import numpy as np
import pytest
import torch

from uda_selftrain.mixing import class_difficulty, sampling_probabilities


def test_golden_probabilities_and_hard_set(golden):
    v = torch.from_numpy(golden["hpla_class_values"])
    np.testing.assert_allclose(
        sampling_probabilities(v).numpy(), golden["hpla_sampling_probs"], rtol=1e-12
    )
    d = class_difficulty(v, 14)
    np.testing.assert_array_equal(d.hard_classes.numpy(), golden["hpla_hard_classes_k14"])
    q = golden["hpla_sampling_probs"][golden["hpla_hard_classes_k14"]]
    np.testing.assert_allclose(d.probabilities[d.hard_classes].numpy(), q / q.sum(), rtol=1e-12)
    assert d.probabilities.sum().item() == pytest.approx(1.0)


def test_synthia_absent_classes_and_no_donor_never_nan():
    v = torch.rand(19, generator=torch.Generator().manual_seed(0))
    v[[9, 14, 16]] = 0.0  # never observed: would be the "hardest" without exclusion
    has_donor = torch.ones(19, dtype=torch.bool)
    has_donor[2] = False
    d = class_difficulty(v, 14, absent_classes=(9, 14, 16), has_donor=has_donor)
    assert torch.isfinite(d.probabilities).all()
    assert d.probabilities[[2, 9, 14, 16]].eq(0).all()
    assert len(d.hard_classes) == 14 and not d.hard_mask[[2, 9, 14, 16]].any()
    assert d.probabilities.sum().item() == pytest.approx(1.0)


def test_fewer_eligible_than_k_and_none_eligible():
    v = torch.tensor([0.2, 0.5, 0.9])
    d = class_difficulty(v, 14, absent_classes=(0,))
    assert d.hard_classes.tolist() == [1, 2]
    none = class_difficulty(v, 2, has_donor=torch.zeros(3, dtype=torch.bool))
    assert none.hard_classes.numel() == 0 and none.probabilities.eq(0).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="absent_classes"):
        class_difficulty(torch.rand(3), 2, absent_classes=(5,))
    with pytest.raises(ValueError, match="num_hard"):
        class_difficulty(torch.rand(3), 0)
    with pytest.raises(TypeError, match="floating-point"):
        class_difficulty(torch.arange(3), 2)
    with pytest.raises(ValueError, match="has_donor"):
        class_difficulty(torch.rand(3), 2, has_donor=torch.ones(4, dtype=torch.bool))
