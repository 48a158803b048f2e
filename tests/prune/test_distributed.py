"""`prune-data` (record, then score and select on rank 0) under 2 CPU processes (torchrun + gloo), as `accelerate launch` runs it on GPUs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from mmkit.prune.dynamics import open_dynamics


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval-pass", "train-forward"])
def test_two_processes_record_every_example_each_epoch(tmp_path, mode):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmkit", "-q",
                           "prune-data", "digits", "--epochs", "2", "--window", "2", "--record-mode", mode,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines()
                                           if "Error" in line or "error" in line or "[rank1]" in line)[-6000:]
    n = 1437
    for epoch in (0, 1):
        parts = [load_file(str(out / "dynamics" / f"epoch_{epoch:05d}.rank{r:03d}.safetensors"))["index"]
                 for r in (0, 1)]
        assert sorted(set(parts[0]) | set(parts[1])) == list(range(n))
        if mode == "eval-pass":  # the eval pass splits the examples rank::2: each exactly once
            assert not set(parts[0]) & set(parts[1])
            assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    source = open_dynamics(out / "dynamics")
    p = source.read("p_true", 0, n)
    assert p.shape == (2, n) and not np.isnan(p).any()
    # rank 0 scored every example from the merged shards and kept round(0.75 N)
    kept = (out / "kept_indices.txt").read_text().split()
    assert len(kept) == 1078 and len(np.load(out / "scores.npy")) == n
    assert json.loads((out / "results.json").read_text())["metrics"]["n_keep"] == 1078
