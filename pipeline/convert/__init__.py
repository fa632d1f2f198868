"""Qwen (v1) -> Qwen2: the layout transformers ships, so no remote modeling code runs.

Qwen (v1) checkpoints carry their own modeling code, written for transformers
4.32; under transformers 5 it fails to import, and once patched it silently
re-initialises weights while loading. The same network is a Qwen2 model with
renamed, split tensors, so converting is exact (within the 2048-token window
Qwen v1 was trained on; see `config.py`).

Converts full-precision checkpoints, AutoGPTQ-format GPTQ checkpoints (without
re-quantizing), LoRA adapters trained on Qwen v1 module names, and the tiktoken
tokenizer. This package is also shipped inside every submission zip, so an
image can convert a Qwen v1 artifact at build time.

    python -m pipeline.convert SRC OUT          # a model folder
    python -m pipeline.convert --adapter SRC OUT  # a LoRA adapter folder
"""

__all__ = ["ConvertError", "as_qwen2", "convert_adapter", "convert_model", "is_qwen1"]


def __getattr__(name: str):
    """Exports load on first use: `names` (the module map, no torch) is imported by the spec."""
    if name == "convert_adapter":
        from .lora import convert_adapter

        return convert_adapter
    if name in ("ConvertError", "as_qwen2", "convert_model", "is_qwen1"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
