"""A reader for dlib's DNN network files (the ``.dat`` files of face-recognition-models).

``read_network(path_or_bytes) -> Network`` parses a whole file or refuses it with ``DatError``,
whose message names the byte offset and the record being read. Nothing is executed and every
length is bounded by the bytes left, so a hostile file cannot make the reader allocate more than
its own size.

What a file holds (dlib's serialisation, read from dlib's dnn/core.h, layers.h, loss.h, input.h):

- integers: a control byte (low 4 bits: number of value bytes, 0x80: negative), then the value
  little-endian; floats and doubles: an integer mantissa and an integer exponent (m * 2**e);
  strings: an integer length, then the bytes; booleans: the ASCII byte ``0`` or ``1``;
- tensors: version 2, then n, k, rows, cols and raw little-endian float32 data; alias tensors
  (views into a layer's ``params``): version 1 and the shape only;
- the loss layer first (its record), then the network from the output down: each layer wrapper
  writes its version and then its subnetwork, so the file holds a run of wrapper versions from the
  outermost to the innermost, the input layer, and then each layer's record from the input
  upwards. Tag and skip wrappers store only their version, so they come back as markers of kind
  ``tag_or_skip``; which is which comes from the network's C++ type (the builders check it).

The ``Network`` returned has ``loss`` (a Layer of kind ``loss_metric`` or ``loss_mmod``),
``input`` (kind ``input_rgb_image_sized`` or ``input_rgb_image_pyramid``) and ``layers``: every
wrapper from just above the input to just below the loss, in that order. A Layer has ``kind``
(one name per layer type, whatever the record's version), ``record`` (the version string as
written, e.g. ``con_4``), ``fields`` (plain numbers) and ``weights`` (float32 numpy arrays):

================ ==========================================================================
kind             fields / weights
================ ==========================================================================
con              num_filters, rows, cols, stride_y, stride_x, pad_y, pad_x /
                 filters [out, in, rows, cols], bias [out] (absent when the layer has none)
affine           mode / gamma [k], beta [k] (batch norm already folded by dlib)
bn_con, bn_fc    eps, num_updates, running_stats_window_size / gamma, beta,
                 running_mean, running_variance [k]
relu             (none)
max_pool,        rows, cols, stride_y, stride_x, pad_y, pad_x (rows = cols = 0: a global pool)
avg_pool
add_prev         (none)
fc               num_outputs, num_inputs, has_bias / weights [inputs, outputs], bias [outputs]
tag_or_skip      (none)
input_*          avg_red, avg_green, avg_blue, and rows, cols for the sized input;
                 pyramid_padding, pyramid_outer_padding for the pyramid input
loss_metric      margin, dist_thresh
loss_mmod        windows (tuple of (width, height)), loss_per_false_alarm,
                 loss_per_missed_target, truth_match_iou_threshold, nms_iou_thresh,
                 nms_percent_covered_thresh, ignore_iou_thresh, ignore_percent_covered_thresh
================ ==========================================================================
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# A real network has a few hundred wrappers; far more is a hostile file, not a network.
MAX_DEPTH = 10_000
MAX_NAME = 256
# dlib's float serialisation marks infinities and NaN with these exponents
_SPECIAL_EXPONENTS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


class DatError(ValueError):
    """A dlib network file that cannot be read; the message names the offset and the record."""


@dataclass
class Layer:
    kind: str
    record: str
    fields: dict = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    offset: int = 0

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.weights.items()}
        return f"Layer({self.kind}, {self.record}, {self.fields}, {shapes}, at byte {self.offset})"


@dataclass
class Network:
    loss: Layer
    input: Layer
    layers: list[Layer]
    size: int = 0


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0
        self.where = "the file header"

    def fail(self, what: str) -> DatError:
        return DatError(f"dlib network file: {what} at byte {self.pos} (reading {self.where})")

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.left():
            raise self.fail(f"truncated: {n} bytes needed, {self.left()} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int_(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if control & 0x70 or size == 0 or size > 8:
            self.pos -= 1
            raise self.fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def count(self, limit: int | None = None) -> int:
        """A non-negative size, bounded by the bytes left (or ``limit``)."""
        start = self.pos
        value = self.int_()
        bound = self.left() if limit is None else limit
        if value < 0 or value > bound:
            self.pos = start
            raise self.fail(f"size {value} out of bounds (at most {bound})")
        return value

    def float_(self) -> float:
        mantissa, exponent = self.int_(), self.int_()
        if exponent in _SPECIAL_EXPONENTS:
            return _SPECIAL_EXPONENTS[exponent]
        if abs(exponent) > 1100 or abs(mantissa) >= 1 << 64:
            raise self.fail(f"float out of range (mantissa {mantissa}, exponent {exponent})")
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            raise self.fail(f"float out of range (mantissa {mantissa}, exponent {exponent})") from None

    def bool_(self) -> bool:
        byte = self.take(1)[0]
        if byte not in (0x30, 0x31):
            self.pos -= 1
            raise self.fail(f"bad boolean byte 0x{byte:02x}")
        return byte == 0x31

    def string(self) -> str:
        raw = self.take(self.count(MAX_NAME))
        try:
            return bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            raise self.fail("a name that is not ASCII") from None

    def peek_string(self) -> str | None:
        """The string at the current position if one fits there, without consuming it."""
        start = self.pos
        try:
            return self.string()
        except DatError:
            return None
        finally:
            self.pos = start

    def tensor(self) -> np.ndarray | tuple[int, ...]:
        """A tensor's data (float32, flat), or an alias tensor's shape."""
        version = self.int_()
        # an alias holds no data, so only its data-holding twin bounds its size by the bytes left
        shape = tuple(self.count(1 << 31 if version == 1 else None) for _ in range(4))
        if version == 1:
            return shape
        if version != 2:
            raise self.fail(f"unknown tensor version {version}")
        size = math.prod(shape)
        if size * 4 > self.left():
            raise self.fail(
                f"truncated: a tensor of shape {shape} needs {size * 4} bytes, {self.left()} left"
            )
        return np.frombuffer(self.take(size * 4), dtype="<f4").astype(np.float32)

    def data_tensor(self) -> np.ndarray:
        value = self.tensor()
        if not isinstance(value, np.ndarray):
            raise self.fail("an alias tensor where a tensor with data was expected")
        return value

    def alias(self) -> tuple[int, ...]:
        value = self.tensor()
        if isinstance(value, np.ndarray):
            raise self.fail("a tensor with data where an alias tensor was expected")
        return value


def read_network(source: str | os.PathLike | bytes) -> Network:
    """Parse a dlib network file (path or bytes) to its last byte; raise DatError if it can't."""
    data = source if isinstance(source, bytes | bytearray) else Path(source).read_bytes()
    r = _Reader(bytes(data))
    r.where = "the loss layer"
    if r.int_() != 1:
        raise r.fail("not a dlib network file: unknown loss wrapper version")
    loss = _read_loss(r)
    versions = _read_wrapper_versions(r)
    r.where = "the input layer"
    input_layer = _read_input(r)
    layers = []
    for depth, version in enumerate(reversed(versions)):
        if version == 1:  # tag or skip: nothing of its own
            layers.append(Layer("tag_or_skip", "tag_or_skip", offset=r.pos))
            continue
        r.where = f"layer {depth} above the input"
        layer = _read_details(r)
        _read_wrapper_tail(r, innermost=depth == 0)
        layers.append(layer)
    if r.left():
        raise r.fail(f"{r.left()} unexpected trailing bytes")
    return Network(loss=loss, input=input_layer, layers=layers, size=len(data))


def _read_wrapper_versions(r: _Reader) -> list[int]:
    """The run of wrapper versions, outermost first, ending with the innermost add_layer (3)."""
    r.where = "the layer wrappers"
    versions = []
    while True:
        start = r.pos
        version = r.int_()
        if version == 3:  # the add_layer that holds the input layer
            versions.append(version)
            return versions
        if version not in (1, 2):
            r.pos = start
            raise r.fail(f"unsupported layer wrapper version {version}")
        if version == 2 and versions and r.peek_string() is not None and r.peek_string().startswith("input_"):
            raise r.fail("an old (version 2) input wrapper, not supported")
        versions.append(version)
        if len(versions) > MAX_DEPTH:
            raise r.fail(f"more than {MAX_DEPTH} layer wrappers")


def _read_wrapper_tail(r: _Reader, innermost: bool) -> None:
    """What add_layer writes after a layer's record: 3 booleans, 3 tensors, and for the
    innermost layer the sample expansion factor. Training state; read and dropped."""
    for _ in range(3):
        r.bool_()
    for _ in range(3):
        r.data_tensor()
    if innermost:
        r.int_()


def _read_loss(r: _Reader) -> Layer:
    offset = r.pos
    name = r.string()
    if name == "loss_metric_2":
        return Layer("loss_metric", name, {"margin": r.float_(), "dist_thresh": r.float_()}, offset=offset)
    if name == "loss_mmod_":
        return Layer("loss_mmod", name, _read_mmod_options(r), offset=offset)
    r.pos = offset
    raise r.fail(f"unknown loss layer {name!r}")


def _read_mmod_options(r: _Reader) -> dict:
    version = r.int_()
    if not 1 <= version <= 4:
        raise r.fail(f"unknown mmod_options version {version}")
    if version == 1:
        windows = [(r.int_(), r.int_())]
    else:
        windows = []
        for _ in range(r.count()):
            window_version = r.int_()
            if window_version not in (1, 2):
                raise r.fail(f"unknown detector window version {window_version}")
            windows.append((r.int_(), r.int_()))
            if window_version == 2:
                r.string()  # the window's label
    names = ["loss_per_false_alarm", "loss_per_missed_target", "truth_match_iou_threshold", "nms_iou_thresh"]
    names += ["nms_percent_covered_thresh", "ignore_iou_thresh", "ignore_percent_covered_thresh"]
    fields = {"windows": tuple(windows)} | {name: r.float_() for name in names}
    if version >= 3:
        fields["assume_image_pyramid"] = r.int_()
    if version >= 4:
        fields["use_bounding_box_regression"] = r.bool_()
        fields["bbr_lambda"] = r.float_()
    return fields


def _read_input(r: _Reader) -> Layer:
    offset = r.pos
    name = r.string()
    if name not in ("input_rgb_image_sized", "input_rgb_image_pyramid", "input_rgb_image_pyramid2"):
        r.pos = offset
        raise r.fail(f"unknown input layer {name!r}")
    fields = {"avg_red": r.float_(), "avg_green": r.float_(), "avg_blue": r.float_()}
    if name == "input_rgb_image_sized":
        fields |= {"rows": r.int_(), "cols": r.int_()}
        return Layer("input_rgb_image_sized", name, fields, offset=offset)
    if name == "input_rgb_image_pyramid2":
        fields |= {"pyramid_padding": r.int_(), "pyramid_outer_padding": r.int_()}
    else:
        fields |= {"pyramid_padding": 10, "pyramid_outer_padding": 11}
    return Layer("input_rgb_image_pyramid", name, fields, offset=offset)


def _read_details(r: _Reader) -> Layer:
    offset = r.pos
    name = r.string()
    reader = _DETAILS.get(name)
    if reader is None:
        r.pos = offset
        raise r.fail(f"unknown layer type {name!r}")
    kind, fields, weights = reader(r, name)
    return Layer(kind, name, fields, weights, offset)


def _window(r: _Reader) -> dict:
    keys = ("rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")
    return {key: r.int_() for key in keys}


def _multipliers(r: _Reader) -> None:
    for _ in range(4):  # learning-rate and weight-decay multipliers: training only
        r.float_()


def _split(r: _Reader, params: np.ndarray, sizes: list[int], what: str) -> list[np.ndarray]:
    if sum(sizes) != params.size:
        raise r.fail(f"{what}: params hold {params.size} values, {sum(sizes)} expected")
    return np.split(params, np.cumsum(sizes)[:-1])


def _con(r: _Reader, name: str):
    params = r.data_tensor()
    filters = r.count(1 << 20)
    fields = {"num_filters": filters} | _window(r)
    r.alias(), r.alias()
    _multipliers(r)
    has_bias = r.bool_() if name in ("con_5", "con_6") else True
    if name == "con_6" and r.bool_():
        raise r.fail("a convolution with a fused relu, not supported")
    rows, cols = fields["rows"], fields["cols"]
    per_input = filters * rows * cols
    weight_count = params.size - (filters if has_bias else 0)
    if per_input <= 0 or weight_count <= 0 or weight_count % per_input:
        raise r.fail(f"{name}: {params.size} params do not fit {filters} filters of {rows}x{cols}")
    weights = {"filters": params[:weight_count].reshape(filters, weight_count // per_input, rows, cols)}
    if has_bias:
        weights["bias"] = params[weight_count:]
    return "con", fields, weights


def _affine(r: _Reader, name: str):
    params = r.data_tensor()
    r.alias(), r.alias()
    fields = {"mode": r.int_()}
    if name == "affine_2" and r.bool_():
        fields["disabled"] = True
    gamma, beta = _split(r, params, [params.size // 2] * 2, name)
    return "affine", fields, {"gamma": gamma, "beta": beta}


def _bn(r: _Reader, name: str):
    params = r.data_tensor()
    r.alias(), r.alias()
    r.data_tensor(), r.data_tensor()  # the last batch's means and inverse deviations: training only
    mean, variance = r.data_tensor(), r.data_tensor()
    fields = {"num_updates": r.int_(), "running_stats_window_size": r.int_()}
    _multipliers(r)
    fields["eps"] = r.float_()
    gamma, beta = _split(r, params, [mean.size] * 2, name)
    if variance.size != mean.size:
        raise r.fail(f"{name}: {mean.size} running means but {variance.size} variances")
    weights = {"gamma": gamma, "beta": beta, "running_mean": mean, "running_variance": variance}
    return ("bn_con" if name == "bn_con2" else "bn_fc"), fields, weights


def _relu(r: _Reader, name: str):
    if name == "relu_2" and r.bool_():
        raise r.fail("a disabled relu, not supported")
    return "relu", {}, {}


def _pool(r: _Reader, name: str):
    return name[:-2], _window(r), {}


def _add_prev(r: _Reader, name: str):
    return "add_prev", {}, {}


def _fc(r: _Reader, name: str):
    outputs, inputs = r.count(1 << 24), r.count(1 << 24)
    params = r.data_tensor()
    r.alias(), r.alias()
    bias_mode = r.int_()
    _multipliers(r)
    has_bias = bias_mode == 0
    if name == "fc_3":
        has_bias = r.bool_() and has_bias
    rows = inputs + (1 if bias_mode == 0 else 0)  # dlib keeps the bias row in params even if unused
    if bias_mode not in (0, 1) or params.size != rows * outputs:
        raise r.fail(f"{name}: {params.size} params do not fit {inputs} inputs x {outputs} outputs")
    matrix = params.reshape(rows, outputs)
    weights = {"weights": matrix[:inputs]}
    if has_bias:
        weights["bias"] = matrix[inputs]
    return "fc", {"num_outputs": outputs, "num_inputs": inputs, "has_bias": has_bias}, weights


_DETAILS = {
    "con_4": _con,
    "con_5": _con,
    "con_6": _con,
    "affine_": _affine,
    "affine_2": _affine,
    "bn_con2": _bn,
    "bn_fc2": _bn,
    "relu_": _relu,
    "relu_2": _relu,
    "max_pool_2": _pool,
    "avg_pool_2": _pool,
    "add_prev_": _add_prev,
    "fc_2": _fc,
    "fc_3": _fc,
}
