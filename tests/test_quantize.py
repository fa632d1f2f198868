"""`make quantize-N`: calibration drawn as the reference drew it, the plan, a real GPTQ run on CPU.

The base model is a tiny Qwen (v1) checkpoint, so the run converts it first;
WikiText comes from a local copy in the Hub layout (DATA_DIR).
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from conftest import REPO
from hub_fixtures import WIKITEXT, WIKITEXT_CONFIG, save_wikitext
from pipeline.quantize import __main__ as quantize
from pipeline.quantize.calibration import EMPTY_LINE, calibration_windows, split_text
from qwen1 import save_qwen1_checkpoint

TINY_SPEC = """\
name = "tiny-gptq"

[base_model]
repo_id = "Qwen/Qwen-tiny"

[artifact]
repo_id = "example/tiny-gptq"

[quantization]
bits = 8
group_size = 32
desc_act = false
sym = true
damp_percent = 0.01

[quantization.calibration]
split = "test"
num_samples = 4
seq_len = 64
seed = 0

[quantization.perplexity]
split = "validation"
windows = 2
seq_len = 32

[generation]
eos_token_ids = [151643]
context_length = 512
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    (root / "submissions" / "tiny-gptq").mkdir(parents=True)
    (root / "submissions" / "tiny-gptq" / "spec.toml").write_text(TINY_SPEC)
    save_qwen1_checkpoint(root / "Qwen-tiny")
    save_wikitext(root / "data")
    return root


def _args(root, *extra):
    return ["tiny-gptq", "--submissions", str(root / "submissions"), "--model", str(root / "Qwen-tiny"),
            "--data-dir", str(root / "data"), "--out", str(root / "artifact"), "--work", str(root / "work"),
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def artifact(inputs):
    assert quantize.main(_args(inputs)) == 0
    return inputs / "artifact"


def test_windows_are_the_reference_draw():
    ids = list(range(10_000))
    offsets, windows = calibration_windows(ids, 120, 4096, seed=0)
    random.seed(0)  # the reference: random.seed(0), then random.randint(0, n - seqlen - 1) per window
    assert offsets == [random.randint(0, len(ids) - 4096 - 1) for _ in range(120)]
    assert all(w == ids[o : o + 4096] for o, w in zip(offsets, windows))


def test_empty_lines_become_space_newline(inputs):
    files = sorted((inputs / "data" / WIKITEXT / WIKITEXT_CONFIG).glob("test-*.parquet"))
    text = split_text(files, "text")
    assert text.startswith(EMPTY_LINE + " = Article 0 = \n" + EMPTY_LINE)


def test_dry_run_writes_windows_and_plan_only(inputs, capsys):
    work = inputs / "dry-work"
    assert quantize.main(_args(inputs, "--dry-run", "--work", str(work), "--out", str(inputs / "dry-out"))) == 0
    calibration = json.loads((work / "calibration.json").read_text())
    assert len(calibration["windows"]) == 4 and all(len(w) == 64 for w in calibration["windows"])
    assert calibration["split"] == "test" and len(calibration["offsets"]) == 4
    plan = json.loads((work / "plan.json").read_text())
    assert plan["fits"] and plan["gpu"] == "RTX 4090"
    assert not (inputs / "dry-out").exists()
    assert "nothing quantized" in capsys.readouterr().out
    assert (work / "base-qwen2" / "conversion.json").is_file()  # Qwen v1 was converted first


def test_quantizes_to_a_gptq_artifact_with_a_report(inputs, artifact):
    config = json.loads((artifact / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    q = config["quantization_config"]
    assert (q["bits"], q["group_size"], q["desc_act"], q["sym"]) == (8, 32, False, True)
    report = json.loads((artifact / "report.json").read_text())
    assert report["calibration"]["split"] == "test" and len(report["calibration"]["offsets"]) == 4
    ppl = report["perplexity"]
    assert ppl["windows"] == 2 and ppl["base"] > 1 and ppl["quantized"] > 1
    assert abs(ppl["quantized"] / ppl["base"] - 1) < 0.05  # 8-bit barely moves it
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    assert set(report["layers"][0]["losses"]) >= {"self_attn.q_proj", "mlp.down_proj"}
    assert (artifact / "tokenizer.json").is_file() and not list(artifact.parent.glob(".artifact.partial*"))
    assert list((inputs / "work" / "logs").glob("gptq_log_*")) and not (REPO / "logs").exists()  # GPTQModel's logs


def test_rerun_with_same_inputs_is_skipped(inputs, artifact, capsys):
    before = (artifact / "report.json").stat().st_mtime_ns
    assert quantize.main(_args(inputs)) == 0
    assert "up to date" in capsys.readouterr().out
    assert (artifact / "report.json").stat().st_mtime_ns == before


def test_over_budget_is_refused(inputs, monkeypatch, capsys):
    tiny_gpu = {**quantize.models_table()["gpu"], "memory_gib": 1e-6}
    monkeypatch.setattr(quantize, "models_table", lambda: {"gpu": tiny_gpu})
    assert quantize.main(_args(inputs, "--out", str(inputs / "never"))) == 2
    assert "does NOT fit" in capsys.readouterr().err and not (inputs / "never").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stopped_run_leaves_no_artifact_and_says_what_it_keeps(inputs, tmp_path, monkeypatch, capsys, signum):
    from pipeline.quantize import gptq

    def stopped_mid_gptq(*a, **k):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal should have stopped the run")

    monkeypatch.setattr(gptq, "run_gptq", stopped_mid_gptq)
    out, work = tmp_path / "artifact", tmp_path / "work"
    args = _args(inputs, "--out", str(out), "--work", str(work))
    assert quantize.main(args) == 128 + signum
    err = capsys.readouterr().err
    assert f"interrupted ({signal.Signals(signum).name})" in err and "from the first layer" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [work]  # no artifact, no staging folder beside it
    assert (work / "calibration.json").is_file()


def test_input_errors_name_the_fix(inputs, tmp_path, capsys):
    assert quantize.main(_args(inputs, "--model", str(tmp_path / "missing"))) == 2
    assert "MODEL=" in capsys.readouterr().err
    empty = tmp_path / "data"
    empty.mkdir()
    assert quantize.main(_args(inputs, "--data-dir", str(empty), "--dry-run")) == 2
    assert f"no {WIKITEXT_CONFIG}/test-*.parquet" in capsys.readouterr().err
    assert quantize.main(["submission-1", "--dry-run", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_served_gptq_artifact_answers_helm(artifact):
    """The server loads the GPTQ artifact (CPU: GPTQModel's exact torch kernel) and HELM's client reads it."""
    from helm.clients.http_model_client import HTTPModelClient
    from helm.common.cache import BlackHoleCacheConfig
    from helm.common.request import Request

    from conftest import make_config, serving
    from helm_server.app import create_app

    with serving(create_app(make_config(artifact))) as url:
        client = HTTPModelClient(cache_config=BlackHoleCacheConfig(), base_url=url)
        result = client.make_request(Request(model="neurips/local", model_deployment="neurips/local",
                                             prompt="The capital of France is", temperature=1e-7, max_tokens=5))
    assert result.success, result.error
    tokens = result.completions[0].tokens
    assert len(tokens) >= 1 and all(t.logprob <= 0 for t in tokens)


def test_a_gptq_kernel_that_fails_falls_back_to_the_next(artifact, monkeypatch, caplog):
    """Marlin cannot build on a CPU: the chain goes on to the exact torch kernel and says so."""
    import torch

    from conftest import make_config
    from helm_server import hf_engine

    monkeypatch.setitem(hf_engine.GPTQ_KERNELS, "cpu", ["marlin", "torch"])
    with caplog.at_level("INFO", logger="helm_server.engine"):
        model = hf_engine.load_model(make_config(artifact), torch.device("cpu"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "TorchLinear"
    assert "the marlin kernel failed to load" in caplog.text and "loaded with the torch kernel" in caplog.text

    only_marlin = make_config(artifact).model_copy(deep=True)
    only_marlin = only_marlin.model_copy(update={"model": only_marlin.model.model_copy(update={"gptq_kernel": "marlin"})})
    with pytest.raises(hf_engine.ModelLoadError, match="no GPTQ kernel could load the model: marlin"):
        hf_engine.load_model(only_marlin, torch.device("cpu"))


def test_publish_refuses_unfinished_artifacts_and_missing_tokens(inputs, artifact, tmp_path, monkeypatch, capsys):
    from pipeline import publish

    monkeypatch.delenv("HF_TOKEN", raising=False)
    subs = ["--submissions", str(inputs / "submissions")]
    assert publish.main(["tiny-gptq", *subs, "--artifact", str(tmp_path / "none")]) == 2
    assert "run `make quantize-N` first" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert publish.main(["tiny-gptq", *subs, "--artifact", str(partial)]) == 2
    assert "lacks report.json, quantize.json" in capsys.readouterr().err
    assert publish.main(["tiny-gptq", *subs, "--artifact", str(artifact)]) == 2
    assert "HF_TOKEN is not set" in capsys.readouterr().err
