"""Before quantizing: projected peak GPU memory and time of the GPTQ run on one RTX 4090.

GPTQ quantizes one decoder layer at a time. What must sit on the GPU is the
layer's inputs and outputs for every calibration token (fp16), the layer's
fp16 weights, the Hessians of the modules being solved (fp32, in x in), and
one window's activations. Time is dominated by the layer forwards over all
calibration tokens (one per group of modules solved together, plus one for the
outputs) and the Hessian accumulation, at the card's fp16 rate times an
efficiency measured on real runs (`packager/data/models.toml`, [gpu]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1 << 30
# Groups of modules GPTQ solves together in a Qwen2/Llama layer (true_sequential):
# q/k/v, o, gate/up, down. The input width of each group decides its Hessian.
SEQUENTIAL_GROUPS = 4


@dataclass(frozen=True)
class LayerShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> "LayerShape":
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
        )

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate


@dataclass(frozen=True)
class Plan:
    gpu: str
    calibration_tokens: int
    peak_gib: float
    gpu_gib: float
    seconds_per_layer: float
    hours: float

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.gpu_gib

    def describe(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        return (
            f"projected on one {self.gpu}: peak {self.peak_gib:.1f} of {self.gpu_gib:.0f} GiB ({verdict}), "
            f"{self.seconds_per_layer:.0f} s a layer, {self.hours:.2f} h in all, "
            f"for {self.calibration_tokens:,} calibration tokens"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def project(shape: LayerShape, samples: int, seq_len: int, gpu: dict) -> Plan:
    tokens = samples * seq_len
    layer_io = 2 * tokens * shape.hidden * 2  # inputs and outputs of the layer, fp16
    weights = shape.layer_params * 2
    hessians = max(2 * shape.hidden**2, shape.intermediate**2) * 4  # gate+up share one input; down is widest
    window = seq_len * (3 * shape.intermediate + 6 * shape.hidden) * 2 + shape.heads * seq_len * 64 * 4
    peak = layer_io + weights + hessians + window + gpu["runtime_overhead_gib"] * GIB
    forwards = (SEQUENTIAL_GROUPS + 1) * 2 * shape.layer_params * tokens
    hessian_flops = 2 * tokens * (3 * shape.hidden**2 + shape.intermediate**2)
    rate = gpu["fp16_tflops"] * 1e12 * gpu["gptq_efficiency"]
    per_layer = (forwards + hessian_flops) / rate
    return Plan(
        gpu=gpu["name"],
        calibration_tokens=tokens,
        peak_gib=peak / GIB,
        gpu_gib=gpu["memory_gib"],
        seconds_per_layer=per_layer,
        hours=per_layer * shape.layers / 3600,
    )
