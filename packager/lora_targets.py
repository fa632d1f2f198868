"""Which modules get LoRA: the spec's names (Qwen v1 or Qwen2) resolved to Qwen2 modules.

The reference trained LoRA on Qwen v1's fused `attn.c_attn`. On the Qwen2
layout that module is three (q, k, v); the toolkit gives each its own LoRA
(own A and B). LoRA on the fused module equals q/k/v LoRAs that share one A,
a special case of this: the separate form can learn everything the fused one
can, is what peft and the server load for Qwen2 without custom code, and costs
2 x r x hidden more parameters per layer (0.3% of the adapter at r=32 on
Qwen-14B). No module of this file imports torch: the spec validates with it.
"""

from __future__ import annotations

from .qwen import LAYER_MODULES

# The Qwen2 modules LoRA may target (inside each decoder layer).
QWEN2_LINEAR = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
_SHORT = {name.split(".")[-1]: name for name in QWEN2_LINEAR}


def resolve_module(name: str) -> tuple[str, ...]:
    """One spec name -> its Qwen2 module(s); ValueError naming the choices for anything else."""
    if name in LAYER_MODULES and name not in ("ln_1", "ln_2"):
        return LAYER_MODULES[name]
    if name in QWEN2_LINEAR:
        return (name,)
    if name in _SHORT:
        return (_SHORT[name],)
    v1 = [n for n in LAYER_MODULES if n not in ("ln_1", "ln_2")]
    raise ValueError(
        f"LoRA target {name!r} is not a linear module of a Qwen layer; use Qwen v1 names ({', '.join(v1)}) "
        f"or Qwen2 names ({', '.join(QWEN2_LINEAR)})"
    )


def resolve(target_modules: list[str]) -> list[str]:
    """The spec's target list -> Qwen2 module suffixes, each once, in layer order."""
    wanted = {m for name in target_modules for m in resolve_module(name)}
    return [m for m in QWEN2_LINEAR if m in wanted]


def peft_targets(target_modules: list[str], layers) -> list[str] | str:
    """peft's `target_modules`: module suffixes for all layers, or a regex over the chosen ones."""
    modules = resolve(target_modules)
    if layers == "all":
        return modules
    ids = "|".join(str(i) for i in sorted(set(layers)))
    names = "|".join(m.replace(".", r"\.") for m in modules)
    return rf".*\.layers\.({ids})\.({names})"


def describe(target_modules: list[str], layers) -> str:
    where = "all layers" if layers == "all" else f"layers {', '.join(str(i) for i in sorted(set(layers)))}"
    return f"{', '.join(resolve(target_modules))} of {where}"
