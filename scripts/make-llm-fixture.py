#!/usr/bin/env python3
"""The reference for the LLM tests: llama.cpp (llama-cpp-python, built by
scripts/llama-cpp-env.sh) on a GGUF file.

Usage: make-llm-fixture.py MODEL.gguf OUT.json

For each chat prompt: the prompt rendered by the file's chat template with
jinja2 (as transformers renders it), llama.cpp's tokens for it, and the
first 32 tokens of llama.cpp's greedy decoding, each with the margin
between the chosen token's logit and the runner-up's (the test uses the
margins to tell a real difference from a near-tie). Then the mean negative
log-likelihood llama.cpp gives a fixed text (perplexity = exp of it).
"""
import hashlib
import json
import math
import sys

import jinja2
import llama_cpp
import numpy as np

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
]
# Public-domain prose (Melville, Austen, Lincoln), long enough that the
# perplexity averages out rounding noise (about 400 tokens).
TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
    "money in my purse, and nothing particular to interest me on shore, I thought I would "
    "sail about a little and see the watery part of the world. It is a way I have of driving "
    "off the spleen and regulating the circulation. Whenever I find myself growing grim about "
    "the mouth; whenever it is a damp, drizzly November in my soul; whenever I find myself "
    "involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral "
    "I meet, then, I account it high time to get to sea as soon as I can. "
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. "
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that war. "
    "We have come to dedicate a portion of that field, as a final resting place for those who "
    "here gave their lives that that nation might live. It is altogether fitting and proper "
    "that we should do this."
)
STEPS = 32


def main():
    path, out = sys.argv[1], sys.argv[2]
    # The key/value cache in f32 (llama.cpp keeps it in f16 by default): the
    # reference then rounds only where its weights and 8-bit activations do.
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=2, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
    meta = llm.metadata
    template = jinja2.Environment(loader=jinja2.BaseLoader()).from_string(meta["tokenizer.chat_template"])
    prompts = []
    for question in PROMPTS:
        text = template.render(messages=[{"role": "user", "content": question}], add_generation_prompt=True,
                               bos_token="", eos_token="")
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(tokens)
        generated, margins = [], []
        for _ in range(STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(-logits)
            token = int(order[0])
            generated.append(token)
            margins.append(float(logits[order[0]] - logits[order[1]]))
            if token == llm.token_eos():
                break
            llm.eval([token])
        prompts.append({"question": question, "prompt": text, "prompt_tokens": tokens, "tokens": generated, "margins": margins})
    tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(tokens)
    nll = 0.0
    for i in range(len(tokens) - 1):
        logits = np.array(llm.scores[i], dtype=np.float64)
        top = logits.max()
        nll -= logits[tokens[i + 1]] - top - math.log(np.exp(logits - top).sum())
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    fixture = {
        "runner": f"llama-cpp-python {llama_cpp.__version__}",
        "model_sha256": sha,
        "prompts": prompts,
        "text": TEXT,
        "text_tokens": tokens,
        "mean_nll": nll / (len(tokens) - 1),
    }
    with open(out, "w") as f:
        json.dump(fixture, f, indent=1)
    print(f"wrote {out}: {len(prompts)} prompts, perplexity {math.exp(fixture['mean_nll']):.3f}")


if __name__ == "__main__":
    main()
