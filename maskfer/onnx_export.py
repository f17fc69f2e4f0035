"""One-graph ONNX export of a trained run: raw aligned face pixels in, class probabilities out.

The exported graph is the run's whole inference path, so a deployment needs onnxruntime only:

    uint8 (N, S, S, 3) RGB  --resize01 + the encoder's tensor_preprocess + frozen encoder-->  features (N, C)
                            --prepare_images at the CNN's input size------------------------>  images (N, 3, s, s)
    model(images, features) --softmax-->  probabilities (N, 7) in featcache.taxonomy.CLASSES order

S is the size of the uint8 images the run was trained from (the store's image cache). The features are
computed as ``--online-encoder`` evaluation computes them (maskfer.online.OnlineEncoder.encode): from the
S x S face by the batched on-device preprocessing, not from the full-resolution file by the encoder's PIL
preprocessing that ``featcache build`` uses. cafe reads both inputs, baseline the images only (no encoder in
the graph), linear-probe / linear-head the features only (no CNN).

Antialiased resizes (``F.interpolate(..., antialias=True)``: resize01, the CLIP / EfficientNet batched
preprocessing) have no ONNX operator before opset 18, and opset 18's ``Resize(antialias=1)`` is not
PyTorch's filter. Yet with a fixed input and output size such a resize is a fixed linear map per axis:
``Y = A_h @ X @ A_w^T``. The export maps each of them to two MatMuls whose matrices are computed by the same
PyTorch kernel applied to the identity, so the graph computes the training path's numbers (up to float
summation order) and the torch module itself runs the unchanged library code.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.devices import resolve_device
from featcache.encoders import FingerprintMismatch, create_recorded_encoder
from featcache.encoders.batched import input_size, tensor_preprocess
from featcache.errors import FerError
from featcache.taxonomy import CLASSES
from featcache.views import resize01
from maskfer import rundir
from maskfer.augment import prepare_images, to_float_nchw
from maskfer.evaluate import load_run

__all__ = ["ExportError", "FusedClassifier", "fused_module", "export_onnx", "OnnxClassifier", "INPUT_NAME",
           "OUTPUT_NAME", "METADATA_KEYS", "DEFAULT_OPSET"]

INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
DEFAULT_OPSET = 17
FORMAT_VERSION = "1"
# metadata_props of the file (all strings; JSON where the value is structured)
METADATA_KEYS = ("cafe_fer.format", "cafe_fer.classes", "cafe_fer.image_size", "cafe_fer.input",
                 "cafe_fer.method", "cafe_fer.encoder", "cafe_fer.run")
ONNX_EXTRA = "pip install 'cafe-fer[onnx]'"
# aten ops of the antialiased resizes -> exported as matrix products (see the module docstring)
_AA_RESIZES = ("_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")


class ExportError(FerError):
    pass


class FusedClassifier(nn.Module):
    """uint8 (N, S, S, 3) RGB faces -> probabilities (N, 7): a run's model fused with its input preparation
    and, when the method reads features, its frozen encoder."""

    def __init__(self, model: nn.Module, source_size: int, image_size: int | None, encoder: nn.Module | None,
                 encoder_prep=None, encoder_size: int | None = None):
        super().__init__()
        self.model, self.encoder = model, encoder
        self.source_size, self.image_size = int(source_size), image_size
        self.encoder_prep, self.encoder_size = encoder_prep, encoder_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = prepare_images(pixels, self.image_size, layout="nhwc") if self.image_size is not None else None
        feats = None
        if self.encoder is not None:  # OnlineEncoder.encode's evaluation path: resize01, tensor_preprocess, module
            x = resize01(to_float_nchw(pixels, "nhwc"), self.encoder_size)
            feats = self.encoder(self.encoder_prep(x)).float()
        return torch.softmax(self.model(images, feats)["logits"].float(), dim=1)


def _run_identity(run: Path, cfg, stored: dict) -> dict:
    return {"name": Path(run).resolve().name, "config_hash": stored.get("config_hash"), "train": cfg.train,
            "backbone": cfg.backbone if cfg.method_spec.needs_images else None,
            "checkpoint_epoch": stored.get("checkpoint_epoch")}


def _load(run_dir, device, trust_plugins):
    run = Path(run_dir)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model, cfg, stored = load_run(run, dev)
    spec = cfg.method_spec
    source_size = int(stored.get("source_image_size") or cfg.image_size)
    encoder = prep = enc_size = None
    if spec.needs_features:
        info = stored["encoder"]
        try:
            enc = create_recorded_encoder(info["spec"], info["fingerprint"], str(dev), recorded_by=f"run {run}",
                                          trust_plugins=trust_plugins, preprocess=info.get("preprocess") or "clip",
                                          source=f"{run / rundir.CONFIG} (field encoder.spec)")
        except FingerprintMismatch as e:
            raise ExportError(f"{e}: its export would not compute the run's features") from None
        encoder, prep, enc_size = enc.module.eval(), tensor_preprocess(enc.metadata), input_size(enc.metadata)
    fused = FusedClassifier(model, source_size, cfg.image_size if spec.needs_images else None, encoder, prep, enc_size)
    return fused.to(dev).eval().requires_grad_(False), cfg, stored


def fused_module(run_dir, device="cpu", trust_plugins: bool = False) -> FusedClassifier:
    """The run's inference as one torch module: uint8 (N, S, S, 3) NHWC RGB -> probabilities (N, 7) in CLASSES
    order, S = ``.source_size``. The encoder (when the method reads features) must load with the fingerprint the
    run recorded; ``trust_plugins`` lets a plug-in encoder spec named in the run's config.json be imported."""
    return _load(run_dir, device, trust_plugins)[0]


# ---------------------------------------------------------------------------- antialiased resize as MatMuls
def _axis_matrix(op: str, n_in: int, n_out: int, align_corners: bool, axis: int) -> torch.Tensor:
    """(n_out, n_in) weights of the aten resize ``op`` along one axis, read off the kernel itself: channel j of
    the probe is the j-th basis image (a line of ones at row / column j), 2 px wide along the other axis, which a
    2 -> 2 resize leaves as it is. (Not 1 px: on an (n, 1, n, 1) probe the CPU kernel of torch 2.13 returned
    wrong weights; :func:`resize_matrices` checks the result against the kernel on a real batch.)"""
    basis = torch.eye(n_in, dtype=torch.float32)
    if axis == 0:
        probe, size = basis.view(1, n_in, n_in, 1).expand(1, n_in, n_in, 2).contiguous(), [n_out, 2]
    else:
        probe, size = basis.view(1, n_in, 1, n_in).expand(1, n_in, 2, n_in).contiguous(), [2, n_out]
    out = getattr(torch._C._nn, op)(probe, size, align_corners, None)  # (1, n_in, n_out, 2) / (1, n_in, 2, n_out)
    return (out[0, :, :, 0] if axis == 0 else out[0, :, 0, :]).t().contiguous()


def resize_matrices(op: str, in_hw: tuple[int, int], out_hw: tuple[int, int], align_corners: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_h, A_w)`` with ``op(X) == A_h @ X @ A_w.T`` for every (N, C, *in_hw) X; checked against the kernel
    on a random batch (ExportError when they disagree by more than float rounding)."""
    (h, w), (oh, ow) = in_hw, out_hw
    a_h, a_w = _axis_matrix(op, h, oh, align_corners, 0), _axis_matrix(op, w, ow, align_corners, 1)
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    err = (a_h @ x @ a_w.t() - getattr(torch._C._nn, op)(x, [oh, ow], align_corners, None)).abs().max().item()
    if not err <= 1e-5:
        raise ExportError(f"aten::{op} ({h}x{w} -> {oh}x{ow}) is not the separable linear map the export writes "
                          f"(max difference {err:.2e}); this torch version resizes differently")
    return a_h, a_w


def _matrix_resize_symbolic(op: str):
    def symbolic(g, x, output_size, align_corners, scale_factors):
        from torch.onnx import symbolic_helper as sh  # the TorchScript exporter's helpers

        sizes = sh._get_tensor_sizes(x)
        out = sh._maybe_get_const(output_size, "is")
        ac = sh._maybe_get_const(align_corners, "b")
        if (sizes is None or len(sizes) != 4 or not all(isinstance(v, int) for v in sizes[2:])
                or not isinstance(out, (list, tuple)) or not sh._is_none(scale_factors)):
            raise ExportError(f"cannot export aten::{op}: its input height and width and output size must be "
                              f"fixed numbers (got input {sizes}, output size {out})")
        (h, w), (oh, ow) = sizes[2:], out
        a_h, a_w = resize_matrices(op, (h, w), (oh, ow), bool(ac))
        y = g.op("MatMul", g.op("Constant", value_t=a_h), x)                   # (N, C, oh, w)
        return g.op("MatMul", y, g.op("Constant", value_t=a_w.t().contiguous()))  # (N, C, oh, ow)

    return symbolic


def _metadata(fused: FusedClassifier, cfg, stored: dict, run: Path) -> dict[str, str]:
    enc = stored["encoder"] if cfg.method_spec.needs_features else None
    s = fused.source_size
    return {
        "cafe_fer.format": FORMAT_VERSION,
        "cafe_fer.classes": json.dumps(list(CLASSES)),
        "cafe_fer.image_size": str(s),
        "cafe_fer.input": json.dumps({"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", s, s, 3],
                                      "layout": "NHWC", "channels": "RGB", "range": "0-255"}),
        "cafe_fer.method": cfg.method,
        "cafe_fer.encoder": json.dumps(None if enc is None else {k: enc.get(k) for k in
                                                                  ("spec", "key", "fingerprint", "dim", "preprocess")}),
        "cafe_fer.run": json.dumps(_run_identity(run, cfg, stored)),
    }


def export_onnx(run_dir, out_path, opset: int = DEFAULT_OPSET, trust_plugins: bool = False) -> dict:
    """Write the run's fused inference (:func:`fused_module`) as one ONNX graph at ``out_path``: input "pixels"
    uint8 (N, S, S, 3), output "probabilities" float32 (N, 7), dynamic N; metadata_props ``METADATA_KEYS``.
    Checked with onnx.checker before it replaces ``out_path``. Returns what was written."""
    try:
        import onnx
    except ImportError:
        raise ExportError(f"ONNX export needs the onnx package: {ONNX_EXTRA}") from None
    run, out_path = Path(run_dir), Path(out_path)
    fused, cfg, stored = _load(run, "cpu", trust_plugins)
    s = fused.source_size
    example = torch.randint(0, 256, (2, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".tmp-", dir=out_path.parent)
    os.close(fd)
    try:
        for op in _AA_RESIZES:
            torch.onnx.register_custom_op_symbolic(f"aten::{op}", _matrix_resize_symbolic(op), opset)
        try:
            with warnings.catch_warnings():  # the legacy exporter's deprecation note and tracer notes on shapes
                warnings.simplefilter("ignore")
                torch.onnx.export(fused, (example,), tmp, dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except torch.onnx.errors.OnnxExporterError as e:
            raise ExportError(f"cannot export run {run} to ONNX opset {opset}: {e}") from None
        finally:
            for op in _AA_RESIZES:
                torch.onnx.unregister_custom_op_symbolic(f"aten::{op}", opset)
        proto = onnx.load(tmp)
        meta = _metadata(fused, cfg, stored, run)
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        rundir.share_file(tmp)
        os.replace(tmp, out_path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"path": str(out_path), "bytes": out_path.stat().st_size, "opset": opset,
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", s, s, 3]},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(CLASSES)]},
            "image_size": s, "method": cfg.method, "classes": list(CLASSES), "metadata": meta}


class OnnxClassifier:
    """An exported run under onnxruntime (CPUExecutionProvider): ``probabilities(uint8 (N, S, S, 3))``."""

    def __init__(self, path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(f"running an exported model needs onnxruntime: {ONNX_EXTRA}") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = opts.inter_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable/invalid files
            raise ExportError(f"{self.path}: onnxruntime cannot load it: {type(e).__name__}: {e}") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in ("cafe_fer.classes", "cafe_fer.image_size") if k not in self.metadata]
        if missing:
            raise ExportError(f"{self.path}: not a cafe-fer export (metadata lacks {', '.join(missing)}); "
                              "write one with maskfer.onnx_export.export_onnx")
        self.classes: list[str] = json.loads(self.metadata["cafe_fer.classes"])
        self.image_size = int(self.metadata["cafe_fer.image_size"])
        self.method = self.metadata.get("cafe_fer.method")

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) RGB aligned faces -> float32 (N, len(classes)) probabilities."""
        s = self.image_size
        shape = getattr(pixels, "shape", None)
        if (not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4
                or tuple(shape[1:]) != (s, s, 3) or shape[0] < 1):
            got = (f"{type(pixels).__name__}" if not isinstance(pixels, np.ndarray)
                   else f"{pixels.dtype} array of shape {tuple(shape)}")
            raise ExportError(f"{self.path}: expected a uint8 array of shape (N, {s}, {s}, 3) (RGB faces resized "
                              f"to {s} x {s}, N >= 1), got a {got}")
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(pixels)})[0]
