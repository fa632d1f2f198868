"""Stop sequences, matched on decoded text.

A stop sequence can span several tokens (and a token can hold several stop
sequences), so matching is done on the decoded continuation, not per token.
HELM's HTTP client does not cut completions itself: the server must return
text and tokens that end before the stop sequence.
"""

from __future__ import annotations

from typing import Callable

Decode = Callable[[list[int]], str]


def find_stop(text: str, stop_sequences: list[str]) -> tuple[int, str] | None:
    """Earliest (position, sequence) of any stop sequence in `text`."""
    hits = [(text.find(s), s) for s in stop_sequences]
    hits = [(pos, s) for pos, s in hits if pos >= 0]
    return min(hits) if hits else None


class StopMatcher:
    """Callable stop check for the decode loop, plus the cut of the final output."""

    def __init__(self, decode: Decode, stop_sequences: list[str], keep_stop: bool = False) -> None:
        self._decode = decode
        self._stops = list(stop_sequences)
        self._keep_stop = keep_stop

    def __call__(self, completion_ids: list[int]) -> bool:
        return bool(self._stops) and find_stop(self._decode(completion_ids), self._stops) is not None

    def cut(self, completion_ids: list[int]) -> tuple[str, int]:
        """Return (text, number of tokens kept) with the completion cut at the first stop.

        Tokens are kept while their decoded prefix fits inside the cut text, so a
        token that straddles the stop sequence's start is dropped with it.
        """
        text = self._decode(completion_ids)
        hit = find_stop(text, self._stops) if self._stops else None
        if hit is None:
            return text, len(completion_ids)
        pos, seq = hit
        end = pos + len(seq) if self._keep_stop else pos
        kept = 0
        while kept < len(completion_ids) and len(self._decode(completion_ids[: kept + 1])) <= end:
            kept += 1
        return text[:end], kept
