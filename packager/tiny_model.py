"""A tiny, randomly initialised Qwen2 model with a Qwen-shaped tokenizer: the offline stand-in.

Built locally so tests and offline container validation never touch the Hub. The tokenizer is a byte-level BPE
whose `<|endoftext|>` has id 151643 and whose model vocabulary is 151936, as in
Qwen: so the reference specs' end-of-text id works unchanged against it.
Ordinary ids above the trained merges are filler tokens that decode to plain
text, so whatever the random model emits decodes to something readable.
"""

from __future__ import annotations

from pathlib import Path

QWEN_EOS_ID = 151643
QWEN_VOCAB_SIZE = 151936

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: What is two plus two?\nAnswer: four",
    "Once upon a time, there was a small language model that answered questions.",
    "HELM evaluates language models on many scenarios, one request at a time.",
    "Élan, naïve café: unicode text survives a byte-level round trip. 東京",
] * 20


def _train_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.decoder = decoders.ByteLevel()
    return tok


def build_tokenizer():
    """Byte-level BPE padded with filler tokens up to Qwen's end-of-text id."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    trained = _train_bpe()
    vocab = dict(trained.get_vocab())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
    next_id = len(vocab)
    while next_id < QWEN_EOS_ID:
        vocab[f"w{next_id}"] = next_id  # never produced by encoding, decodes to "w<id>"
        next_id += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Qwen's specials in Qwen's order: <|endoftext|> (151643), <|im_start|>, <|im_end|>, <|extra_0..204|>
    from .qwen import SPECIAL_TOKENS

    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    assert tok.token_to_id("<|endoftext|>") == QWEN_EOS_ID
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model(seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,  # the specs' 2048-token context fits
        tie_word_embeddings=True,
        initializer_range=0.2,  # sharp logits: varied greedy text, no near-ties between code paths
        eos_token_id=QWEN_EOS_ID,
        bos_token_id=QWEN_EOS_ID,
    )
    return Qwen2ForCausalLM(config).eval()


def save_tiny_model(directory: Path) -> Path:
    """Write model and tokenizer in Hugging Face format; return the directory."""
    from .staging import readable

    directory.mkdir(parents=True, exist_ok=True)
    build_model().save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return readable(directory)  # the container's server is not root


def stand_in(folder: Path | None = None) -> Path:
    """build/tiny-model/ (or `folder`), written on first use: what offline validation and serving run without MODEL."""
    from .paths import REPO

    folder = folder or REPO / "build" / "tiny-model"
    if not (folder / "config.json").is_file():
        save_tiny_model(folder)
    return folder


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m packager.tiny_model OUTPUT_DIR")
    print(save_tiny_model(Path(sys.argv[1])))
