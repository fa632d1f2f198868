"""Qwen (v1) stand-ins for the conversion tests, written from Qwen v1's published equations.

- `qwen1_forward`: an independent implementation of Qwen v1's forward pass
  (RMSNorm, fused c_attn, rotary on the two halves of each head, causal
  softmax attention scaled by 1/sqrt(head_dim), MLP c_proj(w1(x) * silu(w2(x))),
  untied lm_head), reading Qwen v1 tensor names. Within 2048 tokens dynamic NTK
  and logn scaling are identities, so they are left out.
- `save_qwen1_checkpoint`: a tiny random Qwen v1 checkpoint in the Hub layout
  (two safetensors shards and their index, config.json with auto_map, the real
  qwen.tiktoken), optionally GPTQ-quantized in AutoGPTQ's format.
- `save_qwen1_lora`: a PEFT adapter trained on Qwen v1 module names.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
QWEN_TIKTOKEN = REPO.parent / "shared" / "qwen1" / "qwen.tiktoken"

TINY_V1 = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "model_type": "qwen",
    "vocab_size": 151936,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "seq_length": 2048,
    "max_position_embeddings": 8192,
    "no_bias": True,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "tie_word_embeddings": False,
    "fp16": False,
    "bf16": False,
    "fp32": True,
    "torch_dtype": "float32",
    "tokenizer_class": "QWenTokenizer",
}
MODULES = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def random_qwen1_weights(config: dict, seed: int = 0, std: float = 0.15) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, ff, v = config["hidden_size"], config["intermediate_size"] // 2, config["vocab_size"]
    rnd = lambda *shape: torch.randn(*shape, generator=g) * std  # noqa: E731
    w = {"transformer.wte.weight": rnd(v, h), "transformer.ln_f.weight": 1 + rnd(h), "lm_head.weight": rnd(v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        w |= {
            p + "ln_1.weight": 1 + rnd(h),
            p + "ln_2.weight": 1 + rnd(h),
            p + "attn.c_attn.weight": rnd(3 * h, h),
            p + "attn.c_attn.bias": rnd(3 * h),
            p + "attn.c_proj.weight": rnd(h, h),
            p + "mlp.w1.weight": rnd(ff, h),
            p + "mlp.w2.weight": rnd(ff, h),
            p + "mlp.c_proj.weight": rnd(h, ff),
        }
    return w


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x, base):
    """Rotary embedding on [T, heads, D]: the first and second halves of each head are the pairs."""
    t, _, d = x.shape
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv_freq)
    angles = torch.cat([freqs, freqs], -1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()


def qwen1_forward(weights: dict, config: dict, ids: list[int], lora: dict | None = None) -> torch.Tensor:
    """Logits [T, vocab] in float64; `lora` maps 'transformer.h.I.MODULE' -> (A, B, scale)."""
    w = {k: t.double() for k, t in weights.items()}
    h, heads = config["hidden_size"], config["num_attention_heads"]
    d, eps, base = h // heads, config["layer_norm_epsilon"], config["rotary_emb_base"]

    def linear(x, prefix):
        y = x @ w[prefix + ".weight"].T
        if prefix + ".bias" in w:
            y = y + w[prefix + ".bias"]
        if lora and prefix in lora:
            a, b, scale = lora[prefix]
            y = y + scale * (x @ a.double().T) @ b.double().T
        return y

    x = w["transformer.wte.weight"][torch.tensor(ids)]
    t = len(ids)
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        a = _rms_norm(x, w[p + "ln_1.weight"], eps)
        q, k, v = (z.view(t, heads, d) for z in linear(a, p + "attn.c_attn").split(h, -1))
        q, k = _rotate(q, base), _rotate(k, base)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(d) + causal
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(t, h)
        x = x + linear(attn, p + "attn.c_proj")
        m = _rms_norm(x, w[p + "ln_2.weight"], eps)
        x = x + linear(linear(m, p + "mlp.w1") * torch.nn.functional.silu(linear(m, p + "mlp.w2")), p + "mlp.c_proj")
    return _rms_norm(x, w["transformer.ln_f.weight"], eps) @ w["lm_head.weight"].T


# --- GPTQ in AutoGPTQ's (v1) format ------------------------------------------------


def gptq_quantize(weight: torch.Tensor, group_size: int, bits: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Round-to-nearest symmetric quantization packed as AutoGPTQ writes it; returns (tensors, dequantized)."""
    out_f, in_f = weight.shape
    maxq, per_int = 2**bits - 1, 32 // bits
    zero = (maxq + 1) // 2
    groups = weight.view(out_f, in_f // group_size, group_size)
    scales = (groups.abs().amax(-1) / (maxq - zero)).clamp(min=1e-8).half()  # [out, groups]
    q = (groups / scales.float()[..., None]).round().add(zero).clamp(0, maxq).to(torch.int64).view(out_f, in_f)
    # As GPTQ kernels dequantize: (code - zero) times the fp16 scale, rounded to fp16.
    dequant = ((q.view(out_f, -1, group_size) - zero).half() * scales[..., None]).float()
    qt = q.T.contiguous()  # [in, out]
    qweight = torch.zeros(in_f // per_int, out_f, dtype=torch.int64, device=weight.device)
    for j in range(per_int):
        qweight |= qt[j::per_int] << (bits * j)
    stored_zero = torch.full((in_f // group_size, out_f), zero - 1, dtype=torch.int64, device=weight.device)  # AutoGPTQ v1 stores zero - 1
    qzeros = torch.zeros(in_f // group_size, out_f // per_int, dtype=torch.int64, device=weight.device)
    for j in range(per_int):
        qzeros |= stored_zero[:, j::per_int] << (bits * j)
    tensors = {
        "qweight": _int32(qweight),
        "qzeros": _int32(qzeros),
        "scales": scales.T.contiguous(),
        "g_idx": torch.arange(in_f, dtype=torch.int32, device=weight.device) // group_size,
    }
    return tensors, dequant.view(out_f, in_f)


def _int32(packed: torch.Tensor) -> torch.Tensor:
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


# --- writing checkpoints in the Hub layout ------------------------------------------


def save_qwen1_checkpoint(directory: Path, gptq_group_size: int | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Write a tiny Qwen v1 checkpoint; return (config, the weights its forward pass should use)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_V1)
    weights = random_qwen1_weights(config, seed)
    tensors: dict[str, torch.Tensor] = {}
    effective = dict(weights)
    for name, tensor in weights.items():
        module = name.rsplit(".", 1)[0]
        if gptq_group_size and name.endswith(".weight") and module.split(".", 3)[-1] in MODULES:
            packed, dequant = gptq_quantize(tensor, gptq_group_size)
            tensors |= {f"{module}.{k}": v for k, v in packed.items()}
            effective[name] = dequant
        else:
            tensors[name] = tensor.half() if gptq_group_size else tensor
            effective[name] = tensors[name].float()
    if gptq_group_size:
        config |= {"fp16": True, "fp32": False, "torch_dtype": "float16"}
        config["quantization_config"] = {
            "bits": 8, "group_size": gptq_group_size, "desc_act": False, "sym": True,
            "damp_percent": 0.01, "quant_method": "gptq", "true_sequential": True,
        }
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    index = {"metadata": {}, "weight_map": {}}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, directory / shard, metadata={"format": "pt"})
        index["weight_map"] |= dict.fromkeys(keys, shard)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = {"auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}, "tokenizer_class": "QWenTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (directory / "LICENSE").write_text("Tongyi Qianwen license (stand-in)\n")
    shutil.copy(QWEN_TIKTOKEN, directory / "qwen.tiktoken")
    return config, effective


def save_qwen1_lora(directory: Path, config: dict, r: int = 4, alpha: int = 8, seed: int = 1) -> dict:
    """A LoRA adapter on every Qwen v1 linear; returns {module: (A, B, scale)} for `qwen1_forward`."""
    g = torch.Generator().manual_seed(seed)
    h, ff = config["hidden_size"], config["intermediate_size"] // 2
    shapes = {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.w1": (h, ff), "mlp.w2": (h, ff), "mlp.c_proj": (ff, h)}
    tensors, lora = {}, {}
    for i in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            a = torch.randn(r, fan_in, generator=g) * 0.1
            b = torch.randn(fan_out, r, generator=g) * 0.1
            path = f"transformer.h.{i}.{module}"
            tensors[f"base_model.model.{path}.lora_A.weight"] = a
            tensors[f"base_model.model.{path}.lora_B.weight"] = b
            lora[path] = (a, b, alpha / r)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": ["c_attn", "c_proj", "w1", "w2"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": "Qwen/Qwen-14B", "inference_mode": True, "modules_to_save": None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return lora
