"""The fast training path (pipeline/train/fast.py) against the reference path, on a CPU.

Its parts against the plain computation (packing, the loss weights, the chunked
linear + cross-entropy), then `make train-N`'s own runs on the tiny world with
`[training] path = "fast"` or `"reference"`: the first 20 optimizer steps' losses
agree, a stopped and resumed fast run equals a straight one, and the fast path's
adapter loads in the server and changes its logprobs.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from pipeline.data import __main__ as data
from pipeline.quantize.tiny import save_tiny_gptq
from pipeline.train import __main__ as train
from pipeline.train import fast
from pipeline.train import kernels
from pipeline.train import packing
from conftest import TEST_DEVICE
from tiny_world import write_world

STEPS = 20    # optimizer steps compared between the paths
RESUMED = 6   # steps of the stopped-and-resumed fast run (with dropout: its RNG must resume too)


# --- the parts ----------------------------------------------------------------------


def _rows(n: int, seed: int = 0, longest: int = 40) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(3, longest)
        ids = [rng.randrange(5, 50) for _ in range(k)]
        cut = rng.randint(1, k - 2)
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


@pytest.mark.parametrize("packed", [True, False])
def test_packing_keeps_every_row_once_under_the_budget(packed):
    lengths = [len(r["input_ids"]) for r in _rows(50)]
    for budget in (1, 40, 100, 10_000):
        micros = fast.pack(lengths, budget, packed)
        assert sorted(i for m in micros for i in m) == list(range(50))
        for m in micros:
            widths = [lengths[i] for i in m]
            assert widths == sorted(widths, reverse=True)  # longest first (padded: its row sets the width)
            assert len(m) == 1 or (sum(widths) if packed else len(m) * widths[0]) <= budget
    if packed:  # end to end, no padding: fewer micro-batches than padded at the same budget
        assert len(fast.pack(lengths, 100, True)) < len(fast.pack(lengths, 100, False))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_token_weights_give_the_mean_of_the_reference_micro_batches_means(batch_size):
    rows = _rows(12, seed=batch_size)
    group = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    per_token = [torch.rand(fast.answer_tokens(r), dtype=torch.float64) for r in rows]  # any per-token losses
    # the reference: each micro-batch's mean over its answer tokens, then the mean over micro-batches
    want, k = 0.0, 0
    for micro in group:
        losses = torch.cat(per_token[k : k + len(micro)])
        want += float(losses.mean()) / len(group)
        k += len(micro)
    got = sum(float(w * t.sum()) for w, t in zip(fast.token_weights(group), per_token))
    assert got == pytest.approx(want, rel=1e-12)


def test_collate_marks_exactly_the_reference_loss_positions():
    rows = _rows(5)
    batch = fast.collate(rows, [1.0] * 5, pad_id=0, device=torch.device("cpu"))
    width = batch["inputs"]["input_ids"].shape[1]
    want = []
    for b, r in enumerate(rows):
        want += [(b * width + t, r["labels"][t + 1]) for t in range(len(r["labels"]) - 1) if r["labels"][t + 1] != -100]
    assert list(zip(batch["where"].tolist(), batch["targets"].tolist())) == want
    assert batch["tokens"] == sum(len(r["input_ids"]) for r in rows)
    same = fast.collate([rows[0], rows[0]], [1.0, 1.0], pad_id=0, device=torch.device("cpu"))
    assert same["inputs"]["attention_mask"] is None  # no padding: no mask, the causal kernels' fast case


def test_packed_collate_lays_rows_end_to_end_with_their_own_positions():
    rows = _rows(5)
    batch = fast.collate_packed(rows, [1.0] * 5, device=torch.device("cpu"))
    inputs = batch["inputs"]
    lengths = [len(r["input_ids"]) for r in rows]
    assert inputs["input_ids"].tolist() == [[t for r in rows for t in r["input_ids"]]]
    assert inputs["position_ids"].tolist() == [[p for n in lengths for p in range(n)]]
    assert inputs["cu_seq_lens_q"].tolist() == [sum(lengths[:i]) for i in range(6)]
    assert inputs["max_length_q"] == max(lengths) and batch["tokens"] == sum(lengths)
    want, start = [], 0
    for r in rows:
        want += [(start + t, r["labels"][t + 1]) for t in range(len(r["labels"]) - 1) if r["labels"][t + 1] != -100]
        start += len(r["input_ids"])
    assert list(zip(batch["where"].tolist(), batch["targets"].tolist())) == want


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_packed_micro_batch_computes_what_the_padded_one_does(arch):
    """Sequences end to end, attention within each (GQA heads, gradient checkpointing): the weighted loss and
    every LoRA gradient as with padding and a mask; the model's own attention comes back after."""
    model = _lora_model(arch, dropout=0.0)
    rows = _rows(6, seed=3)
    for r in rows:
        r["input_ids"] = [t + 40 for t in r["input_ids"]]  # inside the 97-word vocabulary, away from the pad id
        r["labels"] = [t if t == -100 else t + 40 for t in r["labels"]]
    weights = [1.0 / (i + 2) for i in range(6)]
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        batch = (fast.collate_packed(rows, weights, torch.device("cpu")) if packed
                 else fast.collate(rows, weights, pad_id=0, device=torch.device("cpu")))
        with fast.computing(model, torch.device("cpu"), kernels=kernels.plain(), packed=packed):
            loss = fast.forward_backward(model, batch)
        results.append((float(loss), {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}))
    (want_loss, want), (got_loss, got) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model.config._attn_implementation != packing.NAME


def test_packed_attention_refuses_what_it_cannot_compute():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packing.attention(None, q, q, q, None)
    with pytest.raises(ValueError, match="reference"):
        packing.attention(None, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 5]), max_length_q=5, sliding_window=4)


def test_varlen_attention_is_asked_as_each_torch_names_its_arguments():
    assert packing.varlen_arguments({"window_size": 0, "scale": 0, "enable_gqa": 0}) == {
        "causal": {"window_size": (-1, 0)}, "scale": True, "gqa": True}
    assert packing.varlen_arguments({"is_causal": 0, "return_aux": 0}) == {  # torch 2.10
        "causal": {"is_causal": True}, "scale": False, "gqa": False}
    assert packing.varlen_arguments({"return_aux": 0}) is None  # unknown: attention per sequence instead


@pytest.mark.skipif(TEST_DEVICE != "cuda" or not packing.flash_available(torch.device("cuda")),
                    reason="torch's varlen flash attention runs on a GPU: TEST_DEVICE=cuda")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_flash_attention_computes_what_per_sequence_attention_does_on_cuda(kv_heads):
    lengths = [7, 130, 1, 64]
    _, offsets, longest = packing.layout(lengths)
    offsets = offsets.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.float16, generator=g).requires_grad_()
    k, v = (torch.randn(sum(lengths), kv_heads, 64, device="cuda", dtype=torch.float16, generator=g).requires_grad_()
            for _ in range(2))
    want = packing.attend_plain(q.float(), k.float(), v.float(), offsets, 0.125)
    want.sum().backward()
    want_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    got = packing.attend_flash(q, k, v, offsets, longest, 0.125)
    got.float().sum().backward()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-3)
    for a, b in zip((q.grad, k.grad, v.grad), want_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-4, 1e-5), (torch.float16, 2e-2, 1e-3)])
def test_chunked_linear_cross_entropy_equals_the_plain_computation(dtype, rtol, atol):
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 101
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    loss = fast.linear_cross_entropy(hidden, weight, targets, weights, rows=8)
    (loss * 3).backward()
    plain_h = hidden.detach().clone().requires_grad_()
    logits = (plain_h @ weight.t()).float()  # as HF's causal-LM loss: the product in the model's dtype, fp32 loss
    plain = (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * weights).sum()
    (plain * 3).backward()
    assert float(loss) == pytest.approx(float(plain), rel=1e-5)
    torch.testing.assert_close(hidden.grad.float(), plain_h.grad.float(), rtol=rtol, atol=atol)
    with pytest.raises(ValueError, match="frozen"):
        fast.linear_cross_entropy(hidden, weight.clone().requires_grad_(), targets, weights)


def _lora_model(arch: str, dropout: float, checkpointing: bool = True):
    """A 2-layer random model with LoRA on every linear, as `add_lora` wraps it (gradient checkpointing on)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    model = (Qwen2ForCausalLM(Qwen2Config(**shape)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**shape)))
    for q in model.parameters():
        q.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    for name, q in model.named_parameters():
        if "lora_B" in name:  # B starts at zero in peft: give the branch something to change
            torch.nn.init.normal_(q, std=0.1)
    return model


def _loss_and_grads(model, ids, seed: int = 1):
    torch.manual_seed(seed)  # the same dropout masks on both sides
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}


def _counting(base: kernels.Kernels) -> tuple[kernels.Kernels, dict]:
    calls = {"rms_norm": 0, "swiglu": 0, "rope": 0}

    def counted(name, fn):
        def call(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return call

    return kernels.Kernels("counted", *(counted(n, getattr(base, n)) for n in calls)), calls


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fused_kernels_and_the_one_add_lora_branch_compute_what_transformers_and_peft_do(arch):
    """The wiring of `kernels.fused` (liger's kernels stand in as the plain computation on a CPU): every norm,
    MLP and rotary call goes through the table, in the forward and the checkpointed recomputation, with peft's
    dropout masks unchanged (dropout on); the loss and every LoRA gradient agree, and the modules come back."""
    model = _lora_model(arch, dropout=0.3)
    ids = torch.randint(0, 97, (2, 12))
    want_loss, want = _loss_and_grads(model, ids)
    table, calls = _counting(kernels.plain())
    with kernels.fused(model, table):
        got_loss, got = _loss_and_grads(model, ids)
    assert got_loss == pytest.approx(float(want_loss), rel=1e-5)
    assert want.keys() == got.keys() and len(got) == 2 * 7 * 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    # 2 layers: forward + recomputation in backward; norms: 2 per layer + the final one (not recomputed)
    assert calls == {"rms_norm": 2 * 2 * 2 + 1, "swiglu": 2 * 2, "rope": 2 * 2}
    assert not any("forward" in vars(m) for m in model.modules())
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.qwen2.modeling_qwen2 as qwen2
    assert qwen2.apply_rotary_pos_emb.__module__ == qwen2.__name__
    assert llama.apply_rotary_pos_emb.__module__ == llama.__name__
    with kernels.fused(model, None):  # the LoRA branch alone: no table, transformers' own norm and MLP
        alone_loss, _ = _loss_and_grads(model, ids)
    assert alone_loss == pytest.approx(float(want_loss), rel=1e-5)


def test_the_one_add_lora_branch_rounds_less_in_half_precision():
    """peft rounds B(A x), its scaled copy and the sum to fp16; the branch rounds once (addmm accumulates in
    fp32): against an fp32 computation it is at least as close, dropout masks unchanged."""
    model = _lora_model("qwen2", dropout=0.0, checkpointing=False)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(64, 32)
    with torch.no_grad():
        exact = layer(x)
        layer.half()
        peft_half = layer(x.half()).float()
        with kernels.fused(model, None):
            ours = layer(x.half()).float()
    assert (ours - exact).abs().max() <= (peft_half - exact).abs().max() + 1e-3


def test_the_lora_branchs_small_gradients_survive_half_precision():
    """Under autocast to fp16 (fp32 adapter weights, as the fast path runs), an upstream gradient around 1e-6 (a
    token's share of a 32-sequence step) gives the adapter's gradients of the fp32 computation (peft's, the
    reference path's) to 2e-3, where fp16 autograd writes them subnormal or zero."""
    model = _lora_model("qwen2", dropout=0.0, checkpointing=False)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(64, 32)
    upstream = (torch.randn(64, layer.out_features) * 1e-6).half().float()  # as an fp16 layer output receives it

    def grads(run):
        a.grad = b.grad = None
        (run() * upstream).sum().backward()
        return torch.cat([a.grad.flatten(), b.grad.flatten()])

    exact = grads(lambda: layer(x))
    layer.base_layer.half()
    with kernels.fused(model, None), torch.autocast("cpu", dtype=torch.float16):
        ours = grads(lambda: layer(x.half()).float())
    with torch.autocast("cpu", dtype=torch.float16):  # the branch as autograd computes it in fp16
        mid = (x.half() @ a.t()) * layer.scaling["default"]
        naive = grads(lambda: (layer.base_layer(x.half()) + mid @ b.t()).float())
    error = lambda g: float((g - exact).norm() / exact.norm())  # noqa: E731
    assert error(ours) < 2e-3 < error(naive)  # seen: 3.6e-4 against 1.7e-2


@pytest.mark.skipif(TEST_DEVICE != "cuda" or kernels.liger() is None,
                    reason="liger's Triton kernels run on a GPU: TEST_DEVICE=cuda with liger-kernel installed")
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_liger_kernels_compute_what_the_plain_code_does_on_cuda(arch):
    model = _lora_model(arch, dropout=0.0).to("cuda", torch.float16)
    ids = torch.randint(0, 97, (3, 40), device="cuda")
    with kernels.fused(model, kernels.plain()):
        want_loss, want = _loss_and_grads(model, ids)
    with kernels.fused(model, kernels.liger()):
        got_loss, got = _loss_and_grads(model, ids)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=2e-3)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=5e-2, atol=2e-3, msg=name)


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="torch.mm's out_dtype: TEST_DEVICE=cuda")
def test_adapter_gradient_products_run_half_inputs_to_fp32_results_on_cuda():
    a, b = (torch.randn(64, 64, device="cuda") * 1e-4 for _ in range(2))
    got = kernels._mm32(a.half(), b.half())
    assert got.dtype == torch.float32 and kernels._OUT_DTYPE_MM.get("cuda", True)
    torch.testing.assert_close(got, a.half().float() @ b.half().float(), rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_layer_inputs_kept_on_the_host_give_the_checkpointed_step_exactly(arch):
    """Offloaded checkpointing replays each layer as torch's checkpoint does: with dropout on, the same loss and
    every LoRA gradient (the first layer's too), on the test device (on CUDA the
    inputs go to pinned memory and back on a side stream); the model's own checkpointing comes back after."""
    device = torch.device(TEST_DEVICE)
    model = _lora_model(arch, dropout=0.3).to(device)
    rows = _rows(6, seed=5)
    weights = [1.0 / (i + 2) for i in range(6)]
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    own = [m._gradient_checkpointing_func for m in layers]
    results = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        batch = fast.collate(rows, weights, pad_id=0, device=device)
        with fast.computing(model, device, kernels=kernels.plain(), packed=False, offload=offload):
            loss = fast.forward_backward(model, batch)
        results.append((float(loss), {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}))
    (want_loss, want), (got_loss, got) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert want.keys() == got.keys() and len(got) == 2 * 7 * 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    first = [g for n, g in got.items() if ".layers.0." in n]
    assert first and all(g.abs().max() > 0 for g in first)
    assert [m._gradient_checkpointing_func for m in layers] == own


def test_offloading_refuses_a_model_without_checkpointing():
    model = _lora_model("qwen2", dropout=0.0, checkpointing=False)
    with pytest.raises(ValueError, match="gradient_checkpointing = true"):
        with fast.computing(model, torch.device("cpu"), kernels=None, packed=False, offload=True):
            pass


def test_liger_is_taken_on_cuda_only_and_when_installed():
    assert kernels.for_device(torch.device("cpu")) is None
    assert fast.kernels_used(torch.device("cpu")) == ("packed sequences, attention per sequence, "
                                                      "transformers' own norm, rotary and SwiGLU (a CPU)")
    table = kernels.liger()
    assert table is None or table.name == "liger"


def test_auto_is_fast_on_cuda_and_the_reference_elsewhere():
    assert fast.resolve_path("auto", torch.device("cuda")) == "fast"
    assert fast.resolve_path("auto", torch.device("cpu")) == "reference"
    assert fast.resolve_path("fast", torch.device("cpu")) == "fast"
    with pytest.raises(ValueError):
        fast.resolve_path("quick", torch.device("cpu"))


# --- make train-N, both paths --------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world's submission 2 with 4 sequences per optimizer step (so the fast path packs several) and
    10 epochs (20 steps over its few examples), each training path as its own spec."""
    root = write_world(tmp_path_factory.mktemp("train-fast"))
    save_tiny_gptq(root / "artifact")
    spec = root / "submissions" / "submission-2" / "spec.toml"
    text, n = re.subn(r"(?m)^gradient_accumulation = \d+", "gradient_accumulation = 4", spec.read_text())
    text, m = re.subn(r"(?m)^epochs = \d+", "epochs = 10", text)
    assert n == m == 1
    spec.write_text(text)
    assert data.main(["submission-2", "--submissions", str(root / "submissions"), "--model", str(root / "artifact"),
                      "--data-dir", str(root / "hub"), "--out", str(root / "data-2")]) == 0
    for name, extra in (("fast", 'path = "fast"'), ("fast-nodrop", 'path = "fast"'),
                        ("reference-nodrop", 'path = "reference"')):
        folder = root / name / "submission-2"
        folder.mkdir(parents=True)
        body, n = re.subn(r"(?m)^(\[training\][^\n]*\n)", lambda m: f"{m.group(1)}{extra}\n", text)
        assert n == 1
        if name.endswith("nodrop"):
            body = body.replace("dropout = 0.05", "dropout = 0.0")
            assert "dropout = 0.0" in body
        folder.joinpath("spec.toml").write_text(body)
    return root


def _train(world: Path, specs: str, out: Path, *extra: str) -> list[dict]:
    assert train.main(["submission-2", "--submissions", str(world / specs), "--model", str(world / "artifact"),
                       "--data", str(world / "data-2"), "--out", str(out), "--device", "cpu", *extra]) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(world):
    """20 steps of each path without dropout (their equivalence), 6 of the fast path with the spec's dropout."""
    return {name: _train(world, name, world / f"run-{name}", "--steps", str(steps))
            for name, steps in (("fast-nodrop", STEPS), ("reference-nodrop", STEPS), ("fast", RESUMED))}


def test_the_fast_path_takes_the_reference_paths_steps(runs):
    got, want = runs["fast-nodrop"], runs["reference-nodrop"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]  # the same sequences in each step
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    # no dropout: only rounding differs (LoRA products in the base's fp16, another summation order)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-3)  # seen: 1.3e-4
    # the spec's dropout draws other masks (other shapes), but LoRA B starts at zero: the first step is the base's
    assert runs["fast"][0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-4)
    assert [r["tokens"] for r in runs["fast"]] == [r["tokens"] for r in want[:RESUMED]]


def test_a_stopped_fast_run_resumes_to_the_straight_runs_losses(world, runs):
    out = world / "run-fast-resumed"
    _train(world, "fast", out, "--steps", "2")
    got = _train(world, "fast", out, "--steps", str(RESUMED))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in runs["fast"]], rel=1e-5)


def test_the_fast_paths_adapter_loads_in_the_server_and_changes_its_logprobs(world, runs):
    from conftest import make_config
    from helm_server.hf_engine import load_model
    from helm_server.settings import apply_environment

    adapter = world / "run-fast" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == "ycchen/yc-test1"
    ids = torch.tensor([[151643, 40, 41, 42, 43, 44]])
    served = make_config(world / "artifact")
    bare = load_model(served, torch.device("cpu"))
    with_adapter = load_model(apply_environment(served, {"ADAPTER_PATH": str(adapter)}), torch.device("cpu"))
    with torch.no_grad():
        a, b = bare(ids).logits.float(), with_adapter(ids).logits.float()
    assert (a - b).abs().max() > 1e-3
