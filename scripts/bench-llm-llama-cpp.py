#!/usr/bin/env python3
"""llama.cpp's side of scripts/bench-llm.sh: the same figures as `gpuwasm
bench llm`, on the same GGUF, through llama-cpp-python (target/llama-venv,
2 threads, as many as the machine has cores): model load to first token
(page cache warm), time to first token for a prompt of N tokens, and decode
tokens/s of one sequence. llama-cpp-python runs one sequence at a time, so
there is no aggregate figure for it.

Usage: bench-llm-llama-cpp.py MODEL.gguf [PROMPT_TOKENS] [TOKENS] [REPEAT]
Prints `key name=value` lines.
"""
import os
import statistics
import sys
import time

import llama_cpp

WORDS = "the history of every science is a long story of small steps taken by many people who asked simple questions "


def main():
    path = sys.argv[1]
    prompt_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    repeat = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    threads = os.cpu_count()
    open_model = lambda: llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)  # noqa: E731

    def first_token(llm, ids):
        llm.reset()
        llm.eval(ids)
        return llm.sample(temp=0)

    loads = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        llm = open_model()
        first_token(llm, llm.tokenize(b"1, 2, 3,", add_bos=False))
        loads.append((time.perf_counter() - start) * 1e3)
        del llm
    loads.pop(0)  # the first read the file from disk
    llm = open_model()
    ttft = []
    for i in range(repeat):
        ids = llm.tokenize(f"{i} {WORDS * (prompt_tokens // 10 + 2)}".encode(), add_bos=False)[:prompt_tokens]
        start = time.perf_counter()
        first_token(llm, ids)
        ttft.append((time.perf_counter() - start) * 1e3)
    decode = []
    for i in range(repeat):
        start_number = 100 * (i + 1)
        prompt = ", ".join(str(n) for n in range(start_number, start_number + 4)) + ","
        token = first_token(llm, llm.tokenize(prompt.encode(), add_bos=False))
        start = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([token])
            token = llm.sample(temp=0)
        decode.append((tokens - 1) / (time.perf_counter() - start))
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, {threads} threads)")
    print(f"key load_to_first_token_ms={statistics.median(loads):.1f}")
    print(f"key ttft_ms={statistics.median(ttft):.1f}")
    print(f"key decode_tok_s={statistics.median(decode):.2f}")


if __name__ == "__main__":
    main()
