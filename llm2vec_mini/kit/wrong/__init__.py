"""Known-wrong submissions: each is the reference solution with one planted bug, in one exercise.

A check is only as good as the wrong answers it catches. Each file here, `eNN_what.py`, takes every
exercise from `llm2vec_mini.kit.reference` and replaces exercise eNN with a version that has one
subtle bug, written as a student might write it; tests/test_kit.py proves that each fails its own
exercise and passes all the others. Try one: `python -m llm2vec_mini.kit check --impl
llm2vec_mini/kit/wrong/e04_repeat.py`.
"""
