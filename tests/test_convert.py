"""Qwen (v1) -> Qwen2 conversion is exact: weights, GPTQ tensors, LoRA adapters, tokenizer.

Logits of the converted model (run by transformers' own Qwen2 code) are checked
against an independent implementation of Qwen v1's forward pass (tests/qwen1.py).
"""

from __future__ import annotations

import ast
import base64
import json
import subprocess
import sys
import unicodedata

import pytest
import torch

from conftest import REPO
from pipeline.convert import ConvertError, convert_adapter, convert_model, is_qwen1
from qwen1 import QWEN_TIKTOKEN, qwen1_forward, save_qwen1_checkpoint, save_qwen1_lora

IDS = [151643, 9707, 1879, 11, 1052, 374, 264, 1273, 315, 279, 14409, 13, 220, 16, 17, 18, 2303, 151644, 872, 198]


@pytest.fixture(scope="module")
def qwen1_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen1") / "Qwen" / "Qwen-tiny"
    config, weights = save_qwen1_checkpoint(d)
    return d, config, weights


@pytest.fixture(scope="module")
def converted(qwen1_dir, tmp_path_factory):
    src, _, _ = qwen1_dir
    return convert_model(src, tmp_path_factory.mktemp("qwen2") / "model", log=lambda m: None)


def _logits(model_dir, ids, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].double()


def test_converted_logits_match_qwen1_equations(qwen1_dir, converted):
    _, config, weights = qwen1_dir
    expected = qwen1_forward(weights, config, IDS)
    got = _logits(converted, IDS)
    assert (got - expected).abs().max().item() < 1e-4


def test_converted_config_and_files(qwen1_dir, converted):
    src, v1, _ = qwen1_dir
    assert is_qwen1(src) and not is_qwen1(converted)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["intermediate_size"] == v1["intermediate_size"] // 2
    assert config["vocab_size"] == v1["vocab_size"] and config["num_key_value_heads"] == v1["num_attention_heads"]
    assert config["max_position_embeddings"] == 2048  # exact only within Qwen v1's training length
    assert "auto_map" not in config
    record = json.loads((converted / "conversion.json").read_text())
    assert record["exact_context"] == 2048 and not record["gptq"]
    assert (converted / "model.safetensors.index.json").is_file() and (converted / "LICENSE").is_file()
    assert not list(converted.glob("*.py")) and not list(converted.parent.glob(".*partial*"))


def test_gptq_checkpoint_converts_without_requantizing(tmp_path):
    src = tmp_path / "qwen1-gptq"
    config, weights = save_qwen1_checkpoint(src, gptq_group_size=32)
    dst = convert_model(src, tmp_path / "qwen2-gptq", log=lambda m: None)
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert q["bits"] == 8 and q["group_size"] == 32 and q["checkpoint_format"] == "gptq" and not q["desc_act"]
    from safetensors import safe_open

    with safe_open(dst / "model-00001-of-00002.safetensors", "pt") as a, safe_open(dst / "model-00002-of-00002.safetensors", "pt") as b:
        names = set(a.keys()) | set(b.keys())
    assert "model.layers.0.self_attn.k_proj.qweight" in names and "model.layers.1.mlp.gate_proj.g_idx" in names
    expected = qwen1_forward(weights, config, IDS)
    got = _logits(dst, IDS)
    assert (got - expected).abs().max().item() < 1e-4


def test_lora_on_fused_c_attn_becomes_three_exact_loras(qwen1_dir, converted, tmp_path):
    _, config, weights = qwen1_dir
    lora = save_qwen1_lora(tmp_path / "lora-v1", config)
    adapter = convert_adapter(tmp_path / "lora-v1", tmp_path / "lora-qwen2", log=lambda m: None)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    expected = qwen1_forward(weights, config, IDS, lora=lora)
    assert (expected - qwen1_forward(weights, config, IDS)).abs().max() > 1e-2  # the adapter matters
    got = _logits(converted, IDS, adapter=adapter)
    assert (got - expected).abs().max().item() < 1e-4


def test_refuses_what_it_cannot_convert(qwen1_dir, converted, tmp_path):
    src, _, _ = qwen1_dir
    with pytest.raises(ConvertError, match="not a Qwen \\(v1\\) checkpoint"):
        convert_model(converted, tmp_path / "x")
    with pytest.raises(ConvertError, match="exists and is not empty"):
        convert_model(src, converted)
    bad = tmp_path / "bad"
    save_qwen1_checkpoint(bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "rotary_pct": 0.5}))
    with pytest.raises(ConvertError, match="rotary_pct"):
        convert_model(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_cli_converts_and_reports_errors(qwen1_dir, tmp_path):
    src, _, _ = qwen1_dir
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipeline.convert", *a], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    ok = run(str(src), str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert "exact up to 2048 tokens" in ok.stderr
    missing = run(str(tmp_path / "nope"), str(tmp_path / "o2"))
    assert missing.returncode == 2 and "not a folder" in missing.stderr


# --- the tokenizer against the real Qwen vocabulary ----------------------------------------

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # squares\n\n\tif  x  != 0:\r\n        pass",
    "Numbers 1234567 and 3.14159, dates 2023-12-01; emails a.b@c.org",
    "Unicode: naïve café, Straße, Ελληνικά, русский, 東京は日本の首都です。 한국어 🤖🎉 ﬁ",
    "Decomposed: cafe\u0301 and A\u030a (NFC composes them, as Qwen does)",
    "<|endoftext|>Special <|im_start|>user\nhi<|im_end|> and <|extra_0|><|extra_204|>",
    "   leading spaces, trailing   \n\n\n   ",
    "I'm sure they'll say it's 'quoted' and \"double\" — dashes… ellipses",
]


@pytest.fixture(scope="module")
def fast_tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def tiktoken_encoding():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from pipeline.convert.tokenizer import PATTERN, SPECIAL_TOKENS

    ranks = load_tiktoken_bpe(str(QWEN_TIKTOKEN))
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@pytest.mark.parametrize("text", CORPUS)
def test_tokenizer_ids_match_qwen1(fast_tokenizer, tiktoken_encoding, text):
    expected = tiktoken_encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert fast_tokenizer(text)["input_ids"] == expected
    assert fast_tokenizer.decode(expected) == unicodedata.normalize("NFC", text)


def test_every_ordinary_and_special_token_keeps_its_id(fast_tokenizer):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from pipeline.convert.tokenizer import SPECIAL_TOKENS

    to_unicode = bytes_to_unicode()
    vocab = fast_tokenizer.get_vocab()
    lines = QWEN_TIKTOKEN.read_bytes().splitlines()
    assert len(lines) == 151643
    for line in lines:
        token, rank = line.split()
        text = "".join(to_unicode[b] for b in base64.b64decode(token))
        assert vocab[text] == int(rank), text
    for i, special in enumerate(SPECIAL_TOKENS):
        assert vocab[special] == 151643 + i
    assert fast_tokenizer.eos_token_id == 151643 and fast_tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645


def test_server_refuses_an_unconverted_qwen1_model_and_too_long_a_context(qwen1_dir, converted):
    from conftest import make_config
    from helm_server.hf_engine import ModelLoadError, load_model

    src, _, _ = qwen1_dir
    with pytest.raises(ModelLoadError, match="Qwen \\(v1\\) checkpoint.*make convert"):
        load_model(make_config(src), torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="context_length 4096 exceeds the model's max_position_embeddings 2048"):
        load_model(make_config(converted, context_length=4096), torch.device("cpu"))


def test_in_place_conversion_as_the_image_build_runs_it(qwen1_dir, tmp_path):
    """`python -m pipeline.convert --in-place` (the Dockerfile's step): converts Qwen v1, leaves Qwen2 alone."""
    import shutil

    src, config, _ = qwen1_dir
    model = tmp_path / "models" / "artifact"
    shutil.copytree(src, model)
    save_qwen1_lora(tmp_path / "models" / "adapter", config)
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipeline.convert", "--in-place", *a], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    assert run(str(model)).returncode == 0 and not is_qwen1(model)
    assert run("--adapter", str(tmp_path / "models" / "adapter")).returncode == 0
    adapter_config = json.loads((tmp_path / "models" / "adapter" / "adapter_config.json").read_text())
    assert "q_proj" in adapter_config["target_modules"]
    again = run(str(model))
    assert again.returncode == 0 and "nothing to convert" in again.stderr


def test_cli_detects_an_adapter_folder(qwen1_dir, tmp_path):
    _, config, _ = qwen1_dir
    save_qwen1_lora(tmp_path / "lora", config)
    done = subprocess.run([sys.executable, "-m", "pipeline.convert", str(tmp_path / "lora"), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_every_zip_ships_the_converter_and_converts_at_build_time(tmp_path):
    from packager.build import build

    built = build(REPO / "submissions" / "submission-2" / "spec.toml", tmp_path / "dist")
    shipped = {p.relative_to(built.context_dir).as_posix() for p in built.context_dir.rglob("*.py")}
    assert {"pipeline/__init__.py", "pipeline/convert/__main__.py", "pipeline/convert/tensors.py"} <= shipped
    # every first-party module the shipped converter imports is shipped too
    for path in sorted(built.context_dir.glob("pipeline/convert/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in ("packager", "pipeline"):
                assert node.module.replace(".", "/") + ".py" in shipped, (path.name, node.module)
    dockerfile = (built.context_dir / "Dockerfile").read_text()
    assert "python -m pipeline.convert --in-place /models/artifact" in dockerfile
    assert "python -m pipeline.convert --in-place --adapter /models/adapter" in dockerfile


def test_an_adapter_saved_as_bin_converts_too(qwen1_dir, tmp_path):
    """Older peft saved adapter_model.bin (as the reference's adapters may be)."""
    from safetensors.torch import load_file

    from pipeline.convert.lora import is_qwen1_adapter

    _, config, _ = qwen1_dir
    lora = tmp_path / "lora"
    save_qwen1_lora(lora, config)
    torch.save(load_file(lora / "adapter_model.safetensors"), lora / "adapter_model.bin")
    (lora / "adapter_model.safetensors").unlink()
    assert is_qwen1_adapter(lora)
    out = convert_adapter(lora, tmp_path / "out", log=lambda m: None)
    assert not is_qwen1_adapter(out) and (out / "adapter_model.safetensors").is_file()
