#!/usr/bin/env python3
"""The baseline of scripts/bench-nn.sh: sentence-transformers embeddings/s.

Usage: bench-sentence-transformers.py MODEL_DIR SENTENCES_FILE SECONDS (per figure)
Prints `key st_b1=...` and `key st_b32=...` (embeddings per second at batch
1 and 32) on the CPU, with PyTorch's default threads (all cores).
"""
import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def rate(seconds, call):
    call()  # warm up
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        call()
        calls += 1
    return calls / (time.perf_counter() - start)


def main():
    model_dir, sentences_file, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sentences = [line for line in open(sentences_file, encoding="utf-8").read().splitlines() if line]
    model = SentenceTransformer(model_dir, device="cpu")
    i = [0]

    def one():
        model.encode([sentences[i[0] % len(sentences)]], batch_size=1)
        i[0] += 1

    b1 = rate(seconds, one)
    b32 = 32 * rate(seconds, lambda: model.encode(sentences[:32], batch_size=32))
    print(f"sentence-transformers {__import__('sentence_transformers').__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"key st_b1={b1:.1f}")
    print(f"key st_b32={b32:.1f}")


if __name__ == "__main__":
    main()
