"""Unmerged LoRA adapters in two GEMMs per group of projections (helm_server/lora_products.py), on the CPU.

The static engine with them must give what peft's own forward gives (the engine with `fuse=False`): on the tiny
GPTQ model (GPTQModel's torch kernel) and on a tiny Qwen2 whose projections are MarlinLinear layers (their
forward swapped for the dense product, as in test_marlin_fusion.py), where the bases under the adapters are fused
too. Layers that are not vanilla LoRA keep peft's forward.
"""

from __future__ import annotations

import pytest
import torch

from helm_server.engine import SamplingParams
from helm_server.lora_products import LoraProducts, lora_products
from test_marlin_fusion import cpu_marlin, marlin_model  # noqa: F401 - fixtures

CPU = torch.device("cpu")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model, r: int = 8, seed: int = 0, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, **config)).eval()
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # peft starts B at zero: the adapter would add nothing
    return peft


def same_generation(a, b, tolerance=1e-4):
    assert [t.token_id for t in a.prompt + a.completion] == [t.token_id for t in b.prompt + b.completion]
    for x, y in zip(a.prompt + a.completion, b.prompt + b.completion):
        assert x.logprob == pytest.approx(y.logprob, abs=tolerance)


PARAMS = SamplingParams(max_new_tokens=6, temperature=0.0, top_logprobs=2, echo_prompt=True)
PROMPT = [5, 17, 42, 7, 99, 3, 250, 8]


def run_both(model, monkeypatch):
    """(peft's forward, the grouped products) through the static engine; and how often the products ran."""
    from helm_server.static_engine import StaticEngine

    calls = []
    add_to = LoraProducts.add_to
    monkeypatch.setattr(LoraProducts, "add_to", lambda self, out, x: calls.append(len(self.parts)) or
                        add_to(self, out, x))
    plain = StaticEngine(model, None, [0], CPU, 64, fuse=False).generate(PROMPT, PARAMS, lambda ids: False)
    assert not calls
    grouped = StaticEngine(model, None, [0], CPU, 64).generate(PROMPT, PARAMS, lambda ids: False)
    return plain, grouped, calls


def test_adapters_on_the_torch_kernel_give_pefts_tokens(rater_gptq, monkeypatch):
    from pipeline.humpback.generate import load

    model = with_lora(load(rater_gptq, None, CPU, torch.float32))
    plain, grouped, calls = run_both(model, monkeypatch)
    same_generation(plain, grouped)
    layers = model.get_base_model().config.num_hidden_layers
    assert sorted(set(calls)) == [1, 2, 3] and len(calls) >= 4 * layers  # q/k/v, o, gate/up and down grouped


def test_adapters_on_fused_marlin_bases_give_pefts_tokens(marlin_model, monkeypatch):  # noqa: F811
    from helm_server.marlin_fusion import FusedPart

    model = with_lora(marlin_model)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        logits = model(ids).logits
    plain, grouped, calls = run_both(model, monkeypatch)
    same_generation(plain, grouped)
    attn = model.get_base_model().model.layers[0].self_attn
    assert isinstance(attn.q_proj.base_layer, FusedPart)  # the bases under the adapters are one Marlin call
    assert attn.q_proj.quant_linear_module is attn.q_proj.base_layer  # peft's GPTQ wrapper holds its base twice
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)  # peft's forward unchanged
    assert 3 in calls


def test_the_a_weights_become_views_of_one_tensor(rater_gptq):
    from pipeline.humpback.generate import load

    model = with_lora(load(rater_gptq, None, CPU, torch.float32))
    attn = model.get_base_model().model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(3, parts[0].in_features)
    with torch.no_grad():
        expected = torch.cat([p(x) for p in parts], dim=-1)
        products = lora_products(parts, torch.float32)
        got = products.add_to(torch.cat([p.base_layer(x) for p in parts], dim=-1), x)
        again = torch.cat([p(x) for p in parts], dim=-1)  # peft's forward over the views
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected)
    base = products.a.untyped_storage().data_ptr()
    assert all(p.lora_A["default"].weight.untyped_storage().data_ptr() == base for p in parts)


def test_layers_that_are_not_vanilla_lora_keep_pefts_forward(rater_gptq):
    from pipeline.humpback.generate import load

    model = with_lora(load(rater_gptq, None, CPU, torch.float32))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert lora_products([q], torch.float32) is not None
    assert lora_products([q], torch.float16) is None  # adapter weights in another dtype than the base
    assert lora_products([q.base_layer], torch.float32) is None  # no adapter
    q.lora_dropout["default"] = torch.nn.Dropout(0.1)  # in training mode
    assert lora_products([q], torch.float32) is None
    q.lora_dropout["default"].eval()
    assert lora_products([q], torch.float32) is not None
    with model.disable_adapter():
        assert lora_products([q], torch.float32) is None


def test_adapters_on_plain_bases_give_pefts_tokens(monkeypatch):
    """Humpback's base may be unquantized: the bases under the adapters are concatenated as plain weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = with_lora(Qwen2ForCausalLM(config).eval())
    plain, grouped, calls = run_both(model, monkeypatch)
    same_generation(plain, grouped)
    attn = model.get_base_model().model.layers[0].self_attn
    assert attn.k_proj.base_layer.weight.data_ptr() != attn.k_proj.base_layer.weight.untyped_storage().data_ptr()
    assert 3 in calls
