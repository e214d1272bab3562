#!/usr/bin/env python3
"""Writes all-MiniLM-L6-v2 (or any BERT encoder in the sentence-transformers
layout) as an ONNX graph, for ONNX Runtime as the baseline of
scripts/bench-nn.sh: the same weights, read from model.safetensors, in the
graph a PyTorch export gives (MatMul + Add, LayerNormalization, the erf
GELU, attention with an additive mask), which ONNX Runtime fuses at load.

Usage: export-minilm-onnx.py MODEL_DIR OUT.onnx
Inputs: input_ids, attention_mask (int64 [batch, seq]); output:
last_hidden_state (float [batch, seq, hidden]); pooling is the caller's.
"""
import json
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    config = json.load(open(f"{model_dir}/config.json"))
    w = load_file(f"{model_dir}/model.safetensors")
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""
    h, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    eps = config.get("layer_norm_eps", 1e-12)
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x, name, tag):
        y = node("MatMul", [x, const(f"{tag}.wt", w[f"{prefix}{name}.weight"].T.copy())], f"{tag}.mm")
        return node("Add", [y, const(f"{tag}.b", w[f"{prefix}{name}.bias"])], f"{tag}.out")

    def norm(x, name, tag):
        scale, bias = const(f"{tag}.g", w[f"{prefix}{name}.weight"]), const(f"{tag}.beta", w[f"{prefix}{name}.bias"])
        return node("LayerNormalization", [x, scale, bias], f"{tag}.out", axis=-1, epsilon=eps)

    # Embeddings: words + positions + token type 0, then a norm.
    seq_len = node("Gather", [node("Shape", ["input_ids"], "shape"), const("one", np.array(1, np.int64))], "seq_len")
    positions = node("Range", [const("zero", np.array(0, np.int64)), seq_len, const("step", np.array(1, np.int64))], "positions")
    words = node("Gather", [const("word", w[f"{prefix}embeddings.word_embeddings.weight"]), "input_ids"], "words")
    places = node("Gather", [const("position", w[f"{prefix}embeddings.position_embeddings.weight"]), positions], "places")
    summed = node("Add", [node("Add", [words, places], "wp"), const("type0", w[f"{prefix}embeddings.token_type_embeddings.weight"][0])], "emb")
    x = norm(summed, "embeddings.LayerNorm", "emb_norm")

    # The additive mask: 0 where attended, -10000 on padding; [batch, 1, 1, seq].
    mask = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    mask = node("Unsqueeze", [mask, const("axes12", np.array([1, 2], np.int64))], "mask_4d")
    mask = node("Mul", [node("Sub", [const("one_f", np.array(1.0, np.float32)), mask], "mask_inv"), const("big", np.array(-10000.0, np.float32))], "mask_add")
    split = const("split_heads", np.array([0, 0, heads, h // heads], np.int64))
    join = const("join_heads", np.array([0, 0, h], np.int64))
    scale = const("scale", np.array(1.0 / np.sqrt(h // heads), np.float32))
    for i in range(layers):
        p, t = f"encoder.layer.{i}.", f"l{i}"

        def heads_of(y, tag, perm):
            return node("Transpose", [node("Reshape", [y, split], f"{tag}.split")], f"{tag}.t", perm=perm)

        q = heads_of(linear(x, p + "attention.self.query", t + ".q"), t + ".q", [0, 2, 1, 3])
        k = heads_of(linear(x, p + "attention.self.key", t + ".k"), t + ".k", [0, 2, 3, 1])
        v = heads_of(linear(x, p + "attention.self.value", t + ".v"), t + ".v", [0, 2, 1, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [q, k], t + ".qk"), scale], t + ".scaled"), mask], t + ".masked")
        probs = node("Softmax", [scores], t + ".probs", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], t + ".pv")], t + ".ctx_t", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, join], t + ".ctx")
        attended = node("Add", [linear(context, p + "attention.output.dense", t + ".o"), x], t + ".res1")
        x = norm(attended, p + "attention.output.LayerNorm", t + ".n1")
        up = linear(x, p + "intermediate.dense", t + ".up")
        erf = node("Erf", [node("Div", [up, const(t + ".sqrt2", np.array(np.sqrt(2.0), np.float32))], t + ".div")], t + ".erf")
        gelu = node("Mul", [node("Mul", [up, node("Add", [erf, const(t + ".one", np.array(1.0, np.float32))], t + ".erf1")], t + ".g1"),
                            const(t + ".half", np.array(0.5, np.float32))], t + ".gelu")
        x = norm(node("Add", [linear(gelu, p + "output.dense", t + ".down"), x], t + ".res2"), p + "output.LayerNorm", t + ".n2")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state"))
    graph = helper.make_graph(
        nodes,
        "minilm",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", h])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out)
    print(f"wrote {out}: {layers} layers, hidden {h}, {heads} heads")


if __name__ == "__main__":
    main()
