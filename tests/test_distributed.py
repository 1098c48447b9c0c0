"""Two CPU processes (gloo): selectors and metrics agree across ranks and with one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from uda_selftrain import CBSTSelector, ConfusionMatrix, InstanceAdaptiveSelector

pytestmark = pytest.mark.distributed

WORLD = 2


def _data():
    gen = torch.Generator().manual_seed(11)
    # 3 steps, each a global batch of 4 images (2 per rank), 5 classes.
    logits = [torch.randn(4, 5, 12, 10, generator=gen) * 4 for _ in range(3)]
    targets = [torch.randint(0, 5, (4, 12, 10), generator=gen) for _ in range(3)]
    return logits, targets


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        logits, targets = _data()
        results = {}
        for granularity in ("batch", "image"):
            sel = InstanceAdaptiveSelector(5, granularity=granularity)
            labels = []
            for x in logits:
                local = x[rank * 2 : rank * 2 + 2]
                if granularity == "image" and rank == 1:
                    local = local[:1]  # a shorter last batch on one rank must not deadlock
                labels.append(sel(local).labels)
            results[granularity] = (sel.thresholds.clone(), sel.class_values.clone(), labels)
        cm = ConfusionMatrix(5)
        for x, t in zip(logits, targets, strict=True):
            cm.update(x[rank * 2 : rank * 2 + 2].argmax(1), t[rank * 2 : rank * 2 + 2])
        cbst = CBSTSelector(5, bins=1024)
        for x in logits:
            cbst.observe(x[rank * 2 : rank * 2 + 2])
        results["cm"] = cm.compute()
        results["cbst"] = cbst.fit()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_with_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    logits, targets = _data()

    # Per batch: each update sees the global batch of 4 images.
    single = InstanceAdaptiveSelector(5, granularity="batch")
    single_labels = [single(x).labels for x in logits]
    assert torch.equal(r0["batch"][0], r1["batch"][0])
    assert torch.equal(r0["batch"][1], r1["batch"][1])
    assert torch.equal(r0["batch"][0], single.thresholds)  # histograms are exact integer counts
    torch.testing.assert_close(r0["batch"][1], single.class_values, rtol=0, atol=1e-6)
    for step, lab in enumerate(single_labels):
        assert torch.equal(torch.cat([r0["batch"][2][step], r1["batch"][2][step]]), lab)

    # Per image: update j is the union of each rank's j-th image (rank 1 has only one image).
    single = InstanceAdaptiveSelector(5, granularity="batch")
    for x in logits:
        single(torch.stack([x[0], x[2]]))
        single(x[1:2])
    assert torch.equal(r0["image"][0], r1["image"][0])
    assert torch.equal(r0["image"][1], r1["image"][1])
    assert torch.equal(r0["image"][0], single.thresholds)
    torch.testing.assert_close(r0["image"][1], single.class_values, rtol=0, atol=1e-6)

    cm = ConfusionMatrix(5, sync=False)
    cbst = CBSTSelector(5, bins=1024)
    for x, t in zip(logits, targets, strict=True):
        cm.update(x.argmax(1), t)
        cbst.observe(x)
    assert torch.equal(r0["cm"], cm.compute()) and torch.equal(r1["cm"], cm.compute())
    th = cbst.fit()
    assert torch.equal(r0["cbst"], th) and torch.equal(r1["cbst"], th)
