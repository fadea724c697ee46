"""The README's code blocks work as written: Python blocks run, shell commands parse and targets exist.

A Python block preceded by `<!-- not executed: ... -->` is skipped (it needs downloads from the
Hugging Face hub); every other one runs, the one that loads SmolLM2 with the model from the cache.
"""

import re
import shlex
from pathlib import Path

import pytest

from llm2vec_mini.cli import build_parser
from llm2vec_mini.kit.__main__ import build_parser as build_kit_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"(<!-- not executed:[^>]*-->\s*)?```(\w+)\n(.*?)```", re.S)
BLOCKS = [(lang, code, bool(skip)) for skip, lang, code in BLOCK.findall(README)]
PYTHON = [code for lang, code, skip in BLOCKS if lang == "python" and not skip]
SHELL = [line.strip() for lang, code, _ in BLOCKS if lang == "bash" for line in code.splitlines()
         if line.strip()]


def test_the_readme_has_the_two_commands_first():
    first = next(code for lang, code, _ in BLOCKS if lang == "bash")
    assert "make demo" in first and "make test" in first


@pytest.mark.parametrize("i", range(len(PYTHON)))
def test_python_blocks_run(i, request):
    code = PYTHON[i]
    if "smollm2_path" in code:
        request.getfixturevalue("smollm2_gguf")  # skip (or fail under REQUIRE_DATA) without the model
    exec(compile(code, f"README.md python block {i}", "exec"), {})


@pytest.mark.parametrize("line", SHELL)
def test_shell_lines_name_real_commands(line):
    words = shlex.split(line.split("#")[0])
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before the command
        words = words[1:]
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert words[1] in targets, f"make {words[1]}: no such target"
    elif words[:3] == ["python", "-m", "llm2vec_mini"]:
        build_parser().parse_args(words[3:])  # exits (fails the test) on unknown commands or options
    elif words[:3] == ["python", "-m", "llm2vec_mini.kit"]:
        build_kit_parser().parse_args(words[3:])  # the teaching kit's commands, the same way
    elif words[:3] == ["python", "-m", "pytest"]:
        assert words[3:5] == ["--pyargs", "llm2vec_mini.kit.test_exercises"], line  # the kit's checks
    elif words[0] == "torchrun":  # torchrun's own options, then -m llm2vec_mini and ours
        at = words.index("-m")
        assert words[at + 1] == "llm2vec_mini" and all(w.startswith("--") for w in words[1:at])
        build_parser().parse_args(words[at + 2:])
    elif words[0] == "huggingface-cli":
        assert words[1] == "download"  # needs the hub: shown, not run
    else:
        pytest.fail(f"unexpected command in the README: {line}")
