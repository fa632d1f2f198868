"""Self-curation's rating: the request the seed model answers, and the strict parse of its verdict.

A rating counts only when its last non-empty line is exactly `Score: N` with N in 1..5; anything
else is unparseable: counted, kept out of the curated set, never guessed. The seed model was trained
without end-of-text (the reference's templates), so it may write on past its verdict: the rating
ends at its first exact `Score: N` line, as an answer ends at a stop sequence.
"""

from __future__ import annotations

import re

SCORE_LINE = re.compile(r"Score: ([1-5])")
SCORES = (1, 2, 3, 4, 5)


def request(prompt: str, instruction: str, passage: str) -> str:
    """The rating prompt (the spec folder's text file) filled with one candidate pair."""
    return prompt.format(instruction=instruction, answer=passage)


def verdict(text: str) -> str:
    """The rating up to and including its first exact `Score: N` line (all of it when there is none)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if SCORE_LINE.fullmatch(line.strip()):
            return "\n".join(lines[: i + 1]).strip()
    return text.strip()


def parse_score(text: str) -> int | None:
    """N when the last non-empty line is exactly `Score: N`; None otherwise."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    match = SCORE_LINE.fullmatch(lines[-1]) if lines else None
    return int(match.group(1)) if match else None
