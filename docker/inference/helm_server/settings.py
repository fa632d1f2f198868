"""Runtime settings of the inference server.

These models are the single definition of what a submission's server can be
told: the packager validates a spec's `[generation]`, `[server]` and model
sections against them and renders them into `serve_config.json`; the server
reads that file back with the same models. Environment variables
`MODEL_PATH` and `ADAPTER_PATH` override the model references at run time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SERVE_CONFIG_FILE = "serve_config.json"
MAX_BATCH = 16  # rows of a batch; HELM sends up to 4 requests at once


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a spec must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Strict):
    """Where weights come from: a Hub repo at a revision, or a local directory."""

    repo_id: str = Field(min_length=1, description="Hub repo id (owner/name) or a local directory")
    revision: str = Field(default="main", min_length=1)

    @property
    def is_pinned(self) -> bool:
        """A 40-hex commit hash pins the weights; a branch or tag can move under you."""
        rev = self.revision.lower()
        return len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)


GptqKernel = Literal["auto", "torch", "triton", "marlin"]


class ServedModel(ModelSource):
    """The model the server loads (for a GPTQ submission, the quantized artifact)."""

    trust_remote_code: bool = False
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    gptq_kernel: GptqKernel = Field(
        default="auto",
        description="GPTQ weight kernel; auto: the server's tested choice per device (hf_engine.GPTQ_KERNELS)",
    )


class GenerationSettings(_Strict):
    """How the server turns a HELM request into tokens.

    These are where a challenge entry wins or loses points: the reference
    solution's edge came from exactly these knobs.
    """

    eos_token_ids: list[int] = Field(min_length=1, description="ids that end generation (151643 for Qwen)")
    min_new_tokens: int = Field(default=1, ge=0, description="eos is suppressed before this many new tokens")
    min_temperature: float = Field(
        default=1e-3, gt=0, description="below this, decoding is greedy (HELM sends 1e-7 for temperature 0)"
    )
    default_top_k: int = Field(default=200, ge=0, description="top_k when the request gives none; 0 disables")
    default_max_new_tokens: int = Field(default=50, ge=0)
    context_length: int = Field(default=2048, gt=0, description="prompt + new tokens may not exceed this")
    overflow: Literal["reject", "truncate_left"] = Field(
        default="reject",
        description="prompt + max_new_tokens > context_length: answer 422, or drop the prompt's oldest tokens",
    )
    stop_sequences_in_output: bool = Field(
        default=False, description="keep the matched stop sequence in the returned text (HELM expects it cut)"
    )
    # Request limits: beyond them a request is answered 422 naming the field and the limit, fast.
    max_top_k_per_token: int = Field(default=100, ge=1, description="most top_logprob entries per token a request may ask")
    max_prompt_chars: int = Field(default=100_000, ge=1, description="longest prompt (characters) a request may send")
    max_temperature: float = Field(default=100.0, gt=0, description="higher temperatures are clamped to this")

    @field_validator("eos_token_ids")
    @classmethod
    def _non_negative_ids(cls, ids: list[int]) -> list[int]:
        if any(i < 0 for i in ids):
            raise ValueError("token ids must be >= 0")
        return ids

    @model_validator(mode="after")
    def _context_holds_default(self) -> "GenerationSettings":
        if self.default_max_new_tokens > self.context_length:
            raise ValueError("default_max_new_tokens exceeds context_length")
        return self


class ServerSettings(_Strict):
    """Process-level settings; the challenge's bot talks to port 80."""

    port: int = Field(default=80, ge=1, le=65535)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    engine: Literal["auto", "static", "hf"] = Field(
        default="auto", description="decode engine: static (static KV cache, CUDA-graph decode, prefix reuse), "
        "hf (plain transformers, the reference), auto: static on CUDA, hf on the CPU")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_queue: int = Field(default=16, ge=0, description="requests that may wait for the model; more are answered 503")
    request_timeout_s: float = Field(default=120.0, gt=0, description="from arrival: past it generation stops and the "
                                     "request is answered with what was generated (503 if it never reached the model)")
    max_batch: int = Field(default=1, description="requests decoded together (continuous batching); 1: one at a time. "
                           f"The static engine keeps a KV cache slot per row (memory x max_batch); 1 to {MAX_BATCH}")

    @field_validator("max_batch")
    @classmethod
    def _batch_in_range(cls, value: int) -> int:
        if not 1 <= value <= MAX_BATCH:
            raise ValueError(f"max_batch {value} is outside 1..{MAX_BATCH}: 1 decodes one request at a time; HELM "
                             f"sends up to 4 at once, and each row costs a whole context of KV cache on the static engine")
        return value


class Weights(_Strict):
    """What the image downloads at build time (`models.json`): only the references, so that the
    weights layer is rebuilt when a repo or revision changes and for nothing else."""

    model: ModelSource
    adapter: ModelSource | None = None


class ServeConfig(_Strict):
    """Everything `main.py` needs to serve one submission."""

    submission: str = Field(min_length=1)
    model: ServedModel
    adapter: ModelSource | None = None
    generation: GenerationSettings
    server: ServerSettings = ServerSettings()


def apply_environment(config: ServeConfig, environ: Mapping[str, str]) -> ServeConfig:
    """`MODEL_PATH`/`ADAPTER_PATH` replace the spec's references (a local dir or Hub id).

    An override drops the spec's revision: a local directory has none, and a
    different Hub repo's branches are unrelated to the spec's.
    `ADAPTER_PATH=none` serves the bare model.
    """
    updates: dict[str, object] = {}
    model_path = environ.get("MODEL_PATH", "").strip()
    if model_path:
        updates["model"] = config.model.model_copy(update={"repo_id": model_path, "revision": "main"})
    adapter_path = environ.get("ADAPTER_PATH", "").strip()
    if adapter_path.lower() == "none":
        updates["adapter"] = None
    elif adapter_path:
        updates["adapter"] = ModelSource(repo_id=adapter_path)
    return config.model_copy(update=updates) if updates else config


def load_serve_config(path: Path, environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Read the rendered config next to `main.py`, then apply environment overrides."""
    environ = os.environ if environ is None else environ
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing; it is rendered by the packager into every submission") from None
    return apply_environment(ServeConfig.model_validate(raw), environ)
