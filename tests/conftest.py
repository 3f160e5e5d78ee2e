"""Shared fixtures. The device under test: `pytest --device cuda` or CRM_D2_TEST_DEVICE=cuda runs every test that
takes the `device` fixture (the refiner, panoptic/instance refinement, training, the decoder kernel) on CUDA, and
the tests that compare with the CPU path compare the CUDA result with the CPU one. The default is CPU: nothing is
skipped, nothing changes. Those tests carry the `device` marker (`pytest -m device` selects them)."""
import os

import numpy as np
import pytest
import torch

from crm_d2.model import CRM, CRMConfig

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("CRM_D2_TEST_DEVICE") or "cpu",
                     help="device for the tests that take the `device` fixture: cpu (default) or cuda[:N] "
                          "(default from CRM_D2_TEST_DEVICE)")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: the test runs on the device under test (--device)")
    device = config.getoption("--device")
    if device != "cpu":
        if not device.startswith("cuda"):
            raise pytest.UsageError(f"--device must be cpu or cuda[:N], got {device!r}")
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {device}: CUDA is not available (torch {torch.__version__})")
        # Deterministic cuBLAS (for the resume test's bit-exactness) needs this before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Float tolerances assume fp32 arithmetic: TF32 convolutions (PyTorch's default on Ampere and later)
        # round to 10 mantissa bits. test_refiner's `tf32` case measures what TF32 changes.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


def pytest_report_header(config):
    """The device under test and the versions of what the results depend on, at the top of every test log."""
    return _header_lines(config)


def pytest_sessionstart(session):
    """`pytest -q` (the README's test command) shows no report header: print the same lines there."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.option.verbose < 0:
        for line in _header_lines(session.config):
            reporter.write_line(line)


def _header_lines(config):
    from crm_d2.optional import dependency_versions

    found = dependency_versions()
    device = config.getoption("--device")
    if device != "cpu":
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return [f"crm_d2 device under test: {device}", "crm_d2 dependencies: " + ", ".join(found)]


@pytest.fixture(scope="session")
def device(request):
    """"cpu" or "cuda[:N]": where the refiner/training tests run (--device / CRM_D2_TEST_DEVICE)."""
    return request.config.getoption("--device")


@pytest.fixture(scope="session")
def tol(device):
    """tol(cpu_atol, scale=1): absolute tolerance for two results computed on the device under test along
    different paths (batched vs single, tiled vs whole): `cpu_atol` on CPU; on CUDA, where cuDNN picks convolution
    algorithms per shape and the Triton decoder sums in its own order, 1e-5 of the values' scale, at least
    `cpu_atol`."""
    return lambda cpu_atol, scale=1.0: cpu_atol if device == "cpu" else max(cpu_atol, 1e-5 * float(scale))


def randomize_model(model, seed=0, mlp_gain=4.0):
    torch.manual_seed(seed)
    model.load_state_dict(type(model)(model.cfg).state_dict())
    """Random weights whose outputs actually vary (fresh init gives ~0.5 everywhere), for exactness tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        for p in model.imnet.parameters():
            p.mul_(mlp_gain)
    return model.eval()


@pytest.fixture
def one_thread():
    """Many small ops (training steps, tiny images): on the shared 2-core CPU one thread is several times faster
    than two. Test modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def set_torch_flag():
    """`set_torch_flag(torch.backends.cudnn, "allow_tf32", True)` for one test: the flag's value is read first and
    written back at teardown. Not `monkeypatch.setattr`: on torch's backend modules such flags are properties or
    come from a module `__getattr__`, so the attribute is not in the module's `__dict__` and monkeypatch's undo
    deletes it instead of restoring it (an AttributeError at teardown since pytest 9.2)."""
    saved = []

    def set_flag(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    yield set_flag
    for owner, name, value in reversed(saved):
        setattr(owner, name, value)


@pytest.fixture(name="randomize_model")
def randomize_model_fixture():
    """`randomize_model` for test modules (which cannot import conftest reliably)."""
    return randomize_model


@pytest.fixture
def tiny_model():
    return randomize_model(CRM(CRMConfig.preset("tiny")))


@pytest.fixture
def scene():
    """A small RGB image with a disc, its GT and a blocky coarse mask."""
    rng = np.random.default_rng(0)
    H, W = 90, 120
    yy, xx = np.mgrid[:H, :W]
    gt = ((yy - 45) ** 2 + (xx - 55) ** 2) < 30 ** 2
    img = rng.integers(0, 60, (H, W, 3)).astype(np.uint8)
    img[gt] += np.array([150, 120, 40], np.uint8)
    small = gt[::8, ::8].astype(np.uint8)
    import cv2

    coarse = cv2.resize(small, (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
    return img, gt, coarse


@pytest.fixture
def make_big_dir(tmp_path, scene):
    """BIG-layout triplets of `scene` in tmp_path/big: NAME_im.jpg, NAME_gt.png, NAME_seg.png, the object shifted
    right by `shifts[NAME]` px."""

    def make(shifts=None):
        import cv2

        img, gt, coarse = scene
        d = tmp_path / "big"
        d.mkdir(exist_ok=True)
        for name, shift in (shifts or {"a": 0}).items():
            cv2.imwrite(str(d / f"{name}_im.jpg"), np.roll(img, shift, 1)[..., ::-1])
            cv2.imwrite(str(d / f"{name}_gt.png"), np.roll(gt, shift, 1).astype(np.uint8) * 255)
            cv2.imwrite(str(d / f"{name}_seg.png"), np.roll(coarse, shift, 1).astype(np.uint8) * 255)
        return d

    return make


@pytest.fixture
def check_output_setting(tmp_path, make_big_dir, capsys):
    """What an option that changes `crm-d2 refine`'s outputs must do on a folder run (--edge-snap, --rounds):
    be recorded in run.json, refuse a rerun that says otherwise (outputs of two settings never mix), refuse a
    bad value when parsed with the accepted form named, and write one form however it is spelt. Returns the
    BIG folder, the output folder and the first run's output for the caller's own checks."""

    def check(weights, option, key, first, bad, form, second, written):
        import json

        import cv2

        from crm_d2.cli import main

        d, out = make_big_dir(), tmp_path / "out"
        args = ["refine", "--weights", str(weights), "--device", "cpu", "--big-dir", str(d), "-o", str(out)]
        assert main(args + [option, first]) == 0
        assert json.loads((out / "run.json").read_text())[key] == first
        before = cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED)
        assert before is not None
        capsys.readouterr()
        assert main(args) == 1  # the model's own setting would mix with the finished outputs
        assert f"{key} '{first}' -> None" in capsys.readouterr().err
        with pytest.raises(SystemExit):  # refused when parsed, before anything runs
            main(args + [option, bad])
        assert form in capsys.readouterr().err
        assert main(args + [option, second, "--overwrite"]) == 0
        assert json.loads((out / "run.json").read_text())[key] == written  # one written form
        assert main(args + [option, written]) == 0
        return d, out, before

    return check


@pytest.fixture
def demo_checkpoint(tmp_path):
    """demo_checkpoint(meta) -> the path of the shipped model saved with `meta` (its own options). The shipped
    model, since a random one's output hardly depends on its input mask."""

    def save(meta, name="demo_with_meta.pth"):
        from crm_d2.checkpoint import load_model, save_checkpoint

        model = load_model("demo", "cpu")
        path = tmp_path / name
        save_checkpoint(path, model, model.cfg, meta=meta)
        return path

    return save


@pytest.fixture
def roi_keeps_coarse_outside():
    """check(roi_out, coarse, margin, other_roi_out): ROI mode changed only the mask's box plus `margin` (the
    coarse mask is kept outside it), and differs inside it from `other_roi_out` (the same refiner without the
    option under test)."""
    from crm_d2.schedule import roi_box

    def check(roi_out, coarse, margin, other_roi_out):
        box = roi_box(coarse.astype(np.float32), margin)
        outside = np.ones(coarse.shape, bool)
        outside[box.slices] = False
        assert outside.any()
        np.testing.assert_array_equal(roi_out[outside], coarse[outside].astype(np.float32))
        assert np.abs(roi_out - other_roi_out).max() > 0

    return check


@pytest.fixture
def finishes_only_the_chosen_mask():
    """check(finish, rgb, probs, coarse, choosing, every): a finish step (`snap_probs`, `grabcut_probs`) whose
    option `choosing` picks masks (min_shift, a gate) keeps probs[0], which refinement left where it was, and
    finishes probs[1] as the option choosing none (`every`) does; `every` would have changed probs[0], so the
    choice is what kept it; and without the coarse masks the choosing option is refused."""

    def check(finish, rgb, probs, coarse, choosing, every):
        chosen = finish(rgb, probs.copy(), choosing, coarse=coarse)
        all_finished = finish(rgb, probs.copy(), every)
        np.testing.assert_array_equal(chosen[0], probs[0])
        np.testing.assert_array_equal(chosen[1], all_finished[1])
        assert not np.array_equal(all_finished[0], probs[0])
        with pytest.raises(ValueError, match="coarse"):
            finish(rgb, probs.copy(), choosing)

    return check
