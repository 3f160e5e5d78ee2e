"""The fused Triton decoder against the torch path: on CUDA when present, in Triton's CPU interpreter when
Triton is installed, and its first-use self-check everywhere."""
import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from crm_d2 import kernels
from crm_d2.model import make_coord

HAS_TRITON = importlib.util.find_spec("triton") is not None

# (MLP depth, hidden width, batch, feature grid, output grid): several shapes, MLP depths and widths, and tail
# blocks (query counts that are not a multiple of the kernel's block of 64).
CASES = [(4, 32, 2, (9, 11), (37, 23)), (2, 32, 1, (9, 11), (5, 70))]
CUDA_CASES = CASES + [(4, 32, 3, (40, 60), (300, 450)), (1, 16, 1, (7, 5), (1, 1)), (3, 64, 2, (33, 17), (129, 65)),
                      (4, 32, 1, (128, 160), (1024, 1283))]


def _terms(model, B=2, feat=(9, 11), out=(37, 23), seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, *feat, model.cfg.hidden, generator=g).to(device)
    rows, cols = model.query_terms(proj, make_coord(out[0], device), make_coord(out[1], device),
                                   (2 / out[0], 2 / out[1]))
    return proj, rows, cols


def check_kernel_against_torch(device, cases, randomize_model):
    """The fused kernel against the torch path on each case; also that `CRM.ensemble` dispatches to it."""
    from crm_d2.model import CRM, CRMConfig

    for depth, hidden, B, feat, out in cases:
        m = randomize_model(CRM(CRMConfig(layers=(1, 1, 1), width=8, depth=depth, hidden=hidden))).to(device)
        proj, rows, cols = _terms(m, B, feat, out, device=device)
        with torch.no_grad():
            want = m._ensemble_torch(proj, rows, cols)
            got = kernels.fused_ensemble(proj, rows, cols, m.imnet.layers)
            via_model = m.ensemble(proj, rows, cols)  # dispatches to the kernel (checked on first use)
        err = (got - want).abs().max().item()
        scale = want.abs().max().item()
        print(f"depth {depth} hidden {hidden} B {B} feat {feat} out {out}: max |kernel - torch| {err:.1e} "
              f"on logits up to {scale:.1f}")
        assert scale > 1 and err < 1e-4 * scale, (depth, hidden, B, feat, out, err)
        assert torch.equal(via_model, got)
    assert kernels._state == {"checked": True, "ok": True}


def test_kernel_matches_torch(device, randomize_model, monkeypatch):
    monkeypatch.setenv("CRM_D2_TRITON", "1")  # the kernel is opt-in; `CRM.ensemble` dispatches to it when asked
    if device != "cpu":  # the real thing
        check_kernel_against_torch(device, CUDA_CASES, randomize_model)
        return
    # On CPU: in Triton's interpreter, which reads TRITON_INTERPRET when kernels are defined: a fresh process.
    if not HAS_TRITON:
        pytest.skip("Triton is not installed (it comes with CUDA builds of torch); --device cuda runs this on CUDA")
    code = ("from tests.conftest import randomize_model\n"
            "from tests.test_kernels import CASES, check_kernel_against_torch\n"
            "check_kernel_against_torch('cpu', CASES, randomize_model)\nprint('OK')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_refiner_decodes_through_the_checked_kernel_on_cuda(tiny_model, scene, device, monkeypatch):
    """Asked for (CRM_D2_TRITON=1), on CUDA the refiner's decoder is the fused kernel and its first-use check
    passes (no warning); on CPU it is the torch path and the kernel is never touched."""
    from crm_d2.refiner import Refiner

    monkeypatch.setenv("CRM_D2_TRITON", "1")
    monkeypatch.setattr(kernels, "_state", {"checked": False, "ok": True})
    calls = []
    real = kernels.fused_ensemble
    monkeypatch.setattr(kernels, "fused_ensemble", lambda *a, **k: calls.append(1) or real(*a, **k))
    refiner = Refiner(weights=None, allow_random=True, device=device, config="tiny")
    refiner.model.load_state_dict(tiny_model.state_dict())
    img, _, coarse = scene
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed first-use check warns
        out = refiner.refine(img, coarse)
    assert out.shape == coarse.shape and np.isfinite(out).all()
    if device == "cpu":
        assert not calls and kernels._state == {"checked": False, "ok": True}
    else:
        assert HAS_TRITON, "CUDA without Triton: the fused decoder cannot run"
        assert len(calls) > 1 and kernels._state == {"checked": True, "ok": True}


def test_first_use_check_falls_back_to_torch_on_a_mismatch(tiny_model, device, monkeypatch):
    tiny_model.to(device)
    proj, rows, cols = _terms(tiny_model, device=device)
    with torch.no_grad():
        want = tiny_model._ensemble_torch(proj, rows, cols)
    monkeypatch.setattr(kernels, "_state", {"checked": False, "ok": True})
    monkeypatch.setenv("CRM_D2_TRITON", "1")
    if device == "cpu":  # where the kernel could run (Triton present, interpreter on): available until the check fails
        monkeypatch.setattr(kernels, "triton", kernels.triton or object())
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.fused_decoder_available(proj, 32)
    monkeypatch.setattr(kernels, "fused_ensemble", lambda *a, **k: want + 1)  # a kernel gone wrong
    with pytest.warns(RuntimeWarning, match="disagrees"):
        got = kernels.checked_fused_ensemble(proj, rows, cols, tiny_model.imnet.layers, lambda: want)
    assert torch.equal(got, want) and kernels._state["ok"] is False
    assert not kernels.fused_decoder_available(proj, 32)


def test_first_use_check_falls_back_to_torch_when_the_kernel_cannot_run(device, randomize_model, monkeypatch):
    """A kernel that fails to compile or launch (here: a hidden width of 24, not a power of two, which Triton's
    `tl.arange` refuses; on CPU without Triton, no Triton at all) gives the torch result with a warning."""
    from crm_d2.model import CRM, CRMConfig

    model = randomize_model(CRM(CRMConfig(layers=(1, 1, 1), width=8, hidden=24))).to(device)
    proj, rows, cols = _terms(model, device=device)
    with torch.no_grad():
        want = model._ensemble_torch(proj, rows, cols)
        monkeypatch.setattr(kernels, "_state", {"checked": False, "ok": True})
        with pytest.warns(RuntimeWarning, match="could not run"):
            got = kernels.checked_fused_ensemble(proj, rows, cols, model.imnet.layers, lambda: want)
    assert torch.equal(got, want) and kernels._state["ok"] is False


def test_kernel_is_off_unless_asked_and_never_on_cpu_or_for_training(tiny_model, monkeypatch):
    proj, rows, cols = _terms(tiny_model)
    monkeypatch.setattr(kernels, "_state", {"checked": False, "ok": True})
    # Where it could run (Triton present, the interpreter on), it is still off unless CRM_D2_TRITON=1: on an H200
    # it measured 5x slower than the torch path.
    monkeypatch.setattr(kernels, "triton", kernels.triton or object())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("CRM_D2_TRITON", raising=False)
    assert not kernels.fused_decoder_available(proj, 32)
    monkeypatch.setenv("CRM_D2_TRITON", "1")
    assert kernels.fused_decoder_available(proj, 32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.fused_decoder_available(proj, 32)
    monkeypatch.setattr("crm_d2.model.fused_decoder_available", lambda *a: True)  # as on CUDA
    called = []
    monkeypatch.setattr("crm_d2.model.checked_fused_ensemble", lambda *a: called.append(1))
    proj.requires_grad_(True)
    out = tiny_model.ensemble(proj, rows, cols)  # grad enabled: autograd needs the torch path
    assert out.requires_grad and not called
