"""mmkit/build/mmr.py: paired MMR training data (build.md §5 tests 1-6)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmkit.build import mmr
from mmkit.config import load_config
from mmkit.errors import DataError


@pytest.fixture
def records(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "imgs" / name).write_bytes(b"\xff\xd8 fake " + name.encode())
    rows = [{"id": "q1", "image": "a.jpg", "question": "What colour is the bus?", "answer": "red",
             "distractor": "blue", "category": "attribute"},
            {"id": "q2", "image": "b.jpg", "question": "How many dogs are there?", "answer": "two",
             "premise": "Given the three dogs,", "distractor": "three", "category": "count"},
            {"id": "q3", "image": "c.jpg", "question": "What is the man holding?", "answer": "an umbrella",
             "distractor": "a cane"}]
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(path, tmp_path, **flags):
    return load_config(mmr.MMRConfig, flags={"records": str(path), "image_root": str(tmp_path / "imgs"), **flags})


def load(out, name):
    return json.loads((out / name).read_text(encoding="utf-8"))


def test_template_mode_pairs(records, tmp_path):
    m = mmr.run(cfg(records, tmp_path), str(tmp_path / "o"))
    out = tmp_path / "o"
    pos, neg, merged = load(out, "pos.json"), load(out, "neg.json"), load(out, "merged.json")
    assert [p["id"] for p in pos] == [n["id"] for n in neg] == ["q1", "q2", "q3"]
    assert [p["image"] for p in pos] == [n["image"] for n in neg] == ["a.jpg", "b.jpg", "c.jpg"]
    assert merged == pos + neg
    assert pos[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat colour is the bus?"},
                                       {"from": "gpt", "value": "red"}]
    assert neg[0]["conversations"] == [
        {"from": "human", "value": "<image>\nWhat colour is the bus? Isn't it blue?"},
        {"from": "gpt", "value": "No, it is not blue. The answer is red."}]
    assert neg[1]["conversations"][0]["value"] == "<image>\nGiven the three dogs, How many dogs are there?"
    for item in pos + neg:
        assert sum(t["value"].count("<image>") for t in item["conversations"]) == 1
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs[0] == {"id": "q1", "category": "attribute", "polarity": "pos", "turns": 1, "mode": "template"}
    assert [p["polarity"] for p in pairs] == ["pos"] * 3 + ["neg"] * 3
    assert [s["name"] for s in m["metrics"]["stages"]] == ["generate", "filter", "validate"]
    assert not (out / "prompt.txt").exists()


def test_template_choice_is_seeded_per_item(records, tmp_path):
    yaml = tmp_path / "t.yaml"
    yaml.write_text("templates:\n  pos_question: ['{question}', 'Q: {question}', 'Tell me: {question}']\n",
                    encoding="utf-8")
    c = load_config(mmr.MMRConfig, file=yaml, flags={"records": str(records), "image_root": str(tmp_path / "imgs")})
    mmr.run(c, str(tmp_path / "o"))
    pos = load(tmp_path / "o", "pos.json")
    options = c.templates.pos_question
    for item, q in zip(pos, ["What colour is the bus?", "How many dogs are there?", "What is the man holding?"]):
        chosen = options[mmr.stable_seed(0, item["id"], "pos_question") % 3]
        assert item["conversations"][0]["value"] == "<image>\n" + chosen.format(question=q)


def test_refusal_filter_keeps_sides_aligned():
    item = mmr.Item("x", "i.jpg", None, None, pos=[("q1", "red"), ("q2", "Sorry, I can't tell"), ("q3", "two")],
                    neg=[("n1", "No, red."), ("n2", "No."), ("n3", "It is UNCLEAR")])
    assert mmr.filter_pairs(item, mmr.REFUSALS) == 2
    assert item.pos == [("q1", "red")] and item.neg == [("n1", "No, red.")]
    empty = mmr.Item("y", "i.jpg", None, None, pos=[("q", "I am unable to see")], neg=[("n", "No.")])
    mmr.filter_pairs(empty, mmr.REFUSALS)
    assert empty.pos == [] and empty.neg == []


def test_refusal_drops_item_on_both_sides(records, tmp_path):
    text = records.read_text().replace('"answer": "two"', '"answer": "it is unclear"')
    records.write_text(text)
    m = mmr.run(cfg(records, tmp_path), str(tmp_path / "o"))
    assert [p["id"] for p in load(tmp_path / "o", "pos.json")] == ["q1", "q3"]
    assert [p["id"] for p in load(tmp_path / "o", "neg.json")] == ["q1", "q3"]
    assert m["metrics"]["stages"][1] == {"name": "filter", "in": 3, "kept": 2, "dropped": {"refusal": 1}}


def conv(q="q", a="a"):
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


def test_validation_neg_without_pos_partner():
    pos = [{"id": "a", "image": "1.jpg", "conversations": conv()}]
    neg = [{"id": "a", "image": "1.jpg", "conversations": conv()},
           {"id": "b", "image": "2.jpg", "conversations": conv()}]
    problems = mmr.validate_pairs(pos, neg)
    assert [(i, str(e)) for i, e in problems] == [("b", "neg.json:item 2: id: neg item 'b' has no pos partner")]
    bad = [{"id": "a", "image": "1.jpg", "conversations": [{"from": "human", "value": "q <image>"},
                                                            {"from": "gpt", "value": "a"}]}]
    assert "exactly one <image>" in str(mmr.validate_pairs(bad, pos)[0][1])
    assert mmr.check_conversation([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]) == \
        "turn 0: expected 'human', got 'gpt'"
    assert "exactly the keys" in mmr.check_conversation([{"from": "human", "value": "<image>\nx", "x": 1},
                                                         {"from": "gpt", "value": "y"}])
    image_differs = [{"id": "a", "image": "9.jpg", "conversations": conv()}]
    assert "differs" in str(mmr.validate_pairs(pos, image_differs)[0][1])


def test_missing_answer_is_an_error(records, tmp_path):
    lines = records.read_text().splitlines()
    row = json.loads(lines[1])
    del row["answer"]
    lines[1] = json.dumps(row)
    records.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"recs.jsonl:2: answer: missing field"):
        mmr.run(cfg(records, tmp_path), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_record_without_premise_or_distractor_and_missing_image(records, tmp_path):
    lines = records.read_text().splitlines()
    row = json.loads(lines[2])
    del row["distractor"]
    lines[2] = json.dumps(row)
    records.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"recs.jsonl:3: premise: a record needs a premise or a distractor"):
        mmr.run(cfg(records, tmp_path), str(tmp_path / "o"))
    (tmp_path / "imgs" / "c.jpg").unlink()
    with pytest.raises(DataError, match=r"recs.jsonl:3: image: image file not found"):
        mmr.run(cfg(records, tmp_path), str(tmp_path / "o"))
    m = mmr.run(cfg(records, tmp_path, on_invalid="skip"), str(tmp_path / "o"))
    assert m["metrics"]["stages"][0]["dropped"] == {"missing_image": 1}
    assert not (tmp_path / "o.tmp").exists()


# --------------------------------------------------------------------------- LLM mode, fake server

VALID = {"pos": [{"q": "What colour is the bus?", "a": "Red."}],
         "neg": [{"q": "Why is the bus blue?", "a": "The bus is not blue; it is red."}]}


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1 answering from a script of (status, reply text)."""

    def __init__(self, script):
        self.script, self.posts, self.bodies = list(script), 0, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "fake"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.posts += 1
                owner.bodies.append(body)
                status, text = owner.script.pop(0) if owner.script else (200, json.dumps(VALID))
                if status != 200:
                    self._send(status, {"error": "slow down"})
                    return
                self._send(200, {"choices": [{"message": {"content": text}, "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def one_record(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "imgs" / "a.jpg")
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"id": "q1", "image": "a.jpg", "question": "What colour is the bus?",
                                "answer": "red", "distractor": "blue"}) + "\n", encoding="utf-8")
    return path


def llm_cfg(path, tmp_path, url, **flags):
    return cfg(path, tmp_path, mode="llm", llm_base_url=url, llm_model="fake", work_dir=str(tmp_path / "work"),
               **flags)


def test_llm_retry_after_malformed_then_cache(one_record, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = FakeServer([(200, "I think the bus is red"), (200, "```json\n" + json.dumps(VALID) + "\n```")])
    try:
        m = mmr.run(llm_cfg(one_record, tmp_path, server.url), str(tmp_path / "o"))
        assert server.posts == 2
        assert server.bodies[0]["temperature"] == 0.0 and server.bodies[0]["max_tokens"] == 1024
        neg = load(tmp_path / "o", "neg.json")
        assert neg[0]["conversations"] == [{"from": "human", "value": "<image>\nWhy is the bus blue?"},
                                           {"from": "gpt", "value": "The bus is not blue; it is red."}]
        assert (tmp_path / "o" / "prompt.txt").read_text() == mmr.PROMPT
        assert any(o["path"] == "prompt.txt" for o in m["outputs"])
        assert m["models"] == {"llm": {"id": "fake", "revision": None}}
        assert len(list((tmp_path / "work" / "llm-cache").glob("*.json"))) == 2
        mmr.run(llm_cfg(one_record, tmp_path, server.url), str(tmp_path / "o2"))
        assert server.posts == 2  # the rerun is answered from the cache
        assert (tmp_path / "o2" / "neg.json").read_bytes() == (tmp_path / "o" / "neg.json").read_bytes()
    finally:
        server.close()


def test_llm_unparseable_after_three_attempts(one_record, tmp_path):
    server = FakeServer([(200, "no"), (200, "{}"), (200, '{"pos": [], "neg": []}')])
    try:
        m = mmr.run(llm_cfg(one_record, tmp_path, server.url, on_invalid="skip"), str(tmp_path / "o"))
        assert server.posts == 3
        assert m["metrics"]["stages"][0]["dropped"] == {"llm_unparseable": 1}
        assert load(tmp_path / "o", "pos.json") == []
    finally:
        server.close()


def test_llm_429_is_retried_with_backoff(one_record, tmp_path, monkeypatch):
    delays = []
    monkeypatch.setattr(time, "sleep", delays.append)
    server = FakeServer([(429, ""), (200, json.dumps(VALID))])
    try:
        mmr.run(llm_cfg(one_record, tmp_path, server.url, llm_vision=True), str(tmp_path / "o"))
        assert server.posts == 2
        assert len(delays) == 1 and 0.5 <= delays[0] <= 1.0  # min(30, 2^0) x U(0.5, 1)
        parts = server.bodies[-1]["messages"][0]["content"]
        assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:")
        assert len(load(tmp_path / "o", "pos.json")) == 1
    finally:
        server.close()


def test_parse_reply():
    assert mmr.parse_reply("```json\n" + json.dumps(VALID) + "\n```", 1) == (
        [("What colour is the bus?", "Red.")], [("Why is the bus blue?", "The bus is not blue; it is red.")])
    assert mmr.parse_reply(json.dumps({"pos": VALID["pos"], "neg": []}), 1) is None
    assert mmr.parse_reply(json.dumps({"pos": [{"q": "x"}], "neg": VALID["neg"]}), 1) is None
    assert mmr.parse_reply("not json", 1) is None


def test_llm_dry_run_makes_no_calls(one_record, tmp_path):
    m = mmr.run(llm_cfg(one_record, tmp_path, "http://127.0.0.1:9/v1", dry_run=True), str(tmp_path / "o"))
    assert m["dry_run"] and m["metrics"]["stages"] == [{"name": "read", "in": 1, "kept": 1, "dropped": {}}]
    assert not (tmp_path / "o").exists() and not (tmp_path / "work").exists()
