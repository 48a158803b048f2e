"""mmkit/core/backends.py: the OpenAI-compatible backend against a fake server (evaluate.md §2.2, §9),
the predictions backend (§2.3) and the local hf backend on tiny LLaVA (§2.1, §2.4)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest

from mmkit.core.backends import (BackendConfig, GenerationSettings, OpenAIBackend, PredictionsBackend, Request,
                                 backoff_delay, image_data_url, logsumexp, parse_retry_after, word_token_ids)
from mmkit.errors import DataError, MmkitError

Reply = tuple[int, dict[str, str], Any]


def ok_reply(text: Any, finish: str = "stop", n: int = 1, **extra: Any) -> Reply:
    """A 200 chat-completions answer with ``n`` choices of ``text`` (None = null content)."""
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish, **extra}
               for i in range(n)]
    return 200, {}, {"choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 1}}


class FakeServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 (port 0): ``reply(body) -> (status, headers, json or bytes)``
    for each POST /v1/chat/completions; ``GET /v1/models`` lists one model. Records bodies and headers
    and the largest number of requests in flight; ``delay`` seconds before answering."""

    def __init__(self, reply: Callable[[dict[str, Any]], Reply], delay: float = 0.0, models_status: int = 200):
        self.reply, self.delay, self.models_status = reply, delay, models_status
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, headers: dict[str, str], payload: Any) -> None:
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                server.headers.append(dict(self.headers))
                self._send(server.models_status, {}, {"data": [{"id": "served-model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    status, headers, payload = server.reply(body)
                    self._send(status, headers, payload)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def scripted(*replies: Reply) -> Callable[[dict[str, Any]], Reply]:
    """Replies in order (the last one repeats)."""
    queue = list(replies)
    return lambda body: queue.pop(0) if len(queue) > 1 else queue[0]


def backend(server: FakeServer, sleeps: list[float] | None = None, **cfg: Any) -> OpenAIBackend:
    """An openai backend on ``server`` whose sleeps are recorded, not slept, with jitter fixed at 1."""
    record = sleeps if sleeps is not None else []
    return OpenAIBackend(BackendConfig(kind="openai", base_url=server.url, **cfg), "served-model",
                         sleep=record.append, jitter=lambda: 1.0)


def req(uid: str = "u1", text: str = "hello", **kw: Any) -> Request:
    return Request(uid=uid, text=text, max_new_tokens=7, **kw)


@pytest.fixture
def png(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "fixture.png"
    Image.new("RGB", (6, 4), (10, 20, 30)).save(path)
    return path


# --------------------------------------------------------------------------- request shape


def test_body_shape_and_the_data_url_decodes_to_the_image_bytes(png):
    with FakeServer(lambda body: ok_reply([{"type": "text", "text": " A "}, {"type": "text", "text": "B"}])) as server:
        b = backend(server, system_prompt=None)
        lines = list(b.answer([req(images=(str(png),))], GenerationSettings()))
    body = server.bodies[0]
    assert body["model"] == "served-model" and body["max_tokens"] == 7
    assert (body["temperature"], body["top_p"], body["n"], body["seed"]) == (0.0, 1.0, 1, 0)
    assert [m["role"] for m in body["messages"]] == ["user"]
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": "hello"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == png.read_bytes()
    assert lines[0]["prediction"] == "A B" and lines[0]["error"] is None and lines[0]["finish_reason"] == "stop"
    assert lines[0]["usage"] == {"prompt_tokens": 5, "completion_tokens": 1}
    assert b.describe()["server_models"] == ["served-model"]


def test_settings_temperature_top_p_and_n_reach_the_body():
    with FakeServer(lambda body: ok_reply("x", n=body["n"])) as server:
        lines = list(backend(server).answer([req()], GenerationSettings(max_new_tokens=3, temperature=0.7,
                                                                         top_p=0.9, n=2)))
    body = server.bodies[0]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["n"]) == (3, 0.7, 0.9, 2)
    assert lines[0]["prediction"] == ["x", "x"]


def test_null_content_is_empty_and_interleaved_parts_keep_their_order(png):
    with FakeServer(lambda body: ok_reply(None)) as server:
        r = Request.from_parts("u", [("text", "图1："), ("image", str(png)), ("text", "问题")], max_new_tokens=4)
        line = next(backend(server, system_prompt="be brief").answer([r], GenerationSettings()))
    messages = server.bodies[0]["messages"]
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert [p["type"] for p in messages[1]["content"]] == ["text", "image_url", "text"]
    assert line["prediction"] == "" and line["error"] is None


def test_authorization_only_when_the_variable_is_set_and_the_key_is_in_no_file(tmp_path, png, monkeypatch):
    from mmkit.evaluate.run import evaluate
    from tests.evaluate.test_run import toy_cfg, write_toy_data

    monkeypatch.setitem(__import__("mmkit.evaluate", fromlist=["BENCHMARKS"]).BENCHMARKS, "toy",
                        __import__("tests.evaluate.test_run", fromlist=["TOY"]).TOY)
    secret = "sk-test-5ecret-Key-123"
    data = write_toy_data(tmp_path / "d", n=2, images=True)
    with FakeServer(lambda body: ok_reply("w0")) as server:
        monkeypatch.setenv("MY_KEY", secret)
        cfg = toy_cfg(data, backend=BackendConfig(base_url=server.url, model=["m"], api_key_env="MY_KEY"))
        evaluate("toy", cfg, tmp_path / "with")
        assert all(h.get("Authorization") == f"Bearer {secret}" for h in server.headers)
        n = len(server.headers)
        monkeypatch.delenv("MY_KEY")
        evaluate("toy", cfg, tmp_path / "without")
        assert all("Authorization" not in h for h in server.headers[n:]) and len(server.headers) > n
    for path in (tmp_path / "with").rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(encoding="utf-8", errors="replace"), path
    assert "MY_KEY" in (tmp_path / "with" / "config.yaml").read_text()


# --------------------------------------------------------------------------- retries and errors


def test_429_with_retry_after_then_success_waits_retry_after():
    sleeps: list[float] = []
    with FakeServer(scripted((429, {"Retry-After": "7"}, {"error": "slow down"}), ok_reply("fine"))) as server:
        line = next(backend(server, sleeps).answer([req()], GenerationSettings()))
    assert line["prediction"] == "fine" and line["error"] is None
    assert sleeps == [7.0]  # Retry-After 7 > min(30, 2^0) x 1
    assert len(server.bodies) == 2


def test_500_is_retried_with_exponential_backoff_and_400_is_not():
    sleeps: list[float] = []
    with FakeServer(scripted((500, {}, b"boom"), (503, {}, b"busy"), ok_reply("ok"))) as server:
        line = next(backend(server, sleeps).answer([req()], GenerationSettings()))
    assert line["prediction"] == "ok" and sleeps == [1.0, 2.0]
    sleeps.clear()
    with FakeServer(scripted((400, {}, {"error": {"message": "too many images"}}))) as server:
        line = next(backend(server, sleeps).answer([req()], GenerationSettings()))
    assert len(server.bodies) == 1 and sleeps == []
    assert line["error"].startswith("HTTP 400: ") and "too many images" in line["error"]
    with FakeServer(scripted((500, {}, b"boom"))) as server:
        line = next(backend(server, sleeps, max_retries=2).answer([req()], GenerationSettings()))
    assert len(server.bodies) == 3 and line["error"] == "HTTP 500: boom (after 3 attempts)"


def test_backoff_formula_and_retry_after_parsing():
    assert [backoff_delay(n, 1.0) for n in (1, 2, 3, 5, 6, 7)] == [1, 2, 4, 16, 30, 30]
    assert backoff_delay(3, 0.5) == 2.0 and backoff_delay(1, 0.5, retry_after=0.2) == 0.5
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_abort_naming_the_variable_never_the_key(status, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-shown")
    with FakeServer(scripted((status, {}, {"error": "bad key sk-never-shown"}))) as server:
        with pytest.raises(MmkitError) as err:
            list(backend(server).answer([req("a"), req("b")], GenerationSettings()))
    assert "$OPENAI_API_KEY" in str(err.value) and "sk-never-shown" not in str(err.value)
    assert "\n" not in str(err.value)


def test_in_flight_requests_never_exceed_concurrency():
    with FakeServer(lambda body: ok_reply(body["messages"][0]["content"][-1]["text"]), delay=0.05) as server:
        lines = list(backend(server, concurrency=3).answer([req(f"u{i}", f"t{i}") for i in range(12)],
                                                           GenerationSettings()))
    assert server.max_in_flight <= 3
    assert sorted(x["uid"] for x in lines) == sorted(f"u{i}" for i in range(12))
    assert all(x["prediction"] == "t" + x["uid"][1:] for x in lines)


def test_a_timeout_is_retried_then_stored_as_the_error():
    sleeps: list[float] = []
    with FakeServer(lambda body: ok_reply("late"), delay=1.0) as server:
        line = next(backend(server, sleeps, timeout=0.2, max_retries=1).answer([req()], GenerationSettings()))
    assert line["error"] == "timed out after 0.2 s (after 2 attempts)" and sleeps == [1.0]


@pytest.mark.parametrize("payload", [b"not json", {"choices": []}, {"choices": [{"message": {"content": 3}}]}])
def test_a_malformed_response_is_a_per_sample_error(payload):
    with FakeServer(scripted((200, {}, payload))) as server:
        lines = list(backend(server).answer([req("a"), req("b")], GenerationSettings()))
    assert len(server.bodies) == 2  # not retried
    assert all(x["error"].startswith("malformed response") and x["prediction"] == "" for x in lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_base_url_where_nothing_listens_is_one_line_naming_it():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    b = OpenAIBackend(BackendConfig(kind="openai", base_url=url), "m", sleep=lambda s: None)
    with pytest.raises(MmkitError) as err:
        list(b.answer([req()], GenerationSettings()))
    assert f"cannot reach the server at {url}" in str(err.value) and "\n" not in str(err.value)


def test_an_interrupted_run_resumes_and_the_server_sees_only_the_rest(tmp_path, monkeypatch):
    from mmkit.evaluate import BENCHMARKS
    from mmkit.evaluate.run import evaluate
    from mmkit.io import Predictions
    from tests.evaluate.test_run import TOY, toy_cfg, write_toy_data

    monkeypatch.setitem(BENCHMARKS, "toy", TOY)
    data, out = write_toy_data(tmp_path / "d", n=6), tmp_path / "run"
    real_append = Predictions.append

    def append_then_stop(self, record):
        real_append(self, record)
        if len(self.done) == 2:
            raise KeyboardInterrupt

    with FakeServer(lambda body: ok_reply(body["messages"][0]["content"][-1]["text"].split()[-1])) as server:
        cfg = toy_cfg(data, backend=BackendConfig(base_url=server.url, model=["m"], concurrency=1))
        monkeypatch.setattr(Predictions, "append", append_then_stop)
        with pytest.raises(KeyboardInterrupt):
            evaluate("toy", cfg, out)
        monkeypatch.setattr(Predictions, "append", real_append)
        first = [b["messages"][0]["content"][-1]["text"] for b in server.bodies]
        res = evaluate("toy", cfg, out)
    rest = [b["messages"][0]["content"][-1]["text"] for b in server.bodies[len(first):]]
    assert first[:2] == ["q0 is w0", "q1 is w1"]
    assert rest == [f"q{i} is w{i}" for i in range(2, 6)]
    assert res["complete"] is True and res["metrics"]["accuracy"] == 100.0


def test_first_token_logprobs_over_http_sum_the_matching_top_tokens():
    top = [{"token": "Yes", "logprob": -0.5}, {"token": " yes", "logprob": -1.5}, {"token": "No", "logprob": -2.0},
           {"token": "maybe", "logprob": -3.0}]
    reply = ok_reply("Yes", logprobs={"content": [{"token": "Yes", "logprob": -0.5, "top_logprobs": top}]})
    with FakeServer(scripted(reply)) as server:
        line = next(backend(server, logprobs=True).answer([req(logprob_words=("yes", "no", "unsure"))],
                                                          GenerationSettings()))
    assert server.bodies[0]["logprobs"] is True and server.bodies[0]["top_logprobs"] == 20
    assert line["logprobs"]["yes"] == pytest.approx(logsumexp([-0.5, -1.5]))
    assert line["logprobs"]["no"] == -2.0 and line["logprobs"]["unsure"] is None


def test_image_data_url_reencodes_other_formats_as_png_and_downsizes(tmp_path):
    from PIL import Image

    bmp = tmp_path / "x.bmp"
    Image.new("RGB", (40, 20), (1, 2, 3)).save(bmp)
    url = image_data_url(str(bmp), max_side=10)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(__import__("io").BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (10, 5) and decoded.format == "PNG"
    jpg = tmp_path / "x.jpg"
    Image.new("RGB", (8, 8)).save(jpg)
    assert image_data_url(str(jpg)).startswith("data:image/jpeg;base64,")
    with pytest.raises(DataError, match="missing.png"):
        image_data_url(str(tmp_path / "missing.png"))


# --------------------------------------------------------------------------- predictions


def _preds(tmp_path: Path, text: str) -> str:
    path = tmp_path / "preds.jsonl"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_predictions_backend_reads_uid_id_and_scores_lines(tmp_path):
    path = _preds(tmp_path, '{"uid": "a", "prediction": " yes "}\n{"id": "b", "prediction": "no"}\n'
                            '{"uid": "c", "scores": [0.1, 0.9]}\n')
    b = PredictionsBackend(BackendConfig(), path, path=path, known_uids=["a", "b", "c"])
    lines = {x["uid"]: x for x in b.answer([req("a"), req("b"), req("c")], GenerationSettings())}
    assert lines["a"]["prediction"] == "yes" and lines["b"]["prediction"] == "no"
    assert lines["c"]["scores"] == [0.1, 0.9] and lines["c"]["prediction"] == ""
    assert b.describe()["backend"] == "predictions" and len(b.describe()["revision"]) == 64


def test_predictions_backend_uid_of_hook_names_lines_without_uid(tmp_path):
    path = _preds(tmp_path, '{"id": "p", "question_type": "NEG", "prediction": "B"}\n')
    b = PredictionsBackend(BackendConfig(), path, path=path, known_uids=["p#0", "p#1"],
                           uid_of=lambda line, data: "p#1" if line.get("question_type") == "NEG" else None)
    assert next(b.answer([req("p#1")], GenerationSettings()))["prediction"] == "B"


def test_predictions_backend_errors_duplicates_unknown_and_missing(tmp_path):
    dup = _preds(tmp_path, '{"uid": "a", "prediction": "x"}\n{"uid": "b", "prediction": "x"}\n'
                           '{"uid": "a", "prediction": "y"}\n')
    with pytest.raises(DataError, match=r"preds.jsonl:3: uid: duplicate uid 'a', also on line 1"):
        PredictionsBackend(BackendConfig(), dup, path=dup, known_uids=["a", "b"])
    extra = _preds(tmp_path, '{"uid": "a", "prediction": "x"}\n{"uid": "zz", "prediction": "x"}\n')
    with pytest.raises(MmkitError, match=r"1 line\(s\) name no request.*'zz' \(line 2\).*--ignore-extra"):
        PredictionsBackend(BackendConfig(), extra, path=extra, known_uids=["a"])
    b = PredictionsBackend(BackendConfig(), extra, path=extra, known_uids=[f"u{i}" for i in range(7)] + ["a"],
                           ignore_extra=True)
    with pytest.raises(MmkitError, match=r"7 request\(s\) have no prediction: u0, u1, u2, u3, u4, \.\.\."):
        list(b.answer([req(f"u{i}") for i in range(7)], GenerationSettings()))
    b.allow_missing = True
    lines = list(b.answer([req("a"), req("u0")], GenerationSettings()))
    assert lines[0]["error"] is None and lines[1]["error"].startswith("not in ")
    bad = _preds(tmp_path, '{"uid": "a"}\n')
    with pytest.raises(DataError, match=r":1: prediction: missing field"):
        PredictionsBackend(BackendConfig(), bad, path=bad, known_uids=["a"])


# --------------------------------------------------------------------------- hf


@pytest.fixture(scope="module")
def llava_backend(tiny_llava):
    from mmkit.core.backends import HFBackend

    return HFBackend(BackendConfig(model=[tiny_llava], batch_size=2), tiny_llava)


def test_hf_backend_batches_tiles_and_decodes_only_new_tokens(llava_backend, png, tmp_path):
    from PIL import Image

    other = tmp_path / "other.png"
    Image.new("RGB", (9, 9), (200, 0, 0)).save(other)
    b = llava_backend
    assert b.image_mode == "tile" and b.describe()["class"] == "LlavaForConditionalGeneration"
    assert b.describe()["dtype"] == "float32" and len(b.describe()["revision"]) == 64
    requests = [req("one", "what is this", images=(str(png),)), req("two", "compare them", images=(str(png), str(other))),
                req("long", "what is the color of the dog in the image", images=(str(png),))]
    lines = {x["uid"]: x for x in b.answer(requests, GenerationSettings(max_new_tokens=3))}
    assert set(lines) == {"one", "two", "long"}
    for x in lines.values():
        assert x["error"] is None and isinstance(x["prediction"], str) and "<|assistant|>" not in x["prediction"]
        assert x["usage"]["completion_tokens"] <= 3 and x["finish_reason"] in {"stop", "length"}
    rendered = b.processor.apply_chat_template(b._messages(requests[1]), add_generation_prompt=True, tokenize=False)
    assert rendered.count("<image>") == 1 and "grid of 2 sub-images" in rendered  # tiled into one image
    # a batch of two gives the same greedy text as each alone (left padding)
    alone = next(b.answer([requests[0]], GenerationSettings(max_new_tokens=3)))
    assert alone["prediction"] == lines["one"]["prediction"]


def test_hf_backend_first_token_word_logprobs(llava_backend, png):
    import math

    line = next(llava_backend.answer([req("y", "is it red", images=(str(png),), logprob_words=("yes", "no"))],
                                     GenerationSettings(max_new_tokens=1)))
    ids = word_token_ids(llava_backend.tokenizer, "yes")
    assert ids == [llava_backend.tokenizer.convert_tokens_to_ids("yes")]
    assert line["logprobs"]["yes"] < 0 and math.isfinite(line["logprobs"]["no"])


def test_hf_backend_without_a_chat_template_suggests_the_flag(tiny_llava, tmp_path):
    import shutil

    from mmkit.core.backends import HFBackend

    plain = tmp_path / "plain"
    shutil.copytree(tiny_llava, plain)
    for name in ("chat_template.jinja", "chat_template.json"):
        (plain / name).unlink(missing_ok=True)
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = plain / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg.pop("chat_template", None)
            path.write_text(json.dumps(cfg))
    with pytest.raises(MmkitError, match="no chat template; pass --chat-template FILE"):
        HFBackend(BackendConfig(), str(plain))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image> "
                        "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %}")
    b = HFBackend(BackendConfig(chat_template=str(template)), str(plain))
    assert b.processor.chat_template.startswith("{% for m in messages %}")
