#!/usr/bin/env python3
"""A baseline of scripts/bench-nn.sh: ONNX Runtime embeddings/s on
all-MiniLM-L6-v2 exported by scripts/export-minilm-onnx.py, tokenised by the
model's own tokenizer.json (Hugging Face `tokenizers`, the library
gpuwasm's engine uses), mean-pooled and normalised in NumPy, as
sentence-transformers does.

Usage: bench-onnxruntime.py MODEL_DIR MODEL.onnx SENTENCES_FILE SECONDS THREADS
Prints `key ort_b1=...` and `key ort_b32=...` (embeddings per second), and
first checks its embeddings against tests/fixtures/minilm-embeddings.json
(cosine >= 0.999 for every sentence), so the baseline is known to compute
the same thing.
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from bench_rounds import rate


def main():
    model_dir, onnx_path, sentences_file, seconds, threads = sys.argv[1:6]
    seconds, threads = float(seconds), int(threads)
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])

    def embed(texts):
        encodings = tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), np.int64)
        mask = np.zeros((len(texts), width), np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / m.sum(axis=1)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    fixture = json.load(open(os.path.join(root, "tests/fixtures/minilm-embeddings.json")))
    got = np.concatenate([embed(fixture["sentences"][i : i + 8]) for i in range(0, len(fixture["sentences"]), 8)])
    want = np.array(fixture["embeddings"], np.float32)
    worst = float(((got * want).sum(axis=1) / np.linalg.norm(want, axis=1)).min())
    if worst < 0.999:
        sys.exit(f"ONNX Runtime's embeddings disagree with sentence-transformers': worst cosine {worst:.6f}")
    print(f"onnxruntime {ort.__version__}, {threads} threads; worst cosine against the fixture {worst:.6f}")
    sentences = [line for line in open(sentences_file, encoding="utf-8").read().splitlines() if line]
    for batch in (1, 32):
        texts = [sentences[k % len(sentences)] for k in range(batch)]
        i = [0]

        def call():
            if batch == 1:
                embed([sentences[i[0] % len(sentences)]])
                i[0] += 1
            else:
                embed(texts)

        print(f"key ort_b{batch}={batch * rate(seconds, call):.1f}")


if __name__ == "__main__":
    main()
