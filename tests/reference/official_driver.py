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
    peft-merge    peft's `PeftModel.from_pretrained(LlamaBiModel, adapter).merge_and_unload()` -> the
                  merged weights (.safetensors)
    train-mntp    the official MNTP training (experiments/run_mntp.py): `LlamaBiForMNTP`, peft on the
                  inner model, transformers' Trainer with its defaults, on given masked batches
    train-simcse  the official SimCSE training (experiments/run_simcse.py): `LLM2Vec` with the MNTP
                  adapter merged, a fresh peft adapter, `HardNegativeNLLLoss`, on given batches

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


def _lora_config(r, alpha=None, dropout=0.05):
    from peft import LoraConfig
    # the settings of the official experiments/run_mntp.py and run_simcse.py `initialize_peft`
    return LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, target_modules=_LORA_TARGETS,
                      lora_dropout=dropout, bias="none", task_type=None)


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


def peft_merge(req):
    from llm2vec.models import LlamaBiModel
    from peft import PeftModel
    from safetensors.torch import save_file
    model = LlamaBiModel.from_pretrained(req["base"], torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, req["adapter"]).merge_and_unload()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, req["out"])


# --- training: transformers' Trainer with peft and the official classes ----------------------------
# The request gives the batches (our collator's output, in the order our trainer used them), the
# adapter's initial values (an adapter folder), and the few settings the official configs set: lr,
# batch, accumulation, steps, seed. Everything else is a TrainingArguments default, as in the official
# runs (AdamW torch, betas (0.9, 0.999), eps 1e-8, weight decay 0, clipping at 1.0, linear decay, no
# warm-up). The one departure: batches come in the given order (a sequential sampler instead of the
# Trainer's random one), so that both sides see the same data.


def _set_initial_lora(peft_model, adapter_dir):
    """Copy an adapter's values into a fresh peft model (keys as peft saves them, without ".default")."""
    from safetensors.torch import load_file
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    used = set()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                key = name.replace(".default", "")
                p.copy_(saved[key])
                used.add(key)
    assert used == set(saved), sorted(set(saved) ^ used)[:3]


def _trainer_class(record, compute):
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class RecordingTrainer(Trainer):
        def _get_train_sampler(self):
            return SequentialSampler(self.train_dataset)  # the given order (see above)

        def compute_loss(self, model, inputs, return_outputs=False):
            loss = compute(self, model, inputs)
            record["micro_losses"].append(loss.item())
            record["lrs"].append(self._get_learning_rate())  # the lr of this optimizer step
            return loss

    return RecordingTrainer


def _train(model, trainable_root, dataset, collate, compute, req):
    """Run transformers' Trainer on `dataset` (one micro-batch per item) and report what it did."""
    from transformers import TrainerCallback, TrainingArguments

    class StopAfter(TrainerCallback):  # the official scripts' stop_after_n_steps
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= req["steps"]:
                control.should_training_stop = True

    horizon = {"max_steps": req["steps"]} if not req.get("epochs") else {"num_train_epochs": req["epochs"]}
    args = TrainingArguments(output_dir=req["work"], learning_rate=req["lr"],
                             per_device_train_batch_size=1, gradient_accumulation_steps=req["grad_accum"],
                             seed=req["seed"], use_cpu=True, report_to=[], logging_steps=1,
                             save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
                             **horizon)
    record = {"micro_losses": [], "lrs": []}
    trainer = _trainer_class(record, compute)(model=model, args=args, train_dataset=dataset,
                                              data_collator=collate,
                                              callbacks=[StopAfter()] if req.get("epochs") else [])
    trainer.train()
    opt = trainer.optimizer
    record.update(
        grad_norms=[h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        global_step=trainer.state.global_step, max_steps=trainer.state.max_steps,
        optimizer=type(getattr(opt, "optimizer", opt)).__name__,
        groups=[{k: g[k] for k in ("betas", "eps", "weight_decay")} for g in opt.param_groups],
        max_grad_norm=args.max_grad_norm, scheduler=getattr(args.lr_scheduler_type, "value", None),
        warmup=[args.warmup_steps, args.warmup_ratio],
        trainable=sorted(n for n, p in trainable_root.named_parameters() if p.requires_grad))
    return record


def train_mntp(req):
    from llm2vec.models import LlamaBiForMNTP
    from peft import get_peft_model

    lora = req["lora"]
    model = LlamaBiForMNTP.from_pretrained(req["base"], attn_implementation="sdpa", torch_dtype=torch.float32)
    # as run_mntp.py: peft on the inner bidirectional model, which leaves lm_head trainable
    model.model = get_peft_model(model.model, _lora_config(lora["r"], lora["alpha"], lora["dropout"]))
    _set_initial_lora(model.model, req["init_adapter"])
    if not req.get("train_lm_head", True):  # our recipe's setting, to compare like with like
        model.lm_head.weight.requires_grad_(False)
    arrays = np.load(req["batches"])
    dataset = [{"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones_like(torch.from_numpy(ids)),
                "labels": torch.from_numpy(labels)}  # blocks of text: no padding
               for ids, labels in zip(arrays["input_ids"], arrays["labels"])]

    def compute(trainer, model, inputs):  # the Trainer's own compute_loss: the model's loss
        return super(type(trainer), trainer).compute_loss(model, inputs)

    record = _train(model, model, dataset, lambda items: items[0], compute, req)
    model.model.save_pretrained(req["out"])  # as save_peft_model: the adapter only
    record["lm_head"] = req["out"] + "/lm_head.npy"
    np.save(record["lm_head"], model.lm_head.weight.detach().numpy())
    json.dump(record, open(req["result"], "w"))


def train_simcse(req):
    from llm2vec import LLM2Vec
    from llm2vec.loss.utils import load_loss
    from peft import get_peft_model

    lora = req["lora"]
    # as run_simcse.py: the MNTP adapter merged, attention dropout as a config override
    l2v = LLM2Vec.from_pretrained(base_model_name_or_path=req["base"], enable_bidirectional=True,
                                  peft_model_name_or_path=req["mntp"], merge_peft=True, pooling_mode="mean",
                                  max_length=req.get("max_length", 128), torch_dtype=torch.float32,
                                  attn_implementation="sdpa", attention_dropout=req["attention_dropout"])
    l2v.model = get_peft_model(l2v.model, _lora_config(lora["r"], lora["alpha"], lora["dropout"]))
    _set_initial_lora(l2v.model, req["init_adapter"])
    loss_fn = load_loss("HardNegativeNLLLoss", scale=req["scale"])
    arrays = np.load(req["batches"])
    n = len([k for k in arrays.files if k.startswith("ids_")])
    dataset = [{k: torch.from_numpy(arrays[f"{k}_{i}"]) for k in ("ids", "mask", "embed")} for i in range(n)]

    def collate(items):  # the official DefaultCollator's output: the same sentences tokenised twice
        b = items[0]
        views = [{"input_ids": b["ids"], "attention_mask": b["mask"], "embed_mask": b["embed"]}
                 for _ in range(2)]
        return views, torch.ones(len(b["ids"]))

    def compute(trainer, model, inputs):  # SimCSETrainer.compute_loss: two passes, then the loss
        features, _ = inputs
        return loss_fn(trainer.model(features[0]), trainer.model(features[1]), None)

    record = _train(l2v, l2v, dataset, collate, compute, req)
    l2v.model.save_pretrained(req["out"])
    json.dump(record, open(req["result"], "w"))


COMMANDS = {"make-fixture": make_fixture, "encode": encode, "pool": pool, "loss": loss,
            "mntp-loss": mntp_loss, "peft-merge": peft_merge, "train-mntp": train_mntp,
            "train-simcse": train_simcse}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(COMMANDS)}}} REQUEST.json")
    with open(sys.argv[2]) as f:
        request = json.load(f)
    for job in request["jobs"] if "jobs" in request else [request]:
        COMMANDS[sys.argv[1]](job)
