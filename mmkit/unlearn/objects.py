"""Object extraction from responses (unlearn.md §2.2), registry :data:`OBJECT_EXTRACTORS`.

An extractor maps a list of response records to, per response, ``(spans, n_dropped)``: the
object spans ``(phrase, start, end)`` in order of first mention, unique per object, and how many
proposed phrases were dropped (not found verbatim, refusals, too long).

- ``vocab`` (default): the COCO synonym table of ``core/objects.py`` (or ``--vocab FILE``),
  whole-word, plural forms and two-word phrases through its mention extraction; one span per
  category (its first mention, e.g. ``dogs``), since CLIP scores the object, not the word form.
- ``llm``: a text model lists the concrete visible objects; phrases are kept only where they
  occur verbatim as whole words.
- ``given``: the record's ``objects`` list, matched like ``llm`` phrases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from mmkit.core.objects import Vocabulary, find_objects
from mmkit.errors import MmkitError
from mmkit.registry import Registry

#: Longest phrase (in words) an ``llm``/``given`` extractor keeps.
MAX_PHRASE_WORDS = 10
#: Phrases that are an LLM's way of saying it found nothing.
REFUSALS = ("none", "n/a", "no objects", "nothing", "sorry", "i'm sorry", "i cannot", "i can't", "as an ai")

LLM_PROMPT = (
    "List the concrete, visible objects mentioned in the description below, as noun phrases copied "
    "verbatim from it, separated by commas. Output only the list.\n\n"
    "Description: A man in a red shirt rides a bicycle past a parked car.\n"
    "Objects: a man, a red shirt, a bicycle, a parked car\n\n"
    "Description: {response}\nObjects:"
)


@dataclass(frozen=True)
class Span:
    """An object phrase and where it first occurs: ``response[start:end] == phrase``."""

    phrase: str
    start: int
    end: int


Extracted = tuple[list[Span], int]
Extractor = Callable[[Sequence[Mapping[str, Any]]], list[Extracted]]


@dataclass
class ExtractConfig:
    """What the extractor factories may need."""

    vocab: str | None = None
    ask: Callable[[list[str]], list[str]] | None = None  # prompts -> answers (llm extractor)


OBJECT_EXTRACTORS: Registry = Registry("object extractor")


def vocab_spans(response: str, vocab: Vocabulary | None = None) -> list[Span]:
    """First mention of every vocabulary category in ``response`` (``core/objects.find_objects``)."""
    seen: set[str] = set()
    spans = []
    for m in find_objects(response, vocab):
        if m.canonical not in seen:
            seen.add(m.canonical)
            spans.append(Span(m.surface, m.start, m.end))
    return spans


def phrase_spans(response: str, phrases: Sequence[str]) -> Extracted:
    """Spans of ``phrases`` found verbatim as whole words (case-insensitive, metacharacters
    escaped), unique by lower-cased phrase, in order of first mention; plus the number dropped."""
    spans: dict[str, Span] = {}
    dropped = 0
    for raw in phrases:
        phrase = raw.strip().strip(".;:!?\"'").strip()
        if not phrase or phrase.lower() in REFUSALS or len(phrase.split()) > MAX_PHRASE_WORDS:
            dropped += 1
            continue
        match = re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", response, flags=re.IGNORECASE)
        if match is None:
            dropped += 1
            continue
        spans.setdefault(match.group().lower(), Span(match.group(), match.start(), match.end()))
    return sorted(spans.values(), key=lambda s: s.start), dropped


@OBJECT_EXTRACTORS.register("vocab")
def _vocab(cfg: ExtractConfig) -> Extractor:
    vocab = Vocabulary.from_file(cfg.vocab) if cfg.vocab else None
    return lambda records: [(vocab_spans(r["response"], vocab), 0) for r in records]


@OBJECT_EXTRACTORS.register("given")
def _given(cfg: ExtractConfig) -> Extractor:
    def extract(records: Sequence[Mapping[str, Any]]) -> list[Extracted]:
        out = []
        for r in records:
            objects = r.get("objects")
            if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
                error = getattr(r, "error", None)
                msg = "the given extractor needs a list of strings in 'objects'"
                raise error("objects", msg) if error else MmkitError(msg, field="objects")
            out.append(phrase_spans(r["response"], objects))
        return out

    return extract


@OBJECT_EXTRACTORS.register("llm")
def _llm(cfg: ExtractConfig) -> Extractor:
    if cfg.ask is None:
        raise MmkitError("the llm extractor needs a text model: pass --extractor-model (a backend)",
                         field="--extractor")
    ask = cfg.ask

    def extract(records: Sequence[Mapping[str, Any]]) -> list[Extracted]:
        answers = ask([LLM_PROMPT.format(response=r["response"]) for r in records])
        return [phrase_spans(r["response"], a.split(",")) for r, a in zip(records, answers)]

    return extract


def get_extractor(name: str, cfg: ExtractConfig) -> Extractor:
    """The extractor ``name`` built for ``cfg``."""
    return OBJECT_EXTRACTORS.resolve(name, field="--extractor")(cfg)
