"""`prune-data record` under 2 CPU processes (torchrun + gloo), as `accelerate launch` runs it on GPUs."""

from __future__ import annotations

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
                           "prune-data", "record", "digits", "--epochs", "2", "--record-mode", mode,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
