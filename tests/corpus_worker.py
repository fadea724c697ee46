"""Encodes a corpus slowly, so that a test can kill it midway (see test_corpus.py).

    python tests/corpus_worker.py MODEL INPUT OUTPUT CHUNK_SIZE THREADS SECONDS_PER_CHUNK
"""

import sys
import time

import torch

from llm2vec_mini.corpus import encode_corpus
from llm2vec_mini.encoder import LLM2Vec


def main(model, input, output, chunk_size, threads, pause):
    torch.set_num_threads(int(threads))  # the same as the test's, so that the results are identical
    encoder = LLM2Vec.from_pretrained(model, device="cpu")
    encode_corpus(encoder, input, output, chunk_size=int(chunk_size), batch_size=2, progress=False,
                  on_chunk=lambda c: time.sleep(float(pause)))


if __name__ == "__main__":
    main(*sys.argv[1:])
