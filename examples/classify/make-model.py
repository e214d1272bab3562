#!/usr/bin/env python3
"""Makes the classify example's model: a small CNN for 8x8 handwritten digits.

Trains on scikit-learn's digits dataset with PyTorch, writes the network as
an ONNX graph (opset 20) built node by node, checks it with onnx.checker,
and records onnxruntime's outputs for held-out digits as the reference the
tests compare gpuwasm against.

Usage: examples/classify/make-model.py
Writes examples/classify/digits.onnx and tests/fixtures/digits-reference.json.
Needs: pip install torch scikit-learn onnx onnxruntime
"""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

torch.manual_seed(7)
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8], values 0..16
y = torch.tensor(digits.target)
train, test = slice(0, 1500), slice(1500, None)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, img):
        h = img.transpose(2, 3) * (1.0 / 16.0)          # Transpose, Mul
        h = torch.relu(self.conv1(h))                   # Conv, Relu
        h = nn.functional.max_pool2d(h, 2)              # MaxPool -> 4x4
        h = torch.relu(self.conv2(h))                   # Conv, Relu
        h = nn.functional.avg_pool2d(h, 2)              # AveragePool -> 2x2
        h = h.reshape(-1, 64)                           # Reshape
        h = nn.functional.gelu(self.norm(self.fc1(h)))  # Gemm, LayerNormalization, Gelu
        return torch.softmax(self.fc2(h), dim=-1)       # MatMul, Add, Softmax


net = Net()
opt = torch.optim.Adam(net.parameters(), lr=3e-3)
for epoch in range(60):
    for i in range(0, 1500, 100):
        opt.zero_grad()
        p = net(x[train][i:i + 100])
        loss = nn.functional.nll_loss(torch.log(p + 1e-9), y[train][i:i + 100])
        loss.backward()
        opt.step()
with torch.no_grad():
    accuracy = (net(x[test]).argmax(1) == y[test]).float().mean().item()
print(f"held-out accuracy {accuracy:.3f}")

w = {k: v.detach().numpy() for k, v in net.state_dict().items()}
init = [
    numpy_helper.from_array(np.array(1.0 / 16.0, dtype=np.float32), "scale"),
    numpy_helper.from_array(w["conv1.weight"], "conv1.w"), numpy_helper.from_array(w["conv1.bias"], "conv1.b"),
    numpy_helper.from_array(w["conv2.weight"], "conv2.w"), numpy_helper.from_array(w["conv2.bias"], "conv2.b"),
    numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "flat"),
    numpy_helper.from_array(w["fc1.weight"], "fc1.w"), numpy_helper.from_array(w["fc1.bias"], "fc1.b"),
    numpy_helper.from_array(w["norm.weight"], "norm.g"), numpy_helper.from_array(w["norm.bias"], "norm.b"),
    numpy_helper.from_array(np.ascontiguousarray(w["fc2.weight"].T), "fc2.w"), numpy_helper.from_array(w["fc2.bias"], "fc2.b"),
]
N = helper.make_node
nodes = [
    N("Transpose", ["pixels"], ["t"], perm=[0, 1, 3, 2]),
    N("Mul", ["t", "scale"], ["s"]),
    N("Conv", ["s", "conv1.w", "conv1.b"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    N("Relu", ["c1"], ["r1"]),
    N("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
    N("Conv", ["p1", "conv2.w", "conv2.b"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    N("Relu", ["c2"], ["r2"]),
    N("AveragePool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
    N("Reshape", ["p2", "flat"], ["f"]),
    N("Gemm", ["f", "fc1.w", "fc1.b"], ["h"], transB=1),
    N("LayerNormalization", ["h", "norm.g", "norm.b"], ["n"], axis=-1, epsilon=1e-5),
    N("Gelu", ["n"], ["g"]),
    N("MatMul", ["g", "fc2.w"], ["m"]),
    N("Add", ["m", "fc2.b"], ["logits"]),
    N("Softmax", ["logits"], ["probabilities"], axis=-1),
]
graph = helper.make_graph(
    nodes, "digits",
    [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 8, 8])],
    [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
    init,
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="gpuwasm make-model.py")
model.ir_version = 9
onnx.checker.check_model(model)
path = os.path.join(HERE, "digits.onnx")
onnx.save(model, path)

session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
images = x[test][:64].numpy()
probs = session.run(None, {"pixels": images})[0]
with torch.no_grad():
    assert np.allclose(probs, net(x[test][:64]).numpy(), atol=1e-5), "the ONNX graph differs from the trained network"
reference = {
    "made_by": "examples/classify/make-model.py (onnxruntime %s)" % ort.__version__,
    "heldout_accuracy": round(accuracy, 4),
    "images": [[int(v) for v in img.flatten()] for img in images],
    "labels": [int(v) for v in y[test][:64]],
    "probabilities": [[round(float(v), 7) for v in row] for row in probs],
}
with open(os.path.join(ROOT, "tests", "fixtures", "digits-reference.json"), "w") as f:
    json.dump(reference, f, separators=(",", ":"))
    f.write("\n")
print(f"wrote {path} ({os.path.getsize(path)} bytes) and the onnxruntime reference for {len(images)} digits")
