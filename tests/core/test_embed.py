"""mmkit/core/embed.py: pooling, length-sorted batching invariance, the cache, dual encoders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmkit.core import embed as E
from mmkit.errors import DataError, MmkitError

SHORT = "a dog"
TEXTS = [
    "a man riding a horse near a red car in the street",
    SHORT,
    "two cats sitting on a bed",
    "describe the image in detail please and list all the objects you can find in the picture",
    "a woman holding an umbrella",
    "what is there",
]


@pytest.fixture()
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def bert(tiny_bert):
    from mmkit.core.models import load_model

    return load_model(tiny_bert, "encoder", device="cpu")


def _count_forward(loaded):
    calls = []
    handle = loaded.model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_import_does_not_import_torch():
    code = "import sys, mmkit.core.embed, mmkit.core.data; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_shape_dtype_and_unit_norm(tiny_bert, cache):
    emb = E.encode_texts(TEXTS, tiny_bert, cache_dir=cache, progress=False)
    assert emb.shape == (len(TEXTS), 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    raw = E.encode_texts(TEXTS, tiny_bert, normalize=False, use_cache=False, progress=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), emb, atol=1e-5)


def test_row_does_not_depend_on_batch_composition_or_sorting(bert):
    alone = E.encode_texts([SHORT], loaded=bert, use_cache=False, progress=False)
    mixed = E.encode_texts(TEXTS, loaded=bert, batch_size=3, use_cache=False, progress=False)
    one_batch = E.encode_texts(TEXTS, loaded=bert, batch_size=64, use_cache=False, progress=False)
    unsorted = E.encode_texts(TEXTS, loaded=bert, batch_size=4, sorted_by_length=False,
                              use_cache=False, progress=False)
    np.testing.assert_allclose(mixed[TEXTS.index(SHORT)], alone[0], atol=1e-5)
    np.testing.assert_allclose(mixed, one_batch, atol=1e-5)
    np.testing.assert_allclose(mixed, unsorted, atol=1e-5)
    for i, text in enumerate(TEXTS):
        single = E.encode_texts([text], loaded=bert, use_cache=False, progress=False)
        np.testing.assert_allclose(mixed[i], single[0], atol=1e-5)


def test_mean_pooling_matches_a_hand_computation(bert):
    import torch

    texts = ["a dog on the grass", "two cats sitting on a bed near the window today"]
    tok = bert.preprocessor
    enc = tok(texts, padding=True, return_tensors="pt")
    assert enc["attention_mask"][0].sum() < enc["attention_mask"][1].sum()  # really padded
    with torch.inference_mode():
        hidden = bert.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    by_hand = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    got = E.encode_texts(texts, loaded=bert, normalize=False, use_cache=False, progress=False)
    np.testing.assert_allclose(got, by_hand, atol=1e-5)
    unit = E.encode_texts(texts, loaded=bert, use_cache=False, progress=False)
    np.testing.assert_allclose(unit, by_hand / np.linalg.norm(by_hand, axis=1, keepdims=True), atol=1e-5)


def test_other_poolings(bert):
    import torch

    texts = ["a dog on the grass", "two cats"]
    enc = bert.preprocessor(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = bert.model(**enc)
    last = enc["attention_mask"].sum(1) - 1
    expected = {
        "cls": out.last_hidden_state[:, 0],
        "eos": out.last_hidden_state[torch.arange(2), last],
        "pooler": out.pooler_output,
    }
    for name, want in expected.items():
        got = E.encode_texts(texts, loaded=bert, pooling=name, normalize=False, use_cache=False, progress=False)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, err_msg=name)
    assert {"mean", "cls", "eos", "pooler", "projected"} <= set(E.POOLINGS)
    with pytest.raises(MmkitError, match="unknown pooling"):
        E.encode_texts(texts, loaded=bert, pooling="max", use_cache=False)


def test_second_call_hits_the_cache_and_a_changed_text_misses(bert, cache):
    calls, handle = _count_forward(bert)
    try:
        first, info1 = E.encode_texts(TEXTS, loaded=bert, cache_dir=cache, batch_size=2,
                                      progress=False, return_info=True)
        assert len(calls) == 3 and not info1.cache_hit
        calls.clear()
        second, info2 = E.encode_texts(TEXTS, loaded=bert, cache_dir=cache, progress=False, return_info=True)
        assert len(calls) == 0 and info2.cache_hit and info2.key == info1.key
        np.testing.assert_array_equal(first, second)

        changed = TEXTS[:-1] + [TEXTS[-1] + " now"]
        _, info3 = E.encode_texts(changed, loaded=bert, cache_dir=cache, progress=False, return_info=True)
        assert len(calls) > 0 and not info3.cache_hit and info3.key != info1.key
        calls.clear()
        E.encode_texts(TEXTS, loaded=bert, cache_dir=cache, use_cache=False, progress=False)
        assert len(calls) > 0
        calls.clear()
        # every key field matters: pooling, text_mode, normalisation
        for kwargs in ({"pooling": "cls"}, {"text_mode": "instruction+input"}, {"normalize": False}):
            _, info = E.encode_texts(TEXTS, loaded=bert, cache_dir=cache, progress=False,
                                     return_info=True, **kwargs)
            assert not info.cache_hit and info.key != info1.key, kwargs
    finally:
        handle.remove()


def test_cache_by_path_and_loaded_model_agree(tiny_bert, bert, cache):
    _, by_path = E.encode_texts(TEXTS, tiny_bert, cache_dir=cache, progress=False, return_info=True)
    calls, handle = _count_forward(bert)
    try:
        _, by_loaded = E.encode_texts(TEXTS, loaded=bert, cache_dir=cache, progress=False, return_info=True)
    finally:
        handle.remove()
    assert by_loaded.cache_hit and by_loaded.key == by_path.key and calls == []


def test_cache_entry_layout(tiny_bert, cache):
    texts = [f"{w} dog" for w in ("a", "two", "one", "the", "big", "small", "red", "old", "new", "black")]
    emb, info = E.encode_texts(texts, tiny_bert, cache_dir=cache, shard_rows=4, progress=False,
                               return_info=True)
    entry = cache / "embed" / info.key
    assert Path(info.cache_path) == entry
    assert sorted(p.name for p in entry.iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["n"] == 10 and manifest["d"] == 32 and manifest["key"] == info.key
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["model"] == tiny_bert
    fields = manifest["fields"]
    assert E.cache_key(fields) == info.key
    assert fields["model"] == tiny_bert and fields["pooling"] == "mean" and fields["normalize"] is True
    assert fields["max_length"] == 128 and fields["text_mode"] == ""
    assert fields["texts_sha256"] == E.texts_sha256(texts)
    assert set(fields["files"]) == {"config.json", "tokenizer.json"} and all(fields["files"].values())
    assert fields["weights"] == {"model.safetensors": (Path(tiny_bert) / "model.safetensors").stat().st_size}

    from safetensors.numpy import load_file

    stacked = np.concatenate([load_file(str(entry / s["file"]))["embeddings"] for s in manifest["shards"]])
    np.testing.assert_array_equal(stacked, emb)
    np.testing.assert_array_equal(E.load_cached(info.key, cache), emb)
    assert not list((cache / "embed").glob(".*"))  # no temp folders left behind

    # an entry counts only once manifest.json exists
    (entry / "manifest.json").unlink()
    assert E.load_cached(info.key, cache) is None
    _, again = E.encode_texts(texts, tiny_bert, cache_dir=cache, shard_rows=4, progress=False, return_info=True)
    assert not again.cache_hit and (entry / "manifest.json").is_file()


def test_cache_uses_mmkit_cache_env(tiny_bert, monkeypatch, tmp_path):
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "env-root"))
    _, info = E.encode_texts(TEXTS[:2], tiny_bert, progress=False, return_info=True)
    assert Path(info.cache_path).parent == tmp_path / "env-root" / "embed"


def test_texts_sha256_is_the_joined_hash():
    import hashlib

    texts = ["a", "b\nc", "", "ü"]
    assert E.texts_sha256(texts) == hashlib.sha256("\x1e".join(texts).encode()).hexdigest()
    many = [str(i) for i in range(E._HASH_CHUNK * 2 + 5)]
    assert E.texts_sha256(many) == hashlib.sha256("\x1e".join(many).encode()).hexdigest()
    with pytest.raises(DataError, match="text 2 is int"):
        E.texts_sha256(["a", "b", 3])


def test_empty_input_and_bad_arguments(tiny_bert, cache):
    emb = E.encode_texts([], tiny_bert, cache_dir=cache)
    assert emb.shape == (0, 32) and emb.dtype == np.float32
    with pytest.raises(DataError, match="text 1"):
        E.encode_texts(["a dog", None], tiny_bert, cache_dir=cache, progress=False)
    with pytest.raises(MmkitError, match="batch size"):
        E.encode_texts(["a dog"], tiny_bert, batch_size=0)


def test_generator_input_and_progress_off_in_non_tty(tiny_bert, capsys):
    emb = E.encode_texts((t for t in TEXTS), tiny_bert, use_cache=False, progress=True)
    assert emb.shape == (len(TEXTS), 32)
    err = capsys.readouterr().err
    # No bar when stderr is not a TTY: at most the plain summary line a batch-job log gets.
    assert "━" not in err and "\r" not in err and err.count("encoding texts") <= 1


def test_max_length_truncates_and_is_capped(bert, cache):
    long = " ".join(["dog"] * 300)
    _, info = E.encode_texts([long, SHORT], loaded=bert, use_cache=False, progress=False, return_info=True)
    assert info.max_length == 128  # capped by the tiny model's position embeddings
    assert info.n_at_max_length == 1
    _, info = E.encode_texts([long], loaded=bert, max_length=8, use_cache=False, progress=False,
                             return_info=True)
    assert info.max_length == 8
    a = E.encode_texts([long], loaded=bert, max_length=8, use_cache=False, progress=False)
    b = E.encode_texts([" ".join(["dog"] * 6)], loaded=bert, max_length=8, use_cache=False, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-5)  # [CLS] + 6 words + [SEP] = 8 tokens


# --------------------------------------------------------------------------- real encoder


def test_minilm_paraphrases_and_unrelated_texts(minilm_path, cache):
    pairs_close = [("How do I reset my password?", "What are the steps to change my password?"),
                   ("A man is playing a guitar.", "A person is playing the guitar."),
                   ("What is the capital of France?", "Which city is the capital of France?")]
    pairs_far = [("The stock market fell sharply today.", "A cat is sleeping on the sofa."),
                 ("How do I bake sourdough bread?", "The Python interpreter raised a KeyError."),
                 ("A man is playing a guitar.", "Quarterly tax filings are due in April.")]
    texts = [t for pair in pairs_close + pairs_far for t in pair]
    emb, info = E.encode_texts(texts, minilm_path, cache_dir=cache, progress=False, return_info=True)
    assert emb.shape == (len(texts), 384) and info.max_length == 256  # sentence_bert_config.json
    cos = (emb[0::2] * emb[1::2]).sum(1)
    assert np.all(cos[:3] > 0.7), cos
    assert np.all(cos[3:] < 0.2), cos


# --------------------------------------------------------------------------- dual encoders


def _images(tmp_path, n=5):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        img = Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8))
        img.save(tmp_path / f"img{i}.png")
        paths.append(f"img{i}.png")
    return paths


def test_clip_text_and_image_embeddings(tiny_clip, tmp_path, cache):
    texts = ["a photo of a dog", "two cats on a bed", "a red car"]
    temb, tinfo = E.encode_texts(texts, tiny_clip, cache_dir=cache, progress=False, return_info=True)
    assert tinfo.pooling == "projected" and tinfo.max_length == 32
    assert temb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(temb, axis=1), 1.0, atol=1e-5)

    paths = _images(tmp_path)
    iemb, iinfo = E.encode_images(paths, tiny_clip, root=tmp_path, batch_size=2, cache_dir=cache,
                                  progress=False, return_info=True)
    assert iemb.shape == (5, 16) and iemb.dtype == np.float32 and not iinfo.cache_hit
    np.testing.assert_allclose(np.linalg.norm(iemb, axis=1), 1.0, atol=1e-5)
    _, again = E.encode_images(paths, tiny_clip, root=tmp_path, cache_dir=cache, progress=False, return_info=True)
    assert again.cache_hit and again.key == iinfo.key


def test_clip_features_match_the_model(tiny_clip, tmp_path):
    import torch

    from mmkit.core.data import load_image
    from mmkit.core.models import load_model

    clip = load_model(tiny_clip, "dual-encoder", device="cpu")
    texts = ["a photo of a dog", "two cats on a bed near the window"]
    paths = _images(tmp_path, n=3)
    with torch.inference_mode():
        enc = clip.preprocessor.tokenizer(texts, padding=True, return_tensors="pt")
        t = clip.model.get_text_features(**enc).pooler_output
        pix = clip.preprocessor.image_processor(images=[load_image(p, tmp_path) for p in paths],
                                                return_tensors="pt")["pixel_values"]
        i = clip.model.get_image_features(pixel_values=pix).pooler_output
    t = torch.nn.functional.normalize(t, dim=-1).numpy()
    i = torch.nn.functional.normalize(i, dim=-1).numpy()
    np.testing.assert_allclose(E.encode_texts(texts, loaded=clip, use_cache=False, progress=False), t, atol=1e-5)
    from PIL import Image

    pil = [Image.open(tmp_path / p) for p in paths]
    got = E.encode_images(pil, loaded=clip, batch_size=2, use_cache=False, progress=False)
    np.testing.assert_allclose(got, i, atol=1e-5)


def test_encode_images_errors(tiny_clip, tiny_bert, tmp_path):
    paths = _images(tmp_path, n=2) + ["missing.png"]
    with pytest.raises(DataError, match="missing.png"):
        E.encode_images(paths, tiny_clip, root=tmp_path, use_cache=False, progress=False)
    with pytest.raises(DataError, match="missing.png"):
        E.encode_images(paths, tiny_clip, root=tmp_path, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(MmkitError, match="not a dual encoder"):
        E.encode_images(paths[:2], tiny_bert, root=tmp_path, use_cache=False)


def test_embed_cache_dir_is_under_the_shared_root(tmp_path):
    assert E.embed_cache_dir(tmp_path / "flag") == tmp_path / "flag" / "embed"


def test_cache_hit_reports_its_entry(tiny_bert, tmp_path):
    texts = ["a dog", "a cat sat"]
    _, first = E.encode_texts(texts, tiny_bert, cache_dir=tmp_path, return_info=True, progress=False)
    _, again = E.encode_texts(texts, tiny_bert, cache_dir=tmp_path, return_info=True, progress=False)
    assert again.cache_hit and not first.cache_hit
    assert again.cache_path == first.cache_path and (tmp_path / "embed").is_dir()
