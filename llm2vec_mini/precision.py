"""bf16 where it pays and where it is safe: most projections in 16 bits, everything else in fp32.

A bf16 matrix product runs several times faster than an fp32 one on a CPU with bf16 instructions
(`avx512_bf16`, `amx_bf16`) or on a GPU, and several hundred times slower on a CPU without them. So
`compute_dtype("auto")` asks: a short probe (`bf16_speedup`, a few milliseconds, once per process)
times the same `F.linear` in both dtypes and picks bf16 where it is at least PAYS times faster.

Where bf16 is safe was measured on SmolLM2-135M (bidirectional, mean pooling) over the 3,000 STS-B
dev sentences: 1 - cos against fp32 (the bar: 1e-3 for every sentence) and Spearman x 100 (fp32:
28.53; the bar: within 0.2), `benchmarks/quality_bf16.py`:

    in bf16                                          median    worst   > 1e-3   Spearman
    the whole model (weights and activations)        1.9e-4    0.31      897     -0.78
    the fp32 model under torch.autocast              7.1e-5    0.15      585     -0.52
    every projection (norms, softmax, residual fp32) 6.8e-5    0.20      618     -0.60
    the projections after layer 11                   1.2e-5    1.7e-3      5     -0.05
    those, but not the MLPs of layers 27-29 (ours)   7.1e-6    9.0e-5      0     -0.02

and one thing at a time (a scratch copy of the forward pass): attention alone in bf16 gives 0.33,
the residual stream alone 0.20, the pooling sum alone 8.8e-6. No single operation is to blame.
Layer 11 of SmolLM2 is where its *massive activations* are born (Sun et al., 2024): for about a
quarter of the tokens one hidden dimension (507) jumps from under 100 to several thousand, by a
factor that depends on the layer's input so steeply that bf16's rounding anywhere before it (2^-9
relative) becomes a 10-40 % change of that value. After the final RMSNorm that value sets the
scale of the token's whole vector, so mean pooling weighs the tokens differently. The last three
MLPs move the massive values again (by 10 % to 140 %), and their rounding shows too. So the rule
(`fp32_blocks`, measured on random token ids in both attention directions):

  * a layer that grows some token's peak |x| more than BIRTH-fold is a birth; every block (attention
    and MLP) up to the last birth stays fp32;
  * after it, a block that moves a born token's peak by more than CHANGE stays fp32;
  * every other block runs its projections (q, k, v and o; gate, up and down) in bf16, from 16-bit
    copies of their weights; the residual stream, RMSNorm, RoPE, attention with its softmax, and
    pooling stay fp32 (they cost little, and fp32 is what the textbook model does).

A model without massive activations (random weights) runs every block in bf16; SmolLM2 keeps 27 of
its 60 blocks in fp32. The fp32 weights stay as they are (saving, merging adapters and training keep
working); the 16-bit copies are made once, kept beside each weight, and remade when a weight changes.
As with `ops.fuse_projections`, a block gets its behaviour from a `forward` (or `project`) of its
own that shadows the class's plain method; `set_compute_dtype(model, torch.float32)` removes them
all, which gives back the plain fp32 model, bit for bit. In training (`train.py`) every block runs
in bf16: there the MNTP losses stay within 0.3 % of fp32's with or without the fp32 blocks. LoRA
layers run their base product and their low-rank path in bf16 (`ops.lora_linear` on bf16 tensors);
their trained weights, and so the gradients the optimizer sees, stay fp32.

References:
1) Sun, Chen, Kolter, Liu, "Massive Activations in Large Language Models", 2024,
   https://arxiv.org/abs/2402.17762
2) Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training", 2019, https://arxiv.org/abs/1905.12322
3) Micikevicius et al., "Mixed Precision Training", 2018, https://arxiv.org/abs/1710.03740
"""

from __future__ import annotations

import time
from functools import partial
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .lora import LoRALinear
from .ops import lora_linear, stacked_weight
from .util import decoder_of

DtypeLike = Union[str, torch.dtype]
NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
         "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# -------------------------------------------------------------------------------------------------
# The probe: is a bf16 matrix product faster than an fp32 one on this device?

PROBE_SHAPE = (256, 576, 576)  # rows x in -> out: one projection of a batch of short sentences
PAYS = 1.5  # bf16 must be at least this much faster, or the casts around its products eat the gain
_speedups: dict[str, float] = {}  # device -> measured speed-up, once per process


def time_linear(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Seconds of one F.linear at PROBE_SHAPE in `dtype` on `device`: the best of `repeats` calls
    after one warm-up call (which picks and prepares the kernel)."""
    rows, n_in, n_out = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n_in, generator=g).to(device, dtype)
    w = torch.randn(n_out, n_in, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        F.linear(x, w)
        sync()
        if i > 0:
            best = min(best, time.perf_counter() - start)
    return best


def bf16_speedup(device="cpu") -> float:
    """fp32 seconds / bf16 seconds of the same matrix product on `device`, measured once per process.

    A few milliseconds; where bf16 is emulated (a CPU without bf16 instructions) one slow call decides.
    """
    device = torch.device(device)
    if str(device) not in _speedups:
        fp32 = time_linear(torch.float32, device)
        bf16 = time_linear(torch.bfloat16, device, repeats=1)
        if bf16 < 2 * PAYS * fp32:  # a close call: time it properly
            bf16 = min(bf16, time_linear(torch.bfloat16, device))
        _speedups[str(device)] = fp32 / bf16
    return _speedups[str(device)]


def compute_dtype(dtype: DtypeLike = "auto", device="cpu") -> torch.dtype:
    """The dtype of the matrix products: "auto" -> bf16 where `bf16_speedup(device)` >= PAYS, else
    fp32; a torch dtype (float32, bfloat16, float16) or its name ("float32", "bf16", ...) as given."""
    if dtype == "auto":
        return torch.bfloat16 if bf16_speedup(device) >= PAYS else torch.float32
    if isinstance(dtype, str) and dtype in NAMES:
        return NAMES[dtype]
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    raise ConfigError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")


# -------------------------------------------------------------------------------------------------
# Where massive activations are born, and which blocks move them afterwards

BIRTH = 20.0  # a layer that grows some token's peak |x| more than this much: a birth
CHANGE = 0.05  # after the last birth, a block that moves a born token's peak by more than 5 %
CALIBRATION = (2, 32)  # random token sequences x tokens


def _peaks(decoder: nn.Module, ids: torch.Tensor) -> list[tuple]:
    """Per layer, each token's peak |x| (B, T) entering it, after its attention, and leaving it."""
    seen = []

    def peak(tensor):
        seen.append(tensor.abs().amax(-1))

    def entering(module, inputs):
        peak(inputs[0])

    hooks = []
    for layer in decoder.layers:
        hooks.append(layer.register_forward_pre_hook(entering))
        # the residual stream after attention is what post_attention_layernorm reads
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(entering))
        hooks.append(layer.register_forward_hook(lambda module, inputs, output: peak(output)))
    try:
        decoder(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return [tuple(seen[3 * i:3 * i + 3]) for i in range(len(decoder.layers))]


def _largest(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


@torch.no_grad()
def fp32_blocks(model: nn.Module) -> list[str]:
    """The blocks ("layers.3.self_attn", "layers.3.mlp") that stay fp32 when the rest runs in bf16:
    every block up to the last layer where massive activations are born, and after it each block
    that moves a born token's peak by more than CHANGE. [] for a model without massive activations.

    Measured in fp32 on CALIBRATION random token ids (seed 0), with bidirectional and with causal
    attention (the same weights fire differently in each). Layer 0 compares with the embeddings.
    """
    decoder = decoder_of(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(decoder.config.vocab_size, CALIBRATION, generator=g)
    ids = ids.to(decoder.embed_tokens.weight.device)  # (B, T)
    was_causal, was_training = decoder.causal, decoder.training
    runs = []
    try:
        decoder.eval()
        for causal in (False, True):
            runs.append(_peaks(decoder.set_causal(causal), ids))
    finally:
        decoder.set_causal(was_causal).train(was_training)
    births = [i for run in runs for i, (start, _, end) in enumerate(run)
              if float((end / start).max()) > BIRTH]
    if not births:
        return []
    last = max(births)
    keep = [f"layers.{i}.{block}" for i in range(last + 1) for block in ("self_attn", "mlp")]
    for i in range(last + 1, len(decoder.layers)):
        moves = {"self_attn": 0.0, "mlp": 0.0}
        for run in runs:
            born = run[last][2] / run[last][0] > BIRTH  # (B, T): the tokens born there
            start, middle, end = run[i]
            moves["self_attn"] = max(moves["self_attn"], _largest((middle / start - 1)[born]))
            moves["mlp"] = max(moves["mlp"], _largest((end / middle - 1)[born]))
        keep += [f"layers.{i}.{block}" for block, move in moves.items() if move > CHANGE]
    return keep


# -------------------------------------------------------------------------------------------------
# Low-precision projections

# (block, the projections that read the same input, the one that writes back to the residual stream)
BLOCKS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj"),
          ("mlp", ("gate_proj", "up_proj"), "down_proj"))


def low_copy(owner: nn.Module, weight: torch.Tensor, dtype: torch.dtype, parts=None) -> torch.Tensor:
    """`weight` in `dtype`, made once and kept on `owner`; made again when the weight (or one of the
    `parts` it is stacked from) has changed in place, or moved."""
    parts = (weight,) if parts is None else parts
    key = (dtype, weight.data_ptr(), tuple(weight.shape)) + tuple((p.data_ptr(), p._version) for p in parts)
    cached = owner.__dict__.get("_low_copy")
    if cached is None or cached[0] != key:
        with torch.inference_mode(False):  # made inside encode's inference_mode, usable in training
            cached = (key, weight.detach().to(dtype))
        owner.__dict__["_low_copy"] = cached  # a plain attribute: not a parameter, not saved
    return cached[1]


def _linear(linear: nn.Linear, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """One projection in `dtype`: (..., in) in any dtype -> (..., out) in `dtype`."""
    x = x.to(dtype)
    weight = low_copy(linear, linear.weight, dtype)
    if isinstance(linear, LoRALinear) and not linear.merged:  # the A and B casts keep their gradient
        return lora_linear(x, weight, linear.lora_A.weight.to(dtype), linear.lora_B.weight.to(dtype),
                           linear.lora_dropout.p, linear.scaling, linear.training)
    return F.linear(x, weight)


def _linear_to_fp32(linear: nn.Linear, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """o_proj and down_proj: the result goes back into the fp32 residual stream."""
    return _linear(linear, dtype, x).float()


def _project(block: nn.Module, names: tuple, dtype: torch.dtype, out: Optional[torch.dtype],
             previous, x: torch.Tensor) -> list[torch.Tensor]:
    """q/k/v (out fp32, for attention) or gate/up (out None: kept in `dtype` for SwiGLU and
    down_proj) in `dtype`: as one product from the stacked weight where `ops.fuse_projections` made
    one and no gradient is needed, else one projection at a time. `previous` is the block's own
    `project` before this one (fuse_projections'), kept only so that float32 can put it back.
    x: (..., hidden) -> one (..., out_i) per projection."""
    linears = [getattr(block, name) for name in names]
    weight = None if torch.is_grad_enabled() else stacked_weight(linears)
    if weight is None:
        return [_linear(linear, dtype, x).to(out or dtype) for linear in linears]
    parts = [linear.weight for linear in linears]
    y = F.linear(x.to(dtype), low_copy(block, weight, dtype, parts)).to(out or dtype)  # (..., sum of out_i)
    return list(y.split([p.shape[0] for p in parts], dim=-1))  # one cast, then views


def _ours(fn) -> bool:
    return isinstance(fn, partial) and fn.func in (_linear_to_fp32, _project)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype, keep_fp32: Optional[list] = None) -> list[str]:
    """Run the projections of every attention and MLP block in `dtype` (16-bit), except the blocks
    named in keep_fp32, and keep everything else in fp32; float32 removes every change this function
    made. Returns the blocks that compute in fp32 ("layers.0.self_attn", "layers.0.mlp", ...).

    keep_fp32 None: measured by `fp32_blocks`. Call it again after changing the model's layers (adding
    LoRA) so that the new ones are covered.
    """
    decoder = decoder_of(model)
    for layer in decoder.layers:  # first undo what an earlier call did
        for block_name, names, single in BLOCKS:
            block = getattr(layer, block_name)
            project = block.__dict__.get("project")
            if _ours(project):
                if project.args[-1] is None:
                    del block.project
                else:
                    block.project = project.args[-1]  # what was there before (ops.fuse_projections')
            linear = getattr(block, single)
            if _ours(linear.__dict__.get("forward")):
                del linear.forward
            for owner in [block, linear] + [getattr(block, name) for name in names]:
                owner.__dict__.pop("_low_copy", None)
    every = [f"layers.{i}.{name}" for i in range(len(decoder.layers)) for name, _, _ in BLOCKS]
    if dtype == torch.float32:
        return every
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"compute dtype must be float32, bfloat16 or float16, got {dtype}")
    keep_fp32 = fp32_blocks(model) if keep_fp32 is None else list(keep_fp32)
    for i, layer in enumerate(decoder.layers):
        for (block_name, names, single), out in zip(BLOCKS, (torch.float32, None)):
            if f"layers.{i}.{block_name}" in keep_fp32:
                continue
            block = getattr(layer, block_name)
            block.project = partial(_project, block, names, dtype, out, block.__dict__.get("project"))
            linear = getattr(block, single)
            linear.forward = partial(_linear_to_fp32, linear, dtype)
    return [name for name in every if name in keep_fp32]
