"""Pieces every benchmark shares: a one-line description of the machine, and replacing one
``## `` section of a Markdown page (docs/performance.md) while keeping the rest."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Sequence


def machine_info() -> str:
    """CPU, cores, load, torch (threads), transformers, Python and OS, for a benchmark's header."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    return (f"{cpu}, {cores} cores available{load}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def write_section(path: Path, heading: str, body: str | Sequence[str]) -> None:
    """Replace (or append) the section under ``heading`` in ``path``, re-reading the file right
    before writing (several benchmarks share one page), atomically."""
    from mmkit.io import atomic_write

    lines = body.strip("\n").splitlines() if isinstance(body, str) else list(body)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Performance\n"
    doc = text.splitlines()
    section = [heading, "", *lines]
    while section[-1] == "":
        section.pop()
    if heading in doc:
        start = doc.index(heading)
        end = next((i for i in range(start + 1, len(doc)) if doc[i].startswith("## ")), len(doc))
        doc[start:end] = section + ([""] if end < len(doc) else [])
    else:
        doc += ["", *section] if doc and doc[-1] else section
    with atomic_write(path) as fh:
        fh.write("\n".join(doc).rstrip("\n") + "\n")
