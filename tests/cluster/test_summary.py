"""mmkit/cluster/summary.py: the summary.json blocks (cluster.md §6; §10 item 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmkit.cluster import summary as S
from mmkit.cluster.records import load_records

CODE = ["Write a python function to sort a list", "Fix this python error in my script",
        "Explain python decorators with code", "How do I read a file in python",
        "Write python code that parses json", "Python list comprehension example code"]
FOOD = ["Give me a recipe for chocolate cake", "How long do I bake bread",
        "A recipe for tomato soup please", "How do I bake a cake without eggs",
        "Best recipe for pancakes to bake", "How to bake cookies for a party"]


def orthogonal_embeddings(groups: int = 3, per_group: int = 8, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Every member of group g is the unit vector e_g."""
    labels = np.repeat(np.arange(groups), per_group)
    return np.eye(d, dtype=np.float32)[labels], labels


def test_within_batch_cosine_orthogonal_groups():
    emb, labels = orthogonal_embeddings()
    grouped = np.stack([np.flatnonzero(labels == g)[:4] for g in range(3)] +
                       [np.flatnonzero(labels == g)[4:] for g in range(3)])
    assert S.within_batch_cosine(emb, grouped) == 1.0
    # Batch 1: groups (0, 0, 1, 2) -> 1 equal pair of 6 -> 1/6. Batch 2: (0, 1, 1, 1) -> 3 of 6 -> 1/2.
    random = np.array([[0, 1, 8, 16], [2, 9, 10, 11]])
    assert S.within_batch_cosine(emb, random) == pytest.approx((1 / 6 + 1 / 2) / 2, abs=1e-12)
    # Any leading shape [S, A, W, B] is flattened into batches; unnormalised rows are normalised.
    assert S.within_batch_cosine(3 * emb, random.reshape(2, 1, 1, 4)) == pytest.approx(1 / 3, abs=1e-12)
    assert S.within_batch_cosine(emb, np.zeros((0, 4), dtype=np.int64)) is None
    assert S.within_batch_cosine(emb, np.array([[0], [1]])) is None


def test_within_batch_cosine_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 7)).astype(np.float32)
    batches = rng.permutation(48).reshape(6, 8)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    naive = np.mean([np.mean([unit[i] @ unit[j] for i in b for j in b if i < j]) for b in batches])
    assert S.within_batch_cosine(emb, batches) == pytest.approx(naive, abs=1e-6)


def test_padding_fraction():
    lengths = np.array([10, 10, 5, 1, 4, 0])
    assert S.padding_fraction(lengths, np.array([[0, 1], [2, 3]])) == pytest.approx((0 + (1 - 6 / 10)) / 2)
    assert S.padding_fraction(lengths, np.array([[5, 5]])) == 0.0
    assert S.padding_fraction(lengths, np.zeros((0, 2), dtype=np.int64)) is None


def test_top_words_python_first_in_the_code_group():
    texts = CODE + FOOD
    labels = np.repeat([0, 1], 6)
    words = S.top_words(texts, labels, 2)
    assert words[0][0] == "python" and words[1][0] in {"bake", "recipe"}
    assert "python" not in words[1] and len(words[0]) <= 10
    assert S.top_words(["a b", "c d"], np.array([0, 1]), 2) == [[], []]  # min_df=3 leaves nothing


def test_top_words_formula_on_a_hand_example():
    texts = ["apple apple banana", "apple banana", "banana cherry", "cherry cherry banana", "apple cherry"]
    labels = np.array([0, 0, 0, 1, 1])
    # Counts: g0 apple 3, banana 3, cherry 1 (7 words); g1 apple 1, banana 1, cherry 3 (5 words); avg 6.
    idf = {"apple": np.log(1 + 6 / 4), "banana": np.log(1 + 6 / 4), "cherry": np.log(1 + 6 / 4)}
    score_g1 = {"apple": 1 / 5 * idf["apple"], "banana": 1 / 5 * idf["banana"], "cherry": 3 / 5 * idf["cherry"]}
    assert S.top_words(texts, labels, 2, n=3)[1] == sorted(score_g1, key=lambda w: (-score_g1[w], w))
    assert S.top_words(texts, labels, 2, n=3)[0] == ["apple", "banana", "cherry"]  # tie: alphabetical


def test_group_examples_nearest_and_seeded_random():
    emb = np.array([[1, 0], [0.6, 0.8], [0.8, 0.6], [0, 1], [0.95, 0.31], [0.1, 0.99]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 0, -1])
    centroids = np.array([[1, 0], [0, 1]], dtype=np.float32)
    assert S.group_examples(labels, 2, embeddings=emb, centroids=centroids) == [[0, 4, 2], [3]]
    random = S.group_examples(labels, 2, seed=7)
    assert random == S.group_examples(labels, 2, seed=7) and random[1] == [3]
    assert sorted(random[0]) == sorted(set(random[0])) and set(random[0]) <= {0, 1, 2, 4}
    key = np.random.default_rng(np.random.SeedSequence([7, 4])).random(6)
    assert random[0] == sorted([0, 1, 2, 4], key=lambda i: key[i])[:3]


def test_silhouette_and_length_stats():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 4)).astype(np.float32)
    labels = np.repeat([0, 1, -1], [15, 15, 10])
    score, used = S.silhouette(emb, labels, sample=5000)
    assert used == 30 and score == pytest.approx(silhouette_score(emb[:30], labels[:30], metric="cosine"))
    sampled, used = S.silhouette(emb, labels, seed=1, sample=12)
    rows = np.sort(np.random.default_rng(np.random.SeedSequence([1, 3])).choice(np.arange(30), 12, replace=False))
    assert used == 12 and sampled == pytest.approx(silhouette_score(emb[rows], labels[rows], metric="cosine"))
    assert S.silhouette(emb, np.zeros(40, dtype=np.int64)) == (None, None)
    assert S.silhouette(None, labels) == (None, None)
    stats = S.length_stats(np.array([5, 1, 3, 10, 7, 100]), np.array([0, 0, 0, 1, 1, -1]), 3)
    assert stats == [{"min": 1.0, "median": 3.0, "mean": 3.0, "max": 5.0},
                     {"min": 7.0, "median": 8.5, "mean": 8.5, "max": 10.0}, None]


def test_build_summary_has_the_section_6_keys(tmp_path):
    rows = [{"instruction": t, "output": "x " * (i + 1)} for i, t in enumerate(CODE + FOOD)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(str(path))
    emb, _ = orthogonal_embeddings(2, 6, 4)
    labels = np.repeat([0, 1], 6)
    lengths = np.arange(1, 13)
    grouped = np.array([[0, 1], [6, 7]])
    random = np.array([[0, 6], [1, 7]])
    summary = S.build_summary(
        records=records, metric="embedding", labels=labels, names=["e00", "e01"], k_requested=2,
        params={"k": 2}, small_groups={"U": None, "policy": "merge", "groups": [], "examples": 0},
        centroids=np.eye(4, dtype=np.float32)[:2], embeddings=emb, lengths=lengths, grouped_batches=grouped,
        random_batches=random, batch_size=2, inertia=0.0, timings={"total": 1.0}, argv=["x"], seed=0,
        kmeans={"backend": "sklearn", "init": "kmeans++", "iters": 20, "redo": 1, "seed": 0, "objective_per_iter": []})
    assert list(summary) == ["mmkit_version", "argv", "metric", "params", "source", "k_requested", "k_effective",
                             "groups", "small_groups", "quality", "kmeans", "timings_s", "versions"]
    assert set(summary["source"]) >= {"path", "format", "n_records", "n_skipped", "sha256"}
    group = summary["groups"][0]
    assert set(group) == {"id", "name", "size", "share", "length_tokens", "top_words", "examples",
                          "mean_cos_to_centroid", "merged_from"}
    assert group["size"] == 6 and group["share"] == 0.5 and group["top_words"][0] == "python"
    assert group["mean_cos_to_centroid"] == pytest.approx(1.0) and len(group["examples"]) == 3
    assert set(group["examples"][0]) == {"row", "instruction", "output"}
    assert group["length_tokens"] == {"min": 1.0, "median": 3.5, "mean": 3.5, "max": 6.0}
    quality = summary["quality"]
    assert quality["within_batch_cosine"] == {"batch_size": 2, "grouped": 1.0, "random": 0.0}
    assert quality["padding_fraction"]["grouped"] == pytest.approx(((1 - 3 / 4) + (1 - 15 / 16)) / 2)
    assert quality["silhouette_cosine"] == pytest.approx(1.0) and quality["silhouette_sample"] == 12
    assert set(summary["versions"]) == {"python", "numpy", "torch", "transformers", "faiss", "sklearn"}
    json.dumps(summary)  # plain JSON types only

    by_length = S.build_summary(records=records, metric="length", labels=labels, names=["len[1-6]", "len[7-12]"],
                                k_requested=2, params={}, small_groups={}, lengths=lengths)
    assert by_length["groups"][1]["range"] == [7, 12] and "mean_cos_to_centroid" not in by_length["groups"][1]
    assert by_length["quality"]["silhouette_cosine"] is None and by_length["kmeans"] is None
    assert by_length["quality"]["padding_fraction"] == {"grouped": None, "random": None}
