"""Long prefill passes on dense weights (helm_server/dense_prefill.py).

On the CPU: the inversion of Marlin's 8-bit layout against a transliteration of the repack kernel's loops and
GPTQModel's own scale and bias permutations; the engine's switch between the two paths on the tiny GPTQ model
(its torch kernel can write out its weight). On a GPU (TEST_DEVICE=cuda): the same inversion against
GPTQModel's compiled `gptq_marlin_repack` and Marlin's product.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEST_DEVICE
from helm_server.dense_prefill import dense_from, marlin_dense, marlin_scale_order
from helm_server.engine import SamplingParams

K, N = 256, 192  # 16 x 3 tiles


def repack_like_marlin(codes: torch.Tensor) -> torch.Tensor:
    """`gptq_marlin_repack`'s 8-bit branch (no act-order), thread by thread as the CUDA kernel writes it."""
    k_size, n_size = codes.shape
    q = codes.tolist()
    out = np.zeros((k_size // 16, n_size // 64 * 256), dtype=np.uint32)
    for k_tile in range(k_size // 16):
        for n_tile in range(n_size // 64):
            for warp in range(4):
                for thread in range(32):
                    col, row = n_tile * 64 + warp * 16 + thread // 4, k_tile * 16 + (thread % 4) * 2
                    vals = [q[row + o][col] for o in (0, 1, 8, 9)] + [q[row + o][col + 8] for o in (0, 1, 8, 9)]
                    for half in range(2):
                        word = sum(vals[4 * half + p] << (8 * i) for i, p in enumerate((0, 2, 1, 3)))
                        out[k_tile, n_tile * 256 + thread * 8 + warp * 2 + half] = word
    return torch.from_numpy(out.view(np.int32))


def reference(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    return ((codes.float() - 128) * scales.float().repeat_interleave(group, dim=0)).half()


@pytest.mark.parametrize("group", [128, K])
def test_marlin_layout_is_inverted_to_the_dense_weight(group):
    from gptqmodel.utils.marlin import marlin_permute_scales

    g = torch.Generator().manual_seed(group)
    codes = torch.randint(0, 256, (K, N), generator=g, dtype=torch.uint8)
    scales = (torch.rand(K // group, N, generator=g) / 100 + 1e-3).half()
    marlin_scales = marlin_permute_scales(scales, K, N, -1 if group == K else group)
    out = torch.empty(K * N + 5, dtype=torch.float16)
    weight = marlin_dense(repack_like_marlin(codes), marlin_scales, K, N, out, marlin_scale_order(single=group == K))
    torch.testing.assert_close(weight, reference(codes, scales, group), rtol=1e-3, atol=1e-5)


def test_a_bias_is_put_back_in_column_order():
    from gptqmodel.utils.marlin import marlin_permute_bias

    bias = torch.arange(N, dtype=torch.float16)
    permuted = marlin_permute_bias(bias)
    assert not torch.equal(permuted, bias)
    assert torch.equal(permuted.reshape(-1, 32).index_select(1, marlin_scale_order(single=True)).reshape(-1), bias)


def test_only_cards_in_the_table_run_dense_unless_asked(monkeypatch):
    from helm_server import dense_prefill

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dense_from(cpu, None) is None and dense_from(cpu, 64) == 64 and dense_from(cpu, 0) is None
    with pytest.raises(ValueError, match="0 for never"):
        dense_from(cpu, -1)
    monkeypatch.setattr(dense_prefill, "DENSE_FROM", {(9, 0): 512})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert dense_from(cuda, None) == 512 and dense_from(cuda, 0) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))  # the RTX 4090
    assert dense_from(cuda, None) is None


@pytest.mark.parametrize("group", [128, K])
def test_a_marlin_layer_runs_dense_with_its_bias_and_scales_put_back(group):
    """MarlinDense over a layer's Marlin-layout tensors (as MarlinLinear holds them after GPTQModel's post_init)
    gives x @ W + bias of the plain weight."""
    from types import SimpleNamespace

    from gptqmodel.utils.marlin import marlin_permute_bias, marlin_permute_scales

    from helm_server.dense_prefill import MarlinDense

    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 256, (K, N), generator=g, dtype=torch.uint8)
    scales = (torch.rand(K // group, N, generator=g) / 100 + 1e-3).half()
    bias = torch.randn(N, generator=g).half()
    layer = SimpleNamespace(qweight=repack_like_marlin(codes), bias=torch.nn.Parameter(marlin_permute_bias(bias)),
                            scales=marlin_permute_scales(scales, K, N, -1 if group == K else group),
                            in_features=K, out_features=N)
    x = torch.randn(2, 3, K, generator=g).half()
    got = MarlinDense(layer, torch.empty(K * N, dtype=torch.float16))(x)
    expected = (x.float() @ reference(codes, scales, group).float() + bias.float())
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def rater(rater_gptq):
    from transformers import AutoTokenizer

    from pipeline.humpback.generate import load

    return load(rater_gptq, None, torch.device("cpu"), torch.float32), AutoTokenizer.from_pretrained(rater_gptq)


def test_long_passes_run_dense_and_give_the_kernels_tokens(rater):
    """Prefill passes of 4 positions or more on dense weights: same greedy tokens and logprobs as the torch kernel,
    alone and opened side by side; decode steps (batch 1 or a batched step over 4 slots) never dense."""
    from helm_server.static_engine import StaticEngine, step_rows

    model, tokenizer = rater
    plain = StaticEngine(model, tokenizer, [151643], torch.device("cpu"), 256, rows=4)
    dense = StaticEngine(model, tokenizer, [151643], torch.device("cpu"), 256, rows=4, dense=4)
    assert plain.w.dense_layers is None and dense.w.dense_layers is not None
    assert dense.w.layers_for(1, 3) is dense.w.layers and dense.w.layers_for(2, 2) is dense.w.dense_layers
    assert dense.w.layers_for(4, 1) is dense.w.layers  # a batched decode step: never dense
    first, runs = dense.w.dense_layers[0], []
    qkv = first.qkv
    first.qkv = lambda h: runs.append(h.shape[:-1]) or qkv(h)
    prompts = [tokenizer(t)["input_ids"] for t in ("A passage about rivers and the sea, long enough for a dense "
                                                   "pass.\nANSWER: ", "Short\nANSWER: ")]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, top_logprobs=2, echo_prompt=True)
    for prompt in prompts:
        a, b = (e.generate(prompt, params, lambda ids: False) for e in (plain, dense))
        assert [t.token_id for t in a.prompt + a.completion] == [t.token_id for t in b.prompt + b.completion]
        for x, y in zip(a.prompt + a.completion, b.prompt + b.completion):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-3)
    fresh = [tokenizer(t)["input_ids"] for t in ("Mountains, lakes and the weather of the north\nQUESTION: ",
                                                  "Fourth one, about a city\nANSWER: ")]
    opened = [e.open_all([(p, params, lambda ids: False) for p in fresh]) for e in (plain, dense)]
    assert dense.batched_passes == plain.batched_passes == 1  # side by side: 2 rows in one pass
    for x, y in zip(*opened):
        torch.testing.assert_close(y.decoding.next_logits, x.decoding.next_logits, rtol=1e-3, atol=1e-3)
    prefill_runs = list(runs)
    running = [(i, row) for i, row in enumerate(opened[1])]
    for _ in range(3):  # batched decode steps over the engine's 4 slots
        _, running = step_rows(dense, running)
    for engine, rows in zip((plain, dense), opened):
        for row in rows:
            engine.close(row)
    assert runs == prefill_runs  # decode steps, alone or batched, never ran the dense layers
    assert runs and all(shape.numel() >= 4 and shape[1] > 1 for shape in runs)  # prefill passes only
    assert len([s for s in runs if s[0] == 2]) == 1  # the side-by-side pass


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="GPTQModel's Marlin ops run on a GPU (TEST_DEVICE=cuda)")
def test_the_inversion_matches_gptqmodels_compiled_repack():
    from gptqmodel.utils.marlin import gptq_marlin_repack, marlin_permute_scales

    from helm_server.kernels import load

    cuda = torch.device("cuda")
    load(cuda)  # the image's prebuilt Marlin where HELM_SERVER_KERNELS names it (else GPTQModel compiles it: minutes)
    k, n, group = 512, 384, 128
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (k, n), generator=g, dtype=torch.uint8)
    packed = (codes.view(k // 4, 4, n).to(torch.int64) << (8 * torch.arange(4))[None, :, None]).sum(1)
    gptq = torch.from_numpy(packed.numpy().astype(np.uint32).view(np.int32)).to(cuda)
    marlin = gptq_marlin_repack(gptq, torch.empty(0, dtype=torch.int, device=cuda), k, n, 8, dtype=torch.float16)
    assert torch.equal(marlin.cpu(), repack_like_marlin(codes))
    scales = (torch.rand(k // group, n, generator=g) / 100 + 1e-3).half()
    weight = marlin_dense(marlin, marlin_permute_scales(scales.to(cuda), k, n, group), k, n,
                          torch.empty(k * n, dtype=torch.float16, device=cuda), marlin_scale_order(single=False).to(cuda))
    torch.testing.assert_close(weight.cpu(), reference(codes, scales, group), rtol=1e-3, atol=1e-5)
