"""Tests for mmkit/unlearn/pipeline.py: the training run and its outputs (unlearn.md §4, §5.0, §8 items 4, 7)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from mmkit.core.backends import apply_connector
from mmkit.core.models import load_model
from mmkit.errors import MmkitError
from mmkit.unlearn.efuf import EfufConfig, _train_defaults
from mmkit.unlearn.pipeline import run, score_quantiles, split_val
from mmkit.unlearn.samples import Sample

CONNECTOR = "model.multi_modal_projector."


def _config(model: str, samples: str, **kw) -> EfufConfig:
    train = dataclasses.replace(_train_defaults(), max_steps=3, epochs=2, lr=1e-2)
    cfg = EfufConfig(model=model, samples=samples, device="cpu", safeguards=False, val_frac=0.0, save_full=True,
                     train=train, **kw)
    cfg.validate()
    return cfg


@pytest.fixture()
def trained(tiny_llava, samples_file, tmp_path):
    results = run(_config(tiny_llava, samples_file), str(tmp_path / "run"))
    return results, tmp_path / "run"


def test_only_the_connector_changes(tiny_llava, trained):
    from transformers import LlavaForConditionalGeneration

    results, out = trained
    assert results["metrics"]["steps"] == 3
    base = dict(LlavaForConditionalGeneration.from_pretrained(tiny_llava).named_parameters())
    after = LlavaForConditionalGeneration.from_pretrained(out / "model")
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, base[n])}
    assert changed == {n for n in base if n.startswith(CONNECTOR)}


def test_connector_file_round_trip_and_errors(tiny_llava, trained):
    results, out = trained
    tensors = load_file(str(out / "connector.safetensors"))
    assert sorted(tensors) == sorted(n for n in json.loads((out / "connector.json").read_text())["param_names"])
    assert all(k.startswith(CONNECTOR) for k in tensors) and len(tensors) == 4
    meta = json.loads((out / "connector.json").read_text())
    assert meta["base_model"] == tiny_llava and meta["variant"] == "paper"
    assert meta["shapes"]["model.multi_modal_projector.linear_1.weight"] == [32, 32]
    base = load_model(tiny_llava, "mllm", device="cpu").model
    full = load_model(str(out / "model"), "mllm", device="cpu").model
    apply_connector(base, str(out / "connector.safetensors"))
    ids = torch.tensor([[2, 144, 28, 302]])
    pixels = torch.randn(1, 3, 32, 32)
    ids_img = torch.cat([ids[:, :1], torch.full((1, 16), base.config.image_token_id), ids[:, 1:]], 1)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids_img, pixel_values=pixels).logits,
                           full(input_ids=ids_img, pixel_values=pixels).logits)
    bad = out / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"model.multi_modal_projector.linear_1.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(MmkitError, match="linear_1.weight"):
        apply_connector(base, str(bad))
    save_file({"model.nope.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(MmkitError, match="model.nope.weight"):
        apply_connector(base, str(bad))


def test_results_have_a_loss_history_entry_per_step(trained):
    results, out = trained
    hist = results["loss_history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert all(h["l_pos"] is not None and h["l_neg"] < 0 and h["l_sent"] is not None and h["l_rep"] is None
               and h["w_neg"] == pytest.approx(0.3) for h in hist)
    m = results["metrics"]
    assert m["n_samples"] == {"pos": 1, "neg": 2, "sent": 1, "replay": 0}
    assert m["trainable_params"] == 32 * 32 * 2 + 64 and m["skipped_steps"] == 0
    assert json.loads((out / "results.json").read_text())["loss_history"] == hist


def test_code_variant_needs_scores(tiny_llava, samples_file, tmp_path):
    lines = open(samples_file).read().splitlines()
    rec = json.loads(lines[2])
    del rec["score"]
    lines[2] = json.dumps(rec)
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _config(tiny_llava, str(tmp_path / "s.jsonl"), variant="code", images=str(samples_file.rsplit("/", 1)[0]))
    with pytest.raises(MmkitError, match=r"s\.jsonl:3: score"):
        run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_split_val_is_seeded_per_kind():
    samples = [Sample(id=str(i), image="x", target="t", kind="neg" if i < 40 else "pos") for i in range(60)]
    train, val = split_val(samples, 0.05, seed=1)
    assert len(val["neg"]) == 2 and len(val["pos"]) == 1 and len(train["neg"]) == 38
    assert split_val(samples, 0.05, seed=1)[1] == val
    assert {s.id for s in val["neg"]} != {s.id for s in split_val(samples, 0.05, seed=2)[1]["neg"]}


def test_score_quantiles():
    q = score_quantiles([10.0, 20.0, 30.0, None])
    assert q["n"] == 3 and q["q50"] == 20.0 and q["q25"] == 15.0
    assert score_quantiles([])["q50"] is None
