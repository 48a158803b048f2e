"""Recipe ``snare``: SNARE linguistic-alignment probes (build.md §4), read by ``mmkit evaluate snare``.

Inputs are ARO-style Visual Genome relation and attribution items, caption lists (COCO/Flickr30k
Karpathy test), or scene-graph triples from which the recipe writes ARO-style captions. Each probe
lists the correct caption first (``answer`` 0), then its perturbations, all normalised as SNARE
does. Structure shuffles need part-of-speech tags: spaCy when installed, otherwise the built-in,
offline ``rules`` tagger (a labelled stand-in), a user parse in the records, or a registered tagger.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np

from mmkit.build.manifest import Recipe
from mmkit.build.shared import BuildOptions, BuildRun, require_file, resolve_image
from mmkit.core.seeding import stable_rng
from mmkit.errors import ConfigError, MissingExtraError, MmkitError
from mmkit.io import Record, write_json, write_jsonl
from mmkit.registry import Registry

TASKS = ("negation_logic", "attribute_ownership", "relationship_composition", "spatial_relationship",
         "semantic_structure")
#: the tasks run by default (spatial_relationship is opt-in), when their input is given
DEFAULT_TASKS = ("negation_logic", "attribute_ownership", "relationship_composition", "semantic_structure")
SYMMETRIC = ("near", "next to", "beside", "on the side of", "surrounding", "close to", "standing beside",
             "with", "by")
SPATIAL = ("to the left of", "to the right of", "on", "below")
NOUN, ADJ, VERB = {"NN", "NNS", "NNP", "NNPS"}, {"JJ", "JJR", "JJS"}, {"VB", "VBD", "VBG", "VBN", "VBP", "VBZ"}
NEGATORS = {"not", "no", "never"}
MAX_REDRAWS = 10


@dataclass
class SnareConfig(BuildOptions):
    """``mmkit build-dataset snare`` options (build.md §4)."""

    relations: Optional[str] = None
    attributes: Optional[str] = None
    captions: Optional[str] = None
    triples: Optional[str] = None
    tasks: list[str] = field(default_factory=list)  # empty: every default task whose input is given
    symmetric_relations: list[str] = field(default_factory=lambda: list(SYMMETRIC))
    negation_from: Literal["attributes", "captions"] = "attributes"
    structure_variant: Literal["snare", "order"] = "snare"
    max_words: int = 30
    keep_degenerate: bool = False
    pos_tagger: str = "auto"
    caption_source: Optional[str] = None
    materialize_crops: bool = False

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            from mmkit.errors import suggest

            raise ConfigError(f"unknown task {bad[0]!r}{suggest(bad[0], TASKS)}; tasks: {', '.join(TASKS)}",
                              field="tasks")
        if not any((self.relations, self.attributes, self.captions, self.triples)):
            raise ConfigError("give at least one of --relations, --attributes, --captions, --triples",
                              field="relations")


# --------------------------------------------------------------------------- text helpers

PUNCT = re.compile(r'[.!"()*#:;~]')


def normalize(text: str, max_words: int = 30) -> str:
    """SNARE's caption normalisation: lowercase, ``. ! " ( ) * # : ; ~`` to spaces, whitespace
    collapsed and stripped, cut to ``max_words`` words."""
    return " ".join(PUNCT.sub(" ", text.lower()).split()[:max_words])


def relation_phrase(caption: str, relation: str) -> re.Match | None:
    """The first ``is {relation}`` in a caption (whole words), or None."""
    return re.search(rf"\bis {re.escape(relation)}\b", caption)


def is_negated(caption: str) -> bool:
    """True if the caption already holds not, no, never or an n't word."""
    return any(w in NEGATORS or w.endswith("n't") for w in (x.strip(".,!?;:") for x in caption.lower().split()))


def negate_copula(caption: str) -> str | None:
    """``not`` after the first standalone is/are (None without one)."""
    words = caption.split()
    k = next((i for i, w in enumerate(words) if w.lower().strip(".,!?;:") in ("is", "are")), None)
    return None if k is None else " ".join(words[: k + 1] + ["not"] + words[k + 1:])


# --------------------------------------------------------------------------- items


@dataclass
class Item:
    """One source item: where it came from and what the task builders need."""

    sid: str  # source id: "<dataset>-<index>" (captions: "-<k>")
    source: dict[str, Any]
    image: str
    image_path: Path
    bbox: list[float] | None
    rec: Record
    caption: str = ""
    false_caption: str | None = None
    relation: str = ""
    obj1: str = ""
    obj2: str = ""
    attrs: tuple[str, str] = ("", "")
    subtask: str = ""
    parse: list[tuple[str, str]] | None = None


def _bbox(rec: Record) -> list[float]:
    out = []
    for key in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"):
        value = rec.require(key, (int, float))
        out.append(value)
    return out


def _text(rec: Record, key: str) -> str:
    return str(rec.require(key, str)).strip()


def relation_items(records: Sequence[Record], dataset: str, root: str | None) -> list[Item]:
    """ARO relation items (``image_path``, ``bbox_*``, ``true_caption``, ``false_caption``?,
    ``relation_name``, ``obj1_name``, ``obj2_name``)."""
    return [Item(f"{dataset}-{i}", {"dataset": dataset, "index": i}, rec.require("image_path"),
                 resolve_image(rec["image_path"], rec, "image_path", root), _bbox(rec), rec,
                 caption=_text(rec, "true_caption"), false_caption=rec.get("false_caption"),
                 relation=_text(rec, "relation_name"), obj1=_text(rec, "obj1_name"), obj2=_text(rec, "obj2_name"))
            for i, rec in enumerate(records)]


def attribute_items(records: Sequence[Record], dataset: str, root: str | None) -> list[Item]:
    """ARO attribution items (``image_path``, ``bbox_*``, ``true_caption``, ``false_caption``?,
    ``attributes`` [a1, a2], ``obj1_name``, ``obj2_name``)."""
    items = []
    for i, rec in enumerate(records):
        attrs = rec.require("attributes", list)
        if len(attrs) != 2 or not all(isinstance(a, str) and a.strip() for a in attrs):
            raise rec.error("attributes", f"expected two attribute strings [a1, a2], got {attrs!r}")
        items.append(Item(f"{dataset}-{i}", {"dataset": dataset, "index": i}, rec.require("image_path"),
                          resolve_image(rec["image_path"], rec, "image_path", root), _bbox(rec), rec,
                          caption=_text(rec, "true_caption"), false_caption=rec.get("false_caption"),
                          obj1=_text(rec, "obj1_name"), obj2=_text(rec, "obj2_name"),
                          attrs=(attrs[0].strip(), attrs[1].strip())))
    return items


def triple_items(records: Sequence[Record], root: str | None) -> tuple[list[Item], list[Item]]:
    """Scene-graph triples -> relation items ("the {s} is {r} the {o}") and, where both sides
    carry attributes, attribute items ("the {a1} {o1} and the {a2} {o2}", first attribute each)."""
    rels, attrs = [], []
    for i, rec in enumerate(records):
        s, r, o = (_text(rec, k) for k in ("subject", "relation", "object"))
        bbox = rec.get("bbox")
        if bbox is not None and (not isinstance(bbox, list) or len(bbox) != 4):
            raise rec.error("bbox", f"expected [x, y, w, h] or null, got {bbox!r}")
        common = dict(source={"dataset": "triples", "index": i}, image=rec.require("image"),
                      image_path=resolve_image(rec["image"], rec, "image", root), bbox=bbox, rec=rec,
                      obj1=s, obj2=o)
        rels.append(Item(f"triples-{i}", caption=f"the {s} is {r} the {o}", false_caption=f"the {o} is {r} the {s}",
                         relation=r, **common))
        sa, oa = rec.get("subject_attrs") or [], rec.get("object_attrs") or []
        if sa and oa:
            attrs.append(Item(f"triples-{i}", caption=f"the {sa[0]} {s} and the {oa[0]} {o}",
                              false_caption=f"the {oa[0]} {s} and the {sa[0]} {o}", attrs=(sa[0], oa[0]), **common))
    return rels, attrs


def caption_items(records: Sequence[Record], default_source: str, root: str | None, with_parse: bool) -> list[Item]:
    """Caption records (``image`` plus ``caption`` — a string or list — or ``captions``); with
    ``with_parse`` each caption needs its ``tokens`` and ``tags`` (lists, or lists of lists)."""
    items = []
    for i, rec in enumerate(records):
        key = "captions" if "captions" in rec else "caption"
        value = rec.require(key, (str, list))
        caps = [value] if isinstance(value, str) else value
        parses: list[Any] = [None] * len(caps)
        if with_parse:
            toks, tags = rec.require("tokens", list), rec.require("tags", list)
            toks, tags = ([toks], [tags]) if isinstance(value, str) else (toks, tags)
            if len(toks) != len(caps) or len(tags) != len(caps) or any(len(a) != len(b) for a, b in zip(toks, tags)):
                raise rec.error("tags", "expected tokens and tags aligned with the captions")
            parses = [list(zip(a, b)) for a, b in zip(toks, tags)]
        dataset = str(rec.get("source") or default_source)
        for k, (cap, parse) in enumerate(zip(caps, parses)):
            if not isinstance(cap, str) or not cap.strip():
                raise rec.error(f"{key}[{k}]", "expected a non-empty caption string")
            items.append(Item(f"{dataset}-{i}-{k}", {"dataset": dataset, "index": i, "caption": k},
                              rec.require("image"), resolve_image(rec["image"], rec, "image", root), None, rec,
                              caption=cap.strip(), subtask=dataset, parse=parse))
    return items


# --------------------------------------------------------------------------- part-of-speech taggers

Tagger = Callable[[str], list[tuple[str, str]]]
#: name -> factory(argument) -> tagger; ``records`` is handled by the items (the input's parse)
TAGGERS: Registry = Registry("POS tagger")

DETERMINERS = set("a an the this that these those some any each every no another either neither both all "
                  "several many few much".split())
PREPOSITIONS = set("in on at of to from with without by for about above below under over behind beside "
                   "between among into onto through near across along around against toward towards inside "
                   "outside upon off up down beneath underneath atop within during after before like".split())
PRONOUNS = set("i you he she it we they me him her us them his its our their my your itself themselves "
               "someone something".split())
CONJUNCTIONS = set("and or but nor so yet while".split())
COPULAS = {"is": "VBZ", "are": "VBP", "am": "VBP", "was": "VBD", "were": "VBD", "be": "VB", "been": "VBN",
           "being": "VBG", "has": "VBZ", "have": "VBP", "had": "VBD", "does": "VBZ", "do": "VBP", "did": "VBD"}
MODALS = set("can could will would shall should may might must".split())
COMMON_ADJECTIVES = set("white black red blue green yellow brown gray grey orange pink purple silver golden "
                        "dark light big small large little tall short long old young new wooden metal "
                        "empty full open closed wet dry hot cold clean dirty".split())
ADJ_SUFFIXES = ("ful", "ous", "ive", "able", "ible", "less", "ish", "ic")
ING_NOUNS = set("thing something nothing anything everything ceiling building clothing morning evening "
                "ring king wing string spring swing painting".split())
WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


def rules_tag(word: str) -> str:
    """The ``rules`` tagger's Penn tag for one token: closed-class lists, a few common colour and
    size adjectives, suffix rules for adjectives and verbs, nouns by default."""
    w = word.lower()
    if not w[0].isalnum():
        return "."
    if w.isdigit():
        return "CD"
    closed = {**{x: "DT" for x in DETERMINERS}, **{x: "IN" for x in PREPOSITIONS}, **{x: "PRP" for x in PRONOUNS},
              **{x: "CC" for x in CONJUNCTIONS}, **{x: "MD" for x in MODALS}, **COPULAS,
              "to": "TO", "there": "EX", "not": "RB", "n't": "RB"}
    if w in closed:
        return closed[w]
    if w in COMMON_ADJECTIVES or (w.endswith(ADJ_SUFFIXES) and len(w) > 4):
        return "JJ"
    if w.endswith("est") and len(w) > 5:
        return "JJS"
    if w.endswith("ing") and len(w) > 4 and w not in ING_NOUNS:
        return "VBG"
    if w.endswith("ed") and len(w) > 4:
        return "VBD"
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        return "NNS"
    return "NN"


@TAGGERS.register("rules")
def rules_tagger(arg: str = "") -> Tagger:
    """Deterministic, offline: regex tokens tagged by :func:`rules_tag` (a labelled stand-in for spaCy)."""
    return lambda text: [(t, rules_tag(t)) for t in WORD.findall(text)]


@TAGGERS.register("spacy")
def spacy_tagger(model: str = "en_core_web_sm") -> Tagger:
    """spaCy's fine-grained ``tag_`` (extra ``mmkit[snare]`` plus the model package)."""
    if importlib.util.find_spec("spacy") is None:
        raise MissingExtraError("spacy", "snare", "--pos-tagger spacy")
    import spacy

    try:
        nlp = spacy.load(model, disable=["parser", "ner", "lemmatizer"])
    except OSError:
        raise MmkitError(f"spaCy model {model!r} is not installed (python -m spacy download {model})",
                         field="pos_tagger") from None
    return lambda text: [(t.text, t.tag_) for t in nlp(text)]


def resolve_tagger(spec: str) -> tuple[str, str | None]:
    """``--pos-tagger`` -> (the tagger spec actually used, a warning or None). ``auto`` is
    ``spacy:en_core_web_sm`` when spaCy and that model are installed, else ``rules``."""
    if spec != "auto":
        return spec, None
    if importlib.util.find_spec("spacy") is not None and importlib.util.find_spec("en_core_web_sm") is not None:
        return "spacy:en_core_web_sm", None
    return "rules", ("--pos-tagger auto: spaCy or en_core_web_sm is not installed; using the built-in rules "
                     "tagger (pip install 'mmkit[snare]' and the model for spaCy tags)")


def make_tagger(spec: str) -> Tagger | None:
    """A tagger from its spec (``rules``, ``spacy:MODEL`` or a registered name); None for ``records``."""
    if spec == "records":
        return None
    name, _, arg = spec.partition(":")
    factory = TAGGERS.resolve(name, field="pos_tagger")
    return factory(arg) if arg else factory()


# --------------------------------------------------------------------------- shuffles


def permute_positions(tokens: list[str], positions: Sequence[int], rng: np.random.Generator) -> None:
    """Permute the tokens at ``positions`` among themselves (in place)."""
    if len(positions) > 1:
        values = [tokens[p] for p in positions]
        for p, j in zip(positions, rng.permutation(len(positions))):
            tokens[p] = values[j]


def shuffle_classes(tokens: Sequence[str], tags: Sequence[str], classes: Sequence[set[str]],
                    rng: np.random.Generator) -> list[str]:
    """Each class's tokens permuted among that class's positions, classes independently."""
    out = list(tokens)
    for cls in classes:
        permute_positions(out, [i for i, t in enumerate(tags) if t in cls], rng)
    return out


def shuffle_rest(tokens: Sequence[str], tags: Sequence[str], excluded: set[str], rng: np.random.Generator) -> list[str]:
    """Every token whose tag is not in ``excluded`` permuted among its own positions."""
    out = list(tokens)
    permute_positions(out, [i for i, t in enumerate(tags) if t not in excluded], rng)
    return out


def trigrams(tokens: Sequence[str]) -> list[list[str]]:
    """Consecutive groups of 3 from the start (the last possibly shorter)."""
    return [list(tokens[i:i + 3]) for i in range(0, len(tokens), 3)]


def shuffle_within_trigrams(tokens: Sequence[str], rng: np.random.Generator) -> list[str]:
    return [g[j] for g in trigrams(tokens) for j in rng.permutation(len(g))]


def shuffle_trigrams(tokens: Sequence[str], rng: np.random.Generator) -> list[str]:
    groups = trigrams(tokens)
    return [t for j in rng.permutation(len(groups)) for t in groups[j]]


Shuffle = Callable[[str, Sequence[str], Sequence[str], np.random.Generator], list[str]]
#: variant -> [(option label, shuffle(raw caption, tokens, tags, rng) -> tokens)]
STRUCTURE_VARIANTS: dict[str, list[tuple[str, Shuffle]]] = {
    "snare": [
        ("shuffle_nva", lambda raw, tok, tag, rng: shuffle_classes(tok, tag, (NOUN, VERB, ADJ), rng)),
        ("shuffle_non_nva", lambda raw, tok, tag, rng: shuffle_rest(tok, tag, NOUN | VERB | ADJ, rng)),
        ("shuffle_all", lambda raw, tok, tag, rng: [raw.split()[j] for j in rng.permutation(len(raw.split()))]),
    ],
    "order": [
        ("shuffle_nouns_and_adj", lambda raw, tok, tag, rng: shuffle_classes(tok, tag, (NOUN, ADJ), rng)),
        ("shuffle_allbut_nouns_and_adj", lambda raw, tok, tag, rng: shuffle_rest(tok, tag, NOUN | ADJ, rng)),
        ("shuffle_within_trigrams", lambda raw, tok, tag, rng: shuffle_within_trigrams(tok, rng)),
        ("shuffle_trigrams", lambda raw, tok, tag, rng: shuffle_trigrams(tok, rng)),
    ],
}


# --------------------------------------------------------------------------- task builders


@dataclass(frozen=True)
class Settings:
    """What the builders need from the config (picklable, for worker processes)."""

    seed: int = 0
    max_words: int = 30
    keep_degenerate: bool = False
    symmetric: frozenset[str] = frozenset(SYMMETRIC)
    variant: str = "snare"
    tagger: str = "rules"


Built = tuple[list[str], list[str]] | str  # (captions, labels) or a skip reason


def build_negation(item: Item, s: Settings) -> Built:
    """correct "the {o1} is {a1} and the {o2} is {a2}"; negative with "is not" in both clauses."""
    (a1, a2), o1, o2 = item.attrs, item.obj1, item.obj2
    return ([f"the {o1} is {a1} and the {o2} is {a2}", f"the {o1} is not {a1} and the {o2} is not {a2}"],
            ["correct", "negative"])


def build_negation_copula(item: Item, s: Settings) -> Built:
    """``--negation-from captions``: "not" after the first standalone is/are of a free caption."""
    if is_negated(item.caption):
        return "negated"
    negative = negate_copula(item.caption)
    return "no_copula" if negative is None else ([item.caption, negative], ["correct", "negative"])


def build_ownership(item: Item, s: Settings) -> Built:
    """correct; exchange (attributes swapped); separate "... are {a1} and {a2} respectively"."""
    (a1, a2), o1, o2 = item.attrs, item.obj1, item.obj2
    if a1 == a2:
        return "same_attribute"
    exchange = item.false_caption or f"the {a2} {o1} and the {a1} {o2}"
    return ([item.caption, exchange, f"the {o1} and the {o2} are {a1} and {a2} respectively"],
            ["correct", "exchange", "separate"])


def build_composition(item: Item, s: Settings) -> Built:
    """correct; exchange (subject and object swapped); and (the first "is {relation}" -> "and")."""
    if item.relation.lower() in s.symmetric:
        return "symmetric"
    m = relation_phrase(item.caption, item.relation)
    if m is None:
        return "no_copula"
    exchange = item.false_caption or f"the {item.obj2} is {item.relation} the {item.obj1}"
    conj = item.caption[: m.start()] + "and" + item.caption[m.end():]
    return [item.caption, exchange, conj], ["correct", "exchange", "and"]


def build_spatial(item: Item, s: Settings) -> Built:
    """The correct caption, then the other three of :data:`SPATIAL` substituted, in that order."""
    if item.relation not in SPATIAL:
        return "other_relation"
    m = relation_phrase(item.caption, item.relation)
    if m is None:
        return "no_copula"
    others = [r for r in SPATIAL if r != item.relation]
    return ([item.caption] + [item.caption[: m.start()] + f"is {r}" + item.caption[m.end():] for r in others],
            ["correct", *others])


def structure_options(item: Item, s: Settings, tagger: Tagger | None, probe_id: str) -> tuple[list[str], list[str], bool]:
    """The correct caption and its shuffles (normalised), redrawing a shuffle that repeats an
    earlier option up to :data:`MAX_REDRAWS` times; also says whether a clash remained."""
    parse = item.parse if item.parse is not None else tagger(item.caption)
    toks, tags = [t for t, _ in parse], [g for _, g in parse]
    options = [normalize(item.caption, s.max_words)]
    labels = ["correct"]
    degenerate = False
    for label, shuffle in STRUCTURE_VARIANTS[s.variant]:
        rng = stable_rng(s.seed, probe_id, label)
        for _ in range(1 + MAX_REDRAWS):
            text = normalize(" ".join(shuffle(item.caption, toks, tags, rng)), s.max_words)
            if text not in options:
                break
        else:
            degenerate = True
        options.append(text)
        labels.append(label)
    return options, labels, degenerate


def _structure_shard(items: list[Item], s: Settings) -> list[tuple[list[str], list[str], bool]]:
    """One worker's share of the structure probes (the tagger is built in the worker)."""
    tagger = make_tagger(s.tagger)
    return [structure_options(it, s, tagger, f"semantic_structure/{it.sid}") for it in items]


def structure_all(items: list[Item], s: Settings, workers: int) -> list[tuple[list[str], list[str], bool]]:
    """Structure options for every item; ``workers`` > 1 splits the items into contiguous shards
    handled by worker processes and merged in shard order (per-item seeds: same output)."""
    if workers <= 1 or len(items) < 2:
        return _structure_shard(items, s)
    bounds = np.linspace(0, len(items), min(workers, len(items)) + 1).astype(int)
    shards = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    with ProcessPoolExecutor(max_workers=len(shards)) as pool:
        return [r for part in pool.map(_structure_shard, shards, [s] * len(shards)) for r in part]


#: task -> (input kind, builder) for the deterministic tasks
BUILDERS: dict[str, tuple[str, Callable[[Item, Settings], Built]]] = {
    "negation_logic": ("attributes", build_negation),
    "attribute_ownership": ("attributes", build_ownership),
    "relationship_composition": ("relations", build_composition),
    "spatial_relationship": ("relations", build_spatial),
}


def subtask(task: str, item: Item) -> str:
    """The breakdown key: relation name, "a1_a2", or the caption source."""
    if task in ("relationship_composition", "spatial_relationship"):
        return item.relation
    if item.subtask:
        return item.subtask
    return f"{item.attrs[0]}_{item.attrs[1]}"


def probe(task: str, item: Item, captions: list[str], labels: list[str], image: str, bbox: Any) -> dict[str, Any]:
    """One ``probes.jsonl`` line (keys in spec order)."""
    return {"id": f"{task}/{item.sid}", "task": task, "subtask": subtask(task, item), "image": image,
            "bbox": bbox, "captions": captions, "option_labels": labels, "answer": 0, "source": item.source}


def is_degenerate(captions: Sequence[str]) -> bool:
    """True when two options are the same string."""
    return len(set(captions)) < len(captions)


# --------------------------------------------------------------------------- the recipe


def _load_items(cfg: SnareConfig, run: BuildRun) -> dict[str, list[Item]]:
    items: dict[str, list[Item]] = {"relations": [], "attributes": [], "captions": []}
    if cfg.relations:
        items["relations"] += relation_items(run.read(cfg.relations), "vg_relation", cfg.image_root)
    if cfg.attributes:
        items["attributes"] += attribute_items(run.read(cfg.attributes), "vg_attribution", cfg.image_root)
    if cfg.triples:
        rels, attrs = triple_items(run.read(cfg.triples), cfg.image_root)
        items["relations"] += rels
        items["attributes"] += attrs
    if cfg.captions:
        source = cfg.caption_source or Path(cfg.captions).stem
        items["captions"] = caption_items(run.read(cfg.captions), source, cfg.image_root,
                                          with_parse=cfg.pos_tagger == "records")
    return items


def _tasks(cfg: SnareConfig, items: dict[str, list[Item]]) -> list[str]:
    kind = {**{t: k for t, (k, _) in BUILDERS.items()}, "semantic_structure": "captions"}
    given = {"relations": bool(cfg.relations or cfg.triples), "attributes": bool(cfg.attributes or cfg.triples),
             "captions": bool(cfg.captions)}

    def runnable(task: str) -> bool:
        copula = task == "negation_logic" and cfg.negation_from == "captions" and given["captions"]
        return given[kind[task]] or copula

    if not cfg.tasks:
        return [t for t in DEFAULT_TASKS if runnable(t)]
    for t in cfg.tasks:
        if not runnable(t):
            flag = {"relations": "--relations or --triples", "attributes": "--attributes or --triples",
                    "captions": "--captions"}[kind[t]]
            raise ConfigError(f"task {t} needs {flag}", field="tasks")
    return list(cfg.tasks)


def run(cfg: SnareConfig, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Build ``probes.jsonl`` and ``summary.json`` (build.md §4)."""
    with BuildRun("snare", cfg, out, overwrite) as build:
        items = _load_items(cfg, build)
        tasks = _tasks(cfg, items)
        cfg.pos_tagger, warning = resolve_tagger(cfg.pos_tagger)
        if "semantic_structure" in tasks and warning:
            build.warn(warning)
        if "semantic_structure" in tasks and cfg.pos_tagger == "rules":
            build.standins.append({"component": "POS tagger", "name": "rules",
                                   "replaces": "spaCy en_core_web_sm (SNARE's tagger)"})
        settings = Settings(cfg.seed, cfg.max_words, cfg.keep_degenerate,
                            frozenset(r.lower() for r in cfg.symmetric_relations), cfg.structure_variant,
                            cfg.pos_tagger)
        out_path = build.out
        candidates: list[tuple[str, Item, Built, bool]] = []
        for task in tasks:
            if task == "semantic_structure":
                results = structure_all(items["captions"], settings, cfg.num_workers)
                candidates += [(task, it, (caps, labels), deg) for it, (caps, labels, deg) in
                               zip(items["captions"], results)]
                continue
            kind, builder = BUILDERS[task]
            candidates += [(task, it, builder(it, settings), False) for it in items[kind]]
            if task == "negation_logic" and cfg.negation_from == "captions":
                candidates += [(task, it, build_negation_copula(it, settings), False) for it in items["captions"]]
        probes, crops, skipped = [], {}, defaultdict(Counter)
        for task, item, built, clash in candidates:
            pid = f"{task}/{item.sid}"
            if not isinstance(built, str):
                captions = [normalize(c, cfg.max_words) for c in built[0]]
                if (clash or is_degenerate(captions)) and not cfg.keep_degenerate:
                    built = "degenerate"
            if isinstance(built, str):
                skipped[task][built] += 1
                build.drop(pid, built)
                continue
            image, bbox = os.path.relpath(item.image_path, out_path), item.bbox
            if cfg.materialize_crops and bbox is not None:
                image, bbox = f"images/{item.sid}.png", None
                crops[image] = item
            probes.append(probe(task, item, captions, built[1], image, bbox))
        probes.sort(key=lambda p: (p["task"], p["id"]))
        build.images.update({it.image: it.image_path for _, it, _, _ in candidates})
        for item in crops.values():
            require_file(item.image_path, item.rec, "image_path" if "image_path" in item.rec else "image")
        dropped = Counter()
        for reasons in skipped.values():
            dropped.update(reasons)
        build.stage("probes", len(candidates), len(probes), dropped)
        summary = summarize(probes, skipped, tasks)

        def write(tmp: Path) -> None:
            write_jsonl(tmp / "probes.jsonl", probes)
            write_json(tmp / "summary.json", summary)
            for name, item in sorted(crops.items()):
                save_crop(item, tmp / name)

        return build.publish(write)


def summarize(probes: Sequence[dict[str, Any]], skipped: dict[str, Counter], tasks: Sequence[str]) -> dict[str, Any]:
    """``summary.json``: probes per task and subtask, and skips per task by reason."""
    per: dict[str, Counter] = {t: Counter() for t in tasks}
    for p in probes:
        per[p["task"]][p["subtask"]] += 1
    return {"tasks": {t: {"probes": sum(c.values()), "subtasks": dict(sorted(c.items()))} for t, c in per.items()},
            "skipped": {t: dict(sorted(skipped[t].items())) for t in tasks if skipped.get(t)}}


def save_crop(item: Item, dst: Path) -> None:
    """``--materialize-crops``: the item's box ``(x, y, x + w, y + h)`` as a PNG."""
    from mmkit.core.data import load_image

    x, y, w, h = item.bbox
    dst.parent.mkdir(parents=True, exist_ok=True)
    load_image(str(item.image_path)).crop((x, y, x + w, y + h)).save(dst, format="PNG")


RECIPE = Recipe(
    name="snare",
    config=SnareConfig,
    run=run,
    summary="SNARE probes (negation, attribute ownership, relation composition, structure) -> probes.jsonl.",
    example="mmkit build-dataset snare --relations visual_genome_relation.json "
            "--attributes visual_genome_attribution.json --captions coco_karpathy_test.json --out snare/",
)
