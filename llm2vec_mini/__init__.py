"""llm2vec-mini: LLM2Vec from scratch, to read, test and run on a laptop.

LLM2Vec (BehnamGhader et al., 2024, https://arxiv.org/abs/2404.05961) turns a decoder-only LLM into a
text encoder: 1) bidirectional attention, 2) masked next-token prediction, 3) unsupervised SimCSE,
then pooling. Heavy submodules are imported lazily, so `import llm2vec_mini` stays cheap.
"""

from .config import LlamaConfig
from .errors import CheckpointError, ConfigError, DataError, DownloadError, Llm2VecMiniError, TrainingError
from .model import LlamaForCausalLM, LlamaModel

__version__ = "0.1.0"

__all__ = ["LlamaConfig", "LlamaModel", "LlamaForCausalLM", "load_pretrained", "LLM2Vec",
           "Tokenizer", "ConfigError", "CheckpointError", "DataError", "DownloadError", "TrainingError",
           "Llm2VecMiniError"]


def __getattr__(name):
    # Lazy imports: the loaders and the encoder pull in tokenizers and the file readers.
    if name == "load_pretrained":
        from .convert.hf import load_pretrained
        return load_pretrained
    if name == "LLM2Vec":
        from .encoder import LLM2Vec
        return LLM2Vec
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'llm2vec_mini' has no attribute {name!r}")
