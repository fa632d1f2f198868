"""The quantized base model, frozen, with LoRA adapters on it.

A GPTQ base loads with GPTQModel's torch kernel, on CUDA as on a CPU: it is
the kernel with a backward pass for every bit width (Marlin has none), and it
dequantizes exactly. LoRA weights are fp32 (peft upcasts them), the frozen
base computes in the artifact's dtype, with no autocast: as the reference ran
(HF Trainer without `fp16=True`). The fast path (`fast.py`) keeps these fp32
weights as master copies and computes the adapter's products in the base's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TRAINING_KERNEL = "torch"


class ModelError(Exception):
    """The base model cannot be trained as the spec says; the message names the fix."""


def gptq_bits(config: dict) -> int | None:
    q = config.get("quantization_config") or {}
    return q.get("bits") if q.get("quant_method") == "gptq" else None


def load_base(folder: Path, device: torch.device, dtype: torch.dtype, kernel: str = TRAINING_KERNEL):
    """The frozen base; `kernel` is the GPTQ kernel (generation may take a faster one without a backward)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") == "qwen":
        raise ModelError(f"{folder} is a Qwen (v1) folder: convert it first (make convert SRC={folder} OUT=dir)")
    kwargs = dict(dtype=dtype, device_map={"": str(device)})
    bits = gptq_bits(config)
    if bits is not None:
        kwargs["quantization_config"] = GPTQConfig(bits=bits, backend=kernel)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False  # no KV cache while training (and none under gradient checkpointing)
    return model


def add_lora(model, lora, gradient_checkpointing: bool, base_repo: str):
    """Freeze the base, wrap it with LoRA on the spec's (resolved) modules; only LoRA weights train."""
    from peft import LoraConfig, get_peft_model

    from packager.lora_targets import peft_targets

    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=peft_targets(lora.target_modules, lora.layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = base_repo  # not this machine's path
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("LoRA matched no module of the base model: check [training.lora] target_modules")
    return model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
