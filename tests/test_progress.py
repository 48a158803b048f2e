"""Tests of mmkit/progress.py: plain lines when stderr is not a terminal, -q, handler streams."""

from __future__ import annotations

import io
import logging

from mmkit import progress as P


def test_plain_lines_follow_the_current_stderr(monkeypatch):
    logger = logging.getLogger("mmkit")
    saved = list(logger.handlers)
    for h in saved:
        logger.removeHandler(h)
    try:
        first = io.StringIO()
        monkeypatch.setattr("sys.stderr", first)
        P.setup_logging()
        second = io.StringIO()
        monkeypatch.setattr("sys.stderr", second)  # e.g. a test runner swapping streams
        with P.Progress(3, "work", every_s=0.0) as bar:
            bar.update(3, loss=0.5)
        assert "work 3/3" in second.getvalue() and "loss=0.5" in second.getvalue()
        assert first.getvalue() == ""
        assert "━" not in second.getvalue()  # never a bar when stderr is not a TTY
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
        for h in saved:
            logger.addHandler(h)


def test_quiet_silences_progress(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    P.set_quiet(True)
    try:
        bar = P.Progress(2, "quiet", every_s=0.0)
        bar.update(2)
        bar.close()
        assert not bar.enabled
    finally:
        P.set_quiet(False)
    assert "quiet" not in out.getvalue()
