"""What a quantization run leaves beside its artifact: perplexity before and after, per-layer figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .gptq import LayerStats


@torch.inference_mode()
def perplexity(model, windows: list[list[int]]) -> float:
    """exp(mean next-token NLL) over the windows, scored one window at a time."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for window in windows:
        ids = torch.tensor([window], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count)


def load_for_eval(folder: Path, device: torch.device):
    """Load a model for scoring: a GPTQ one the way the server does; the fp16 base spread over
    GPU and CPU memory as needed (14B in fp16 is 28 GB, more than a 4090 holds)."""
    from helm_server.hf_engine import load_model
    from helm_server.settings import GenerationSettings, ServeConfig, ServedModel

    dtype = "float16" if device.type == "cuda" else "float32"
    if device.type == "cuda" and "quantization_config" not in json.loads((folder / "config.json").read_text()):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="auto").eval()
    config = ServeConfig(
        submission="quantize-report",
        model=ServedModel(repo_id=str(folder), dtype=dtype),
        generation=GenerationSettings(eos_token_ids=[0]),
    )
    return load_model(config, device)


def scored(label: str, folder: Path, device: torch.device, windows: list[list[int]]) -> float | None:
    """Perplexity of one model, or None with the reason printed: a failed score never costs the artifact."""
    try:
        return perplexity(load_for_eval(folder, device), windows)
    except Exception as e:  # noqa: BLE001 - reported, and the report says it is missing
        print(f"warning: perplexity of the {label} model failed: {type(e).__name__}: {e}", flush=True)
        return None


def table(stats: list[LayerStats]) -> str:
    lines = [f"{'layer':>5}  {'seconds':>8}  {'peak GiB':>8}  {'max GPTQ loss':>13}  worst module"]
    for s in stats:
        worst = max(s.losses.items(), key=lambda kv: kv[1], default=("-", float("nan")))
        lines.append(f"{s.layer:>5}  {s.seconds:>8.1f}  {s.peak_gib:>8.2f}  {worst[1]:>13.3g}  {worst[0]}")
    return "\n".join(lines)
