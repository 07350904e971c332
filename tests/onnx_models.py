"""Small ONNX models with exactly the inputs and outputs of insightface's SCRFD and ArcFace.

The weights are random but fixed by a seed, and every output is a deterministic function of the
pixels (pooling and 1x1 convolutions), so two pipelines that pre- and post-process alike give the
same boxes, keypoints and embeddings. The detector's scores follow how red a patch is (red minus
blue), so that the shared photos give from none to a few hundred boxes above insightface's 0.5
threshold (black letterbox padding, grey and white give none): enough to exercise decoding and
NMS, few enough to stay fast.

``batch`` is how the graph treats the batch dimension:

* ``"dynamic"``: a symbolic batch dimension, outputs ``[batch, anchors, k]`` (SCRFD's batched export);
* ``"fixed"``: batch 1 and outputs ``[anchors, k]``, a larger batch folded in image by image;
* ``"minor"``: the same, but a larger batch folded in anchor by anchor (the batch innermost);
* ``"mixing"``: like ``fixed`` but the outputs mix the images of a batch, so it must run one by one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # readable by older ONNX Runtime builds too
STRIDES = (8, 16, 32)
ANCHORS = 2


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def scrfd_model(path: Path, batch: str = "dynamic", seed: int = 0, score_bias: float = -3.0) -> Path:
    """An SCRFD-shaped detector: 3 strides, 2 anchors, scores, boxes and 5 keypoints (9 outputs)."""
    rng = np.random.default_rng(seed)
    batch_dim: str | int = "batch" if batch == "dynamic" else 1
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch_dim, 3, "height", "width"])
    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    for stride in STRIDES:
        pooled = f"pool{stride}"
        nodes.append(
            helper.make_node(
                "AveragePool", ["input.1"], [pooled], kernel_shape=[stride, stride], strides=[stride, stride]
            )
        )
        if batch == "mixing":  # every image of a batch sees the batch's maximum: batching changes results
            nodes.append(helper.make_node("ReduceMax", [pooled], [f"{pooled}_max"], axes=[0], keepdims=1))
            nodes.append(helper.make_node("Sub", [pooled, pooled], [f"{pooled}_zero"]))  # batch-shaped zeros
            nodes.append(helper.make_node("Add", [f"{pooled}_max", f"{pooled}_zero"], [f"{pooled}_mixed"]))
            pooled = f"{pooled}_mixed"
        for kind, k, scale in (("score", 1, 3.0), ("bbox", 4, 1.0), ("kps", 10, 0.5)):
            outputs[kind].append(
                _scrfd_head(nodes, inits, rng, pooled, stride, kind, k, scale, batch, score_bias)
            )
    graph_outputs = []  # insightface reads the rank of these shapes: 3 means a batched export
    for kind, k in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride, name in zip(STRIDES, outputs[kind], strict=True):
            shape = [batch_dim, f"anchors{stride}", k] if batch == "dynamic" else [f"anchors{stride}", k]
            graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    return _save(helper.make_graph(nodes, "scrfd_like", [x], graph_outputs, inits), path)


def _scrfd_head(nodes, inits, rng, pooled, stride, kind, k, scale, batch, score_bias) -> str:
    """One output: 1x1 conv of the pooled pixels, channels-last, reshaped to (anchors, k)."""
    name = f"{kind}{stride}"
    weight = (rng.standard_normal((ANCHORS * k, 3, 1, 1)) * scale).astype(np.float32)
    bias = rng.standard_normal(ANCHORS * k).astype(np.float32) * 0.1
    if kind == "score":
        # red minus blue: reddish (skin-like) patches score high; grey, white and the black
        # letterbox padding score ``sigmoid(score_bias)``, far below the threshold
        weight[:, 0, 0, 0] = scale + weight[:, 0, 0, 0] * 0.1
        weight[:, 1, 0, 0] *= 0.1
        weight[:, 2, 0, 0] = -weight[:, 0, 0, 0]
        bias += score_bias
    inits += [_const(f"{name}_w", weight), _const(f"{name}_b", bias)]
    nodes.append(helper.make_node("Conv", [pooled, f"{name}_w", f"{name}_b"], [f"{name}_conv"]))
    raw = f"{name}_conv"
    if kind == "score":
        nodes.append(helper.make_node("Sigmoid", [raw], [f"{name}_act"]))
        raw = f"{name}_act"
    elif kind == "bbox":  # distances must be positive: softplus + 0.5, in stride units
        inits.append(_const(f"{name}_half", np.float32(0.5)))
        nodes.append(helper.make_node("Softplus", [raw], [f"{name}_sp"]))
        nodes.append(helper.make_node("Add", [f"{name}_sp", f"{name}_half"], [f"{name}_act"]))
        raw = f"{name}_act"
    nodes.append(helper.make_node("Transpose", [raw], [f"{name}_nhwc"], perm=[0, 2, 3, 1]))
    if batch == "minor":  # [batch, h, w, anchors, k] -> [h, w, anchors, batch, k]: the batch innermost
        inits.append(_const(f"{name}_split", np.array([0, 0, 0, ANCHORS, k], dtype=np.int64)))
        nodes.append(helper.make_node("Reshape", [f"{name}_nhwc", f"{name}_split"], [f"{name}_5d"]))
        nodes.append(helper.make_node("Transpose", [f"{name}_5d"], [f"{name}_minor"], perm=[1, 2, 3, 0, 4]))
        raw = f"{name}_minor"
    else:
        raw = f"{name}_nhwc"
    shape = [0, -1, k] if batch == "dynamic" else [-1, k]
    inits.append(_const(f"{name}_shape", np.array(shape, dtype=np.int64)))
    nodes.append(helper.make_node("Reshape", [raw, f"{name}_shape"], [name]))
    return name


def arcface_model(
    path: Path, batch: str = "dynamic", seed: int = 1, mxnet: bool = False, dim: int = 512
) -> Path:
    """An ArcFace-shaped embedder: [batch, 3, 112, 112] in, [batch, dim] out (not normalised).

    ``mxnet``: the graph normalises the pixels itself, in nodes named as insightface's MXNet
    exports are (``_minus``/``_mul``), which is how insightface tells such models apart.
    """
    rng = np.random.default_rng(seed)
    batch_dim: str | int = "None" if batch == "dynamic" else 1
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch_dim, 3, 112, 112])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch_dim, dim])
    nodes, inits, first = [], [], "input.1"
    if mxnet:
        inits += [_const("mean", np.float32(127.5)), _const("scale", np.float32(1 / 127.5))]
        nodes.append(helper.make_node("Sub", ["input.1", "mean"], ["centred"], name="_minus0"))
        nodes.append(helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0"))
        first = "scaled"
    weight = (rng.standard_normal((3 * 14 * 14, dim)) / 10).astype(np.float32)
    inits += [_const("fc_w", weight), _const("fc_b", rng.standard_normal(dim).astype(np.float32) * 0.1)]
    nodes += [
        helper.make_node("AveragePool", [first], ["pool"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], name="fc"),
        helper.make_node("Tanh", ["fc"], ["embedding"], name="tanh"),
    ]
    return _save(helper.make_graph(nodes, "arcface_like", [x], [y], inits), path)


def write_sha256sums(folder: Path) -> Path:
    """A ``SHA256SUMS`` list of every .onnx file in ``folder``, as ``sha256sum`` writes it."""
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(folder.glob("*.onnx"))
    ]
    out = folder / "SHA256SUMS"
    out.write_text("".join(lines))
    return out


def make_pack(folder: Path, det_batch: str = "dynamic", rec_batch: str = "dynamic") -> Path:
    """A model pack folder: det.onnx, rec.onnx and their SHA256SUMS."""
    folder.mkdir(parents=True, exist_ok=True)
    scrfd_model(folder / "det.onnx", batch=det_batch)
    arcface_model(folder / "rec.onnx", batch=rec_batch)
    write_sha256sums(folder)
    return folder
