"""Reading evaluation and training text: STS pairs in their three common layouts, plain corpora, CoNLL-U.

LLM2Vec is judged on semantic textual similarity (STS): pairs of sentences with a human score, 0 (unrelated)
to 5 (same meaning). The pairs ship in three layouts, and `load_sts` reads all of them into `STSSubset`s:

* STS Benchmark (`sts-train.csv`, `sts-dev.csv`, `sts-test.csv`): one pair per line, tab-separated,
  `genre, filename, year, id, score, sentence1, sentence2`, and on some lines two more source fields.
  There is no CSV quoting even though sentences hold unbalanced `"`: a CSV reader mis-parses it, so we split
  each line on tabs.
* SemEval STS 2012-2016 (the years STS-B was drawn from): per test set `<set>`, a file
  `STS.input.<set>.txt` (2016: `STS2016.input.<set>.txt`) with `sentence1 \t sentence2` (2016 adds two
  source columns), and beside it `STS.gs.<set>.txt` with one gold score per line. A blank gold line means
  the pair was not scored; it is left out, as the official scorer does.
* SICK (SemEval-2014 task 1): `pair_ID, sentence_A, sentence_B, relatedness_score, entailment_judgment`,
  usually with a header line; relatedness runs from 1 to 5. The full `SICK.txt` has more columns and a
  `SemEval_set` column (TRAIN/TRIAL/TEST), which we use to split it.

Lines are split on "\n" only, never with `str.splitlines`, which also splits on characters such as U+2028
or U+0085 that can sit inside a sentence. A malformed line raises `DataError` naming the file and line.

References:
1) Cer et al., "SemEval-2017 Task 1: Semantic Textual Similarity", 2017, https://aclanthology.org/S17-2001
   (STS Benchmark, http://ixa2.si.ehu.eus/stswiki/index.php/STSbenchmark)
2) Agirre et al., "SemEval-2016 Task 1: Semantic Textual Similarity", 2016, https://aclanthology.org/S16-1081
   (and the 2012-2015 task papers, which share the STS.input/STS.gs layout)
3) Marelli et al., "SemEval-2014 Task 1" (SICK), 2014, https://aclanthology.org/S14-2001
4) CoNLL-U, Universal Dependencies, https://universaldependencies.org/format.html
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from .errors import DataError

# STS.input.MSRpar.txt, STS2016.input.x.txt
_SEMEVAL_INPUT = re.compile(r"^(STS(?:\d{4})?)\.input\.(.+)\.txt$")
_SEMEVAL_GOLD = re.compile(r"^STS(?:\d{4})?\.gs\.(.+)\.txt$")
_STSB_NAME = re.compile(r"^sts-.*\.csv$")
_FORMATS = ("auto", "stsb", "semeval", "sick")


@dataclass(frozen=True)
class STSPair:
    sentence1: str
    sentence2: str
    score: float  # the human similarity score (0-5 for STS, 1-5 for SICK)


@dataclass
class STSSubset:
    """One scored set of pairs, e.g. STS-B dev or SemEval 2016 "headlines"; three parallel lists."""

    name: str
    sentences1: List[str]
    sentences2: List[str]
    scores: List[float]

    def __post_init__(self):
        if not len(self.sentences1) == len(self.sentences2) == len(self.scores):
            raise DataError(f"STS subset {self.name!r}: {len(self.sentences1)} first sentences, "
                            f"{len(self.sentences2)} second sentences and {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def pairs(self) -> List[STSPair]:
        return [STSPair(a, b, s) for a, b, s in zip(self.sentences1, self.sentences2, self.scores)]

    @classmethod
    def from_pairs(cls, name: str, pairs) -> "STSSubset":
        pairs = list(pairs)
        return cls(name, [p.sentence1 for p in pairs], [p.sentence2 for p in pairs], [p.score for p in pairs])


# ----------------------------------------------------------------------------------------- file basics

def _read_text_lines(path: Path) -> List[str]:
    """The file's lines without their "\\n" or "\\r\\n"; a leading byte-order mark is dropped."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _score(field: str, where: str, low: float, high: float) -> float:
    try:
        value = float(field)
    except ValueError:
        raise DataError(f"{where}: score {field!r} is not a number") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise DataError(f"{where}: score {value} is outside [{low:g}, {high:g}]")
    return value


def _non_empty(subset: STSSubset, path: Path) -> STSSubset:
    if len(subset) == 0:
        raise DataError(f"{path}: no scored sentence pairs in the file")
    return subset


# ------------------------------------------------------------------------------- the three STS layouts

def read_stsb(path) -> List[STSSubset]:
    """An STS Benchmark file -> one subset named after the file (`sts-dev`)."""
    path = Path(path)
    pairs = []
    for lineno, line in enumerate(_read_text_lines(path), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")  # no quoting in this format: a tab is always a separator
        where = f"{path}, line {lineno}"
        if len(cols) not in (7, 9):
            raise DataError(f"{where}: expected 7 or 9 tab-separated columns (genre, filename, year, id, "
                            f"score, sentence1, sentence2[, source1, source2]), found {len(cols)}")
        pairs.append(STSPair(cols[5], cols[6], _score(cols[4], where, 0.0, 5.0)))
    return [_non_empty(STSSubset.from_pairs(path.stem, pairs), path)]


def _read_semeval_set(input_path: Path) -> STSSubset:
    prefix, name = _SEMEVAL_INPUT.match(input_path.name).groups()
    gold_path = input_path.with_name(f"{prefix}.gs.{name}.txt")
    if not gold_path.is_file():
        raise DataError(f"{input_path}: the gold scores {gold_path.name} are not beside it")
    inputs, golds = _read_text_lines(input_path), _read_text_lines(gold_path)
    if len(inputs) != len(golds):
        raise DataError(f"{gold_path}: {len(golds)} gold lines for {len(inputs)} sentence pairs in "
                        f"{input_path.name}")
    pairs = []
    for lineno, (line, gold) in enumerate(zip(inputs, golds), start=1):
        cols = line.split("\t")
        if len(cols) not in (2, 4):
            raise DataError(f"{input_path}, line {lineno}: expected 2 or 4 tab-separated columns (sentence1, "
                            f"sentence2[, source1, source2]), found {len(cols)}")
        if not gold.strip():
            continue  # a blank gold line: the pair was not scored
        pairs.append(STSPair(cols[0], cols[1], _score(gold.strip(), f"{gold_path}, line {lineno}", 0.0, 5.0)))
    return _non_empty(STSSubset.from_pairs(name, pairs), input_path)


def read_semeval(path) -> List[STSSubset]:
    """A SemEval STS folder (every `STS*.input.<set>.txt` in it) or one input file -> one subset per set."""
    path = Path(path)
    if path.is_dir():
        inputs = sorted(p for p in path.iterdir() if _SEMEVAL_INPUT.match(p.name))
        if not inputs:
            raise DataError(f"{path}: no SemEval STS input files (STS.input.<set>.txt) in this folder")
    elif _SEMEVAL_INPUT.match(path.name):
        inputs = [path]
    else:
        raise DataError(f"{path}: expected a SemEval STS folder or an STS.input.<set>.txt file")
    subsets = [_read_semeval_set(p) for p in inputs]
    names = [s.name for s in subsets]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: two input files share a set name ({names}); load them one by one")
    return subsets


_SICK_COLUMNS = ("pair_ID", "sentence_A", "sentence_B", "relatedness_score", "entailment_judgment")


def read_sick(path) -> List[STSSubset]:
    """A SICK file -> one subset, or one per `SemEval_set` value (`SICK-train`, ...) if that column exists."""
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(_read_text_lines(path), start=1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: no scored sentence pairs in the file")
    header = lines[0][1].split("\t")
    if header[0].strip().lower() == "pair_id":  # name -> column index, from the header
        index = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [c for c in ("sentence_a", "sentence_b", "relatedness_score") if c not in index]
        if missing:
            raise DataError(f"{path}, line {lines[0][0]}: the SICK header lacks column(s) {missing}")
        a, b, s = index["sentence_a"], index["sentence_b"], index["relatedness_score"]
        split = index.get("semeval_set")
        columns, lines = header, lines[1:]
    else:  # no header: the SemEval-2014 layout
        a, b, s, split, columns = 1, 2, 3, None, _SICK_COLUMNS
    groups: dict = {}
    for lineno, line in lines:
        cols = line.split("\t")
        where = f"{path}, line {lineno}"
        if len(cols) != len(columns):
            raise DataError(f"{where}: expected {len(columns)} tab-separated columns ({', '.join(columns)}), "
                            f"found {len(cols)}")
        name = path.stem if split is None else f"{path.stem}-{cols[split].strip().lower()}"
        groups.setdefault(name, []).append(STSPair(cols[a], cols[b], _score(cols[s], where, 1.0, 5.0)))
    return [_non_empty(STSSubset.from_pairs(name, pairs), path) for name, pairs in groups.items()]


def _sniff(path: Path) -> str:
    """Guess the layout of one file from its name, then from its first line."""
    if _SEMEVAL_INPUT.match(path.name):
        return "semeval"
    if _SEMEVAL_GOLD.match(path.name):
        raise DataError(f"{path}: this is a SemEval gold-score file; pass the STS.input file or its folder")
    if _STSB_NAME.match(path.name):
        return "stsb"
    if path.name.lower().startswith("sick"):
        return "sick"
    first = next((line for line in _read_text_lines(path) if line.strip()), "")
    cols = first.split("\t")
    if cols[0].strip().lower() == "pair_id":
        return "sick"
    if len(cols) in (7, 9) and _is_number(cols[4]):
        return "stsb"
    if len(cols) == 5 and cols[0].strip().isdigit() and _is_number(cols[3]):
        return "sick"
    raise DataError(
        f"{path}: cannot tell which STS format this is; expected an STS Benchmark file (sts-*.csv: 7 or 9 "
        "tab-separated columns, the score in column 5), a SemEval STS.input.<set>.txt file or folder (with "
        "STS.gs.<set>.txt beside it), or a SICK file (pair_ID, sentence_A, sentence_B, relatedness_score, "
        f"...); its first line has {len(cols)} tab-separated column(s)")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


_READERS = {"stsb": read_stsb, "semeval": read_semeval, "sick": read_sick}


def load_sts(path, format: str = "auto") -> List[STSSubset]:
    """Read STS pairs from a file or folder -> list of `STSSubset`.

    `format` is "stsb", "semeval", "sick" or "auto" (guess from the name, then the first line). A folder is
    read as SemEval when it holds `STS*.input.*.txt` files, else every `sts-*.csv` and `SICK*.txt` in it.
    """
    if format not in _FORMATS:
        raise DataError(f"unknown STS format {format!r}; expected one of {_FORMATS}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file or folder not found")
    if format != "auto":
        return _READERS[format](path)
    if not path.is_dir():
        return _READERS[_sniff(path)](path)
    if any(_SEMEVAL_INPUT.match(p.name) for p in path.iterdir()):
        return read_semeval(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and (
        _STSB_NAME.match(p.name) or (p.name.lower().startswith("sick") and p.suffix == ".txt")))
    if not files:
        raise DataError(f"{path}: no STS data in this folder; expected STS*.input.<set>.txt (SemEval), "
                        "sts-*.csv (STS Benchmark) or SICK*.txt files")
    return [subset for f in files for subset in _READERS[_sniff(f)](f)]


# ----------------------------------------------------------------------------------------- corpora

def read_lines(path, strip: bool = True, skip_empty: bool = True) -> List[str]:
    """A sentence-per-line corpus (SimCSE's wiki1m) -> its lines, stripped, blank ones dropped."""
    lines = _read_text_lines(Path(path))
    if strip:
        lines = [line.strip() for line in lines]
    return [line for line in lines if line.strip()] if skip_empty else lines


def read_conllu(path) -> List[Tuple[List[str], List[str]]]:
    """A Universal Dependencies CoNLL-U file -> one (words, upos_tags) pair per sentence.

    Comment lines (`#`) are skipped, as are multi-word token ranges (`1-2`, whose words follow as their own
    lines) and empty nodes (`8.1`), so the words are the syntactic words numbered 1, 2, ... n.
    """
    path = Path(path)
    sentences, words, tags = [], [], []
    for lineno, line in enumerate(_read_text_lines(path), start=1):
        if line.startswith("#"):
            continue
        if not line.strip():  # a blank line ends a sentence
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        cols = line.split("\t")
        where = f"{path}, line {lineno}"
        if len(cols) != 10:
            raise DataError(f"{where}: expected 10 tab-separated CoNLL-U columns (ID FORM LEMMA UPOS XPOS "
                            f"FEATS HEAD DEPREL DEPS MISC), found {len(cols)}")
        token_id = cols[0]
        if re.fullmatch(r"\d+-\d+|\d+\.\d+", token_id):
            continue  # a multi-word token range or an empty node
        if token_id != str(len(words) + 1):
            raise DataError(f"{where}: expected word ID {len(words) + 1}, found {token_id!r}")
        if not cols[3]:
            raise DataError(f"{where}: empty UPOS column")
        words.append(cols[1])
        tags.append(cols[3])
    if words:  # the last sentence may lack its closing blank line
        sentences.append((words, tags))
    return sentences
