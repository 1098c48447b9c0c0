from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(DATA / "hiast_reference.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def golden_loss_inputs(golden, device):
    """The golden loss inputs on ``device``: ``make(requires_grad=False) -> (logits, teacher, labels)``."""

    def make(requires_grad: bool = False):
        x = torch.tensor(golden["loss_student_logits"], device=device, requires_grad=requires_grad)
        t = torch.tensor(golden["loss_teacher_logits"], device=device)
        y = torch.tensor(golden["loss_pseudo_labels"], device=device)
        return x, t, y

    return make


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
