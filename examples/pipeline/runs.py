"""The run folder: its configuration check, cached results, the metrics log, resumable state."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uda_selftrain.atomic import atomic_save_json, atomic_save_text, atomic_torch_save
from uda_selftrain.distributed import barrier, is_main_process

from . import RunError

#: Keys that may differ between runs sharing a folder (they do not change results).
RUNTIME_KEYS = {
    "device",
    "workers",
    "run_dir",
    "quiet",
    "data_dir",
    "eval_only",
    "amp_dtype",
    "checkpoint_every",
    # Selection reads finished rounds and changes no training: a rerun may choose differently.
    "select",
    "select_images",
    "patience",
}


def check_run_config(
    run_dir: Path, config: dict[str, Any], defaults: dict[str, Any] | None = None
) -> None:
    """Write ``config.json`` in a new run folder; refuse a different configuration in an old one.

    An option added after a run folder was made is no difference when this command leaves it at
    its default (``defaults``): such runs resume.
    """
    path = run_dir / "config.json"
    # Temporary files of atomic writes interrupted by a kill (".<name>.<random>.tmp"). Only rank 0
    # deletes them, and every rank waits for it: a rank still sweeping while rank 0 writes
    # config.json would delete rank 0's temporary file under it (a flaky DDP test did just that).
    if is_main_process():
        for orphan in run_dir.rglob(".*.tmp"):
            orphan.unlink(missing_ok=True)
    barrier()
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as err:
            raise RunError(
                f"{path} is damaged ({err}); restore it or choose another --run-dir"
            ) from None
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
            raise RunError(
                f"{run_dir} was started with another configuration:\n{lines}\n"
                "Rerun with the same options to resume, or choose another --run-dir."
            )
    elif is_main_process():
        atomic_save_json(path, config)


def cached_result(path: Path, settings: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """The result stored at ``path`` if it was made with ``settings``; else ``compute()``, stored.

    One file per unit of work (a seed, a variant and seed) lets a rerun of the same command skip
    the units already done; a file made with other settings is refused rather than silently
    mixed into the new results.
    """
    if path.is_file():
        try:
            done = json.loads(path.read_text())
        except ValueError as err:
            raise RunError(f"{path} is damaged ({err}); delete it to recompute") from None
        # A file of an older layout (no "result" key) is refused too, not read half-way.
        if not isinstance(done, dict) or done.get("settings") != settings or "result" not in done:
            raise RunError(
                f"{path} was made with other settings (or an older version); use another --out"
            )
        return done["result"]
    result = compute()
    atomic_save_json(path, {"settings": settings, "result": result})
    return result


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

    def forget_after(self, stage: str, iteration: int) -> None:
        """Drop the records of ``stage`` past ``iteration``: a resumed stage logs them again."""
        if not is_main_process() or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            r = json.loads(line)
            if not (r.get("stage") == stage and r.get("iteration", 0) > iteration):
                kept.append(line)
        atomic_save_text(self.path, "".join(line + "\n" for line in kept))

    def __call__(self, **record: Any) -> None:
        if not is_main_process():
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


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
    """Restore the objects saved by :func:`save_training_state`; returns the raw state (or None).

    The global RNG is *not* restored here: call :func:`set_rng_state` with ``state["rng"]`` once
    the loop has made everything that draws from it at start-up (data-loader iterators), so that
    a resumed loop continues the uninterrupted run's random stream exactly.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # torn or damaged: say which file, and what to do
        raise RunError(
            f"{path} is damaged ({type(err).__name__}: {err}); delete it to restart this stage "
            "from its beginning"
        ) from None
    for k, obj in objects.items():
        if hasattr(obj, "load_state_dict") and k in state:
            obj.load_state_dict(state[k])
    return state


def load_weights(path: Path, device: torch.device) -> dict[str, Any]:
    """A finished stage's weights; a damaged file is an error that says what to delete."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise RunError(
            f"{path} is damaged ({type(err).__name__}: {err}); delete it (and {path.parent}/rng.pt) "
            "to train that stage again"
        ) from None


def finish_stage(stage_dir: Path) -> None:
    """Record the global RNG state at the end of a training stage (before its final files)."""
    if is_main_process():
        atomic_torch_save(stage_dir / "rng.pt", rng_state())


def resume_finished_stage(stage_dir: Path) -> None:
    """Skipping a finished stage: continue from the RNG state it ended with, as if it had run."""
    if is_main_process():
        print(f"{stage_dir}: finished earlier, reusing it", file=sys.stderr)
    path = stage_dir / "rng.pt"
    if path.is_file():
        set_rng_state(torch.load(path, weights_only=False))
