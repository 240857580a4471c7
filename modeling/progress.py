"""Progress of a loop over items (prompts generated, examples scored, texts read), in a form people can plan
by: a bar with the rate and the time left on a terminal (tqdm), else a log line with the same figures every
`every` seconds and at the end (CI, SLURM logs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class Progress:
    """Counts finished items out of `total`; `with Progress(total, "completions") as progress:
    progress.advance()`."""

    def __init__(self, total: int, what: str, every: float = 30.0, terminal: bool | None = None) -> None:
        self.total, self.what, self.every = total, what, every
        self.done, self.start = 0, time.monotonic()
        self.logged_at = self.start
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, desc=what, unit="it", dynamic_ncols=True) if terminal else None

    def advance(self, count: int = 1) -> None:
        """`count` more items finished."""
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.logged_at >= self.every or self.done >= self.total:
            self.logged_at = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """`<what> <done> / <total> (<rate>/s, <elapsed> elapsed, <left> left)`."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        remaining = _duration(left) if rate > 0 else "?"
        return (
            f"{self.what} {self.done} / {self.total} ({rate:.2f}/s, {_duration(elapsed)} elapsed, "
            f"{remaining} left)"
        )

    def close(self) -> None:
        """End the bar (a terminal) or log the final count if the last line did not."""
        if self.bar is not None:
            self.bar.close()
        elif self.logged_at == self.start and self.done:
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def counted(items: Sequence[T], what: str) -> Iterator[T]:
    """`items`, one at a time, with the progress of the loop over them shown (`Progress`)."""
    with Progress(len(items), what) as progress:
        for item in items:
            yield item
            progress.advance()
