"""The example scripts the quickstart runs (examples/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_retrieval_embeddings_file_has_the_evaluate_format(tmp_path):
    out = tmp_path / "emb.safetensors"
    subprocess.run([sys.executable, str(EXAMPLES / "retrieval_embeddings.py"), str(out), "--images", "8",
                    "--captions-per-image", "3", "--dim", "16"], check=True, capture_output=True)
    t = load_file(str(out))
    assert t["image_embeds"].shape == (8, 16) and t["text_embeds"].shape == (24, 16)
    assert t["text_to_image"].dtype == np.int64 and t["text_to_image"].tolist() == [i // 3 for i in range(24)]
    np.testing.assert_allclose(np.linalg.norm(t["image_embeds"], axis=1), 1.0, rtol=1e-6)
    # the same seed gives the same file
    again = tmp_path / "again.safetensors"
    subprocess.run([sys.executable, str(EXAMPLES / "retrieval_embeddings.py"), str(again), "--images", "8",
                    "--captions-per-image", "3", "--dim", "16"], check=True, capture_output=True)
    assert all(np.array_equal(t[k], load_file(str(again))[k]) for k in t)
