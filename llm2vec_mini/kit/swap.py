"""Run the real model on a student's code: `kit.use(impl)` swaps their functions into the package.

    from llm2vec_mini import kit
    with kit.use("my_llm2vec.py"):        # every exercise of yours that passes its checks
        ...                              # the model, the trainers, the encoder, the loaders run on it
    swap = kit.use("my_llm2vec.py", exercises=["e01", "e04"])   # or just these, until swap.restore()

Each exercise replaces the package code it mirrors, where the package calls it, by a thin adapter to
the student's signature: `RMSNorm.forward` (e01), `model.apply_rope` (e02), `model.build_attention_mask`
(e03), the attention function `model.attention` (e04), `LlamaMLP.forward` (e05), `MNTPCollator.__call__`
(e06), `mntp.mntp_loss` and `mntp_loss_full` (e07), `LoRALinear.forward`, `merge` and `unmerge` (e08),
`simcse.contrastive_loss` (e09), `pool` in pooling, encoder and simcse (e10), `load_file` in the
safetensors and PEFT readers (e11), and the Q8_0/Q4_1 dequantisers and `unpermute_qk` of the GGUF loader
(e12). Leaving (or `restore()`) puts every one back. What an exercise does not cover still runs the
package's code, with a warning: attention with dropout (SimCSE training), LoRA dropout in training,
rank-stabilised LoRA, and MNTP's all-mask variant.

A name imported before the swap keeps the package's function (`from llm2vec_mini.model import
apply_rope` binds it once): call `kit.use` first, at the top of a notebook.

`in_model(impl)` (what `kit check --in-model` runs) compares the package's results with the swapped
ones on a tiny random Llama, and with `real=True` on SmolLM2-135M, loaded through the student's code.
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import encoder, lora, mntp, pooling, simcse
from .. import model as llama
from ..config import LlamaConfig
from ..convert import gguf, peft, safetensors
from ..convert.hf import load_pretrained
from ..errors import ConfigError
from ..hub import smollm2_path
from .exercises import select
from .reference import SOLUTION
from .run import PASSED, check, load_impl

IGNORE = -100


class Swap:
    """The patches of one `use` call; `restore()` (or leaving the `with` block) undoes them all."""

    def __init__(self, impl):
        self.impl = impl
        self.exercises = []  # the exercises swapped in
        self._saved = []  # (owner, key, old value, is a dict item)

    def set(self, owner, key, value) -> None:
        item = isinstance(owner, dict)
        self._saved.append((owner, key, owner[key] if item else getattr(owner, key), item))
        if item:
            owner[key] = value
        else:
            setattr(owner, key, value)

    def restore(self) -> None:
        for owner, key, old, item in reversed(self._saved):
            if item:
                owner[key] = old
            else:
                setattr(owner, key, old)
        self._saved.clear()

    def __enter__(self) -> "Swap":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def use(impl, exercises=None) -> Swap:
    """Swap `impl`'s exercises into the package now; returns the Swap (a context manager).

    impl: a file path, a module name, "reference", or a module. exercises: the ids to swap in; by
    default every exercise of `impl` that passes its checks (a failing one would only break the model).
    Code that is the reference's own (a submission may import it) is the package already and stays.
    """
    impl = load_impl(impl)
    if exercises is None:
        exercises = [r.exercise for r in check(impl) if r.status == PASSED]
    swap = Swap(impl)
    try:
        for exercise in select(exercises):
            if _PATCHES[exercise.id](swap, _Own(impl)):
                swap.exercises.append(exercise.id)
    except BaseException:
        swap.restore()
        raise
    return swap


class _Own:
    """The implementation's names, None for those that are the reference's own objects."""

    def __init__(self, impl):
        self._impl = impl

    def __getattr__(self, name):
        value = getattr(self._impl, name)
        return None if value is SOLUTION[name] else value


_warned = set()


def _warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        warnings.warn(text, stacklevel=3)


def _e01(swap, impl):
    rms_norm = impl.rms_norm
    if rms_norm:
        swap.set(llama.RMSNorm, "forward", lambda self, x: rms_norm(x, self.weight, self.eps))
    return bool(rms_norm)


def _e02(swap, impl):
    rope = impl.apply_rope
    if rope:
        swap.set(llama, "apply_rope", lambda q, k, cos, sin: (rope(q, cos, sin), rope(k, cos, sin)))
    return bool(rope)


def _e03(swap, impl):
    build = impl.build_attention_mask

    def build_attention_mask(attention_mask, seq_len, causal, dtype, device=None):
        mask = build(attention_mask, seq_len, causal, dtype)
        place = attention_mask.device if attention_mask is not None else device
        return mask if mask is None or place is None else mask.to(place)

    if build:
        swap.set(llama, "build_attention_mask", build_attention_mask)
    return bool(build)


def _e04(swap, impl):
    student, package = impl.attention, llama.attention

    def attention(q, k, v, mask, is_causal, dropout_p):
        if dropout_p > 0:
            _warn_once("kit.use: e04 has no dropout; with attention dropout (SimCSE training) the package's "
                       "attention runs")
            return package(q, k, v, mask, is_causal, dropout_p)
        if is_causal:  # the model passes no mask for causal attention without padding
            mask = llama.build_attention_mask(None, q.shape[2], True, q.dtype, q.device)  # e03's when swapped
        return student(q, k, v, mask)

    if student:
        swap.set(llama, "attention", attention)
    return bool(student)


def _e05(swap, impl):
    swiglu = impl.swiglu
    if swiglu:
        swap.set(llama.LlamaMLP, "forward",
                 lambda self, x: swiglu(x, self.gate_proj, self.up_proj, self.down_proj))
    return bool(swiglu)


def _e06(swap, impl):
    mntp_mask, package = impl.mntp_mask, mntp.MNTPCollator.__call__

    def call(self, input_ids, generator=None):
        if self.all_mask:
            _warn_once("kit.use: e06 has no all-mask variant; MNTPCollator(all_mask=True) runs the package's")
            return package(self, input_ids, generator)
        return mntp_mask(input_ids, self.mask_id, self.vocab_size, list(self.special_ids), self.mask_ratio,
                         generator)

    if mntp_mask:
        swap.set(mntp.MNTPCollator, "__call__", call)
    return bool(mntp_mask)


def _e07(swap, impl):
    mntp_loss = impl.mntp_loss

    def loss(hidden, labels, lm_head, n_labels=None):
        value = mntp_loss(lm_head(hidden), labels)  # the full logits, then the student's shifted loss
        if n_labels is not None:  # the trainer's global denominator: this process's share of the mean
            value = value * (labels[:, 1:] != IGNORE).sum() / n_labels.clamp(min=1)
        return value

    if mntp_loss:
        swap.set(mntp, "mntp_loss", loss)
        swap.set(mntp, "mntp_loss_full", mntp_loss)
    return bool(mntp_loss)


def _e08(swap, impl):
    student, package = impl.LoRALinear, dict(vars(lora.LoRALinear))
    if not student or issubclass(student, lora.LoRALinear):  # the package's own layer: nothing to swap
        return False

    def run(method, self, *args):
        if self.use_rslora:
            _warn_once("kit.use: e08 scales by alpha / r; rank-stabilised LoRA runs the package's layer")
            return package[method](self, *args)
        if method == "forward" and self.training and self.lora_dropout.p > 0:
            _warn_once("kit.use: e08 has no dropout; in training your LoRA layers run without LoRA dropout")
        try:
            if method == "forward":
                return getattr(student, method)(self, *args)
            with torch.no_grad():
                return getattr(student, method)(self, *args)
        except AttributeError as e:
            raise ConfigError(f"kit.use runs your LoRALinear.{method} on the package's LoRA layers, which "
                              f"have weight, lora_A, lora_B, r, alpha, scaling and merged; it read something "
                              f"else: {e}") from e

    for method in ("forward", "merge", "unmerge"):
        swap.set(lora.LoRALinear, method, lambda self, *args, m=method: run(m, self, *args))
    return True


def _e09(swap, impl):
    contrastive_loss, gather = impl.contrastive_loss, simcse.gather_with_grad

    def loss(queries, positives, negatives=None, scale=50.0):  # the global batch, as the package's
        return contrastive_loss(gather(queries), gather(positives), None if negatives is None else
                                gather(negatives), scale)

    if contrastive_loss:
        swap.set(simcse, "contrastive_loss", loss)
    return bool(contrastive_loss)


def _e10(swap, impl):
    if impl.pool:
        for module in (pooling, encoder, simcse):  # encoder and simcse imported the name
            swap.set(module, "pool", impl.pool)
    return bool(impl.pool)


def _e11(swap, impl):
    if impl.load_safetensors:
        for module in (safetensors, peft):  # the PEFT adapter reader imported the name
            swap.set(module, "load_file", impl.load_safetensors)
    return bool(impl.load_safetensors)


def _e12(swap, impl):
    def kernel(dequantize):
        def run(blocks, out):  # the loader's contract: blocks (n, bytes per block) uint8 -> out (n, 32)
            result = dequantize(np.ascontiguousarray(blocks).reshape(-1))
            out[...] = np.asarray(result, dtype=np.float32).reshape(out.shape)
        return run

    if impl.dequantize_q8_0:
        swap.set(gguf._DEQUANTISERS, 8, kernel(impl.dequantize_q8_0))  # ggml type 8: Q8_0
    if impl.dequantize_q4_1:
        swap.set(gguf._DEQUANTISERS, 3, kernel(impl.dequantize_q4_1))  # ggml type 3: Q4_1
    if impl.unpermute_qk:
        swap.set(gguf, "unpermute_qk", impl.unpermute_qk)
    return bool(impl.dequantize_q8_0 or impl.dequantize_q4_1 or impl.unpermute_qk)


_PATCHES = {f"e{i:02d}": globals()[f"_e{i:02d}"] for i in range(1, 13)}


# -------------------------------------------------------------------------------------------------
# The swap at work: package against student, on the same inputs

def _compare(name, ours, theirs, tolerance):
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    if ours.shape != theirs.shape:
        return name, False, f"shape {tuple(theirs.shape)} instead of {tuple(ours.shape)}"
    diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    ok = math.isfinite(diff) and diff <= tolerance * max(1.0, float(ours.abs().max()))
    return name, ok, f"max |package - yours| = {diff:.2g}"


def in_model(impl, exercises=None, real: bool = False) -> list:
    """[(what, ok, detail)]: the package's results against the same computation with `impl` swapped in.

    A tiny random Llama: logits with causal and bidirectional attention over a left-padded batch,
    LoRA adapters (forward, merged), an MNTP and a SimCSE loss, pooled embeddings, an adapter read
    back. With real=True also SmolLM2-135M from the cache, loaded and encoded through the swap.
    """
    impl = load_impl(impl)
    if exercises is None:
        exercises = [r.exercise for r in check(impl) if r.status == PASSED]
    with use(impl, exercises or []) as probe:
        ids = probe.exercises  # what is the student's own: the reference's code is the package already
    if not ids:
        return []
    names = " ".join(ids)
    out = []
    torch.manual_seed(0)
    config = LlamaConfig.tiny()
    model = llama.LlamaForCausalLM(config).eval()
    tokens = torch.randint(3, config.vocab_size, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3], mask[2, :8] = 0, 0  # left padding, and a row of one token
    with torch.no_grad():
        for causal in (True, False):
            model.set_causal(causal)
            for given in (None, mask):
                plain = model(tokens, given)
                with use(impl, ids):
                    swapped = model(tokens, given)
                what = f"tiny Llama logits, {'causal' if causal else 'bidirectional'}, " \
                       f"{'left padding' if given is not None else 'no padding'} ({names})"
                out.append(_compare(what, plain, swapped, 1e-4))
    adapted = lora.add_lora(copy.deepcopy(model), r=4, alpha=8.0, dropout=0.0).eval()
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():
            layer.lora_B.weight.normal_(std=0.05)
        plain = adapted(tokens, mask)
        with use(impl, ids):
            swapped = adapted(tokens, mask)
            lora.merge_lora(adapted)
            merged = adapted(tokens, mask)
            lora.unmerge_lora(adapted)
        out.append(_compare(f"tiny Llama with LoRA adapters ({names})", plain, swapped, 1e-4))
        out.append(_compare(f"tiny Llama with LoRA adapters merged ({names})", plain, merged, 1e-4))
    blocks = torch.randint(3, config.vocab_size, (4, 16))
    blocks[:, 0] = config.bos_token_id
    task = mntp.MNTPTask(model.set_causal(False), blocks, mntp.MNTPCollator(4, config.vocab_size, [1, 2]))
    batch = task.make_batch([0, 1, 2, 3], torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = task(batch)
        with use(impl, ids):
            swapped = task(batch)
            inputs, labels = task.make_batch([0, 1, 2, 3], torch.Generator().manual_seed(1))
        out.append(_compare(f"the MNTP loss of a masked batch ({names})", plain, swapped, 1e-4))
        chosen = labels != IGNORE
        sound = not chosen[:, 0].any() and torch.equal(labels[chosen], blocks[chosen]) and \
            torch.equal(inputs[~chosen], blocks[~chosen])
        out.append((f"an MNTP batch masked through the swap: bos never chosen, labels the originals "
                    f"({names})", bool(sound), f"{int(chosen.sum())} of {chosen.numel()} positions chosen"))
        sentences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
        for mode in ("mean", "last_token"):
            cse = simcse.SimCSETask(model, sentences, pad_id=2, pooling=mode, scale=20.0)
            pair = cse.make_batch([0, 1, 2], None)
            plain, plain_loss = cse.embed(*pair), cse(pair)
            with use(impl, ids):
                swapped, swapped_loss = cse.embed(*pair), cse(pair)
            out.append(_compare(f"{mode} embeddings of a left-padded batch ({names})", plain, swapped, 1e-4))
            out.append(_compare(f"the SimCSE loss on them, without dropout ({names})", plain_loss,
                                swapped_loss, 1e-4))
    with tempfile.TemporaryDirectory(prefix="kit_in_model_") as folder:
        saved = peft.save_adapter(adapted, Path(folder) / "adapter")
        with use(impl, ids):
            reloaded = peft.load_adapter(copy.deepcopy(model), saved)
        state, back = lora.lora_layers(adapted), lora.lora_layers(reloaded)
        worst = max(float((state[k].lora_B.weight - back[k].lora_B.weight).abs().max().detach())
                    for k in state)
        out.append((f"a LoRA adapter saved and read back through the swap ({names})", worst == 0.0,
                    f"max |difference| of lora_B = {worst:.2g}"))
    if real:
        out += _smollm2(impl, ids, names)
    return out


def _smollm2(impl, ids, names) -> list:
    """SmolLM2-135M from the cache, loaded and encoded by the package and through the swap."""
    path = smollm2_path()
    texts = ["A man is playing a guitar.", "Retrieve a sentence with the same meaning: Someone plays.", "Hi"]
    results = {}
    for swapped in (False, True):
        swap = use(impl, ids) if swapped else Swap(impl)
        with swap:
            model, tokenizer = load_pretrained(path)
            enc = encoder.LLM2Vec(model, tokenizer, pooling="mean", bidirectional=False, device="cpu")
            results[swapped] = enc.encode(texts, convert_to="torch")
    cos = torch.nn.functional.cosine_similarity(results[False], results[True], dim=-1)
    return [(f"SmolLM2-135M loaded and encoded through the swap ({names})", bool((cos > 1 - 1e-4).all()),
             f"cosine with the package's embeddings: {', '.join(f'{c:.6f}' for c in cos.tolist())}")]
