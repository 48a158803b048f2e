"""Backends that answer benchmark requests (evaluate.md §2): ``hf`` (a local Hugging Face model),
``openai`` (an OpenAI-compatible chat-completions server), ``predictions`` (a JSONL file of
answers produced elsewhere). Shared by ``evaluate`` and ``unlearn``.

Every backend has one interface (:class:`Backend`): ``offers`` (capabilities), ``describe()``
(the ``models`` entry of ``results.json``), ``answer(requests, settings)`` yielding one
prediction-line dict per request *as it completes* (``uid``, ``prediction``, ``error``,
``finish_reason``, ``usage``, ``latency_s``, plus ``logprobs`` when a request asks for
first-token word log-probs and ``scores`` from a predictions file), and ``close()``.
Backends are registered in :data:`BACKENDS` (plugins add their own) and opened with
:func:`open_backend`. Nothing here imports torch at module import time; the ``openai``
backend uses the standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Optional, Sequence

from mmkit.errors import DataError, MmkitError
from mmkit.registry import Registry

log = logging.getLogger("mmkit")


@dataclass(frozen=True)
class Request:
    """One question for a model: a user turn of text and images (paths or PIL images, in order).

    The turn is the images, then the text, unless ``parts`` gives an explicit interleaved order
    (``("text", str)`` / ``("image", path)`` items; build it with :meth:`from_parts`).
    ``max_new_tokens`` is this request's default budget (``--max-new-tokens`` overrides it);
    ``logprob_words`` asks for the first generated token's log-probability mass of each word
    (every vocabulary entry whose decoded text, stripped and lower-cased, equals the word),
    returned as the line's ``logprobs`` ``{word: float or None}``.
    """

    uid: str
    text: str
    images: tuple[Any, ...] = ()
    extras: Mapping[str, Any] = field(default_factory=dict)  # copied into the prediction line
    parts: tuple[tuple[str, Any], ...] = ()
    max_new_tokens: Optional[int] = None
    logprob_words: tuple[str, ...] = ()

    @classmethod
    def from_parts(cls, uid: str, parts: Sequence[tuple[str, Any]], **kwargs: Any) -> "Request":
        """A request whose turn interleaves text and images in the given order."""
        bad = [kind for kind, _ in parts if kind not in ("text", "image")]
        if bad:
            raise ValueError(f"a request part is 'text' or 'image', got {bad[0]!r}")
        return cls(uid=uid, text="".join(v for k, v in parts if k == "text"),
                   images=tuple(v for k, v in parts if k == "image"), parts=tuple(parts), **kwargs)

    def content(self) -> list[tuple[str, Any]]:
        """The turn in order: ``parts`` if given, else every image then the text."""
        if self.parts:
            return list(self.parts)
        return [("image", im) for im in self.images] + [("text", self.text)]


#: What an unset (None) beam setting means when no benchmark default applies: greedy, no length penalty.
BEAM_FALLBACKS: Mapping[str, Any] = {"num_beams": 1, "length_penalty": 1.0}


@dataclass
class GenerationSettings:
    """Decoding settings (part of ``config_hash``); ``max_new_tokens`` None = each request's own budget.

    ``num_beams``/``length_penalty`` apply to the ``hf`` backend (beam search; HTTP servers decode
    with ``temperature``/``top_p``/``n`` only). None = the benchmark's default (CHAIR: 5 beams,
    length penalty 0, unlearn.md §5.1), else greedy: :meth:`resolved` fills them in."""

    max_new_tokens: Optional[int] = None
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    num_beams: Optional[int] = None
    length_penalty: Optional[float] = None

    def resolved(self, defaults: Mapping[str, Any] | None = None) -> "GenerationSettings":
        """These settings with every unset beam setting taken from ``defaults`` (a benchmark's
        ``generation_defaults``), else from :data:`BEAM_FALLBACKS`; values the user set are kept."""
        fill = {**BEAM_FALLBACKS, **(defaults or {})}
        return replace(self, **{k: fill[k] for k in BEAM_FALLBACKS if getattr(self, k) is None})


@dataclass
class BackendConfig:
    """Which model answers and how (evaluate.md §2, §8)."""

    kind: str = "hf"  # hf | openai | predictions (openai implied by base_url, predictions by a file)
    model: list[str] = field(default_factory=list)
    revision: Optional[str] = None
    connector: Optional[str] = None
    model_class: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    batch_size: Optional[int] = None
    system_prompt: Optional[str] = None
    chat_template: Optional[str] = None
    trust_remote_code: bool = False
    image_mode: str = "auto"  # auto | interleave | tile
    tile_size: int = 448
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 5
    max_image_side: Optional[int] = None
    logprobs: bool = False


#: The note a tiled prompt starts with (evaluate.md §2.4).
TILE_NOTE = ("The image is a grid of {n} sub-images, numbered 1 to {n} from left to right, "
             "top to bottom (the number is in each sub-image's top-left corner).")
#: Model types trained on interleaved images; other single-image models get ``tile`` (§2.1).
MULTI_IMAGE_MODEL_TYPES = frozenset({"llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics2", "idefics3"})


def budget(request: Request, settings: GenerationSettings) -> int:
    """The new-token budget of one request: the user's setting, else the request's own default."""
    value = settings.max_new_tokens if settings.max_new_tokens is not None else request.max_new_tokens
    if value is None:
        raise ValueError(f"request {request.uid}: no max_new_tokens (the runner fills the benchmark default)")
    return value


def prediction_line(uid: str, prediction: Any = "", *, error: str | None = None, finish_reason: str | None = None,
                    usage: Mapping[str, Any] | None = None, latency_s: float | None = None,
                    **extra: Any) -> dict[str, Any]:
    """The fields every backend yields for one request (the runner adds parsed, config_hash, time)."""
    return {"uid": uid, "prediction": prediction, "error": error, "finish_reason": finish_reason,
            "usage": dict(usage) if usage else None,
            "latency_s": None if latency_s is None else round(latency_s, 4), **extra}


def resolve_kind(cfg: BackendConfig, predictions: str | None = None) -> str:
    """``predictions`` when a predictions file is given, ``openai`` when ``--base-url`` is, else ``--backend``."""
    if predictions:
        return "predictions"
    if cfg.base_url and cfg.kind == "hf":
        return "openai"
    return cfg.kind


def logsumexp(values: Sequence[float]) -> float | None:
    """log Σ exp(v) (None for an empty set: that word has no mass the backend can see)."""
    if not values:
        return None
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def _word_key(text: str) -> str:
    return text.strip().lower()


# --------------------------------------------------------------------------- the interface


class Backend(ABC):
    """Answers requests. Subclasses set ``kind``; ``offers`` lists the capabilities it provides."""

    kind: ClassVar[str]
    offers: tuple[str, ...] = ("generate",)
    #: ``interleave`` or ``tile`` for several images per request (part of ``config_hash``).
    image_mode: str = "interleave"
    device: str | None = None

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The ``models`` entry: ``id``, ``revision``, ``backend``, ``class``, ``dtype``, ``server_models``."""

    @abstractmethod
    def answer(self, requests: Sequence[Request], settings: GenerationSettings) -> Iterator[dict[str, Any]]:
        """Yield one prediction line per request, in completion order."""

    def decoding(self, settings: GenerationSettings) -> dict[str, Any] | None:
        """The decoding this backend actually applies for ``settings`` (results.json ``config.decoding``,
        unlearn.md §5.1): here sampling at ``temperature`` > 0 else greedy, never beam search."""
        sampling = settings.temperature > 0
        return {"strategy": "sample" if sampling else "greedy", "num_beams": 1, "temperature": settings.temperature,
                "top_p": settings.top_p if sampling else None, "n": settings.n}

    def close(self) -> None:
        """Release the model or connections."""


BACKENDS: Registry = Registry("backend")


def open_backend(kind: str, cfg: BackendConfig, model: str, **options: Any) -> Backend:
    """Open the registered backend ``kind`` for ``model`` (``options`` are the kind's own keywords)."""
    return BACKENDS.resolve(kind, field="--backend")(cfg, model, **options)


# --------------------------------------------------------------------------- hf


def local_revision(path: str) -> str | None:
    """For a local model directory: sha256 of ``config.json`` plus the safetensors index and headers
    (evaluate.md §1.3), so a retrained checkpoint in the same folder gets a new revision."""
    root = Path(path)
    if not (root / "config.json").is_file():
        return None
    h = hashlib.sha256((root / "config.json").read_bytes())
    index = root / "model.safetensors.index.json"
    if index.is_file():
        h.update(index.read_bytes())
    for shard in sorted(root.glob("*.safetensors")):
        with open(shard, "rb") as fh:
            raw = fh.read(8)
            if len(raw) == 8:
                h.update(fh.read(struct.unpack("<Q", raw)[0]))
    return h.hexdigest()


def apply_connector(model: Any, path: str) -> None:
    """Copy a connector's tensors (safetensors, unlearn.md) into ``model``: every key must exist in
    the model with the same shape, else a one-line error naming the first bad key."""
    import torch
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MmkitError("no such connector file", file=path, field="--connector")
    tensors = load_file(path)
    state = model.state_dict()
    for key, value in tensors.items():
        if key not in state:
            raise MmkitError(f"key {key!r} is not a parameter of the model", file=path, field="--connector")
        if tuple(state[key].shape) != tuple(value.shape):
            raise MmkitError(f"key {key!r} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(state[key].shape)}", file=path, field="--connector")
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value.to(state[key].dtype))


def word_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Vocabulary ids whose decoded text, stripped and lower-cased, equals ``word`` (evaluate.md §5:
    ``yes``, ``Yes``, ``▁yes``, ``ĠYES`` ... for ``yes``)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, t in enumerate(texts) if _word_key(t) == word]


@BACKENDS.register("hf")
class HFBackend(Backend):
    """A local image-text-to-text model (LLaVA-style) loaded through :mod:`mmkit.core.models`.

    Requests become chat messages with ``{"type": "image"}``/``{"type": "text"}`` parts rendered by
    the processor's chat template; batches group requests by image count and budget, sorted by
    prompt length, left-padded, generated under ``torch.inference_mode()``; only new tokens are
    decoded. Several images on a single-image model are tiled into one grid (§2.4)."""

    kind = "hf"

    def __init__(self, cfg: BackendConfig, model: str, *, seed: int = 0) -> None:
        import transformers

        from mmkit.core.models import ModelKind, load_model, resolve_device, resolve_source

        self.cfg, self.model_id, self.seed = cfg, model, seed
        path, _ = resolve_source(model)
        try:
            config = transformers.AutoConfig.from_pretrained(path, revision=cfg.revision,
                                                             trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise MmkitError(f"cannot read the model config: {str(exc).strip().splitlines()[0]}",
                             file=model, field="--model") from exc
        self.config = config
        self.class_name = cfg.model_class or (getattr(config, "architectures", None) or [type(config).__name__])[0]
        generative = ("ConditionalGeneration", "ImageTextToText", "CausalLM")
        self.offers = ("generate",) if any(g in self.class_name for g in generative) else ()
        self.device = resolve_device(cfg.device or "auto")
        self.dtype_name = cfg.dtype or self._default_dtype()
        self.image_mode = self._image_mode(config)
        self.revision = cfg.revision or getattr(config, "_commit_hash", None) or local_revision(path)
        self.loaded = None
        if not self.offers:
            return  # the runner reports the capability mismatch
        kind = "mllm"
        if cfg.model_class:
            kind = f"class:{cfg.model_class}"
            from mmkit.core.models import register_kind

            if not hasattr(transformers, cfg.model_class):
                raise MmkitError(f"transformers has no class {cfg.model_class!r}", field="--model-class")
            register_kind(ModelKind(kind, cfg.model_class, "processor", f"{cfg.model_class} (--model-class)"))
        self.loaded = load_model(model, kind, dtype=self.dtype_name, device=self.device, revision=cfg.revision,
                                 trust_remote_code=cfg.trust_remote_code)
        self.model = self.loaded.model.eval()
        if cfg.connector:
            apply_connector(self.model, cfg.connector)
        self.processor = self.loaded.preprocessor
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        if cfg.chat_template:
            template = Path(cfg.chat_template)
            if not template.is_file():
                raise MmkitError("no such chat template file", file=cfg.chat_template, field="--chat-template")
            self.processor.chat_template = template.read_text(encoding="utf-8")
        if not getattr(self.processor, "chat_template", None):
            raise MmkitError("the model has no chat template; pass --chat-template FILE (a Jinja template)",
                             file=model, field="--model")
        self.batch_size = cfg.batch_size or (8 if self.device.startswith("cuda") else 1)
        self._word_ids: dict[str, list[int]] = {}

    def _default_dtype(self) -> str:
        """bfloat16 on GPUs that support it, else float16; float32 on CPU (§2.1)."""
        if not self.device.startswith("cuda"):
            return "float32"
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"

    def _image_mode(self, config: Any) -> str:
        if self.cfg.image_mode in ("interleave", "tile"):
            return self.cfg.image_mode
        if self.cfg.image_mode != "auto":
            raise MmkitError(f"expected auto, interleave or tile, got {self.cfg.image_mode!r}", field="--image-mode")
        multi = config.model_type in MULTI_IMAGE_MODEL_TYPES or "interleave" in self.model_id.lower()
        return "interleave" if multi else "tile"

    def describe(self) -> dict[str, Any]:
        return {"id": self.model_id, "revision": self.revision, "backend": self.kind, "class": self.class_name,
                "dtype": self.dtype_name, "server_models": None}

    def decoding(self, settings: GenerationSettings) -> dict[str, Any]:
        """``generate``'s decoding: beam search (with its length penalty) when ``num_beams`` > 1,
        sampling when ``temperature`` > 0, else greedy."""
        s = settings.resolved()
        sampling, beams = s.temperature > 0, s.num_beams > 1
        strategy = "beam search" if beams and not sampling else "beam sample" if beams else \
            "sample" if sampling else "greedy"
        return {"strategy": strategy, "num_beams": s.num_beams, "length_penalty": s.length_penalty if beams else None,
                "temperature": s.temperature, "top_p": s.top_p if sampling else None, "n": s.n}

    def _tiled(self, request: Request) -> bool:
        return len(request.images) > 1 and self.image_mode == "tile"

    def _messages(self, request: Request) -> list[dict[str, Any]]:
        """The chat messages of one request (one image part for a tiled grid, then the note, §2.4)."""
        content = request.content()
        if self._tiled(request):
            text = " ".join([TILE_NOTE.format(n=len(request.images))] + [v for k, v in content if k == "text"])
            content = [("image", None), ("text", text)]
        parts = [{"type": "image"} if k == "image" else {"type": "text", "text": v} for k, v in content]
        messages = [{"role": "user", "content": parts}]
        if self.cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.cfg.system_prompt}]})
        return messages

    def _images(self, request: Request) -> list[Any]:
        """The request's images as PIL images (one grid when tiled); a bad file names the request."""
        from mmkit.core.data import load_image, tile_images

        try:
            if self._tiled(request):
                return [tile_images(request.images, self.cfg.tile_size)]
            return [load_image(im) for im in request.images]
        except DataError as exc:
            raise DataError(f"{exc.message} (request {request.uid})", file=exc.file, field="image") from None

    def _ids_for(self, word: str) -> list[int]:
        if word not in self._word_ids:
            self._word_ids[word] = word_token_ids(self.tokenizer, word)
        return self._word_ids[word]

    def answer(self, requests: Sequence[Request], settings: GenerationSettings) -> Iterator[dict[str, Any]]:
        import numpy as np
        import torch

        from mmkit.core.data import length_sorted_batches

        settings = settings.resolved()
        if settings.n > 1 and settings.temperature <= 0 and settings.num_beams < settings.n:
            raise MmkitError(f"n = {settings.n} answers need sampling (--temperature > 0) or num_beams >= n",
                             field="generation.n")
        rendered = [self.processor.apply_chat_template(self._messages(r), add_generation_prompt=True, tokenize=False)
                    for r in requests]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((len(r.images), budget(r, settings)), []).append(i)
        torch.manual_seed(self.seed)
        for (_, max_new), members in groups.items():
            lengths = np.array([len(rendered[i]) for i in members])
            for rows in length_sorted_batches(lengths, self.batch_size, descending=True):
                batch = [members[j] for j in rows]
                yield from self._generate([requests[i] for i in batch], [rendered[i] for i in batch],
                                          max_new, settings)

    def _generate(self, requests: list[Request], texts: list[str], max_new: int,
                  settings: GenerationSettings) -> Iterator[dict[str, Any]]:
        import torch

        start = time.monotonic()
        images = [im for r in requests for im in self._images(r)]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        sampling = settings.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": sampling, "num_beams": settings.num_beams,
                                  "num_return_sequences": settings.n, "pad_token_id": self.tokenizer.pad_token_id,
                                  "return_dict_in_generate": True}
        if sampling:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        if settings.num_beams > 1:
            kwargs["length_penalty"] = settings.length_penalty
        want_logprobs = any(r.logprob_words for r in requests)
        if want_logprobs:
            kwargs["output_scores"] = True
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        new = out.sequences[:, prompt_len:]
        texts_out = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        pad = self.tokenizer.pad_token_id
        first = torch.log_softmax(out.scores[0].float(), dim=-1) if want_logprobs else None
        latency = time.monotonic() - start
        for b, r in enumerate(requests):
            rows = range(b * settings.n, (b + 1) * settings.n)
            ids = new[rows[0]].tolist()
            finish = "stop" if eos_ids & set(ids) else "length"
            completion = sum(1 for t in ids if t != pad)
            usage = {"prompt_tokens": int(inputs["attention_mask"][b].sum()), "completion_tokens": completion}
            prediction: Any = texts_out[rows[0]] if settings.n == 1 else [texts_out[k] for k in rows]
            extra: dict[str, Any] = {}
            if r.logprob_words:
                row = first[rows[0]].tolist()
                extra["logprobs"] = {w: logsumexp([row[i] for i in self._ids_for(w)]) for w in r.logprob_words}
            yield prediction_line(r.uid, prediction, finish_reason=finish, usage=usage, latency_s=latency, **extra)

    def close(self) -> None:
        self.model = self.loaded = None


# --------------------------------------------------------------------------- openai


#: Retried HTTP statuses (§2.2); 401/403 abort the run; any other 4xx is stored as the line's error.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


def backoff_delay(attempt: int, jitter: float, retry_after: float | None = None) -> float:
    """Seconds before retry ``attempt`` (1-based): ``min(30, 2^(attempt-1)) × jitter`` with jitter
    drawn from U(0.5, 1), or ``Retry-After`` when that is larger (evaluate.md §2.2)."""
    delay = min(30.0, 2.0 ** (attempt - 1)) * jitter
    return max(delay, retry_after) if retry_after is not None else delay


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), or None."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def image_data_url(image: Any, max_side: int | None = None) -> str:
    """``data:<mime>;base64,...`` of an image: the file's own bytes when it is JPEG/PNG/WEBP/GIF and
    needs no resizing; otherwise (another format, a PIL image, or ``max_side`` downsizing with the
    aspect kept) re-encoded, as PNG unless the original format is one of those four."""
    from PIL import Image

    from mmkit.core.data import load_image

    raw: bytes | None = None
    fmt: str | None = None
    if isinstance(image, (str, os.PathLike)):
        load_image(image)  # a missing or undecodable file is a user error naming it
        raw = Path(image).expanduser().read_bytes()
        with Image.open(io.BytesIO(raw)) as probe:  # decodable: load_image checked it
            fmt, size = probe.format, probe.size
        if fmt in MIME and (max_side is None or max(size) <= max_side):
            return f"data:{MIME[fmt]};base64,{base64.b64encode(raw).decode('ascii')}"
    img = load_image(image)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
    fmt = fmt if fmt in MIME else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:{MIME[fmt]};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


class _Abort(Exception):
    """A response that must stop the run (401/403); carries the one-line message."""


class _Unreachable(Exception):
    """A connection error on the first request after a failed pre-flight."""


@BACKENDS.register("openai")
class OpenAIBackend(Backend):
    """An OpenAI-compatible ``/chat/completions`` server (vLLM, SGLang, ...), standard library only.

    ``sleep`` and ``jitter`` (a U(0.5, 1) draw) are injectable so tests run on a fake clock."""

    kind = "openai"

    def __init__(self, cfg: BackendConfig, model: str, *, seed: int = 0,
                 sleep: Callable[[float], None] = time.sleep,
                 jitter: Callable[[], float] | None = None) -> None:
        if not cfg.base_url:
            raise MmkitError("the openai backend needs --base-url (e.g. http://127.0.0.1:8000/v1)", field="--base-url")
        if cfg.concurrency < 1:
            raise MmkitError(f"expected >= 1, got {cfg.concurrency}", field="--concurrency")
        self.cfg, self.model_id, self.seed = cfg, model, seed
        self.base_url = cfg.base_url.rstrip("/")
        self.sleep = sleep
        rng = random.Random(seed)
        self.jitter = jitter or (lambda: rng.uniform(0.5, 1.0))
        self._key = os.environ.get(cfg.api_key_env) or None
        self.server_models: list[str] | None = None
        self._preflight_unreachable = False
        self._preflight()

    # -- HTTP
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _preflight(self) -> None:
        """``GET /models``: its ids go to ``server_models``; a failure alone is a warning."""
        req = urllib.request.Request(f"{self.base_url}/models", headers=self._headers(), method="GET")
        try:
            with urllib.request.urlopen(req, timeout=min(self.cfg.timeout, 10.0)) as resp:
                body = json.loads(resp.read().decode("utf-8"))
            self.server_models = [str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)]
        except urllib.error.HTTPError as exc:
            if exc.code in AUTH_STATUSES:
                raise self._auth_error(exc.code) from None
            log.warning("%s/models answered HTTP %d; going on without the server's model list", self.base_url, exc.code)
        except (urllib.error.URLError, OSError) as exc:
            self._preflight_unreachable = True
            log.warning("%s/models: %s", self.base_url, self._redact(_reason(exc)))
        except (ValueError, AttributeError):
            log.warning("%s/models: not a model list; going on without it", self.base_url)

    def _auth_error(self, status: int) -> MmkitError:
        state = "is set but was refused" if self._key else "is not set"
        return MmkitError(f"HTTP {status} from {self.base_url}: the API key in ${self.cfg.api_key_env} {state}",
                          field="--api-key-env")

    def body(self, request: Request, settings: GenerationSettings) -> dict[str, Any]:
        """The ``/chat/completions`` request body (§2.2)."""
        parts = [{"type": "image_url", "image_url": {"url": image_data_url(v, self.cfg.max_image_side)}}
                 if k == "image" else {"type": "text", "text": v} for k, v in request.content()]
        messages: list[dict[str, Any]] = [{"role": "user", "content": parts}]
        if self.cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        body: dict[str, Any] = {"model": self.model_id, "messages": messages, "max_tokens": budget(request, settings),
                                "temperature": settings.temperature, "top_p": settings.top_p, "n": settings.n,
                                "seed": self.seed}
        if request.logprob_words and self.cfg.logprobs:
            body.update(logprobs=True, top_logprobs=20)
        return body

    def _call(self, request: Request, settings: GenerationSettings, retries: int, probe: bool = False) -> dict[str, Any]:
        """One request with retries; returns its prediction line (errors stay per sample). A ``probe``
        (the first request after a failed pre-flight) raises :class:`_Unreachable` on a connection error."""
        data = json.dumps(self.body(request, settings), ensure_ascii=False).encode("utf-8")
        url = f"{self.base_url}/chat/completions"
        error = "no attempt"
        for attempt in range(1, retries + 2):
            start = time.monotonic()
            retry_after = None
            try:
                req = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    raw = resp.read()
                return self._line(request, raw, time.monotonic() - start)
            except urllib.error.HTTPError as exc:
                if exc.code in AUTH_STATUSES:
                    raise _Abort(str(self._auth_error(exc.code))) from None
                detail = _http_detail(exc)
                error = self._redact(f"HTTP {exc.code}: {detail}" if detail else f"HTTP {exc.code}")
                if exc.code not in RETRY_STATUSES:
                    return prediction_line(request.uid, "", error=error)
                retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            except (urllib.error.URLError, OSError) as exc:
                timed_out = isinstance(exc, (TimeoutError, socket.timeout)) or isinstance(
                    getattr(exc, "reason", None), (TimeoutError, socket.timeout))
                error = f"timed out after {self.cfg.timeout:g} s" if timed_out else \
                    self._redact(f"connection failed: {_reason(exc)}")
                if probe and not timed_out:
                    raise _Unreachable(_reason(exc)) from None
            if attempt <= retries:
                self.sleep(backoff_delay(attempt, self.jitter(), retry_after))
        return prediction_line(request.uid, "", error=f"{error} (after {retries + 1} attempts)")

    def _line(self, request: Request, raw: bytes, latency: float) -> dict[str, Any]:
        """A prediction line from a response body; a malformed body is this sample's error."""
        try:
            body = json.loads(raw.decode("utf-8"))
            choices = body["choices"]
            texts = [_content_text(c["message"].get("content")) for c in choices]
            choice = choices[0]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return prediction_line(request.uid, "", error=f"malformed response ({type(exc).__name__}: "
                                   f"{self._redact(str(exc))[:120]})", latency_s=latency)
        extra: dict[str, Any] = {}
        if request.logprob_words:
            extra["logprobs"] = _top_logprob_mass(choice.get("logprobs"), request.logprob_words)
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
        return prediction_line(request.uid, texts[0] if len(texts) == 1 else texts,
                               finish_reason=choice.get("finish_reason"), usage=usage, latency_s=latency, **extra)

    def answer(self, requests: Sequence[Request], settings: GenerationSettings) -> Iterator[dict[str, Any]]:
        pending = list(requests)
        if pending and self._preflight_unreachable:
            try:  # the server may be down: one attempt tells, before anything runs in parallel
                yield self._call(pending[0], settings, self.cfg.max_retries, probe=True)
            except _Unreachable as exc:
                raise MmkitError(f"cannot reach the server at {self.base_url} ({self._redact(str(exc))}); "
                                 "is it running?", field="--base-url") from None
            except _Abort as exc:
                raise MmkitError(str(exc)) from None
            pending = pending[1:]
        stop = threading.Event()

        def task(request: Request) -> dict[str, Any] | None:
            return None if stop.is_set() else self._call(request, settings, self.cfg.max_retries)

        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="mmkit-http")
        try:
            queue = iter(pending)
            running: set[Future] = {pool.submit(task, r) for r in itertools.islice(queue, self.cfg.concurrency)}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        line = fut.result()
                    except _Abort as exc:
                        raise MmkitError(str(exc)) from None
                    if line is not None:
                        yield line
                    nxt = next(queue, None)
                    if nxt is not None:
                        running.add(pool.submit(task, nxt))
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        return {"id": self.model_id, "revision": None, "backend": self.kind, "class": None, "dtype": None,
                "server_models": self.server_models, "base_url": self.base_url}


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = str(reason).strip()
    return text.splitlines()[0] if text else type(reason).__name__


def _http_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return " ".join(text.split())[:200]


def _content_text(content: Any) -> str:
    """``message.content``: a string, a list of parts (their texts concatenated), or null ("")."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content).strip()
    raise TypeError(f"message content is {type(content).__name__}")


def _top_logprob_mass(logprobs: Any, words: Iterable[str]) -> dict[str, float | None]:
    """Per word, logsumexp of the first token's ``top_logprobs`` whose text matches it (None if absent)."""
    try:
        top = logprobs["content"][0]["top_logprobs"]
        pairs = [(_word_key(t["token"]), float(t["logprob"])) for t in top]
    except (TypeError, KeyError, IndexError, ValueError):
        pairs = []
    return {w: logsumexp([lp for tok, lp in pairs if tok == w]) for w in words}


# --------------------------------------------------------------------------- predictions


@BACKENDS.register("predictions")
class PredictionsBackend(Backend):
    """Answers read from a JSONL file made elsewhere (§2.3): ``{"uid"|"id", "prediction"}`` lines, or
    ``{"uid", "scores"}`` (SNARE); a line's other fields are passed on with its answer. ``uid_of(line,
    data)`` (a benchmark hook) names the request of a line without ``uid``; ``known_uids`` are every
    uid of the benchmark's data, also those outside ``--limit`` or a subset flag: their lines are
    ignored, while a line naming none of them is an error unless ``ignore_extra``."""

    kind = "predictions"

    def __init__(self, cfg: BackendConfig, model: str, *, path: str, known_uids: Iterable[str],
                 data: Any = None, uid_of: Callable[[Mapping[str, Any], Any], str | None] | None = None,
                 allow_missing: bool = False, ignore_extra: bool = False, seed: int = 0) -> None:
        from mmkit.io import read_records, sha256_file

        self.path = path
        if not Path(path).expanduser().is_file():
            raise MmkitError("no such predictions file", file=path, field="--predictions")
        self.sha256 = sha256_file(Path(path).expanduser())
        self.allow_missing = allow_missing
        known = set(known_uids)
        self.lines: dict[str, dict[str, Any]] = {}
        first_line: dict[str, int | str] = {}
        extra: list[str] = []
        for rec in read_records(path, format="jsonl"):
            uid = rec.get("uid")
            if uid is None and uid_of is not None:
                uid = uid_of(rec, data)
            if uid is None:
                uid = rec.get("id")
            if uid is None:
                raise rec.error("uid", "expected a uid (or id) naming the request")
            uid = str(uid)
            if "prediction" not in rec and "scores" not in rec:
                raise rec.error("prediction", "missing field (a line needs prediction, or scores)")
            if uid in first_line:
                raise rec.error("uid", f"duplicate uid {uid!r}, also on line {first_line[uid]}")
            first_line[uid] = rec.loc
            if uid not in known:
                extra.append(f"{uid!r} (line {rec.loc})")
                continue
            self.lines[uid] = dict(rec)
        if extra and not ignore_extra:
            raise MmkitError(f"{len(extra)} line(s) name no request of this benchmark, e.g. {extra[0]} "
                             "(pass --ignore-extra to skip them)", file=path, field="uid")

    def describe(self) -> dict[str, Any]:
        return {"id": self.path, "revision": self.sha256, "backend": self.kind, "class": None, "dtype": None,
                "server_models": None}

    def decoding(self, settings: GenerationSettings) -> None:
        """Unknown: the answers were decoded elsewhere."""
        return None

    def answer(self, requests: Sequence[Request], settings: GenerationSettings) -> Iterator[dict[str, Any]]:
        missing = [r.uid for r in requests if r.uid not in self.lines]
        if missing and not self.allow_missing:
            shown = ", ".join(missing[:5])
            raise MmkitError(f"{len(missing)} request(s) have no prediction: {shown}"
                             f"{', ...' if len(missing) > 5 else ''} (pass --allow-missing to score them as wrong)",
                             file=self.path, field="uid")
        for r in requests:
            line = self.lines.get(r.uid)
            if line is None:
                yield prediction_line(r.uid, "", error=f"not in {self.path}")
                continue
            prediction = line.get("prediction")
            extra = {k: v for k, v in line.items() if k not in _NOT_EXTRAS}
            yield prediction_line(r.uid, "" if prediction is None else str(prediction).strip(), **extra)


#: Fields of a predictions-file line that are not passed on as extras: the uid (and its alias ``id``),
#: the answer, and what the runner writes itself. Everything else (``scores``, MMR's ``qhash`` and
#: ``question_type``, ...) reaches the benchmark, whose ``score`` checks it against the data (§2.3, §3).
_NOT_EXTRAS = frozenset({"uid", "id", "prediction", "parsed", "error", "config_hash", "latency_s", "finish_reason",
                         "usage", "time"})
