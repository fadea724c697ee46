"""STS readers (STS-B, SemEval 2012-2016, SICK), the corpus readers, and their typed errors.

Small fixtures in the real layouts are written in each test; the real STS-B, wiki1m and UD files are
checked against independent parses (the csv module, plain counting) and the counts in the data README.
"""

import csv
import re

import pytest
from conftest import missing

from llm2vec_mini.data import (
    STSPair,
    STSSubset,
    load_sts,
    read_conllu,
    read_lines,
    read_semeval,
    read_sick,
    read_stsb,
)
from llm2vec_mini.errors import DataError


def write(path, lines, newline="\n"):
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


# ----------------------------------------------------------------------------------------- STS Benchmark

STSB_LINES = [
    "main-captions\tMSRvid\t2012test\t0001\t5.000\tA man is playing a flute.\tA man is playing a flute.",
    'main-forums\tdeft-forum\t2014\t0010\t1.400\tHe said "no.\tThe "answer" was "maybe',  # unbalanced quotes
    "main-news\theadlines\t2016\t0281\t0\tStocks fall\tMarkets rise\tEurope Media Monitor"
    "\tEurope Media Monitor",
]


def test_stsb_seven_and_nine_columns_and_unbalanced_quotes(tmp_path):
    (subset,) = load_sts(write(tmp_path / "sts-dev.csv", STSB_LINES))
    assert subset.name == "sts-dev" and len(subset) == 3
    assert subset.pairs[1] == STSPair('He said "no.', 'The "answer" was "maybe', 1.4)
    assert subset.sentences2[2] == "Markets rise" and subset.scores == [5.0, 1.4, 0.0]


@pytest.mark.parametrize("bad, message", [
    ("g\tf\t2012\t1\t3.0\tonly one sentence", r"line 2: expected 7 or 9 .* found 6"),
    ("g\tf\t2012\t1\tthree\ts1\ts2", r"line 2: score 'three' is not a number"),
    ("g\tf\t2012\t1\t5.5\ts1\ts2", r"line 2: score 5.5 is outside \[0, 5\]"),
    ("g\tf\t2012\t1\tnan\ts1\ts2", r"line 2: score nan is outside"),
])
def test_stsb_malformed_lines_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "sts-test.csv", [STSB_LINES[0], bad])
    with pytest.raises(DataError, match=re.escape(str(path)) + ", " + message):
        read_stsb(path)


def test_crlf_and_bom_and_line_separator_inside_a_sentence(tmp_path):
    # U+2028 is a line break for str.splitlines but just a character inside a tab-separated field
    lines = ["\ufeff" + STSB_LINES[0], "g\tf\t2012\t2\t2.5\tfirst\u2028half\tsecond"]
    (subset,) = read_stsb(write(tmp_path / "sts-x.csv", lines, newline="\r\n"))
    assert subset.sentences1 == ["A man is playing a flute.", "first\u2028half"]
    assert subset.sentences2[1] == "second" and subset.scores == [5.0, 2.5]


# ----------------------------------------------------------------------------------------- SemEval STS

def semeval_folder(tmp_path):
    """A 2012-style set (2 columns, CRLF) and a 2016-style set (4 columns, unscored pairs)."""
    write(tmp_path / "STS.input.MSRpar.txt",
          ["The cat sat.\tA cat was sitting.", "Prices rose 5%.\tPrices fell.", "Hi\tHello"], newline="\r\n")
    write(tmp_path / "STS.gs.MSRpar.txt", ["4.000", "1.2", "3.8"], newline="\r\n")
    write(tmp_path / "STS2016.input.answer-answer.txt",
          ["Yes it is.\tNo.\tstackexchange\tstackexchange",
           "Use a loop.\tIterate over it.\tstackexchange\tstackexchange",
           "Not rated\tpair\tsrc\tsrc",
           "Last one\tfinal\tsrc\tsrc"])
    write(tmp_path / "STS2016.gs.answer-answer.txt", ["0", "4.5", "", "2"])
    return tmp_path


def test_semeval_folder_one_subset_per_set_and_blank_gold_skipped(tmp_path):
    subsets = load_sts(semeval_folder(tmp_path))
    by_name = {s.name: s for s in subsets}
    assert set(by_name) == {"MSRpar", "answer-answer"}
    msr, aa = by_name["MSRpar"], by_name["answer-answer"]
    assert msr.sentences1 == ["The cat sat.", "Prices rose 5%.", "Hi"] and msr.scores == [4.0, 1.2, 3.8]
    assert msr.sentences2[2] == "Hello"  # no stray "\r"
    assert aa.sentences1 == ["Yes it is.", "Use a loop.", "Last one"]  # "Not rated" has a blank gold line
    assert aa.sentences2 == ["No.", "Iterate over it.", "final"] and aa.scores == [0.0, 4.5, 2.0]


def test_semeval_single_input_file_is_auto_detected(tmp_path):
    (aa,) = load_sts(semeval_folder(tmp_path) / "STS2016.input.answer-answer.txt")
    assert aa.name == "answer-answer" and len(aa) == 3


def test_semeval_errors(tmp_path):
    folder = semeval_folder(tmp_path)
    with pytest.raises(DataError, match="gold-score file"):
        load_sts(folder / "STS.gs.MSRpar.txt")
    write(folder / "STS.gs.MSRpar.txt", ["4.000", "1.2"])
    with pytest.raises(DataError, match=r"STS\.gs\.MSRpar\.txt: 2 gold lines for 3 sentence pairs"):
        read_semeval(folder)
    write(folder / "STS.gs.MSRpar.txt", ["4.000", "1.2", "6"])
    with pytest.raises(DataError, match=r"STS\.gs\.MSRpar\.txt, line 3: score 6.0 is outside"):
        read_semeval(folder)
    write(folder / "STS.input.MSRpar.txt", ["a\tb", "a\tb\tc", "a\tb"])
    with pytest.raises(DataError, match=r"STS\.input\.MSRpar\.txt, line 2: expected 2 or 4 .* found 3"):
        read_semeval(folder)
    (folder / "STS.gs.MSRpar.txt").unlink()
    with pytest.raises(DataError, match=r"STS\.gs\.MSRpar\.txt are not beside it"):
        read_semeval(folder)


# ----------------------------------------------------------------------------------------- SICK

SICK_ROWS = ["1\tA boy is jumping\tA kid jumps\t4.5\tENTAILMENT",
             "2\tA dog runs\tA cat sleeps\t1.2\tNEUTRAL",
             "3\tNobody is cooking\tA man is cooking\t3.6\tCONTRADICTION"]


@pytest.mark.parametrize("header", [True, False])
def test_sick_with_and_without_header(tmp_path, header):
    head = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"] if header else []
    (subset,) = load_sts(write(tmp_path / "SICK_trial.txt", head + SICK_ROWS))
    assert subset.name == "SICK_trial"
    assert subset.pairs[2] == STSPair("Nobody is cooking", "A man is cooking", 3.6)
    assert subset.scores == [4.5, 1.2, 3.6]


def test_sick_detected_by_content_under_another_name(tmp_path):
    (subset,) = load_sts(write(tmp_path / "pairs.tsv", SICK_ROWS))
    assert len(subset) == 3


def test_full_sick_layout_is_split_by_semeval_set(tmp_path):
    header = ("pair_ID\tsentence_A\tsentence_B\tentailment_label\trelatedness_score\tentailment_AB\t"
              "entailment_BA\tsentence_A_original\tsentence_B_original\tsentence_A_dataset\t"
              "sentence_B_dataset\tSemEval_set")
    rows = [f"{i}\tA{i}\tB{i}\tNEUTRAL\t{score}\tA_neutral_B\tB_neutral_A\toa\tob\tFLICKR\tFLICKR\t{split}"
            for i, (score, split) in enumerate([(3.1, "TRAIN"), (1.0, "TEST"), (5, "TRAIN"), (2.2, "TRIAL")])]
    subsets = read_sick(write(tmp_path / "SICK.txt", [header] + rows))
    assert [(s.name, s.sentences1, s.scores) for s in subsets] == [
        ("SICK-train", ["A0", "A2"], [3.1, 5.0]), ("SICK-test", ["A1"], [1.0]), ("SICK-trial", ["A3"], [2.2])]


def test_sick_errors(tmp_path):
    with pytest.raises(DataError, match=r"line 3: score 0.5 is outside \[1, 5\]"):
        read_sick(write(tmp_path / "SICK_a.txt", SICK_ROWS[:2] + ["3\ta\tb\t0.5\tNEUTRAL"]))
    with pytest.raises(DataError, match=r"line 2: expected 5 tab-separated columns .* found 4"):
        read_sick(write(tmp_path / "SICK_b.txt", SICK_ROWS[:1] + ["2\ta\tb\t3"]))
    with pytest.raises(DataError, match=r"header lacks column\(s\) \['relatedness_score'\]"):
        read_sick(write(tmp_path / "SICK_c.txt", ["pair_ID\tsentence_A\tsentence_B\tscore"]))


# ----------------------------------------------------------------------------------------- load_sts

def test_unrecognised_file_names_what_was_expected(tmp_path):
    path = write(tmp_path / "notes.txt", ["just some text", "more"])
    with pytest.raises(DataError, match=re.escape(str(path)) + r": cannot tell .* STS Benchmark .* SICK"):
        load_sts(path)
    with pytest.raises(DataError, match="no STS data in this folder"):
        load_sts(tmp_path)
    with pytest.raises(DataError, match="file or folder not found"):
        load_sts(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="unknown STS format 'csv'"):
        load_sts(path, format="csv")
    with pytest.raises(DataError, match="no scored sentence pairs"):
        load_sts(write(tmp_path / "sts-empty.csv", []))
    (tmp_path / "sts-latin1.csv").write_bytes("g\tf\t2012\t1\t3\tcaf\xe9\tx\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"sts-latin1\.csv: not UTF-8"):
        load_sts(tmp_path / "sts-latin1.csv")


def test_forced_format_overrides_the_guess(tmp_path):
    (subset,) = load_sts(write(tmp_path / "dev.tsv", STSB_LINES), format="stsb")
    assert len(subset) == 3
    with pytest.raises(DataError, match=r"expected 5 tab-separated columns"):
        load_sts(tmp_path / "dev.tsv", format="sick")


def test_subset_lengths_must_agree():
    with pytest.raises(DataError, match="'x': 2 first sentences, 1 second sentences and 2 scores"):
        STSSubset("x", ["a", "b"], ["c"], [1.0, 2.0])


# ----------------------------------------------------------------------------------------- corpora

def test_read_lines_strips_and_drops_blank_lines(tmp_path):
    path = write(tmp_path / "corpus.txt", ["  one sentence. ", "", "   ", "two"], newline="\r\n")
    assert read_lines(path) == ["one sentence.", "two"]
    assert read_lines(path, strip=False, skip_empty=False) == ["  one sentence. ", "", "   ", "two"]


CONLLU = """# sent_id = a-1
# text = I don't know.
1\tI\tI\tPRON\tPRP\t_\t4\tnsubj\t_\t_
2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tknow\tknow\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = a-2
1\tGo\tgo\tVERB\tVB\t_\t0\troot\t_\t_
1.1\tyou\tyou\tPRON\tPRP\t_\t_\t_\t1:nsubj\t_
2\thome\thome\tADV\tRB\t_\t1\tadvmod\t_\t_
"""  # no blank line after the last sentence


def test_read_conllu_skips_ranges_empty_nodes_and_comments(tmp_path):
    path = tmp_path / "x.conllu"
    path.write_text(CONLLU, encoding="utf-8")
    assert read_conllu(path) == [(["I", "do", "n't", "know", "."], ["PRON", "AUX", "PART", "VERB", "PUNCT"]),
                                 (["Go", "home"], ["VERB", "ADV"])]


@pytest.mark.parametrize("old, new, message", [
    ("2\tdo\tdo\tAUX", "2\tdo do\tAUX", r"line 5: expected 10 tab-separated CoNLL-U columns .* found 9"),
    ("3\tn't", "7\tn't", r"line 6: expected word ID 3, found '7'"),
    ("4\tknow\tknow\tVERB", "4\tknow\tknow\t", r"line 7: empty UPOS column"),
])
def test_read_conllu_malformed_lines(tmp_path, old, new, message):
    path = tmp_path / "bad.conllu"
    path.write_text(CONLLU.replace(old, new), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(path)) + ", " + message):
        read_conllu(path)


# ----------------------------------------------------------------------------------------- real data

def _real(data_dir, *parts):
    path = data_dir.joinpath(*parts)
    if not path.exists():
        missing(f"{path} not found")
    return path


@pytest.mark.parametrize("name, rows, nine_column_rows",
                         [("sts-dev.csv", 1500, 22), ("sts-train.csv", 5749, 197)])
def test_real_stsb_matches_the_csv_module(data_dir, name, rows, nine_column_rows):
    path = _real(data_dir, "stsbenchmark", name)
    (subset,) = load_sts(path)
    with open(path, encoding="utf-8", newline="") as f:  # independent parse: csv with quoting switched off
        table = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(subset) == len(table) == rows
    assert sum(len(r) == 9 for r in table) == nine_column_rows
    assert subset.sentences1 == [r[5] for r in table] and subset.sentences2 == [r[6] for r in table]
    assert subset.scores == [float(r[4]) for r in table]
    assert min(subset.scores) == 0.0 and max(subset.scores) == 5.0
    assert any('"' in t for t in subset.sentences1 + subset.sentences2)


def test_real_stsb_folder_gives_both_splits(data_dir):
    subsets = load_sts(_real(data_dir, "stsbenchmark"))
    assert [(s.name, len(s)) for s in subsets] == [("sts-dev", 1500), ("sts-train", 5749)]


def test_real_dev_first_pair(data_dir):
    (dev,) = load_sts(_real(data_dir, "stsbenchmark", "sts-dev.csv"))
    first = STSPair("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert dev.pairs[0] == first


def test_real_wiki1m_slice(data_dir):
    lines = read_lines(_real(data_dir, "wiki1m_slice", "wiki1m_for_simcse.first11914.txt"), skip_empty=False)
    assert len(lines) == 11914  # the README's count


def test_real_ud_ewt_dev_counts(data_dir):
    path = _real(data_dir, "ud_english_ewt", "en_ewt-ud-dev.conllu")
    sentences = read_conllu(path)
    assert len(sentences) == 2001 and sum(len(w) for w, _ in sentences) == 25147  # the README's counts
    with open(path, encoding="utf-8") as f:  # independent count: "# text" comments, one per sentence
        assert len(sentences) == sum(line.startswith("# text =") for line in f)
    upos = {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
            "PUNCT", "SCONJ", "SYM", "VERB", "X"}  # the 17 universal tags
    assert {t for _, tags in sentences for t in tags} <= upos
    assert all(len(w) == len(t) for w, t in sentences)
