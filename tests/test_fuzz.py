"""Our own fuzz suite: every format we read, mutated, must load correctly or raise a typed error naming
the file; never crash, hang or run away with memory.

Seeds: a valid file of every format we read, written here for a tiny model (a Hugging Face folder with
safetensors, `.bin` and sharded weights and every JSON file beside them, GGUF files with a GPT-2 and a
SentencePiece vocabulary, a PEFT adapter and an adapter folder standing in for its model, the encoder's
settings files, STS-B/SemEval/SICK/CoNLL-U/plain-text data). Mutations, drawn from a seeded
`random.Random`: truncations, byte flips, insertions and deletions; length and count fields set to
0, -1, 2^31, 2^63, 2^64 - 1; JSON values replaced by the wrong type, deep nesting or huge numbers;
GGUF metadata of the wrong type; crafted tensors (meta, sparse, a view claiming more bytes than its
storage); and a fixed list of the failures issue 16 found (`REGRESSIONS`).

Each case runs in `fuzz_worker.py`, many cases per process, under an address-space limit and a time
limit; a case passes when it raises one of our errors naming the file, or loads and reads right (a
model encodes texts to (N, hidden) float32; a safetensors file gives the safetensors library's tensors
or is refused by both). `make test` runs one round (a few hundred cases, under a minute); `make fuzz`
runs LLM2VEC_MINI_FUZZ_ROUNDS rounds with other seeds (minutes).

Why plain seeded mutation, not Hypothesis or atheris: the cases must run in a child process with a
memory limit (a failure can be an abort in Rust or a petabyte allocation), which Hypothesis's
in-process shrinking cannot survive, and atheris needs libFuzzer instrumentation of the code under
test; the structure-aware mutations (GGUF length fields, JSON types) matter more here than coverage
feedback, and a seed and a case number reproduce any failure.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzz_worker import RESUME, resume_model_and_task

from llm2vec_mini import LlamaConfig, LlamaForCausalLM
from llm2vec_mini.convert.checks import llama_shapes
from llm2vec_mini.convert.gguf import permute_qk
from llm2vec_mini.convert.gguf_tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN
from llm2vec_mini.convert.hf import save_hf_dir
from llm2vec_mini.convert.peft import save_adapter
from llm2vec_mini.convert.safetensors import save_file
from llm2vec_mini.encoder import write_settings
from llm2vec_mini.lora import add_lora
from llm2vec_mini.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
PACKAGE = os.environ.get("LLM2VEC_MINI_FUZZ_PACKAGE", str(REPO))  # another checkout to fuzz (old code)
WORKER = Path(__file__).with_name("fuzz_worker.py")
ROUNDS = int(os.environ.get("LLM2VEC_MINI_FUZZ_ROUNDS", "1"))
WORKERS = int(os.environ.get("LLM2VEC_MINI_FUZZ_WORKERS", "2"))
BUDGET = 1 << 30  # bytes of address space a worker may map beyond its imports; the seeds need a few MB
SECONDS = 20.0  # per case; the slowest valid case takes well under a second

# -------------------------------------------------------------------------------------------------
# Seeds: a tiny Llama and its vocabularies

CORPUS = ["A man is playing a guitar.", "the cat sat on the mat", "Two dogs run on the beach.",
          "Stocks fell sharply on Monday.", "é ü ✓ 漢字 🙂 1234",
          "the quick brown fox jumps over the lazy dog"]


def gpt2_vocab():
    """A byte-level BPE of 320 tokens trained on CORPUS: (tokens in id order, merges "a b")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


def spm_vocab():
    """A SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then pieces by score."""
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz.", "▁t", "he", "▁the", "▁a", "at", "▁c", "▁cat",
              "▁s", "▁sat", "an", "▁man", "in", "ing", "▁m", "on", "▁on", "▁d", "og", "▁dog"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """Hidden 32 (a Q8_0 row is 32 weights), 2 layers, 2 query heads of 16 sharing 1 key/value head."""
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


# -------------------------------------------------------------------------------------------------
# A GGUF writer (from the spec) that remembers where every length, count and type field is

U8, I32, U32, F32, BOOL, STRING, ARRAY, U64, I64 = 0, 5, 4, 6, 7, 8, 9, 10, 11
_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


class GGUFWriter:
    """`metadata`: [(key, value type, value)], an array's value being (element type, [values]);
    `tensors`: [(name, PyTorch shape, ggml type, bytes)]. `fields` lists (offset, size, what) of
    every length, count, type and offset field written, for the mutations."""

    def __init__(self):
        self.out, self.fields = bytearray(), []

    def field(self, fmt: str, value, what: str):
        self.fields.append((len(self.out), struct.calcsize("<" + fmt), what))
        self.out += struct.pack("<" + fmt, value)

    def string(self, text: str, what: str):
        raw = text.encode("utf-8", "surrogatepass")
        self.field("Q", len(raw), f"length of {what}")
        self.out += raw

    def value(self, vtype: int, value, what: str):
        if vtype == STRING:
            self.string(value, what)
        elif vtype == ARRAY:
            etype, items = value
            self.field("I", etype, f"element type of {what}")
            self.field("Q", len(items), f"count of {what}")
            for i, item in enumerate(items[:8]):
                self.value(etype, item, f"{what}[{i}]")
            for item in items[8:]:  # the rest without recording fields (a vocabulary has hundreds)
                if etype == STRING:
                    raw = item.encode("utf-8", "surrogatepass")
                    self.out += struct.pack("<Q", len(raw)) + raw
                else:
                    self.value(etype, item, what)
        else:
            self.out += struct.pack("<" + _FMT[vtype], value)

    def write(self, metadata, tensors, alignment: int = 32) -> bytes:
        self.out += b"GGUF"
        self.field("I", 3, "version")
        self.field("Q", len(tensors), "tensor count")
        self.field("Q", len(metadata), "metadata count")
        for key, vtype, value in metadata:
            self.string(key, f"key {key}")
            self.field("I", vtype, f"type of {key}")
            self.value(vtype, value, key)
        offset, blobs = 0, []
        for name, shape, gtype, blob in tensors:
            self.string(name, f"name {name}")
            self.field("I", len(shape), f"n_dims of {name}")
            for i, d in enumerate(reversed(shape)):
                self.field("Q", d, f"ne[{i}] of {name}")
            self.field("I", gtype, f"ggml type of {name}")
            self.field("Q", offset, f"offset of {name}")
            blobs.append(blob + b"\0" * (-len(blob) % alignment))
            offset += len(blobs[-1])
        self.out += b"\0" * (-len(self.out) % alignment)
        return bytes(self.out + b"".join(blobs))


def q8_0(w: np.ndarray) -> bytes:
    """ggml's Q8_0: blocks of 32 weights as an fp16 scale d = max|w| / 127 and 32 int8 q = round(w / d)."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    q = np.round(blocks / np.where(d == 0, 1, d)).astype(np.int8)
    return b"".join(d16.tobytes() + row.tobytes() for d16, row in zip(d.astype(np.float16), q))


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_tensors(model: LlamaForCausalLM):
    """Our model's weights as llama.cpp stores them: W_q/W_k permuted, matrices Q8_0, the rest F32/F16."""
    cfg = model.config
    out = []
    for name, p in model.state_dict().items():
        w = p.detach().numpy()
        if name.startswith("model.layers."):
            layer, rest = name.split(".")[2], name.split(".", 3)[3].rsplit(".", 1)[0]
            gname = f"blk.{layer}.{GGUF_NAMES[rest]}.weight"
        else:
            gname = GGUF_NAMES[name]
        if "q_proj" in name:
            w = permute_qk(w, cfg.num_attention_heads)
        elif "k_proj" in name:
            w = permute_qk(w, cfg.num_key_value_heads)
        if w.ndim == 2 and "embed" not in name and "lm_head" not in name:
            out.append((gname, w.shape, GGML_Q8_0, q8_0(w)))
        elif "lm_head" in name:
            out.append((gname, w.shape, GGML_F16, w.astype(np.float16).tobytes()))
        else:
            out.append((gname, w.shape, GGML_F32, w.astype(np.float32).tobytes()))
    return out


def gguf_metadata(model: LlamaForCausalLM, vocab: str):
    cfg = model.config
    meta = [("general.architecture", STRING, "llama"), ("llama.block_count", U32, cfg.num_hidden_layers),
            ("llama.context_length", U32, cfg.max_position_embeddings),
            ("llama.embedding_length", U32, cfg.hidden_size),
            ("llama.feed_forward_length", U32, cfg.intermediate_size),
            ("llama.attention.head_count", U32, cfg.num_attention_heads),
            ("llama.attention.head_count_kv", U32, cfg.num_key_value_heads),
            ("llama.rope.freq_base", F32, 10000.0),
            ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5)]
    if vocab == "gpt2":
        tokens, merges = gpt2_vocab()
        types = [CONTROL if t.startswith("<|") else NORMAL for t in tokens]
        meta += [("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "smollm"),
                 ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
                 ("tokenizer.ggml.token_type", ARRAY, (I32, types)),
                 ("tokenizer.ggml.merges", ARRAY, (STRING, merges)),
                 ("tokenizer.ggml.bos_token_id", U32, 0), ("tokenizer.ggml.eos_token_id", U32, 0),
                 ("tokenizer.ggml.padding_token_id", U32, 0)]
    else:
        tokens, types, scores = spm_vocab()
        meta += [("tokenizer.ggml.model", STRING, "llama"),
                 ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
                 ("tokenizer.ggml.scores", ARRAY, (F32, scores)),
                 ("tokenizer.ggml.token_type", ARRAY, (I32, types)),
                 ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
                 ("tokenizer.ggml.unknown_token_id", U32, 0), ("tokenizer.ggml.add_bos_token", BOOL, True)]
    return meta


def write_gguf(path: Path, metadata, tensors) -> list:
    writer = GGUFWriter()
    path.write_bytes(writer.write(metadata, tensors))
    return writer.fields


# -------------------------------------------------------------------------------------------------
# The seed files

STS_PAIRS = [(5.0, "A man is playing a guitar.", "A man plays the guitar."),
             (0.5, "A cat sat on the mat.", "Stocks fell on Monday."),
             (3.2, "Two dogs run on the beach.", "Dogs are running by the sea."),
             (1.0, "é ü ✓", "漢字 🙂")]
STSB = "".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{score:.3f}\t{a}\t{b}\n"
               for i, (score, a, b) in enumerate(STS_PAIRS))
SEMEVAL_INPUT = "".join(f"{a}\t{b}\n" for _, a, b in STS_PAIRS[:3])
SEMEVAL_GOLD = "4.8\n0.2\n\n"
SICK = ("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        "1\tA man is playing a guitar.\tA man plays the guitar.\t4.5\tENTAILMENT\n"
        "2\tA cat sat.\tStocks fell.\t1.2\tNEUTRAL\n")
CONLLU = ("# sent_id = 1\n# text = The cat sat.\n1\tThe\tthe\tDET\tDT\t_\t2\tdet\t_\t_\n"
          "2\tcat\tcat\tNOUN\tNN\t_\t3\tnsubj\t_\t_\n3\tsat\tsit\tVERB\tVBD\t_\t0\troot\t_\tSpaceAfter=No\n"
          "4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_\n\n1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_\n"
          "1\tdo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_\n2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_\n"
          "3\trun\trun\tVERB\tVB\t_\t0\troot\t_\t_\n\n")
LINES = "A man is playing a guitar.\n\n  the cat sat on the mat  \r\nStocks fell.\n"


def build_seeds(root: Path) -> dict:
    """Every seed, written under `root` -> {name: seed}. A seed says what to run on it (`target`), the
    folder or file that holds its files (`home`), the format of each file to mutate (`files`), and how
    the worker loads it: the model path and adapters, where the mutated folder goes in for "{case}"."""
    from llm2vec_mini.convert.gguf import load_gguf_tokenizer

    seeds = {}
    for vocab in ("gpt2", "spm"):
        n = len(gpt2_vocab()[0]) if vocab == "gpt2" else len(spm_vocab()[0])
        model = tiny_model(n, seed=len(vocab))
        path = root / f"{vocab}.gguf"
        meta, tensors = gguf_metadata(model, vocab), gguf_tensors(model)
        fields = write_gguf(path, meta, tensors)
        seeds[f"gguf_{vocab}"] = dict(target="model", home=path, files={path.name: "gguf"},
                                      gguf=(meta, tensors, fields))

    # Hugging Face folders: the gpt2 vocabulary as tokenizer.json, the same model in four weight layouts
    tokenizer = load_gguf_tokenizer(root / "gpt2.gguf")
    model = tiny_model(tokenizer.vocab_size, seed=7)
    hf = root / "hf"
    save_hf_dir(model, tokenizer, hf)
    (hf / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                            "pad_token": "<|endoftext|>"}))
    write_settings(hf, {"pooling_mode": "mean", "max_length": 64, "doc_max_length": 48,
                        "skip_instruction": True, "bidirectional": True})
    seeds["hf_safetensors"] = dict(target="model", home=hf, files={
        "model.safetensors": "safetensors", "config.json": "json", "tokenizer.json": "json",
        "tokenizer_config.json": "json", "special_tokens_map.json": "json", "llm2vec_config.json": "json",
        "llm2vec_mini_config.json": "json"})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    layouts = {"hf_bin": {"pytorch_model.bin": names},
               "hf_sharded_safetensors": {"model-00001-of-00002.safetensors": names[:9],
                                          "model-00002-of-00002.safetensors": names[9:]},
               "hf_sharded_bin": {"pytorch_model-00001-of-00002.bin": names[::2],
                                  "pytorch_model-00002-of-00002.bin": names[1::2]}}
    for name, shards in layouts.items():
        d = root / name
        d.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(hf / f, d / f)
        files, states = {"config.json": "json"}, {}
        for fname, keys in shards.items():
            if fname.endswith(".bin"):
                states[fname] = {k: state[k] for k in keys}
                torch.save(states[fname], d / fname)
                files[fname] = "bin"
            else:
                save_file({k: state[k] for k in keys}, d / fname, metadata={"format": "pt"})
                files[fname] = "safetensors"
        if len(shards) > 1:
            index = f"{'model.safetensors' if 'safetensors' in name else 'pytorch_model.bin'}.index.json"
            weight_map = {k: fname for fname, keys in shards.items() for k in keys}
            (d / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
            files[index] = "json"
        seeds[name] = dict(target="model", home=d, files=files, states=states)

    # A PEFT adapter on that model (with settings), and an MNTP-style folder standing in for its base
    adapted = add_lora(tiny_model(tokenizer.vocab_size, seed=7), r=2, alpha=4.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    adapter = root / "adapter"
    save_adapter(adapted, adapter, base_model_name_or_path=str(hf))
    write_settings(adapter, {"pooling_mode": "weighted_mean", "max_length": 32, "doc_max_length": 16,
                             "skip_instruction": False, "bidirectional": False})
    seeds["adapter"] = dict(target="model", home=adapter, path=str(hf), adapters=["{case}"], files={
        "adapter_config.json": "json", "adapter_model.safetensors": "safetensors",
        "llm2vec_config.json": "json", "llm2vec_mini_config.json": "json"})
    mntp = root / "mntp"
    save_adapter(adapted, mntp, base_model_name_or_path=str(hf))
    seeds["mntp_as_model"] = dict(target="model", home=mntp, files={"adapter_config.json": "json"})

    # A lone safetensors file with several dtypes and an empty tensor, read by us and by the library
    lone = root / "lone.safetensors"
    save_file({"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(3), "u8": torch.arange(7, dtype=torch.uint8), "empty": torch.zeros(0, 3),
               "bool": torch.tensor([True, False])}, lone, metadata={"format": "pt"})
    seeds["safetensors"] = dict(target="safetensors", home=lone, files={lone.name: "safetensors"})
    bin_file, lone_state = root / "lone.bin", {"a": torch.randn(4, 4), "b": torch.arange(5)}
    torch.save(lone_state, bin_file)
    seeds["bin"] = dict(target="bin", home=bin_file, files={bin_file.name: "bin"},
                        states={bin_file.name: lone_state})

    # A training run stopped after its first checkpoint, to be resumed
    run = root / "run"
    _, task = resume_model_and_task()
    train(task, TrainConfig(**RESUME), run, stop_after=1)
    seeds["resume"] = dict(target="resume", home=run, copy=True, files={
        "checkpoint-1/trainer_state.json": "json", "checkpoint-1/optimizer.pt": "blob",
        "checkpoint-1/adapter_config.json": "json"})

    data = root / "data"
    (data / "semeval").mkdir(parents=True)
    texts = {"sts-dev.csv": STSB, "SICK_trial.txt": SICK, "ewt.conllu": CONLLU, "wiki.txt": LINES}
    for name, text in texts.items():
        (data / name).write_text(text, encoding="utf-8")
    (data / "semeval" / "STS.input.headlines.txt").write_text(SEMEVAL_INPUT, encoding="utf-8")
    (data / "semeval" / "STS.gs.headlines.txt").write_text(SEMEVAL_GOLD, encoding="utf-8")
    for name, target in (("sts-dev.csv", "sts"), ("SICK_trial.txt", "sts"), ("ewt.conllu", "conllu"),
                         ("wiki.txt", "lines")):
        seeds[name] = dict(target=target, home=data / name, files={name: "text"})
    seeds["semeval"] = dict(target="sts", home=data / "semeval", files={
        "STS.input.headlines.txt": "text", "STS.gs.headlines.txt": "text"})
    return seeds


# -------------------------------------------------------------------------------------------------
# Mutations: each takes the seed file's bytes (and what else it needs) and a Random, and returns
# (description, new bytes)

POWERS = [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]  # "-1" is 2**64 - 1 in a u64 field
DEEP = "__DEEP__"
WEIRD_JSON = [None, True, False, "false", "no", "", "x" * 5000, 0, -1, 1, 2**31, 2**63, 2**64 - 1, 2**64,
              -2**63, 1e308, 0.5, float("nan"), float("inf"), [], {}, [1, 2, 3], {"a": 1}, "\ud800", DEEP,
              [0] * 100_000, "<|endoftext|>", "../../etc/passwd"]


def dumps(doc) -> bytes:
    """JSON with NaN/Infinity tokens (Python reads them) and DEEP as 100,000 nested lists."""
    text = json.dumps(doc)
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000).encode("utf-8", "surrogatepass")


def json_paths(doc, limit: int = 300) -> list:
    """Paths (tuples of keys and indices) to the nodes of a JSON document, breadth first, at most `limit`."""
    out, todo = [], [((), doc)]
    while todo and len(out) < limit:
        path, node = todo.pop(0)
        out.append(path)
        if isinstance(node, dict):
            todo += [(path + (k,), v) for k, v in list(node.items())[:40]]
        elif isinstance(node, list):
            todo += [(path + (i,), v) for i, v in list(enumerate(node))[:8]]
    return out


def set_path(doc, path, value):
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def mutate_json(data: bytes, rng: random.Random):
    doc = json.loads(data)
    paths = json_paths(doc)
    path = rng.choice(paths)
    op = rng.choice(["replace", "replace", "replace", "delete", "add", "bytes"])
    if op == "replace" or (op == "delete" and not path):
        value = rng.choice(WEIRD_JSON)
        return f"{list(path)} = {str(value)[:40]}", dumps(set_path(doc, path, value))
    if op == "delete":
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        return f"delete {list(path)}", dumps(doc)
    if op == "add":
        dicts = [p for p in paths if isinstance(get_path(doc, p), dict)]
        if dicts:
            where = rng.choice(dicts)
            get_path(doc, where)["unknown_key"] = rng.choice(WEIRD_JSON)
            return f"add unknown_key at {list(where)}", dumps(doc)
    return mutate_bytes(data, rng)


def get_path(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def mutate_bytes(data: bytes, rng: random.Random):
    n = len(data)
    op = rng.choice(["truncate", "truncate", "flip", "flip", "insert", "delete", "duplicate", "fill"])
    if op == "truncate":
        cut = rng.choice([0, 1, 7, 8, n - 1, rng.randrange(n + 1)])
        return f"truncate to {cut} bytes", data[:cut]
    at = rng.randrange(n + 1)
    if op == "flip" and n:
        out = bytearray(data)
        spots = [rng.randrange(n) for _ in range(rng.choice([1, 2, 8]))]
        for i in spots:
            out[i] ^= rng.randrange(1, 256)
        return f"flip bytes {spots}", bytes(out)
    if op == "insert":
        blob = rng.choice([b"\0", b"\xff" * 9, bytes(rng.randrange(256) for _ in range(17)), b"\xed\xa0\x80"])
        return f"insert {blob[:8]!r} at {at}", data[:at] + blob + data[at:]
    if op == "delete":
        k = rng.choice([1, 8, 64])
        return f"delete {k} bytes at {at}", data[:at] + data[at + k:]
    if op == "duplicate":
        k = rng.choice([8, 64, 512])
        return f"duplicate {k} bytes at {at}", data[:at] + data[at:at + k] + data[at:]
    k = rng.choice([4, 8, 32])
    return f"fill {k} bytes at {at} with 0xff", data[:at] + b"\xff" * k + data[at + k:]


def mutate_safetensors(data: bytes, rng: random.Random):
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]

    def pack(h: dict, raw: bytes = None) -> bytes:
        text = raw if raw is not None else json.dumps(h).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + body

    op = rng.choice(["length", "length", "entry", "entry", "entry", "header", "bytes"])
    if op == "length":
        value = rng.choice(POWERS + [n - 1, n + 1, n - 8, len(data) - 8, len(data)])
        return f"header length {n} -> {value}", value.to_bytes(8, "little") + data[8:]
    tensors = [k for k in header if k != "__metadata__"]
    name = rng.choice(tensors)
    entry = header[name]
    if op == "entry":
        change = rng.choice(["shape", "shape", "dtype", "offsets", "offsets", "drop", "duplicate", "rename"])
        if change == "shape":
            entry["shape"] = rng.choice([[], [0], [2**31, 2**31], [2**64], [-1], entry["shape"][::-1],
                                         [d * 2 for d in entry["shape"]], entry["shape"] + [1]])
        elif change == "dtype":
            entry["dtype"] = rng.choice(["F16", "I64", "BOOL", "F8_E4M3", "U64", "", 5, None])
        elif change == "offsets":
            b, e = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[b + 1, e + 1], [b - 1, e - 1], [e, b], [0, 2**64 - 1],
                                                [b, e + 8], [-8, e], [b, 2**63]])
        elif change == "drop":
            del header[name]
        elif change == "rename":
            header[rng.choice(["", "__metadata__x", "a" * 300, "model.layers.999.mlp.up_proj.weight"])] = \
                header.pop(name)
        else:  # the same key twice: readers may see different tensors
            text = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(entry)}}}"
            return f"tensor {name!r} written twice", pack(header, text.encode())
        return f"tensor {name!r}: {change} -> {entry}", pack(header)
    if op == "header":
        desc, text = mutate_json(json.dumps(header).encode(), rng)
        return f"header {desc}", pack(None, text)
    return mutate_bytes(data, rng)


# GGUF values of every kind, to put where another kind is expected
WEIRD_GGUF = [(U32, 0), (U32, 1), (U32, 2**31), (U32, 2**32 - 1), (U64, 2**40), (U64, 2**62),
              (U64, 2**64 - 1), (I32, -1), (I64, -2**63), (F32, float("nan")), (F32, -1.0), (BOOL, True),
              (STRING, ""),
              (STRING, "x"), (STRING, "false"), (ARRAY, (STRING, [])), (ARRAY, (STRING, ["a", "b"])),
              (ARRAY, (U32, [1, 2, 3])), (ARRAY, (F32, [0.5])), (ARRAY, (ARRAY, [(U8, [1])])),
              (ARRAY, (STRING, ["\ud800"])), (ARRAY, (BOOL, [True]))]


def mutate_gguf(seed: dict, rng: random.Random):
    meta, tensors, fields = seed["gguf"]
    data = Path(seed["home"]).read_bytes()
    op = rng.choice(["field", "field", "field", "meta", "meta", "meta", "drop", "tensor", "bytes"])
    if op == "field":
        offset, size, what = rng.choice(fields)
        old = int.from_bytes(data[offset:offset + size], "little")
        value = rng.choice(POWERS + [old + 1, max(old - 1, 0), old * 2]) % (1 << (8 * size))
        return f"{what}: {old} -> {value}", \
            data[:offset] + value.to_bytes(size, "little") + data[offset + size:]
    meta, tensors = [list(m) for m in meta], [list(t) for t in tensors]
    if op == "meta":
        i = rng.randrange(len(meta))
        meta[i][1:] = rng.choice(WEIRD_GGUF)
        desc = f"metadata {meta[i][0]} = {str(meta[i][2])[:40]}"
    elif op == "drop":
        if rng.random() < 0.7:
            desc = f"drop metadata {meta.pop(rng.randrange(len(meta)))[0]}"
        else:
            desc = f"drop tensor {tensors.pop(rng.randrange(len(tensors)))[0]}"
    elif op == "tensor":
        t = rng.choice(tensors)
        change = rng.choice(["shape", "type", "name"])
        if change == "shape":
            t[1] = rng.choice([(), (0,), tuple(d * 2 for d in t[1]), tuple(t[1])[::-1], (2**40, 32),
                               (1,) * 5])
        elif change == "type":
            t[2] = rng.choice([0, 1, 2, 8, 12, 16, 30, 99])
        else:
            t[0] = rng.choice(["blk.99.attn_q.weight", "blk.-1.ffn_up.weight", "rope_freqs.weight", "",
                               "blk.1.attn_q.weight", "token_embd.weight"])
        desc = f"tensor {t[0]!r} {change} -> {t[1]} {t[2]}"
    else:
        return mutate_bytes(data, rng)
    return desc, GGUFWriter().write([tuple(m) for m in meta], [tuple(t) for t in tensors])


def crafted_state(state: dict, rng: random.Random):
    """A state dict with one tensor swapped for something a weight never is (or a harmless change)."""
    state = dict(state)
    name = rng.choice(list(state))
    t = state[name]
    kinds = {
        "meta": lambda: torch.empty(t.shape, device="meta"),
        "sparse": lambda: t.to_sparse(),
        "huge view": lambda: torch.zeros(1).expand(2**20, 2**20),  # 4 TB of floats in 4 bytes
        "repeated view": lambda: t.reshape(-1)[:1].expand(t.shape),
        "int64": lambda: t.long(),
        "complex": lambda: t.to(torch.complex64),
        "bfloat16": lambda: t.bfloat16(),
        "transposed": lambda: t.t() if t.dim() == 2 else t[None],
        "nan": lambda: torch.full_like(t, float("nan"), dtype=torch.float32),
        "parameter": lambda: torch.nn.Parameter(t.clone(), requires_grad=False),
        "list": lambda: t.tolist(),
        "int": lambda: 5,
        "nested": lambda: {"weight": t},
    }
    kind = rng.choice(sorted(kinds) + ["drop", "extra", "wrap"])
    if kind == "drop":
        del state[name]
    elif kind == "extra":
        state["model.layers.2.mlp.up_proj.weight"] = t
    elif kind == "wrap":
        return "{'state_dict': ...}", {"state_dict": state}
    else:
        state[name] = kinds[kind]()
    return f"tensor {name!r}: {kind}", state


def mutate_text(data: bytes, rng: random.Random):
    text = data.decode("utf-8")
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    op = rng.choice(["field", "field", "tab", "untab", "encoding", "long", "empty", "bytes", "bytes"])
    if op == "field" and "\t" in lines[i]:
        cols = lines[i].split("\t")
        j = rng.randrange(len(cols))
        cols[j] = rng.choice(["nan", "inf", "-inf", "1e999", "-1", "", "5.0000001", "0x10", " 3 ", "١٢",
                              "_", "1-1", "0.5.5", "x" * 100_000])
        lines[i] = "\t".join(cols)
        desc = f"line {i + 1} column {j + 1} = {cols[j][:20]!r}"
    elif op == "tab":
        lines[i] += "\textra"
        desc = f"line {i + 1}: an extra column"
    elif op == "untab":
        lines[i] = lines[i].replace("\t", " ", 1)
        desc = f"line {i + 1}: one column fewer"
    elif op == "encoding":
        blob = rng.choice(["\ufeff", "\x00", "\u2028", "\r", "\x85", "\udcff"])
        lines[i] = blob + lines[i]
        desc = f"line {i + 1} starts with {blob!r}"
    elif op == "long":
        lines[i] += " word" * 200_000
        desc = f"line {i + 1}: a million characters"
    elif op == "empty":
        return "an empty file", b""
    else:
        return mutate_bytes(data, rng)
    return desc, "\n".join(lines).encode("utf-8", "surrogateescape")


# -------------------------------------------------------------------------------------------------
# Cases

class Files(dict):
    """New contents for several files of a case at once: {name: bytes, or a state dict for a .bin}."""


def case_dir(seed: dict, root: Path, case_id: int, file: str, content) -> Path:
    """A copy of the seed's home with `file` replaced by `content` (or the files of a `Files`); the
    other files are symlinks to the seed's."""
    home = Path(seed["home"])
    out = root / f"case{case_id}"
    if seed.get("copy"):  # a folder the code under test writes into: a real copy
        shutil.copytree(home, out)
        target = out
    elif home.is_dir():
        out.mkdir()
        for f in home.iterdir():
            if f.name != file and not (isinstance(content, Files) and f.name in content):
                (out / f.name).symlink_to(f)
        target = out
    else:
        out.mkdir()
        target = out / home.name
    for name, data in (content if isinstance(content, Files) else Files({file: content})).items():
        if isinstance(data, dict):
            torch.save(data, out / name)
        else:
            (out / name).write_bytes(data)
    return target


def make_case(seed: dict, root: Path, case_id: int, file: str, desc: str, content, **extra) -> dict:
    where = case_dir(seed, root, case_id, file, content)
    path = seed.get("path", str(where))
    adapters = [a.replace("{case}", str(where)) for a in seed.get("adapters", [])]
    folder = where.parent if where.is_file() else where
    return dict(id=case_id, target=extra.pop("target", seed["target"]), path=path, adapters=adapters,
                desc=f"{file}: {desc}", names=[str(folder)], work=str(folder), **extra)


def draws(fmt: str) -> int:
    return {"gguf": 40, "safetensors": 20, "bin": 12, "json": 8, "text": 12, "blob": 4}[fmt]


def generate(seeds: dict, root: Path, round_: int) -> list:
    """The cases of one round: for each file of each seed, `draws(format)` mutations."""
    rng = random.Random(f"llm2vec-mini fuzz round {round_}")
    cases = []
    for seed_name, seed in seeds.items():
        home = Path(seed["home"])
        for file, fmt in seed["files"].items():
            data = (home / file if home.is_dir() else home).read_bytes()
            for _ in range(draws(fmt) * (2 if seed_name == "safetensors" else 1)):
                extra = {}
                if fmt == "gguf":
                    desc, content = mutate_gguf(seed, rng)
                elif fmt == "safetensors":
                    desc, content = mutate_safetensors(data, rng)
                elif fmt == "json":
                    desc, content = mutate_json(data, rng)
                elif fmt == "bin":
                    desc, content = crafted_state(seed["states"][file], rng) if rng.random() < 0.6 \
                        else mutate_bytes(data, rng)
                elif fmt == "blob":
                    desc, content = mutate_bytes(data, rng)
                else:
                    desc, content = mutate_text(data, rng)
                if seed["target"] == "model" and rng.random() < 0.2:
                    extra["target"] = "cli"  # the same load, through the command line
                case_id = (round_ + 1) * 1_000_000 + len(cases)  # seeds 800_000 +, regressions 900_000 +
                cases.append(make_case(seed, root, case_id, file, desc, content, **extra))
    return cases


# The failures issue 16 found, each a fixed case: (seed, file, description, change), where
# change(seed, file) -> the file's new bytes (or a state dict for a .bin)

def _gguf(edit):
    """A change that rewrites a GGUF seed with its metadata list passed through `edit`."""
    return lambda seed, file: GGUFWriter().write(edit([tuple(m) for m in seed["gguf"][0]]), seed["gguf"][1])


def _gguf_meta(key, vtype, value):
    """Metadata `key` set to a value of type `vtype`."""
    return _gguf(lambda meta: [m for m in meta if m[0] != key] + [(key, vtype, value)])


def _gguf_without(*keys):
    return _gguf(lambda meta: [m for m in meta if m[0] not in keys])


def _json(**changes):
    """A JSON seed with top-level keys set."""
    return lambda seed, file: dumps({**json.loads((Path(seed["home"]) / file).read_text()), **changes})


def _raw(text: bytes):
    return lambda seed, file: text


def _header_one_short(seed, file):
    home = Path(seed["home"])
    data = (home / file if home.is_dir() else home).read_bytes()
    return (int.from_bytes(data[:8], "little") - 1).to_bytes(8, "little") + data[8:]


def _bin_norm(make):
    return lambda seed, file: {**seed["states"][file], "model.norm.weight": make()}


def _spm_with(tokens: list):
    """The SentencePiece GGUF with more tokens, and a model whose embedding has a row for each."""
    def change(seed, file):
        base, types, scores = spm_vocab()
        model = tiny_model(len(base) + len(tokens), seed=3)
        meta = [m for m in gguf_metadata(model, "spm") if m[0] not in
                ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")]
        meta += [("tokenizer.ggml.tokens", ARRAY, (STRING, base + tokens)),
                 ("tokenizer.ggml.scores", ARRAY, (F32, scores + [-100.0] * len(tokens))),
                 ("tokenizer.ggml.token_type", ARRAY, (I32, types + [NORMAL] * len(tokens)))]
        return GGUFWriter().write(meta, gguf_tensors(model))
    return change


def _views_of_one_float(seed, file):
    """A 4 KB .bin whose every weight is a view of one float, shaped for a model 2048 wide, and the
    config.json that asks for that model: nothing in the file justifies its 160 MB."""
    config = json.loads((Path(seed["home"]) / "config.json").read_text())
    config.update(hidden_size=2048, intermediate_size=4096, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=1024)
    shapes = llama_shapes(LlamaConfig.from_hf_config(config))
    return Files({"config.json": json.dumps(config).encode(),
                  file: {name: torch.zeros(1).expand(shape) for name, shape in shapes.items()}})


DEEP_TEXT = ("[" * 100_000 + "]" * 100_000).encode()
LONG_TOKENS = ["a" * k for k in range(2, 1502)]  # a, aa, aaa, ...: every split of each is two tokens
TEMPLATE = {"type": "TemplateProcessing", "special_tokens": {},
            "single": [{"SpecialToken": {"id": "<nope>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]}
BIG_TOKEN = {"id": 100_000, "content": "<big>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
HF_JSON = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "llm2vec_config.json",
           "llm2vec_mini_config.json", "tokenizer.json")

REGRESSIONS = [
    # 1. deep JSON, in every JSON file we read
    *[("hf_safetensors", f, "nested 100,000 deep", _raw(DEEP_TEXT)) for f in HF_JSON],
    ("hf_sharded_safetensors", "model.safetensors.index.json", "nested 100,000 deep", _raw(DEEP_TEXT)),
    ("adapter", "adapter_config.json", "nested 100,000 deep",
     _raw(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)),
    ("hf_safetensors", "config.json", "vocab_size nested 900 deep (parses; repr would overflow)",
     _json(vocab_size=json.loads("[" * 900 + "]" * 900))),
    # 2. sizes in the config that the file does not hold
    ("gguf_gpt2", "gpt2.gguf", "embedding_length 2^40", _gguf_meta("llama.embedding_length", U64, 2**40)),
    ("gguf_gpt2", "gpt2.gguf", "feed_forward_length 2^30",
     _gguf_meta("llama.feed_forward_length", U32, 2**30)),
    ("gguf_gpt2", "gpt2.gguf", "block_count 100,000", _gguf_meta("llama.block_count", U32, 100_000)),
    ("gguf_spm", "spm.gguf", "vocab_size 2^62", _gguf_meta("llama.vocab_size", U64, 2**62)),
    ("gguf_spm", "spm.gguf", "vocab_size 2^64 - 1", _gguf_meta("llama.vocab_size", U64, 2**64 - 1)),
    ("hf_safetensors", "config.json", "num_hidden_layers 100,000", _json(num_hidden_layers=100_000)),
    ("hf_bin", "config.json", "intermediate_size 2^30", _json(intermediate_size=2**30)),
    ("hf_safetensors", "config.json", "vocab_size 2^62", _json(vocab_size=2**62)),
    ("hf_safetensors", "config.json", "vocab_size 2^64", _json(vocab_size=2**64)),
    ("hf_safetensors", "config.json", "hidden_size 2^40", _json(hidden_size=2**40)),
    # 3. GGUF tokenizer metadata of the wrong type
    ("gguf_gpt2", "gpt2.gguf", "tokens: an integer", _gguf_meta("tokenizer.ggml.tokens", U32, 7)),
    ("gguf_gpt2", "gpt2.gguf", "tokens: a string", _gguf_meta("tokenizer.ggml.tokens", STRING, "abc")),
    ("gguf_gpt2", "gpt2.gguf", "tokens: numbers", _gguf_meta("tokenizer.ggml.tokens", ARRAY, (U32, [1, 2]))),
    ("gguf_gpt2", "gpt2.gguf", "token_type: strings",
     _gguf_meta("tokenizer.ggml.token_type", ARRAY, (STRING, ["1"] * len(gpt2_vocab()[0])))),
    ("gguf_gpt2", "gpt2.gguf", "merges: numbers", _gguf_meta("tokenizer.ggml.merges", ARRAY, (U32, [1, 2]))),
    ("gguf_gpt2", "gpt2.gguf", "merges: a string", _gguf_meta("tokenizer.ggml.merges", STRING, "a b")),
    ("gguf_gpt2", "gpt2.gguf", "pre: an array", _gguf_meta("tokenizer.ggml.pre", ARRAY, (STRING, ["gpt-2"]))),
    ("gguf_spm", "spm.gguf", "scores: strings",
     _gguf_meta("tokenizer.ggml.scores", ARRAY, (STRING, ["1"] * len(spm_vocab()[0])))),
    # 4. very long tokens in a SentencePiece vocabulary: one loads (fast), a crafted many are refused
    ("gguf_spm", "spm.gguf", "one token of 2,000,000 characters", _spm_with(["▁" + "a" * 2_000_000]), "ok"),
    ("gguf_spm", "spm.gguf", "1,500 tokens a, aa, aaa, ...", _spm_with(LONG_TOKENS)),
    # 5. a tokenizer with more ids than the model's vocabulary
    ("hf_safetensors", "tokenizer.json", "an added token with id 100,000",
     lambda seed, f: dumps((lambda d: {**d, "added_tokens": d["added_tokens"] + [BIG_TOKEN]})(
         json.loads((Path(seed["home"]) / f).read_text())))),
    # 6. settings that make `tokenizers` panic or abort the process
    ("hf_safetensors", "tokenizer.json", "padding Fixed 2^40", _json(padding={
        "strategy": {"Fixed": 2**40}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
        "pad_type_id": 0, "pad_token": "<|endoftext|>"})),
    ("hf_safetensors", "tokenizer.json", "truncation stride above max_length", _json(truncation={
        "direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 10})),
    ("hf_safetensors", "tokenizer.json", "a post-processor naming an unknown special token",
     _json(post_processor=TEMPLATE)),
    # 7. .bin tensors that are no weights
    ("hf_bin", "pytorch_model.bin", "a meta tensor", _bin_norm(lambda: torch.empty(32, device="meta"))),
    ("hf_bin", "pytorch_model.bin", "a sparse tensor", _bin_norm(lambda: torch.ones(32).to_sparse())),
    ("hf_bin", "pytorch_model.bin", "views of one float claiming a model 2048 wide", _views_of_one_float),
    # 8. adapter folders naming themselves or each other as their base (the folders are made below)
    ("mntp_as_model", "adapter_config.json", "base_model_name_or_path: itself, and each other",
     _raw(b"SELF")),
    # 9. settings of the wrong type
    ("hf_safetensors", "llm2vec_mini_config.json", '"bidirectional": "false"',
     _raw(b'{"bidirectional": "false"}')),
    ("hf_safetensors", "llm2vec_config.json", '"skip_instruction": "no"', _json(skip_instruction="no")),
    ("hf_safetensors", "llm2vec_config.json", '"max_length": true', _json(max_length=True)),
    # 10. token ids that are booleans
    *[("hf_safetensors", "config.json", f"{k}: true", _json(**{k: True}))
      for k in ("bos_token_id", "eos_token_id", "pad_token_id")],
    # 11. a GGUF without an eos or pad token to pad with
    ("gguf_gpt2", "gpt2.gguf", "no eos or padding token id",
     _gguf_without("tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")),
    # and a safetensors header length one byte short (the header ends in padding)
    ("safetensors", "lone.safetensors", "header length one short", _header_one_short),
    ("hf_safetensors", "model.safetensors", "header length one short", _header_one_short),
]


def regression_cases(seeds: dict, root: Path) -> list:
    """The cases of REGRESSIONS; each says what it expects ("error" unless the entry says "ok")."""
    cases = []
    for i, (seed_name, file, desc, change, *expect) in enumerate(REGRESSIONS):
        seed = seeds[seed_name]
        content = change(seed, file)
        if content != b"SELF":
            expected = expect[0] if expect else "error"
            cases.append(make_case(seed, root, 900_000 + i, file, desc, content, expect=expected))
            continue
        # an adapter folder whose base is itself; then two folders naming each other
        config = json.loads((Path(seed["home"]) / file).read_text())
        itself = make_case(seed, root, 900_000 + i, file, "base: itself", b"", expect="error")
        twin = make_case(seed, root, 950_000 + i, file, "base: each other", b"", expect="error")
        other = root / f"case{950_000 + i}-other"
        shutil.copytree(seed["home"], other)
        for folder, base in ((itself["path"], itself["path"]), (twin["path"], str(other)),
                             (str(other), twin["path"])):
            (Path(folder) / file).write_text(json.dumps({**config, "base_model_name_or_path": base}))
        cases += [itself, twin]
    return cases


# -------------------------------------------------------------------------------------------------
# Running cases: many per worker process, restarted after a case that kills it or hangs

def run_cases(cases: list, workers: int = WORKERS) -> dict:
    """{case id: {"outcome", "detail"}} for every case, split over `workers` processes at once."""
    chunks = [cases[i::workers] for i in range(workers)]
    results, threads = {}, []
    for chunk in chunks:
        threads.append(threading.Thread(target=lambda c=chunk: results.update(_run_chunk(c))))
        threads[-1].start()
    for t in threads:
        t.join()
    return results


def _run_chunk(cases: list) -> dict:
    results, todo = {}, list(cases)
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    tag = f"{os.getpid()}-{threading.get_ident()}"
    cases_file, log = work / f"fuzz-cases-{tag}.json", work / f"fuzz-stderr-{tag}.txt"
    env = {**os.environ, "PYTHONPATH": PACKAGE, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
           "TOKENIZERS_PARALLELISM": "false"}
    while todo:
        cases_file.write_text(json.dumps(todo))
        with open(log, "w") as stderr:  # a file, not a pipe: warnings must never fill a pipe and block
            proc = subprocess.Popen([sys.executable, str(WORKER), str(cases_file), str(BUDGET), str(SECONDS)],
                                    stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        running = None
        while True:
            try:  # the first line waits for the imports too
                line = lines.get(timeout=SECONDS + (90 if running is None else 15))
            except queue.Empty:
                line = "hang"
            if line is None or line == "hang":
                break
            try:
                message = json.loads(line)
            except ValueError:  # something in Rust or C wrote to the worker's stdout
                continue
            if not isinstance(message, dict):
                continue
            if "start" in message:
                running = message["start"]
            else:
                results[message["end"]] = {k: v for k, v in message.items() if k != "end"}
                running = None
        proc.kill()
        proc.wait()
        tail = log.read_text(errors="replace")[-1500:]
        if running is None:
            if any(c["id"] not in results for c in todo):
                raise RuntimeError(f"the fuzz worker stopped between cases: {tail}")
            break
        how = "hung" if line == "hang" else f"died (exit status {proc.returncode})"
        results[running] = {"outcome": "crash", "detail": f"the worker {how}: {tail}"}
        todo = todo[[c["id"] for c in todo].index(running) + 1:]
    cases_file.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    return results


def failures(cases: list, results: dict) -> list:
    bad = [(c, results[c["id"]]) for c in cases if results[c["id"]]["outcome"] not in ("ok", "error")]
    return [f"case {c['id']} ({c['target']} {c['desc'][:100]}): {r['outcome']}: {r.get('detail', '')[-600:]}"
            for c, r in bad]


def seed_cases(seeds: dict, root: Path) -> list:
    """Each seed unchanged: it must load and read right (else the mutations test nothing)."""
    cases = []
    for i, seed in enumerate(seeds.values()):
        home, file = Path(seed["home"]), next(iter(seed["files"]))
        data = (home / file if home.is_dir() else home).read_bytes()
        cases.append(make_case(seed, root, 800_000 + i, file, "unchanged", data, expect="ok"))
    return cases


BATCH = 2500  # cases per run of the workers; their folders are deleted after each batch


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """{group: (cases, results)} for the seeds, the regressions and each round, run in as few worker
    starts as the disk allows (a worker pays a few seconds of imports once)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "seed_files").mkdir()
    seeds = build_seeds(root / "seed_files")
    groups = {"seeds": lambda d: seed_cases(seeds, d), "regressions": lambda d: regression_cases(seeds, d)}
    groups.update({f"round {r}": (lambda d, r=r: generate(seeds, d, r)) for r in range(ROUNDS)})
    out, pending = {}, []

    def flush():
        results = run_cases([c for _, cases, _ in pending for c in cases])
        for name, cases, folder in pending:
            out[name] = (cases, {c["id"]: results[c["id"]] for c in cases})
            shutil.rmtree(folder)
        pending.clear()

    for name, make in groups.items():
        folder = root / name.replace(" ", "_")
        folder.mkdir()
        pending.append((name, make(folder), folder))
        if sum(len(cases) for _, cases, _ in pending) >= BATCH:
            flush()
    if pending:
        flush()
    return out


def test_every_seed_loads_and_reads_right(fuzzed):
    cases, results = fuzzed["seeds"]
    assert [r["outcome"] for r in results.values()] == ["ok"] * len(cases), failures(cases, results)


def test_the_failures_of_issue_16(fuzzed):
    cases, results = fuzzed["regressions"]
    assert not failures(cases, results), "\n".join(failures(cases, results))
    # each was a crash, a hang or a wrong load; now the broken files are refused, the good one loads
    unexpected = [f"{c['desc']}: {results[c['id']]['outcome']}" for c in cases
                  if results[c["id"]]["outcome"] != c["expect"]]
    assert not unexpected, unexpected


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_mutated_files_load_right_or_raise_a_typed_error_naming_the_file(fuzzed, round_):
    cases, results = fuzzed[f"round {round_}"]
    bad = failures(cases, results)
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(bad[:30])
