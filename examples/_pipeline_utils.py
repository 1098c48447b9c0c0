"""Helpers of the example scripts: configuration, run folder, progress, resumable loops, DDP.

Not part of the library: these are the conveniences an example needs, kept out of the pipeline
script so that it reads as the composition of the library's primitives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from uda_selftrain.atomic import atomic_save_json, atomic_torch_save
from uda_selftrain.distributed import is_main_process, rank, world_size

try:  # tqdm is in the examples extra; fall back to periodic prints without it
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# ---------------------------------------------------------------------------------------------
# Run folder and configuration
# ---------------------------------------------------------------------------------------------

#: Keys that may differ between runs sharing a folder (they do not change results).
RUNTIME_KEYS = {"device", "workers", "run_dir", "quiet", "data_dir", "eval_only", "amp_dtype"}


def check_run_config(
    run_dir: Path, config: dict[str, Any], defaults: dict[str, Any] | None = None
) -> None:
    """Write ``config.json`` in a new run folder; refuse a different configuration in an old one.

    An option added after a run folder was made is no difference when this command leaves it at
    its default (``defaults``): such runs resume.
    """
    path = run_dir / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for k, v in (defaults or {}).items():
            old.setdefault(k, v)
        diff = {
            k: (old.get(k), config.get(k))
            for k in sorted(set(old) | set(config))
            if k not in RUNTIME_KEYS and old.get(k) != config.get(k)
        }
        if diff:
            lines = "\n".join(
                f"  {k}: run folder has {a!r}, this command has {b!r}" for k, (a, b) in diff.items()
            )
            raise SystemExit(
                f"{run_dir} was started with another configuration:\n{lines}\n"
                "Rerun with the same options to resume, or choose another --run-dir."
            )
    elif is_main_process():
        atomic_save_json(path, config)


class MetricsLog:
    """JSON-lines log: one object per event, appended and flushed (rank 0 only).

    A run killed while writing can leave a torn last line; opening the log again (on resume)
    drops it, so every line of the file stays a whole JSON object. ``resumed`` tells whether the
    log already held records.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.resumed = path.is_file() and path.stat().st_size > 0
        if self.resumed and is_main_process():
            with open(path, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # only a torn log is read in full
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)

    def __call__(self, **record: Any) -> None:
        if not is_main_process():
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def progress(
    iterable: Any = None, *, total: int, initial: int = 0, desc: str, quiet: bool = False
) -> Any:
    """A progress bar with rate and ETA (tqdm when installed; periodic lines otherwise)."""
    if quiet or not is_main_process():
        return _Silent(iterable, total, initial)
    if tqdm is not None:
        return tqdm(
            iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr
        )
    return _PrintBar(iterable, total, initial, desc)


class _Silent:
    def __init__(self, iterable: Any, total: int, initial: int) -> None:
        self.iterable, self.total, self.n = iterable, total, initial

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _PrintBar(_Silent):
    def __init__(self, iterable: Any, total: int, initial: int, desc: str) -> None:
        super().__init__(iterable, total, initial)
        self.desc, self.start, self.first = desc, time.perf_counter(), initial
        self.postfix = ""
        self.every = max(1, total // 20)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            done = self.n - self.first
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(
                f"{self.desc}: {self.n}/{self.total} {rate:.2f} it/s ETA {eta:.0f}s {self.postfix}",
                file=sys.stderr,
            )

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kwargs.items())


# ---------------------------------------------------------------------------------------------
# RNG state and resumable training state
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may use the global state
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, **objects: Any) -> None:
    """Checkpoint everything a resumed loop needs (rank 0 writes, atomically)."""
    if not is_main_process():
        return
    state = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in objects.items()}
    state["rng"] = rng_state()
    atomic_torch_save(path, state)


def load_training_state(path: Path, device: torch.device, **objects: Any) -> dict[str, Any] | None:
    """Restore the objects saved by :func:`save_training_state`; returns the raw state (or None)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=False)
    for k, obj in objects.items():
        if hasattr(obj, "load_state_dict") and k in state:
            obj.load_state_dict(state[k])
    set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable batch order
# ---------------------------------------------------------------------------------------------


class IterationBatches(torch.utils.data.Sampler[list[int]]):
    """Index batches for iterations ``start..total-1`` of a run, the same on every resume.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; iteration ``i`` takes the *global* batch
    at position ``i · batch``, and under DDP each rank takes its ``batch / world_size`` slice, so the
    samples seen per step do not depend on the number of processes.
    """

    def __init__(
        self, length: int, batch_size: int, total: int, start: int = 0, seed: int = 0
    ) -> None:
        w = world_size()
        if batch_size % w:
            raise SystemExit(f"--batch-size {batch_size} must be divisible by the {w} processes")
        self.length, self.batch, self.total, self.start, self.seed = (
            length,
            batch_size,
            total,
            start,
            seed,
        )
        self.local = batch_size // w

    def __len__(self) -> int:
        return self.total - self.start

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        r = rank()
        cache: dict[int, list[int]] = {}
        for it in range(self.start, self.total):
            out = []
            for k in range(self.batch):
                epoch, j = divmod(it * self.batch + k, self.length)
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._perm(epoch)
                out.append(cache[epoch][j])
            yield out[r * self.local : (r + 1) * self.local]


def epoch_of(iteration: int, batch: int, length: int) -> int:
    return iteration * batch // max(length, 1)


# ---------------------------------------------------------------------------------------------
# Distributed setup
# ---------------------------------------------------------------------------------------------


def init_distributed(device: str) -> torch.device:
    """Initialise the process group under ``torchrun`` (``WORLD_SIZE`` > 1); return the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device.startswith("cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    return torch.device(device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def config_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
