"""Qwen (v1) config.json -> Qwen2 config.json, and what cannot be mapped.

Qwen v1 attention applies dynamic NTK rope scaling and logn query scaling only
to sequences longer than its training length (`seq_length`, 2048). Within it
both are identities and the Qwen2 network is the same function; beyond it they
are not reproduced. So the converted model states `max_position_embeddings =
seq_length`, and the server refuses a `context_length` above it.
"""

from __future__ import annotations

from typing import Any

# Qwen v1 tokenizer ids (qwen.tiktoken holds ranks 0..151642; specials follow).
ENDOFTEXT_ID = 151643


class ConfigError(ValueError):
    """A Qwen v1 config this converter cannot map exactly."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def exact_context(v1: dict[str, Any]) -> int:
    """The longest sequence for which the Qwen2 model computes what Qwen v1 computes."""
    if v1.get("use_dynamic_ntk", True) or v1.get("use_logn_attn", True):
        return int(v1.get("seq_length", 2048))
    return int(v1.get("max_position_embeddings", v1.get("seq_length", 2048)))


def qwen2_config(v1: dict[str, Any]) -> dict[str, Any]:
    """The Qwen2 config (as transformers' Qwen2Config writes it) of a Qwen v1 config."""
    from transformers import Qwen2Config

    hidden, heads = int(v1["hidden_size"]), int(v1["num_attention_heads"])
    head_dim = int(v1.get("kv_channels", hidden // heads))
    _require(head_dim * heads == hidden, f"kv_channels {head_dim} x heads {heads} != hidden_size {hidden}")
    _require(float(v1.get("rotary_pct", 1.0)) == 1.0, "rotary_pct != 1.0: Qwen2 rotates the whole head")
    _require(v1.get("no_bias", True), "no_bias = false: Qwen2 has no bias on o_proj or the MLP")
    _require(int(v1["intermediate_size"]) % 2 == 0, "intermediate_size must be even (w1 and w2 are half each)")
    dtype = "bfloat16" if v1.get("bf16") else "float32" if v1.get("fp32") else v1.get("torch_dtype", "float16")
    config = Qwen2Config(
        vocab_size=int(v1["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(v1["intermediate_size"]) // 2,
        num_hidden_layers=int(v1["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=exact_context(v1),
        rms_norm_eps=float(v1.get("layer_norm_epsilon", 1e-6)),
        rope_theta=float(v1.get("rotary_emb_base", 10000)),
        tie_word_embeddings=bool(v1.get("tie_word_embeddings", False)),
        initializer_range=float(v1.get("initializer_range", 0.02)),
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=ENDOFTEXT_ID,
        use_cache=True,
    )
    out = config.to_dict()
    out["architectures"] = ["Qwen2ForCausalLM"]
    out["dtype"] = dtype
    if "quantization_config" in v1:
        out["quantization_config"] = gptq_config(v1["quantization_config"])
    return out


def gptq_config(q: dict[str, Any]) -> dict[str, Any]:
    """An AutoGPTQ quantization_config, carried over; the tensors stay in AutoGPTQ's (v1) format."""
    _require(q.get("quant_method", "gptq") == "gptq", f"quant_method {q.get('quant_method')!r}: only GPTQ converts")
    keep = ("bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential")
    out = {k: q[k] for k in keep if k in q}
    out.update(quant_method="gptq", checkpoint_format=q.get("checkpoint_format", "gptq"))
    return out
