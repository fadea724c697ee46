"""The exercises of the teaching kit: what a student writes, where it is taught, what it mirrors.

Each exercise is one function (or one small class, or for e12 three small functions) that a student
writes in their own file, given the signature and the docstring that `reference.py` holds. The
package is the reference solution: `mirrors` names the package code each exercise re-creates, and
`reference.py` answers each exercise by calling that code.

    id   what the student writes                      taught in
    e01  rms_norm                                     tutorial 01, section 1
    e02  apply_rope (rotate-half layout)              tutorial 01, section 2
    e03  build_attention_mask (causal switch, pads)   tutorial 02, section 1
    e04  attention (grouped-query, no SDPA)           tutorial 01, section 3
    e05  swiglu                                       tutorial 01, section 4
    e06  mntp_mask (20 %, 80/10/10, no specials)      tutorial 06, sections 1-2
    e07  mntp_loss (the i - 1 shift)                  tutorial 06, section 3
    e08  LoRALinear (forward, merge, unmerge)         tutorial 05, sections 1-3
    e09  contrastive_loss (SimCSE, hard negatives)    tutorial 07, section 2
    e10  pool (mean, weighted mean, eos/last, bos)    tutorial 04, section 1
    e11  load_safetensors                             tutorial 03, section 1
    e12  dequantize_q8_0, dequantize_q4_1,            tutorial 03, sections 2-3 (a stretch goal)
         unpermute_qk
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Exercise:
    id: str  # "e01" ... "e12": the check's name, the pytest marker, the grade table's column
    title: str  # a few words for the tables
    names: tuple  # the functions (or the class) the student writes, as named in the stub
    tutorial: str  # where the idea is taught: "tutorials/01_llama_from_scratch, section 1"
    mirrors: tuple  # the package code it re-creates (the reference solution)
    stretch: bool = False  # beyond the core course


EXERCISES = (
    Exercise("e01", "RMSNorm", ("rms_norm",), "tutorials/01_llama_from_scratch, section 1",
             ("llm2vec_mini.model.RMSNorm",)),
    Exercise("e02", "RoPE, rotate-half", ("apply_rope",), "tutorials/01_llama_from_scratch, section 2",
             ("llm2vec_mini.model.rope", "llm2vec_mini.model.apply_rope")),
    Exercise("e03", "attention mask", ("build_attention_mask",),
             "tutorials/02_bidirectional_attention, section 1",
             ("llm2vec_mini.model.build_attention_mask",)),
    Exercise("e04", "grouped-query attention", ("attention",), "tutorials/01_llama_from_scratch, section 3",
             ("llm2vec_mini.ops.attention",)),
    Exercise("e05", "SwiGLU MLP", ("swiglu",), "tutorials/01_llama_from_scratch, section 4",
             ("llm2vec_mini.model.LlamaMLP", "llm2vec_mini.ops.silu_mul")),
    Exercise("e06", "MNTP masking", ("mntp_mask",), "tutorials/06_mntp, sections 1 and 2",
             ("llm2vec_mini.mntp.MNTPCollator",)),
    Exercise("e07", "MNTP loss", ("mntp_loss",), "tutorials/06_mntp, section 3",
             ("llm2vec_mini.mntp.mntp_loss", "llm2vec_mini.mntp.mntp_loss_full")),
    Exercise("e08", "LoRA layer", ("LoRALinear",), "tutorials/05_lora, sections 1 to 3",
             ("llm2vec_mini.lora.LoRALinear",)),
    Exercise("e09", "SimCSE losses", ("contrastive_loss",), "tutorials/07_simcse, section 2",
             ("llm2vec_mini.simcse.contrastive_loss", "llm2vec_mini.simcse.unsup_simcse_loss",
              "llm2vec_mini.simcse.supervised_loss")),
    Exercise("e10", "pooling", ("pool",), "tutorials/04_pooling_and_encoding, section 1",
             ("llm2vec_mini.pooling.pool",)),
    Exercise("e11", "safetensors reader", ("load_safetensors",),
             "tutorials/03_loading_real_weights, section 1", ("llm2vec_mini.convert.safetensors.load_file",)),
    Exercise("e12", "GGUF Q8_0/Q4_1, Q/K order", ("dequantize_q8_0", "dequantize_q4_1", "unpermute_qk"),
             "tutorials/03_loading_real_weights, sections 2 and 3",
             ("llm2vec_mini.convert.gguf.dequantize", "llm2vec_mini.convert.gguf.unpermute_qk"),
             stretch=True),
)

BY_ID = {e.id: e for e in EXERCISES}


def select(ids=None) -> list:
    """The exercises with these ids ("e03" or "3"), in course order; all of them for None or []."""
    if not ids:
        return list(EXERCISES)
    chosen = set()
    for given in ids:
        eid = given if given.startswith("e") else f"e{int(given):02d}" if given.isdigit() else given
        if eid not in BY_ID:
            raise ConfigError(f"unknown exercise {given!r}; the exercises are {', '.join(BY_ID)}")
        chosen.add(eid)
    return [e for e in EXERCISES if e.id in chosen]
