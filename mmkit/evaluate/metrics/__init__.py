"""Pure metric functions for ``mmkit evaluate`` (evaluate.md §1): ``choice`` (multiple-choice parsing
and pair accuracy) and ``text`` (BLEU, METEOR and other text-similarity scores)."""
