import pytest
import torch

from crm_d2.checkpoint import load_checkpoint, load_model, save_checkpoint
from crm_d2.model import CRM, CRMConfig
from crm_d2.reference import make_layer4


def released_state_dict(model):
    """A state_dict in the authors' released layout: DataParallel prefix, layer4 present, num_batches_tracked."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    for k, v in make_layer4(model).state_dict().items():
        state[f"module.feats.layer4.{k}"] = torch.randn_like(v.float()).to(v.dtype)
    return state


def test_loads_released_layout(tmp_path, tiny_model):
    state = released_state_dict(tiny_model)
    assert any(k.endswith("num_batches_tracked") for k in state)
    torch.save(state, tmp_path / "model_45705")
    model = load_model(tmp_path / "model_45705")
    assert model.cfg == tiny_model.cfg
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_released_r50_layout_has_367_entries():
    state = released_state_dict(CRM())
    assert len(state) == 367

def test_released_r50_config_is_inferred(tmp_path):
    torch.save(released_state_dict(CRM()), tmp_path / "model_45705")
    assert load_checkpoint(tmp_path / "model_45705")["config"] == CRMConfig()


def test_project_format_round_trip_half(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "c.pth", tiny_model, meta={"note": "x"}, half=True, iteration=7)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "crm_d2" and ckpt["iteration"] == 7 and ckpt["meta"]["note"] == "x"
    model = load_model(path)
    w = tiny_model.imnet.layers[0].weight.detach()
    assert model.imnet.layers[0].weight.dtype == torch.float32
    assert torch.allclose(model.imnet.layers[0].weight, w, atol=1e-2 * float(w.abs().max()))


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_model):
    state = released_state_dict(tiny_model)
    del state["module.imnet.layers.4.bias"]
    state["module.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): imnet.layers.4.bias.*unexpected keys \(1\): extra.weight"):
        load_model(tmp_path / "bad.pth")


def test_wrong_architecture_and_bad_files(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "tiny.pth", tiny_model)
    with pytest.raises(ValueError, match="holds architecture"):
        load_model(path, cfg=CRMConfig())
    state = tiny_model.state_dict()
    state["imnet.layers.0.weight"] = torch.zeros(32, 100)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="different architecture.*imnet.layers.0.weight"):
        load_model(tmp_path / "shape.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model(tmp_path / "corrupt.pth")
    torch.save({"optimizer": {"lr": 1}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither a crm_d2 checkpoint nor a raw state_dict"):
        load_model(tmp_path / "other.pth")
    future = torch.load(path, weights_only=True)
    future["version"] += 1
    torch.save(future, tmp_path / "future.pth")
    with pytest.raises(ValueError, match="newer than this crm_d2 reads"):
        load_model(tmp_path / "future.pth")


class NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"x": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model(tmp_path / "evil.pth")
