"""Recipe ``mmr``: MMR-style paired positive / leading-negative VQA training data (build.md §5).

Each input record ``{id, image, question, answer, distractor?, premise?, category?, rationale?}``
becomes two LLaVA conversation items sharing ``id`` and ``image``: a positive one (the plain
question and answer) and a negative one (a leading question that presupposes something false,
answered by rejecting the premise). ``--mode template`` fills project-authored templates;
``--mode llm`` asks an OpenAI-compatible chat server (``mmkit.core.backends``) for
``--pairs-per-item`` aligned pairs, with a response cache in the work directory. Both modes drop
hedging or refusing answers (keeping the sides aligned) and validate the pairs before writing.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from mmkit.build.manifest import Recipe
from mmkit.build.shared import BuildOptions, BuildRun, on_invalid, resolve_image
from mmkit.core.seeding import stable_seed
from mmkit.errors import ConfigError, DataError
from mmkit.io import Record, atomic_write, sha256_file, write_json, write_jsonl
from mmkit.progress import Progress

IMAGE_TOKEN = "<image>"
#: refusal / hedge phrases (case-insensitive substrings), adapted from MMR's keyword filter
REFUSALS = ("sorry", "not provided", "is not visible", "I cannot", "I can't", "I'm unable", "I am unable",
            "not discernible", "not specified in the image", "uncertain", "unclear", "apologies")
LLM_ATTEMPTS = 3
TEMPLATE_SLOTS = ("pos_question", "pos_answer", "neg_question_premise", "neg_question_distractor", "neg_answer")

#: the LLM prompt (project wording, not MMR's); ``{...}`` fields come from the record
PROMPT = """You write training data that teaches a vision-language model to resist misleading questions.

Known fact about the image (id {id}):
Question: {question}
Answer: {answer}
Extra context: {context}

Write {pairs} positive question-answer pair(s) and {pairs} negative pair(s) about this image.
Rules:
1. The i-th negative question concerns the same fact as the i-th positive question, but presupposes something false by swapping one detail for a similar alternative: object presence; colour, texture, shape or pose; count or position; knowledge; activity or relation. Prefer a leading or rhetorical question.
2. The negative answer rejects the false premise and states the true fact.
3. Every answer has at most 15 words, does not hedge, and does not mention "the image".

Reply with one JSON object and nothing else:
{{"pos": [{{"q": "...", "a": "..."}}], "neg": [{{"q": "...", "a": "..."}}]}}
"""


@dataclass
class Templates:
    """Template lists per slot (project-authored defaults); several entries: a seeded choice per item."""

    pos_question: list[str] = field(default_factory=lambda: ["{question}"])
    pos_answer: list[str] = field(default_factory=lambda: ["{answer}"])
    neg_question_premise: list[str] = field(default_factory=lambda: ["{premise} {question}"])
    neg_question_distractor: list[str] = field(default_factory=lambda: ["{question} Isn't it {distractor}?"])
    neg_answer: list[str] = field(default_factory=lambda: ["No, it is not {distractor}. The answer is {answer}."])


@dataclass
class MMRConfig(BuildOptions):
    """``mmkit build-dataset mmr`` options (build.md §5)."""

    records: Optional[str] = None
    mode: Literal["template", "llm"] = "template"
    templates: Templates = field(default_factory=Templates)
    refusal_phrases: list[str] = field(default_factory=lambda: list(REFUSALS))
    on_invalid: Literal["error", "skip"] = "error"
    pairs_per_item: int = 1
    llm_base_url: Optional[str] = None
    llm_model: Optional[str] = None
    llm_api_key_env: str = "OPENAI_API_KEY"
    llm_vision: bool = False
    llm_max_tokens: int = 1024
    llm_concurrency: int = 4

    def validate(self) -> None:
        if not self.records:
            raise ConfigError("--records SPEC is required", field="records")
        if self.mode == "llm" and not (self.llm_base_url and self.llm_model):
            raise ConfigError("--mode llm needs --llm-base-url and --llm-model", field="llm_base_url")
        if self.pairs_per_item < 1:
            raise ConfigError(f"expected >= 1, got {self.pairs_per_item}", field="pairs_per_item")
        for slot in TEMPLATE_SLOTS:
            if not getattr(self.templates, slot):
                raise ConfigError("expected at least one template", field=f"templates.{slot}")


@dataclass
class Item:
    """One image's aligned QA pairs: ``pos[i]`` and ``neg[i]`` concern the same fact."""

    id: str
    image: str
    category: Optional[str]
    rec: Record
    pos: list[tuple[str, str]]
    neg: list[tuple[str, str]]


# --------------------------------------------------------------------------- template mode


def fill(template: str, rec: Record, slot: str) -> str:
    """``template`` with the record's fields; a field the record lacks is an error naming it."""
    for _, name, _, _ in string.Formatter().parse(template):
        if name and (rec.get(name) is None or str(rec.get(name)).strip() == ""):
            raise rec.error(name, f"missing field needed by the {slot} template {template!r}")
    return template.format_map({k: str(v).strip() for k, v in rec.items() if v is not None})


def pick(options: Sequence[str], seed: int, item_id: str, slot: str) -> str:
    """The template for this item and slot: ``stable_seed(seed, id, slot)`` modulo the list length."""
    return options[stable_seed(seed, item_id, slot) % len(options)]


def template_pair(rec: Record, t: Templates, seed: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """The positive and negative (question, answer) of one record (premise templates when the record
    has a premise, otherwise distractor templates)."""
    item_id = str(rec["id"])
    if not rec.get("premise") and not rec.get("distractor"):
        raise rec.error("premise", "a record needs a premise or a distractor for its negative question")
    neg_slot = "neg_question_premise" if rec.get("premise") else "neg_question_distractor"
    choose = {slot: pick(getattr(t, slot), seed, item_id, slot) for slot in TEMPLATE_SLOTS}
    pos = (fill(choose["pos_question"], rec, "pos_question"), fill(choose["pos_answer"], rec, "pos_answer"))
    neg = (fill(choose[neg_slot], rec, neg_slot), fill(choose["neg_answer"], rec, "neg_answer"))
    return pos, neg


# --------------------------------------------------------------------------- LLM mode


def item_prompt(rec: Record, pairs: int) -> str:
    """The prompt for one record (the :data:`PROMPT` template filled in)."""
    context = "; ".join(f"{k}: {rec[k]}" for k in ("category", "rationale", "distractor", "premise") if rec.get(k))
    return PROMPT.format(id=rec["id"], question=str(rec["question"]).strip(), answer=str(rec["answer"]).strip(),
                         context=context or "none", pairs=pairs)


FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_reply(text: str, pairs: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]] | None:
    """``{"pos": [{"q","a"}], "neg": [{"q","a"}]}`` from a reply (a fenced json block is unwrapped),
    the first ``pairs`` of each side; None if it does not parse or fit the schema."""
    m = FENCE.search(text)
    try:
        obj = json.loads(m.group(1) if m else text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    sides = []
    for side in ("pos", "neg"):
        rows = obj.get(side)
        if not isinstance(rows, list) or not rows or not all(
                isinstance(r, dict) and isinstance(r.get("q"), str) and isinstance(r.get("a"), str)
                and r["q"].strip() and r["a"].strip() for r in rows):
            return None
        sides.append([(r["q"].strip(), r["a"].strip()) for r in rows[:pairs]])
    return (sides[0], sides[1]) if len(sides[0]) == len(sides[1]) else None


def cache_key(model: str, prompt: str, image_sha: str, attempt: int) -> str:
    """sha256 over (model, prompt, image sha256, attempt), joined by ``\\x1f``."""
    return hashlib.sha256("\x1f".join((model, prompt, image_sha, str(attempt))).encode("utf-8")).hexdigest()


@dataclass
class LLMGenerator:
    """Asks an OpenAI-compatible server for each record's pairs: up to :data:`LLM_ATTEMPTS` attempts
    per item, every reply cached at ``<cache>/<cache_key>.json`` (so reruns make no calls)."""

    cfg: MMRConfig
    cache: Path
    sleep: Callable[[float], None] = field(default=lambda s: time.sleep(s))
    calls: int = 0
    _backend: Any = None

    def backend(self) -> Any:
        """The HTTP backend, opened on the first cache miss."""
        if self._backend is None:
            from mmkit.core.backends import BackendConfig, OpenAIBackend

            bcfg = BackendConfig(kind="openai", model=[self.cfg.llm_model], base_url=self.cfg.llm_base_url,
                                 api_key_env=self.cfg.llm_api_key_env, concurrency=self.cfg.llm_concurrency,
                                 timeout=120.0, max_retries=5)
            self._backend = OpenAIBackend(bcfg, self.cfg.llm_model, seed=self.cfg.seed, sleep=self.sleep)
        return self._backend

    def ask(self, jobs: dict[str, tuple[str, Path | None]]) -> dict[str, str | None]:
        """One reply per job id (``(prompt, image or None)``); None for a failed request."""
        from mmkit.core.backends import GenerationSettings, Request

        requests = [Request(uid=uid, text=prompt, images=(str(img),) if img else ())
                    for uid, (prompt, img) in jobs.items()]
        settings = GenerationSettings(max_new_tokens=self.cfg.llm_max_tokens, temperature=0.0)
        out: dict[str, str | None] = {}
        with Progress(len(requests), "mmr llm") as bar:
            for line in self.backend().answer(requests, settings):
                self.calls += 1
                out[line["uid"]] = None if line.get("error") else str(line.get("prediction") or "")
                bar.update(1)
        return out

    def generate(self, recs: Sequence[tuple[Record, Path]]) -> tuple[dict[str, Item], dict[str, str]]:
        """Items for the records that parsed, and a drop reason for the rest."""
        model = self.cfg.llm_model
        state = {}
        for rec, path in recs:
            prompt = item_prompt(rec, self.cfg.pairs_per_item)
            state[str(rec["id"])] = (rec, path, prompt, sha256_file(path))
        items: dict[str, Item] = {}
        failed: dict[str, str] = {}
        pending = list(state)
        for attempt in range(LLM_ATTEMPTS):
            replies: dict[str, str | None] = {}
            misses: dict[str, tuple[str, Path | None]] = {}
            for uid in pending:
                rec, path, prompt, sha = state[uid]
                cached = self.cache / f"{cache_key(model, prompt, sha, attempt)}.json"
                if cached.is_file():
                    replies[uid] = json.loads(cached.read_text(encoding="utf-8"))["reply"]
                else:
                    misses[uid] = (prompt, path if self.cfg.llm_vision else None)
            if misses:
                for uid, reply in self.ask(misses).items():
                    replies[uid] = reply
                    if reply is not None:
                        rec, path, prompt, sha = state[uid]
                        key = cache_key(model, prompt, sha, attempt)
                        with atomic_write(self.cache / f"{key}.json") as fh:
                            json.dump({"id": uid, "attempt": attempt, "reply": reply}, fh, ensure_ascii=False)
            still = []
            for uid in pending:
                reply = replies.get(uid)
                parsed = None if reply is None else parse_reply(reply, self.cfg.pairs_per_item)
                if parsed is None:
                    still.append(uid)
                    failed[uid] = "llm_error" if reply is None else "llm_unparseable"
                    continue
                failed.pop(uid, None)
                rec = state[uid][0]
                items[uid] = Item(uid, str(rec["image"]), rec.get("category"), rec, *parsed)
            pending = still
            if not pending:
                break
        return items, failed


# --------------------------------------------------------------------------- filter, build, validate


def refuses(answer: str, phrases: Sequence[str]) -> bool:
    """True when the answer contains a refusal or hedge phrase (case-insensitive substring)."""
    low = answer.lower()
    return any(p.lower() in low for p in phrases)


def filter_pairs(item: Item, phrases: Sequence[str]) -> int:
    """Drop the i-th pair on both sides when either answer refuses or hedges; the number dropped."""
    keep = [i for i in range(len(item.pos)) if not refuses(item.pos[i][1], phrases)
            and not refuses(item.neg[i][1], phrases)]
    dropped = len(item.pos) - len(keep)
    item.pos, item.neg = [item.pos[i] for i in keep], [item.neg[i] for i in keep]
    return dropped


def conversation(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """LLaVA turns: ``"<image>\\n" + q1``, a1, q2, a2, ... alternating human / gpt."""
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return turns


def llava_item(item: Item, polarity: str) -> dict[str, Any]:
    return {"id": item.id, "image": item.image, "conversations": conversation(getattr(item, polarity))}


def check_conversation(conv: Any) -> str | None:
    """What is wrong with one item's conversations (build.md §5 validation), or None."""
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        return "expected a non-empty, even-length list of turns"
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            return f"turn {k}: expected exactly the keys 'from' and 'value'"
        if turn["from"] != ("human", "gpt")[k % 2]:
            return f"turn {k}: expected {('human', 'gpt')[k % 2]!r}, got {turn['from']!r}"
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            return f"turn {k}: expected a non-empty value"
    if sum(t["value"].count(IMAGE_TOKEN) for t in conv) != 1 or not conv[0]["value"].startswith(IMAGE_TOKEN + "\n"):
        return f"expected exactly one {IMAGE_TOKEN}, at the start of the first human turn, followed by a newline"
    return None


def validate_pairs(pos: Sequence[dict[str, Any]], neg: Sequence[dict[str, Any]]) -> list[tuple[str, DataError]]:
    """Every problem of a pos/neg item set as ``(id, error)``: duplicate ids within a side, ids
    without a partner, differing images, malformed conversations (errors name file, item, field)."""
    problems: list[tuple[str, DataError]] = []
    by_side: dict[str, dict[str, dict[str, Any]]] = {"pos.json": {}, "neg.json": {}}
    first: dict[tuple[str, str], int] = {}
    for name, items in (("pos.json", pos), ("neg.json", neg)):
        for k, it in enumerate(items, 1):
            where = dict(file=name, line=f"item {k}")
            if (name, it["id"]) in first:
                problems.append((it["id"], DataError(f"duplicate id {it['id']!r} (first at item "
                                                     f"{first[(name, it['id'])]})", field="id", **where)))
                continue
            first[(name, it["id"])] = k
            by_side[name][it["id"]] = it
            bad = check_conversation(it.get("conversations"))
            if bad:
                problems.append((it["id"], DataError(bad, field="conversations", **where)))
    pos_ids, neg_ids = by_side["pos.json"], by_side["neg.json"]
    for name, mine, other, side in (("pos.json", pos_ids, neg_ids, "pos"), ("neg.json", neg_ids, pos_ids, "neg")):
        partner = "neg" if side == "pos" else "pos"
        for item_id in mine:
            if item_id not in other:
                problems.append((item_id, DataError(f"{side} item {item_id!r} has no {partner} partner", file=name,
                                                    line=f"item {first[(name, item_id)]}", field="id")))
    for item_id, it in pos_ids.items():
        if item_id in neg_ids and neg_ids[item_id]["image"] != it["image"]:
            problems.append((item_id, DataError(f"{item_id!r}: pos image {it['image']!r} differs from neg image "
                                                f"{neg_ids[item_id]['image']!r}", file="neg.json",
                                                line=f"item {first[('neg.json', item_id)]}", field="image")))
    return problems


# --------------------------------------------------------------------------- the recipe


def run(cfg: MMRConfig, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Build ``pos.json``, ``neg.json``, ``merged.json`` and ``pairs.jsonl`` (build.md §5)."""
    with BuildRun("mmr", cfg, out, overwrite) as build:
        records = build.read(cfg.records, required=("id", "image", "question", "answer"))
        seen: dict[str, Record] = {}
        usable: list[tuple[Record, Path]] = []
        for rec in records:
            rec_id = str(rec.require("id", (str, int)))
            if rec_id in seen:
                raise rec.error("id", f"duplicate id (first at line {seen[rec_id].loc}); pos and neg items "
                                      "share one id per image")
            seen[rec_id] = rec
            for key in ("question", "answer"):
                rec.require(key, (str, int, float))
            path = resolve_image(rec.require("image"), rec, "image", cfg.image_root)
            if not path.is_file():
                on_invalid(build, cfg.on_invalid, rec.error("image", f"image file not found: {path}"),
                           rec_id, "missing_image")
                continue
            usable.append((rec, path))
        reasons: Counter = Counter({"missing_image": len(records) - len(usable)})
        build.images.update({str(rec["image"]): path for rec, path in usable})
        if cfg.dry_run and cfg.mode == "llm":  # generation is not cheap: count the usable records only
            build.stage("read", len(records), len(usable), reasons)
            return build.publish(lambda tmp: None)
        if cfg.mode == "template":
            items = {str(r["id"]): Item(str(r["id"]), str(r["image"]), r.get("category"), r,
                                        *map(lambda x: [x], template_pair(r, cfg.templates, cfg.seed)))
                     for r, _ in usable}
        else:
            gen = LLMGenerator(cfg, build.work / "llm-cache")
            build.models["llm"] = {"id": cfg.llm_model, "revision": None}
            items, failed = gen.generate(usable)
            for item_id, reason in failed.items():
                build.drop(item_id, reason)
            reasons.update(failed.values())
        build.stage("generate", len(records), len(items), reasons)

        dropped_pairs = sum(filter_pairs(it, cfg.refusal_phrases) for it in items.values())
        emptied = [i for i, it in items.items() if not it.pos]
        for item_id in emptied:
            build.drop(item_id, "refusal")
        if dropped_pairs:
            build.warn(f"refusal filter: dropped {dropped_pairs} QA pair(s) on both sides; "
                       f"{len(emptied)} item(s) left empty")
        kept = [it for i, it in items.items() if it.pos]
        build.stage("filter", len(items), len(kept), {"refusal": len(emptied)})

        pos, neg = [llava_item(it, "pos") for it in kept], [llava_item(it, "neg") for it in kept]
        bad_ids: set[str] = set()
        for item_id, err in validate_pairs(pos, neg):
            if item_id not in bad_ids:
                on_invalid(build, cfg.on_invalid, err, item_id, "invalid")
                bad_ids.add(item_id)
        final = [it for it in kept if it.id not in bad_ids]
        build.stage("validate", len(kept), len(final), {"invalid": len(kept) - len(final)})
        pos = [llava_item(it, "pos") for it in final]
        neg = [llava_item(it, "neg") for it in final]
        pairs = [{"id": it.id, "category": it.category, "polarity": side, "turns": len(getattr(it, side)),
                  "mode": cfg.mode} for side in ("pos", "neg") for it in final]

        def write(tmp: Path) -> None:
            write_json(tmp / "pos.json", pos)
            write_json(tmp / "neg.json", neg)
            write_json(tmp / "merged.json", pos + neg)
            write_jsonl(tmp / "pairs.jsonl", pairs)
            if cfg.mode == "llm":
                with atomic_write(tmp / "prompt.txt") as fh:
                    fh.write(PROMPT)

        return build.publish(write)


RECIPE = Recipe(
    name="mmr",
    config=MMRConfig,
    run=run,
    summary="MMR paired positive / leading-negative VQA training data (templates or an LLM server).",
    example="mmkit build-dataset mmr --records vqa_distractors.jsonl --image-root imgs/ --out mmr-train/",
)
