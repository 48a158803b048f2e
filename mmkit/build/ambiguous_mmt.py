"""Recipe ``ambiguous-mmt``: 3AM-style ambiguity-selected English->Chinese multimodal MT data
(build.md §3).

Two modes. ``--import-release DIR`` checks a 3AM release ``data/`` folder (nine files, aligned
line counts, UTF-8/LF, the published counts, pinned sha256) and copies it. ``--captions SPEC``
selects from a pool of ``{id, image, en, zh, source?}`` records by an ambiguity score and writes
the same layout: ``{split}.en``, ``{split}.zh``, ``images-{split}.txt`` plus ``scores-{split}.jsonl``.

The ambiguity scorer is **the project's stand-in** for 3AM's unpublished word-sense-disambiguation
model: content words are looked up in a sense inventory (WordNet files, a TSV, or a user
classifier) and scored by their sense count or sense entropy; the manifest lists it under
``standins`` and every score row names it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol, Sequence

from mmkit.build.manifest import Recipe
from mmkit.build.shared import (BuildOptions, BuildRun, image_mode, place_image, require_file,
                                resolve_image, write_lines)
from mmkit.core.seeding import stable_seed
from mmkit.errors import ConfigError, DataError, MmkitError
from mmkit.io import Record, sha256_file, write_jsonl
from mmkit.registry import Registry, import_string

SPLITS = ("train", "val", "test")
#: line counts of the release at the pinned commit (build.md §3)
RELEASE_COUNTS = {"train": 23931, "val": 1000, "test": 1000}
RELEASE_COMMIT = "ce8099724d9ecc8e5c77e44f43d9b7924118f037"
#: sha256 of each release file at :data:`RELEASE_COMMIT`
RELEASE_SHA256 = {
    "train.en": "3b839b554de9aa369a199d1f1e42779a3c9c3491a9396c5b5b1a0bbd815db175",
    "train.zh": "ef6664af8f0fdfef14ca55ba832b20a73fdcb2576c2de41913f2c53c2f15708d",
    "images-train.txt": "b249fffdc706fd96593954807762c7cb2323cdc48545116c95c017ea4117aae8",
    "val.en": "7143a3ba2e84454b72df30e7248cac15168273c0735d0483360e6b2699e9fabd",
    "val.zh": "4bb831d994db78b14a2a652cfc6baad264d9d16ccdc4b5650092f94e3bc6af7d",
    "images-val.txt": "0bc6342c9bc6f683917a1e26c484da00e91edded075f031916c1ab394ce894cc",
    "test.en": "a9706d20793389013cbec6e9a4ee9e7b19472fea7bb48589653daae21e07ae3a",
    "test.zh": "989e2c342f4462bbeae71430ad5d7cc557fdcc3e517fdfb3e20a6d2b35d42a53",
    "images-test.txt": "e77c3dc0165b7e52d1a26a2743ed5dba98b0f4ff6b4600406b0544ee36399eaf",
}
#: the test files before the 2024-12-09 "Test data correction" commit
PRE_REVISION_SHA256 = {
    "test.en": "be9c037b73d7feae87e29fe79ea2656befdac2d78c018298f329cfbddd75c325",
    "test.zh": "5b38cd7ad4c407b41174c8bb3b13ac386eb4f397fa2c483f5acd8224b1211183",
}
TOP_K_DEFAULT = 26000
POS_NAMES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
CJK = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002a6df]")
TOKEN = re.compile(r"[a-z]+(?:['-][a-z]+)*")

STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most
mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same shan't
she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves then
there there's these they they'd they'll they're they've this those through to too under until up very was
wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's
whom why why's with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
""".split())

#: WordNet's morphy suffix rules per POS, tried in this order (build.md §3)
SUFFIX_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}


@dataclass
class AmbiguousMMTConfig(BuildOptions):
    """``mmkit build-dataset ambiguous-mmt`` options (build.md §3)."""

    import_release: Optional[str] = None
    image_dir: Optional[str] = None
    expect_counts: bool = True
    captions: Optional[str] = None
    sense_inventory: Optional[str] = None
    pos: list[str] = field(default_factory=lambda: ["n", "v", "a"])
    word_score: Literal["senses", "entropy"] = "entropy"
    aggregate: Literal["max", "mean"] = "max"
    smoothing: float = 1.0
    stopwords: Optional[str] = None
    threshold: Optional[float] = None
    top_fraction: Optional[float] = None
    top_k: Optional[int] = None
    image_name: Optional[str] = None
    val_size: int = 1000
    test_size: int = 1000
    split_unit: Literal["image", "caption"] = "image"
    copy_images: bool = False
    link_images: bool = False

    def validate(self) -> None:
        if (self.import_release is None) == (self.captions is None):
            raise ConfigError("give exactly one of --import-release DIR and --captions SPEC", field="captions")
        chosen = [k for k in ("threshold", "top_fraction", "top_k") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ConfigError(f"choose one of --threshold, --top-fraction, --top-k (got {', '.join(chosen)})",
                              field=chosen[1])
        if not chosen:
            self.top_k = TOP_K_DEFAULT
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ConfigError(f"expected a fraction in (0, 1], got {self.top_fraction}", field="top_fraction")
        bad = [p for p in self.pos if p not in POS_NAMES]
        if bad:
            raise ConfigError(f"unknown part of speech {bad[0]!r}; expected some of n, v, a, r", field="pos")
        if self.captions is not None and not self.sense_inventory:
            raise ConfigError("--captions needs --sense-inventory (wordnet-dict:DIR, tsv:FILE or "
                              "classifier:MODULE:FUNC)", field="sense_inventory")
        image_mode(self.copy_images, self.link_images)


# --------------------------------------------------------------------------- mode A: release import


def read_text_lines(path: Path) -> list[str]:
    """A release text file's lines: UTF-8, LF endings, no empty line (errors name the line)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for i, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError("expected UTF-8 text", file=str(path), line=i, field="text") from None
        if "\r" in line:
            raise DataError("expected LF line endings, found CR", file=str(path), line=i, field="text")
        if not line.strip():
            raise DataError("expected a non-empty line", file=str(path), line=i, field="text")
        out.append(line)
    return out


def release_files(split: str) -> tuple[str, str, str]:
    """The three line-aligned files of a split."""
    return f"{split}.en", f"{split}.zh", f"images-{split}.txt"


def check_release(folder: Path, expect_counts: bool, warn: Callable[[str], None]) -> dict[str, list[str]]:
    """Check a release ``data/`` folder (build.md §3 mode A) and return ``{file name: lines}``."""
    names = [n for s in SPLITS for n in release_files(s)]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"missing release file(s) {', '.join(missing)}; a 3AM data/ folder holds "
                        f"{', '.join(names)}", file=str(folder), field="--import-release")
    content = {n: read_text_lines(folder / n) for n in names}
    for split in SPLITS:
        files = release_files(split)
        longest = max(len(content[n]) for n in files)
        for n in files:
            if len(content[n]) < longest:
                others = ", ".join(f"{m} has {len(content[m])}" for m in files if m != n)
                raise DataError(f"missing line: the split's files are line-aligned ({others} lines, this file "
                                f"{len(content[n])})", file=str(folder / n), line=len(content[n]) + 1,
                                field="line")
        if expect_counts and longest != RELEASE_COUNTS[split]:
            raise DataError(f"expected {RELEASE_COUNTS[split]} lines in the released {split} split, got "
                            f"{longest} (pass --no-expect-counts for other data)",
                            file=str(folder / files[0]), field="lines")
    for n in names:
        digest = sha256_file(folder / n)
        if digest == PRE_REVISION_SHA256.get(n):
            warn(f"{n}: this is the test file from before the 2024-12-09 'Test data correction' "
                 f"(commit {RELEASE_COMMIT[:12]}); its references predate the correction")
        elif digest != RELEASE_SHA256[n]:
            warn(f"{n}: sha256 {digest[:12]}... differs from the release at commit {RELEASE_COMMIT[:12]}")
    return content


def _import_release(cfg: AmbiguousMMTConfig, run: BuildRun) -> Callable[[Path], None]:
    folder = Path(cfg.import_release).expanduser()
    run.inputs.extend(str(folder / n) for s in SPLITS for n in release_files(s))
    content = check_release(folder, cfg.expect_counts, run.warn)
    images: dict[str, Path] = {}
    if cfg.image_dir:
        root = Path(cfg.image_dir).expanduser()
        for split in SPLITS:
            name = f"images-{split}.txt"
            for i, img in enumerate(content[name], 1):
                if not (root / img).is_file():
                    raise DataError(f"image not found under {root}", file=name, line=i, field="image")
                images[img] = root / img
    n = sum(len(content[f"{s}.en"]) for s in SPLITS)
    run.stage("import", n, n)
    run.images.update(images)
    mode = image_mode(cfg.copy_images, cfg.link_images)

    def write(tmp: Path) -> None:
        for name, lines in content.items():
            write_lines(tmp / name, lines)
        if mode and images:
            for img, src in sorted(images.items()):
                place_image(src, tmp / "images" / img, mode)

    return write


# --------------------------------------------------------------------------- the stand-in scorer


def tokens(text: str, stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """Content tokens: NFKC, lowercase, ``[a-z]+(?:['-][a-z]+)*`` of length >= 2, minus stopwords."""
    text = unicodedata.normalize("NFKC", text).lower()
    return [t for t in TOKEN.findall(text) if len(t) >= 2 and t not in stopwords]


def morphy_candidates(form: str, pos: str, exceptions: dict[str, dict[str, list[str]]]) -> list[str]:
    """Lemma candidates in WordNet's order: the surface form, its exceptions, then suffix rules."""
    out = [form, *exceptions.get(pos, {}).get(form, [])]
    out += [form[: len(form) - len(old)] + new for old, new in SUFFIX_RULES[pos] if form.endswith(old)]
    return [c for c in dict.fromkeys(out) if c]


@dataclass(frozen=True)
class WordSenses:
    """A content word's senses: its lemma and one weight per sense (``counted``: the weights are
    tag counts or probabilities; otherwise the senses are taken as equally likely)."""

    token: str
    lemma: str
    weights: tuple[float, ...]
    counted: bool
    smoothing: bool = True  # add alpha (False for a classifier's probabilities)


class SenseInventory(Protocol):
    """Gives each content token of a caption its senses, or None (no sense in the inventory)."""

    name: str

    def lookup(self, text: str, toks: Sequence[str], pos: Sequence[str]) -> list[WordSenses | None]: ...


@dataclass
class DictInventory:
    """A lemma -> senses table (WordNet index files or a TSV), looked up through morphy."""

    name: str
    senses: dict[tuple[str, str], list[float]]  # (lemma, pos) -> weight per sense
    counted: bool
    exceptions: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def lemma(self, form: str, pos: str) -> str | None:
        """The first morphy candidate of ``form`` that the inventory holds for ``pos``."""
        return next((c for c in morphy_candidates(form, pos, self.exceptions) if (c, pos) in self.senses), None)

    def lookup(self, text: str, toks: Sequence[str], pos: Sequence[str]) -> list[WordSenses | None]:
        out: list[WordSenses | None] = []
        for tok in toks:
            found = [(p, lem) for p in pos if (lem := self.lemma(tok, p)) is not None]
            weights = tuple(w for p, lem in found for w in self.senses[(lem, p)])
            out.append(WordSenses(tok, found[0][1], weights, self.counted) if found else None)
        return out


@dataclass
class ClassifierInventory:
    """A user WSD plugin: ``FUNC(text, tokens) -> [probabilities over the token's senses or None]``."""

    name: str
    func: Callable[[str, list[str]], Sequence[Sequence[float] | None]]

    def lookup(self, text: str, toks: Sequence[str], pos: Sequence[str]) -> list[WordSenses | None]:
        probs = list(self.func(text, list(toks)))
        if len(probs) != len(toks):
            raise MmkitError(f"{self.name} returned {len(probs)} results for {len(toks)} tokens",
                             field="sense_inventory")
        return [None if not p else WordSenses(t, t, tuple(float(x) for x in p), True, smoothing=False)
                for t, p in zip(toks, probs)]


INVENTORIES: Registry = Registry("sense inventory")


@INVENTORIES.register("wordnet-dict")
def wordnet_dict(arg: str) -> DictInventory:
    """A WordNet 3.0 database directory: ``index.{noun,verb,adj,adv}`` (sense counts; lines that
    start with a space are licence text), ``*.exc`` (exceptions) and optional ``cntlist.rev``."""
    root = Path(arg).expanduser()
    senses: dict[tuple[str, str], list[float]] = {}
    exceptions: dict[str, dict[str, list[str]]] = {}
    for pos, name in POS_NAMES.items():
        index = root / f"index.{name}"
        if not index.is_file():
            raise DataError(f"missing index.{name}: expected a WordNet 3.0 dict directory", file=str(root),
                            field="--sense-inventory")
        with open(index, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.startswith(" ") or not line.strip():
                    continue
                parts = line.split()
                if len(parts) < 4 or not parts[2].isdigit():
                    raise DataError("expected 'lemma pos synset_cnt p_cnt ...'", file=str(index), line=lineno,
                                    field="synset_cnt")
                senses[(parts[0], pos)] = [0.0] * int(parts[2])
        exc = root / f"{name}.exc"
        if exc.is_file():
            with open(exc, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    form, *bases = line.split()
                    exceptions.setdefault(pos, {})[form] = bases
    counted = _read_cntlist(root / "cntlist.rev", senses)
    return DictInventory(f"wordnet-dict:{root.name}", senses, counted, exceptions)


#: cntlist sense-key ss_type -> POS (5 = adjective satellite)
SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}


def _read_cntlist(path: Path, senses: dict[tuple[str, str], list[float]]) -> bool:
    """Add ``cntlist.rev`` tag counts (``lemma%ss_type:... sense_number tag_cnt``); False if absent."""
    if not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) != 3 or "%" not in parts[0]:
                continue
            lemma, _, rest = parts[0].partition("%")
            weights = senses.get((lemma, SS_TYPE.get(rest[:1], "")))
            number = int(parts[1])
            if weights is not None and 1 <= number <= len(weights):
                weights[number - 1] += float(parts[2])
    return True


@INVENTORIES.register("tsv")
def tsv_inventory(arg: str) -> DictInventory:
    """Rows ``lemma<TAB>pos<TAB>sense_id[<TAB>weight]`` (pos n, v, a/s or r)."""
    path = Path(arg).expanduser()
    if not path.is_file():
        raise DataError("no such file", file=str(path), field="--sense-inventory")
    table: dict[tuple[str, str], dict[str, float]] = {}
    counted = False
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip() or line.startswith("#"):
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) not in (3, 4):
                raise DataError(f"expected lemma<TAB>pos<TAB>sense_id[<TAB>weight], got {len(cols)} columns",
                                file=str(path), line=lineno, field="columns")
            pos = {"s": "a"}.get(cols[1].strip().lower(), cols[1].strip().lower())
            if pos not in POS_NAMES:
                raise DataError(f"expected pos n, v, a, s or r, got {cols[1]!r}", file=str(path), line=lineno,
                                field="pos")
            weight = 0.0
            if len(cols) == 4:
                try:
                    weight = float(cols[3])
                except ValueError:
                    raise DataError(f"expected a number, got {cols[3]!r}", file=str(path), line=lineno,
                                    field="weight") from None
                counted = True
            row = table.setdefault((cols[0].strip().lower(), pos), {})
            row[cols[2]] = row.get(cols[2], 0.0) + weight
    return DictInventory(f"tsv:{path.name}", {k: list(v.values()) for k, v in table.items()}, counted)


@INVENTORIES.register("classifier")
def classifier_inventory(arg: str) -> ClassifierInventory:
    """``MODULE:FUNC``, a user WSD plugin."""
    try:
        func = import_string(arg)
    except (ImportError, AttributeError) as exc:
        raise MmkitError(f"cannot import the classifier {arg!r}: {exc}", field="--sense-inventory") from exc
    return ClassifierInventory(f"classifier:{arg}", func)


def load_inventory(spec: str) -> SenseInventory:
    """``KIND:ARG`` -> an inventory (``wordnet-dict:DIR``, ``tsv:FILE``, ``classifier:MODULE:FUNC``)."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ConfigError(f"expected KIND:ARG with KIND one of {', '.join(INVENTORIES)}, got {spec!r}",
                          field="sense_inventory")
    return INVENTORIES.resolve(kind, field="sense_inventory")(arg)


def entropy_bits(weights: Sequence[float], alpha: float) -> float:
    """Shannon entropy (bits) of p_i = (w_i + alpha) / sum_j (w_j + alpha) (build.md §3 ``entropy``);
    log2 n when every smoothed weight is 0."""
    smoothed = [w + alpha for w in weights]
    total = sum(smoothed)
    if total <= 0:
        return math.log2(len(weights))
    return -sum(p * math.log2(p) for p in (s / total for s in smoothed) if p > 0) + 0.0


WORD_SCORES: Registry = Registry("word score")


@WORD_SCORES.register("senses")
def senses_score(word: WordSenses, alpha: float) -> float:
    """``senses``: log2 n, n the number of senses over the allowed POS."""
    return math.log2(len(word.weights))


@WORD_SCORES.register("entropy")
def entropy_score(word: WordSenses, alpha: float) -> float:
    """``entropy``: sense entropy in bits; log2 n without counts; alpha = 0 for a classifier."""
    if not word.counted:
        return math.log2(len(word.weights))
    return entropy_bits(word.weights, alpha if word.smoothing else 0.0)


AGGREGATES: Registry = Registry("aggregate")
AGGREGATES.register("max", max)
AGGREGATES.register("mean", lambda xs: sum(xs) / len(xs))


@dataclass
class AmbiguityScorer:
    """The labelled stand-in for 3AM's WSD model: tokens -> senses -> word scores -> caption score."""

    inventory: SenseInventory
    pos: Sequence[str] = ("n", "v", "a")
    word_score: str = "entropy"
    aggregate: str = "max"
    smoothing: float = 1.0
    stopwords: frozenset[str] = STOPWORDS

    @property
    def name(self) -> str:
        return f"standin-wsd/{self.inventory.name}/{self.word_score}/{self.aggregate}"

    def score(self, text: str) -> tuple[float, list[dict[str, Any]]]:
        """The caption score (0 if no token has a sense) and its words with their scores."""
        toks = tokens(text, self.stopwords)
        word_fn = WORD_SCORES.resolve(self.word_score, field="word_score")
        words = [{"token": w.token, "lemma": w.lemma, "n_senses": len(w.weights),
                  "score": word_fn(w, self.smoothing)}
                 for w in self.inventory.lookup(text, toks, self.pos) if w is not None and w.weights]
        if not words:
            return 0.0, []
        return AGGREGATES.resolve(self.aggregate, field="aggregate")([w["score"] for w in words]), words


def read_stopwords(path: str | None) -> frozenset[str]:
    """``--stopwords FILE`` (one word per line) or the built-in list."""
    if path is None:
        return STOPWORDS
    return frozenset(w.strip().lower() for w in Path(path).expanduser().read_text(encoding="utf-8").splitlines()
                     if w.strip())


# --------------------------------------------------------------------------- selection and splits


def rank_order(ids: Sequence[str], scores: Sequence[float], seed: int) -> list[int]:
    """Indices by score descending, ties by ``stable_seed(seed, id)`` (build.md §3 selection)."""
    return sorted(range(len(ids)), key=lambda i: (-scores[i], stable_seed(seed, ids[i])))


def select(ids: Sequence[str], scores: Sequence[float], seed: int, *, threshold: float | None = None,
           top_fraction: float | None = None, top_k: int | None = None) -> tuple[list[int], str]:
    """The selected indices (in rank order) and the drop reason of the rest: ``score >= threshold``,
    the top ``floor(top_fraction * N)`` or the top ``top_k``."""
    order = rank_order(ids, scores, seed)
    if threshold is not None:
        return [i for i in order if scores[i] >= threshold], "below_threshold"
    k = math.floor(top_fraction * len(ids)) if top_fraction is not None else top_k
    return order[:k], "not_selected"


def assign_splits(units: Sequence[str], sizes: Sequence[int], seed: int, val_size: int,
                  test_size: int) -> list[str]:
    """Each unit's split: units visited in ``stable_seed(seed, unit)`` order go to test if they
    fit, else val if they fit, else train."""
    filled = {"test": 0, "val": 0}
    cap = {"test": test_size, "val": val_size}
    out = ["train"] * len(units)
    for i in sorted(range(len(units)), key=lambda i: stable_seed(seed, units[i])):
        for split in ("test", "val"):
            if filled[split] + sizes[i] <= cap[split]:
                filled[split] += sizes[i]
                out[i] = split
                break
    return out


# --------------------------------------------------------------------------- mode B: selection


def clean_text(text: str) -> tuple[str, bool]:
    """Internal CR, LF and TAB runs become one space, then strip; also says if anything changed."""
    cleaned = re.sub(r"[\r\n\t]+", " ", text).strip()
    return cleaned, re.search(r"[\r\n\t]", text.strip()) is not None


def has_cjk(text: str) -> bool:
    """True if ``text`` holds a CJK ideograph."""
    return CJK.search(text) is not None


@dataclass
class Caption:
    id: str
    image: str  # output image name
    path: Path
    en: str
    zh: str
    rec: Record


def image_name(rec: Record, template: str | None) -> str:
    """The image's output name from ``--image-name`` (default ``{source}_{basename}`` when the
    record has a source, else ``{basename}``)."""
    ref = str(rec["image"])
    values = {"basename": Path(ref).name, "stem": Path(ref).stem, "id": rec["id"],
              "source": rec.get("source")}
    template = template or ("{source}_{basename}" if rec.get("source") else "{basename}")
    for key in re.findall(r"{(\w+)}", template):
        if values.get(key) is None:
            raise rec.error(key, f"--image-name {template!r} needs this field")
    return template.format(**values)


def _select_captions(cfg: AmbiguousMMTConfig, run: BuildRun) -> Callable[[Path], None]:
    records = run.read(cfg.captions, required=("id", "image", "en", "zh"))
    seen_ids: dict[str, Record] = {}
    names: dict[str, Caption] = {}
    kept: list[Caption] = []
    reasons: list[str] = []
    pairs: set[tuple[str, str]] = set()
    cleaned_n = 0
    for rec in records:
        cid = str(rec.require("id", (str, int)))
        if cid in seen_ids:
            raise rec.error("id", f"duplicate id (first at line {seen_ids[cid].loc})")
        seen_ids[cid] = rec
        texts = {}
        for key in ("en", "zh"):
            texts[key], changed = clean_text(rec.require(key, str, nonempty=False))
            cleaned_n += changed
        path = resolve_image(rec.require("image", str), rec, "image", cfg.image_root)
        cap = Caption(cid, image_name(rec, cfg.image_name), path, texts["en"], texts["zh"], rec)
        other = names.setdefault(cap.image, cap)
        if other.path != cap.path:
            raise rec.error("image", f"image name {cap.image!r} clashes: ids {other.id!r} and {cid!r} name "
                                     f"different files ({other.path}, {cap.path}); set --image-name")
        reason = ("empty_text" if not cap.en or not cap.zh else "no_cjk" if not has_cjk(cap.zh)
                  else "duplicate" if (cap.image, cap.en) in pairs else None)
        if reason:
            reasons.append(reason)
            run.drop(cid, reason)
            continue
        pairs.add((cap.image, cap.en))
        kept.append(cap)
    if cleaned_n:
        run.warn(f"{cleaned_n} text field(s) held CR, LF or TAB, replaced by single spaces")
    run.stage("hygiene", len(records), len(kept), Counter(reasons))

    mode = image_mode(cfg.copy_images, cfg.link_images)
    if mode:
        for cap in kept:
            require_file(cap.path, cap.rec, "image")
    scorer = AmbiguityScorer(load_inventory(cfg.sense_inventory), tuple(cfg.pos), cfg.word_score, cfg.aggregate,
                             cfg.smoothing, read_stopwords(cfg.stopwords))
    run.standins.append({"component": "ambiguity scorer", "name": scorer.name,
                         "replaces": "3AM's unpublished word-sense-disambiguation model and threshold"})
    scored = [scorer.score(c.en) for c in kept]
    run.stage("score", len(kept), len(kept))

    ids = [c.id for c in kept]
    chosen, reason = select(ids, [s for s, _ in scored], cfg.seed, threshold=cfg.threshold,
                            top_fraction=cfg.top_fraction, top_k=cfg.top_k)
    chosen_set = set(chosen)
    for i in range(len(kept)):
        if i not in chosen_set:
            run.drop(ids[i], reason)
    run.stage("select", len(kept), len(chosen), {reason: len(kept) - len(chosen)})

    unit_of = (lambda c: c.image) if cfg.split_unit == "image" else (lambda c: c.id)
    sizes = Counter(unit_of(kept[i]) for i in chosen)
    units = sorted(sizes)
    split_of_unit = dict(zip(units, assign_splits(units, [sizes[u] for u in units], cfg.seed,
                                                  cfg.val_size, cfg.test_size)))
    by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i in chosen:
        by_split[split_of_unit[unit_of(kept[i])]].append(i)
    for split in SPLITS:
        by_split[split].sort(key=lambda i: stable_seed(cfg.seed, ids[i]))
    run.stage("split", len(chosen), len(chosen))
    run.images.update({kept[i].image: kept[i].path for i in chosen})
    for split, want in (("val", cfg.val_size), ("test", cfg.test_size)):
        if len(by_split[split]) != want:
            run.warn(f"{split} holds {len(by_split[split])} captions (asked for {want}): "
                     f"units of {cfg.split_unit} are never split")

    def write(tmp: Path) -> None:
        for split, rows in by_split.items():
            caps = [kept[i] for i in rows]
            write_lines(tmp / f"{split}.en", [c.en for c in caps])
            write_lines(tmp / f"{split}.zh", [c.zh for c in caps])
            write_lines(tmp / f"images-{split}.txt", [c.image for c in caps])
            write_jsonl(tmp / f"scores-{split}.jsonl", [score_row(kept[i], *scored[i], scorer.name) for i in rows])
        if mode:
            for cap in {c.image: c for c in (kept[i] for i in chosen)}.values():
                place_image(cap.path, tmp / "images" / cap.image, mode)

    return write


def score_row(cap: Caption, score: float, words: list[dict[str, Any]], scorer: str) -> dict[str, Any]:
    """A ``scores-{split}.jsonl`` line with the caption's top 5 words by score."""
    top = sorted(words, key=lambda w: -w["score"])[:5]
    return {"id": cap.id, "image": cap.image, "score": round(score, 6), "scorer": scorer,
            "words": [{**w, "score": round(w["score"], 6)} for w in top]}


def run(cfg: AmbiguousMMTConfig, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Import a 3AM release or select ambiguous captions; write the 3AM layout and manifest."""
    with BuildRun("ambiguous-mmt", cfg, out, overwrite) as build:
        write = _import_release(cfg, build) if cfg.import_release else _select_captions(cfg, build)
        return build.publish(write)


RECIPE = Recipe(
    name="ambiguous-mmt",
    config=AmbiguousMMTConfig,
    run=run,
    summary="3AM: check and copy the release, or select ambiguous en->zh captions (labelled stand-in scorer).",
    example="mmkit build-dataset ambiguous-mmt --captions pool.jsonl --sense-inventory wordnet-dict:wn30/ "
            "--top-k 26000 --out my3am/",
)
