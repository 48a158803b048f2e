"""Tests of mmkit/distill/dcd.py (distill.md section 3.8) on the tiny ViLT and BLIP fixtures."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.core.imagetext import load_image_text
from mmkit.core.itm import itm_scorer
from mmkit.core.models import load_model
from mmkit.distill import dcd
from mmkit.errors import MmkitError

COLORS = ["red", "blue", "green", "yellow", "white", "black", "pink", "purple", "brown", "gray"]
OBJECTS = ["ball", "kite", "cake", "clock"]


def write_shapes(folder: Path, n_images: int = 8, groups: bool = False, name: str = "data.jsonl",
                 start: int = 0) -> Path:
    """A small image-caption set: PIL images of coloured shapes, two captions each (JSONL +
    PNGs in ``folder/images``); with ``groups`` every image's group is its object word."""
    from PIL import Image, ImageDraw

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n_images):
        color, obj = COLORS[i % len(COLORS)], OBJECTS[(i // len(COLORS) + i) % len(OBJECTS)]
        img = Image.new("RGB", (32 + 8 * (i % 2), 32), "gray" if color != "gray" else "white")
        draw = ImageDraw.Draw(img)
        (draw.ellipse if i % 2 else draw.rectangle)([4 + i % 5, 6, 26, 24 + i % 4], fill=color)
        img.save(images / f"{i}.png")
        rec = {"image": f"images/{i}.png", "captions": [f"a {color} {obj}", f"the {obj} is {color}"]}
        if groups:
            rec["group"] = obj
        lines.append(json.dumps(rec))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return load_image_text(str(write_shapes(folder, 8)))


@pytest.fixture(scope="module", params=["tiny_vilt", "tiny_blip_itm"])
def teacher_path(request):
    return request.getfixturevalue(request.param)


def teacher(path: str):
    lm = load_model(path, "itm", device="cpu")
    return itm_scorer(lm.model.eval(), lm.preprocessor)


def config(**overrides) -> dcd.DcdConfig:
    train = dataclasses.replace(dcd._train_defaults(), batch_size=4, grad_accum=1, epochs=1, log_every=1)
    cfg = dcd.DcdConfig(negatives=5, topk=3, train=train)
    cfg.eval.batch_size = 64
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# --------------------------------------------------------------------------- pure functions


def test_default_student_layers():
    assert dcd.default_student_layers(6) == [0, 3, 5]
    assert dcd.default_student_layers(4) == [0, 3]
    assert dcd.default_student_layers(12) == [0, 2, 4, 7, 9, 11]
    assert dcd.default_student_layers(1) == [0]
    for n in range(2, 30):
        for s in range(2, n + 1):
            expected = [math.floor(i * (n - 1) / (s - 1) + 0.5 + 1e-9) for i in range(s)]
            assert dcd.default_student_layers(n, s) == expected, (n, s)
    with pytest.raises(MmkitError):
        dcd.default_student_layers(4, 5)


def test_selection_keeps_the_positive_first_inside_and_outside_the_top_k():
    negs = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.0]
    s_t = torch.tensor([[0.5, *negs],    # positive inside the teacher's top 8
                        [-1.0, *negs],   # positive outside: ranked 10th of 10
                        [2.0, *negs]])   # positive first
    idx = dcd.select_candidates(s_t, 8)
    expected = [0, 1, 3, 5, 7, 8, 6, 4]  # negatives by score: .9 .8 .7 .6 .4 .3 .2 (0.1 and 0.0 dropped)
    assert idx.tolist() == [expected] * 3
    t = s_t.gather(1, idx)
    assert t[0].tolist() == pytest.approx([0.5, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2])
    assert t[1].tolist() == pytest.approx([-1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2])
    released = dcd.released_teacher_scores(s_t, 8)
    assert released[0].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])  # misaligned
    assert released[1].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    assert torch.equal(released[2], t[2])  # the bug is invisible when the teacher ranks the positive first


def test_selection_breaks_ties_by_column():
    s_t = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5]])
    assert dcd.select_candidates(s_t, 3).tolist() == [[0, 1, 2]]


def test_entropy_difficulty_and_weights():
    t = torch.tensor([[1000.0, 0.0, 0.0, 0.0],   # p = (1, 0, 0, 0) exactly: H = 0
                      [1.0, 1.0, 1.0, 1.0],      # uniform: H = log 4
                      [2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(t, -1)
    assert float(p[0, 1]) == 0.0
    entropy = dcd.teacher_entropy(t)
    assert not torch.isnan(entropy).any()
    assert float(entropy[0]) == 0.0
    assert float(entropy[1]) == pytest.approx(math.log(4))
    h = dcd.difficulty(entropy)
    w = dcd.kd_weights(h)
    assert float(h.sum()) == pytest.approx(1.0)
    assert float(w.sum()) == pytest.approx(1.0)
    order = torch.argsort(h)
    assert torch.all(w[order][1:] < w[order][:-1])  # w strictly decreases as h grows
    zero = dcd.difficulty(torch.zeros(4))
    assert zero.tolist() == [0.25] * 4
    out = dcd.dcd_loss(t, torch.zeros_like(t))
    assert all(not torch.isnan(v).any() for v in out.values())


def _hand(t: list[list[float]], s: list[list[float]], alpha: float, temperature: float):
    """Section 3.4 computed with plain Python floats, independently of the module."""
    entropies = []
    for row in t:
        z = sum(math.exp(x) for x in row)
        entropies.append(-sum((math.exp(x) / z) * math.log(math.exp(x) / z) for x in row))
    h = [e / sum(entropies) for e in entropies]
    ew = [math.exp((1 - hb) ** 2) for hb in h]
    w = [e / sum(ew) for e in ew]
    mse = [sum((a / temperature - b / temperature) ** 2 for a, b in zip(tr, sr)) / len(tr) for tr, sr in zip(t, s)]
    kd = temperature ** 2 * sum(wb * m for wb, m in zip(w, mse))
    bce = [sum(math.log1p(math.exp(-x)) if k == 0 else math.log1p(math.exp(x)) for k, x in enumerate(sr)) / len(sr)
           for sr in s]
    hard = sum(hb * b for hb, b in zip(h, bce))
    unweighted = temperature ** 2 * sum(mse) / len(mse)
    return kd, hard, alpha * kd + (1 - alpha) * hard, unweighted


def test_weighted_kd_matches_a_3x8_hand_computation():
    rng = np.random.default_rng(3)
    t = (rng.normal(size=(3, 8)) * np.array([[0.1], [1.0], [4.0]])).tolist()  # three difficulties
    s = rng.normal(size=(3, 8)).tolist()
    kd, hard, total, unweighted = _hand(t, s, alpha=0.2, temperature=2.0)
    out = dcd.dcd_loss(torch.tensor(t), torch.tensor(s), alpha=0.2, temperature=2.0)
    assert float(out["kd"]) == pytest.approx(kd, rel=1e-5)
    assert float(out["hard"]) == pytest.approx(hard, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(total, rel=1e-5)
    assert abs(kd - unweighted) > 1e-3  # the weighting changes the loss when difficulties differ
    released = dcd.dcd_loss(torch.tensor(t), torch.tensor(s), alpha=0.2, temperature=2.0, released=True)
    assert float(released["kd"]) == pytest.approx(unweighted, rel=1e-5)  # bug (1): a plain mean


def test_equal_difficulties_give_the_unweighted_mean():
    base = [0.3, -1.2, 2.0, 0.0, 0.7, -0.4, 1.1, 0.2]
    t = [base, base[::-1], base[3:] + base[:3]]  # permutations: the same entropy
    s = np.random.default_rng(1).normal(size=(3, 8)).tolist()
    kd, _, _, unweighted = _hand(t, s, 0.2, 1.0)
    out = dcd.dcd_loss(torch.tensor(t), torch.tensor(s))
    assert float(out["kd"]) == pytest.approx(unweighted, rel=1e-5)
    assert kd == pytest.approx(unweighted, rel=1e-9)
    assert out["w"].tolist() == pytest.approx([1 / 3] * 3)


def test_kd_gradient_reaches_only_the_student_scores():
    t = torch.randn(3, 8, requires_grad=True)
    s = torch.randn(3, 8, requires_grad=True)
    dcd.dcd_loss(t, s)["loss"].backward()
    assert t.grad is None and s.grad is not None


# --------------------------------------------------------------------------- negatives


def test_sampler_excludes_the_images_and_groups_own_captions(tmp_path):
    data = load_image_text(str(write_shapes(tmp_path, 12, groups=True)))
    for key, unit in ((data.text_to_image, "image"), (data.text_group, "group")):
        sampler = dcd.NegativeSampler(key, 5, seed=7, unit=unit)
        examples = np.arange(data.n_texts)
        neg = sampler.sample(examples, epoch=0)
        assert neg.shape == (data.n_texts, 5)
        assert not (key[neg] == key[examples][:, None]).any()
        assert all(len(set(row)) == 5 for row in neg.tolist())  # without replacement
        assert np.array_equal(neg, dcd.NegativeSampler(key, 5, seed=7).sample(examples, epoch=0))
        assert not np.array_equal(neg, sampler.sample(examples, epoch=1))
        assert not np.array_equal(neg, dcd.NegativeSampler(key, 5, seed=8).sample(examples, epoch=0))
        # one example's draw does not depend on the batch it is in
        assert np.array_equal(sampler.sample(examples[[5, 2]], 0), neg[[5, 2]])


def test_sampler_covers_every_candidate():
    key = np.repeat(np.arange(4), 2)  # 4 images x 2 captions
    sampler = dcd.NegativeSampler(key, 3, seed=0)
    seen = set()
    for epoch in range(60):
        seen.update(sampler.sample(np.array([2]), epoch)[0].tolist())
    assert seen == {0, 1, 4, 5, 6, 7}


def test_sampler_needs_enough_candidates():
    key = np.repeat(np.arange(3), 2)
    with pytest.raises(MmkitError, match="--negatives"):
        dcd.NegativeSampler(key, 5, seed=0)


# --------------------------------------------------------------------------- student


def test_student_starts_as_a_copy_of_the_chosen_teacher_layers(teacher_path):
    t = teacher(teacher_path)
    layers = dcd.default_student_layers(t.num_fusion_layers)
    assert layers == ([0, 3, 5] if t.num_fusion_layers == 6 else [0, 3])
    s = dcd.build_student(t, layers)
    for j, i in enumerate(layers):
        a, b = s.fusion_layers[j].state_dict(), t.fusion_layers[i].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith((s.layers_path, s.head_path, *s.pooler_paths)) for n in trainable)
    assert not any(p.requires_grad for p in t.model.parameters())
    with torch.no_grad():
        s.model.get_submodule(s.head_path).weight.add_(1.0)
    assert not torch.equal(s.model.get_submodule(s.head_path).weight, t.model.get_submodule(t.head_path).weight)


def _batch(data, scorer, examples):
    batch = dcd._ImageCollate(data.images, data.text_to_image, scorer.processor)(examples)
    batch["index"] = torch.tensor(examples)
    return batch


def _sampler(data, cfg):
    return dcd.NegativeSampler(data.text_to_image, cfg.negatives, cfg.train.seed)


def test_a_student_with_every_layer_has_zero_kd_loss(teacher_path, shapes):
    t = teacher(teacher_path)
    cfg = config()
    s = dcd.build_student(t, list(range(t.num_fusion_layers)))
    module = dcd.DcdStudent(s, t.unimodal_modules()).eval()
    from mmkit.core.data import tokenize_flat

    step = dcd.DcdStep(t, tokenize_flat(t.tokenizer, shapes.captions, max_length=40), _sampler(shapes, cfg), cfg)
    out = step(module, _batch(shapes, t, [0, 3, 6, 9]))
    assert float(out["kd"]) == 0.0
    assert float(out["loss"].detach()) > 0.0  # the hard-label term remains


@dataclasses.dataclass
class Trained:
    teacher: object
    teacher_before: dict
    student: object
    student_before: dict
    encode_rows: list
    metrics: dict
    out: Path


@pytest.fixture(scope="module")
def trained(teacher_path, shapes, tmp_path_factory):
    """One optimizer step of ``train_student`` (B = 4) with a hook counting encode_image rows."""
    t = teacher(teacher_path)
    teacher_before = {k: v.clone() for k, v in t.model.state_dict().items()}
    layers = dcd.default_student_layers(t.num_fusion_layers)
    # The student's expected start: the teacher's tensors of the kept layers, renumbered 0..s-1.
    student_before = {}
    renumber = {f"{t.layers_path}.{j}.": f"{t.layers_path}.{i}." for j, i in enumerate(layers)}
    conv = next(m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d))  # the patch projection
    rows: list[int] = []
    hook = conv.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    cfg = config()
    cfg.train.max_steps = 1
    out = tmp_path_factory.mktemp("run")
    try:
        student, metrics = dcd.train_student(t, shapes, cfg, out, {"id": "tiny", "revision": None})
    finally:
        hook.remove()
    for key in student.model.state_dict():
        source = next((key.replace(a, b, 1) for a, b in renumber.items() if key.startswith(a)), key)
        student_before[key] = teacher_before[source]
    return Trained(t, teacher_before, student, student_before, rows, metrics, out)


def test_a_training_step_changes_only_the_students_trainable_parts(trained):
    t, student = trained.teacher, trained.student
    assert trained.encode_rows == [4]  # encode_image saw B images, not B * (1 + N)
    assert trained.metrics["steps"] == 1 and trained.metrics["examples_seen"] == 4
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, trained.teacher_before[k]), k  # teacher (and its shared encoders) untouched
    assert all(p.grad is None for p in t.model.parameters())
    changed = {k for k, v in student.model.state_dict().items() if not torch.equal(v, trained.student_before[k])}
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert not t.model.training and not any(m.training for m in t.unimodal_modules())


def test_saved_student_reloads_with_the_teachers_class(trained, shapes):
    from mmkit.core.data import load_image

    t, student = trained.teacher, trained.student
    reloaded = type(t.model).from_pretrained(trained.out / "student").eval()
    info = reloaded.config.distill
    assert info["student_layers"] == dcd.default_student_layers(t.num_fusion_layers)
    assert info["teacher"] == {"id": "tiny", "revision": None}
    scorer = itm_scorer(reloaded, t.processor)
    assert scorer.num_fusion_layers == len(info["student_layers"])
    enc = t.preprocess([load_image(p) for p in shapes.images[:3]])
    ids = t.tokenizer(shapes.captions[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = student.score_pairs(enc["pixel_values"], ids["input_ids"], ids["attention_mask"], enc.get("pixel_mask"))
        b = scorer.score_pairs(enc["pixel_values"], ids["input_ids"], ids["attention_mask"], enc.get("pixel_mask"))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_reproduce_released_keeps_dropout_on_and_allows_same_image_negatives(tiny_vilt, shapes):
    t = teacher(tiny_vilt)
    s = dcd.build_student(t, [0, 3, 5])
    module = dcd.DcdStudent(s, t.unimodal_modules(), frozen_dropout=True).train()
    assert all(m.training for m in t.unimodal_modules())
    module = dcd.DcdStudent(s, t.unimodal_modules(), frozen_dropout=False).train()
    assert not any(m.training for m in t.unimodal_modules()) and module.model.vilt.encoder.training
    key = np.arange(shapes.n_texts)  # the released sampler only avoids the example's own caption
    neg = dcd.NegativeSampler(key, 14, seed=0).sample(np.arange(shapes.n_texts), 0)
    same_image = shapes.text_to_image[neg] == shapes.text_to_image[:, None]
    assert same_image.any() and not (neg == np.arange(shapes.n_texts)[:, None]).any()


# --------------------------------------------------------------------------- evaluation


def test_rerank_with_every_pair_equals_full(teacher_path, shapes, tiny_clip):
    t = teacher(teacher_path)
    s = dcd.build_student(t, [0, t.num_fusion_layers - 1])
    cfg = config()
    cfg.eval.rerank_k = "all"
    if not t.has_contrastive:
        cfg.eval.shortlist = tiny_clip
    models = [dcd.EvalModel("teacher", t), dcd.EvalModel("student", s)]
    out = dcd.evaluate(models, shapes, cfg, modes=["full", "rerank"])
    for name in ("teacher", "student"):
        assert out[name]["full"] == out[name]["rerank"]
    assert out["timing"]["teacher_full"]["pairs_scored"] == shapes.n_images * shapes.n_texts
    assert set(out["timing"]["ratios"]) >= {"teacher_full/student_full", "teacher_rerank/student_rerank"}


def test_rerank_k_larger_than_the_gallery_is_an_error(shapes):
    with pytest.raises(MmkitError, match="larger than the gallery"):
        dcd.rerank_k(9, shapes)
    assert dcd.rerank_k(None, shapes) == 128 and dcd.rerank_k(8, shapes) == 8
