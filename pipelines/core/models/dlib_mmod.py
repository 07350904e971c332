"""dlib's MMOD CNN face detector (``mmod_human_face_detector.dat``) on ONNX Runtime.

The network is fully convolutional; what makes it dlib's detector is the work around it, written
here in numpy to give the same numbers as ``dlib.cnn_face_detection_model_v1(img, upsample)``
(rules read from dlib's source: ``input_rgb_image_pyramid`` in dnn/input.h, the tiled pyramid in
image_transforms/image_pyramid.h, ``resize_image`` in image_transforms/interpolation.h,
``loss_mmod_`` in dnn/loss.h, the Python binding in tools/python/src/cnn_face_detector.cpp):

- ``upsample`` doubles the image that many times with dlib's ``pyramid_up`` (``pyramid_down<2>``
  geometry: a W x H image becomes 2W+2 x 2H+1), and the boxes found are mapped back down;
- the input layer normalises each channel as (pixel - mean) / 256, then tiles a pyramid of the
  image, each level 5/6 of the one before (``pyramid_down<6>``), into one image with 10 px between
  tiles and an 11 px border, background 0. The levels are resized from the normalised values with
  dlib's CPU bilinear resize, whose column positions accumulate in float32: emulating that makes
  the tiled input bit-identical to dlib's (a plain bilinear resize moves scores by up to ~2e-4);
- every output score > 0 maps back through the convolutions to a window centre in the tiled
  image, and from the tile it falls in to a box in the image; boxes are rounded to dlib's integer
  rectangles, then a greedy non-maximum suppression by score removes any box that overlaps a kept
  one, dlib's way (intersection over the area of the bounding box of both, or the share of either
  box covered).

So the ONNX graph takes dlib's tiled float tensor (NCHW, already normalised) rather than uint8
pixels: the resized levels are fractional and dlib resizes them after normalising, so neither
the pixels nor the normalisation can move into the graph without changing the scores.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

from .dlib_dat import Layer, Network

TILES = "tiles"  # the graph's input: dlib's tiled, normalised pyramid, float32 NCHW
SCORES = "scores"  # its output: one detection score per position, float32 [N, 1, h, w]
SPEC_KEY = "faceaudit.mmod_spec"  # graph metadata: the MmodSpec, as JSON
MIN_LEVEL_ROWS = 5  # dlib stops the pyramid at levels shorter than this
_U64 = 1 << 64  # dlib's layout mixes unsigned and signed longs; the comparisons wrap like C's

# (filters, kernel, stride) of each convolution, from the input up, as in dlib's
# dnn_mmod_face_detection_ex.cpp: a 3-stage stride-2 downsampler, three 5x5 convolutions, and the
# 9x9 detection filter. Each but the last is followed by batch norm (or affine) and relu.
EXPECTED_CONVS = ((16, 5, 2), (32, 5, 2), (32, 5, 2), (45, 5, 1), (45, 5, 1), (45, 5, 1), (1, 9, 1))


@dataclass(frozen=True)
class Rect:
    """dlib's integer rectangle: inclusive corners."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left + 1

    @property
    def height(self) -> int:
        return self.bottom - self.top + 1

    def contains(self, x: float, y: float) -> bool:
        return self.left <= x <= self.right and self.top <= y <= self.bottom


@dataclass(frozen=True)
class MmodSpec:
    """What the numpy side needs from a network file besides the graph."""

    means: tuple[float, float, float]  # per channel, red first
    padding: int
    outer_padding: int
    window: tuple[int, int]  # (width, height)
    iou_thresh: float
    covered_thresh: float
    convs: tuple[tuple[int, int, int], ...]  # (kernel, stride, padding) of each convolution, input first


# --- the network: checked, then built as an ONNX graph --------------------------------------------


def check_mmod_network(network: Network) -> MmodSpec:
    """The spec of a network whose layers are exactly dlib's face detector; anything else is a
    ValueError naming the first layer that differs."""
    loss, inp = network.loss, network.input
    if loss.kind != "loss_mmod":
        raise ValueError(f"not an MMOD detector: its loss layer is {loss.record}, expected loss_mmod_")
    if inp.kind != "input_rgb_image_pyramid":
        raise ValueError(
            f"not an MMOD detector: its input layer is {inp.record}, expected input_rgb_image_pyramid"
        )
    fields = loss.fields
    if len(fields["windows"]) != 1 or fields.get("use_bounding_box_regression"):
        raise ValueError("MMOD detector with several windows or box regression: not supported")
    convs = _check_layers(network.layers)
    return MmodSpec(
        means=(inp.fields["avg_red"], inp.fields["avg_green"], inp.fields["avg_blue"]),
        padding=int(inp.fields["pyramid_padding"]),
        outer_padding=int(inp.fields["pyramid_outer_padding"]),
        window=tuple(fields["windows"][0]),
        iou_thresh=float(fields["nms_iou_thresh"]),
        covered_thresh=float(fields["nms_percent_covered_thresh"]),
        convs=tuple(
            (layer.fields["rows"], layer.fields["stride_y"], layer.fields["pad_y"]) for layer in convs
        ),
    )


def _expected_kinds() -> list[tuple[str, tuple[int, int, int] | None]]:
    kinds: list[tuple[str, tuple[int, int, int] | None]] = []
    for conv in EXPECTED_CONVS[:-1]:
        kinds += [("con", conv), ("norm", None), ("relu", None)]
    return kinds + [("con", EXPECTED_CONVS[-1])]


def _check_layers(layers: list[Layer]) -> list[Layer]:
    expected = _expected_kinds()
    if len(layers) != len(expected):
        raise ValueError(f"not dlib's MMOD face detector: {len(layers)} layers, expected {len(expected)}")
    convs, channels = [], 3
    for depth, (layer, (kind, conv)) in enumerate(zip(layers, expected, strict=True)):
        where = f"layer {depth} above the input ({layer.record} at byte {layer.offset})"
        if kind == "norm":
            if layer.kind not in ("bn_con", "affine") or layer.weights["gamma"].size != channels:
                raise ValueError(
                    f"{where}: expected a batch norm over {channels} channels, found {layer.kind}"
                )
            continue
        if layer.kind != kind:
            raise ValueError(f"{where}: expected {kind}, found {layer.kind}")
        if kind == "con":
            _check_conv(layer, conv, channels, where)
            convs.append(layer)
            channels = conv[0]
    return convs


def _check_conv(layer: Layer, conv: tuple[int, int, int], channels: int, where: str) -> None:
    filters, kernel, stride = conv
    f = layer.fields
    found = (f["num_filters"], f["rows"], f["cols"], f["stride_y"], f["stride_x"])
    shape = tuple(layer.weights["filters"].shape)
    if found != (filters, kernel, kernel, stride, stride) or shape != (filters, channels, kernel, kernel):
        raise ValueError(
            f"{where}: expected {filters} filters of {kernel}x{kernel}x{channels}, stride {stride}; "
            f"found {f['num_filters']} of {f['rows']}x{f['cols']}x{shape[1]}, "
            f"stride {f['stride_y']}x{f['stride_x']}"
        )
    if f["pad_y"] != f["pad_x"] or not 0 <= f["pad_y"] < kernel or "bias" not in layer.weights:
        raise ValueError(f"{where}: unexpected padding {f['pad_y']}x{f['pad_x']} or no bias")


def fold_batch_norm(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel, in float32 as dlib computes them when it loads a bn_con layer
    into the affine layer of its detector type: g = gamma / sqrt(var + eps), b = beta - g * mean."""
    w = layer.weights
    if layer.kind == "affine":
        return w["gamma"], w["beta"]
    eps = np.float32(layer.fields["eps"])
    scale = w["gamma"] / np.sqrt(w["running_variance"] + eps)
    return scale.astype(np.float32), (w["beta"] - scale * w["running_mean"]).astype(np.float32)


def build_mmod_graph(network: Network):
    """The detector's convolutions as an ONNX graph: float32 ``tiles`` [N, 3, H, W] in (dlib's
    tiled, normalised pyramid), ``scores`` [N, 1, h, w] out; every dimension dynamic. Each batch
    norm is folded into the convolution before it. Standard ops only (Conv, Relu)."""
    from onnx import TensorProto, helper, numpy_helper

    spec = check_mmod_network(network)
    layers = network.layers
    nodes, weights, last = [], [], TILES
    for depth, layer in enumerate(layers):
        if layer.kind != "con":
            continue
        filters, bias = layer.weights["filters"], layer.weights["bias"]
        follows = layers[depth + 1] if depth + 1 < len(layers) else None
        if follows is not None:  # norm then relu
            scale, shift = fold_batch_norm(follows)
            filters = filters * scale[:, None, None, None]
            bias = bias * scale + shift
        name = f"conv{len(nodes)}"
        weights += [
            numpy_helper.from_array(filters.astype(np.float32), f"{name}_w"),
            numpy_helper.from_array(bias.astype(np.float32), f"{name}_b"),
        ]
        f = layer.fields
        pads = [f["pad_y"], f["pad_x"], f["pad_y"], f["pad_x"]]
        out = SCORES if follows is None else f"{name}_out"
        nodes.append(
            helper.make_node(
                "Conv",
                [last, f"{name}_w", f"{name}_b"],
                [out],
                name=name,
                kernel_shape=[f["rows"], f["cols"]],
                strides=[f["stride_y"], f["stride_x"]],
                pads=pads,
            )
        )
        last = out
        if follows is not None:
            nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
            last = f"{name}_relu"
    graph = helper.make_graph(
        nodes,
        "dlib_mmod_face_detector",
        [helper.make_tensor_value_info(TILES, TensorProto.FLOAT, ["batch", 3, "rows", "cols"])],
        [helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["batch", 1, "out_rows", "out_cols"])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="faceaudit")
    model.ir_version = 8  # readable by every ONNX Runtime this project supports
    # what the numpy side needs travels with the graph, so a session alone makes a detector
    helper.set_model_props(model, {SPEC_KEY: json.dumps(dataclasses.asdict(spec))})
    return model


def spec_of_session(session) -> MmodSpec:
    """The MmodSpec that build_mmod_graph stored in the graph a session runs."""
    raw = session.get_modelmeta().custom_metadata_map.get(SPEC_KEY)
    if raw is None:
        raise ValueError(f"this ONNX graph was not built by build_mmod_graph (no {SPEC_KEY} metadata)")
    fields = json.loads(raw)
    tuples = {"means": tuple, "window": tuple, "convs": lambda v: tuple(tuple(c) for c in v)}
    return MmodSpec(**{k: tuples.get(k, lambda v: v)(v) for k, v in fields.items()})


# --- dlib's bilinear resize -----------------------------------------------------------------------


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _rows_plan(in_rows: int, out_rows: int):
    """Row sources and fractions: y accumulates in double, as in dlib's loop."""
    scale = (in_rows - 1) / max(out_rows - 1, 1)
    y = np.add.accumulate(np.concatenate([[-scale], np.full(out_rows, scale)]))[1:]
    top = np.floor(y).astype(np.int64)
    bottom = np.minimum(top + 1, in_rows - 1)
    return top, bottom, y - top


def _columns_plan(in_cols: int, out_cols: int):
    """Columns done four at a time by dlib's SIMD loop: their x positions accumulate in float32,
    their fractions are float32. Returns (how many columns that loop does, left, right, fraction)."""
    scale = (in_cols - 1) / max(out_cols - 1, 1)
    x = -4 * scale
    start = _f32([x, x + scale, x + 2 * scale, x + 3 * scale])
    groups = out_cols // 4 + 2
    steps = np.empty((groups + 1, 4), dtype=np.float32)
    steps[0], steps[1:] = start, np.float32(4 * scale)
    lanes = np.add.accumulate(steps, axis=0, dtype=np.float32)[1:]  # sequential, like the loop
    left = np.trunc(lanes).astype(np.int64)
    stops = np.nonzero(left[:, 3] + 1 >= in_cols)[0]
    done = min(4 * int(stops[0]) if stops.size else 4 * groups, out_cols)
    left, lanes = left.reshape(-1)[:done], lanes.reshape(-1)[:done]
    fraction = lanes - left.astype(np.float32)
    return done, left, left + 1, fraction


def _tail_plan(in_cols: int, out_cols: int, first: int):
    """The columns after the SIMD loop: x accumulates in double from ``first``."""
    scale = (in_cols - 1) / max(out_cols - 1, 1)
    count = out_cols - first
    x = np.add.accumulate(np.concatenate([[-scale + first * scale], np.full(count, scale)]))[1:]
    left = np.floor(x).astype(np.int64)
    return left, np.minimum(left + 1, in_cols - 1), x - left


def resize_float(src: np.ndarray, out_rows: int, out_cols: int, out: np.ndarray | None = None) -> np.ndarray:
    """dlib's ``resize_image`` of float32 planes [..., rows, cols] (what its CPU ``resize_bilinear``
    runs per channel), bit for bit; into ``out`` if given (it must not overlap ``src``)."""
    in_rows, in_cols = src.shape[-2:]
    if out is None:
        out = np.empty(src.shape[:-2] + (out_rows, out_cols), dtype=np.float32)
    if out.size == 0 or src.size == 0:
        return out
    top, bottom, tb = _rows_plan(in_rows, out_rows)
    tbf, itbf = _f32(tb)[:, None], _f32(1 - tb)[:, None]
    t, b = np.take(src, top, axis=-2), np.take(src, bottom, axis=-2)
    done, left, right, lr = _columns_plan(in_cols, out_cols)
    if done:
        # ((tl*w1 + tr*w2) + bl*w3) + br*w4 in float32, as dlib's SIMD loop sums; in place, as
        # this is most of the time spent tiling
        ilr = np.float32(1) - lr
        acc = out[..., :done]
        np.multiply(np.take(t, left, axis=-1), itbf * ilr, out=acc)
        for rows, cols, weight in ((t, right, itbf * lr), (b, left, tbf * ilr), (b, right, tbf * lr)):
            term = np.take(rows, cols, axis=-1)
            term *= weight
            acc += term
    if done < out_cols:
        left, right, frac = _tail_plan(in_cols, out_cols, done)
        lr = _f32(frac)
        ilr = np.float32(1) - lr
        upper = (ilr * t[..., left] + lr * t[..., right]).astype(np.float64)
        lower = (ilr * b[..., left] + lr * b[..., right]).astype(np.float64)
        out[..., done:] = (1 - tb)[:, None] * upper + tb[:, None] * lower
    return out


def resize_rgb(src: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
    """dlib's ``resize_image`` of a uint8 RGB image [rows, cols, 3], bit for bit (the SIMD loop
    truncates a float32 sum; the tail truncates a double one)."""
    in_rows, in_cols = src.shape[:2]
    out = np.empty((out_rows, out_cols, 3), dtype=np.uint8)
    if out.size == 0 or src.size == 0:
        return out
    top, bottom, tb = _rows_plan(in_rows, out_rows)
    tbf, itbf = _f32(tb)[:, None, None], _f32(1 - tb)[:, None, None]
    pixels = src.astype(np.float32)
    t, b = pixels[top], pixels[bottom]
    done, left, right, lr = _columns_plan(in_cols, out_cols)
    if done:
        lr3, ilr3 = lr[None, :, None], (np.float32(1) - lr)[None, :, None]
        value = ((itbf * ilr3) * t[:, left] + (itbf * lr3) * t[:, right] + (tbf * ilr3) * b[:, left]) + (
            tbf * lr3
        ) * b[:, right]
        out[:, :done] = np.trunc(value)
    if done < out_cols:
        left, right, frac = _tail_plan(in_cols, out_cols, done)
        lr, ilr, tb3 = frac[None, :, None], (1 - frac)[None, :, None], tb[:, None, None]
        t64, b64 = t.astype(np.float64), b.astype(np.float64)
        value = (1 - tb3) * (ilr * t64[:, left] + lr * t64[:, right]) + tb3 * (
            ilr * b64[:, left] + lr * b64[:, right]
        )
        out[:, done:] = np.trunc(value)
    return out


# --- upsampling (the Python binding's pyramid_up) and the tiled pyramid ---------------------------


def upsampled_size(rows: int, cols: int) -> tuple[int, int]:
    """The size ``pyramid_up`` with ``pyramid_down<2>`` gives: the image's rectangle mapped up by
    p -> (p + (1.25, 0.75)) * 2 and rounded, so W x H becomes 2W+2 x 2H+1."""
    if rows * cols == 0:
        return 0, 0
    return _lround((rows - 1 + 0.75) * 2) + 1, _lround((cols - 1 + 1.25) * 2) + 1


def pyramid_up(image: np.ndarray) -> np.ndarray:
    rows, cols = upsampled_size(*image.shape[:2])
    return resize_rgb(image, rows, cols)


def level_sizes(rows: int, cols: int) -> list[tuple[int, int]]:
    """(rows, cols) of each pyramid level: 5/6 of the one before, rounded down, while at least
    ``MIN_LEVEL_ROWS`` rows remain (dlib's find_pyramid_down_output_image_size for pyramid_down<6>)."""
    if rows * cols == 0:
        return []
    rate = 5.0 / 6.0
    sizes = [(rows, cols)]
    while True:
        rows, cols = math.floor(rate * rows), math.floor(rate * cols)
        if rows * cols == 0 or rows < MIN_LEVEL_ROWS:
            return sizes
        sizes.append((rows, cols))


def tile_layout(rows: int, cols: int, padding: int = 10, outer: int = 11) -> tuple[list[Rect], int, int]:
    """Where dlib puts each level in the tiled image, and the tiled image's (rows, cols): the
    levels go down a first column until the rest fit beside the smaller ones, then up a second
    column from the bottom right; levels that would overlap the first are dropped."""
    sizes = level_sizes(rows, cols)
    if not sizes:
        return [], 0, 0
    h0, w0 = sizes[0]
    total = sum(h + padding for h, _ in sizes) - 2 * padding
    height, prev_width = 0, 0
    for h, w in sizes:
        # dlib compares these as unsigned longs: a negative difference wraps to a huge number
        fits_beside = w <= (w0 - prev_width - padding) % _U64
        half_done = ((height - h0) * 2) % _U64 >= (total - h0) % _U64
        if fits_beside and half_done:
            break
        height += h + padding
        prev_width = w
    height -= padding
    rects: list[Rect] = []
    y = outer
    while y < height + outer and len(rects) < len(sizes):
        h, w = sizes[len(rects)]
        rects.append(Rect(outer, y, outer + w - 1, y + h - 1))
        y += h + padding
    y -= padding
    while rects and len(rects) < len(sizes):
        h, w = sizes[len(rects)]
        rect = Rect(outer + w0 - w, y - h, outer + w0 - 1, y - 1)
        if _intersects(rects[0], rect):
            break
        rects.append(rect)
        y -= h + padding
    return rects, height + 2 * outer, w0 + 2 * outer


def _intersects(a: Rect, b: Rect) -> bool:
    return max(a.left, b.left) <= min(a.right, b.right) and max(a.top, b.top) <= min(a.bottom, b.bottom)


def tile_pyramid(images: np.ndarray, spec: MmodSpec) -> tuple[np.ndarray, list[Rect]]:
    """dlib's input tensor for same-size uint8 RGB images [N, rows, cols, 3]: float32 [N, 3, R, C]."""
    n, rows, cols = images.shape[:3]
    rects, out_rows, out_cols = tile_layout(rows, cols, spec.padding, spec.outer_padding)
    tiles = np.zeros((n, 3, out_rows, out_cols), dtype=np.float32)
    if not rects:
        return tiles, rects
    first = rects[0]
    means = _f32(spec.means)[None, :, None, None]
    # (pixel - mean) in float32, then / 256 (exact): dlib's input layer
    tiles[:, :, first.top : first.bottom + 1, first.left : first.right + 1] = (
        images.transpose(0, 3, 1, 2).astype(np.float32) - means
    ) / np.float32(256)
    # Images under about 55 px wide make dlib's layout stack tiles over each other, and dlib's
    # in-place resize then reads pixels it has just written; here each level is resized from its
    # source as it was. Both gave the same detections on 192 small cases (12 test photos at 20-90
    # px, upsample 0 and 1).
    for above, rect in zip(rects, rects[1:], strict=False):
        src = tiles[:, :, above.top : above.bottom + 1, above.left : above.right + 1]
        dest = tiles[:, :, rect.top : rect.bottom + 1, rect.left : rect.right + 1]
        if _intersects(above, rect):
            dest[...] = resize_float(src, rect.height, rect.width)
        else:
            resize_float(src, rect.height, rect.width, out=dest)
    return tiles, rects


# --- from scores to boxes -------------------------------------------------------------------------


def _lround(x: float) -> int:
    """C's lround: halves away from zero (Python's round takes them to even)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def output_size(rows: int, cols: int, spec: MmodSpec) -> tuple[int, int]:
    for kernel, stride, pad in spec.convs:
        rows = (rows + 2 * pad - kernel) // stride + 1 if rows + 2 * pad >= kernel else 0
        cols = (cols + 2 * pad - kernel) // stride + 1 if cols + 2 * pad >= kernel else 0
    return rows, cols


def output_to_input(r: int, c: int, spec: MmodSpec) -> tuple[float, float]:
    """The tiled-image point an output position looks at (dlib's map_output_to_input through each
    convolution, from the output down)."""
    x, y = float(c), float(r)
    for kernel, stride, pad in reversed(spec.convs):
        x = x * stride - pad + kernel // 2
        y = y * stride - pad + kernel // 2
    return x, y


def _nearest_level(rects: list[Rect], x: float, y: float) -> int:
    best, best_dist = 0, math.inf
    for i, rect in enumerate(rects):
        if rect.contains(x, y):
            return i
        dx = x - min(max(x, rect.left), rect.right)
        dy = y - min(max(y, rect.top), rect.bottom)
        dist = math.hypot(dx, dy)
        if dist < best_dist:
            best, best_dist = i, dist
    return best


def _up(value: float, levels: int) -> float:
    for _ in range(levels):  # pyramid_down<6>::point_up
        value = value * (6 / 5.0) + 0.3
    return value


def window_box(x: float, y: float, rects: list[Rect], spec: MmodSpec) -> Rect:
    """dlib's box for a detection window centred at tiled-image point (x, y): the window in the
    level whose tile holds the point (or is nearest), mapped up to the image and rounded."""
    width, height = spec.window
    half_w, half_h = (width - 1) / 2, (height - 1) / 2
    level = _nearest_level(rects, x, y)
    tile = rects[level]
    x, y = x - tile.left, y - tile.top
    corners = (_up(x - half_w, level), _up(y - half_h, level), _up(x + half_w, level), _up(y + half_h, level))
    return Rect(*(_lround(v) for v in corners))


def overlaps(a: Rect, b: Rect, iou_thresh: float, covered_thresh: float) -> bool:
    """dlib's test_box_overlap on integer rectangles: the intersection over the area of the
    bounding box of both (not over the union), or over either box's own area."""
    iw = min(a.right, b.right) - max(a.left, b.left) + 1
    ih = min(a.bottom, b.bottom) - max(a.top, b.top) + 1
    if iw <= 0 or ih <= 0:
        return False
    inner = float(iw * ih)
    outer = (max(a.right, b.right) - min(a.left, b.left) + 1) * (
        max(a.bottom, b.bottom) - min(a.top, b.top) + 1
    )
    area_a, area_b = a.width * a.height, b.width * b.height
    return inner / outer > iou_thresh or inner / area_a > covered_thresh or inner / area_b > covered_thresh


def suppress(candidates: list[tuple[Rect, float]], iou_thresh: float, covered_thresh: float):
    """Greedy non-maximum suppression, best score first: a box that overlaps any kept one goes."""
    kept: list[tuple[Rect, float]] = []
    for rect, score in sorted(candidates, key=lambda d: -d[1]):
        if not any(overlaps(k, rect, iou_thresh, covered_thresh) for k, _ in kept):
            kept.append((rect, score))
    return kept


def decode(scores: np.ndarray, rects: list[Rect], spec: MmodSpec) -> list[tuple[Rect, float]]:
    """Kept detections of one image's score map [h, w], best first."""
    rows, cols = np.nonzero(scores > 0)
    candidates = []
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        x, y = output_to_input(r, c, spec)
        candidates.append((window_box(x, y, rects, spec), float(scores[r, c])))
    return suppress(candidates, spec.iou_thresh, spec.covered_thresh)


def rect_down(rect: Rect, levels: int) -> Rect:
    """Undo the binding's upsampling: pyramid_down<2>::point_down, p / 2 - (1.25, 0.75), per level."""
    left, top, right, bottom = float(rect.left), float(rect.top), float(rect.right), float(rect.bottom)
    for _ in range(levels):
        left, right = left / 2.0 - 1.25, right / 2.0 - 1.25
        top, bottom = top / 2.0 - 0.75, bottom / 2.0 - 0.75
    return Rect(_lround(left), _lround(top), _lround(right), _lround(bottom))


# --- the detector ---------------------------------------------------------------------------------


class MmodDetector:
    """dlib's CNN face detector on an ONNX Runtime session of ``build_mmod_graph``'s graph (the
    graph carries the input means, tiling, window and NMS thresholds of its network file).

    ``max_pixels`` bounds the tiled pixels of one batch: an image whose tiled pyramid alone
    exceeds it is refused before anything is allocated, and batches of same-size images stay
    within it. A tiled image holds about 1.5 times the pixels of the image (a 2048x1536 image:
    11.5 M), each upsampling multiplies that by 4, and a run on the CPU peaks at about 43 bytes per
    tiled pixel (tiles, activations and ONNX Runtime's buffers; measured on that image and on four
    1024x768 ones), so the default 24 M bounds a batch to about 1 GB.
    """

    def __init__(self, session, max_batch: int = 8, max_pixels: int = 24_000_000):
        self.session = session
        self.spec = spec_of_session(session)
        self.max_batch = max(1, max_batch)
        self.max_pixels = max_pixels

    def detect(
        self, images: list[np.ndarray], upsample: int = 0
    ) -> list[list[tuple[int, int, int, int, float]]]:
        """(left, top, right, bottom, score) per face, best first, for each image in order; the
        numbers dlib.cnn_face_detection_model_v1(image, upsample) gives."""
        if upsample < 0:
            raise ValueError(f"upsample must be 0 or more, not {upsample}")
        sizes = [self._checked_size(image, upsample) for image in images]
        results: list[list] = [[] for _ in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        for (rows, cols), members in groups.items():
            _, tiled_rows, tiled_cols = tile_layout(rows, cols, self.spec.padding, self.spec.outer_padding)
            per_batch = max(1, min(self.max_batch, self.max_pixels // max(1, tiled_rows * tiled_cols)))
            for start in range(0, len(members), per_batch):
                batch = members[start : start + per_batch]
                for i, found in zip(
                    batch, self._detect_batch([images[i] for i in batch], upsample), strict=True
                ):
                    results[i] = found
        return results

    def _checked_size(self, image: np.ndarray, upsample: int) -> tuple[int, int]:
        """The size the network sees; a ValueError, before any allocation, for a wrong image or
        one whose tiled pyramid exceeds the pixel budget."""
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            raise ValueError("MMOD detection takes uint8 RGB images of shape (rows, cols, 3)")
        rows, cols = image.shape[:2]
        for _ in range(upsample):
            rows, cols = upsampled_size(rows, cols)
        _, tiled_rows, tiled_cols = tile_layout(rows, cols, self.spec.padding, self.spec.outer_padding)
        if tiled_rows * tiled_cols > self.max_pixels:
            raise ValueError(
                f"a {image.shape[1]}x{image.shape[0]} image upsampled {upsample} times tiles to "
                f"{tiled_cols}x{tiled_rows} pixels, beyond the detector's budget of {self.max_pixels}; "
                "downscale it first"
            )
        return rows, cols

    def _detect_batch(self, images: list[np.ndarray], upsample: int):
        for _ in range(upsample):
            images = [pyramid_up(image) for image in images]
        tiles, rects = tile_pyramid(np.stack(images), self.spec)
        out_rows, out_cols = output_size(tiles.shape[2], tiles.shape[3], self.spec)
        if not rects or out_rows <= 0 or out_cols <= 0:
            return [[] for _ in images]
        scores = self.session.run([SCORES], {TILES: tiles})[0]
        found = []
        for image_scores in scores[:, 0]:
            kept = decode(image_scores, rects, self.spec)
            found.append([(*_as_tuple(rect_down(rect, upsample)), score) for rect, score in kept])
        return found


def _as_tuple(rect: Rect) -> tuple[int, int, int, int]:
    return rect.left, rect.top, rect.right, rect.bottom
