"""core/train.py under 2 CPU processes (torchrun + gloo), as `accelerate launch` runs it on GPUs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("dist_train_script.py")


@pytest.mark.slow
def test_two_processes_split_each_epoch_and_agree(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(SCRIPT),
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    # 16 examples, batch 4 per process: 2 batches per rank per epoch, disjoint, covering all.
    for epoch in (0, 1):
        parts = [sum((ix for e, ix in r["seen"] if e == epoch), []) for r in ranks]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == list(range(16))
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert ranks[0]["w"] == ranks[1]["w"]  # DDP keeps replicas identical
    state = tmp_path / "run" / "checkpoints" / "step-00000004" / "state"
    assert (state / "random_states_0.pkl").exists() and (state / "random_states_1.pkl").exists()
