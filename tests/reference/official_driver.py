"""Run the official llm2vec 0.2.3 library; executed by `.venv-ref/bin/python`, never imported by pytest.

The reference tier's tests (under .venv) call this script in a subprocess, because the official
library needs transformers 4.44 and peft 0.13, which live in their own venv (.venv-ref). Every
command reads one JSON request file and writes its results to the paths the request names; a
request {"jobs": [request, ...]} runs several in one process (importing transformers takes seconds):

    make-fixture  a tiny random Llama in the layout of the official checkpoints on the Hub:
                  base/ (LlamaForCausalLM + tokenizer), mntp/ (config.json, tokenizer and a LoRA
                  adapter of the bidirectional model, like McGill-NLP/LLM2Vec-*-mntp) and simcse/
                  (a second adapter written by `LLM2Vec.save`, like McGill-NLP/LLM2Vec-*-simcse)
    encode        `LLM2Vec.from_pretrained(...)` then `encode(texts)` -> .npy, plus the official
                  tokenisation of each batch (sorted order, input_ids, attention_mask, embed_mask)
    pool          the official `LLM2Vec.get_pooling` on given hidden states and masks -> .npy
    loss          the official `HardNegativeNLLLoss` value and gradients -> .npz
    mntp-loss     the official `LlamaBiForMNTP` loss (and logits) on given ids/labels -> .npz

Usage: official_driver.py COMMAND REQUEST.json
"""

import json
import os
import shutil
import sys
import types

import numpy as np
import torch

torch.set_num_threads(1)  # tiny models: a second thread only waits on the busy shared cores
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no legacy-tokenizer or cache warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_LORA_TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _copy_tokenizer(src, dst):
    for name in _TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def _randomize_lora(model, seed, std):
    """PEFT starts lora_B at zero (the adapter is then a no-op); give A and B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _lora_config(r):
    from peft import LoraConfig
    # the settings of the official experiments/run_mntp.py and run_simcse.py `initialize_peft`
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=_LORA_TARGETS, lora_dropout=0.05,
                      bias="none", task_type=None)


def make_fixture(req):
    from llm2vec import LLM2Vec
    from llm2vec.models import LlamaBiModel
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out = req["out"]
    base, mntp, simcse = (os.path.join(out, d) for d in ("base", "mntp", "simcse"))
    for d in (base, mntp, simcse):
        os.makedirs(d, exist_ok=True)

    torch.manual_seed(req.get("seed", 0))
    config = LlamaConfig(**req["config"])
    LlamaForCausalLM(config).save_pretrained(base, safe_serialization=True)
    _copy_tokenizer(req["tokenizer_dir"], base)

    # MNTP: the adapter of the bidirectional model (LlamaBiModel), saved next to config.json and
    # the tokenizer, as on the Hub; adapter_config.json's base_model_name_or_path is `base`.
    bi = LlamaBiModel.from_pretrained(base)
    bi = get_peft_model(bi, _lora_config(req.get("lora_r", 4)))
    _randomize_lora(bi, req.get("seed", 0) + 1, req.get("lora_std", 0.05))
    bi.save_pretrained(mntp)
    shutil.copy(os.path.join(base, "config.json"), os.path.join(mntp, "config.json"))
    _copy_tokenizer(base, mntp)

    # SimCSE: a second adapter trained on top of the merged MNTP model, saved by LLM2Vec.save.
    l2v = LLM2Vec.from_pretrained(mntp, enable_bidirectional=True, pooling_mode="mean")
    l2v.model = get_peft_model(l2v.model, _lora_config(req.get("lora_r", 4)))
    _randomize_lora(l2v.model, req.get("seed", 0) + 2, req.get("lora_std", 0.05))
    l2v.save(simcse)
    json.dump({"base": base, "mntp": mntp, "simcse": simcse}, open(req["result"], "w"))


def _load(req):
    from llm2vec import LLM2Vec
    kwargs = {k: req[k] for k in ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
              if k in req}
    return LLM2Vec.from_pretrained(req["base"], peft_model_name_or_path=req.get("peft"),
                                   merge_peft=req.get("merge_peft", False),
                                   enable_bidirectional=req.get("enable_bidirectional", True),
                                   **kwargs)


def encode(req):
    l2v = _load(req)
    texts = [t if isinstance(t, str) else list(t) for t in req["texts"]]
    batch_size = req.get("batch_size", 32)

    # Record the official tokenisation of each batch, in the order encode() runs them.
    batches = []
    original_tokenize = l2v.tokenize

    def recording_tokenize(prepared):
        features = original_tokenize(prepared)
        batches.append({"texts": list(prepared),
                        **{k: features[k].tolist() for k in ("input_ids", "attention_mask", "embed_mask")}})
        return features

    l2v.tokenize = recording_tokenize
    emb = l2v.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                     device="cpu")
    np.save(req["out"], np.asarray(emb, dtype=np.float32))
    info = {"pooling_mode": l2v.pooling_mode, "max_length": l2v.max_length,
            "doc_max_length": l2v.doc_max_length, "skip_instruction": l2v.skip_instruction,
            "model_class": type(l2v.model).__name__,
            "attn_implementation": l2v.model.config._attn_implementation,
            "pad_token_id": l2v.tokenizer.pad_token_id, "padding_side": l2v.tokenizer.padding_side,
            "batches": batches}
    json.dump(info, open(req["result"], "w"))


def pool(req):
    from llm2vec import LLM2Vec
    l2v = LLM2Vec.__new__(LLM2Vec)
    torch.nn.Module.__init__(l2v)
    l2v.tokenizer = types.SimpleNamespace(padding_side="left", bos_token_id=req.get("bos_token_id", 1))
    l2v.pooling_mode = req["mode"]
    l2v.skip_instruction = req.get("skip_instruction", True)
    arrays = np.load(req["inputs"])
    features = {k: torch.from_numpy(arrays[k]) for k in ("input_ids", "attention_mask", "embed_mask")}
    out = l2v.get_pooling(features, torch.from_numpy(arrays["hidden"]))
    np.save(req["out"], out.numpy())


def loss(req):
    from llm2vec.loss.utils import load_loss
    arrays = np.load(req["inputs"])
    q = torch.from_numpy(arrays["q"]).requires_grad_(True)
    d = torch.from_numpy(arrays["d"]).requires_grad_(True)
    neg = torch.from_numpy(arrays["neg"]).requires_grad_(True) if "neg" in arrays else None
    fn = load_loss("HardNegativeNLLLoss", scale=req.get("scale", 50.0))
    value = fn(q, d, neg)
    value.backward()
    grads = {"grad_q": q.grad.numpy(), "grad_d": d.grad.numpy()}
    if neg is not None:
        grads["grad_neg"] = neg.grad.numpy()
    np.savez(req["out"], loss=value.detach().numpy(), **grads)


def mntp_loss(req):
    from llm2vec.models import LlamaBiForMNTP
    from peft import PeftModel
    model = LlamaBiForMNTP.from_pretrained(req["base"])
    if req.get("adapter"):
        model.model = PeftModel.from_pretrained(model.model, req["adapter"])
    model.eval()
    arrays = np.load(req["inputs"])
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(arrays["input_ids"]),
                    attention_mask=torch.from_numpy(arrays["attention_mask"]),
                    labels=torch.from_numpy(arrays["labels"]))
    np.savez(req["out"], loss=out.loss.numpy(), logits=out.logits.numpy())


COMMANDS = {"make-fixture": make_fixture, "encode": encode, "pool": pool, "loss": loss,
            "mntp-loss": mntp_loss}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(COMMANDS)}}} REQUEST.json")
    with open(sys.argv[2]) as f:
        request = json.load(f)
    for job in request["jobs"] if "jobs" in request else [request]:
        COMMANDS[sys.argv[1]](job)
