"""The spec's generation settings as the server applies them."""

from __future__ import annotations

import pytest
import requests
import torch

from conftest import make_config, serving
from helm_server.engine import SamplingParams
from helm_server.hf_engine import sample
from helm_server.service import RequestError, fit_context
from helm_server.settings import GenerationSettings, ServeConfig, apply_environment
from helm_server.stopping import StopMatcher


def test_overflow_truncate_left_keeps_the_newest_prompt_tokens(tiny_model_dir):
    from helm_server.app import create_app

    app = create_app(make_config(tiny_model_dir, context_length=32, default_max_new_tokens=8, overflow="truncate_left"))
    with serving(app) as url:
        body = {"prompt": "word " * 60, "max_new_tokens": 4, "echo_prompt": True, "temperature": 0}
        response = requests.post(f"{url}/process", json=body, timeout=60)
    assert response.status_code == 200
    assert len(response.json()["tokens"]) <= 32


def test_fit_context_rejects_by_default_with_the_numbers():
    settings = GenerationSettings(eos_token_ids=[0], context_length=10, default_max_new_tokens=4)
    assert fit_context([1] * 6, 4, settings) == [1] * 6
    with pytest.raises(RequestError, match="prompt of 7 tokens \\+ max_new_tokens 4 exceeds the context length of 10"):
        fit_context([1] * 7, 4, settings)


def test_fit_context_truncates_left_but_never_below_zero():
    settings = GenerationSettings(eos_token_ids=[0], context_length=10, default_max_new_tokens=4, overflow="truncate_left")
    assert fit_context(list(range(12)), 4, settings) == list(range(6, 12))
    with pytest.raises(RequestError):
        fit_context([1], 10, settings)  # no room for any prompt token


def test_min_new_tokens_suppresses_end_of_text():
    logits = torch.tensor([5.0, 1.0, 0.5])  # eos (id 0) is the clear favourite
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    assert int(sample(logits, greedy, torch.Generator())) == 0
    assert int(sample(logits, greedy, torch.Generator(), banned=torch.tensor([0]))) == 1


def test_top_k_and_top_p_restrict_sampling():
    logits = torch.tensor([3.0, 2.9, -5.0, -5.0])
    gen = torch.Generator().manual_seed(0)
    top_k = SamplingParams(max_new_tokens=1, temperature=5.0, top_k=2)
    assert {int(sample(logits, top_k, gen)) for _ in range(200)} <= {0, 1}
    top_p = SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.1)
    assert {int(sample(logits, top_p, gen)) for _ in range(50)} == {0}


def test_stop_matcher_can_keep_the_stop_sequence():
    pieces = ["Ans", "wer", ":", " 4", "\n\n", "Q"]

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    ids = list(range(len(pieces)))
    assert StopMatcher(decode, ["\n\n"]).cut(ids) == ("Answer: 4", 4)
    assert StopMatcher(decode, ["\n\n"], keep_stop=True).cut(ids) == ("Answer: 4\n\n", 5)
    assert StopMatcher(decode, []).cut(ids) == ("Answer: 4\n\nQ", 6)


def test_environment_overrides_model_and_adapter(tiny_model_dir):
    config = make_config(tiny_model_dir).model_copy(update={"adapter": None})
    moved = apply_environment(config, {"MODEL_PATH": "/models/artifact", "ADAPTER_PATH": "/models/adapter"})
    assert moved.model.repo_id == "/models/artifact" and moved.adapter.repo_id == "/models/adapter"
    assert apply_environment(moved, {"ADAPTER_PATH": "none"}).adapter is None
    assert apply_environment(config, {}) is config


def test_eos_outside_the_vocabulary_is_a_clear_startup_error(tiny_model_dir):
    from helm_server.hf_engine import HFEngine

    config = make_config(tiny_model_dir, eos_token_ids=[10**7])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        HFEngine.from_config(config)


def test_serve_config_rejects_unknown_keys():
    with pytest.raises(Exception, match="extra"):
        ServeConfig.model_validate(
            {"submission": "x", "model": {"repo_id": "m"}, "generation": {"eos_token_ids": [1], "temprature": 1}}
        )


@pytest.fixture(scope="module")
def tiny_adapter_dir(tmp_path_factory, tiny_model):
    """A LoRA adapter with non-zero weights, so it visibly changes the model."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(tiny_model), config)
    path = tmp_path_factory.mktemp("tiny-adapter")
    peft_model.save_pretrained(path)
    return path


def test_adapter_from_adapter_path_changes_the_served_logprobs(tiny_model_dir, tiny_model, tiny_tokenizer, tiny_adapter_dir):
    from peft import PeftModel

    from helm_server.app import create_app

    text = "Question: What is two plus two?\\nAnswer: four"
    ids = tiny_tokenizer(text)["input_ids"]
    config = apply_environment(make_config(tiny_model_dir), {"ADAPTER_PATH": str(tiny_adapter_dir)})
    with serving(create_app(config)) as url:
        body = {"prompt": text, "echo_prompt": True, "max_new_tokens": 0}
        served = [t["logprob"] for t in requests.post(f"{url}/process", json=body, timeout=60).json()["tokens"][1:]]
        health = requests.get(f"{url}/health", timeout=10).json()

    import copy

    adapted = PeftModel.from_pretrained(copy.deepcopy(tiny_model), tiny_adapter_dir).eval()  # wraps in place
    with torch.no_grad():
        logits = adapted(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    assert health["adapter"] == str(tiny_adapter_dir)
    assert torch.allclose(torch.tensor(served), expected, atol=1e-4)
    with torch.no_grad(), adapted.disable_adapter():
        base = torch.log_softmax(adapted(torch.tensor([ids])).logits[0].float(), -1)[:-1]
    base = base.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter really is applied
