"""Makes the small, deliberately wrong models the config tests use. Run once; the outputs are
committed (a few hundred bytes to a few kilobytes each).

    python3 tests/data/make_test_models.py      # needs: pip install onnx
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

here = os.path.dirname(os.path.abspath(__file__))


def save(model, name):
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(here, name))


def classifier(name, input_hw, classes, extra_outputs=()):
    """input [N,3,H,W] -> global average pool -> flatten -> matmul -> logits [N,classes].
    extra_outputs: (tensor, output name, shape): an intermediate tensor ("pooled" [N,3,1,1] or
    "flat" [N,3]) also given out, through an Identity, under the output name."""
    h, w = input_hw
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, h, w])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    weight = numpy_helper.from_array(np.ones((3, classes), dtype=np.float32), "weight")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
    ]
    outputs = [y]
    for tensor, out_name, shape in extra_outputs:
        nodes.append(helper.make_node("Identity", [tensor], [out_name]))
        outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, name, [x], outputs, [weight])
    save(helper.make_model(graph), name + ".onnx")


# Right input, but 10 classes where the manifest's labels say 1000.
classifier("ten-classes", (224, 224), 10)
# 1000 classes, but a 128x128 input where the manifest says 224x224.
classifier("small-input", (128, 128), 1000)
# Right input and logits, but no output named "embedding" where the bundled manifest names one.
classifier("logits-only", (224, 224), 1000)
# An output "embedding", but the pooled [N,3,1,1] tensor where vigil wants [N, D].
classifier("unflattened-embedding", (224, 224), 1000,
           [("pooled", "embedding", ["batch", 3, 1, 1])])
