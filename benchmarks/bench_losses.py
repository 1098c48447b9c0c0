"""HIAST loss forward + backward: our fused loss vs the reference approach.

The reference (public implementation, re-created faithfully): ``F.cross_entropy`` with the ignore
index; for each region term an ``(N, C, H, W)`` weight tensor ``ones_like(logits) * mask`` multiplied
into the per-element loss and divided by the weight tensor's sum; the soft cross-entropy checks that
its target lies in [0, 1] with two host synchronisations per call.

Prints the median time of forward + backward for each, the ratio, and the peak memory of one
forward + backward measured alone in a fresh process (CPU: peak RSS increase; GPU: peak allocated).

Usage: python benchmarks/bench_losses.py [--size 6 19 512 1024] [--device cpu|cuda] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from _common import base_parser, child_peak_memory, current_rss_mib, machine, peak_rss_mib, timeit

from uda_selftrain import hiast_loss, set_value_checks


def reference_loss(logits, labels, teacher_logits):
    c = logits.shape[1]
    ce = F.cross_entropy(logits, labels, ignore_index=255)
    confident = (labels != 255).unsqueeze(1)
    w_conf = torch.ones_like(logits) * confident
    w_ign = torch.ones_like(logits) * (~confident)
    logp = F.log_softmax(logits, dim=1)
    p = F.softmax(logits, dim=1)
    kld = (-(1.0 / c) * logp * w_conf).sum() / w_conf.sum()
    ent = (-(p * logp) * w_ign).sum() / w_ign.sum()
    q = F.softmax(teacher_logits, dim=1)
    assert q.min() >= 0 and q.max() <= 1  # the reference's two host syncs
    cst = (-(q * logp) * w_ign).sum() / w_ign.sum()
    return ce + 0.1 * kld + 1.0 * ent + 0.5 * cst


def ours_loss(logits, labels, teacher_logits):
    return hiast_loss(logits, labels, teacher_logits).total


def make_inputs(size, device):
    gen = torch.Generator().manual_seed(0)
    n, c, h, w = size
    # In place, so that creating the inputs leaves no higher high-water mark than they need.
    logits = torch.randn(n, c, h, w, generator=gen).mul_(3).to(device).requires_grad_()
    teacher = torch.randn(n, c, h, w, generator=gen).mul_(3).to(device)
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    labels[torch.rand(n, h, w, generator=gen) < 0.4] = 255
    return logits, labels.to(device), teacher


def step(fn, logits, labels, teacher):
    logits.grad = None
    fn(logits, labels, teacher).backward()


def measure_memory(which: str, size, device) -> dict[str, float]:
    set_value_checks(False)
    logits, labels, teacher = make_inputs(size, device)
    fn = ours_loss if which == "ours" else reference_loss
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn, logits, labels, teacher)
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    before = current_rss_mib()
    mark = peak_rss_mib()
    step(fn, logits, labels, teacher)
    after = peak_rss_mib()
    if after <= mark + 1:
        # The step never rose above the high-water mark left by creating the inputs: report that
        # bound (an over-estimate), flagged.
        return {"peak_mib": mark - before, "upper_bound": 1.0}
    return {"peak_mib": after - before}


def main() -> None:
    parser = base_parser(__doc__, [6, 19, 512, 1024])
    parser.add_argument("--measure-memory", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory, args.size, device)))
        return
    print(f"machine: {machine()}")
    # Memory first, in fresh processes: a child inherits its parent's peak-RSS high-water mark,
    # so the children must start before this process has grown.
    extra = ["--size", *map(str, args.size), "--device", args.device]
    r_ours = child_peak_memory(sys.argv[0], ["ours", *extra])
    r_ref = child_peak_memory(sys.argv[0], ["reference", *extra])
    m_ours, m_ref = r_ours["peak_mib"], r_ref["peak_mib"]
    bound = " (upper bound)" if "upper_bound" in r_ours else ""
    print(
        f"peak memory above inputs  ours {m_ours:8.0f} MiB{bound}   reference {m_ref:8.0f} MiB   "
        f"ours/reference {m_ours / m_ref:5.2f}"
    )

    logits, labels, teacher = make_inputs(args.size, device)
    print(
        f"inputs: logits {tuple(logits.shape)} float32 on {device} "
        f"({logits.numel() * 4 / 2**20:.0f} MiB each for student and teacher)"
    )
    a = ours_loss(logits, labels, teacher)
    b = reference_loss(logits, labels, teacher)
    print(f"same value: ours {a.item():.6f} reference {b.item():.6f}")
    set_value_checks(False)  # inputs validated by the call above; no per-call host syncs
    t_ours = timeit(lambda: step(ours_loss, logits, labels, teacher), device, args.repeat)
    t_ref = timeit(lambda: step(reference_loss, logits, labels, teacher), device, args.repeat)
    print(
        f"forward+backward  ours {t_ours * 1e3:9.1f} ms   reference {t_ref * 1e3:9.1f} ms   "
        f"ratio {t_ref / t_ours:5.2f}x"
    )


if __name__ == "__main__":
    main()
