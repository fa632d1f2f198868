"""The submission spec: one TOML file per submission, validated here.

A spec records every decision behind an entry: which weights (at which
revisions), how they were quantized, how the adapter was trained and on what
data, and how the server generates. Quantization and training sections are
written so that those stages read them directly. The generation, server and
model-reference sections are the server's own settings models, so a spec can
never say something the server would not understand.
"""

from __future__ import annotations

import hashlib
import re
import string
import tomllib
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from helm_server.settings import GenerationSettings, ModelSource, ServedModel, ServerSettings
from .lora_targets import describe, resolve

SPEC_FILE = "spec.toml"
CHALLENGE_PORT = 80


class SpecError(Exception):
    """A spec that cannot be used; the message names the file, the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


# --- quantization -----------------------------------------------------------------


class Calibration(_Strict):
    """Calibration text for GPTQ: `num_samples` windows of `seq_len` tokens.

    The split's lines (empty ones as " \\n") are joined and tokenized once; each
    window starts at `random.randint(0, n_tokens - seq_len - 1)` after
    `random.seed(seed)`, as the reference solution drew them.
    """

    dataset: str = Field(default="Salesforce/wikitext", min_length=1, description="Hub dataset repo id")
    revision: str = Field(default="main", min_length=1)
    config: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    text_field: str = "text"
    num_samples: int = Field(default=120, gt=0)
    seq_len: int = Field(default=4096, gt=0)
    seed: int = 0


class Perplexity(_Strict):
    """Held-out windows (consecutive, from the split's start) scored before and after quantization."""

    split: str = "validation"
    windows: int = Field(default=16, gt=0)
    seq_len: int = Field(default=2048, gt=0)


class Quantization(_Strict):
    method: Literal["gptq"] = "gptq"
    tool: Literal["gptqmodel"] = Field(default="gptqmodel", description="GPTQModel, the successor of AutoGPTQ")
    bits: Literal[2, 3, 4, 8]
    group_size: int = Field(default=128, description="-1 for per-column quantization")
    desc_act: bool = Field(default=False, description="act-order")
    sym: bool = True
    damp_percent: float = Field(default=0.01, gt=0, lt=1)
    calibration: Calibration = Calibration()
    perplexity: Perplexity = Perplexity()

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, g: int) -> int:
        if g != -1 and (g <= 0 or g & (g - 1)):
            raise ValueError(f"group_size {g} must be -1 or a power of two (32, 64, 128, ...)")
        return g


# --- training ---------------------------------------------------------------------


class Lora(_Strict):
    """LoRA on linear modules of the decoder layers, named as in Qwen v1 or Qwen2 (resolved to Qwen2)."""

    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1, description="attn.c_attn, mlp.w1, ... or self_attn.q_proj, ...")
    layers: Literal["all"] | list[Annotated[int, Field(ge=0)]] = Field(default="all", min_length=1)

    @model_validator(mode="after")
    def _known_modules(self) -> "Lora":
        resolve(self.target_modules)  # ValueError names the allowed modules
        return self

    def resolved(self) -> str:
        """The Qwen2 modules trained, as `make specs` prints them."""
        return describe(self.target_modules, self.layers)


class Optimizer(_Strict):
    name: Literal["lion", "adamw", "paged_adamw_8bit"]
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)


class Schedule(_Strict):
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    epochs: int = Field(gt=0)
    batch_size: int = Field(default=1, gt=0)
    gradient_accumulation: int = Field(default=1, gt=0)
    max_length: int = Field(gt=0)
    seed: int = 42
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="clip; HF Trainer's default, under which the reference ran")
    gradient_checkpointing: bool = True
    pad_token: str = Field(default="<|extra_21|>", min_length=1, description="never end-of-text: padding must not teach stopping")


class Checkpoints(_Strict):
    """Resumable state (adapter, optimizer, scheduler, RNG, data position), written atomically."""

    every: int = Field(default=50, gt=0, description="optimizer steps between checkpoints (and one at each epoch's end)")
    keep: int = Field(default=3, gt=0, description="the newest checkpoints kept; older ones are removed")
    minutes: float | None = Field(default=None, gt=0, description="also save when this many minutes passed since "
                                  "the last checkpoint: bounds what a SIGKILL or power loss costs in time")


class _Source(_Strict):
    """What every data source takes: where it lives and what the spec expects of it."""

    revision: str = Field(default="main", min_length=1)
    expect: int | None = Field(default=None, ge=0, description="conversations this source must yield; else refused")


class Oasst1(_Source):
    """OpenAssistant oasst1: first-ranked replies to root prompts."""

    source: Literal["oasst1"]
    repo_id: str = "OpenAssistant/oasst1"
    splits: list[str] = Field(default=["train", "validation"], min_length=1)
    language: str = "en"
    reply_rank: int = 0
    parent: Literal["root"] = "root"
    drop_if_mentions: list[str] = ["open assist", "open-assist", "chatgpt", "laion"]
    limit: int | None = Field(default=None, gt=0, description="the first N kept pairs, in file order")


class Lima(_Source):
    source: Literal["lima"]
    repo_id: str = "GAIR/lima"
    split: str = "train"
    limit: int | None = Field(default=1000, gt=0)


class Arc(_Source):
    """ARC questions, several per example in "Question: ... / A. ... / Answer: X" form."""

    source: Literal["arc"]
    repo_id: str = "allenai/ai2_arc"
    subset: Literal["ARC-Challenge", "ARC-Easy"] = "ARC-Challenge"
    splits: list[str] = Field(default=["train", "validation", "test"], min_length=1)
    questions_per_example: int = Field(default=6, gt=0)


class Humpback(_Source):
    """Humpback self-augmented data: (instruction, output) pairs, from the Hub or a local folder."""

    source: Literal["humpback"]
    repo_id: str = Field(min_length=1, description="a Hub dataset repo id, or a local folder in its layout")
    split: str = "train"
    limit: int | None = Field(default=None, gt=0)


# --- Humpback self-augmentation (make humpback-N) -------------------------------------


class Unlabelled(_Strict):
    """Web text to turn into instructions: C4's English shards as on the Hub (`en/c4-train.NNNNN-of-01024.json.gz`)."""

    repo_id: str = Field(default="allenai/c4", min_length=1)
    revision: str = Field(default="main", min_length=1)
    config: str = Field(default="en", min_length=1)
    files: int = Field(default=1, gt=0, le=1024, description="train shards read, from 00000 on (about 356,000 documents each)")

    def pattern(self, index: int) -> str:
        return f"{self.config}/c4-train.{index:05d}-of-01024.json.gz"


class Sampling(_Strict):
    """Nucleus sampling for the backward model's instructions (the paper's T 0.7, p 0.9; no top-k)."""

    temperature: float = Field(default=0.7, gt=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=128, gt=0)
    seed: int = 0


class Rating(_Strict):
    """Self-curation: the seed model rates each pair, greedily, ending with a `Score: N` line."""

    prompt_file: str = Field(default="humpback_rating.txt", min_length=1,
                             description="in the spec's folder; {instruction} and {answer} placeholders")
    max_new_tokens: int = Field(default=256, gt=0)
    threshold: int = Field(default=5, ge=1, le=5, description="keep pairs rated at least this (the paper's best: 5)")


class BackwardTemplate(_Strict):
    """The backward model's text: a web passage (no loss), then the instruction it answers (loss)."""

    system: str = "Write the request that the following text answers.\n\n"
    prompt: str = "\nANSWER: {output}\nQUESTION: "
    answer: str = "{instruction}\n"

    @model_validator(mode="after")
    def _placeholders(self) -> "BackwardTemplate":
        if _fields(self.prompt) != {"output"} or _fields(self.answer) != {"instruction"} or _fields(self.system):
            raise ValueError("backward_template: prompt takes {output} only, answer {instruction} only, system none")
        return self


class HumpbackSeed(_Strict):
    """The seed pairs: first-turn, rank-0, English oasst1 (the paper's 3,200)."""

    repo_id: str = "OpenAssistant/oasst1"
    revision: str = Field(default="main", min_length=1)
    splits: list[str] = Field(default=["train", "validation"], min_length=1)
    language: str = "en"
    reply_rank: int = 0
    drop_if_mentions: list[str] = []
    limit: int = Field(default=3200, gt=0)

    def as_source(self) -> Oasst1:
        return Oasst1(source="oasst1", **self.model_dump())


class HumpbackStage(_Strict):
    """`make humpback-N`: backward model, instructions for web passages, self-curation by the seed model."""

    seed: HumpbackSeed = HumpbackSeed()
    unlabelled: Unlabelled = Unlabelled()
    passages: int = Field(gt=0, description="web passages given an instruction (after dedup and length filter)")
    min_chars: int = Field(default=400, gt=0)
    max_chars: int = Field(default=4000, gt=0)
    seed_epochs: int = Field(default=1, gt=0, description="epochs of the backward and seed models (else as [training.schedule])")
    iterations: Literal[1, 2] = Field(default=1, description="2: re-rate with M1 (seed + the first curated set)")
    batch_size: int = Field(default=4, gt=0,
                            description="most prompts decoding together; fewer when the engine's cache rows do not fit")
    shard_size: int = Field(default=256, gt=0, description="passages per shard: a killed run loses at most one")
    generate: Sampling = Sampling()
    rating: Rating = Rating()
    backward_template: BackwardTemplate = BackwardTemplate()

    @model_validator(mode="after")
    def _bounds(self) -> "HumpbackStage":
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} must be below max_chars {self.max_chars}")
        return self


DataSource = Annotated[Union[Oasst1, Lima, Arc, Humpback], Field(discriminator="source")]
SourceName = Literal["oasst1", "lima", "arc", "humpback"]

# The fields each source's rounds offer to the templates.
ROUND_FIELDS: dict[str, set[str]] = {
    "oasst1": {"prompt", "answer"},
    "lima": {"prompt", "answer"},
    "humpback": {"prompt", "answer"},
    "arc": {"question", "choices", "answerKey"},
}


class SourceTemplate(_Strict):
    """A source's departures from the template's defaults."""

    system: str | None = None
    prompt: str | None = None
    answer: str | None = None
    choice: str | None = Field(default=None, description="arc: one answer choice, {label} and {text}")


class Template(_Strict):
    """How a conversation becomes training text, byte for byte.

    An example is the system text, then per round the prompt (no loss) and the
    answer (loss), each tokenized on its own and concatenated. Placeholders:
    {prompt} and {answer}; ARC rounds offer {question}, {choices} and {answerKey}.
    """

    system: str
    prompt: str
    answer: str
    choice: str = "{label}. {text}\n"
    sources: dict[SourceName, SourceTemplate] = {}

    def for_source(self, source: str) -> "Template":
        """The template with `source`'s own fields in place of the defaults."""
        own = self.sources.get(source)  # type: ignore[call-overload]
        if own is None:
            return self
        return self.model_copy(update={k: v for k, v in own.model_dump().items() if v is not None})

    def check(self, source: str) -> None:
        """Refuse placeholders that `source`'s rounds do not offer."""
        t, allowed = self.for_source(source), ROUND_FIELDS[source]
        for part in ("prompt", "answer"):
            unknown = _fields(getattr(t, part)) - allowed
            if unknown:
                raise ValueError(
                    f"template for {source}: {part} uses {sorted(unknown)}, but its rounds offer {sorted(allowed)} "
                    f"(set [training.template.sources.{source}] {part})"
                )
        if _fields(t.system):
            raise ValueError(f"template for {source}: the system text takes no placeholders")


class Training(_Strict):
    method: Literal["qlora"] = "qlora"
    path: Literal["auto", "fast", "reference"] = Field(
        default="auto", description="how steps are computed (pipeline/train/fast.py): auto = fast on CUDA, reference elsewhere")
    lora: Lora
    optimizer: Optimizer
    schedule: Schedule
    checkpoints: Checkpoints = Checkpoints()
    template: Template
    data: list[DataSource] = Field(min_length=1)
    humpback: HumpbackStage | None = None

    @model_validator(mode="after")
    def _one_table_per_source(self) -> "Training":
        names = [d.source for d in self.data]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"[[training.data]] declares {', '.join(twice)} more than once; merge the tables")
        for name in names:
            self.template.check(name)
        if self.humpback is not None and "humpback" not in names:
            raise ValueError("[training.humpback] makes a data set that no [[training.data]] table reads: "
                             'add one with source = "humpback" (or remove the section)')
        if self.humpback is not None:
            self.template.check("oasst1")  # the seed model is trained and prompted with oasst1's template
        return self


# --- the spec ----------------------------------------------------------------------


class Image(_Strict):
    base: str = Field(default="cuda-4090", description="a key of packager/data/base_images.toml")


class Spec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str = ""
    base_model: ModelSource
    artifact: ServedModel = Field(description="what the server loads (the quantized model)")
    adapter: ModelSource | None = None
    quantization: Quantization | None = None
    training: Training | None = None
    generation: GenerationSettings
    server: ServerSettings = ServerSettings()
    image: Image = Image()

    @field_validator("server")
    @classmethod
    def _challenge_port(cls, server: ServerSettings) -> ServerSettings:
        if server.port != CHALLENGE_PORT:
            raise ValueError(f"port = {server.port}: the challenge's bot talks to port {CHALLENGE_PORT} inside the "
                             f"container (a zip rule checks it); set port = {CHALLENGE_PORT} or remove the line "
                             "(`make serve-N` maps it to 127.0.0.1:8080 on the host)")
        return server

    @model_validator(mode="after")
    def _coherent(self) -> "Spec":
        if self.training is not None and self.adapter is None:
            raise ValueError("[training] produces an adapter: add an [adapter] section naming where it is published")
        return self

    def model_refs(self) -> dict[str, ModelSource]:
        refs: dict[str, ModelSource] = {"base_model": self.base_model, "artifact": self.artifact}
        if self.adapter is not None:
            refs["adapter"] = self.adapter
        return refs

    def unpinned(self) -> list[str]:
        """Model references whose revision is a branch or tag rather than a commit."""
        return [f"{k} {r.repo_id}@{r.revision}" for k, r in self.model_refs().items() if not r.is_pinned]


# --- loading -----------------------------------------------------------------------

_HINTS = {
    "extra_forbidden": "unknown field: check its spelling against docs/spec.md, or remove it",
    "missing": "required: add it",
    "literal_error": "use one of the allowed values",
    "union_tag_invalid": "set `source` to one of oasst1, lima, arc, humpback",
}


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")


def locate(text: str, loc: tuple) -> int | None:
    """The 1-based line of a validation error's location in the TOML text (its key, else its table)."""
    want = tuple(loc)
    # a tagged union (`[[training.data]]` by `source`) puts the tag after the index: not a TOML key
    want = tuple(p for i, p in enumerate(want) if not (i and isinstance(want[i - 1], int) and isinstance(p, str)
                                                        and p in ROUND_FIELDS))
    table: tuple = ()
    arrays: dict[tuple, int] = {}
    table_line: dict[tuple, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            names = tuple(part.strip().strip('"') for part in m.group(2).split("."))
            if m.group(1) == "[[":
                arrays[names] = arrays.get(names, -1) + 1
                table = (*names, arrays[names])
            else:
                table = names
            table_line.setdefault(table, n)
            continue
        k = _KEY.match(line)
        if k and (*table, k.group(1)) == want:
            return n
    for cut in range(len(want), 0, -1):
        if want[:cut] in table_line:
            return table_line[want[:cut]]
    return None


def _unquoted(text: str) -> bool:
    """Would this string be a valid TOML number or boolean without its quotes?"""
    if text in ("true", "false"):
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def _got(e: dict) -> str:
    value = e.get("input")
    if isinstance(value, str) and _unquoted(value) and e["type"] in (
            "literal_error", "int_type", "int_parsing", "float_type", "float_parsing", "bool_type", "bool_parsing"):
        return f"; got the string {value!r}: write it without quotes"
    if isinstance(value, (int, float, bool, str)) and e["type"] not in ("missing", "extra_forbidden", "value_error"):
        return f"; got {value!r}"
    return ""


def _describe(path: Path, err: ValidationError, text: str = "") -> str:
    lines = [f"{path}: invalid spec ({err.error_count()} problem{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        at = locate(text, e["loc"]) if text else None
        where = f"line {at}: " if at else ""
        msg = e["msg"].removeprefix("Value error, ")
        hint = _HINTS.get(e["type"])
        lines.append(f"  - {where}{loc}: {msg}{_got(e)}" + (f" ({hint})" if hint else ""))
    return "\n".join(lines)


def parse_spec(path: Path, text: str) -> Spec:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_describe(path, e, text)) from None
    folder = path.parent.name
    if path.name == SPEC_FILE and folder != spec.name:
        raise SpecError(f"{path}: name = {spec.name!r} but the folder is {folder!r}; make them the same")
    return spec


def spec_path(submissions_dir: Path, name: str) -> Path:
    path = submissions_dir / name / SPEC_FILE
    if not path.is_file():
        known = sorted(p.parent.name for p in submissions_dir.glob(f"*/{SPEC_FILE}"))
        raise SpecError(f"no spec at {path}; known submissions: {', '.join(known) or 'none'}")
    return path


def load_spec(path: Path) -> tuple[Spec, str]:
    """Parse and validate a spec file; return it with the sha256 of its bytes."""
    data = Path(path).read_bytes()
    spec = parse_spec(Path(path), data.decode("utf-8"))
    rating_prompt(spec, Path(path).parent)
    return spec, hashlib.sha256(data).hexdigest()


def rating_prompt(spec: Spec, folder: Path) -> str | None:
    """The Humpback rating prompt, a text file beside the spec (so a team edits it as text); None without one."""
    hb = spec.training.humpback if spec.training else None
    if hb is None:
        return None
    path = folder / hb.rating.prompt_file
    if not path.is_file():
        raise SpecError(f"{folder / SPEC_FILE}: [training.humpback.rating] prompt_file: no {path}; "
                        "write the rating prompt there (placeholders {instruction} and {answer})")
    text = path.read_text(encoding="utf-8")
    try:
        found = _fields(text)
    except ValueError as e:
        raise SpecError(f"{path}: {e} (write a literal brace as {{{{ or }}}})") from None
    if found != {"instruction", "answer"}:
        raise SpecError(f"{path}: the rating prompt must use exactly {{instruction}} and {{answer}}, it uses {sorted(found)}")
    return text
