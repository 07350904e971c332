"""The networks bench/gpu.py measures, and their helpers: SCRFD-10G- and IResNet-50-shaped PyTorch
networks with random weights, their multiply-add count, ONNX export, and TorchRunner, which runs a
torch module behind our detector's and embedder's ``run(uint8 NHWC batch)`` interface; for dlib's
networks, TorchGraph, which runs their ONNX graphs op by op in PyTorch, and face_crops, the chips
their parity is checked on.

torch is imported inside the functions, so that this module imports without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def torch_networks():
    """(SCRFD-10G-shaped detector, IResNet-50-shaped embedder) as torch modules."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, stride=1, k=3, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(conv_bn(cin, cout, stride), conv_bn(cout, cout, act=False))
            self.skip = (
                nn.Identity()
                if stride == 1 and cin == cout
                else nn.Sequential(nn.AvgPool2d(stride, stride), conv_bn(cin, cout, k=1, act=False))
            )

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    class ScrfdLike(nn.Module):
        """ResNet-v1e stem, BasicBlock stages (3, 4, 2, 3) of (56, 88, 88, 224) channels, a PAFPN of
        56 channels and shared 3-conv heads of 80 channels over strides 8, 16, 32, 2 anchors each:
        SCRFD-10G's layout. Score logits get a fixed map so that every image has exactly two
        confident, far-apart anchors: random weights would otherwise score everything near 0.5."""

        def __init__(self, size=640):
            super().__init__()
            self.stem = nn.Sequential(
                conv_bn(3, 28, 2), conv_bn(28, 28), conv_bn(28, 56), nn.MaxPool2d(3, 2, 1)
            )
            stages, cin = [], 56
            for blocks, cout, stride in ((3, 56, 1), (4, 88, 2), (2, 88, 2), (3, 224, 2)):
                stages.append(
                    nn.Sequential(
                        *[
                            Basic(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                            for i in range(blocks)
                        ]
                    )
                )
                cin = cout
            self.stages = nn.ModuleList(stages)
            self.lateral = nn.ModuleList([conv_bn(c, 56, k=1) for c in (88, 88, 224)])
            self.top_down = nn.ModuleList([conv_bn(56, 56) for _ in range(3)])
            self.bottom_up = nn.ModuleList([conv_bn(56, 56, 2) for _ in range(2)])
            self.head = nn.Sequential(conv_bn(56, 80), conv_bn(80, 80), conv_bn(80, 80))
            self.cls, self.reg, self.kps = (
                nn.Conv2d(80, 2, 3, 1, 1),
                nn.Conv2d(80, 8, 3, 1, 1),
                nn.Conv2d(80, 20, 3, 1, 1),
            )
            n32 = (size // 32) ** 2 * 2
            bias = torch.full((n32,), -30.0)
            cells = n32 // 2
            bias[[2 * (cells // 8), 2 * (cells - cells // 8)]] = 30.0  # two anchors far apart
            self.register_buffer("score_bias", bias)

        def forward(self, x):
            x = self.stem(x)
            feats = []
            for i, stage in enumerate(self.stages):
                x = stage(x)
                if i >= 1:
                    feats.append(x)
            lat = [f(x) for f, x in zip(self.lateral, feats, strict=True)]
            for i in (1, 0):
                lat[i] = lat[i] + nn.functional.interpolate(
                    lat[i + 1], size=lat[i].shape[-2:], mode="nearest"
                )
            outs = [f(x) for f, x in zip(self.top_down, lat, strict=True)]
            for i in (0, 1):
                outs[i + 1] = outs[i + 1] + self.bottom_up[i](outs[i])
            scores, boxes, points = [], [], []
            for level, feat in enumerate(outs):
                h = self.head(feat)
                b = feat.shape[0]
                s = self.cls(h).permute(0, 2, 3, 1).reshape(b, -1, 1)
                if level == 2:
                    s = s + self.score_bias.view(1, -1, 1).to(s.dtype)
                else:
                    s = s - 30
                scores.append(torch.sigmoid(s))
                boxes.append(self.reg(h).permute(0, 2, 3, 1).reshape(b, -1, 4).abs() + 1)  # valid boxes
                points.append(self.kps(h).permute(0, 2, 3, 1).reshape(b, -1, 10))
            return (*scores, *boxes, *points)

    class IBasic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.PReLU(cout),
                nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.skip = (
                nn.Identity()
                if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )

        def forward(self, x):
            return self.body(x) + self.skip(x)

    class IResNet50(nn.Module):
        """insightface's arcface_torch iresnet50: 112x112 in, (3, 4, 14, 3) blocks, 512-d out."""

        def __init__(self):
            super().__init__()
            layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)], 64
            for blocks, cout in ((3, 64), (4, 128), (14, 256), (3, 512)):
                layers += [IBasic(cin if i == 0 else cout, cout, 2 if i == 0 else 1) for i in range(blocks)]
                cin = cout
            self.body = nn.Sequential(*layers, nn.BatchNorm2d(512))
            self.fc = nn.Linear(512 * 7 * 7, 512)
            self.features = nn.BatchNorm1d(512)

        def forward(self, x):
            return self.features(self.fc(torch.flatten(self.body(x), 1)))

    return ScrfdLike().eval(), IResNet50().eval()


def count_gmacs(module, shape) -> float:
    """Multiply-adds of one image through the Conv2d and Linear layers."""
    import torch
    from torch import nn

    total = [0]

    def hook(layer, inputs, output):
        if isinstance(layer, nn.Conv2d):
            total[0] += (
                output.numel()
                * layer.in_channels
                // layer.groups
                * layer.kernel_size[0]
                * layer.kernel_size[1]
            )
        elif isinstance(layer, nn.Linear):
            total[0] += layer.in_features * layer.out_features

    handles = [
        m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        module(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total[0] / 1e9


def export_onnx(module, shape, path: Path, n_outputs: int) -> str | None:
    """Export with a symbolic batch dimension; the reason when it fails."""
    import torch

    names = [f"out{i}" for i in range(n_outputs)]
    axes = {"input.1": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    args = dict(input_names=["input.1"], output_names=names, dynamic_axes=axes, opset_version=17)
    try:
        try:
            torch.onnx.export(module, torch.zeros(2, *shape), str(path), dynamo=False, **args)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(module, torch.zeros(2, *shape), str(path), **args)
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, the torch runtime still runs
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


class TorchRunner:
    """Our Runner interface on a torch module: uint8 NHWC uploaded, normalised and cast on the GPU."""

    def __init__(self, module, device: str, mean: float, std: float, fp16: bool, per_image: bool = False):
        import torch

        self.torch, self.device, self.mean, self.scale = torch, device, mean, 1.0 / std
        self.per_image = per_image  # a batch-1 graph converted from ONNX: one image per forward
        self.dtype = torch.float16 if fp16 else torch.float32
        self.module = module.to(device=device, dtype=self.dtype).to(memory_format=torch.channels_last)

    def tensor(self, pixels: np.ndarray):
        x = self.torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return (
            ((x.float() - self.mean) * self.scale)
            .to(self.dtype)
            .contiguous(memory_format=self.torch.channels_last)
        )

    def forward(self, x):
        with self.torch.inference_mode():
            out = self.module(x)
        return out if isinstance(out, tuple) else (out,)

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        if not self.per_image:
            return [o.float().cpu().numpy() for o in self.forward(self.tensor(pixels))]
        singles = [self.run_one(pixels[i : i + 1]) for i in range(len(pixels))]
        return [np.concatenate(parts) for parts in zip(*singles, strict=True)]

    def run_one(self, pixels: np.ndarray) -> list[np.ndarray]:
        outs = [o.float().cpu().numpy() for o in self.forward(self.tensor(pixels))]
        return [o if o.shape[0] == 1 else o[np.newaxis] for o in outs]  # folded [anchors, k] outputs

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()


def face_crops(images: list[np.ndarray], boxes: list, side: int = 150) -> np.ndarray:
    """Each detected face with a quarter of its size around it, resized to a chip: not dlib's
    aligned chips (that needs dlib's landmarks), but real faces, for the parity check."""
    from PIL import Image

    crops = []
    for image, found in zip(images, boxes, strict=True):
        for left, top, right, bottom, _ in found:
            pad = (right - left) // 4
            box = (left - pad, top - pad, right + pad, bottom + pad)
            crops.append(np.asarray(Image.fromarray(image).crop(box).resize((side, side))))
    return np.stack(crops) if crops else np.zeros((0, side, side, 3), np.uint8)


class TorchGraph:
    """Runs the ONNX graphs of dlib's networks (pipelines/core/models/dlib_resnet_onnx.py and
    dlib_mmod.py) in PyTorch, op by op, in float32: on a GPU machine whose ONNX Runtime has no
    CUDA provider, this is how the same graph, with the same weights, is timed on CUDA. Only the
    ops and attributes those graphs use are known; any other is refused by name, so that a graph
    that changes cannot be run wrongly in silence. Behaves as an ONNX Runtime session for our
    code: ``run(names, feeds)`` and ``get_modelmeta().custom_metadata_map``.

    Checked on the CPU against ONNX Runtime (tests/gpu/test_torch_graph.py): the descriptor to
    about 3e-7 on dlib's chips of the test photos, MMOD's boxes equal."""

    # op -> the attributes it may carry; the values that change the result are checked below
    KNOWN = {
        "Cast": {"to"},
        "Sub": set(),
        "Mul": set(),
        "Add": set(),
        "Transpose": {"perm"},
        "Conv": {"kernel_shape", "strides", "pads", "dilations", "group"},
        "Relu": set(),
        "MaxPool": {"kernel_shape", "strides", "pads"},
        "AveragePool": {"kernel_shape", "strides", "pads"},
        "Pad": {"mode"},
        "GlobalAveragePool": set(),
        "Flatten": {"axis"},
        "MatMul": set(),
    }

    def __init__(self, model, device: str, dtype: str = "float32"):
        """``dtype`` "bfloat16" runs the float32 graph with bfloat16 weights and activations (the
        outputs come back as float32): what bf16 would gain, and how far it moves the results."""
        import torch
        from onnx import helper, numpy_helper

        self.torch, self.device, self.dtype = torch, device, getattr(torch, dtype)
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.consts = {name: self._tensor(a.copy()) for name, a in arrays.items()}
        self.nodes = []
        for node in model.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            self._check(node.op_type, attrs)
            if node.op_type == "Pad":  # the pads as Python ints, not a device tensor read per run
                attrs["pads"] = self._pads(node.input, arrays)
            self.nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        self.outputs = [o.name for o in model.graph.output]
        self.meta = {p.key: p.value for p in model.metadata_props}

    def _check(self, op: str, attrs: dict) -> None:
        if op not in self.KNOWN:
            raise ValueError(f"TorchGraph does not know the op {op}")
        unknown = set(attrs) - self.KNOWN[op]
        if unknown:
            raise ValueError(f"TorchGraph: {op} with unknown attributes {sorted(unknown)}")
        if op == "Cast" and attrs["to"] != 1:  # 1: FLOAT
            raise ValueError(f"TorchGraph: Cast to ONNX type {attrs['to']}, only float32 is known")
        if any(d != 1 for d in attrs.get("dilations", [])) or attrs.get("group", 1) != 1:
            raise ValueError("TorchGraph: dilated or grouped Conv")
        pads = attrs.get("pads", [0, 0, 0, 0])
        if op == "Conv" and (pads[0] != pads[2] or pads[1] != pads[3]):
            raise ValueError("TorchGraph: asymmetric Conv padding")
        if op in ("MaxPool", "AveragePool") and any(pads):
            raise ValueError(f"TorchGraph: padded {op}")
        if op == "Flatten" and attrs.get("axis", 1) != 1:
            raise ValueError("TorchGraph: Flatten on an axis other than 1")
        if attrs.get("mode", b"constant") not in (b"constant", "constant"):
            raise ValueError(f"TorchGraph: Pad mode {attrs['mode']!r}")

    @staticmethod
    def _pads(inputs: list[str], arrays: dict) -> tuple[int, int, int, int]:
        """F.pad's (left, right, top, bottom) of an ONNX Pad on [N, C, H, W] (begins of every axis,
        then ends) padding with zeros, height and width only, as the descriptor's shortcuts do."""
        if len(inputs) < 2 or inputs[1] not in arrays:
            raise ValueError("TorchGraph: a Pad whose pads are not a constant")
        p = [int(v) for v in arrays[inputs[1]].tolist()]
        value = arrays.get(inputs[2]) if len(inputs) > 2 and inputs[2] else None
        if len(p) != 8 or any(p[i] for i in (0, 1, 4, 5)) or (value is not None and float(value) != 0):
            raise ValueError("TorchGraph: a Pad other than zeros on height and width")
        return (p[3], p[7], p[2], p[6])

    def get_modelmeta(self):
        from types import SimpleNamespace

        return SimpleNamespace(custom_metadata_map=self.meta)

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        with self.torch.inference_mode():
            values = dict(self.consts)
            values.update({k: self._tensor(np.ascontiguousarray(v)) for k, v in feeds.items()})
            for op, inputs, outputs, attrs in self.nodes:
                values[outputs[0]] = self._op(op, [values[i] for i in inputs if i], attrs)
            return [values[n].float().cpu().numpy() for n in (names or self.outputs)]

    def _tensor(self, array: np.ndarray):
        """On the device; floating point in this graph's dtype, integers (pixels, pads) as they are."""
        t = self.torch.from_numpy(array).to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def _op(self, op: str, x: list, a: dict):
        F = self.torch.nn.functional
        if op == "Cast":  # to float32 (checked), or the dtype this graph runs in
            return x[0].to(self.dtype)
        if op in ("Sub", "Mul", "Add"):
            return {"Sub": x[0] - x[1], "Mul": x[0] * x[1], "Add": x[0] + x[1]}[op]
        if op == "Transpose":
            return x[0].permute(*a["perm"]).contiguous()
        if op == "Conv":
            pads = a.get("pads", [0, 0, 0, 0])
            bias = x[2] if len(x) > 2 else None
            return F.conv2d(x[0], x[1], bias, stride=tuple(a.get("strides", (1, 1))), padding=tuple(pads[:2]))
        if op == "Relu":
            return F.relu(x[0])
        if op in ("MaxPool", "AveragePool"):
            pool = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
            return pool(x[0], tuple(a["kernel_shape"]), tuple(a.get("strides", (1, 1))))
        if op == "Pad":
            return F.pad(x[0], a["pads"])
        if op == "GlobalAveragePool":
            return x[0].mean(dim=(2, 3), keepdim=True)
        if op == "Flatten":
            return x[0].flatten(1)
        return x[0] @ x[1]  # MatMul
