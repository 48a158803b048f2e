"""Text-similarity metrics for generation benchmarks (evaluate.md §4, §7): pure functions, no I/O.

MMT (§7): corpus BLEU through sacrebleu ``BLEU(tokenize="zh", lowercase=True)`` (default exponential
smoothing) with its signature, and an exact-match METEOR on the same zh tokens. METEOR's stemming and
WordNet-synonym stages are off — WordNet synonyms do not apply to Chinese and tests stay offline — so
the score is comparable across mmkit runs, not necessarily with other METEOR implementations. The
alignment and chunk count follow nltk's ``meteor_score`` exactly, so the value equals nltk's with a
synonym source that returns no synsets (on text whose tokens its Porter stemmer leaves unchanged).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from typing import Hashable, Sequence

import sacrebleu
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

_ZH = TokenizerZh()


def zh_tokens(text: str) -> list[str]:
    """sacrebleu's ``zh`` tokens of ``text``, lowercased: one token per CJK character, other runs
    split as sacrebleu's 13a tokenizer does (evaluate.md §7)."""
    return _ZH(text.strip()).lower().split()


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus BLEU ×100 of line-aligned ``hypotheses`` against one reference each, with
    ``BLEU(tokenize="zh", lowercase=True)`` and default ``exp`` smoothing, and the sacrebleu
    signature string (e.g. ``nrefs:1|case:lc|eff:no|tok:zh|smooth:exp|version:2.6.0``; §7)."""
    bleu = sacrebleu.BLEU(tokenize="zh", lowercase=True)
    score = bleu.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(bleu.get_signature())


def exact_alignment(hypothesis: Sequence[str], reference: Sequence[str]) -> list[tuple[int, int]]:
    """METEOR's exact-match stage as nltk runs it: hypothesis tokens from last to first each take
    the last still-unused equal reference token; returns (hyp index, ref index) sorted by hyp index."""
    positions: dict[str, list[int]] = defaultdict(list)
    for j, token in enumerate(reference):
        positions[token].append(j)
    matches = []
    for i in range(len(hypothesis) - 1, -1, -1):
        free = positions.get(hypothesis[i])
        if free:
            matches.append((i, free.pop()))
    return sorted(matches)


def count_chunks(matches: Sequence[tuple[int, int]]) -> int:
    """Chunks of an alignment sorted by hyp index: runs adjacent in both hypothesis and reference."""
    return 1 + sum(1 for (i, j), (k, m) in zip(matches, matches[1:]) if not (k == i + 1 and m == j + 1))


def meteor_sentence(hypothesis: Sequence[str], reference: Sequence[str], alpha: float = 0.9,
                    beta: float = 3.0, gamma: float = 0.5) -> float:
    """Sentence METEOR in [0, 1] with exact matching only (Lavie & Agarwal 2007; nltk defaults):
    P = m/|hyp|, R = m/|ref|, F_mean = P·R / (α·P + (1−α)·R), penalty = γ·(chunks/m)^β,
    score = (1 − penalty)·F_mean; 0 when nothing matches. Tokens are compared as given."""
    matches = exact_alignment(hypothesis, reference)
    m = len(matches)
    if m == 0:
        return 0.0
    precision, recall = m / len(hypothesis), m / len(reference)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    penalty = gamma * (count_chunks(matches) / m) ** beta
    return (1 - penalty) * fmean


def corpus_meteor(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """MMT's METEOR ×100 (§7): the mean sentence METEOR over line-aligned pairs, each on its
    lowercased sacrebleu zh tokens."""
    if not hypotheses:
        raise ValueError("corpus_meteor needs at least one sentence")
    total = sum(meteor_sentence(zh_tokens(h), zh_tokens(r)) for h, r in zip(hypotheses, references, strict=True))
    return 100.0 * total / len(hypotheses)


# --------------------------------------------------------------------------- RealBench (evaluate.md §4)

#: Punctuation (Unicode P*) that N(s) keeps: percent signs carry value in extracted answers
#: (evaluate.md §4 lists ``%`` with the symbols that stay, although Unicode files it under Po).
KEPT_PUNCTUATION = frozenset("%‰‱")


def normalize_text(text: str) -> str:
    """RealBench's N(s) (evaluate.md §4): Unicode NFKC, lowercase, then delete whitespace and
    punctuation (category P*, except :data:`KEPT_PUNCTUATION`); symbols such as ``¥`` stay."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if not c.isspace()
                   and (c in KEPT_PUNCTUATION or not unicodedata.category(c).startswith("P")))


def multiset_f1(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    """F1 ×100 of two token multisets (evaluate.md §4): common = Σ_t min(n_pred(t), n_gold(t)),
    P = common/|pred|, R = common/|gold|, F1 = 2PR/(P + R); both empty → 100, one empty → 0."""
    if not pred or not gold:
        return 100.0 if not pred and not gold else 0.0
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 100.0 * 2 * precision * recall / (precision + recall)


def char_f1(pred: str, gold: str) -> float:
    """Character F1 ×100 of N(pred) and N(gold) as character multisets (evaluate.md §4)."""
    return multiset_f1(normalize_text(pred), normalize_text(gold))


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(|a|·|b|) time, O(|b|) memory)."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(pred: str, gold: str) -> float:
    """Character ROUGE-L F ×100 of N(pred) and N(gold) (evaluate.md §4): LCS length l,
    P = l/|pred|, R = l/|gold|, F = 2PR/(P + R); both empty → 100, one empty → 0."""
    p, g = normalize_text(pred), normalize_text(gold)
    if not p or not g:
        return 100.0 if not p and not g else 0.0
    lcs = lcs_length(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 100.0 * 2 * precision * recall / (precision + recall)


def word_tokens(text: str) -> list[str]:
    """jieba accurate-mode words (``jieba.lcut(…, cut_all=False)``) of NFKC-lowercased text, each
    normalised by N; punctuation- or space-only tokens vanish (evaluate.md §4 ``--word-f1``)."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" chatter on stderr
    words = jieba.lcut(unicodedata.normalize("NFKC", text).lower(), cut_all=False)
    return [w for w in map(normalize_text, words) if w]


def word_f1(pred: str, gold: str) -> float:
    """Word F1 ×100: :func:`multiset_f1` over :func:`word_tokens` (needs jieba, extra ``mmkit[zh]``)."""
    return multiset_f1(word_tokens(pred), word_tokens(gold))


def kendall_tau(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    """Kendall τ = (C − D) / (m(m − 1)/2) between two orders of the same m items (evaluate.md §4):
    a pair of items is concordant when both orders put it the same way round."""
    m = len(gold)
    if sorted(pred) != sorted(gold) or m < 2:
        raise ValueError("kendall_tau needs two orders of the same (at least two) items")
    pos = {item: i for i, item in enumerate(pred)}
    ranks = [pos[item] for item in gold]  # positions in pred, listed in gold order
    discordant = sum(1 for i in range(m) for j in range(i + 1, m) if ranks[i] > ranks[j])
    pairs = m * (m - 1) // 2
    return (pairs - 2 * discordant) / pairs


_CN_DIGITS = {"一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_NUMBER = "[一二两三四五六七八九十]+"
_INDEX = rf"([0-9]+|{_CN_NUMBER})"
#: Image-index mentions in priority order (evaluate.md §4): ``图 k``, ``第 k 张/幅/个``, a bare integer.
INDEX_PATTERNS = (re.compile(rf"图\s*{_INDEX}"), re.compile(rf"第\s*{_INDEX}\s*[张幅个]"),
                  re.compile(r"(?<![0-9])([0-9]+)(?![0-9])"))
_ANY_INDEX = re.compile("|".join(p.pattern for p in INDEX_PATTERNS))


def chinese_int(text: str) -> int | None:
    """Arabic digits, or a Chinese numeral up to 99 (一…九, 两 = 2, 十, 十X, X十, X十Y); else None."""
    if text.isdigit():
        return int(text)
    head, ten, tail = text.partition("十")
    if not ten:
        return _CN_DIGITS.get(text) if len(text) == 1 else None
    if len(head) > 1 or len(tail) > 1 or (head and head not in _CN_DIGITS) or (tail and tail not in _CN_DIGITS):
        return None
    return 10 * (_CN_DIGITS[head] if head else 1) + (_CN_DIGITS[tail] if tail else 0)


def parse_image_index(text: str, n_images: int) -> int | None:
    """RealBench image-index answer (evaluate.md §4): the first in-range (1 ≤ k ≤ N) match of
    ``图 k``, else of ``第 k 张/幅/个``, else a standalone Arabic integer, on the NFKC text;
    k in Arabic digits or Chinese numerals. None when nothing matches."""
    text = unicodedata.normalize("NFKC", text)
    for pattern in INDEX_PATTERNS:
        for match in pattern.finditer(text):
            k = chinese_int(match.group(1))
            if k is not None and 1 <= k <= n_images:
                return k
    return None


def parse_order(text: str, n_images: int) -> tuple[list[int] | None, bool]:
    """RealBench order answer (evaluate.md §4): every index mention (``图 k``, ``第 k 张``, bare
    integers) in order of appearance, first occurrence kept, out-of-range dropped; missing indices
    are appended ascending and flagged partial. Returns (order or None when no index, partial)."""
    seen: dict[int, None] = {}
    for match in _ANY_INDEX.finditer(unicodedata.normalize("NFKC", text)):
        k = chinese_int(next(g for g in match.groups() if g is not None))
        if k is not None and 1 <= k <= n_images:
            seen.setdefault(k)
    if not seen:
        return None, False
    missing = [k for k in range(1, n_images + 1) if k not in seen]
    return [*seen, *missing], bool(missing)


_LETTER = re.compile(r"(?<![A-Za-z])[A-Z](?![A-Za-z])")


def parse_letter(text: str, options: Sequence[str]) -> str | None:
    """RealBench choice answer (evaluate.md §4): the first standalone capital letter (not next to
    another Latin letter) within the option range on the NFKC text; else the option whose N(text)
    equals N(output); else None."""
    text = unicodedata.normalize("NFKC", text)
    letters = {chr(ord("A") + i) for i in range(len(options))}
    letter = next((m.group() for m in _LETTER.finditer(text) if m.group() in letters), None)
    if letter is not None:
        return letter
    answer = normalize_text(text)
    return next((chr(ord("A") + i) for i, o in enumerate(options) if answer and normalize_text(o) == answer), None)
