"""A conversation -> the exact text the model trains on, as pieces: (text, carries loss).

The system text first, then per round the prompt (no loss) and the answer
(loss), each from the spec's template for the conversation's source.
"""

from __future__ import annotations

from .source import Round

Piece = tuple[str, bool]


def round_fields(round_: Round, template) -> dict[str, object]:
    """ARC's choices become text through the template's `choice` line; other fields pass through."""
    fields = dict(round_)
    if "choices" in fields:
        fields["choices"] = "".join(template.choice.format(label=l, text=t) for l, t in fields["choices"])
    return fields


def render(conversation: list[Round], template) -> list[Piece]:
    """`template` is the spec's template already resolved for the conversation's source."""
    pieces: list[Piece] = [(template.system, False)]
    for round_ in rounds(conversation):
        fields = round_fields(round_, template)
        pieces.append((template.prompt.format_map(fields), False))
        pieces.append((template.answer.format_map(fields), True))
    return pieces


def rounds(conversation: list[Round]) -> list[Round]:
    """Every round of a conversation, in order (the reference stepped over half of them)."""
    return list(conversation)


def loss_spans(pieces: list[Piece]) -> list[tuple[int, int]]:
    """Character spans of the joined text that carry loss."""
    spans, at = [], 0
    for text, loss in pieces:
        if loss:
            spans.append((at, at + len(text)))
        at += len(text)
    return spans
