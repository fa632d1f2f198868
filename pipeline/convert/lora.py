"""A LoRA adapter trained on Qwen (v1) module names -> the same adapter on Qwen2 names.

LoRA on the fused `c_attn` adds `B @ A` to the stacked q/k/v weight. Its q, k
and v rows are `B_q @ A`, `B_k @ A`, `B_v @ A`: three LoRAs that share the one
A matrix, each with a third of B. Same rank and alpha, so the same scale, and
exactly the same function. Every other module is a rename.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from packager.staging import staged_folder
from .checkpoint import ConvertError
from .tensors import TensorMapError, map_module

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# LoRA tensor kind -> whether it is split along the output with the module (B is, A is shared).
SPLIT = {"lora_A": False, "lora_B": True}


def map_lora_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """`base_model.model.transformer.h.0.attn.c_attn.lora_B.weight` -> its Qwen2 tensors."""
    if not name.startswith(PREFIX):
        raise TensorMapError(f"{name}: adapter tensors start with {PREFIX!r}")
    module, kind, leaf = name[len(PREFIX) :].rsplit(".", 2)
    kind_base = kind.split(".")[0]
    if kind_base not in SPLIT:
        raise TensorMapError(f"{name}: only lora_A/lora_B tensors convert (DoRA and embeddings do not)")
    targets = map_module(module)
    if SPLIT[kind_base] and len(targets) > 1:
        if tensor.shape[0] % len(targets):
            raise TensorMapError(f"{name}: {tuple(tensor.shape)} does not split into {len(targets)}")
        parts = [p.contiguous() for p in torch.split(tensor, tensor.shape[0] // len(targets), dim=0)]
    else:
        parts = [tensor.clone() for _ in targets]
    return {f"{PREFIX}{t}.{kind}.{leaf}": p for t, p in zip(targets, parts)}


def adapter_config(config: dict, tensors: dict[str, torch.Tensor]) -> dict:
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ConvertError(f"{CONFIG}: {key} is set; only plain LoRA adapters convert")
    if config.get("use_dora"):
        raise ConvertError(f"{CONFIG}: use_dora is set; only plain LoRA adapters convert")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
    targets = sorted({name[len(PREFIX) :].split(".lora_")[0].rsplit(".", 1)[1] for name in tensors})
    return {**config, "target_modules": targets}


def convert_adapter(src: Path, dst: Path, overwrite: bool = False, log=print) -> Path:
    """Qwen v1 LoRA adapter folder `src` -> Qwen2 adapter folder `dst`."""
    src, dst = Path(src), Path(dst)
    try:
        config = json.loads((src / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{src / CONFIG}: missing; SRC must be a PEFT adapter folder") from None
    weights = src / WEIGHTS
    if weights.is_file():
        source = load_file(weights)
    elif (src / "adapter_model.bin").is_file():
        source = torch.load(src / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConvertError(f"{src}: no {WEIGHTS} or adapter_model.bin")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConvertError(f"{dst} exists and is not empty: choose another OUT or remove it")
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        try:
            converted.update(map_lora_tensor(name, tensor))
        except TensorMapError as e:
            raise ConvertError(f"{src.name}: {e}") from None
    new_config = adapter_config(config, converted)
    with staged_folder(dst) as tmp:
        save_file(converted, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
    log(f"wrote {dst}: {len(source)} -> {len(converted)} LoRA tensors on {', '.join(new_config['target_modules'])}")
    return dst


def is_qwen1_adapter(folder: Path) -> bool:
    """True when the adapter's tensors (safetensors or the older .bin) name Qwen (v1) modules."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        from safetensors import safe_open

        with safe_open(folder / WEIGHTS, "pt") as f:
            names = list(f.keys())
    elif (folder / "adapter_model.bin").is_file():
        names = list(torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True))
    else:
        return False
    return any(k.startswith(PREFIX + "transformer.h.") for k in names)
