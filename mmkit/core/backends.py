"""Backends that answer benchmark requests (evaluate.md §2): ``hf`` (a local Hugging Face model),
``openai`` (an OpenAI-compatible chat-completions server), ``predictions`` (a JSONL file of
answers produced elsewhere). Shared by ``evaluate`` and ``unlearn``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Request:
    """One question for a model: a user turn of text and images (paths, in order)."""

    uid: str
    text: str
    images: tuple[str, ...] = ()
    extras: Mapping[str, Any] = field(default_factory=dict)  # copied into the prediction line


@dataclass
class GenerationSettings:
    """Decoding settings (part of ``config_hash``); ``max_new_tokens`` None = the benchmark's default."""

    max_new_tokens: Optional[int] = None
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1


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
