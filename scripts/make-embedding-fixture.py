#!/usr/bin/env python3
"""Reference embeddings for the embeddings example, made by sentence-transformers.

Usage: scripts/make-embedding-fixture.py MODEL_DIR OUT.json
MODEL_DIR is all-MiniLM-L6-v2 as scripts/fetch-test-models.sh lays it
out. Needs `pip install sentence-transformers`. The output is committed as
tests/fixtures/minilm-embeddings.json; the tests compare gpuwasm's
embeddings against it (cosine similarity >= 0.999 for every sentence).
"""
import json
import sys

from sentence_transformers import SentenceTransformer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A serverless runtime starts WebAssembly instances in microseconds.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I love programming in Rust because the compiler catches my mistakes.",
    "Embeddings map text to points in a vector space.",
    "The weather today is sunny with a light breeze.",
    "It is raining cats and dogs outside.",
    "Machine learning models can be deployed at the edge.",
    "GPUs accelerate matrix multiplication dramatically.",
    "She sells sea shells by the sea shore.",
    "How do I reset my password?",
    "Click 'Forgot password' on the login page to reset it.",
    "The stock market fell sharply on Monday.",
    "Investors were worried about rising interest rates.",
    "A cat sat on the mat.",
    "Dogs are loyal companions.",
    "The mitochondria is the powerhouse of the cell.",
    "Photosynthesis converts light energy into chemical energy.",
    "Quantum computers use qubits instead of bits.",
    "The Eiffel Tower was completed in 1889.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Shakespeare wrote Hamlet around the year 1600.",
    "The Great Wall of China is visible in many photographs.",
    "Coffee is one of the most traded commodities in the world.",
    "Please send me the quarterly report by Friday.",
    "The meeting has been moved to 3 pm tomorrow.",
    "Neural networks are loosely inspired by the brain.",
    "The recipe calls for two cups of flour and one egg.",
    "Bake the cake at 180 degrees for 35 minutes.",
    "He scored the winning goal in the final minute.",
    "The orchestra played Beethoven's ninth symphony.",
    "Electric cars are becoming more affordable.",
    "Solar panels convert sunlight into electricity.",
    "The museum is closed on Mondays.",
    "Can you recommend a good book on history?",
    "Tokenizers split text into subword units.",
    "ok",
    "Hello!",
    "naïve café résumé — déjà vu",
    "Übermäßige Geschwindigkeit ist gefährlich.",
    "¿Dónde está la biblioteca?",
    "東京は日本の首都です。",
    "Emoji test: 🚀🔥👍",
    "1234567890",
    "C++ and C# are different languages; so are Java and JavaScript.",
    "user@example.com wrote: see https://example.com/path?q=1",
    "   leading and trailing spaces   ",
    "UPPERCASE TEXT SHOULD BE LOWERCASED BY THE UNCASED TOKENIZER",
    "A very long sentence follows. " * 60,
    "The committee will review all applications received before the deadline "
    "and notify successful candidates within two weeks of the closing date.",
    "Rust's ownership model guarantees memory safety without garbage collection.",
]


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    model = SentenceTransformer(model_dir, device="cpu")
    embeddings = model.encode(SENTENCES, batch_size=16, convert_to_numpy=True)
    fixture = {
        "model": "all-MiniLM-L6-v2",
        "made_by": "scripts/make-embedding-fixture.py (sentence-transformers)",
        "sentences": SENTENCES,
        "embeddings": [[round(float(x), 6) for x in row] for row in embeddings],
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"{len(SENTENCES)} sentences, dimension {embeddings.shape[1]} -> {out}")


if __name__ == "__main__":
    main()
