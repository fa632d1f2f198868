"""`make train-N`: QLoRA on a tiny 8-bit GPTQ artifact, on the CPU, from the specs' recipes.

The base is the tiny Qwen2 model quantized by GPTQModel (the quantize stage's
own run); the data is the data stage's output over the Hub-layout fixtures.
The specs are the real ones with a shorter schedule (fewer epochs, smaller
accumulation, shorter examples) and a larger learning rate (tests/tiny_world.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from pipeline.quantize.tiny import save_tiny_gptq
from pipeline.data import __main__ as data
from pipeline.train import __main__ as train
from packager import lora_targets as targets
from pipeline.train import plan
from tiny_world import write_world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = write_world(tmp_path_factory.mktemp("train"))
    save_tiny_gptq(root / "artifact")
    for n in (2, 3):
        assert data.main([f"submission-{n}", "--submissions", str(root / "submissions"), "--model", str(root / "artifact"),
                          "--data-dir", str(root / "hub"), "--out", str(root / f"data-{n}")]) == 0
    return root


def _args(world, n, out, *extra):
    return [f"submission-{n}", "--submissions", str(world / "submissions"), "--model", str(world / "artifact"),
            "--data", str(world / f"data-{n}"), "--out", str(out), "--device", "cpu", *extra]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def straight(world):
    """submission-2's recipe, trained start to finish in one run."""
    out = world / "train-2"
    before = _digest(world / "artifact")
    assert train.main(_args(world, 2, out)) == 0
    assert _digest(world / "artifact") == before  # the base is only read
    return out


def test_training_writes_a_servable_adapter_and_its_record(straight):
    from safetensors.torch import load_file

    adapter = straight / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 16 and config["base_model_name_or_path"] == "ycchen/yc-test1"
    assert sorted(config["target_modules"]) == sorted(targets.QWEN2_LINEAR)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)  # only LoRA weights leave the run
    run = json.loads((straight / "run.json").read_text())
    assert run["finished"] and run["steps"] == run["total_steps"] == len(_log(straight))
    assert run["data_manifest_sha256"] and run["spec_sha256"] and run["versions"]["peft"]
    assert (straight / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan_json = json.loads((straight / "plan.json").read_text())
    assert plan_json["hours_4090"] >= 0 and plan_json["peak_gib_4090"] > 0


def test_loss_goes_down(straight):
    losses = [r["loss"] for r in _log(straight)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_learning_rate_is_warmup_then_cosine_over_the_true_step_count(world, straight):
    rows = _log(straight)
    examples = json.loads((world / "data-2" / "manifest.json").read_text())["examples"]
    total = 3 * math.ceil(examples / 2)  # epochs x ceil(micro-batches / accumulation)
    assert len(rows) == total
    warmup = 0.06 * total
    for r in rows:
        k = r["step"] - 1
        factor = k / max(1, warmup) if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        assert r["lr"] == pytest.approx(2e-3 * factor, rel=1e-6, abs=1e-12)
    assert rows[0]["lr"] == 0.0 and rows[-1]["lr"] < 2e-3 * 0.05


def test_a_finished_run_is_up_to_date(world, straight, capsys):
    assert train.main(_args(world, 2, straight)) == 0
    assert "up to date" in capsys.readouterr().out


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _same_run(out: Path, straight: Path, first_run_log: str) -> None:
    """A stopped-and-resumed run equals the straight one: same steps and losses, same adapter, and the log the
    first run wrote is the start of the final log (continued, not rewritten)."""
    import torch

    got, want = _log(out), _log(straight)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-4)
    assert (out / "log.jsonl").read_text().startswith(first_run_log)
    a, b = _adapter(out), _adapter(straight)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
    assert json.loads((out / "run.json").read_text())["finished"]


def _steps_per_epoch(world) -> int:
    return math.ceil(json.loads((world / "data-2" / "manifest.json").read_text())["examples"] / 2)


def test_stopping_at_steps_saves_a_checkpoint_and_resumes_there(world, straight, capsys):
    out = world / "train-2-resumed"
    assert train.main(_args(world, 2, out, "--steps", "3")) == 0
    said = capsys.readouterr().out
    assert "stopped by STEPS at step 3 of" in said and "step-000003" in said
    assert "continue with: " in said and "--steps" not in said.split("continue with: ")[1]
    run = json.loads((out / "run.json").read_text())
    assert not run["finished"] and run["steps"] == 3 and run["stopped_by"] == "STEPS"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-000003" / "state.json").is_file()  # every = 4: this one is the stop's
    first = (out / "log.jsonl").read_text()
    assert train.main(_args(world, 2, out)) == 0
    assert "resuming from" in capsys.readouterr().out and "continues at step 4" not in first
    _same_run(out, straight, first)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(kept) == 3 and kept[-1] == f"step-{len(_log(straight)):06d}"  # keep = 3


def _inside_step(world, step: int) -> int:
    """How many micro-batches the loop has run once it is one micro-batch into optimizer step `step`
    (batch 1, accumulation 2: each epoch's last group is short when the examples are odd in number)."""
    examples = json.loads((world / "data-2" / "manifest.json").read_text())["examples"]
    groups = [min(2, examples - i) for i in range(0, examples, 2)] * 3
    assert groups[step - 1] == 2, "pick a step of two micro-batches"
    return sum(groups[: step - 1]) + 1


class _SignalAt:
    """forward_backward that sends `signum` to this process after its `at`-th call of the training loop
    (the plan's probe makes 4 calls first)."""

    PROBE_CALLS = 4

    def __init__(self, real, signum: int, at: int):
        self.real, self.signum, self.at, self.calls = real, signum, at + self.PROBE_CALLS, 0

    def __call__(self, *a, **k):
        loss = self.real(*a, **k)
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return loss


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_mid_step_saves_the_last_finished_step_and_resumes_exactly(world, straight, monkeypatch, capsys,
                                                                            signum, status):
    from pipeline.train import loop

    out = world / f"train-2-{signal.Signals(signum).name}"
    monkeypatch.setattr(loop, "forward_backward", _SignalAt(loop.forward_backward, signum, at=_inside_step(world, 6)))
    assert train.main(_args(world, 2, out)) == status
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step 5 of" in err and "continue with: " in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert len(_log(out)) == 5 and not json.loads((out / "run.json").read_text())["finished"]
    first = (out / "log.jsonl").read_text()
    monkeypatch.undo()
    assert train.main(_args(world, 2, out)) == 0
    _same_run(out, straight, first)


def test_a_second_interrupt_while_saving_keeps_the_previous_checkpoint(world, straight, monkeypatch, capsys):
    from pipeline.train import checkpoint, loop

    out = world / "train-2-twice"
    sender = _SignalAt(loop.forward_backward, signal.SIGINT, at=_inside_step(world, 7))
    monkeypatch.setattr(loop, "forward_backward", sender)
    real_rng = checkpoint.rng_state

    def second_interrupt_mid_save():
        if sender.calls >= sender.at:  # the stop's own save, after the first SIGINT
            os.kill(os.getpid(), signal.SIGINT)
        return real_rng()

    monkeypatch.setattr(checkpoint, "rng_state", second_interrupt_mid_save)
    assert train.main(_args(world, 2, out)) == 130
    assert "interrupted (SIGINT)" in capsys.readouterr().err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]  # no half-written step-000006
    monkeypatch.undo()
    assert train.main(_args(world, 2, out)) == 0
    assert [r["loss"] for r in _log(out)] == pytest.approx([r["loss"] for r in _log(straight)], rel=1e-4)


def test_the_deadline_stops_cleanly_and_the_run_resumes(world, straight, monkeypatch, capsys):
    from pipeline import stops
    from pipeline.train import loop

    out = world / "train-2-deadline"
    clock = {"now": 1_000_000.0}
    monkeypatch.setattr(stops, "now", lambda: clock["now"])
    real = loop.forward_backward

    def slow(*a, **k):
        clock["now"] += 60.0  # each micro-batch takes a minute on this clock
        return real(*a, **k)

    monkeypatch.setattr(loop, "forward_backward", slow)
    assert train.main(_args(world, 2, out, "--deadline", "15m")) == 0
    said = capsys.readouterr().out
    assert "stopped by the deadline (15m" in said and "continue with: " in said
    steps = len(_log(out))
    assert 0 < steps < _steps_per_epoch(world) * 3
    assert (out / "checkpoints" / f"step-{steps:06d}").is_dir()
    first = (out / "log.jsonl").read_text()
    monkeypatch.undo()
    assert train.main(_args(world, 2, out)) == 0
    _same_run(out, straight, first)


def test_checkpoints_every_few_minutes_whatever_the_step_count(world, monkeypatch, tmp_path):
    from pipeline import stops
    from pipeline.train import loop

    subs = tmp_path / "subs"
    (subs / "submission-2").mkdir(parents=True)
    text = (world / "submissions" / "submission-2" / "spec.toml").read_text()
    assert "every = 4" in text and "minutes = 30" in text
    (subs / "submission-2" / "spec.toml").write_text(text.replace("every = 4", "every = 1000")
                                                     .replace("minutes = 30", "minutes = 2.5"))
    clock = {"now": 0.0}
    monkeypatch.setattr(stops, "now", lambda: clock["now"])
    real = loop.forward_backward

    def slow(*a, **k):
        clock["now"] += 60.0
        return real(*a, **k)

    monkeypatch.setattr(loop, "forward_backward", slow)
    args = _args(world, 2, tmp_path / "run", "--steps", "7")
    args[args.index("--submissions") + 1] = str(subs)
    assert train.main(args) == 0
    # a minute a micro-batch, two a step: a checkpoint once 2.5 minutes passed (and the stop's at 7)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000004", "step-000006",
                                                                                  "step-000007"]


def test_a_killed_run_resumes_with_the_same_losses(world, straight):
    out = world / "train-2-killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "docker" / "inference")])}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *_args(world, 2, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(_log(out) if (out / "log.jsonl").is_file() else []) < 6:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "run.json").is_file()  # it never finished
    assert train.main(_args(world, 2, out)) == 0  # from step-000004: what the kill lost is trained again
    assert [r["loss"] for r in _log(out)] == pytest.approx([r["loss"] for r in _log(straight)], rel=1e-4)


def test_over_budget_is_refused_unless_ignored(world, monkeypatch, capsys):
    real = plan.cards()
    monkeypatch.setattr(plan, "cards", lambda: {**real, "target": {**real["target"], "hours": 1e-9}})
    out = world / "train-3-budget"
    assert train.main(_args(world, 3, out)) == 2
    err = capsys.readouterr().err
    assert "over the challenge's" in err and "BUDGET=ignore" in err
    assert not (out / "adapter").exists() and (out / "plan.json").is_file()
    assert train.main(_args(world, 3, out, "--budget", "ignore", "--steps", "1")) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_the_adapter_loads_in_the_server_and_changes_its_logprobs(world, straight):
    import torch
    from conftest import make_config
    from helm_server.hf_engine import load_model
    from helm_server.settings import apply_environment

    config = make_config(world / "artifact")
    ids = torch.tensor([[151643, 40, 41, 42, 43, 44]])
    bare = load_model(config, torch.device("cpu"))
    tuned = load_model(apply_environment(config, {"ADAPTER_PATH": str(straight / "adapter")}), torch.device("cpu"))
    with torch.no_grad():
        a, b = bare(ids).logits.float(), tuned(ids).logits.float()
    assert (a - b).abs().max() > 1e-3


def test_refusals_name_the_fix(world, tmp_path, capsys):
    # no data set
    assert train.main(["submission-2", "--submissions", str(world / "submissions"), "--model", str(world / "artifact"),
                       "--data", str(tmp_path), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 2
    assert "make data-N" in capsys.readouterr().err
    # checkpoints of another recipe in the run folder
    out = tmp_path / "other"
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "checkpoints" / "step-000001" / "state.json").write_text(json.dumps({"run_id": "f" * 64}))
    assert train.main(_args(world, 2, out)) == 2
    assert "another recipe" in capsys.readouterr().err
    # padding with end-of-text
    spec = world / "submissions" / "submission-2" / "spec.toml"
    text = spec.read_text()
    try:
        spec.write_text(text.replace('pad_token = "<|extra_21|>"', 'pad_token = "<|endoftext|>"'))
        assert train.main(_args(world, 2, tmp_path / "pad")) == 2
        assert "end-of-text" in capsys.readouterr().err
        spec.write_text(text.replace('name = "lion"', 'name = "paged_adamw_8bit"'))
        assert train.main(_args(world, 2, tmp_path / "paged")) == 2
        assert "CUDA" in capsys.readouterr().err
    finally:
        spec.write_text(text)


def test_lora_targets_resolve_from_qwen1_or_qwen2_names():
    assert targets.resolve(["attn.c_attn", "mlp.w2"]) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                        "mlp.gate_proj"]
    assert targets.resolve(["q_proj", "self_attn.o_proj"]) == ["self_attn.q_proj", "self_attn.o_proj"]
    assert targets.peft_targets(["mlp.w1"], [0, 2]) == r".*\.layers\.(0|2)\.(mlp\.up_proj)"
    with pytest.raises(ValueError, match="Qwen v1 names"):
        targets.resolve(["attn.qkv"])


def test_make_specs_prints_the_resolved_targets(capsys):
    from packager import cli

    assert cli.main(["check", "submission-3"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=32 alpha=16 on self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, " \
           "mlp.gate_proj, mlp.up_proj, mlp.down_proj of all layers" in out


def test_train_bundle_is_checked_reproducible_and_runnable(tmp_path, monkeypatch):
    from packager import train_bundle

    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    first = train_bundle.build(REPO / "submissions" / "submission-3" / "spec.toml", tmp_path / "a")
    again = train_bundle.build(REPO / "submissions" / "submission-3" / "spec.toml", tmp_path / "b")
    assert first.name == "submission-3-train.zip" and first.read_bytes() == again.read_bytes()
    with zipfile.ZipFile(first) as zf:
        names = zf.namelist()
        blob = b"".join(zf.read(n) for n in names)
        zf.extractall(tmp_path / "x")
    assert "submission-3-train/Dockerfile" in names and "submission-3-train/submissions/submission-3/spec.toml" in names
    assert not any(n.endswith((".safetensors", ".bin", ".pyc")) for n in names)
    assert b"hf_xxxx" not in blob
    root = tmp_path / "x" / "submission-3-train"
    assert "docker build -t submission-3-train ." in (root / "README.md").read_text()
    # the bundle's own code, alone on the path, reads its spec and starts the stages' command lines
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(root)}
    for stage in ("pipeline.data", "pipeline.train"):
        done = subprocess.run([sys.executable, "-m", stage, "--help"], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-c", "from packager.spec import load_spec; "
                           "print(load_spec('submissions/submission-3/spec.toml')[0].training.lora.r)"],
                          cwd=root, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "32", done.stderr


def test_train_bundle_breaking_a_rule_writes_nothing(tmp_path, monkeypatch):
    from packager import checks, train_bundle

    real = train_bundle.render
    monkeypatch.setattr(train_bundle, "render", lambda *a: {**real(*a), "weights.safetensors": b"0"})
    with pytest.raises(checks.PackagingError, match="training bundle"):
        train_bundle.build(REPO / "submissions" / "submission-2" / "spec.toml", tmp_path)
    assert not list(tmp_path.iterdir())


def test_publish_train_refuses_unfinished_runs_and_missing_tokens(world, straight, tmp_path, monkeypatch, capsys):
    from pipeline import publish

    subs = ["--submissions", str(world / "submissions")]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert publish.main(["submission-2", *subs, "--train", "--run", str(tmp_path)]) == 2
    assert "make train-N" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps({"finished": False, "steps": 1, "total_steps": 12}))
    assert publish.main(["submission-2", *subs, "--train", "--run", str(partial)]) == 2
    assert "stopped at step 1 of 12" in capsys.readouterr().err
    assert publish.main(["submission-2", *subs, "--train", "--run", str(straight)]) == 2
    assert "HF_TOKEN is not set" in capsys.readouterr().err
    uploaded = {}

    def fake_publish(repo_id, folder, token, message):
        uploaded.update(repo=repo_id, files=sorted(p.name for p in folder.iterdir()))
        return "c" * 40

    monkeypatch.setenv("HF_TOKEN", "hf_" + "y" * 34)
    monkeypatch.setattr(publish, "publish", fake_publish)
    assert publish.main(["submission-2", *subs, "--train", "--run", str(straight)]) == 0
    assert uploaded["repo"] == "ycchen/final-lora-r64-ep5"
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "curves.png", "run.json"]
    assert '[adapter] revision = "' + "c" * 40 in capsys.readouterr().out


def test_a_spec_with_an_unknown_lora_target_is_refused(tmp_path):
    from packager.spec import SpecError, load_spec

    text = (REPO / "submissions" / "submission-3" / "spec.toml").read_text()
    path = tmp_path / "submission-3" / "spec.toml"
    path.parent.mkdir()
    path.write_text(text.replace('"mlp.c_proj"]', '"mlp.fc"]'))
    with pytest.raises(SpecError, match=r"training\.lora.*'mlp\.fc' is not a linear module.*Qwen2 names"):
        load_spec(path)


def test_a_refused_run_leaves_no_run_folder(world, tmp_path):
    assert train.main(["submission-2", "--submissions", str(world / "submissions"), "--model", str(world / "artifact"),
                       "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert not (tmp_path / "run").exists()


def test_the_continue_command_is_the_users_own(monkeypatch):
    from pipeline.cli import command_again

    monkeypatch.delenv("MAKELEVEL", raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pipeline.train", "submission-2", "--steps", "3",
                                           "--out", "a b", "--deadline=6h"])
    assert command_again("train", "submission-2", {"STEPS": "--steps", "DEADLINE": "--deadline"}) == \
        "python -m pipeline.train submission-2 --out 'a b'"
    monkeypatch.setenv("MAKELEVEL", "1")
    monkeypatch.setenv("MAKEFLAGS", r"s -- STEPS=3 OUT=a\ b DEADLINE=6h")
    assert command_again("train", "submission-2", {"STEPS": "--steps", "DEADLINE": "--deadline"}) == "make train-2 'OUT=a b'"
    assert command_again("train", "mine") == "make train-mine STEPS=3 'OUT=a b' DEADLINE=6h"
