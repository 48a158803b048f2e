"""Dataset pruning by dynamic uncertainty, with the usual baselines (specs/prune.md).

The public Python API (``from mmkit.prune import DynamicsRecorder, IndexedDataset``) is loaded
lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DynamicsRecorder": "mmkit.prune.dynamics", "open_dynamics": "mmkit.prune.dynamics",
    "ArrayDynamics": "mmkit.prune.dynamics", "IndexedDataset": "mmkit.prune.data",
    "load_image_set": "mmkit.prune.data", "OnlineDynUnc": "mmkit.prune.scores",
    "compute_scores": "mmkit.prune.scores", "ScoreParams": "mmkit.prune.scores", "select": "mmkit.prune.select",
    "n_keep_for": "mmkit.prune.select",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmkit.prune' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
