#!/usr/bin/env python3
"""The baseline of scripts/bench-nn.sh: sentence-transformers embeddings/s.

Usage: bench-sentence-transformers.py MODEL_DIR SENTENCES_FILE SECONDS (per figure)
                                      [--device cpu|cuda] [--batches 1,32]
Prints `key st_bN=...` (embeddings per second at batch N, default 1 and 32)
on the CPU with PyTorch's default threads (all cores), or on the GPU with
--device cuda (scripts/gpu-check.sh).
"""
import sys

import torch
from sentence_transformers import SentenceTransformer

from bench_rounds import rate


def main():
    model_dir, sentences_file, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    options = dict(zip(sys.argv[4::2], sys.argv[5::2]))
    device = options.get("--device", "cpu")
    batches = [int(b) for b in options.get("--batches", "1,32").split(",")]
    sentences = [line for line in open(sentences_file, encoding="utf-8").read().splitlines() if line]
    model = SentenceTransformer(model_dir, device=device)
    print(f"sentence-transformers {__import__('sentence_transformers').__version__}, torch {torch.__version__}, "
          f"{device}, {torch.get_num_threads()} threads")
    for batch in batches:
        texts = [sentences[k % len(sentences)] for k in range(batch)]
        i = [0]

        def call():
            if batch == 1:
                model.encode([sentences[i[0] % len(sentences)]], batch_size=1)
                i[0] += 1
            else:
                model.encode(texts, batch_size=batch)

        print(f"key st_b{batch}={batch * rate(seconds, call):.1f}")


if __name__ == "__main__":
    main()
