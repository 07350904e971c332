"""ONNX Runtime sessions for the insightface backend: providers from config, uint8 input, batching.

After Beam's ``onnx_inference.py``: the session is built from the provider list it is given, never
from what the machine happens to offer. A GPU provider that was asked for and is not there is a
``FatalError`` that says why; ONNX Runtime's own habit of quietly running on the CPU when CUDA
fails to load is caught by checking which providers the session actually got.

``with_pixel_input`` puts the normalisation inside the graph: the session takes uint8 NHWC pixels
and casts, centres, scales and transposes them on the device, so four times fewer bytes cross
the bus and the host does no float work. ``load_runner`` finds out whether a graph can run a whole
batch at once (a symbolic batch dimension, or a batch-1 graph whose batch dimension can be freed
without changing its results) or must run image by image; callers see the same ``run`` either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FatalError

PIXELS = "pixels"  # name of the uint8 NHWC input that with_pixel_input adds

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise FatalError(
            "the insightface backend needs ONNX Runtime: pip install 'faceaudit[insightface]' "
            f"(CPU) or 'faceaudit[gpu]' (CUDA/TensorRT) ({exc})"
        ) from exc
    return onnxruntime


def import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise FatalError(
            f"the insightface backend needs onnx: pip install 'faceaudit[insightface]' ({exc})"
        ) from exc
    return onnx


@dataclass
class SessionOptions:
    """How to build sessions: provider short names in order, and their settings."""

    providers: list[str] = field(default_factory=lambda: ["cpu"])
    trt_cache: str | None = None  # TensorRT engine and timing cache folder
    fp16: bool = True
    threads: int = 0  # CPU intra-op threads (0: ONNX Runtime's default)
    tf32: bool = True  # CUDA: TF32 maths allowed (False where float32 results must match a CPU's)
    spinning: bool = True  # CPU threads spin between runs (off where worker processes share cores)


def provider_names(names: list[str]) -> list[str]:
    """ONNX Runtime's names for our short ones; an unknown name is a configuration error."""
    unknown = [n for n in names if n.lower() not in PROVIDERS]
    if unknown or not names:
        raise FatalError(f"unknown or no providers {names}: choose from {sorted(PROVIDERS)}")
    return [PROVIDERS[n.lower()] for n in names]


def check_available(names: list[str], available: list[str]) -> None:
    """Refuse, with the reason, a requested provider that this ONNX Runtime build lacks."""
    missing = [n for n in provider_names(names) if n not in available]
    if not missing:
        return
    hint = (
        "install faceaudit[gpu] (onnxruntime-gpu, and not the CPU-only onnxruntime beside it), "
        "on a machine with an NVIDIA driver, CUDA 12 and cuDNN 9 (and TensorRT 10 for tensorrt)"
    )
    raise FatalError(
        f"providers {missing} were requested but this ONNX Runtime offers only {available}; "
        f"{hint}, or set model.providers: [cpu] to run on the CPU on purpose"
    )


def provider_list(options: SessionOptions, profile: tuple[str, str, str] | None) -> list:
    """(name, settings) pairs for InferenceSession. ``profile``: TensorRT's min/opt/max input shapes."""
    out: list = []
    for name in provider_names(options.providers):
        settings: dict = {}
        if name == PROVIDERS["cuda"] and not options.tf32:
            settings = {"use_tf32": 0}
        if name == PROVIDERS["tensorrt"]:
            settings = {"trt_fp16_enable": options.fp16}
            if options.trt_cache:
                settings.update(
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path=options.trt_cache,
                    trt_timing_cache_enable=True,
                    trt_timing_cache_path=options.trt_cache,
                )
            if profile:
                low, opt, high = profile
                settings.update(
                    trt_profile_min_shapes=low, trt_profile_opt_shapes=opt, trt_profile_max_shapes=high
                )
        out.append((name, settings))
    return out


def open_session(model_bytes: bytes, options: SessionOptions, profile: tuple[str, str, str] | None = None):
    """An InferenceSession on exactly the requested providers, or a FatalError saying why not."""
    ort = import_ort()
    check_available(options.providers, ort.get_available_providers())
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT warns about every node it places on the CPU; not news here
    if options.threads:
        so.intra_op_num_threads = options.threads
    if not options.spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if options.trt_cache:
        os.makedirs(options.trt_cache, exist_ok=True)
    session = ort.InferenceSession(model_bytes, sess_options=so, providers=provider_list(options, profile))
    wanted = provider_names(options.providers)
    got = session.get_providers()
    lost = [n for n in wanted if n not in got]
    if lost:  # ORT falls back to the CPU when CUDA or TensorRT libraries fail to load; we refuse
        raise FatalError(
            f"ONNX Runtime could not start {lost} (the session got {got}); see its log for the "
            "missing library (libcudnn, libnvinfer, ...) or set model.providers: [cpu]"
        )
    return session


# --- graph surgery ---------------------------------------------------------------------------


def with_pixel_input(model, mean: float, std: float):
    """A copy of an NCHW float model that takes uint8 NHWC ``pixels`` and normalises them itself:
    ``(pixels - mean) / std`` as float32, transposed to NCHW (what cv2.dnn.blobFromImage feeds)."""
    onnx = import_onnx()
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    old = graph.input[0]
    n, c, h, w = list(old.type.tensor_type.shape.dim)
    pixels = helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, [_dim(n), _dim(h), _dim(w), _dim(c)])
    nodes = [helper.make_node("Cast", [PIXELS], ["pixels_float"], to=TensorProto.FLOAT, name="pixels_cast")]
    last = "pixels_float"
    if mean or std != 1:
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(mean, dtype=np.float32), "pixels_mean"),
                numpy_helper.from_array(np.array(1 / std, dtype=np.float32), "pixels_scale"),
            ]
        )
        nodes += [
            helper.make_node("Sub", [last, "pixels_mean"], ["pixels_centred"], name="pixels_centre"),
            helper.make_node(
                "Mul", ["pixels_centred", "pixels_scale"], ["pixels_scaled"], name="pixels_scale"
            ),
        ]
        last = "pixels_scaled"
    nodes.append(helper.make_node("Transpose", [last], [old.name], perm=[0, 3, 1, 2], name="pixels_nchw"))
    graph.input.remove(old)
    graph.input.insert(0, pixels)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)  # nodes stay in topological order
    return out


def _dim(d) -> int | str:
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    return d.dim_param or "?"


def free_batch(model):
    """A copy whose input and outputs no longer fix the batch dimension to 1."""
    onnx = import_onnx()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    dims[0].ClearField("dim_value")
    dims[0].dim_param = "batch"
    for value in out.graph.output:  # their first dim may be 1 or the folded anchor count: let ORT infer
        for d in value.type.tensor_type.shape.dim:
            d.ClearField("dim_value")
            d.dim_param = ""
    return out


def batch_dim(model) -> int | None:
    """The fixed batch size of a model's first input, or None when it is symbolic."""
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None


# --- running ---------------------------------------------------------------------------------


@dataclass
class Runner:
    """Runs a pixel-input session on a uint8 NHWC batch; every output comes back [batch, ...].

    ``layout``: how outputs carry the batch. ``lead``: already [batch, ...] (or batch 1 with an
    extra leading axis added); ``major``/``minor``: rank-2 outputs with the batch folded into the
    first axis image by image, or anchor by anchor (as a batch-1 export generalises either way).
    ``batched`` False: one image per run, results stacked.
    """

    session: Any  # onnxruntime.InferenceSession
    output_names: list[str]
    batched: bool
    layout: str = "lead"
    max_batch: int = 0  # largest batch one run takes (0: any)

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        if not self.batched:
            singles = [self._run_one(pixels[i : i + 1]) for i in range(len(pixels))]
            return [np.concatenate(parts) for parts in zip(*singles, strict=True)]
        step = self.max_batch or len(pixels)
        chunks = [self._run_many(pixels[i : i + step]) for i in range(0, len(pixels), step)]
        return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]

    def _run_one(self, pixels: np.ndarray) -> list[np.ndarray]:
        outs = self.session.run(self.output_names, {PIXELS: pixels})
        return outs if self.layout == "lead" else [o[np.newaxis] for o in outs]

    def _run_many(self, pixels: np.ndarray) -> list[np.ndarray]:
        outs = self.session.run(self.output_names, {PIXELS: pixels})
        return [split_batch(o, len(pixels), self.layout) for o in outs]


def split_batch(out: np.ndarray, batch: int, layout: str) -> np.ndarray:
    """``out`` with the batch as its first axis."""
    if layout == "lead":
        return out
    rows = out.shape[0] // batch
    if layout == "major":
        return out.reshape(batch, rows, *out.shape[1:])
    return out.reshape(rows, batch, *out.shape[1:]).swapaxes(0, 1)


def load_runner(model, options: SessionOptions, probe: np.ndarray, max_batch: int) -> Runner:
    """A Runner for a pixel-input model. ``probe``: two distinct uint8 NHWC images of the input size,
    used to find out whether (and how) a batch of them gives the same results as one at a time."""
    names = [o.name for o in model.graph.output]
    fixed = batch_dim(model)
    if fixed is None:
        session = _session(model, options, probe, max_batch)
        return _probed(session, names, probe, max_batch, layouts=("lead",))
    if fixed != 1:
        raise FatalError(
            f"the model's batch dimension is fixed at {fixed}; only 1 or a symbolic one is supported"
        )
    try:
        freed = _session(free_batch(model), options, probe, max_batch)
        return _probed(freed, names, probe, max_batch, layouts=("major", "minor"))
    except FatalError:
        raise
    except Exception:  # noqa: BLE001 - a graph that will not take a freed batch runs one by one
        session = _session(model, options, probe, 1)
        return Runner(session, names, batched=False, layout=_single_layout(session, names, probe))


class _NotBatchable(Exception):
    pass


def _session(model, options: SessionOptions, probe: np.ndarray, max_batch: int):
    shape = "x".join(str(s) for s in probe.shape[1:])
    profile = (f"{PIXELS}:1x{shape}", f"{PIXELS}:{max_batch}x{shape}", f"{PIXELS}:{max_batch}x{shape}")
    return open_session(model.SerializeToString(), options, profile)


def _probed(session, names, probe, max_batch, layouts) -> Runner:
    """The first layout under which a batch of two equals two single runs, else _NotBatchable."""
    try:
        pair = session.run(names, {PIXELS: probe})
        singles = [session.run(names, {PIXELS: probe[i : i + 1]}) for i in range(len(probe))]
    except Exception as exc:  # a graph that cannot take a batch (fixed reshapes) fails to run
        if layouts == ("lead",):
            raise
        raise _NotBatchable from exc
    for layout in layouts:
        if _same(pair, singles, layout):
            return Runner(session, names, batched=True, layout=layout, max_batch=max_batch)
    if layouts == ("lead",):  # a symbolic batch that mixes images: run one by one
        return Runner(session, names, batched=False, layout=_single_layout(session, names, probe))
    raise _NotBatchable


def _same(pair: list[np.ndarray], singles: list[list[np.ndarray]], layout: str) -> bool:
    """Whether the batched outputs, split under ``layout``, are the single runs' outputs. Relative
    error under 1 %: fp16 engines pick other kernels per batch size, while a wrong layout or a
    graph that mixes images is off by the order of the values themselves."""
    n = len(singles)
    for k, out in enumerate(pair):
        if out.shape[0] % n:
            return False
        split = split_batch(out, n, layout)
        for i, single in enumerate(singles):
            one = single[k] if layout == "lead" else single[k][np.newaxis]
            if split[i : i + 1].shape != one.shape:
                return False
            error = np.linalg.norm(split[i : i + 1] - one) / (np.linalg.norm(one) + 1e-6)
            if error > 0.01:
                return False
    return True


def _single_layout(session, names, probe) -> str:
    """``lead`` when a batch-1 run's outputs already carry the batch axis, else ``major``."""
    outs = session.run(names, {PIXELS: probe[:1]})
    return "lead" if all(o.ndim > 1 and o.shape[0] == 1 for o in outs) else "major"
