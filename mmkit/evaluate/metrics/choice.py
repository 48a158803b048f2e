"""Multiple-choice parsing and paired-question accuracy (evaluate.md §3): pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

#: The answer letters MMR offers, in the official parser's priority order.
LETTERS = ("A", "B", "C", "D")
#: What an answer naming no letter parses to; it never equals a ground truth.
UNPARSED = "E"


def _official(tokens_source: str) -> str:
    """Official rule: split on the single space; the first of A, B, C, D (priority order) present."""
    tokens = set(tokens_source.split(" "))
    return next((letter for letter in LETTERS if letter in tokens), UNPARSED)


def _first(tokens_source: str) -> str:
    """``first`` rule: split on any whitespace; the first token, left to right, equal to A-D."""
    return next((token for token in tokens_source.split() if token in LETTERS), UNPARSED)


#: ``--parse-rule`` name -> parser of the cleaned answer text.
PARSE_RULES: dict[str, Callable[[str], str]] = {"official": _official, "first": _first}


def parse_mmr(text: str, rule: str = "official") -> str:
    """The letter an MMR answer names (evaluate.md §3 "Parsing"), or ``"E"`` (always wrong).

    The text is stripped, cut before its first ``.``, and every ``,`` becomes a space; then
    ``rule`` picks the letter (``official`` reproduces the published leaderboard, ``first`` takes
    the first letter token). Case-sensitive: ``(A)``, ``A)`` and ``a`` are not ``A``.
    """
    cleaned = text.strip().split(".", 1)[0].replace(",", " ")
    return PARSE_RULES[rule](cleaned)


@dataclass(frozen=True)
class Answer:
    """One scored question of a pair: is the answer right, and is the question typed POS or NEG."""

    correct: bool
    question_type: str


def pair_outcome(pair: Sequence[Answer]) -> tuple[bool, bool]:
    """``(both_right, misled)`` of a question pair (evaluate.md §3 "Metrics"): misled = exactly one
    answer right and that one typed POS (a POS/POS pair: either single-right case; NEG/NEG: never)."""
    right = [a for a in pair if a.correct]
    both_right = len(right) == len(pair)
    misled = len(right) == 1 and right[0].question_type == "POS"
    return both_right, misled


def rate(numerator: int, denominator: int) -> Optional[float]:
    """``100 · numerator / denominator`` in percent, or ``None`` when the denominator is 0."""
    return 100.0 * numerator / denominator if denominator else None


def robustness_metrics(pairs: Iterable[Sequence[Answer]]) -> dict[str, Optional[float]]:
    """MMR's metrics over ``pairs`` (evaluate.md §3), pooled (micro) over all pairs given:
    RA = 100 · both_right / n_pairs; MR = 100 · misled / (both_right + misled);
    ``pos_acc`` / ``neg_acc`` = accuracy over the POS / NEG questions. Undefined rates are ``None``."""
    n_pairs = both = misled = 0
    right = {"POS": 0, "NEG": 0}
    total = {"POS": 0, "NEG": 0}
    for pair in pairs:
        b, m = pair_outcome(pair)
        n_pairs += 1
        both += b
        misled += m
        for answer in pair:
            total[answer.question_type] += 1
            right[answer.question_type] += answer.correct
    return {"ra": rate(both, n_pairs), "misleading_rate": rate(misled, both + misled),
            "pos_acc": rate(right["POS"], total["POS"]), "neg_acc": rate(right["NEG"], total["NEG"]),
            "n_pairs": n_pairs}
