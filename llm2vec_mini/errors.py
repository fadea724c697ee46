"""Typed errors of llm2vec-mini.

Every error a user can provoke with a bad file, config, text or argument is one of these, and its
message names the thing at fault (the file, the tensor, the field). Catch `Llm2VecMiniError` to catch
them all. Each takes an optional `path`: the file at fault, put in front of the message.
"""


class Llm2VecMiniError(Exception):
    """Base class of every error raised on purpose by llm2vec-mini."""

    def __init__(self, message: str, path=None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ConfigError(Llm2VecMiniError, ValueError):
    """A model or training configuration is inconsistent or unsupported; the message names the field."""


class CheckpointError(Llm2VecMiniError, ValueError):
    """A weights, adapter or tokenizer file is malformed, unsafe or does not fit the model.

    The message names the file and, where there is one, the tensor with its expected and found shape.
    """


class DataError(Llm2VecMiniError, ValueError):
    """A data file (STS pairs, CoNLL-U, a text corpus) cannot be read; the message names the file and line."""


class TrainingError(Llm2VecMiniError, RuntimeError):
    """Training cannot go on (for example the loss became NaN or infinite)."""


class DownloadError(Llm2VecMiniError, RuntimeError):
    """Fetching a model or data failed; the message names the file and what was run or fetched."""
