"""Marlin projections that read the same input, fused into one call (helm_server/marlin_fusion.py).

On the CPU: GPTQModel's MarlinLinear holding Marlin-layout tensors (the repack kernel transliterated, GPTQModel's
own scale and bias permutations), its forward swapped for the dense product of the same tensors, since Marlin's
op needs a GPU. The fused layer must be what GPTQModel makes of the concatenated weight; the engine must give
the unfused engine's tokens and free the parts. On a GPU (TEST_DEVICE=cuda): Marlin's own product, fused
against separate.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from conftest import TEST_DEVICE
from helm_server.dense_prefill import MarlinDense, marlin_dense, marlin_scale_order
from helm_server.engine import SamplingParams
from test_dense_prefill import repack_like_marlin

CPU = torch.device("cpu")


def quantized(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes [K, N] (bias 128) and scales [K / group, N] of a Linear weight [N, K]."""
    w = weight.detach().t().float()
    k, n = w.shape
    scales = (w.reshape(k // group, group, n).abs().amax(1) / 127).clamp_min(1e-6)
    codes = (torch.round(w / scales.repeat_interleave(group, 0)) + 128).clamp(0, 255).to(torch.uint8)
    return codes, scales


def marlin_layer(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype=torch.float32):
    """A MarlinLinear as GPTQModel's post_init leaves it, built on the CPU (its constructor wants CUDA)."""
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear
    from gptqmodel.utils.marlin import marlin_permute_bias, marlin_permute_scales

    k, n = codes.shape
    group = k // scales.shape[0]
    layer = MarlinLinear.__new__(MarlinLinear)
    torch.nn.Module.__init__(layer)
    layer.register_buffer("qweight", repack_like_marlin(codes))
    layer.register_buffer("scales", marlin_permute_scales(scales.to(dtype), k, n, -1 if group == k else group))
    layer.register_buffer("g_idx", torch.empty(0, dtype=torch.int32))
    layer.register_buffer("qzeros", torch.empty(0, dtype=torch.int32))
    layer.bias = None if bias is None else torch.nn.Parameter(marlin_permute_bias(bias.detach().to(dtype)),
                                                              requires_grad=False)
    layer.bits, layer.in_features, layer.out_features, layer.fp32, layer.adapter = 8, k, n, True, None
    layer._marlin_tile_padding = None
    return layer


def dense_forward(self, x):
    """MarlinLinear's product on the CPU: the dense weight of its own Marlin-layout tensors."""
    return MarlinDense(self, torch.empty(self.in_features * self.out_features, dtype=self.scales.dtype))(x)


@pytest.fixture
def cpu_marlin(monkeypatch):
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    monkeypatch.setattr(MarlinLinear, "forward", dense_forward)


def parts(widths=(192, 64, 128), k=256, group=128, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in widths:
        codes = torch.randint(0, 256, (k, n), generator=g, dtype=torch.uint8)
        scales = torch.rand(k // group, n, generator=g) / 100 + 1e-3
        out.append((codes, scales, torch.randn(n, generator=g) if bias else None))
    return out


@pytest.mark.parametrize("group", [128, 256])
def test_the_fused_layer_is_what_gptqmodel_makes_of_the_concatenated_weight(group):
    from gptqmodel.utils.marlin import marlin_permute_bias, marlin_permute_scales

    from helm_server.marlin_fusion import concatenated

    pieces = parts(group=group)
    layers = [marlin_layer(*p) for p in pieces]
    before = [layer.qweight.clone() for layer in layers]
    fused = concatenated(layers)
    codes = torch.cat([c for c, _, _ in pieces], dim=1)
    scales = torch.cat([s for _, s, _ in pieces], dim=1)
    k, n = codes.shape
    assert (fused.in_features, fused.out_features) == (k, n) == (256, 384)
    assert torch.equal(fused.qweight, repack_like_marlin(codes))
    assert torch.equal(fused.scales, marlin_permute_scales(scales, k, n, -1 if group == k else group))
    assert torch.equal(fused.bias, marlin_permute_bias(torch.cat([b for _, _, b in pieces])))
    assert all(torch.equal(layer.qweight, b) for layer, b in zip(layers, before))  # the parts are untouched
    assert fused.qweight is not layers[0].qweight and "qweight" in fused._buffers
    weight = marlin_dense(fused.qweight, fused.scales, k, n, torch.empty(k * n), marlin_scale_order(group == k))
    expected = ((codes.float() - 128) * scales.repeat_interleave(group, 0))
    torch.testing.assert_close(weight, expected)


def test_layers_that_cannot_be_one_call_say_why():
    from helm_server.marlin_fusion import why_not_fused

    ok = [marlin_layer(*p) for p in parts()]
    assert why_not_fused(ok) is None
    assert "not GPTQ" in why_not_fused([torch.nn.Linear(4, 4)] * 2)
    act_order = [marlin_layer(*p) for p in parts()]
    act_order[1].g_idx = torch.arange(256, dtype=torch.int32)
    assert "act-order" in why_not_fused(act_order)
    assert "some layers only" in why_not_fused([marlin_layer(*p) for p in parts(bias=True)[:1]] +
                                               [marlin_layer(*p) for p in parts(bias=False)[1:]])
    other_group = [marlin_layer(*p) for p in parts(group=128)[:1]] + [marlin_layer(*p) for p in parts(group=256)[1:]]
    assert "differ" in why_not_fused(other_group)
    ragged = [marlin_layer(*p) for p in parts()]
    ragged[0].out_features = 100
    assert "whole tiles" in why_not_fused(ragged)


def test_fusing_in_place_frees_the_parts_and_keeps_each_ones_output(cpu_marlin):
    from helm_server.marlin_fusion import FusedPart, fuse_in_place

    parent = torch.nn.Module()
    names = ("q_proj", "k_proj", "v_proj")
    for name, piece in zip(names, parts()):
        parent.add_module(name, marlin_layer(*piece))
    x = torch.randn(3, 256)
    expected = [getattr(parent, n)(x) for n in names]
    numel = sum(p.numel() for p in parent.buffers()) + sum(p.numel() for p in parent.parameters())
    gone = [weakref.ref(getattr(parent, n)) for n in names]
    fused = fuse_in_place(parent, names)
    gc.collect()
    assert all(r() is None for r in gone)  # no second copy of the weights
    assert all(isinstance(getattr(parent, n), FusedPart) for n in names)
    assert sum(p.numel() for p in parent.buffers()) + sum(p.numel() for p in parent.parameters()) == numel
    for name, e in zip(names, expected):
        torch.testing.assert_close(getattr(parent, name)(x), e)
    torch.testing.assert_close(fused(x), torch.cat(expected, dim=-1))
    assert fuse_in_place(parent, names) is fused  # a second engine over the same model
    assert fuse_in_place(parent, names[:2]) is None  # not the whole fused layer


@pytest.fixture
def marlin_model(cpu_marlin):
    """A tiny Qwen2 (GQA, q/k/v biases) whose seven projections per layer are MarlinLinear layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = Qwen2ForCausalLM(config).eval()
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                linear = getattr(parent, name)
                setattr(parent, name, marlin_layer(*quantized(linear.weight, 128), linear.bias))
    return model


def test_the_engine_fuses_marlin_projections_and_gives_the_unfused_tokens(marlin_model):
    """Unfused, fused, fused again (a second engine) and fused with dense prefill: the same greedy tokens and
    logprobs; the model's own forward is unchanged; the weights are held once."""
    from helm_server.marlin_fusion import FusedPart
    from helm_server.static_engine import StaticEngine

    model = marlin_model
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 8]])
    with torch.inference_mode():
        logits = model(ids).logits
    numel = sum(b.numel() for b in model.buffers()) + sum(p.numel() for p in model.parameters())
    params = SamplingParams(max_new_tokens=6, temperature=0.0, top_logprobs=2, echo_prompt=True)
    prompt = ids[0].tolist()
    runs = []
    for kwargs in ({"fuse": False}, {}, {}, {"dense": 4}):
        engine = StaticEngine(model, None, [0], CPU, 64, **kwargs)
        runs.append(engine.generate(prompt, params, lambda ids: False))
        if kwargs.get("dense"):
            assert engine.w.dense_layers is not None  # dense weights of the fused layers
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedPart) and isinstance(model.model.layers[1].mlp.up_proj, FusedPart)
    assert attn.q_proj.fused.out_features == 128 + 64 + 64
    assert sum(b.numel() for b in model.buffers()) + sum(p.numel() for p in model.parameters()) == numel
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    first = runs[0]
    for run in runs[1:]:
        assert [t.token_id for t in run.prompt + run.completion] == [t.token_id for t in first.prompt + first.completion]
        for x, y in zip(first.prompt + first.completion, run.prompt + run.completion):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="GPTQModel's Marlin ops run on a GPU (TEST_DEVICE=cuda)")
def test_marlins_fused_product_is_its_separate_products_side_by_side():
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    from helm_server.kernels import load
    from helm_server.marlin_fusion import concatenated

    cuda = torch.device("cuda")
    load(cuda)  # the image's prebuilt Marlin where HELM_SERVER_KERNELS names it
    k, group = 512, 128
    layers = []
    for codes, scales, bias in parts(widths=(512, 128, 128), k=k, group=group):
        n = codes.shape[1]
        layer = MarlinLinear(bits=8, group_size=group, desc_act=False, sym=True, in_features=k, out_features=n,
                             bias=True).to(cuda)
        packed = (codes.view(k // 4, 4, n).to(torch.int64) << (8 * torch.arange(4))[None, :, None]).sum(1)
        layer.qweight.data = torch.from_numpy(packed.numpy().astype(np.uint32).view(np.int32)).to(cuda)
        layer.scales.data = scales.half().to(cuda)
        layer.bias.data = bias.half().to(cuda)
        layer.post_init()
        layers.append(layer)
    fused = concatenated(layers)
    for rows in (1, 4, 64, 300):
        x = torch.randn(rows, k, device=cuda, dtype=torch.float16)
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
        torch.testing.assert_close(fused(x), expected, rtol=2e-3, atol=2e-3)


def test_a_fused_layer_off_its_parts_product_is_refused(cpu_marlin, monkeypatch, caplog):
    """The start-up check: were the concatenation wrong for some layout, the parts would stay, and the log says so."""
    from helm_server import marlin_fusion

    parent = torch.nn.Module()
    names = ("gate_proj", "up_proj")
    for name, piece in zip(names, parts(widths=(128, 128))):
        parent.add_module(name, marlin_layer(*piece))
    wrong = marlin_fusion.concatenated
    monkeypatch.setattr(marlin_fusion, "concatenated", lambda ms: wrong(list(reversed(ms))))
    with caplog.at_level("WARNING", logger="helm_server.engine"):
        assert marlin_fusion.fuse_in_place(parent, names) is None
    assert "gate_proj/up_proj fused differ" in caplog.text
    assert type(parent.gate_proj).__name__ == "MarlinLinear" and not hasattr(parent, "fused_gate_proj_up_proj")


def test_a_fused_layer_its_kernel_refuses_leaves_the_parts(cpu_marlin, monkeypatch, caplog):
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    from helm_server.marlin_fusion import fuse_in_place

    parent = torch.nn.Module()
    for name, piece in zip(("q_proj", "k_proj"), parts(widths=(64, 64))):
        parent.add_module(name, marlin_layer(*piece))

    def picky(self, x):
        if self.out_features > 64:
            raise RuntimeError("size_n not supported")
        return dense_forward(self, x)

    monkeypatch.setattr(MarlinLinear, "forward", picky)
    with caplog.at_level("WARNING", logger="helm_server.engine"):
        assert fuse_in_place(parent, ("q_proj", "k_proj")) is None
    assert "q_proj/k_proj fused failed to run (size_n not supported)" in caplog.text
    assert type(parent.q_proj) is MarlinLinear
