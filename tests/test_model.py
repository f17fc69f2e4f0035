"""MaskModel, cafe_loss and the baselines."""
import pytest
import torch
import torch.nn.functional as F

from maskfer.model import BaselineModel, LinearProbe, MaskMapping, MaskModel, cafe_loss
from maskfer.separation import diverse_loss, reference_separation_logits


@pytest.fixture(scope="module")
def r18_model():
    torch.manual_seed(0)
    return MaskModel("resnet18", feat_dim=512, num_classes=7)


def test_forward_outputs_and_sigmoid_mask(r18_model):
    images, feats = torch.randn(3, 3, 32, 32), torch.randn(3, 512)
    out = r18_model(images, feats)
    assert out["logits"].shape == (3, 7) and out["masked"].shape == out["mask"].shape == (3, 512)
    assert ((out["mask"] > 0) & (out["mask"] < 1)).all()
    assert torch.allclose(out["masked"], out["mask"] * feats)
    assert torch.allclose(out["logits"], r18_model.fc(out["masked"]))
    with pytest.raises(ValueError, match="view"):
        r18_model(images, torch.randn(3, 2, 512))


@pytest.mark.parametrize("use_sigmoid", [True, False])
def test_mask_is_the_sigmoid_of_the_mask_logits(use_sigmoid):
    """masked = sigmoid(M) * F with M the mask CNN's output (read by a hook), not sigmoid(-M) or 1 - sigmoid(M);
    the ablation uses M itself."""
    torch.manual_seed(0)
    model = MaskModel("resnet18", feat_dim=512, use_sigmoid=use_sigmoid)
    seen = {}
    handle = model.mask_map.register_forward_hook(lambda mod, inp, out: seen.__setitem__("m", out.detach()))
    feats = torch.randn(3, 512)
    out = model(torch.randn(3, 3, 32, 32), feats)
    handle.remove()
    m = seen["m"]
    assert m.shape == (3, 512) and m.abs().max() > 0.1
    expected = torch.sigmoid(m) if use_sigmoid else m
    torch.testing.assert_close(out["mask"], expected, rtol=0, atol=0)
    torch.testing.assert_close(out["masked"], expected * feats)
    torch.testing.assert_close(out["logits"], model.fc(expected * feats))


def test_cafe_loss_given_keep(r18_model):
    out = r18_model(torch.randn(4, 3, 32, 32), torch.randn(4, 512))
    y = torch.tensor([0, 1, 2, 6])
    keep = torch.ones(1, 512)
    keep[0, ::7] = 0
    for groups in ("official", "balanced"):
        for training in (True, False):  # a given mask is applied whenever given
            _, parts = cafe_loss(out, y, groups=groups, keep=keep, training=training)
            expected = F.cross_entropy(reference_separation_logits(out["masked"], 7, keep, groups), y)
            assert torch.allclose(parts["sep"], expected)
            assert torch.allclose(parts["div"], diverse_loss(out["masked"], 7, groups))
    with pytest.raises(ValueError, match="keep must be"):
        cafe_loss(out, y, keep=torch.ones(2, 512))


def test_cafe_loss_parts_and_gradients_reach_backbone(r18_model):
    r18_model.zero_grad()
    images, feats, y = torch.randn(4, 3, 32, 32), torch.randn(4, 512), torch.tensor([0, 1, 2, 6])
    out = r18_model(images, feats)
    total, parts = cafe_loss(out, y, generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"ce", "sep", "div", "total"}
    assert torch.allclose(total, parts["ce"] + 1.5 * parts["sep"] + 5.0 * parts["div"])
    assert torch.allclose(parts["ce"], F.cross_entropy(out["logits"], y))
    assert torch.allclose(parts["div"], diverse_loss(out["masked"], 7))
    total.backward()
    grads = [r18_model.backbone.conv1.weight.grad, r18_model.backbone.layer4[1].bn2.weight.grad, r18_model.fc.weight.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_cafe_loss_switches_and_eval_has_no_drop(r18_model):
    out = r18_model(torch.randn(2, 3, 32, 32), torch.randn(2, 512))
    y = torch.tensor([3, 4])
    total, parts = cafe_loss(out, y, use_sep=False, use_div=False)
    assert set(parts) == {"ce", "total"} and torch.allclose(total, parts["ce"])
    _, parts = cafe_loss(out, y, use_sep=False)
    assert set(parts) == {"ce", "div", "total"}
    _, parts = cafe_loss(out, y, training=False)  # deterministic: no channel drop
    expected = F.cross_entropy(reference_separation_logits(out["masked"], 7), y)
    assert torch.allclose(parts["sep"], expected)
    with pytest.raises(ValueError):
        cafe_loss({"logits": out["logits"]}, y)


def test_no_sigmoid_ablation():
    model = MaskModel("resnet18", feat_dim=512, use_sigmoid=False)
    feats = torch.randn(2, 512)
    out = model(torch.randn(2, 3, 32, 32), feats)
    assert torch.allclose(out["masked"], out["mask"] * feats)
    assert (out["mask"] >= 0).all()  # raw pooled ReLU features, no squashing


def test_mask_mapping_for_other_dims():
    v = torch.arange(8.0).view(1, 8)
    pool = MaskMapping(8, 4)
    assert pool.kind == "pool"
    assert pool(v).tolist() == [[0.5, 2.5, 4.5, 6.5]]  # mean over consecutive windows of 2
    assert MaskMapping(8, 3)(v).shape == (1, 3)          # D % C != 0: adaptive windows
    assert MaskMapping(4, 4).kind == "identity"
    assert MaskMapping(4, 8).kind == "linear" and MaskMapping(4, 8)(v[:, :4]).shape == (1, 8)
    assert MaskMapping(8, 8, mode="linear").kind == "linear"
    # mobilenet_v2 (1280) into a 512-d feature cache; resnet18 (512) into a 768-d one.
    model = MaskModel("mobilenet_v2", feat_dim=512)
    assert model.mask_map.kind == "pool" and model(torch.randn(2, 3, 32, 32), torch.randn(2, 512))["mask"].shape == (2, 512)
    model = MaskModel("resnet18", feat_dim=768)
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, 768))
    cafe_loss(out, torch.tensor([0, 1]))[0].backward()
    assert model.mask_map.linear.weight.grad is not None


def test_baselines():
    baseline = BaselineModel("resnet18", 7)
    assert baseline(torch.randn(2, 3, 32, 32))["logits"].shape == (2, 7)
    probe = LinearProbe(512, 7)
    out = probe(None, torch.randn(5, 512))
    assert out["logits"].shape == (5, 7)
    total, parts = cafe_loss(out, torch.zeros(5, dtype=torch.long), use_sep=False, use_div=False)
    total.backward()
    assert probe.fc.weight.grad is not None
