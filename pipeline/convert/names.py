"""Qwen (v1) module names -> Qwen2 module names, as data (no torch: the spec checks LoRA targets with it)."""

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
