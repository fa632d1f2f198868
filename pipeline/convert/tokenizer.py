"""The Qwen (v1) tiktoken tokenizer -> a transformers fast tokenizer with the same ids.

Qwen v1 tokenizes NFC-normalised text with tiktoken: byte-level BPE ranks from
`qwen.tiktoken` (ids 0..151642) split by the pattern below, then special
tokens from 151643 on. The fast tokenizer gets the same vocabulary and merges
(transformers' tiktoken converter), an NFC normaliser, and the specials as
added tokens in the same order, so every id is the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from packager.qwen import ENDOFTEXT, SPECIAL_TOKENS

VOCAB_FILE = "qwen.tiktoken"
PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def fast_tokenizer(vocab_file: Path):
    """A PreTrainedTokenizerFast equivalent to Qwen v1's tokenizer over `vocab_file`."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(vocab_file), pattern=PATTERN).converted()
    ordinary = tok.get_vocab_size()
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if tok.token_to_id(ENDOFTEXT) != ordinary:
        raise ValueError(f"{vocab_file}: {ENDOFTEXT} got id {tok.token_to_id(ENDOFTEXT)}, expected {ordinary}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


def convert_tokenizer(src: Path, dst: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for the Qwen v1 tokenizer in `src`."""
    vocab = src / VOCAB_FILE
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab}: Qwen (v1) tokenizers keep their vocabulary in {VOCAB_FILE}")
    fast_tokenizer(vocab).save_pretrained(dst)
    # Generation stops at end-of-text; no template is applied to HELM prompts.
    (dst / "special_tokens_map.json").write_text(json.dumps({"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT}) + "\n")
