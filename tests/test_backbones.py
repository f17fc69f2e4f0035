"""Backbones: shapes, torchvision key names and sizes, and the weights-file loader."""
import pytest
import torch
from safetensors.torch import save_file

from maskfer.backbones import BackboneLoadError, create_backbone, list_backbones, load_state_dict_file

# torchvision's parameter counts without the head (fc / classifier) and state-dict key counts.
TORCHVISION = {
    "resnet18": (512, 11_689_512 - 513_000, 122 - 2),
    "resnet50": (2048, 25_557_032 - 2_049_000, 320 - 2),
    "mobilenet_v2": (1280, 3_504_872 - 1_281_000, 314 - 2),
}


def test_registry_lists_the_three():
    assert set(TORCHVISION) <= set(list_backbones())
    with pytest.raises(KeyError, match="resnet18"):
        create_backbone("resnet1000")


@pytest.mark.parametrize("name", sorted(TORCHVISION))
@pytest.mark.parametrize("size", [32, 64])
def test_forward_shape(name, size):
    model = create_backbone(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, model.feature_dim) == (2, TORCHVISION[name][0])


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_sizes_and_names(name):
    model = create_backbone(name)
    _, params, keys = TORCHVISION[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_torchvision_key_spellings():
    r18 = create_backbone("resnet18").state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.bias"):
        assert key in r18
    r50 = create_backbone("resnet50").state_dict()
    assert r50["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert r50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    mb = create_backbone("mobilenet_v2").state_dict()
    assert mb["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert mb["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # t=1: depthwise first
    assert mb["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    assert mb["features.2.conv.3.weight"].shape == (24,)            # t=6: pw, dw, conv, bn
    assert mb["features.18.0.weight"].shape == (1280, 320, 1, 1)


def _fake_torchvision_checkpoint(name, head):
    """A torchvision-style state dict: our weights plus a 1000-class head."""
    state = {k: v.clone() for k, v in create_backbone(name).state_dict().items()}
    state.update(head)
    return state


def test_load_pth_with_wrappers_prefixes_head_and_a_renamed_key(tmp_path):
    state = _fake_torchvision_checkpoint("resnet18", {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)})
    state["layer1.0.conv1.weight"].fill_(0.5)
    state["layer4.1.bn2.renamed_weight"] = state.pop("layer4.1.bn2.weight")
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "msceleb.pth"
    torch.save(wrapped, path)
    model = create_backbone("resnet18")
    report = load_state_dict_file(model, path)
    assert report.missing == ["layer4.1.bn2.weight"]
    assert report.unexpected == ["layer4.1.bn2.renamed_weight"]
    assert sorted(report.ignored_head) == ["fc.bias", "fc.weight"]
    assert not report.shape_mismatches and len(report.matched) == 119
    assert (model.layer1[0].conv1.weight == 0.5).all()
    assert "119 matched" in report.summary()


def test_load_safetensors_via_create_backbone(tmp_path):
    state = _fake_torchvision_checkpoint("mobilenet_v2", {"classifier.1.weight": torch.randn(1000, 1280)})
    state["features.0.1.bias"].fill_(0.25)
    path = tmp_path / "mb.safetensors"
    save_file(state, str(path))
    model = create_backbone("mobilenet_v2", pretrained=path)
    assert model.load_report.ignored_head == ["classifier.1.weight"] and not model.load_report.missing
    assert (model.features[0][1].bias == 0.25).all()


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(create_backbone("mobilenet_v2").state_dict(), path)
    with pytest.raises(BackboneLoadError, match="no key matches") as err:
        load_state_dict_file(create_backbone("resnet18"), path)
    assert "mobilenet.pth" in str(err.value) and "features.0.0.weight" in str(err.value)
    # Same key names, different shapes: resnet50 weights into resnet18.
    path50 = tmp_path / "r50.pth"
    torch.save(create_backbone("resnet50").state_dict(), path50)
    with pytest.raises(BackboneLoadError, match="wrong shape") as err:
        load_state_dict_file(create_backbone("resnet18"), path50)
    assert "r50.pth" in str(err.value) and "layer1.0.conv1.weight" in str(err.value)


def test_hub_names_need_network_and_missing_file_is_clear(tmp_path, monkeypatch):
    import urllib.error

    import huggingface_hub
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneLoadError, match="cannot download pretrained weights 'imagenet'.*network"):
        create_backbone("resnet18", pretrained="imagenet")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(BackboneLoadError, match="hf://me/repo/r18.pth"):
        create_backbone("resnet18", pretrained="hf://me/repo/r18.pth")
    with pytest.raises(BackboneLoadError, match="expected hf://OWNER/REPO"):
        create_backbone("resnet18", pretrained="hf://only-owner")
    with pytest.raises(BackboneLoadError, match="not found"):
        create_backbone("resnet18", pretrained=tmp_path / "nope.pth")


def test_weights_from_a_url_are_downloaded_once_and_loaded(tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    src = create_backbone("resnet18")
    path = tmp_path / "published-r18.pth"
    torch.save(src.state_dict(), path)
    calls = []
    real = torch.hub.download_url_to_file
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    for _ in range(2):
        model = create_backbone("resnet18", pretrained=path.as_uri())
        assert model.load_report.matched and not model.load_report.missing
        assert torch.equal(model.state_dict()["conv1.weight"], src.state_dict()["conv1.weight"])
    assert calls == [path.as_uri()]  # the second build reads the cached file
