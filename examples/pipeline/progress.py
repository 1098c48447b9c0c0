"""Progress that suits a terminal (tqdm) or a redirected log (a line every 5 %)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

from uda_selftrain.distributed import is_main_process

try:  # tqdm is in the examples extra; fall back to periodic prints without it
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def progress(
    iterable: Any = None, *, total: int, initial: int = 0, desc: str, quiet: bool = False
) -> Any:
    """A progress bar with rate and ETA.

    On a terminal: tqdm (when installed). Otherwise — output redirected to a file, the usual way on
    a cluster — one line every 5 % or 60 s, whichever comes later, and at the end, instead of a
    line per iteration.
    """
    if quiet or not is_main_process():
        return _Silent(iterable, total, initial)
    if tqdm is not None and sys.stderr.isatty():
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
    def __init__(
        self, iterable: Any, total: int, initial: int, desc: str, *, min_interval: float = 60.0
    ) -> None:
        super().__init__(iterable, total, initial)
        self.desc, self.start, self.first = desc, time.perf_counter(), initial
        self.postfix = ""
        self.min_interval = min_interval
        self.last_time, self.last_n = self.start, initial

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        step = max(1, self.total // 20)
        due = self.n - self.last_n >= step and now - self.last_time >= self.min_interval
        if due or self.n == self.total:
            self.last_time, self.last_n = now, self.n
            done = self.n - self.first
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(
                f"{self.desc}: {self.n}/{self.total} {rate:.2f} it/s ETA {eta:.0f}s {self.postfix}",
                file=sys.stderr,
                flush=True,
            )

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kwargs.items())
