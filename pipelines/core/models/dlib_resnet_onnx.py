"""dlib's 128-d face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) as an ONNX graph.

``build_resnet_graph(network)`` takes what ``dlib_dat.read_network`` read and returns an
``onnx.ModelProto``: uint8 RGB face chips [N, 150, 150, 3] (``get_face_chip``'s output) in,
float32 descriptors [N, 128] out, not normalised (dlib's ``compute_face_descriptor`` returns
them so). The batch dimension is dynamic. Standard ops only (Cast, Sub, Mul, Transpose, Conv,
Relu, MaxPool, AveragePool, Pad on height and width, Add, GlobalAveragePool, Flatten, MatMul), so
that the CUDA and TensorRT providers take the whole graph.

The file's layers are checked, one by one from the input upwards, against the network's C++ type
in dlib's ``examples/dnn_face_recognition_ex.cpp``; any other file is refused with an error that
names the first layer that differs. The rules the graph follows (dlib's dnn/layers.h, input.h):

- input: ``(pixel - channel mean) / 256`` per RGB channel, the means from the file;
- each ``affine`` (batch norm already folded by dlib) is folded into the convolution before it;
- a downsampling block's shortcut is a 2x2 average pool of the block's input; ``add_prev`` adds
  tensors of different sizes by zero-padding the smaller at the end of each dimension (3x3 meets
  4x4, 1x1 meets 2x2) and of the channels. The channel padding is written as a 2x2, stride-2
  convolution whose weights are 1/4 on the diagonal and 0 elsewhere (the pool and the padding in
  one standard op; TensorRT refuses a Pad on the channel axis);
- ``avg_pool`` with a 0x0 window is a global average; the ``fc`` has no bias.
"""

from __future__ import annotations

import numpy as np

from .dlib_dat import Layer, Network

CHIP = 150  # get_face_chip's default size, which the input layer fixes
DIM = 128
INPUT = "chips"
OUTPUT = "descriptors"
OPSET = 17
# (channels, blocks) of each level, from the input upwards: 'down' halves the size first
LEVELS = [(32, ["same"] * 3), (64, ["down"] + ["same"] * 3), (128, ["down", "same", "same"])]
LEVELS += [(256, ["down", "same", "same"]), (256, ["down"])]


class TopologyError(ValueError):
    """A network file whose layers are not those of dlib's face ResNet."""


class _Layers:
    """The file's layers, taken one at a time, each checked against what the C++ type says."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.i = 0

    def take(self, kind: str, **want) -> Layer:
        if self.i >= len(self.layers):
            raise TopologyError(f"the network ends after {self.i} layers; expected a {kind} layer next")
        layer = self.layers[self.i]
        found = {key: layer.fields.get(key) for key in want}
        if layer.kind != kind or found != want:
            expected = f"{kind} {want}" if want else kind
            raise TopologyError(
                f"layer {self.i} above the input ({layer.record} at byte {layer.offset}) is not the face "
                f"ResNet's: expected {expected}, found {layer.kind} {layer.fields}"
            )
        self.i += 1
        return layer

    def done(self) -> None:
        if self.i != len(self.layers):
            extra = self.layers[self.i]
            raise TopologyError(
                f"layer {self.i} above the input ({extra.record}) is more than the face ResNet has"
            )


class _Graph:
    """Nodes and initialisers, with unique names."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.weights: list = []
        self.n = 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.weights.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, **attrs) -> str:
        out = self.name(stem or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def build_resnet_graph(network: Network):
    """The ONNX descriptor graph of a dlib face ResNet file, or TopologyError naming the layer."""
    import onnx
    from onnx import TensorProto, helper

    _check_ends(network)
    g = _Graph()
    x = _input(g, network.input)
    layers = _Layers(network.layers)
    x, size = _stem(g, layers, x)
    channels = 32
    for width, blocks in LEVELS:
        for block in blocks:
            x, size = _block(g, layers, x, size, channels, width, down=block == "down")
            channels = width
    layers.take("avg_pool", rows=0, cols=0, stride_y=1, stride_x=1, pad_y=0, pad_x=0)
    fc = layers.take("fc", num_outputs=DIM, num_inputs=channels, has_bias=False)
    layers.done()
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    g.nodes.append(helper.make_node("MatMul", [pooled, g.const("fc", fc.weights["weights"])], [OUTPUT]))
    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", CHIP, CHIP, 3])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", DIM])],
        g.weights,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="faceaudit"
    )
    model.ir_version = 8  # what ONNX Runtime 1.14 and later read
    onnx.checker.check_model(model)
    return model


def _check_ends(network: Network) -> None:
    if network.loss.kind != "loss_metric":
        raise TopologyError(f"not a face descriptor network: its loss layer is {network.loss.record}")
    fields = network.input.fields
    if network.input.kind != "input_rgb_image_sized" or (fields.get("rows"), fields.get("cols")) != (
        CHIP,
        CHIP,
    ):
        raise TopologyError(f"not a face descriptor network: its input is {network.input.record} {fields}")


def _input(g: _Graph, layer: Layer) -> str:
    from onnx import TensorProto

    f = layer.fields
    mean = np.array([f["avg_red"], f["avg_green"], f["avg_blue"]], dtype=np.float32)
    x = g.op("Cast", [INPUT], to=TensorProto.FLOAT)
    x = g.op("Sub", [x, g.const("mean", mean)])
    x = g.op("Mul", [x, g.const("scale", np.array(1 / 256, dtype=np.float32))])  # exact: a power of 2
    return g.op("Transpose", [x], perm=[0, 3, 1, 2])


def _conv(
    g: _Graph, layers: _Layers, x: str, size: int, filters: int, k: int, stride: int
) -> tuple[str, int]:
    """A convolution and the affine layer after it, folded into one Conv."""
    pad = 1 if stride == 1 and k == 3 else 0
    con = layers.take(
        "con", num_filters=filters, rows=k, cols=k, stride_y=stride, stride_x=stride, pad_y=pad, pad_x=pad
    )
    affine = layers.take("affine", mode=0)
    gamma, beta = affine.weights["gamma"], affine.weights["beta"]
    if gamma.size != filters:
        raise TopologyError(
            f"the affine layer at byte {affine.offset} has {gamma.size} channels, not {filters}"
        )
    w = con.weights["filters"] * gamma[:, None, None, None]
    b = con.weights.get("bias", np.zeros(filters, np.float32)) * gamma + beta
    out = g.op(
        "Conv",
        [x, g.const("w", w.astype(np.float32)), g.const("b", b.astype(np.float32))],
        kernel_shape=[k, k],
        strides=[stride, stride],
        pads=[pad] * 4,
    )
    return out, (size + 2 * pad - k) // stride + 1


def _stem(g: _Graph, layers: _Layers, x: str) -> tuple[str, int]:
    x, size = _conv(g, layers, x, CHIP, 32, 7, 2)
    layers.take("relu")
    x = g.op("Relu", [x])
    layers.take("max_pool", rows=3, cols=3, stride_y=2, stride_x=2, pad_y=0, pad_x=0)
    return g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2]), (size - 3) // 2 + 1


def _block(g: _Graph, layers: _Layers, x: str, size: int, cin: int, cout: int, down: bool) -> tuple[str, int]:
    """dlib's ``ares`` (down False) or ``ares_down``: two 3x3 convolutions and a shortcut, added,
    then a relu. Their layers from the input upwards: tag1, con, affine, relu, con, affine, then
    add_prev (ares) or tag2, skip1, avg_pool, add_prev (ares_down)."""
    layers.take("tag_or_skip")
    y, inner = _conv(g, layers, x, size, cout, 3, 2 if down else 1)
    layers.take("relu")
    y, inner = _conv(g, layers, g.op("Relu", [y]), inner, cout, 3, 1)
    if down:
        layers.take("tag_or_skip")
        layers.take("tag_or_skip")
        layers.take("avg_pool", rows=2, cols=2, stride_y=2, stride_x=2, pad_y=0, pad_x=0)
        x, size = _shortcut(g, x, size, cin, cout), (size - 2) // 2 + 1
    elif cin != cout:
        raise TopologyError(f"a same-size block from {cin} to {cout} channels")
    layers.take("add_prev")
    layers.take("relu")
    if inner < size:  # dlib's add_prev: the smaller tensor is zero-padded at its end
        y = g.op(
            "Pad", [y, g.const("pads", np.array([0, 0, 0, 0, 0, 0, size - inner, size - inner], np.int64))]
        )
    elif inner > size:
        x = g.op(
            "Pad", [x, g.const("pads", np.array([0, 0, 0, 0, 0, 0, inner - size, inner - size], np.int64))]
        )
    return g.op("Relu", [g.op("Add", [y, x])]), max(size, inner)


def _shortcut(g: _Graph, x: str, size: int, cin: int, cout: int) -> str:
    """The 2x2 average pool of the block's input, its channels zero-padded to ``cout``."""
    if cin == cout:
        return g.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    w = np.zeros((cout, cin, 2, 2), np.float32)
    w[np.arange(cin), np.arange(cin)] = 0.25
    return g.op("Conv", [x, g.const("pool", w)], kernel_shape=[2, 2], strides=[2, 2])
