from __future__ import annotations

import pytest
import torch
from torch import nn

from uda_selftrain import EMATeacher, unwrap_model


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_lerp_matches_formula_and_buffers_copied():
    student = _net()
    teacher = EMATeacher(student, momentum=0.99)
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(2, 3, 8, 8))  # changes BN running statistics
    teacher.update(student)
    for b, t, s in zip(before, teacher.module.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)
    for tb, sb in zip(teacher.module.buffers(), student.buffers(), strict=True):
        assert torch.equal(tb, sb)
    assert int(teacher.step) == 1


def test_buffer_ema_mode():
    student = _net()
    teacher = EMATeacher(student, momentum=0.5, buffers="ema")
    old = teacher.module[1].running_mean.clone()
    student[1].running_mean.add_(2.0)
    teacher.update(student)
    torch.testing.assert_close(teacher.module[1].running_mean, old + 1.0)
    assert teacher.module[1].num_batches_tracked == student[1].num_batches_tracked


def test_warmup_momentum():
    teacher = EMATeacher(_net(), momentum=0.999, warmup=True)
    assert teacher.current_momentum() == 0.0
    student = _net()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student)  # momentum 0: copies the student
    for t, s in zip(teacher.module.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s)
    teacher.step.fill_(10_000)
    assert teacher.current_momentum() == 0.999


def test_eval_mode_no_grad_and_train_call_keeps_eval():
    teacher = EMATeacher(_net())
    teacher.train()
    assert not teacher.module.training
    out = teacher(torch.randn(1, 3, 8, 8))
    assert not out.requires_grad
    assert all(not p.requires_grad for p in teacher.module.parameters())


def test_state_dict_round_trip_and_reset():
    student = _net()
    teacher = EMATeacher(student, momentum=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0)
    teacher.update(student)
    other = EMATeacher(_net(), momentum=0.9)
    other.load_state_dict(teacher.state_dict())
    for a, b in zip(other.parameters(), teacher.parameters(), strict=True):
        assert torch.equal(a, b)
    assert int(other.step) == 1
    other.reset(student)
    for a, b in zip(other.module.parameters(), student.parameters(), strict=True):
        assert torch.equal(a, b)
    assert int(other.step) == 0


def test_wrapped_student_and_mismatch():
    student = _net()
    wrapped = nn.DataParallel(student)
    teacher = EMATeacher(wrapped)
    assert not isinstance(teacher.module, nn.DataParallel)
    teacher.update(wrapped)
    assert unwrap_model(wrapped) is student
    with pytest.raises(ValueError, match="architecture"):
        teacher.update(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="momentum"):
        EMATeacher(student, momentum=1.5)
    with pytest.raises(ValueError, match="buffers"):
        EMATeacher(student, buffers="mean")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        EMATeacher("model")


@pytest.mark.cuda
def test_cuda_update():
    student = _net().cuda()
    teacher = EMATeacher(student)
    teacher.update(student)
    assert next(teacher.module.parameters()).is_cuda
