"""Tests of mmkit/core/itm.py: the ITM scorers reproduce the models' own forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmkit.core.itm import ITM_SCORERS, Encoded, check_layers, itm_scorer
from mmkit.core.models import load_model
from mmkit.errors import MmkitError

CAPTIONS = ["a red dog on the grass", "two cats", "a man riding a bike near the building", "a blue car"]


def images(n: int = 4, seed: int = 0):
    """Random RGB images of two sizes (ViLT pads mixed sizes and masks the padding)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (40, 32)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 2][::-1], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module", params=["tiny_vilt", "tiny_blip_itm"])
def loaded(request):
    return load_model(request.getfixturevalue(request.param), "itm", device="cpu")


def model_forward(lm, enc, score: str = "logit") -> torch.Tensor:
    """The model's own output for aligned pairs: ViLT ``logits``, BLIP ``itm_score`` (match column)."""
    m = lm.model
    if m.config.model_type == "vilt":
        return m(**enc).logits.squeeze(-1)
    itm = m(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
            attention_mask=enc["attention_mask"], use_itm_head=True).itm_score
    return itm.softmax(-1)[:, 1] if score == "prob" else itm[:, 1]


def inputs(lm):
    return lm.preprocessor(images=images(), text=CAPTIONS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("score", ["logit", "prob"])
def test_fuse_and_score_equal_the_models_forward(loaded, score):
    if score == "prob" and loaded.model.config.model_type == "vilt":
        pytest.skip("ViLT has a single rank logit")
    scorer = itm_scorer(loaded.model.eval(), loaded.preprocessor, score)
    enc = inputs(loaded)
    with torch.no_grad():
        expected = model_forward(loaded, enc, score)
        img = scorer.encode_image(enc["pixel_values"], enc.get("pixel_mask"))
        txt = scorer.encode_text(enc["input_ids"], enc["attention_mask"])
        got = scorer.score(scorer.fuse(img.feats, txt.feats, (img.mask, txt.mask)))
        end_to_end = scorer.score_pairs(enc["pixel_values"], enc["input_ids"], enc["attention_mask"],
                                        enc.get("pixel_mask"))
    assert got.shape == (4,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(end_to_end, expected, atol=1e-5, rtol=0)


def test_layers_select_the_fusion_layers_that_run(loaded):
    scorer = itm_scorer(loaded.model.eval(), loaded.preprocessor)
    enc = inputs(loaded)
    n = scorer.num_fusion_layers
    with torch.no_grad():
        img = scorer.encode_image(enc["pixel_values"], enc.get("pixel_mask"))
        txt = scorer.encode_text(enc["input_ids"], enc["attention_mask"])
        every = scorer.fused_scores(img, txt, layers=list(range(n)))
        default = scorer.fused_scores(img, txt)
        fewer = scorer.fused_scores(img, txt, layers=[0, n - 1])
        # Running layers 0 and n-1 by hand must equal layers=[0, n-1].
        cut = itm_scorer(scorer.cut([0, n - 1]))
        by_cut = cut.fused_scores(img, txt)
    torch.testing.assert_close(every, default, atol=0, rtol=0)
    torch.testing.assert_close(by_cut, fewer, atol=1e-6, rtol=0)
    assert not torch.allclose(fewer, default, atol=1e-7)


def test_cut_shares_the_unimodal_part_and_copies_the_rest(loaded):
    scorer = itm_scorer(loaded.model, loaded.preprocessor)
    n = scorer.num_fusion_layers
    cut_model = scorer.cut([0, n - 1])
    cut = itm_scorer(cut_model)
    assert type(cut_model) is type(loaded.model)
    assert cut.num_fusion_layers == 2
    depth = (cut_model.config.num_hidden_layers if cut_model.config.model_type == "vilt"
             else cut_model.config.text_config.num_hidden_layers)
    assert depth == 2
    assert scorer.num_fusion_layers == n  # the teacher is not cut
    for mine, theirs in zip(cut.unimodal_modules(), scorer.unimodal_modules()):
        assert mine is theirs
    teacher_ptrs = {p.data_ptr() for m in scorer.fusion_modules() for p in m.parameters()}
    for module in cut.fusion_modules():
        for p in module.parameters():
            assert p.data_ptr() not in teacher_ptrs
    for new, old in zip(cut.fusion_layers, [scorer.fusion_layers[0], scorer.fusion_layers[n - 1]]):
        for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
            assert torch.equal(a, b), name
    if cut_model.config.model_type == "blip":
        assert [layer.layer_num for layer in cut.fusion_layers] == [0, 1]


def test_encoded_sets_give_the_same_scores_as_single_pairs(loaded):
    scorer = itm_scorer(loaded.model.eval(), loaded.preprocessor)
    pil = images()
    with torch.no_grad():
        img = scorer.encode_image_files(pil, batch_size=3)  # two batches, padded to one width
        txt = scorer.encode_captions(CAPTIONS, max_length=40, batch_size=3)
        fn = scorer.score_fn(img, txt, batch_size=5)
        pairs = fn(torch.tensor([0, 1, 2, 3, 3]), torch.tensor([0, 1, 2, 3, 0]))
        one = []
        for i, t in [(0, 0), (1, 1), (2, 2), (3, 3), (3, 0)]:
            enc = loaded.preprocessor(images=[pil[i]], text=[CAPTIONS[t]], return_tensors="pt")
            one.append(model_forward(loaded, enc))
    assert len(img) == 4 and len(txt) == 4
    torch.testing.assert_close(pairs, torch.cat(one), atol=1e-5, rtol=0)


def test_blip_contrastive_embeddings_match_the_models_contrastive_path(tiny_blip_itm):
    lm = load_model(tiny_blip_itm, "itm", device="cpu")
    scorer = itm_scorer(lm.model.eval(), lm.preprocessor)
    enc = inputs(lm)
    with torch.no_grad():
        img, txt = scorer.contrastive_embeddings(scorer.encode_image(enc["pixel_values"]), CAPTIONS, 40)
        expected = lm.model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
                            attention_mask=enc["attention_mask"], use_itm_head=False).itm_score
    torch.testing.assert_close(img @ txt.T, expected, atol=1e-5, rtol=0)


def test_vilt_has_no_contrastive_head(tiny_vilt):
    lm = load_model(tiny_vilt, "itm", device="cpu")
    scorer = itm_scorer(lm.model, lm.preprocessor)
    assert not scorer.has_contrastive
    with pytest.raises(MmkitError, match="--shortlist"):
        scorer.contrastive_embeddings(Encoded(torch.zeros(1, 2, 32), torch.ones(1, 2)), ["a"], 8)


def test_wrong_models_are_user_errors(tiny_vilt, tiny_bert):
    from transformers import ViltConfig, ViltModel

    with pytest.raises(MmkitError, match="ViltForImageAndTextRetrieval"):
        itm_scorer(ViltModel(ViltConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8)))
    bert = load_model(tiny_bert, "encoder", device="cpu").model
    with pytest.raises(MmkitError, match="unknown ITM model type 'bert'"):
        itm_scorer(bert)
    assert {"vilt", "blip"} <= set(ITM_SCORERS)


def test_check_layers():
    assert check_layers([0, 3, 5], 6) == [0, 3, 5]
    for bad in ([], [3, 3], [5, 2], [0, 6], [-1, 2]):
        with pytest.raises(MmkitError):
            check_layers(bad, 6)


def test_encoded_cat_pads_and_masks():
    a = Encoded(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.long))
    b = Encoded(torch.ones(1, 5, 4), torch.ones(1, 5, dtype=torch.long))
    c = Encoded.cat([a, b])
    assert c.feats.shape == (3, 5, 4)
    assert c.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert float(c.feats[:2, 3:].abs().sum()) == 0.0
