"""The fast training path: the same optimizer steps as the reference path, computed in fewer, larger launches.

The reference path (`loop.optimizer_step`) runs each accumulation group as
`gradient_accumulation` micro-batches of `batch_size` sequences: on the 14B
shape that is 32 forward + backward passes of one sequence each, half of the
wall time launch overhead, and peft's LoRA products as fp32 GEMMs. This path
keeps the recipe (the same sequences per optimizer step, the same schedule,
the same max_length, the same loss and gradient up to rounding) and changes
how a step is computed:

1. Micro-batches by length: a group's sequences, longest first, go into
   micro-batches of at most `micro_tokens` tokens, laid end to end without
   padding (`packing.py`: attention stays within each sequence), so a step is a
   few large passes instead of 32 small ones. `packed=False` pads each
   micro-batch to its longest row instead (the previous form, for comparison).
2. The loss is normalised as the reference normalised it: each token's
   cross-entropy is weighted by 1 / (micro-batches of the reference group x
   answer tokens of the reference micro-batch that held it). The step's loss is
   then exactly the mean of the reference micro-batches' means (with batch 1 x
   32: the mean of per-sequence means), whatever the new grouping.
3. LoRA in the base's half precision: the step runs under autocast (fp16 for
   an fp16 base), so the adapter products are tensor-core GEMMs on fp16 copies
   of the fp32 master weights; the adapter's gradients are written in fp32
   (`kernels.lora_forward`), and the optimizer state stays fp32. peft's
   cast of every input to fp32 is switched off for the step. The frozen base
   computes exactly as before (its matmuls were already fp16).
4. Linear + cross-entropy in chunks, over answer tokens only: the logits of
   152,064 words are never held for a whole micro-batch, and prompt tokens,
   whose labels are ignored, never reach the output layer. The gradient of the
   hidden states is computed chunk by chunk in the forward (the output layer
   is frozen), with the reference's numerics: fp16 logits, fp32 softmax, the
   fp32 gradient cast to fp16 before the product with the weight.
5. Fewer elementwise kernels (`kernels.py`): liger-kernel's fused RMSNorm,
   rotary and SwiGLU on CUDA, and each LoRA branch's scaling and add folded into
   its GEMMs.
6. Under gradient checkpointing the layers' saved inputs wait in host memory
   (`offload.py`), so a micro-batch holds twice the tokens in the same GPU
   memory (`MICRO_TOKENS`; `RESIDENT_MICRO_TOKENS` without offloading).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from . import kernels as fused_kernels
from . import offload as host_offload
from . import packing
from .plan import Probe

IGNORE = -100
PATHS = ("fast", "reference")
# Tokens per micro-batch at Qwen-14B's 8-bit shape, r=32, packed, 24 GiB cap (benchmarks/train_shape.py, 2026-12-03):
MICRO_TOKENS = 12288           # the checkpointed layers' inputs in host memory: 20.5 GiB peak, 1.12x 6,144 resident
RESIDENT_MICRO_TOKENS = 6144   # inputs kept on the GPU (no checkpointing, or offload off): 20.7 GiB (8,192: 22.1 GiB)
CE_ROWS = 512         # answer tokens per chunk of the output layer (512 x 152,064 fp32 logits: 0.3 GiB)


def resolve_path(path: str, device: torch.device) -> str:
    """`auto` is the fast path on CUDA and the reference path elsewhere."""
    if path == "auto":
        return "fast" if device.type == "cuda" else "reference"
    if path not in PATHS:
        raise ValueError(f"training path {path!r}: one of auto, fast, reference")
    return path


# --- 1. which sequences go together ---------------------------------------------------


def answer_tokens(row: dict) -> int:
    """Tokens whose next-token loss counts (labels shifted by one, as the causal-LM loss reads them)."""
    return sum(1 for t in row["labels"][1:] if t != IGNORE)


def pack(lengths: list[int], micro_tokens: int, packed: bool = True) -> list[list[int]]:
    """Indices into `lengths`, longest first, cut into micro-batches of at most `micro_tokens` tokens; a row longer
    than the budget goes alone. Packed (end to end, `packing.py`): a micro-batch's tokens are the sum of its rows'
    lengths, and each row goes into the first micro-batch with room (first fit, longest first). Padded: rows x the
    first, longest row, and a micro-batch takes rows in order until full."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    used: list[int] = []
    for i in order:
        if packed:
            room = next((j for j, u in enumerate(used) if u + lengths[i] <= micro_tokens), None)
        else:
            room = len(out) - 1 if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= micro_tokens else None
        if room is None:
            out.append([])
            used.append(0)
            room = len(out) - 1
        out[room].append(i)
        used[room] += lengths[i]
    return out


def token_weights(group: list[list[dict]]) -> list[float]:
    """Per row of the flattened group: the weight of each of its answer tokens' losses, so that the weighted
    sum is the mean over the group's micro-batches of each micro-batch's mean over its answer tokens."""
    weights = []
    for micro in group:
        n = sum(answer_tokens(r) for r in micro)
        weights += [1.0 / (len(group) * n) if n else 0.0] * len(micro)
    return weights


def _answers(rows: list[dict], weights: list[float], starts: list[int], device: torch.device) -> dict:
    """`where`: the flat index of each position whose next token has a label (row r's tokens start at starts[r]);
    `targets` and `weights`: its label and its loss weight."""
    where, targets, w = [], [], []
    for r, weight, start in zip(rows, weights, starts):
        labels = torch.tensor(r["labels"][1:], dtype=torch.long)
        keep = (labels != IGNORE).nonzero().squeeze(1)
        where.append(keep + start)
        targets.append(labels[keep])
        w.append(torch.full((len(keep),), weight, dtype=torch.float32))
    return {"where": torch.cat(where).to(device), "targets": torch.cat(targets).to(device),
            "weights": torch.cat(w).to(device)}


def collate(rows: list[dict], weights: list[float], pad_id: int, device: torch.device) -> dict:
    """Right-padded ids (mask only where rows differ in length), and the answer positions (`_answers`)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        mask[b, :n] = 1
    uneven = any(len(r["input_ids"]) != width for r in rows)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device) if uneven else None}
    return {"inputs": inputs, **_answers(rows, weights, [b * width for b in range(len(rows))], device),
            "tokens": int(mask.sum())}


def collate_packed(rows: list[dict], weights: list[float], device: torch.device) -> dict:
    """The rows end to end in one row, each with its own positions and its boundaries (`packing.layout`), as the
    decoder's keyword arguments for `packing.attention`; the answer positions (`_answers`)."""
    lengths = [len(r["input_ids"]) for r in rows]
    positions, offsets, longest = packing.layout(lengths)
    ids = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.long).unsqueeze(0)
    answers = _answers(rows, weights, offsets[:-1].tolist(), device)
    offsets = offsets.to(device)
    inputs = {"input_ids": ids.to(device), "position_ids": positions.to(device), "cu_seq_lens_q": offsets,
              "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}
    return {"inputs": inputs, **answers, "tokens": sum(lengths)}


# --- 2. the output layer and the loss, in chunks ----------------------------------------


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T, t_i) for a frozen W; the gradient of h is computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, rows: int):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], rows):
            h, t, w = hidden[s : s + rows], targets[s : s + rows], weights[s : s + rows]
            logits = (h @ weight.t()).float()                 # fp16 product, fp32 loss: as HF's causal-LM loss
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * w).sum()
            logits.sub_(lse[:, None]).exp_().mul_(w[:, None])  # d loss / d logits = w * (softmax - onehot)
            logits[torch.arange(len(t), device=t.device), t] -= w
            grad[s : s + rows] = logits.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def linear_cross_entropy(hidden, weight, targets, weights, rows: int = CE_ROWS):
    if weight.requires_grad:
        raise ValueError("the fast path's output layer is frozen (LoRA on lm_head is not supported there)")
    return LinearCrossEntropy.apply(hidden, weight, targets, weights, rows)


# --- 3. a step ----------------------------------------------------------------------


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _quantized_linears(model):
    """The frozen GPTQ linears (GPTQModel's torch kernel): they hold packed weights and dequantize them per call."""
    return [m for m in model.modules() if hasattr(m, "qweight") and hasattr(m, "dequantize_weight")]


class _DequantMatmul(torch.autograd.Function):
    """x @ dequantize(W) for a frozen packed W, dequantized again in backward instead of kept: the layer being
    recomputed under gradient checkpointing holds no fp16 copy of its seven weights (0.6 GiB at 14B)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return x @ module.dequantize_weight().to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.dequantize_weight().to(grad.dtype).t(), None


def _frozen_forward(module):
    """GPTQModel's TorchLinear forward, for the plain case (one g_idx pass, no rotation, no adapter), via _DequantMatmul."""
    def forward(x):
        out = _DequantMatmul.apply(x.reshape(-1, x.shape[-1]), module).reshape(*x.shape[:-1], module.out_features)
        return out + module.bias.to(out.dtype) if module.bias is not None else out

    return forward


def _plain(module) -> bool:
    return (module.g_idx is not None and module.g_idx.shape[0] == module.in_features
            and getattr(module, "adapter", None) is None and not getattr(module, "online_full_had", False)
            and not getattr(module, "online_partial_had", False))


@contextlib.contextmanager
def half_precision_lora(model, eval_dequant: bool = True):
    """Autocast to the base's dtype (LoRA's fp32 master weights used as fp16 copies), peft's fp32 input cast off:
    for forward and backward both (gradient checkpointing recomputes inside backward).

    `eval_dequant`: the frozen GPTQ linears dequantize as in eval mode, where GPTQModel's torch kernel uses its
    one-pass Triton dequantization on CUDA (in training mode it runs a chain of torch elementwise ops). The
    packed weights are buffers, never trained; the product with the input still has its backward."""
    base = model.get_base_model()
    dtype = next((p.dtype for p in base.parameters() if not p.requires_grad and p.is_floating_point()), torch.float32)
    device = next(base.parameters()).device
    layers = _lora_layers(model)
    quantized = _quantized_linears(model) if eval_dequant else []
    saved = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    modes = [m.training for m in quantized]
    for m in layers:
        m.cast_input_dtype_enabled = False
    for m in quantized:
        m.training = False  # the attribute only: no module holds dropout, and train() would convert formats
        if _plain(m):
            m.forward = _frozen_forward(m)
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
            yield
    finally:
        for m, s in zip(layers, saved):
            m.cast_input_dtype_enabled = s
        for m, mode in zip(quantized, modes):
            m.training = mode
            m.__dict__.pop("forward", None)


AUTO = "auto"  # the kernels `fused_kernels.for_device` picks


def kernels_used(device: torch.device, offload: bool = False) -> str:
    """What the progress line says of the fast path's kernels (and offloading) on this device."""
    chosen = fused_kernels.for_device(device)
    attention = ("packed sequences, varlen flash attention" if packing.flash_available(device)
                 else "packed sequences, attention per sequence")
    if offload:
        attention = (f"{micro_tokens_for(offload):,}-token micro-batches of {attention}, "
                     "checkpointed layers' inputs in host memory")
    if chosen is not None:
        return f"{attention}, fused kernels: {chosen.name}"
    why = "a CPU" if device.type != "cuda" else "liger-kernel or Triton is not installed"
    return f"{attention}, transformers' own norm, rotary and SwiGLU ({why})"


@contextlib.contextmanager
def computing(model, device: torch.device, eval_dequant: bool = True, kernels=AUTO, fused_lora: bool = True,
              packed: bool = True, lora_grads32: bool = True, offload: bool = False):
    """Everything a fast step computes under: half-precision LoRA, eval-mode dequantization, the fused kernels
    (`kernels`: a `fused_kernels.Kernels`, None for transformers' own code, or AUTO), the one-add LoRA branch and,
    for packed micro-batches, attention within each sequence (`lora_grads32`: `fused_kernels.lora_forward`);
    `offload`: the checkpointed layers' inputs wait in host memory (`host_offload`)."""
    chosen = fused_kernels.for_device(device) if kernels == AUTO else kernels
    within = packing.within_sequences(model) if packed else contextlib.nullcontext()
    on_host = host_offload.layer_inputs_on_host(model, device) if offload else contextlib.nullcontext()
    with half_precision_lora(model, eval_dequant), fused_kernels.fused(model, chosen, fused_lora, lora_grads32), \
            within, on_host:
        yield


def forward_backward(model, batch: dict) -> torch.Tensor:
    """One micro-batch: hidden states, the chunked loss over its answer tokens, backward; the weighted loss."""
    causal = model.get_base_model()
    hidden = causal.get_decoder()(**batch["inputs"], use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch["where"]]
    with torch.autocast(hidden.device.type, enabled=False):
        loss = linear_cross_entropy(hidden, causal.get_output_embeddings().weight, batch["targets"], batch["weights"])
    loss.backward()
    return loss.detach()


def micro_batches(group: list[list[dict]], pad_id: int, device: torch.device, micro_tokens: int, packed: bool = True):
    """The group's rows, with their token weights, regrouped by length; collated one at a time."""
    rows = [r for micro in group for r in micro]
    weights = token_weights(group)
    for ids in pack([len(r["input_ids"]) for r in rows], micro_tokens, packed):
        chosen, w = [rows[i] for i in ids], [weights[i] for i in ids]
        yield collate_packed(chosen, w, device) if packed else collate(chosen, w, pad_id, device)


def micro_tokens_for(offload: bool, given: int | None = None) -> int:
    """`given`, or the default micro-batch: twice the tokens when the layer inputs wait in host memory."""
    if given is not None:
        return given
    return MICRO_TOKENS if offload else RESIDENT_MICRO_TOKENS


class Step:
    """The fast path's optimizer step, called by `loop.train` with a group of reference micro-batches (rows)."""

    def __init__(self, pad_id: int, device: torch.device, micro_tokens: int | None = None, eval_dequant: bool = True,
                 kernels=AUTO, fused_lora: bool = True, packed: bool = True, lora_grads32: bool = True,
                 offload: bool = True):
        self.pad_id, self.device, self.packed = pad_id, device, packed
        self.micro_tokens = micro_tokens_for(offload, micro_tokens)
        self.how = {"eval_dequant": eval_dequant, "kernels": kernels, "fused_lora": fused_lora, "packed": packed,
                    "lora_grads32": lora_grads32, "offload": offload}

    def __call__(self, model, optimizer, scheduler, group: list[list[dict]], max_grad_norm: float | None,
                 dropped: Callable[[], bool] = lambda: False) -> tuple[float, float] | None:
        """Accumulate the group, clip, step; return (loss as the reference computed it, learning rate used).
        `dropped` as in `loop.optimizer_step`: asked between micro-batches; when it says so, nothing is updated (None)."""
        lr = scheduler.get_last_lr()[0]
        batches = list(micro_batches(group, self.pad_id, self.device, self.micro_tokens, self.packed))
        total = None
        with computing(model, self.device, **self.how):
            for n, batch in enumerate(batches, 1):
                loss = forward_backward(model, batch)
                total = loss if total is None else total + loss
                if n < len(batches) and dropped():
                    optimizer.zero_grad(set_to_none=True)
                    return None
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total), lr


def probe(model, examples: list[dict], schedule, pad_id: int, device: torch.device, micro_tokens: int | None = None,
          groups: int = 1, eval_dequant: bool = True, kernels=AUTO, fused_lora: bool = True, packed: bool = True,
          lora_grads32: bool = True, offload: bool = True) -> Probe:
    """As `loop.probe` for this path: forward + backward on the fullest micro-batch of the longest examples (the
    memory peak), then `groups` accumulation groups of epoch 0's order (the rate); gradients discarded, RNG put back."""
    from .loop import epoch_order, measured
    from .loop import micro_batches as reference_micros

    micro_tokens = micro_tokens_for(offload, micro_tokens)

    longest = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    width = len(examples[longest[0]]["input_ids"])
    candidates = longest[:512]  # enough to fill a micro-batch
    lengths = [len(examples[i]["input_ids"]) for i in candidates]
    size = (lambda m: sum(lengths[i] for i in m)) if packed else (lambda m: len(m) * lengths[m[0]])
    fullest = [[examples[candidates[i]]] for i in max(pack(lengths, micro_tokens, packed), key=size)]
    micros = reference_micros(epoch_order(len(examples), 0, schedule.seed), schedule.batch_size)
    acc = schedule.gradient_accumulation
    timed = [[[examples[i] for i in ids] for ids in micros[g * acc : (g + 1) * acc]] for g in range(groups)]

    def peak() -> None:
        for batch in micro_batches(fullest, pad_id, device, micro_tokens, packed):
            forward_backward(model, batch)

    def rate() -> int:
        tokens = 0
        for group in timed:
            for batch in micro_batches(group, pad_id, device, micro_tokens, packed):
                forward_backward(model, batch)
                tokens += batch["tokens"]
        return tokens

    with computing(model, device, eval_dequant, kernels, fused_lora, packed, lora_grads32, offload):
        return measured(model, device, peak, rate, width)
