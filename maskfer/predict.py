"""`maskfer predict`: the expressions of the faces in images, folders of images and videos.

A thin layer over :class:`maskfer.predictor.Predictor` (the Python API): it expands folders, sends
videos frame by frame and keeps going past unreadable files (reported per file).
"""
from __future__ import annotations

from pathlib import Path

from maskfer.evaluate import EvalError
from maskfer.predictor import Predictor
from maskfer.video import VIDEO_SUFFIXES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def collect_inputs(inputs: list[str]) -> list[Path]:
    """The files named, with folders expanded (images and videos, sorted)."""
    files: list[Path] = []
    known = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix.lower() in known and q.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise EvalError(f"{p}: no such file or folder")
    if not files:
        raise EvalError(f"no images found in {', '.join(inputs)} (looked for {', '.join(sorted(known))})")
    return files


def predict(run: str | Path | None, inputs: list[str], device: str = "auto", batch_size: int = 32,
            trust_plugins: bool = False, model: str | None = None, detect: str = "blazeface",
            every: int = 1, backend: str = "torch") -> list[dict]:
    """Rows of :meth:`Predictor.predict` for every input (``input`` is the file's path). ``run``: a run
    directory; or ``model``: a `maskfer export` folder or hub id. ``trust_plugins`` (--trust-plugins):
    allow a plug-in encoder spec named in the run's config.json to be imported; off by default, since a run
    directory may come from anyone. ``every``: the frame step in videos. ``backend`` "onnx" (with ``model``): the
    folder's model.onnx under onnxruntime."""
    if (run is None) == (model is None):
        raise EvalError("give either a run directory (--run) or a packaged model (--model), not both")
    files = collect_inputs(inputs)
    kw = dict(device=device, detect=detect, trust_plugins=trust_plugins, batch_size=batch_size)
    if backend != "torch" and run is not None:
        raise EvalError(f"--backend {backend} runs an exported model: export the run (maskfer export RUN DIR "
                        "--format onnx) and pass --model DIR")
    p = Predictor.from_run(run, **kw) if run is not None else Predictor.from_pretrained(model, backend=backend, **kw)
    rows: list[dict] = []
    images = [f for f in files if f.suffix.lower() not in VIDEO_SUFFIXES]
    rows += p.predict(images) if images else []
    for v in (f for f in files if f.suffix.lower() in VIDEO_SUFFIXES):
        rows += p.predict_video(v, every=every)  # a video that fails midway keeps its frames, then an error row
    order = {str(f): i for i, f in enumerate(files)}
    return sorted(rows, key=lambda r: order[r["input"]])  # stable: faces and frames keep their order
