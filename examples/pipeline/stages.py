"""A training stage's run management (resume, progress, logs, checkpoints, cost) and its evaluation."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uda_selftrain.atomic import atomic_save_json, atomic_torch_save
from uda_selftrain.distributed import barrier, is_main_process

from .config import Config
from .progress import progress
from .report import evaluate
from .runs import MetricsLog, finish_stage, load_training_state, save_training_state, set_rng_state


class StageCost:
    """Logs a stage's wall time (per iteration too), peak RSS and peak GPU memory when it ends."""

    def __init__(
        self, log: MetricsLog, name: str, device: torch.device, *, iterations: int = 0
    ) -> None:
        self.log, self.name, self.device, self.iterations = log, name, device, iterations

    def __enter__(self) -> StageCost:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        record: dict[str, Any] = {"seconds": round(seconds, 3), "peak_rss_mib": peak_rss_mib()}
        if self.iterations:
            record["seconds_per_iteration"] = round(seconds / self.iterations, 4)
        if self.device.type == "cuda":
            record["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        self.log(stage=self.name, event="cost", **record)


def peak_rss_mib() -> int:
    """This process's peak resident memory so far (MiB; Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10))


class StageRun:
    """Run management of one training stage, so that the stage's code is only its algorithm.

    Resumes from ``stage_dir/ckpt.pt`` (the ``objects``' state dicts, ``generator`` and the
    ``tensors``, copied back in place), shows progress, logs scalars every 20 iterations, writes a
    checkpoint every ``cfg.checkpoint_every`` and, at :meth:`finish`, the stage's final files.

    Usage::

        run = StageRun(stage_dir, "warmup", total, cfg, log, device, gen, model=model, ...)
        batches = iter(...)          # data iterators first: making them draws from the global RNG
        for it in run.iterations():  # restores the RNG of a resumed run, then counts
            ...
            run.step_done(it, loss=loss)
        run.finish({"model.pt": model.state_dict()})
    """

    def __init__(
        self,
        stage_dir: Path,
        name: str,
        total: int,
        cfg: Any,
        log: MetricsLog,
        device: torch.device,
        generator: torch.Generator,
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        **objects: Any,
    ) -> None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.stage_dir, self.name, self.total, self.cfg, self.log = stage_dir, name, total, cfg, log
        self.generator, self.objects, self.tensors = generator, objects, tensors or {}
        self.ckpt = stage_dir / "ckpt.pt"
        self.device = device
        self.state = load_training_state(self.ckpt, device, **objects)
        self.start = self.state["iteration"] if self.state else 0
        if self.state:
            generator.set_state(self.state["generator"])
            for key, t in self.tensors.items():
                t.copy_(self.state[key])

    def iterations(self) -> Iterator[int]:
        if self.state:
            set_rng_state(self.state["rng"])
            self.log.forget_after(self.name, self.start)
            if is_main_process():
                print(
                    f"{self.name}: resuming at iteration {self.start} of {self.total} "
                    f"from {self.ckpt}",
                    file=sys.stderr,
                )
        self.bar = progress(
            total=self.total, initial=self.start, desc=self.name, quiet=self.cfg.quiet
        )
        with StageCost(self.log, self.name, self.device, iterations=self.total - self.start):
            yield from range(self.start, self.total)
        self.bar.close()

    def step_done(self, it: int, lr: float, **scalars: torch.Tensor) -> None:
        """After iteration ``it``: progress, the metrics log (every 20), a checkpoint (every N)."""
        self.bar.update()
        if (it + 1) % 20 == 0 or it + 1 == self.total:
            values = {k: float(v.detach()) for k, v in scalars.items()}
            self.bar.set_postfix(**{k: f"{v:.3f}" for k, v in values.items()})
            self.log(stage=self.name, iteration=it + 1, **values, lr=lr)
        if (it + 1) % self.cfg.checkpoint_every == 0 and it + 1 < self.total:
            save_training_state(
                self.ckpt,
                iteration=it + 1,
                generator=self.generator.get_state(),
                **self.tensors,
                **self.objects,
            )

    def finish(self, files: dict[str, Any]) -> None:
        """Write the stage's final files (state dicts or JSON-able values) and drop the checkpoint."""
        finish_stage(self.stage_dir)
        if is_main_process():
            for name, obj in files.items():
                if name.endswith(".json"):
                    atomic_save_json(self.stage_dir / name, obj)
                else:
                    atomic_torch_save(self.stage_dir / name, obj)
            self.ckpt.unlink(missing_ok=True)
        barrier()


def stage_eval(
    cfg: Config,
    run_dir: Path,
    name: str,
    model: nn.Module,
    val: Any,
    device: torch.device,
    log: MetricsLog,
) -> dict[str, Any]:
    path = run_dir / name / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    with StageCost(log, f"{name}/eval", device, iterations=len(val)):
        scores = evaluate(
            model,
            val,
            cfg,
            device,
            desc=f"eval {name}",
            save_predictions=run_dir / name / "predictions",
        )
    if is_main_process():
        atomic_save_json(path, scores)
        log(stage=name, event="eval", miou=scores["miou"])
    barrier()
    return scores
