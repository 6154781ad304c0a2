"""Progress of a long stage that a user can follow on a terminal and in a log.

On an interactive terminal a rich bar; anywhere else (CI logs, `nohup`, `make demo > log`)
a plain line on stderr at a steady interval, a first line when the stage starts and a
last one when it ends:

    generate: 12/40 (30%) 0.41/s ETA 01:08
    generate: done 40/40 (100%) in 01:37

The interval is 30 s; the environment variable DATAGEN_PROGRESS_INTERVAL (seconds)
changes it, and 0 prints a line on every advance (what tests use). Depends only on the
standard library and rich.

    from datagen.progress import progress

    with progress("generate", total=40, done=resumed) as bar:
        bar.advance(3)
    with progress("sft", total=steps, fields=("loss", "tok/s")) as bar:
        bar.advance(1, loss="0.4123", **{"tok/s": "512"})
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

INTERVAL_ENV = "DATAGEN_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def interval_seconds() -> float:
    """Seconds between plain progress lines: DATAGEN_PROGRESS_INTERVAL, else 30 (also when
    the variable is not a number, so a typo never stops a long run)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def clock(seconds: float) -> str:
    """mm:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class PlainProgress:
    """Counts work and writes `label: done/total (pct) rate/s ETA mm:ss` lines to `stream`."""

    def __init__(self, label: str, total: int | None, done: int, fields: Sequence[str],
                 stream: TextIO, interval: float, now=time.monotonic, detail: Callable[[], str] | None = None):
        self.label, self.total, self.done, self.detail = label, total, done, detail
        self.fields = {name: "-" for name in fields}
        self.stream, self.interval, self.now = stream, interval, now
        self.started, self.done_at_start = now(), done
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def advance(self, amount: int = 1, **fields: str) -> None:
        self.done += amount
        self.fields.update(fields)
        if self.interval == 0:
            self._write(self.line())

    def line(self) -> str:
        elapsed = self.now() - self.started
        rate = (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: {self.done}/{self.total}" if self.total else f"{self.label}: {self.done}"]
        if self.total:
            parts.append(f"({min(self.done, self.total) / self.total:.0%})")
        parts.append(f"{rate:.2f}/s" if rate < 10 else f"{rate:.0f}/s")
        if self.total:
            remaining = max(0, self.total - self.done)
            parts.append("ETA " + (clock(remaining / rate) if rate > 0 else "?") if remaining else "ETA 00:00")
        parts += [f"{name} {value}" for name, value in self.fields.items()]
        if self.detail is not None:  # what moves between advances (a batch can take minutes)
            parts.append(f"({self.detail()})")
        return " ".join(parts)

    def final_line(self) -> str:
        counted = str(self.done)
        if self.total:
            counted += f"/{self.total} ({min(self.done, self.total) / self.total:.0%})"
        extra = "".join(f" {name} {value}" for name, value in self.fields.items())
        return f"{self.label}: done {counted} in {clock(self.now() - self.started)}{extra}"

    def start(self) -> None:
        self._write(self.line())
        if self.interval > 0:
            self._ticker = threading.Thread(target=self._tick, name=f"progress-{self.label}", daemon=True)
            self._ticker.start()

    def stop(self, finished: bool) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        # A stage that failed says how far it got, not "done".
        self._write(self.final_line() if finished else self.line() + " (stopped)")

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._write(self.line())

    def _write(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)


class RichProgress:
    """The same calls drawn as a rich bar (with elapsed time and ETA) on the terminal."""

    def __init__(self, label: str, total: int | None, done: int, fields: Sequence[str], console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
        columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        self.bar = Progress(*columns, console=console, transient=False)
        self.task = self.bar.add_task(label, total=total, completed=done, **{name: "-" for name in fields})

    def advance(self, amount: int = 1, **fields: str) -> None:
        self.bar.update(self.task, advance=amount, **fields)


class _Silent:
    def advance(self, amount: int = 1, **fields: str) -> None:
        pass


@contextmanager
def progress(label: str, total: int | None, done: int = 0, fields: Sequence[str] = (),
             enabled: bool = True, stream: TextIO | None = None,
             detail: Callable[[], str] | None = None) -> Iterator[PlainProgress | RichProgress | _Silent]:
    """Show progress of `total` units (`done` of them finished before, e.g. on resume).

    A rich bar when stderr is an interactive terminal, plain lines otherwise; nothing at
    all when `enabled` is false. `fields` name extra values passed to `advance`; `detail`
    is called for every plain line (e.g. the teacher's request count between two tasks).
    """
    if not enabled:
        yield _Silent()
        return
    from rich.console import Console

    stream = stream or sys.stderr
    console = Console(file=stream)
    # isatty as well: FORCE_COLOR (common in CI) makes rich treat a log file as a terminal.
    if getattr(stream, "isatty", lambda: False)() and console.is_interactive:
        shown = RichProgress(label, total, done, fields, console)
        with shown.bar:
            yield shown
        return
    plain = PlainProgress(label, total, done, fields, stream, interval_seconds(), detail=detail)
    plain.start()
    finished = False
    try:
        yield plain
        finished = True
    finally:
        plain.stop(finished)
