"""The full pipeline's tiny preset: runs, writes its artefacts, resumes, refuses other configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("PIL")
pytest.importorskip("cv2")

# examples/ is on the import path through pytest's ``pythonpath`` setting (pyproject.toml).
import hiast_full
import pipeline.source
import pipeline.stages
from pipeline.config import Config
from pipeline.report import seed_table

import uda_selftrain as ust
from uda_selftrain.datasets import synthetic

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(tmp: Path, run_name: str, *extra: str) -> int:
    return hiast_full.main(
        [
            "--preset",
            "tiny",
            "--run-dir",
            str(tmp / run_name),
            "--data-dir",
            str(tmp / "data"),
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    assert run(tmp, "a") == 0
    return tmp


def test_tiny_pipeline_writes_everything(tiny_run):
    rd = tiny_run / "a"
    for rel in [
        "config.json",
        "metrics.jsonl",
        "results.json",
        "results.md",
        "final.pt",
        "source_only/model.pt",
        "warmup/model.pt",
        "round1/student.pt",
        "round1/teacher.pt",
        "round2/eval.json",
        "round1/stats/class_mean_probabilities.npy",
        "round1/stats/samples_with_class.json",
        "round1/stats/sample_class_stats.json",
        "round1/stats/class_threshold.npy",
        "round1/stats/statics_class.npy",
        "plots/miou_per_stage.png",
        "plots/per_class_iou.png",
    ]:
        assert (rd / rel).is_file(), rel
    assert len(list((rd / "round1" / "pseudo").rglob("*.png"))) == 12
    results = json.loads((rd / "results.json").read_text())
    assert list(results) == ["source_only", "warmup", "round1", "round2"]
    assert all(0 <= r["miou"] <= 1 for r in results.values())
    lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "pseudo_labels" for r in lines)
    done = json.loads((rd / "round1" / "stats" / "done.json").read_text())
    assert done["images"] == 12 and 0 < done["selected_fraction"] <= 1
    # The fraction is over every pixel of every pseudo-label map (48 × 96 in the tiny preset).
    per_image = done["selected_pixels_per_image"]
    assert done["selected_fraction"] == pytest.approx(per_image / (48 * 96), rel=1e-9)
    assert not list(rd.rglob("ckpt.pt"))  # training checkpoints are removed once a stage ends


def test_rerun_resumes_and_other_config_is_refused(tiny_run):
    rd = tiny_run / "a"
    before = (rd / "results.json").read_text()
    assert run(tiny_run, "a") == 0  # everything complete: nothing retrained
    assert (rd / "results.json").read_text() == before
    with pytest.raises(SystemExit, match="another configuration"):
        run(tiny_run, "a", "--round-iters", "9")


def test_interrupted_run_resumes_to_the_same_result(tiny_run, monkeypatch):
    original = pipeline.stages.save_training_state
    calls = {"n": 0}

    def interrupt_after_first_checkpoint(path, **objects):
        original(path, **objects)
        if "round1" in str(path):
            calls["n"] += 1
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.stages, "save_training_state", interrupt_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_run, "b")
    assert (tiny_run / "b" / "round1" / "ckpt.pt").is_file()
    assert (tiny_run / "b" / "round1" / "stats" / "done.json").is_file()  # labels kept
    monkeypatch.setattr(pipeline.stages, "save_training_state", original)
    log = tiny_run / "b" / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"event": "torn wri')  # as if killed in the middle of a write
    assert run(tiny_run, "b") == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line whole
    starts = [r["resumed"] for r in records if r.get("event") == "start"]
    assert starts == [False, True]
    a = json.loads((tiny_run / "a" / "results.json").read_text())
    b = json.loads((tiny_run / "b" / "results.json").read_text())
    assert calls["n"] == 1
    assert a == b


def test_ablation_flags_parse():
    cfg, _, seeds = hiast_full.parse_args(
        ["--no-hpla", "--selector", "constant", "--no-consistency", "--amp"]
    )
    assert (cfg.hpla, cfg.selector, cfg.consistency, cfg.amp) == (False, "constant", False, True)
    assert seeds == []
    cfg, abl, seeds = hiast_full.parse_args(
        [
            "--preset",
            "gta5",
            "--ablation",
            "--round-lrs",
            "1e-6",
            "1e-6",
            "1e-6",
            "--seeds",
            "0",
            "1",
        ]
    )
    assert cfg.model == "resnet101" and abl and cfg.round_lrs == (1e-6, 1e-6, 1e-6)
    assert seeds == [0, 1]


def test_large_preset_is_the_synthetic_city_at_twice_the_resolution():
    cfg, _, _ = hiast_full.parse_args(["--preset", "large"])
    data = synthetic.PRESETS[cfg.synthetic_preset]
    default = synthetic.PRESETS["default"]
    assert (data.height, data.width) == (2 * default.height, 2 * default.width)
    assert cfg.crop_size == (128, 256) and cfg.data_dir != Config.data_dir
    assert cfg.run_dir == "runs/large" and cfg.num_classes == 19
    # Its schedule is the default's: only the sizes (and the batch, for time) change.
    base = Config()
    assert (cfg.source_iters, cfg.warmup_iters, cfg.round_iters, cfg.rounds) == (
        base.source_iters,
        base.warmup_iters,
        base.round_iters,
        base.rounds,
    )


def test_seed_table_reports_mean_and_sample_std():
    rows = {
        "a": [{"miou": 0.30, "iou": [0.2, 0.4]}, {"miou": 0.40, "iou": [0.2, 0.6]}],
    }
    table = seed_table(rows, ["x", "y"], [0, 1])
    assert "| a | 35.0 ± 7.1 | 20.0 ± 0.0 | 50.0 ± 14.1 |" in table
    assert "(seeds 0, 1)" in table


def test_run_folder_has_diagnostics_and_a_vanishing_class_warns(tiny_run, monkeypatch):
    """A run writes per-round diagnostics and their plot; a class that disappears warns."""
    import torch

    import uda_selftrain as ust

    run_dir = tiny_run / "a"
    assert run(tiny_run, "a") == 0
    record = json.loads((run_dir / "round2" / "diagnostics.json").read_text())
    assert len(record["composition"]) == 19 and len(record["prior"]) == 19
    assert record["pasted_share"] is not None  # round 1's pasted pixels, per class
    assert (run_dir / "round1" / "pasted_pixels.json").is_file()
    assert (run_dir / "plots" / "pseudo_label_shares.png").is_file()
    # Force a vanishing class: the second round's pseudo-labels lose class 0 entirely.
    stats = ust.ClassStatistics.load(run_dir / "round2" / "stats", 19)
    prior = torch.tensor(json.loads((run_dir / "source_prior.json").read_text()))
    monitor = ust.CollapseMonitor(prior, class_names=list(ust.datasets.CITYSCAPES_CLASSES))
    monitor.update(stats.class_pixels, total_pixels=10**6, warn=False)
    lost = stats.class_pixels.clone()
    lost[0] = 0
    with pytest.warns(ust.CollapseWarning, match="road"):
        diag = monitor.update(lost, total_pixels=10**6)
    assert 0 in diag.vanishing


def _ddp_worker(rank: int, port: int, args: list[str]) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    import hiast_full as hf

    try:
        hf.main(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_agree_with_one(tiny_run):
    """The tiny preset's round under torchrun-style DDP (2 CPU processes, gloo) vs one process.

    Pseudo-labels: one process updating θ on 2 images at a time equals 2 ranks with 1 image each
    (the selector's histograms are all-reduced), so the statistics must match exactly. Training:
    the global batch is split across ranks, so the result must agree closely (batch norm sees
    half batches per rank, and float sums are reduced in another order).
    """
    import socket

    import numpy as np
    import torch
    import torch.multiprocessing as mp

    from uda_selftrain.class_statistics import ClassStatistics

    warm = tiny_run / "a" / "warmup" / "model.pt"
    common = [
        "--preset",
        "tiny",
        "--data-dir",
        str(tiny_run / "data"),
        "--quiet",
        "--init-warmup",
        str(warm),
        "--rounds",
        "1",
    ]
    assert hiast_full.main([*common, "--run-dir", str(tiny_run / "one"), "--pl-batch", "2"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        _ddp_worker, args=(port, [*common, "--run-dir", str(tiny_run / "two")]), nprocs=2, join=True
    )
    one = ClassStatistics.load(tiny_run / "one" / "round1" / "stats")
    two = ClassStatistics.load(tiny_run / "two" / "round1" / "stats")
    np.testing.assert_allclose(two.thresholds, one.thresholds, atol=1e-6)
    np.testing.assert_allclose(two.class_values, one.class_values, atol=1e-6)
    order = [two.index(n) for n in one.names]
    assert torch.equal(two.sample_class_pixels[order], one.sample_class_pixels)
    r1 = json.loads((tiny_run / "one" / "results.json").read_text())["round1"]["miou"]
    r2 = json.loads((tiny_run / "two" / "results.json").read_text())["round1"]["miou"]
    assert abs(r1 - r2) < 0.05


def test_online_and_semi_supervised_examples_run(tiny_run, tmp_path):
    import online_selftraining
    import semi_supervised

    data = str(tiny_run / "data")
    common = ["--synthetic-preset", "tiny", "--data-dir", data, "--width", "8", "--quiet"]
    out = str(tmp_path / "o")
    assert (
        online_selftraining.main([*common, "--iters", "3", "--out", out, "--seeds", "0", "1"]) == 0
    )
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert set(res) == {"baseline", "hiast"} and res["hiast"]["components"]["ias"]
    assert len(res["hiast"]["miou_per_seed"]) == 2 and res["hiast"]["miou_std"] is not None
    semi = [*common, "--iters", "2", "--fractions", "0.5", "--out", str(tmp_path / "s")]
    assert semi_supervised.main([*semi, "--seeds", "0", "1"]) == 0
    res = json.loads((tmp_path / "s" / "results.json").read_text())["results"]
    assert len(res["0.5"]["hiast"]) == 2 and all(0 <= v <= 1 for v in res["0.5"]["supervised_only"])
    assert "| 0.5 (6) |" in (tmp_path / "s" / "results.md").read_text()
    # A third seed reuses the two done (their files are not rewritten); other settings are refused.
    before = (tmp_path / "s" / "seed0.json").stat().st_mtime_ns
    assert semi_supervised.main([*semi, "--seeds", "0", "1", "2"]) == 0
    assert (tmp_path / "s" / "seed0.json").stat().st_mtime_ns == before
    res = json.loads((tmp_path / "s" / "results.json").read_text())["results"]
    assert res["0.5"]["seeds"] == ["0", "1", "2"]
    with pytest.raises(SystemExit, match="other settings"):
        semi_supervised.main([*common, "--iters", "3", "--fractions", "0.5", "--out", semi[-1]])


def test_online_example_composes_daformer_and_mic_components(tiny_run, tmp_path, monkeypatch):
    """RCS, MIC and FD by flags in the online loop; per-(variant, seed) files make reruns skip
    finished work; bad variant names are refused before any training."""
    import online_selftraining

    data = str(tiny_run / "data")
    common = ["--synthetic-preset", "tiny", "--data-dir", data, "--width", "8", "--quiet"]
    out = tmp_path / "o"
    variants = ["dacs+rcs+mic", "dacs+fd+ias+hpla"]
    argv = [*common, "--iters", "2", "--out", str(out), "--variants", *variants]
    argv += ["--fd-encoder", str(tiny_run / "a" / "final.pt")]
    assert online_selftraining.main(argv) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["dacs+rcs+mic"]["components"] == {
        "rcs": True,
        "mic": True,
        "fd": False,
        "ias": False,
        "hpla": False,
        "reg": False,
        "cst": False,
    }
    assert res["dacs+fd+ias+hpla"]["components"]["fd"]
    assert len(res["dacs+rcs+mic"]["iou_per_seed"][0]) == 19
    assert (tiny_run / "data" / "source_class_counts.npz").is_file()
    assert "dacs+rcs+mic" in (out / "results.md").read_text()
    # A rerun reads the finished (variant, seed) files instead of training again.
    monkeypatch.setattr(online_selftraining, "run_variant", lambda *a, **k: 1 / 0)
    assert online_selftraining.main(argv) == 0
    # ... and refuses them when the settings differ, rather than mixing them into new results.
    other = [a if a != "2" else "3" for a in argv]
    with pytest.raises(SystemExit, match="other settings"):
        online_selftraining.main(other)
    for bad in (["dacs+nope"], ["dacs+hpla"], ["mic"], ["dacs+fd"]):
        with pytest.raises(SystemExit):
            online_selftraining.main([*common, "--out", str(out), "--variants", *bad])


def test_evaluate_example(tiny_run, tmp_path):
    import evaluate

    out = tmp_path / "eval"
    args = [
        str(tiny_run / "a" / "final.pt"),
        "--preset",
        "tiny",
        "--data-dir",
        str(tiny_run / "data"),
    ]
    assert (
        evaluate.main(
            [*args, "--device", "cpu", "--scales", "0.75", "1.0", "--flip", "--out", str(out)]
        )
        == 0
    )
    scores = json.loads((out / "scores.json").read_text())
    assert 0 <= scores["miou"] <= 1 and scores["flip"] is True
    assert len(list((out / "predictions").glob("*.png"))) == 6


def test_accelerator_code_paths_end_to_end(tiny_run, monkeypatch):
    # The branches a GPU takes (float resizing of uint8 images, index_add_ histograms) forced on
    # the CPU: the whole pipeline must give nearly run "a"'s results (measured: within 0.003 mIoU;
    # the images reaching the model on the 0-255 scale, as before a fix, gave 0.023 vs 0.086).
    from uda_selftrain import _histogram, augment, losses

    monkeypatch.setattr(augment, "_NATIVE_UINT8_ON_CPU", False)
    monkeypatch.setattr(augment, "_BATCHED_BLUR_ON_CPU", True)
    monkeypatch.setattr(augment, "_BATCHED_GEOMETRY_ON_CPU", True)
    monkeypatch.setattr(losses, "_WHOLE_BATCH_LOSS_ON_CPU", True)
    monkeypatch.setattr(_histogram, "_FORCE_SYNC_FREE", True)
    assert run(tiny_run, "accelerator-paths") == 0
    a = json.loads((tiny_run / "a" / "results.json").read_text())
    b = json.loads((tiny_run / "accelerator-paths" / "results.json").read_text())
    assert list(a) == list(b)
    for stage in a:
        assert abs(a[stage]["miou"] - b[stage]["miou"]) < 0.02, (stage, a, b)


def test_minimal_example_adapts_a_checkpoint(tiny_run, tmp_path):
    """hiast_minimal.py: the tiny run's warm-up model in, an adapted model out."""
    import hiast_minimal
    import torch

    def argv(out):
        return [
            "--checkpoint",
            str(tiny_run / "a" / "warmup" / "model.pt"),
            "--target-root",
            str(tiny_run / "data" / "target"),
            "--out",
            str(out),
            "--width",
            "8",
            "--crop",
            "32",
            "64",
            "--batch-size",
            "4",
            "--rounds",
            "2",
            "--iters",
            "4",
            "--num-hard",
            "10",
        ]

    out = tmp_path / "minimal"
    miou = hiast_minimal.main(argv(out))
    assert 0.0 <= miou <= 1.0
    assert (out / "adapted.pt").is_file()
    assert (out / "round2" / "stats" / "done.json").is_file()
    # --select: the adapted model is the validator's pick among the start and the rounds' teachers.
    out2 = tmp_path / "minimal_select"
    hiast_minimal.main([*argv(out2), "--select", "ensemble_agreement"])
    choice = json.loads((out2 / "selection.json").read_text())
    assert [c["name"] for c in choice["candidates"]] == ["start", "round1", "round2"]
    scores = [c["scores"] for c in choice["candidates"]]
    assert (
        choice["picked"]
        == ["start", "round1", "round2"][
            hiast_minimal.ust.select_candidate(scores, "ensemble_agreement")
        ]
    )
    a = torch.load(out / "adapted.pt", weights_only=True)  # the last teacher, without --select
    b = torch.load(out2 / "adapted.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a) == (choice["picked"] == "round2")
    assert len(list((out / "round1" / "pseudo").rglob("*.png"))) == 12


def test_auto_selection_scores_every_model_and_keeps_training_identical(tiny_run):
    """--select: every model of the run scored on unlabelled images after each round; the pick is
    final.pt; --patience stops early; the rounds that do run train to identical weights."""
    import torch

    assert run(tiny_run, "sel", "--select", "mixval", "--select-images", "6") == 0
    rd, ref = tiny_run / "sel", tiny_run / "a"
    for name in ("round2/teacher.pt", "round1/student.pt"):
        a = torch.load(rd / name, weights_only=True)
        b = torch.load(ref / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    sel = json.loads((rd / "round2" / "selection.json").read_text())
    names = [c["name"] for c in sel["candidates"]]
    assert names == [
        "source_only",
        "warmup",
        "round1/teacher",
        "round1/student",
        "round2/teacher",
        "round2/student",
    ]
    assert all(set(c["scores"]) == set(ust.VALIDATORS) for c in sel["candidates"])
    best = names[ust.select_candidate([c["scores"] for c in sel["candidates"]], "mixval")]
    results = json.loads((rd / "results.json").read_text())
    assert results["selected"]["picked"] == best
    picked = dict(zip(names, [c["path"] for c in sel["candidates"]], strict=True))[best]
    final = torch.load(rd / "final.pt", weights_only=True)
    want = torch.load(picked, weights_only=True)
    assert all(torch.equal(final[k], want[k]) for k in want)
    log = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["picked"] for r in log if r.get("event") == "selection"][-1] == best
    # A rerun with another validator re-decides from the stored scores; nothing is retrained.
    assert run(tiny_run, "sel", "--select", "entropy", "--select-images", "6") == 0
    results = json.loads((rd / "results.json").read_text())
    entropy_best = names[ust.select_candidate([c["scores"] for c in sel["candidates"]], "entropy")]
    assert results["selected"]["picked"] == entropy_best
    # Patience 1 with a validator that prefers an early model stops before round 2.
    assert (
        run(
            tiny_run,
            "stop",
            "--select",
            "ensemble_agreement",
            "--patience",
            "1",
            "--select-images",
            "6",
        )
        == 0
    )
    first = json.loads((tiny_run / "stop" / "round1" / "selection.json").read_text())
    picked = ust.select_candidate([c["scores"] for c in first["candidates"]], "ensemble_agreement")
    stopped = not first["candidates"][picked]["name"].startswith("round1")  # an older model won
    assert (tiny_run / "stop" / "round2" / "teacher.pt").is_file() != stopped
    with pytest.raises(SystemExit, match="--select"):
        run(tiny_run, "bad", "--patience", "1")
    with pytest.raises(SystemExit, match="--select must be one of"):
        run(tiny_run, "bad", "--select", "accuracy")


def test_validator_benchmark_script(tiny_run, tmp_path):
    """docs/results/validators.py on the tiny run: scores every candidate, true mIoU as the
    pipeline's, the table's measures from them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "validators_bench", EXAMPLES.parent / "docs" / "results" / "validators.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "seed0").symlink_to(tiny_run / "a", target_is_directory=True)
    out = tmp_path / "validators.md"
    argv = ["--regime", "tiny", str(tmp_path / "runs"), "--seeds", "0", "--images", "6"]
    assert bench.main([*argv, "--ct-values", "tiny", "5.0", "--out", str(out)]) == 0
    data = json.loads((tiny_run / "a" / "validators.json").read_text())
    rows = data["candidates"]
    assert [r["name"] for r in rows][:3] == ["source_only", "warmup", "round1/teacher"]
    for stage in ("source_only", "warmup", "round1", "round2"):
        name = stage if not stage.startswith("round") else f"{stage}/teacher"
        truth = json.loads((tiny_run / "a" / stage / "eval.json").read_text())["miou"]
        assert next(r["miou"] for r in rows if r["name"] == name) == pytest.approx(truth)
    best = max(r["miou"] for r in rows)
    measures = bench.run_measures(rows, "round 1")
    assert measures["regret"] == pytest.approx(100 * (best - rows[2]["miou"]))
    text = out.read_text()
    for policy in (*ust.VALIDATORS, "last round", "round 1"):
        assert f"| {policy} |" in text or f"| **{policy}** |" in text
    assert "CT, last round (the documented per-seed values)" in text


def test_online_checkpoints_are_validator_candidates(tiny_run, tmp_path):
    """--checkpoint-every keeps the teacher and student every N steps and after the last, without
    changing the run; the validator benchmark scores them as an online regime."""
    import importlib.util

    import online_selftraining

    data = str(tiny_run / "data")
    common = ["--synthetic-preset", "tiny", "--data-dir", data, "--width", "8", "--quiet"]
    common += ["--iters", "5", "--variants", "hiast"]
    plain, kept = tmp_path / "plain", tmp_path / "kept"
    assert online_selftraining.main([*common, "--out", str(plain)]) == 0
    assert online_selftraining.main([*common, "--out", str(kept), "--checkpoint-every", "2"]) == 0
    result = {
        d: json.loads((d / "results.json").read_text())["results"]["hiast"]["miou_per_seed"]
        for d in (plain, kept)
    }
    assert result[plain] == result[kept]  # saving draws no random number
    run_dir = kept / "hiast" / "seed0"
    assert sorted(p.name for p in run_dir.glob("step*")) == ["step2", "step4", "step5"]
    for step in ("step2", "step4", "step5"):
        assert (run_dir / step / "teacher.pt").is_file() and (
            run_dir / step / "student.pt"
        ).is_file()
    with pytest.raises(SystemExit):
        online_selftraining.main([*common, "--out", str(kept), "--checkpoint-every", "-1"])

    spec = importlib.util.spec_from_file_location(
        "validators_bench", EXAMPLES.parent / "docs" / "results" / "validators.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "validators.md"
    argv = ["--regime", "online", str(kept / "hiast"), "--seeds", "0", "--images", "4"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    rows = json.loads((run_dir / "validators.json").read_text())["candidates"]
    names = [r["name"] for r in rows]
    assert names == [f"step{k}/{role}" for k in (2, 4, 5) for role in ("teacher", "student")]
    assert bench.pick(rows, "last round") == names.index("step5/teacher")
    assert bench.pick(rows, "round 1") == names.index("step2/teacher")
    # The final teacher is the model the run evaluated: the same true mIoU.
    assert 100 * rows[names.index("step5/teacher")]["miou"] == pytest.approx(
        100 * result[kept][0], abs=1e-6
    )
    text = out.read_text()
    assert "no pseudo-label diagnostics" in text and "| online | entropy |" in text
    # Patience counts kept steps: a pick one kept step old stops training there.
    fake = [
        {**r, "scores": {"entropy": e}} for r, e in zip(rows, (1, 1, 0.5, 0.5, 2, 2), strict=True)
    ]
    assert bench.with_patience(fake, "entropy", 1) == (names.index("step4/teacher"), 5)
    assert bench.with_patience(fake, "entropy", 2) == (names.index("step4/teacher"), 5)


def test_backbone_weights_start_source_training(tiny_run):
    """--backbone-weights: source-only training starts from the file's trunk (our checkpoint
    here; the ImageNet and MS-COCO layouts are tested in test_models); a damaged file is named."""
    import torch

    final = tiny_run / "a" / "final.pt"
    short = ["--source-iters", "1", "--warmup-iters", "0", "--rounds", "0"]
    assert run(tiny_run, "bb", "--backbone-weights", str(final), *short) == 0
    log = [
        json.loads(line) for line in (tiny_run / "bb" / "metrics.jsonl").read_text().splitlines()
    ]
    init = next(r for r in log if r.get("event") == "init_backbone")
    assert init["path"] == str(final) and all(k.startswith("aspp.") for k in init["unused"])
    # One step of Adam at the source learning rate moves the trunk only a little from the file's.
    trained = torch.load(tiny_run / "bb" / "source_only" / "model.pt", weights_only=True)
    start = torch.load(final, weights_only=True)
    w = "backbone.layer4.0.conv2.weight"
    scratch = torch.load(tiny_run / "a" / "source_only" / "model.pt", weights_only=True)
    assert (trained[w] - start[w]).abs().max() < (scratch[w] - start[w]).abs().max()
    bad = tiny_run / "damaged.pt"
    bad.write_bytes(final.read_bytes()[:64])
    with pytest.raises(ValueError, match="damaged"):
        run(tiny_run, "bb2", "--backbone-weights", str(bad), *short)


def test_getting_started_sequence_shares_one_run_folder(tiny_run, capsys):
    """The default run, then --ablation in the same folder (it reuses the source-only and
    warm-up stages and leaves the run's final model alone), then a rerun that says it resumes."""
    import torch

    rd = tiny_run / "a"
    before = torch.load(rd / "final.pt", weights_only=True)
    capsys.readouterr()
    assert run(tiny_run, "a", "--ablation") == 0
    err = capsys.readouterr().err
    assert f"{rd / 'source_only'}: finished earlier" in err
    assert f"{rd / 'warmup'}: finished earlier" in err
    after = torch.load(rd / "final.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (rd / "ablation.md").is_file() and (rd / "ablation" / "ct" / "final.pt").is_file()
    assert run(tiny_run, "a") == 0  # the default command again: still the same folder


def test_merge_class_labels_moves_only_the_flagged_classes(tmp_path):
    import numpy as np
    from pipeline.collapse import merge_class_labels, merge_round

    from uda_selftrain.datasets.image_io import read_label, write_label

    labels = np.array([[0, 255, 0, 2], [1, 1, 255, 255]], dtype=np.uint8)
    other = np.array([[1, 1, 255, 1], [2, 255, 1, 3]], dtype=np.uint8)
    assert merge_class_labels(labels, other, [1]).tolist() == [[1, 1, 0, 1], [1, 1, 1, 255]]
    assert merge_class_labels(labels, other, []).tolist() == labels.tolist()
    for name, arr in (("mine", labels), ("theirs", other)):
        (tmp_path / name / "city").mkdir(parents=True)
        write_label(tmp_path / name / "city" / "a.png", arr)
    restored = merge_round(tmp_path / "mine", tmp_path / "theirs", [1, 3], 4)
    assert restored == [0, 4, 0, 1]  # four pixels became 1, one became 3
    assert read_label(tmp_path / "mine" / "city" / "a.png").tolist() == [
        [1, 1, 0, 1],
        [1, 1, 1, 3],
    ]
    assert merge_round(tmp_path / "mine", tmp_path / "theirs", [1, 3], 4) == [0, 0, 0, 0]


@pytest.mark.parametrize("guard", ["keep", "student"])
def test_collapse_guard_relabels_a_flagged_class_before_training(tiny_run, monkeypatch, guard):
    """Force the monitor to flag sky (10) in round 2: its pixels then come from round 1's labels
    (keep) or the student's (student), and the other classes' labels are the teacher's."""
    import numpy as np

    from uda_selftrain.datasets.image_io import read_label

    original = hiast_full.diagnose_round

    def flag_sky(cfg, run_dir, k, stats, monitor, log):
        return original(cfg, run_dir, k, stats, monitor, log) + ([10] if k == 2 else [])

    monkeypatch.setattr(hiast_full, "diagnose_round", flag_sky)
    assert run(tiny_run, f"guard_{guard}", "--collapse-guard", guard) == 0
    rd = tiny_run / f"guard_{guard}"
    record = json.loads((rd / "round2" / "guard.json").read_text())
    assert 10 in record["classes"] and record["guard"] == guard
    source = rd / ("round1/pseudo" if guard == "keep" else "round2/guard_student/pseudo")
    teacher_labels = tiny_run / "a" / "round2" / "pseudo"  # the same round without the guard
    moved = 0
    for path in sorted(teacher_labels.rglob("*.png")):
        rel = path.relative_to(teacher_labels)
        before, after = read_label(path), read_label(rd / "round2" / "pseudo" / rel)
        theirs = read_label(source / rel)
        flagged = np.isin(theirs, record["classes"])
        assert (after[flagged] == theirs[flagged]).all()
        assert (after[~flagged] == before[~flagged]).all()
        moved += int((after != before).sum())
    assert moved == sum(record["restored_pixels"]) > 0
    assert (rd / "round1" / "guard.json").is_file()  # round 1: nothing to compare with, no action
    assert json.loads((rd / "round1" / "guard.json").read_text())["classes"] == []


def test_pseudo_labelling_killed_midway_resumes_to_identical_files(tiny_run, tmp_path, monkeypatch):
    """The library's pseudo-labelling: a kill after a checkpoint, rerun → the same files."""
    import torch

    import uda_selftrain as ust
    import uda_selftrain.pseudo_labels as pl
    from uda_selftrain.datasets import Cityscapes
    from uda_selftrain.models import deeplabv2_small

    model = deeplabv2_small(19, width=8)
    model.load_state_dict(torch.load(tiny_run / "a" / "warmup" / "model.pt", weights_only=True))
    target = Cityscapes(tiny_run / "data" / "target", "train", label_type=None)

    def label(folder, **kwargs):
        selector = ust.InstanceAdaptiveSelector(19)
        return ust.generate_pseudo_labels(model, target, selector, folder, **kwargs)

    reference = label(tmp_path / "whole")
    calls = {"n": 0}
    original = pl.atomic_torch_save

    def killed_after_second_checkpoint(path, obj):
        original(path, obj)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed right after the checkpoint

    monkeypatch.setattr(pl, "atomic_torch_save", killed_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        label(tmp_path / "killed", checkpoint_every=3)
    state = torch.load(tmp_path / "killed" / "pseudo_state_rank0.pt", weights_only=False)
    assert state["step"] == 6
    monkeypatch.setattr(pl, "atomic_torch_save", original)
    seen = []
    resumed = label(tmp_path / "killed", checkpoint_every=3, progress=lambda s, t: seen.append(s))
    assert seen[0] == 7  # continued after the checkpoint, not from image 0
    for name in ("class_mean_probabilities.npy", "class_threshold.npy", "sample_class_stats.json"):
        a = (tmp_path / "whole" / "stats" / name).read_bytes()
        assert a == (tmp_path / "killed" / "stats" / name).read_bytes(), name
    for png in sorted((tmp_path / "whole" / "pseudo").rglob("*.png")):
        other = tmp_path / "killed" / "pseudo" / png.relative_to(tmp_path / "whole" / "pseudo")
        assert png.read_bytes() == other.read_bytes()
    assert resumed.names == reference.names
    assert not (tmp_path / "killed" / "pseudo_state_rank0.pt").exists()


class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it."""


def _kill_on_call(monkeypatch, owner, attr, *, when):
    """Replace owner.attr with a wrapper that raises _Killed on the call where ``when`` is true."""
    original = getattr(owner, attr)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if when(count["n"], args, kwargs):
            raise _Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)


def _after_checkpoint_of(stage):
    """Kill right after the first checkpoint of ``stage`` is written."""
    saved = {"done": False}
    original = pipeline.stages.save_training_state

    def save(path, **objects):
        original(path, **objects)
        if path.parent.name == stage and not saved["done"]:
            saved["done"] = True
            raise _Killed

    return save


KILL_POINTS = {
    "source_after_checkpoint": lambda mp: mp.setattr(
        pipeline.stages, "save_training_state", _after_checkpoint_of("source_only")
    ),
    # source-only draws 20 batches; the warm-up 2 per iteration: call 23 is its iteration 2,
    # before its first checkpoint (iteration 5)
    "warmup_before_checkpoint": lambda mp: _kill_on_call(
        mp, pipeline.source, "source_batch", when=lambda n, a, k: n == 23
    ),
    "pseudo_labels": lambda mp: _kill_on_call(
        mp,
        __import__("uda_selftrain.datasets.image_io").datasets.image_io,
        "write_label",
        when=lambda n, a, k: n == 7,
    ),
    "round1_after_checkpoint": lambda mp: mp.setattr(
        pipeline.stages, "save_training_state", _after_checkpoint_of("round1")
    ),
    "evaluation": lambda mp: _kill_on_call(
        mp, pipeline.stages, "evaluate", when=lambda n, a, k: "round1" in k.get("desc", "")
    ),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_a_kill_in_any_stage_resumes_to_bit_identical_weights(tiny_run, monkeypatch, point):
    import torch

    name = f"kill_{point}"
    with monkeypatch.context() as mp:
        KILL_POINTS[point](mp)
        with pytest.raises(_Killed):
            run(tiny_run, name)
    assert run(tiny_run, name) == 0
    final = torch.load(tiny_run / name / "final.pt", weights_only=True)
    reference = torch.load(tiny_run / "a" / "final.pt", weights_only=True)
    assert final.keys() == reference.keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key
    records = [
        json.loads(line) for line in (tiny_run / name / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [(r["stage"]) for r in records if r.get("event") == "eval"]
    assert len(evals) == len(set(evals))  # no stage evaluated (logged) twice


def test_gradient_accumulation_and_the_guards_run(tiny_run):
    """--accumulate 2 splits each batch in two micro-batches in every training stage; the collapse
    guards (source CE, threshold floor, ramp-up) run with it."""
    name = "accumulate"
    guards = ["--source-weight", "0.5", "--min-threshold", "0.6", "--rampup-iters", "4"]
    assert run(tiny_run, name, "--accumulate", "2", "--rounds", "1", *guards) == 0
    thresholds = json.loads((tiny_run / name / "round1" / "diagnostics.json").read_text())[
        "thresholds"
    ]
    assert min(thresholds) >= 0.6 - 1e-6
    assert hiast_full.rampup(0, 4) == pytest.approx(math.exp(-5)) and hiast_full.rampup(4, 4) == 1.0
    results = json.loads((tiny_run / name / "results.json").read_text())
    assert set(results) == {"source_only", "warmup", "round1"}
    with pytest.raises(SystemExit, match="accumulate"):
        run(tiny_run, "accumulate3", "--accumulate", "3")


@pytest.mark.slow
def test_paper_preset_dry_run_on_real_resolution_files(tmp_path):
    """--max-iters: every stage of the gta5 and synthia presets (DeepLabV2-ResNet101) on the synthetic
    city written at the real datasets' sizes and layouts, at reduced training sizes."""
    from uda_selftrain.datasets import GTA5, SYNTHIA, Cityscapes, synthetic

    root = synthetic.generate_real_resolution(tmp_path / "real", num_images=2, progress=False)
    assert GTA5(root / "GTA5")[0]["image"].shape == (3, 1052, 1914)
    synthia = SYNTHIA(root / "SYNTHIA")[0]
    assert synthia["image"].shape == (3, 760, 1280)
    assert not set(synthia["label"].unique().tolist()) & {9, 14, 16}
    assert Cityscapes(root / "cityscapes", "val")[0]["label"].shape == (1024, 2048)
    small = ["--batch-size", "2", "--crop-size", "64", "128", "--target-size", "96", "192"]
    for preset, source in (("gta5", "GTA5"), ("synthia", "SYNTHIA")):
        run_dir = tmp_path / preset
        argv = ["--preset", preset, "--source-root", str(root / source)]
        argv += ["--target-root", str(root / "cityscapes"), "--run-dir", str(run_dir)]
        argv += ["--max-iters", "1", "--source-size", "90", "160", "--quiet", *small]
        assert hiast_full.main(argv) == 0
        results = json.loads((run_dir / "results.json").read_text())
        assert set(results) == {"source_only", "warmup", "round1"}
        assert (run_dir / "round1" / "stats" / "sample_class_stats.json").is_file()
        costs = [
            json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"cost"' in line
        ]
        stages = {c["stage"] for c in costs}
        assert {"source_only", "warmup", "round1", "round1/pseudo_labels", "round1/eval"} <= stages
        assert all(c["peak_rss_mib"] > 0 and c["seconds"] >= 0 for c in costs)
        # evaluate.py on the preset: only --target-root, and the pipeline's number for final.pt.
        import evaluate

        out = tmp_path / f"eval_{preset}"
        argv = [str(run_dir / "final.pt"), "--preset", preset, "--input-size", "96", "192"]
        argv += ["--target-root", str(root / "cityscapes"), "--device", "cpu", "--out", str(out)]
        assert evaluate.main(argv) == 0
        scores = json.loads((out / "scores.json").read_text())
        assert scores["miou"] == pytest.approx(results["round1"]["miou"], abs=1e-12)
        assert len(scores["classes"]) == (16 if preset == "synthia" else 19)


def test_evaluate_example_cityscapes_oxford_preset(tmp_path):
    """evaluate.py --preset cityscapes_oxford on Oxford RobotCar's layout at its real size
    (1280 x 960, RGBA annotations), 9 classes, the oxford9 protocol."""
    import evaluate
    import numpy as np
    import torch
    from PIL import Image

    from uda_selftrain.datasets.image_io import write_rgb
    from uda_selftrain.models import deeplabv2_resnet101

    root = tmp_path / "Oxford_Robot_ICCV19"
    g = np.random.default_rng(0)
    (root / "anno").mkdir(parents=True)
    for k in range(2):
        write_rgb(root / "val" / f"{k:04d}.png", g.integers(0, 256, (960, 1280, 3), np.uint8))
        anno = g.integers(0, 20, (960, 1280)).astype(np.uint8)
        rgba = np.stack([anno, anno, anno, np.full_like(anno, 255)], -1)
        Image.fromarray(rgba, "RGBA").save(root / "anno" / f"{k:04d}.png")
    ckpt = tmp_path / "oxford.pt"
    torch.manual_seed(0)
    torch.save(deeplabv2_resnet101(9).state_dict(), ckpt)
    out = tmp_path / "eval"
    argv = [str(ckpt), "--preset", "cityscapes_oxford", "--target-root", str(root)]
    argv += ["--input-size", "48", "64", "--device", "cpu", "--out", str(out), "--max-saved", "1"]
    assert evaluate.main(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["classes"] == list(range(9)) and 0.0 <= scores["miou"] <= 1.0
    assert len(list((out / "predictions").glob("*.png"))) == 1
