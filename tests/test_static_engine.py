"""The static engine (static KV cache, CUDA-graph steps, prefix reuse) against the HF engine, on the CPU.

The CPU runs the same padded shapes eagerly that CUDA replays as graphs, so every path but the
capture is exercised here; the GPU side is `benchmarks/engine_check.py` (docs/measurements.md).
The server-level tests (HELM contract, fuzzing, soak, conformance) run against both engines
through conftest's `ENGINES`.
"""

from __future__ import annotations

import random

import pytest
import torch

from helm_server.app import engine_name
from helm_server.engine import SamplingParams
from helm_server.hf_engine import HFEngine
from helm_server.static_engine import PREFILL_CHUNK, StaticEngine, UnsupportedModel, buckets, shared_prefix
from packager.tiny_model import QWEN_EOS_ID, build_tokenizer

CPU = torch.device("cpu")


def never(ids):
    return False


@pytest.fixture(scope="module")
def engines(tiny_model):
    return HFEngine(tiny_model, None, [QWEN_EOS_ID], CPU), StaticEngine(tiny_model, None, [QWEN_EOS_ID], CPU, 1100)


def assert_same(a, b, tolerance=1e-4):
    assert [t.token_id for t in a.prompt + a.completion] == [t.token_id for t in b.prompt + b.completion]
    assert a.finish_reason == b.finish_reason
    for x, y in zip(a.prompt + a.completion, b.prompt + b.completion):
        assert x.logprob == pytest.approx(y.logprob, abs=tolerance)
        assert [i for i, _ in x.top] == [i for i, _ in y.top]


@pytest.mark.parametrize("length", [1, 7, 16, 100, 200, 513, 1000])
def test_greedy_tokens_and_echo_logprobs_match_the_hf_engine(engines, length):
    """Lengths on and off the padded prefill sizes, and past one prefill chunk (512)."""
    hf, static = engines
    prompt = [random.Random(length).randrange(200, 5000) for _ in range(length)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, top_logprobs=3, echo_prompt=True)
    assert_same(hf.generate(prompt, params, never), static.generate(prompt, params, never))


def test_a_reused_prefix_gives_what_a_fresh_prefill_gives(tiny_model):
    """Requests that share, extend, shorten, repeat and abandon each other's prompts; sampled ones seeded."""
    reusing = StaticEngine(tiny_model, None, [QWEN_EOS_ID], CPU, 1100)
    fresh = StaticEngine(tiny_model, None, [QWEN_EOS_ID], CPU, 1100, reuse=False)
    rng = random.Random(0)
    shots = [rng.randrange(200, 5000) for _ in range(300)]
    prompt: list[int] = []
    for i in range(24):
        kind = i % 4
        if kind == 0:
            prompt = shots + [rng.randrange(200, 5000) for _ in range(rng.randrange(1, 60))]  # a new question
        elif kind == 1:
            prompt = prompt + [rng.randrange(200, 5000) for _ in range(5)]  # extends the previous prompt
        elif kind == 2:
            prompt = prompt[: rng.randrange(1, len(prompt))]  # a prefix of it: nothing new to prefill
        params = SamplingParams(max_new_tokens=rng.choice([0, 1, 8]), temperature=rng.choice([0.0, 0.8]),
                                seed=i, top_logprobs=2, echo_prompt=rng.random() < 0.5)
        assert_same(reusing.generate(prompt, params, never), fresh.generate(prompt, params, never), 1e-5)
    assert reusing.reused_tokens > 24 * 100 and fresh.reused_tokens == 0


def test_the_cache_forgets_what_a_stopped_request_did_not_feed(engines):
    """A completion cut by a stop check leaves its last token unfed; the next request still reuses correctly."""
    hf, static = engines
    prompt = list(range(300, 400))
    stop_after_3 = lambda ids: len(ids) >= 3  # noqa: E731
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    first = static.generate(prompt, params, stop_after_3)
    assert len(first.completion) == 3 and first.finish_reason == "stop"
    assert static.cache.tokens == prompt + [t.token_id for t in first.completion[:2]]
    follow = prompt + [t.token_id for t in first.completion] + [42]
    assert_same(hf.generate(follow, params, never), static.generate(follow, params, never))


def test_a_request_past_the_cache_is_refused(engines):
    _, static = engines
    with pytest.raises(ValueError, match="exceed the static cache of 1100"):
        static.generate(list(range(100, 1100)), SamplingParams(max_new_tokens=101, temperature=0.0), never)


def test_auto_is_the_static_engine_on_cuda_and_hf_on_the_cpu():
    assert engine_name("auto", "cuda") == "static" and engine_name("auto", "cpu") == "hf"
    assert engine_name("hf", "cuda") == "hf" and engine_name("static", "cpu") == "static"


def test_cache_buckets_double_up_to_the_whole_cache():
    assert buckets(2048) == [256, 512, 1024, 2048] and buckets(600) == [256, 512, 600] and buckets(100) == [100]
    assert shared_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and PREFILL_CHUNK == 512


def test_a_model_the_forward_does_not_reproduce_is_refused_naming_the_fix():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=16)
    with pytest.raises(UnsupportedModel, match='engine = "hf"'):
        StaticEngine(Qwen2ForCausalLM(config).eval(), None, [1], CPU, 64)


def test_auto_falls_back_to_the_hf_engine_for_a_model_it_cannot_run(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import make_config

    config = Qwen2Config(vocab_size=152000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=16)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    assert isinstance(StaticEngine.from_config(make_config(tmp_path), fallback=True), HFEngine)
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        StaticEngine.from_config(make_config(tmp_path))


def test_llama_layouts_match_the_hf_engine():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    hf, static = HFEngine(model, None, [2], CPU), StaticEngine(model, None, [2], CPU, 300)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, top_logprobs=2, echo_prompt=True)
    prompt = list(range(10, 70))
    assert_same(hf.generate(prompt, params, never), static.generate(prompt, params, never))


def test_the_spec_chooses_the_engine():
    from helm_server.settings import ServerSettings
    from pydantic import ValidationError

    assert ServerSettings().engine == "auto" and ServerSettings(engine="static").engine == "static"
    with pytest.raises(ValidationError, match="auto"):
        ServerSettings(engine="vllm")


def test_unmerged_adapters_run_in_the_bases_dtype():
    """peft keeps LoRA weights in fp32; the engine casts them to the base's dtype (fp16 on a GPU), so adapter
    products are no fp32 GEMMs beside the base's: the base's own weights are untouched, the output barely moves."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from helm_server.static_engine import adapters_in

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(Qwen2ForCausalLM(config).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    lora = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert set(lora.values()) == {torch.float32}  # as peft loads them
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        before = model(ids).logits.float()
        assert adapters_in(model, torch.bfloat16) == len(lora) == 6
        after = model(ids).logits.float()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert adapters_in(model, torch.bfloat16) == 0
    torch.testing.assert_close(after, before, rtol=0.05, atol=0.05)
