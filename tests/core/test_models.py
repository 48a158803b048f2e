"""mmkit/core/models.py: every registered model kind loads its tiny fixture, plus the errors."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmkit.core.models import (MINILM_HUB_ID, MODEL_KINDS, SMOLLM2_GGUF, load_model,
                               resolve_dtype, resolve_source)
from mmkit.errors import MmkitError

TEXTS = ["a dog sitting on the table", "two cats and a person near a red car"]


def _images(n: int = 2):
    from PIL import Image

    rng = np.random.RandomState(0)
    # Not square and not 32 px, so resizing/cropping is exercised.
    return [Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------ one forward pass per kind
def _forward_sequence_classifier(model, tok):
    batch = tok(TEXTS, ["is there a dog ?", "yes"], padding=True, return_tensors="pt")
    assert "token_type_ids" in batch and batch["token_type_ids"].max() == 1
    out = model(**batch, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, model.config.num_labels) == (2, 2)
    assert torch.isfinite(out.loss)


def _forward_encoder(model, tok):
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    out = model(**batch)
    assert out.last_hidden_state.shape == (*batch["input_ids"].shape, model.config.hidden_size)


def _forward_causal_lm(model, tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "write a short poem"}],
                                     add_generation_prompt=True, tokenize=False)
    batch = tok([prompt, "a cat"], padding=True, return_tensors="pt")
    assert (batch["input_ids"][:, 0] != tok.bos_token_id).sum() == 1  # left padding, one BOS
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    gen = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert gen.shape == (2, batch["input_ids"].shape[1] + 2)


def _forward_dual_encoder(model, proc):
    batch = proc(text=TEXTS, images=_images(), padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    # CLIP pools text at the EOS token: the tokenizer's EOS must be the config's.
    assert proc.tokenizer.eos_token_id == model.config.text_config.eos_token_id
    assert (batch["input_ids"] == proc.tokenizer.eos_token_id).sum(1).tolist() == [1, 1]
    text = model.get_text_features(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).pooler_output
    image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    assert text.shape == image.shape == (2, model.config.projection_dim) == (2, 16)
    assert model(**batch).logits_per_image.shape == (2, 2)


def _forward_mllm(model, proc):
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "describe the image ."}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert "<image>" in prompt
    batch = proc(text=[prompt, prompt], images=_images(), padding=True, return_tensors="pt")
    image_id = model.config.image_token_id
    assert proc.image_token_id == image_id
    # 32 px / patch 8 = 16 patches; the "default" strategy drops CLS: one token per patch.
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [16, 16]
    assert (batch["input_ids"] == proc.tokenizer.bos_token_id).sum(1).tolist() == [1, 1]
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert model.model.multi_modal_projector.linear_1.in_features == 32


def _forward_itm(model, proc):
    batch = proc(images=_images(), text=TEXTS, padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    if model.config.model_type == "vilt":
        assert model(**batch).logits.shape == (2, 1)
    else:
        score = model(**batch, use_itm_head=True).itm_score
        assert score.shape == (2, 2)


def _forward_image_classifier(model, proc):
    batch = proc(images=_images(3), return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    out = model(**batch, labels=torch.tensor([0, 1, 9]))
    assert out.logits.shape == (3, model.config.num_labels) == (3, 10)
    assert torch.isfinite(out.loss)


# kind -> [(fixture, expected model class, forward check)]. Every registered kind needs a row.
KIND_FIXTURES = {
    "sequence-classifier": [("tiny_bert_classifier", "BertForSequenceClassification",
                             _forward_sequence_classifier)],
    "encoder": [("tiny_bert", "BertModel", _forward_encoder)],
    "causal-lm": [("tiny_causal_lm", "LlamaForCausalLM", _forward_causal_lm)],
    "dual-encoder": [("tiny_clip", "CLIPModel", _forward_dual_encoder)],
    "mllm": [("tiny_llava", "LlavaForConditionalGeneration", _forward_mllm)],
    "itm": [("tiny_vilt", "ViltForImageAndTextRetrieval", _forward_itm),
            ("tiny_blip_itm", "BlipForImageTextRetrieval", _forward_itm)],
    "image-classifier": [("tiny_image_classifier", "ResNetForImageClassification",
                          _forward_image_classifier)],
}
CASES = [pytest.param(kind, fixture, cls, check, id=f"{kind}-{fixture}")
         for kind, rows in KIND_FIXTURES.items() for fixture, cls, check in rows]

# Checkpoints saved in an older key layout than the live module tree (design.md section 6).
_KEY_RENAMES = [
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
]


def _model_key(saved_key: str, state: dict) -> str:
    if saved_key in state:
        return saved_key
    for pattern, repl in _KEY_RENAMES:
        key = re.sub(pattern, repl, saved_key)
        if key in state:
            return key
    raise AssertionError(f"saved tensor {saved_key!r} has no counterpart in the loaded model")


def test_every_registered_kind_has_a_fixture():
    missing = sorted(set(MODEL_KINDS) - set(KIND_FIXTURES))
    assert not missing, f"model kinds without a tiny fixture in KIND_FIXTURES: {missing}"


@pytest.mark.parametrize("kind, fixture, cls_name, check", CASES)
def test_load_each_kind(kind, fixture, cls_name, check, request):
    path = request.getfixturevalue(fixture)
    loaded = load_model(path, kind, device="cpu")

    assert type(loaded.model).__name__ == cls_name
    assert loaded.kind == kind and loaded.id == path and loaded.path == path
    assert loaded.record() == {"id": path, "revision": None}
    assert loaded.preprocessor is not None
    assert not loaded.model.training  # from_pretrained -> eval()
    assert next(loaded.model.parameters()).dtype == torch.float32  # auto on CPU

    # Weights are the saved ones, every saved tensor and every parameter.
    saved = load_file(str(Path(path) / "model.safetensors"))
    state = loaded.model.state_dict()
    covered = set()
    for key, tensor in saved.items():
        model_key = _model_key(key, state)
        torch.testing.assert_close(state[model_key], tensor, rtol=0, atol=0, msg=model_key)
        covered.add(model_key)
    params = dict(loaded.model.named_parameters())  # tied weights appear once
    assert set(params) <= covered, f"parameters not in the checkpoint: {set(params) - covered}"

    with torch.inference_mode():
        check(loaded.model, loaded.preprocessor)


def test_make_tiny_bert_overrides_and_cache(make_tiny_bert, tiny_bert):
    assert make_tiny_bert() == tiny_bert  # same arguments, same directory
    wide = make_tiny_bert(num_layers=4, hidden=64, num_attention_heads=4)
    assert wide != tiny_bert and make_tiny_bert(num_layers=4, hidden=64, num_attention_heads=4) == wide
    model = load_model(wide, "encoder", device="cpu", preprocessor=False).model
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.intermediate_size) == (4, 64, 4, 128)


def test_tiny_bert_tokenizer_is_shared(tiny_bert, tiny_bert_classifier):
    a = load_model(tiny_bert, "encoder", device="cpu").preprocessor
    b = load_model(tiny_bert_classifier, "sequence-classifier", device="cpu").preprocessor
    assert a.get_vocab() == b.get_vocab()
    ids = a("the dog and the cat", add_special_tokens=False)["input_ids"]
    assert a.unk_token_id not in ids  # COCO words are in the fixture vocabulary
    assert a.convert_ids_to_tokens(a("hi")["input_ids"]) == ["[CLS]", "[UNK]", "[SEP]"]


def test_dtype_argument(tiny_bert):
    model = load_model(tiny_bert, "encoder", device="cpu", dtype="bf16", preprocessor=False).model
    assert next(model.parameters()).dtype == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(MmkitError, match=r"dtype.*'fp33'.*did you mean 'fp32'"):
        load_model(tiny_bert, "encoder", device="cpu", dtype="fp33")


# ------------------------------------------------------------------ errors
def test_unknown_kind_suggests_the_closest(tiny_bert):
    with pytest.raises(MmkitError) as err:
        load_model(tiny_bert, "encodr")
    assert "'encodr'" in str(err.value) and "did you mean 'encoder'" in str(err.value)


def test_kind_that_does_not_fit_the_checkpoint(tiny_bert, tiny_clip):
    with pytest.raises(MmkitError, match=r"'itm'.*'bert'.*vilt"):
        load_model(tiny_bert, "itm", device="cpu")
    with pytest.raises(MmkitError) as err:
        load_model(tiny_clip, "causal-lm", device="cpu")
    assert tiny_clip in str(err.value) and "causal-lm" in str(err.value)


def test_empty_directory(tmp_path):
    with pytest.raises(MmkitError) as err:
        load_model(str(tmp_path), "encoder", device="cpu")
    assert str(tmp_path) in str(err.value) and "config.json" in str(err.value)


def test_missing_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MmkitError) as err:
        load_model("./nope", "encoder", device="cpu")
    assert "./nope" in str(err.value) and "no such model directory" in str(err.value)


def test_missing_preprocessor_is_a_user_error(tiny_image_classifier):
    # An image classifier has no tokenizer: loading it as a text encoder names what is missing.
    with pytest.raises(MmkitError, match="no tokenizer saved with the model"):
        load_model(tiny_image_classifier, "encoder", device="cpu")


def test_unknown_bundled_name():
    with pytest.raises(MmkitError, match="did you mean 'minilm'"):
        resolve_source("bundled:minilmm")


def test_trust_remote_code_is_off_by_default(tiny_bert, monkeypatch):
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(tiny_bert, "encoder", device="cpu")
    assert len(seen) >= 3 and all(value is False for value in seen), seen


# ------------------------------------------------------------------ offline real assets
def test_bundled_minilm(minilm_path):
    loaded = load_model("bundled:minilm", "encoder", device="cpu")
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.path == minilm_path and loaded.id == "bundled:minilm"
    assert loaded.model.config.hidden_size == 384 and loaded.model.config.num_hidden_layers == 6
    batch = loaded.preprocessor(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model(**batch).last_hidden_state
    assert out.shape == (*batch["input_ids"].shape, 384)

    # The hub id resolves to the bundled copy offline (HF_HUB_OFFLINE=1 in conftest).
    assert resolve_source(MINILM_HUB_ID) == (minilm_path, None)
    by_id = load_model(MINILM_HUB_ID, "encoder", device="cpu", preprocessor=False)
    assert by_id.path == minilm_path and by_id.record()["id"] == MINILM_HUB_ID
    torch.testing.assert_close(by_id.model.embeddings.word_embeddings.weight,
                               loaded.model.embeddings.word_embeddings.weight)


def test_bundled_smollm2_resolves(smollm2_gguf):
    directory, filename = smollm2_gguf
    assert filename == SMOLLM2_GGUF
    assert resolve_source("bundled:smollm2") == (directory, filename)
    # A path to the .gguf file itself resolves the same way.
    assert resolve_source(str(Path(directory) / filename)) == (directory, filename)


@pytest.mark.slow
def test_bundled_smollm2_loads(smollm2_gguf, tmp_path):
    loaded = load_model("bundled:smollm2", "causal-lm", device="cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.gguf_file == SMOLLM2_GGUF
    tok = loaded.preprocessor
    assert len(tok) == 49152 and tok.chat_template
    batch = tok(["Hello"], return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], loaded.model.config.vocab_size)
    # Dense and trainable, and save_pretrained writes it (dequantised) so from_pretrained reads it back.
    assert all(p.dtype == torch.float32 and p.requires_grad for p in loaded.model.parameters())
    out = tmp_path / "dense"
    loaded.model.save_pretrained(out)
    from transformers import LlamaForCausalLM

    back = LlamaForCausalLM.from_pretrained(out)
    name, weight = next(iter(loaded.model.state_dict().items()))
    assert torch.equal(back.state_dict()[name], weight)


def test_tests_never_use_the_user_cache():
    import os

    cache = Path(os.environ["MMKIT_CACHE"])
    assert cache.parent.is_dir() and Path.home() / ".cache" / "mmkit" != cache
