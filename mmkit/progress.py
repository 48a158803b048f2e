"""Progress and console output on stderr: rich bars on a terminal, plain periodic lines otherwise.

Batch-job logs get one line every ``every_s`` seconds (and at the end) instead of bars.
``set_quiet(True)`` (``-q/--quiet``) turns both off.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("mmkit")
_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence progress output (``-q``)."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def setup_logging(verbose: bool = False) -> None:
    """mmkit's log lines go to stderr (rich on a terminal); warnings only under ``-q``."""
    logger = logging.getLogger("mmkit")
    if any(getattr(h, "_mmkit_console", False) for h in logger.handlers):
        return
    if stderr_is_tty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler._mmkit_console = True  # type: ignore[attr-defined]
    # -q quiets the console only; log.txt (a file handler on the same logger) keeps INFO lines.
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING if _QUIET else logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners and pipelines swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class Progress:
    """A progress reporter: ``update(n, **fields)``; rich bar on a TTY, else periodic log lines."""

    def __init__(self, total: int | None, description: str, every_s: float = 30.0, enabled: bool = True) -> None:
        self.total, self.description, self.every_s = total, description, every_s
        self.enabled = enabled and not _QUIET
        self.done = 0
        self.fields: dict[str, object] = {}
        self._start = self._last = time.monotonic()
        self._bar = None
        if self.enabled and stderr_is_tty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True),
                                     transient=False)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, info="")

    def update(self, n: int = 1, **fields: object) -> None:
        self.done += n
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=self._info())
        elif self.enabled and time.monotonic() - self._last >= self.every_s:
            self._line()

    def _info(self) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())

    def _line(self) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        eta = f" eta {((self.total - self.done) / rate):.0f}s" if self.total and rate > 0 else ""
        log.info("%s %d%s (%.1f/s%s) %s", self.description, self.done, of, rate, eta, self._info())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.enabled and self.done:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
