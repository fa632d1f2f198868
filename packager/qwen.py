"""Qwen (v1) facts as data, below both the packager and the pipeline (no torch: the spec checks LoRA targets with it):
module names -> Qwen2 module names, and the special tokens in Qwen's order."""

from __future__ import annotations

# Module inside a layer -> its Qwen2 name(s); one name is a rename, three a split.
LAYER_MODULES: dict[str, tuple[str, ...]] = {
    "ln_1": ("input_layernorm",),
    "ln_2": ("post_attention_layernorm",),
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.c_proj": ("self_attn.o_proj",),
    "mlp.w1": ("mlp.up_proj",),
    "mlp.w2": ("mlp.gate_proj",),
    "mlp.c_proj": ("mlp.down_proj",),
}

# Qwen's specials in Qwen's order: <|endoftext|> (151643), <|im_start|>, <|im_end|>, <|extra_0..204|>.
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
