"""Convert a Qwen (v1) model folder (full precision or GPTQ) into a Qwen2 model folder.

Streams one weight file at a time, so a 14B checkpoint converts in the memory
of its largest shard; writes into a temporary sibling folder renamed into place
when complete, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from packager.staging import staged_folder
from .config import ConfigError, exact_context, qwen2_config
from .tensors import LAYER_MODULES, TensorMapError, map_tensor
from .tokenizer import convert_tokenizer

SAFETENSORS_INDEX = "model.safetensors.index.json"
RECORD = "conversion.json"
# Files of the source folder carried over as they are (licences, GPTQ's own config).
CARRIED = ("LICENSE*", "NOTICE*", "quantize_config.json")


class ConvertError(Exception):
    """A source that cannot be converted; the message names the file and the reason."""


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing; SRC must be a Hugging Face model folder") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def is_qwen1(model_dir: Path) -> bool:
    """True for a Qwen (v1) checkpoint (model_type "qwen", remote modeling code)."""
    return read_config(model_dir).get("model_type") == "qwen"


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("pytorch_model*.bin"))
    if not files:
        raise ConvertError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weight files")
    return files


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def convert_weights(src: Path, dst: Path, log=print) -> dict[str, str]:
    """Map every tensor of every weight file; return the new weight map {tensor: file}."""
    weight_map: dict[str, str] = {}
    files = weight_files(src)
    for n, path in enumerate(files, 1):
        out_name = path.with_suffix(".safetensors").name.replace("pytorch_model", "model")
        converted: dict[str, torch.Tensor] = {}
        for name, tensor in load_weights(path).items():
            try:
                converted.update(map_tensor(name, tensor))
            except TensorMapError as e:
                raise ConvertError(f"{path.name}: {e}") from None
        save_file(converted, dst / out_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(converted, out_name))
        log(f"  [{n}/{len(files)}] {path.name}: {len(converted)} tensors -> {out_name}")
    return weight_map


def check_complete(weight_map: dict[str, str], layers: int) -> None:
    """Every module of every layer got tensors: a missing shard must not pass unnoticed."""
    modules = {m.rsplit(".", 1)[0] for m in weight_map}
    expected = {f"model.layers.{i}.{t}" for i in range(layers) for ts in LAYER_MODULES.values() for t in ts}
    expected |= {"model.embed_tokens", "model.norm"}
    missing = sorted(expected - modules)
    if missing:
        raise ConvertError(f"{len(missing)} modules have no tensors after conversion, e.g. {missing[:3]}")


def convert_model(src: Path, dst: Path, overwrite: bool = False, log=print) -> Path:
    """Qwen v1 folder `src` -> Qwen2 folder `dst` (weights, config, tokenizer, record)."""
    src, dst = Path(src), Path(dst)
    v1 = read_config(src)
    if v1.get("model_type") != "qwen":
        raise ConvertError(f"{src}/config.json: model_type is {v1.get('model_type')!r}, not a Qwen (v1) checkpoint")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConvertError(f"{dst} exists and is not empty: choose another OUT or remove it")
    try:
        config = qwen2_config(v1)
    except (ConfigError, KeyError) as e:
        raise ConvertError(f"{src}/config.json: {e}") from None
    with staged_folder(dst) as tmp:
        log(f"converting {src} (Qwen v1) -> {dst} (Qwen2)")
        weight_map = convert_weights(src, tmp, log)
        check_complete(weight_map, config["num_hidden_layers"])
        if len(set(weight_map.values())) > 1:
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        convert_tokenizer(src, tmp)
        for pattern in CARRIED:
            for path in src.glob(pattern):
                shutil.copy2(path, tmp / path.name)
        record = {
            "converted_from": "qwen (v1)",
            "source": str(src),
            "exact_context": exact_context(v1),
            "tensors": len(weight_map),
            "gptq": "quantization_config" in v1,
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {dst}: {len(weight_map)} tensors; exact up to {record['exact_context']} tokens")
    return dst


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def as_qwen2(base: Path, work: Path) -> Path:
    """A model folder in the Qwen2 layout: itself, or its conversion (kept in `work`, reused while the source is the same)."""
    if not is_qwen1(base):
        return base
    converted = work / "base-qwen2"
    record = converted / "conversion.json"
    if record.is_file() and json.loads(record.read_text()).get("source") == str(base):
        return converted
    return convert_model(base, converted, overwrite=True)
