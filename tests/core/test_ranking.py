"""Tests of mmkit/core/ranking.py: best ranks in memory-bounded blocks, metrics, protocols, re-ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmkit.core.ranking import (EmbeddingScores, MatrixScores, MeanScores, Relevance, best_ranks, check_ks,
                                rerank, rerank_metrics, retrieval_metrics, summarize, top_k)
from mmkit.errors import MmkitError

# evaluate.md §9: 3 images x 6 captions, captions 2i and 2i+1 belong to image i.
SIMS = torch.tensor([[.9, .1, .8, .2, .3, 0.],
                     [.7, .6, .5, .4, .3, .2],
                     [.5, .5, .5, .5, .5, .5]])
T2I = torch.arange(6) // 2
UNBOUNDED = 2**40


class Recorder:
    """An injected matmul that records the number of elements of every score block it makes."""

    def __init__(self):
        self.sizes = []

    def __call__(self, a, b):
        out = a @ b
        self.sizes.append(out.numel())
        return out


def naive_best_ranks(sims: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Reference: sort each row by (score descending, gallery index ascending); first relevant position."""
    out = []
    for row, mask in zip(sims.tolist(), rel.tolist()):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        out.append(min(pos for pos, j in enumerate(order) if mask[j]))
    return torch.tensor(out)


def relevance_matrix(relevance: Relevance) -> torch.Tensor:
    """Bool [N_i, N_t]: caption relevant to image."""
    image_key, text_key = relevance.keys("i2t")
    return image_key[:, None] == text_key[None, :]


def test_hand_fixture_ranks_and_metrics():
    rel = Relevance.build(T2I, 3)
    assert (best_ranks(SIMS, rel, "i2t") + 1).tolist() == [1, 3, 5]  # row 3 pins the tie rule
    assert (best_ranks(SIMS, rel, "t2i") + 1).tolist() == [1, 3, 2, 2, 1, 1]
    m = retrieval_metrics(SIMS, rel, ks=(1, 2, 5))
    assert [round(m[k], 2) for k in ("i2t_r1", "i2t_r2", "i2t_r5")] == [33.33, 33.33, 100.0]
    assert [round(m[k], 2) for k in ("t2i_r1", "t2i_r2", "t2i_r5")] == [50.0, 83.33, 100.0]
    assert (m["i2t_medr"], m["t2i_medr"]) == (3, 1)
    assert m["i2t_meanr"] == 3.0 and round(m["t2i_meanr"], 3) == 1.667
    assert m["rsum"] is None  # RSUM needs R@1, R@5 and R@10


@pytest.mark.parametrize("budget_elements", [1, 7, None])
def test_budgets_give_identical_ranks_and_bound_every_block(budget_elements):
    rel = Relevance.build(T2I, 3)
    rec = Recorder()
    # sims = sims @ I: the same numbers, produced block by block by the injected matmul
    scores = EmbeddingScores(SIMS, torch.eye(6), normalize=False, matmul=rec)
    budget = UNBOUNDED if budget_elements is None else 4 * budget_elements
    assert best_ranks(scores, rel, "i2t", budget_bytes=budget).tolist() == [0, 2, 4]
    assert best_ranks(scores, rel, "t2i", budget_bytes=budget).tolist() == [0, 2, 1, 1, 0, 0]
    assert max(rec.sizes) <= (budget_elements or 18)
    if budget_elements == 1:
        assert set(rec.sizes) == {1}  # one score at a time, two passes over the column blocks
    if budget_elements is None:
        assert rec.sizes == [18, 18]  # one block per direction


def test_largest_block_does_not_grow_with_the_number_of_texts():
    budget_elements = 256
    largest = {}
    for n_texts in (100, 1_000, 4_000):
        g = torch.Generator().manual_seed(n_texts)
        img, txt = torch.randn(20, 8, generator=g), torch.randn(n_texts, 8, generator=g)
        rel = Relevance.build(torch.arange(n_texts) % 20, 20)
        rec = Recorder()
        scores = EmbeddingScores(img, txt, matmul=rec)
        for direction in ("i2t", "t2i"):
            best_ranks(scores, rel, direction, budget_bytes=4 * budget_elements)
        largest[n_texts] = max(rec.sizes)
    assert all(size <= budget_elements for size in largest.values())
    assert largest[4_000] == largest[1_000]  # once a row exceeds the budget, blocks stop growing


def test_matrix_blocks_stay_within_the_budget_and_match():
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(7, 30, generator=g)
    rel = Relevance.build(torch.arange(30) % 7, 7)

    class Recording(MatrixScores):
        recorded: list = []

        def block(self, direction, rows, cols):
            out = super().block(direction, rows, cols)
            Recording.recorded.append(out.numel())
            return out

    want = [best_ranks(sims, rel, d, budget_bytes=UNBOUNDED) for d in ("i2t", "t2i")]
    for elements in (1, 5, 29, 31, 100):
        got = [best_ranks(Recording(sims), rel, d, budget_bytes=4 * elements) for d in ("i2t", "t2i")]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert max(Recording.recorded) <= elements
        Recording.recorded.clear()


def test_an_image_with_five_captions():
    # image 0 owns captions 0-4, image 1 owns caption 5
    sims = torch.tensor([[.1, .2, .3, .4, .95, .9],
                         [.5, .6, .7, .8, .9, .1]])
    rel = Relevance.build(torch.tensor([0, 0, 0, 0, 0, 1]), 2)
    # i2t: image 0 is a hit at 1 through caption 4; image 1's caption is last of six
    assert best_ranks(sims, rel, "i2t").tolist() == [0, 5]
    # t2i: captions 0-3 rank image 1 first; caption 4 ranks image 0 (.95 > .9); caption 5 ranks image 0 first
    assert best_ranks(sims, rel, "t2i").tolist() == [1, 1, 1, 1, 0, 1]
    m = retrieval_metrics(sims, rel, ks=(1, 5, 10))
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 50.0 and m["i2t_r10"] == 100.0
    assert round(m["t2i_r1"], 4) == round(100 / 6, 4) and m["t2i_r5"] == 100.0
    assert m["rsum"] == pytest.approx(50 + 50 + 100 + 100 / 6 + 100 + 100)


def test_ties_break_by_gallery_index_in_both_directions():
    sims = torch.tensor([[.5, .5, .5], [.5, .5, .5]])
    rel = Relevance.build(torch.tensor([1, 0, 1]), 2)
    # image 0's only caption is index 1: caption 0 ties and comes first -> rank 1
    # image 1's captions are 0 and 2: caption 0 is relevant -> rank 0
    assert best_ranks(sims, rel, "i2t").tolist() == [1, 0]
    # caption 0 -> image 1 (image 0 ties before it) = 1; caption 1 -> image 0 = 0; caption 2 -> image 1 = 1
    assert best_ranks(sims, rel, "t2i").tolist() == [1, 0, 1]


def test_group_relevance_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    n_i, n_t = 12, 40
    sims = torch.randint(0, 4, (n_i, n_t), generator=g).float() / 4  # many ties
    text_to_image = torch.randint(0, n_i, (n_t,), generator=g)
    text_to_image[:n_i] = torch.arange(n_i)  # every image has a caption
    image_group = torch.randint(0, 3, (n_i,), generator=g)
    rel = Relevance.build(text_to_image, n_i, image_group, image_group[text_to_image])
    matrix = relevance_matrix(rel)
    assert matrix.sum() > n_t  # captions are relevant to several images
    for elements in (3, 50, None):
        budget = UNBOUNDED if elements is None else 4 * elements
        assert torch.equal(best_ranks(sims, rel, "i2t", budget_bytes=budget), naive_best_ranks(sims, matrix))
        assert torch.equal(best_ranks(sims, rel, "t2i", budget_bytes=budget), naive_best_ranks(sims.T, matrix.T))


def test_random_tie_free_embeddings_agree_with_argsort():
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(30, 16, generator=g), torch.randn(150, 16, generator=g)
    rel = Relevance.build(torch.arange(150) // 5, 30)
    sims = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    matrix = relevance_matrix(rel)
    for direction, s, m in (("i2t", sims, matrix), ("t2i", sims.T, matrix.T)):
        order = torch.argsort(s, dim=1, descending=True)
        positions = torch.argsort(order, dim=1)  # position of each gallery item
        want = positions.masked_fill(~m, s.shape[1]).min(1).values
        got = best_ranks(EmbeddingScores(img, txt), rel, direction, budget_bytes=4 * 64)
        assert torch.equal(got, want)


def test_agrees_with_clip_benchmark_when_installed():
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(100, 8, generator=g), dim=1)
    t2i = torch.arange(100) // 5
    positive = torch.zeros(100, 20, dtype=torch.bool)
    positive[torch.arange(100), t2i] = True
    scores = txt @ img.T
    m = retrieval_metrics(EmbeddingScores(img, txt), Relevance.build(t2i, 20))
    for k in (1, 5, 10):  # its image_retrieval is mmkit's t2i, its text_retrieval mmkit's i2t
        image_r = (zr.recall_at_k(scores, positive, k) > 0).float().mean().item() * 100
        text_r = (zr.recall_at_k(scores.T, positive.T, k) > 0).float().mean().item() * 100
        assert m[f"t2i_r{k}"] == pytest.approx(image_r) and m[f"i2t_r{k}"] == pytest.approx(text_r)


def test_five_fold_protocol_means_folds_and_rsum_is_the_plain_sum():
    g = torch.Generator().manual_seed(4)
    n_i, per = 10, 3
    sims = torch.randn(n_i, n_i * per, generator=g)
    rel = Relevance.build(torch.arange(n_i * per) // per, n_i)
    m = retrieval_metrics(sims, rel, protocol="1k", fold_size=2, ks=(1, 5, 10))
    assert len(m["folds"]) == 5
    for f, fold in enumerate(m["folds"]):  # each fold is ranked within itself
        rows = slice(2 * f, 2 * f + 2)
        alone = retrieval_metrics(sims[rows, 6 * f:6 * f + 6], Relevance.build(torch.arange(6) // 3, 2))
        assert fold == alone
        six = sum(fold[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
        assert fold["rsum"] == pytest.approx(six)
    assert len({fold["rsum"] for fold in m["folds"]}) > 1  # the folds differ
    for key in ("i2t_r1", "t2i_r5", "i2t_medr", "t2i_meanr"):
        assert m[key] == pytest.approx(np.mean([fold[key] for fold in m["folds"]]))
    six = sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert m["rsum"] == pytest.approx(six)
    assert m["rsum"] == pytest.approx(np.mean([fold["rsum"] for fold in m["folds"]]))
    both = retrieval_metrics(sims, rel, protocol="both", fold_size=2)
    assert both["coco_1k"]["rsum"] == pytest.approx(m["rsum"])
    assert both["rsum"] == retrieval_metrics(sims, rel)["rsum"]  # flat keys: the full ranking


def test_protocol_errors():
    rel = Relevance.build(torch.arange(9) // 3, 3)
    with pytest.raises(MmkitError, match="divisible by 2"):
        retrieval_metrics(torch.zeros(3, 9), rel, protocol="1k", fold_size=2)
    with pytest.raises(MmkitError, match="K = 5 is larger than the gallery"):
        check_ks((1, 5), rel, "full")
    check_ks((1, 3), rel, "full")


def test_relevance_checks():
    with pytest.raises(MmkitError, match=r"f.st: text_to_image: entry 2 is 3, expected 0 <= value < 3"):
        Relevance.build(torch.tensor([0, 1, 3]), 3, source="f.st")
    with pytest.raises(MmkitError, match="image 2 has no relevant caption"):
        Relevance.build(torch.tensor([0, 1, 1]), 3)
    with pytest.raises(MmkitError, match="give both or neither"):
        Relevance.build(torch.tensor([0, 1]), 2, image_group=torch.tensor([0, 1]))
    with pytest.raises(MmkitError, match="1-D integer"):
        Relevance.build(torch.tensor([0.0, 1.0]), 2)


def test_top_k_orders_by_score_then_gallery_index():
    assert top_k(SIMS, "i2t", 3, budget_bytes=4).tolist() == [[0, 2, 4], [0, 1, 2], [0, 1, 2]]
    assert top_k(SIMS, "t2i", 2).tolist() == [[0, 1], [1, 2], [0, 1], [2, 1], [2, 0], [2, 1]]


def test_rerank_on_a_hand_made_shortlist():
    shortlist = torch.tensor([[.9, .8, .7, .6],
                              [.1, .2, .3, .4]])
    itm = torch.tensor([[0., 5., 9., 1.],
                        [7., 7., 2., 3.]])
    rel = Relevance.build(torch.tensor([1, 0, 1, 0]), 2)  # image 0: captions 1, 3; image 1: captions 0, 2
    calls = []

    def itm_fn(i, t):
        calls.append(len(i))
        return itm[i, t]

    i2t, t2i = rerank(shortlist, itm_fn, rel, k=2)
    # image 0: shortlist top 2 = captions 0, 1; ITM 5 > 0 puts caption 1 (relevant) first -> 0
    # image 1: top 2 = captions 3, 2; ITM 3 > 2 keeps caption 3 first, relevant caption 2 second -> 1
    assert i2t.tolist() == [0, 1]
    # t2i (2 images, the whole gallery): caption 0 (image 1): ITM 0 vs 7 -> 0;
    # caption 1 (image 0): 5 vs 7 -> 1; caption 2 (image 1): 9 vs 2 -> 1; caption 3 (image 0): 1 vs 3 -> 1
    assert t2i.tolist() == [0, 1, 1, 1]
    # k = 1: neither image's top caption is relevant, so both keep their shortlist position (1)
    i2t1, _ = rerank(shortlist, lambda i, t: itm[i, t], rel, k=1)
    assert i2t1.tolist() == [1, 1]
    # a relevant caption inside the shortlist outranks what lies beyond it whatever the ITM says
    i2t_low, _ = rerank(shortlist, lambda i, t: -itm[i, t], rel, k=2)
    assert i2t_low.tolist() == [1, 0]
    assert sum(calls) == 8  # every distinct pair scored once (both directions share them)


def test_rerank_ties_use_gallery_index_and_all_equals_the_full_itm_ranking():
    g = torch.Generator().manual_seed(5)
    shortlist = torch.randn(6, 18, generator=g)
    itm = torch.randint(0, 3, (6, 18), generator=g).float()  # ties inside the shortlist
    rel = Relevance.build(torch.arange(18) % 6, 6)
    got = rerank(shortlist, lambda i, t: itm[i, t], rel, k="all", batch_size=7)
    assert torch.equal(got[0], best_ranks(itm, rel, "i2t")) and torch.equal(got[1], best_ranks(itm, rel, "t2i"))
    # k above the gallery is capped: the same as all
    capped = rerank(shortlist, lambda i, t: itm[i, t], rel, k=100)
    assert all(torch.equal(a, b) for a, b in zip(capped, got))


def test_rerank_metrics_map_folds_to_global_indices():
    g = torch.Generator().manual_seed(6)
    shortlist, itm = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    rel = Relevance.build(torch.arange(8) // 2, 4)
    m = rerank_metrics(shortlist, lambda i, t: itm[i, t], rel, k="all", protocol="1k", fold_size=2)
    want = retrieval_metrics(itm, rel, protocol="1k", fold_size=2)
    assert m == want


def test_ensemble_block_is_the_mean_of_each_members_scores():
    g = torch.Generator().manual_seed(7)
    a = EmbeddingScores(torch.randn(5, 4, generator=g), torch.randn(10, 4, generator=g))
    b = EmbeddingScores(torch.randn(5, 6, generator=g), torch.randn(10, 6, generator=g))  # its own width
    full = (a.block("i2t", slice(0, 5), slice(0, 10)) + b.block("i2t", slice(0, 5), slice(0, 10))) / 2
    rel = Relevance.build(torch.arange(10) // 2, 5)
    ens = MeanScores([a, b])
    assert torch.allclose(ens.block("t2i", slice(0, 10), slice(0, 5)), full.T)
    assert retrieval_metrics(ens, rel, budget_bytes=12) == retrieval_metrics(full, rel)


def test_embedding_widths_must_agree():
    with pytest.raises(MmkitError, match="text_embeds have width 3, image_embeds 4"):
        EmbeddingScores(torch.zeros(2, 4), torch.zeros(2, 3))


def test_summarize_medr_floors_the_median():
    ranks = torch.tensor([0, 1, 2, 3])  # 1-based 1..4: median 2.5 -> 2
    m = summarize(ranks, ranks, ks=(1,))
    assert m["i2t_medr"] == 2 and m["i2t_meanr"] == 2.5 and m["i2t_r1"] == 25.0
