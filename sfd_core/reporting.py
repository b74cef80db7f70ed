"""Progress, logs and metrics of stage programs.

Stages call ``log``, ``metric`` and ``progress``; by default these print parseable lines to stdout. A launcher
(the Dagster layer) may install its own ``Reporter`` with ``set_reporter`` to forward them elsewhere.
Only rank 0 reports; other ranks stay quiet.
"""
from __future__ import annotations

import json
import os
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Reporter:
    """Prints to stdout; subclass to forward elsewhere."""

    def log(self, message: str) -> None:
        print(message, flush=True)

    def metric(self, step: int, values: dict[str, float]) -> None:
        # One JSON object per line, prefixed so logs stay greppable.
        print("SFD_METRIC " + json.dumps({"step": step, **values}, sort_keys=True), flush=True)


_reporter: Reporter = Reporter()


def set_reporter(reporter: Reporter) -> None:
    global _reporter
    _reporter = reporter


def get_reporter() -> Reporter:
    return _reporter


def log(message: str) -> None:
    if is_rank_zero():
        _reporter.log(message)


def metric(step: int, **values: float) -> None:
    if is_rank_zero():
        _reporter.metric(step, {k: float(v) for k, v in values.items()})


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts work units and logs rate and ETA at most every ``every_s`` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every_s: float = 10.0, start: int = 0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.count = start
        self._start_count = start
        self._t0 = self._last = time.monotonic()

    @property
    def rate(self) -> float:
        dt = time.monotonic() - self._t0
        return (self.count - self._start_count) / dt if dt > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.total is not None and self.count >= self.total):
            self._last = now
            log(self.line())

    def line(self) -> str:
        rate = self.rate
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            eta_s = _fmt_seconds(eta) if eta != float("inf") else "?"
            return (f"{self.desc}: {self.count}/{self.total} {self.unit} "
                    f"({100.0 * self.count / self.total:.1f}%) {rate:.1f} {self.unit}/s ETA {eta_s}")
        return f"{self.desc}: {self.count} {self.unit} {rate:.1f} {self.unit}/s"


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "it", every_s: float = 10.0) -> Iterator[T]:
    p = Progress(total, desc, unit, every_s)
    for item in items:
        yield item
        p.update(1)
