"""mmkit/cluster/metrics.py: Task, Embedding and Length grouping (cluster.md §3; §10 items 7-10)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmkit.cluster.metrics import (
    METRICS,
    MetricOptions,
    count_tokens,
    edge_buckets,
    length_groups,
    quantile_buckets,
    renumber_clusters,
)
from mmkit.cluster.records import RecordFields, load_records
from mmkit.errors import DataError, MmkitError

#: 4 well-separated topics x 6 near-paraphrase prompts. Measured with MiniLM: every within-topic
#: cosine >= 0.61, every cross-topic cosine <= 0.31.
TOPICS = {
    "cake": ["How do I bake a chocolate cake?", "How should I bake a chocolate cake at home?",
             "What is the easiest way to bake a chocolate cake?", "Give me a simple recipe to bake a chocolate cake.",
             "Explain how to bake a chocolate cake step by step.", "Tips for baking a moist chocolate cake?"],
    "python": ["How do I sort a list in Python?", "How can I sort a Python list of numbers?",
               "What is the easiest way to sort a list in Python?", "Show me Python code to sort a list.",
               "Explain how to sort a list in Python step by step.", "How do I sort a list of strings in Python?"],
    "mars": ["Why is the planet Mars red?", "What makes the planet Mars look red?",
             "Why does Mars appear red in the night sky?", "Explain why the surface of Mars is red.",
             "What gives the planet Mars its red color?", "Why is Mars called the Red Planet?"],
    "soccer": ["What is the offside rule in soccer?", "Explain the offside rule in soccer.",
               "How does the offside rule work in football?", "When is a soccer player offside?",
               "Explain offside in soccer step by step.", "What does offside mean in a soccer match?"],
}


def records_of(tmp_path, rows, name="d.jsonl", **kwargs):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_records(str(path), **kwargs)


def rows_with_outputs(outputs, **extra):
    return [{"instruction": f"prompt {i}", "output": out, **extra} for i, out in enumerate(outputs)]


def test_registry_names():
    assert set(METRICS) >= {"task", "embedding", "length"}
    with pytest.raises(MmkitError, match="--metric: unknown metric 'lenght'.*'length'"):
        METRICS.resolve("lenght", field="--metric")


# --------------------------------------------------------------------------- length (item 7)


def groups_sizes(lengths, k):
    labels, names, _ = length_groups(np.asarray(lengths), quantile_buckets(np.asarray(lengths), k))
    return np.bincount(labels).tolist(), names


def test_mid_rank_quantile_buckets():
    assert groups_sizes(np.arange(1, 101), 4) == ([25] * 4, ["len[1-25]", "len[26-50]", "len[51-75]", "len[76-100]"])
    assert groups_sizes([3] * 10 + [7] * 2, 4) == ([10, 2], ["len[3-3]", "len[7-7]"])
    assert groups_sizes([3] + [7] * 11, 4) == ([1, 11], ["len[3-3]", "len[7-7]"])
    shuffled = np.random.default_rng(0).permutation(np.arange(1, 101))
    labels, _, ranges = length_groups(shuffled, quantile_buckets(shuffled, 4))
    np.testing.assert_array_equal(labels, (shuffled - 1) // 25)
    assert ranges == [[1, 25], [26, 50], [51, 75], [76, 100]]


def test_fixed_edges_are_closed_on_the_left():
    assert edge_buckets(np.array([5, 10, 15, 20, 25]), [10, 20]).tolist() == [0, 1, 1, 2, 2]
    labels, names, _ = length_groups(np.array([5, 6, 30]), edge_buckets(np.array([5, 6, 30]), [10, 20]))
    assert labels.tolist() == [0, 0, 1] and names == ["len[5-6]", "len[30-30]"]  # empty bucket removed
    for bad in ([20, 10], [10, 10], []):
        with pytest.raises(MmkitError, match="--length-edges: must be a strictly increasing"):
            edge_buckets(np.array([1]), bad)


def test_length_metric_constant_lengths_warn_and_edges_override_k(tmp_path, caplog):
    view = records_of(tmp_path, rows_with_outputs(["two words"] * 6))
    with caplog.at_level("WARNING", logger="mmkit"):
        result = METRICS["length"](view, MetricOptions(tokenizer="whitespace"))
    assert result.names == ["len[2-2]"] and result.labels.tolist() == [0] * 6
    assert "1 of 8 are non-empty" in caplog.text
    view = records_of(tmp_path, rows_with_outputs(["a " * n for n in (5, 10, 15, 20, 25)]))
    result = METRICS["length"](view, MetricOptions(tokenizer="whitespace", k=2, length_edges=(10, 20)))
    assert result.labels.tolist() == [0, 1, 1, 2, 2] and result.extra["mode"] == "edges"
    assert result.extra["ranges"] == [[5, 5], [10, 15], [20, 25]] and result.centroids is None


def test_length_needs_a_loadable_tokenizer(tmp_path):
    view = records_of(tmp_path, rows_with_outputs(["x"] * 3))
    with pytest.raises(MmkitError, match="^--tokenizer: the length metric needs a tokenizer"):
        METRICS["length"](view, MetricOptions())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(MmkitError) as err:
        METRICS["length"](view, MetricOptions(tokenizer=str(broken)))
    assert str(err.value).startswith(f"{broken}: --tokenizer: cannot load the tokenizer") and "\n" not in str(err.value)
    with pytest.raises(MmkitError, match="no such model directory"):
        METRICS["length"](view, MetricOptions(tokenizer=str(tmp_path / "missing")))


def test_hf_tokenizer_counts_sum_over_turns(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [{"conversations": [{"from": "human", "value": "a dog"}, {"from": "gpt", "value": "a man riding a horse"},
                               {"from": "human", "value": "more"}, {"from": "gpt", "value": "two cats"}]},
            {"instruction": "a cat", "output": "a woman holding an umbrella"}]
    view = records_of(tmp_path, rows)
    result = METRICS["length"](view, MetricOptions(tokenizer=tiny_bert, k=2))
    per_text = [len(tok(t, add_special_tokens=False).input_ids) for t in
                ("a man riding a horse", "two cats", "a woman holding an umbrella")]
    assert result.extra["lengths"].tolist() == [per_text[0] + per_text[1], per_text[2]]
    prompt = METRICS["length"](view, MetricOptions(tokenizer=tiny_bert, length_of="prompt")).extra["lengths"]
    assert prompt.tolist() == [len(tok("a dog", add_special_tokens=False).input_ids) + 1,
                               len(tok("a cat", add_special_tokens=False).input_ids)]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    directory, gguf_file = smollm2_gguf
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def test_smollm2_gguf_token_counts(smollm2_tokenizer):
    texts = ["Hello, world!", "def add(a, b):\n    return a + b", "Ünïcödé and emoji 🙂", "word " * 3000, " "]
    expected = [len(smollm2_tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    assert count_tokens(smollm2_tokenizer, texts).tolist() == expected
    assert count_tokens(smollm2_tokenizer, texts, chunk=2).tolist() == expected
    assert expected[3] >= 3000  # no truncation


# --------------------------------------------------------------------------- task (item 8)


def test_task_ids_follow_byte_order_and_k_is_an_error(tmp_path):
    tasks = ["b", "é", "B", "a", "b ", " a", "aa"]
    view = records_of(tmp_path, [{"instruction": "x", "output": "y", "task": t} for t in tasks], need_task=True)
    result = METRICS["task"](view, MetricOptions())
    assert result.names == ["B", "a", "aa", "b", "é"]
    assert result.labels.tolist() == [3, 4, 0, 1, 3, 1, 2] and result.labels.dtype == np.int64
    sub = records_of(tmp_path, [{"instruction": "x", "output": "y", "task": t} for t in ("b", "aa")], need_task=True)
    assert METRICS["task"](sub, MetricOptions()).names == ["aa", "b"]  # stable under subsampling
    with pytest.raises(MmkitError, match="^--k: has no meaning with --metric task"):
        METRICS["task"](view, MetricOptions(k=4))


def test_task_from_file_orders_2_before_10(tmp_path):
    root = tmp_path / "tasks"
    root.mkdir()
    for name in ("10.json", "2.json", "1.jsonl"):
        rows = [{"instruction": f"{name} {i}", "output": "y"} for i in range(2)]
        text = json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
        (root / name).write_text(text)
    result = METRICS["task"](load_records(str(root), RecordFields(task_from="file")), MetricOptions())
    assert result.names == ["1", "2", "10"] and result.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_task_missing_label_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"instruction": "x", "output": "y", "task": "a"}] * 2 + [{"instruction": "x", "output": "y"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_records("data.jsonl", need_task=True)
    assert str(err.value).startswith("data.jsonl:3: task: a non-empty string (field missing; see --task-field")


# --------------------------------------------------------------------------- embedding (items 9, 10)


def test_renumber_by_size_ties_by_first_member_and_drop_empty():
    assignments = np.array([3, 1, 1, 3, 0, 4, 4, 0])  # sizes: 0->2, 1->2, 2->0, 3->2, 4->2
    centroids = np.arange(5, dtype=np.float32)[:, None] * np.ones((5, 2), dtype=np.float32)
    labels, kept = renumber_clusters(assignments, 5, centroids)
    assert labels.tolist() == [0, 1, 1, 0, 2, 3, 3, 2]  # ties: first members at rows 0, 1, 4, 5
    np.testing.assert_array_equal(kept[:, 0], [3, 1, 0, 4])
    labels, kept = renumber_clusters(np.array([2, 0, 0, 2, 2]), 4, None)
    assert labels.tolist() == [0, 1, 1, 0, 0] and kept is None
    again, _ = renumber_clusters(np.array([2, 0, 0, 2, 2]), 4, None)
    np.testing.assert_array_equal(again, labels)


def test_embedding_metric_with_tiny_bert(tmp_path, tiny_bert):
    words = ["a dog", "a cat", "two cats", "a man riding a horse", "a red car", "what is there", "a woman"]
    view = records_of(tmp_path, [{"instruction": w, "output": "y"} for w in words])
    options = MetricOptions(encoder=tiny_bert, k=3, cache_dir=str(tmp_path / "cache"), progress=False)
    result = METRICS["embedding"](view, options)
    assert result.labels.dtype == np.int64 and result.names == ["e00", "e01", "e02"][:result.k_effective]
    sizes = np.bincount(result.labels)
    assert (np.diff(sizes) <= 0).all() and result.centroids.shape == (result.k_effective, 32)
    assert result.centroids.dtype == np.float32
    emb = result.extra["embeddings"]
    assert emb.shape == (7, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert result.extra["kmeans"]["iters"] == 20 and result.extra["inertia"] > 0
    again = METRICS["embedding"](view, options)
    assert again.extra["encoder"]["cache_hit"]
    np.testing.assert_array_equal(again.labels, result.labels)
    for k in (0, 8):
        with pytest.raises(MmkitError, match="^--k: must be between 1 and the number of records"):
            METRICS["embedding"](view, MetricOptions(encoder=tiny_bert, k=k))
    same = records_of(tmp_path, [{"instruction": "a dog", "output": "y"}] * 4)
    with pytest.raises(MmkitError, match="^--k: k=3 is more than the 1 distinct rows"):
        METRICS["embedding"](same, MetricOptions(encoder=tiny_bert, k=3, use_cache=False, progress=False))


def test_minilm_recovers_four_topics(tmp_path, minilm_path):
    from sklearn.metrics import adjusted_rand_score

    rows = [{"instruction": text, "output": "y"} for texts in TOPICS.values() for text in texts]
    truth = np.repeat(np.arange(4), 6)
    # redo 10: k-means++ on 6-point clusters sometimes seeds two centroids in one topic.
    options = MetricOptions(encoder=minilm_path, k=4, kmeans_redo=10, cache_dir=str(tmp_path / "cache"),
                            progress=False)
    result = METRICS["embedding"](records_of(tmp_path, rows), options)
    assert adjusted_rand_score(truth, result.labels) == 1.0
    emb = result.extra["embeddings"]
    sims = emb @ emb.T
    same = truth[:, None] == truth[None, :]
    assert sims[same].min() - sims[~same].max() > 0.25  # the margin
    assert result.names == ["e00", "e01", "e02", "e03"] and result.labels[0] == 0  # ties: first member
