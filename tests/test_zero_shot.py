"""--method zero-shot: CLIP's text tower turns class prompts into the classifier of the cached image embeddings.

References are computed here with transformers directly (CLIPModel, AutoTokenizer) on a tiny random FULL CLIP
saved as hub repos are (featcache.encoders.random_clip.save_random_full_clip: text + vision towers, a byte-level
CLIP tokenizer, the image processor), loaded offline through the code path of openai/clip-vit-base-patch32.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from cli.featcache_cli import main as featcache_cli
from cli.maskfer_cli import main as maskfer_cli
from featcache import FerError, open_store
from featcache.encoders import create_encoder, fingerprint
from featcache.encoders.random_clip import save_random_full_clip
from featcache.encoders.text import TextTowerError, load_text_tower
from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.config import ConfigError
from maskfer.evaluate import load_run, predict_logits
from maskfer.data import load_split
from maskfer.model import ZeroShotHead
from maskfer.train import train
from maskfer.zero_shot import DEFAULT_PROMPTS, ZeroShotError, class_texts, load_prompts

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
# the words each class's prompts use here, in CLASSES order (a file below lists them in another order)
WORDS = {"surprise": "surprised", "fear": "fearful", "disgust": "disgusted", "happiness": "happy", "sadness": "sad",
         "anger": "angry", "neutral": "neutral"}
TEMPLATES = ["a photo of a {adjective} face.", "a {adjective} person.", "a face that looks {adjective}."]


@pytest.fixture(scope="module")
def full_clip(tmp_path_factory) -> Path:
    return save_random_full_clip(tmp_path_factory.mktemp("zs_clip") / "tiny-full-clip", seed=3, **VISION)


@pytest.fixture(scope="module")
def zs_store(tmp_path_factory, full_clip) -> Path:
    """domA / domB (maskfer_fixtures) encoded by the full CLIP; a base of its own, so no other store is touched."""
    return mf.fixture_store(tmp_path_factory.mktemp("zs_fx"), full_clip)


def write_prompts(path: Path, templates=TEMPLATES, order=tuple(reversed(CLASSES)), words=WORDS) -> Path:
    lines = ["templates = [" + ", ".join(json.dumps(t) for t in templates) + "]"]
    lines += [f"[classes.{c}]\nadjective = {json.dumps(words[c])}" for c in order]
    path.write_text("\n".join(lines) + "\n")
    return path


def reference(clip_dir: Path, prompts_by_class: list[list[str]]) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(unit class embeddings (7, D) by the CLIP paper's ensemble, exp(logit_scale), and the naive class vectors:
    the plain mean of the UNnormalised prompt embeddings), computed with transformers directly."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    unit, naive = [], []
    with torch.no_grad():
        for prompts in prompts_by_class:
            out = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
            e = getattr(out, "pooler_output", out)  # a tensor before transformers 5
            naive.append(e.mean(0))
            m = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            unit.append(m / m.norm())
    return torch.stack(unit), float(model.logit_scale.detach().exp()), torch.stack(naive)


def enc_info(clip_dir: Path) -> dict:
    return {"key": "tiny-full-clip", "metadata": create_encoder(str(clip_dir)).metadata}


# ---------------------------------------------------------------- the classifier is CLIP's
def test_class_embeddings_are_the_normalised_prompt_ensemble(full_clip, tmp_path):
    prompts = load_prompts(write_prompts(tmp_path / "p.toml"))
    assert prompts.by_class[CLASSES.index("happiness")] == ("a photo of a happy face.", "a happy person.",
                                                           "a face that looks happy.")
    unit, scale, naive = reference(full_clip, [list(p) for p in prompts.by_class])
    texts = class_texts(enc_info(full_clip), prompts)
    assert texts.logit_scale == pytest.approx(scale)
    torch.testing.assert_close(texts.weight, scale * unit, atol=1e-5, rtol=1e-5)
    # predictions: cosine argmax against the ensemble, on features of any scale; the case is built so that
    # un-normalised prompt embeddings (the naive class vectors) change the argmax
    feats = torch.randn(400, unit.shape[1], generator=torch.Generator().manual_seed(0)) * torch.rand(400, 1) * 20
    want = (F.normalize(feats, dim=-1) @ unit.T).argmax(1)
    assert (want != (feats @ naive.T).argmax(1)).any()
    head = ZeroShotHead(unit.shape[1])
    with torch.no_grad():
        head.fc.weight.copy_(texts.weight)
        head.fc.bias.zero_()
    assert torch.equal(head(None, feats)["logits"].argmax(1), want)


def test_run_logits_equal_clip_logits_per_image(full_clip, zs_store, tmp_path):
    """One template: a run's logits on the stored features are exactly CLIPModel's logits_per_image on the images."""
    from transformers import AutoTokenizer, CLIPModel

    prompt_file = write_prompts(tmp_path / "one.toml", templates=["a photo of a {adjective} face."])
    run = tmp_path / "zs"
    train(mf.small_cfg(zs_store, method="zero-shot", prompts=str(prompt_file)), run, progress=False, log=mf.quiet)
    model, cfg, _ = load_run(run, torch.device("cpu"))
    data, _ = load_split(str(zs_store), "domB:test", "test", None, False, cfg.image_size)
    ours = predict_logits(model, data, cfg.image_size, torch.device("cpu"))

    ds = open_store(zs_store).dataset("domB")
    enc = create_encoder(str(full_clip))
    pixels = torch.stack([enc.preprocess(Image.open(Path(ds.root) / i).convert("RGB")) for i in data.ids])
    clip, tok = CLIPModel.from_pretrained(full_clip).eval(), AutoTokenizer.from_pretrained(full_clip)
    with torch.no_grad():
        want = clip(pixel_values=pixels, **tok([f"a photo of a {WORDS[c]} face." for c in CLASSES], padding=True,
                                                return_tensors="pt")).logits_per_image
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(data.feats[:, 0].norm(dim=-1), torch.ones(len(data)), atol=1e-2)  # stored raw


def test_each_class_embedding_predicts_its_own_class(full_clip, zs_store, tmp_path):
    """Features planted equal to (a positive multiple of) class k's text embedding are predicted as CLASSES[k], for
    every k: a misordered prompt file, taxonomy or ensemble would move them. The file lists the classes backwards."""
    prompt_file = write_prompts(tmp_path / "rev.toml")
    prompts = load_prompts(prompt_file)
    unit, _, _ = reference(full_clip, [[t.format(adjective=WORDS[c]) for t in TEMPLATES] for c in CLASSES])
    planted = mf.copy_store(zs_store, tmp_path / "planted.h5")

    def plant(g):
        key = next(iter(g["encoders"]))
        f = g["encoders"][key]["features"]
        labels = g["labels"][()].astype(np.int64)
        scale = np.random.default_rng(0).uniform(0.5, 30, size=(len(labels), 1, 1))
        f[...] = (unit.numpy()[labels][:, None, :] * scale).repeat(f.shape[1], 1).astype(np.float32)

    mf.edit_store(planted, "domA", plant)
    res = train(mf.small_cfg(planted, method="zero-shot", prompts=str(prompt_file), test=["domA"]), tmp_path / "zs",
                progress=False, log=mf.quiet)
    m = res["results"]["tests"]["domA:test"]
    assert np.array_equal(np.diag(np.diag(m["confusion"])), np.array(m["confusion"]))
    assert all(m["support"][c] > 0 for c in CLASSES) and m["accuracy"] == 1.0
    assert res["last"]["train_acc"] == 1.0
    assert res["last"]["prompts"] == [list(p) for p in prompts.by_class]


# ---------------------------------------------------------------- end to end through the commands
def test_build_train_eval_report_through_the_clis(full_clip, fx_base, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    root = mf.make_colour_dataset(tmp_path / "faces", {"train": 3, "test": 2}, seed=5)
    other = mf.make_colour_dataset(tmp_path / "other", {"test": 2}, domain=1, seed=6)
    model = tmp_path / "models" / "clip"
    shutil.copytree(full_clip, model)
    monkeypatch.chdir(tmp_path)  # the store records a RELATIVE --model; zero-shot runs from elsewhere
    for name, r, splits in (("faces", root, ("train", "test")), ("other", other, ("test",))):
        args = ["build", "--dataset", "folders", "--root", r, "--cache", "f.h5", "--model", "models/clip", "--name",
                name, "--workers", 0, "--image-size", 16, "--quiet"]
        for s in splits:
            args += ["--param", f"split_dirs.{s}={s}"]
        out = CliRunner().invoke(featcache_cli, [str(a) for a in args])
        assert out.exit_code == 0, out.output
    store = tmp_path / "f.h5"
    monkeypatch.chdir(fx_base)
    r = CliRunner().invoke(maskfer_cli, [str(a) for a in (
        "train", "--method", "zero-shot", "--cache", store, "--train", "faces", "--test", "faces,other", "--out",
        tmp_path / "runs/zs", "--device", "cpu", "--epochs", 3, "--quiet")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs/zs"
    for f in (rundir.CONFIG, rundir.LAST, rundir.RESULTS, "metrics.jsonl"):
        assert (run / f).exists(), f
    rows = rundir.read_metrics(run)
    assert len(rows) == 1 and rows[0]["solver"] == "zero-shot" and rows[0]["epoch"] == 2
    assert rows[0]["prompts_sha256"] == hashlib.sha256(DEFAULT_PROMPTS.read_bytes()).hexdigest()
    r = CliRunner().invoke(maskfer_cli, [str(a) for a in ("eval", "--run", run, "--test", "faces,other", "--table",
                                                          tmp_path / "table", "--device", "cpu")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    table = (tmp_path / "table.md").read_text()
    assert "| faces / zero-shot |" in table and "other:test" in table
    r = CliRunner().invoke(maskfer_cli, ["report", str(run), "--out", str(tmp_path / "rep")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "CLIP zero-shot" in page and 'id="prompt-table"' in page and "L2-normalised cached features" in page
    # resuming the finished run changes nothing
    before = (run / rundir.LAST).read_bytes()
    r = CliRunner().invoke(maskfer_cli, [str(a) for a in (
        "train", "--method", "zero-shot", "--cache", store, "--train", "faces", "--out", run, "--device", "cpu",
        "--epochs", 3)], catch_exceptions=False)
    assert r.exit_code == 0 and "already made" in r.output
    assert (run / rundir.LAST).read_bytes() == before


# ---------------------------------------------------------------- encoders without a text tower
def test_vision_only_clip_store_is_refused(store, tmp_path):
    with pytest.raises(ZeroShotError) as ei:
        train(mf.small_cfg(store, method="zero-shot"), tmp_path / "zs", progress=False, log=mf.quiet)
    msg = str(ei.value)
    assert "'tiny-clip'" in msg and "vision-only" in msg
    assert "zero-shot needs a CLIP checkpoint with its text tower" in msg
    # a store built before the text tower was recorded: the checkpoint's config says the same
    old = mf.copy_store(store, tmp_path / "old.h5")

    def forget(g):
        a = g["encoders"]["tiny-clip"].attrs
        meta = json.loads(a["metadata"])
        fp = fingerprint(meta)
        del meta["text_tower"], meta["local_path"]
        assert fingerprint(meta) == fp  # the new fields are outside the fingerprint: old stores keep theirs
        a["metadata"] = json.dumps(meta, sort_keys=True)

    mf.edit_store(old, "domA", forget)
    with pytest.raises(ZeroShotError, match="'clip_vision_model' checkpoint .* without a text tower"):
        train(mf.small_cfg(old, method="zero-shot"), tmp_path / "zs2", progress=False, log=mf.quiet)


def test_cli_refusal_is_one_error_line(store, tmp_path):
    r = CliRunner().invoke(maskfer_cli, [str(a) for a in ("train", "--method", "zero-shot", "--cache", store,
                                                          "--train", "domA", "--out", tmp_path / "zs", "--device",
                                                          "cpu", "--quiet")])
    assert r.exit_code == 1 and r.output.startswith("error: --method zero-shot: encoder 'tiny-clip'"), r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("meta", [
    {"type": "efficientnet-lite0", "model": "efficientnet-lite0", "dim": 1280},
    {"type": "fer-minixception", "model": "fer-minixception", "dim": 256},
    {"type": "plugin", "model": "my_encoders:factory", "dim": 8},
])
def test_encoders_without_text_tower_are_refused(meta):
    with pytest.raises(TextTowerError) as ei:
        load_text_tower(meta, name="enc-key")
    msg = str(ei.value)
    assert f"'enc-key' ({meta['type']} '{meta['model']}')" in msg
    assert "needs a CLIP checkpoint with its text tower" in msg
    assert isinstance(ei.value, FerError)


def test_full_clip_without_tokenizer_or_changed_since_the_build(tiny_full_clip_dir, full_clip, tmp_path):
    with pytest.raises(TextTowerError, match="has no tokenizer files"):
        load_text_tower(create_encoder(str(tiny_full_clip_dir)).metadata, name="k")
    moved = shutil.copytree(full_clip, tmp_path / "clip")
    meta = create_encoder(str(moved)).metadata
    assert load_text_tower(meta).logit_scale > 0
    other = tmp_path / "other"
    save_random_full_clip(other, seed=9, **VISION)
    shutil.copyfile(other / "model.safetensors", moved / "model.safetensors")
    with pytest.raises(TextTowerError, match="has changed since the store was built"):
        load_text_tower(meta, name="k")
    shutil.rmtree(moved)
    with pytest.raises(TextTowerError, match="is not there any more"):
        load_text_tower(meta, name="k")


# ---------------------------------------------------------------- the prompt file
def test_prompt_file_override(full_clip, zs_store, tmp_path):
    default = train(mf.small_cfg(zs_store, method="zero-shot"), tmp_path / "default", progress=False, log=mf.quiet)
    assert default["last"]["prompts_file"] == str(DEFAULT_PROMPTS)
    assert len(default["last"]["prompts"][0]) == len(load_prompts().templates) >= 3
    f = write_prompts(tmp_path / "mine.toml", templates=["a {adjective} face"])
    mine = train(mf.small_cfg(zs_store, method="zero-shot", prompts=str(f)), tmp_path / "mine", progress=False,
                 log=mf.quiet)
    assert mine["last"]["prompts"] == [[f"a {WORDS[c]} face"] for c in CLASSES]
    assert mine["last"]["prompts_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    unit, scale, _ = reference(full_clip, [[f"a {WORDS[c]} face"] for c in CLASSES])
    sd, _, _ = rundir.load_checkpoint(tmp_path / "mine" / rundir.LAST)
    torch.testing.assert_close(sd["fc.weight"], scale * unit, atol=1e-5, rtol=1e-5)
    default_sd, _, _ = rundir.load_checkpoint(tmp_path / "default" / rundir.LAST)
    assert not torch.allclose(sd["fc.weight"], default_sd["fc.weight"])
    assert not sd["fc.bias"].any()
    # the CLI option is generated from the declaration
    r = CliRunner().invoke(maskfer_cli, ["train", "--help"])
    assert "--prompts FILE" in r.output


@pytest.mark.parametrize("text, match", [
    ("templates = ['a {adjective} face']\n[classes.happiness]\nadjective = 'happy'\n",
     "no \\[classes.NAME\\] table for surprise, fear, disgust, sadness, anger, neutral"),
    ("templates = []\n", "'templates' must be a non-empty list"),
    ("templates = ['a {adjective} face']\n" + "".join(f"[classes.{c}]\nnoun = 'x'\n" for c in CLASSES),
     "template 'a {adjective} face' needs {adjective}, which \\[classes.surprise\\] does not define"),
    ("templates = ['a {} face']\n", "placeholder {} is not a field name"),
    ("templates = ['a {w} face']\n[classes.contempt]\nw = 'x'\n", "dropped class 'contempt'"),
    ("templates = ['a {w} face']\n[classes.bored]\nw = 'x'\n", "unknown label 'bored'"),
    ("templates = ['a {w} face']\n[classes.happy]\nw = 'x'\n[classes.happiness]\nw = 'y'\n", "a second time"),
    ("templates = ['x'\n", "not valid TOML"),
    ("prompt = 'x'\n", "unknown key\\(s\\) prompt"),
])
def test_bad_prompt_files_name_the_file_and_key(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ZeroShotError, match=match) as ei:
        load_prompts(p)
    assert str(ei.value).startswith(f"--prompts {p}: ")


def test_options_that_do_not_apply_are_refused(zs_store):
    with pytest.raises(ConfigError, match="--prompts is the class prompt file of --method zero-shot, not of cafe"):
        mf.small_cfg(zs_store, prompts=str(DEFAULT_PROMPTS)).validate()
    with pytest.raises(ConfigError, match="use --feature-norm none"):
        mf.small_cfg(zs_store, method="zero-shot", feature_norm="standardize").validate()
    # a config without --prompts keeps its identity hash (the field is left out at its legacy value)
    assert "prompts" not in mf.small_cfg(zs_store).identity()


def test_hub_checkpoint_loads_its_text_tower_at_the_recorded_commit(full_clip, tmp_path, monkeypatch):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    mf.fake_hub_cache(tmp_path, full_clip, "testorg/tiny-full-clip", commit, monkeypatch)
    meta = create_encoder("testorg/tiny-full-clip").metadata
    assert meta["revision"] == commit and meta["local_path"] is None and meta["text_tower"] is True
    unit, scale, _ = reference(full_clip, [["a photo of a happy face."]] * 7)
    tower = load_text_tower(meta)
    assert tower.source == f"testorg/tiny-full-clip @ {commit}" and tower.logit_scale == pytest.approx(scale)
    torch.testing.assert_close(F.normalize(torch.from_numpy(tower.encode(["a photo of a happy face."])), dim=-1),
                               unit[:1], atol=1e-5, rtol=1e-5)
    with pytest.raises(TextTowerError, match="not in the local Hugging Face cache"):
        load_text_tower(dict(meta, revision="0" * 40))  # another commit: not here, and never fetched


def test_a_sweep_counts_a_zero_shot_run_as_finished(zs_store, tmp_path):
    from maskfer.sweep import _finished

    cfg = mf.small_cfg(zs_store, method="zero-shot", epochs=60)  # one row, whatever --epochs says
    assert not _finished(tmp_path / "zs", cfg)
    train(cfg, tmp_path / "zs", progress=False, log=mf.quiet)
    assert _finished(tmp_path / "zs", cfg)
