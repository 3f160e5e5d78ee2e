"""The fused Triton decoder against the torch path: on CUDA when present, in Triton's CPU interpreter when
Triton is installed, and its first-use self-check everywhere."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from crm_d2 import kernels
from crm_d2.model import make_coord

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _terms(model, B=2, feat=(9, 11), out=(37, 23), seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, *feat, model.cfg.hidden, generator=g)
    rows, cols = model.query_terms(proj, make_coord(out[0]), make_coord(out[1]), (2 / out[0], 2 / out[1]))
    return proj, rows, cols


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (it comes with CUDA builds of torch)")
def test_kernel_matches_torch_in_the_triton_interpreter():
    # The interpreter reads TRITON_INTERPRET when kernels are defined, so this runs in a fresh process.
    code = textwrap.dedent("""
        import torch
        from crm_d2 import kernels
        from crm_d2.model import CRM, CRMConfig, make_coord
        from tests.conftest import randomize_model
        for depth, B, out in ((4, 2, (37, 23)), (2, 1, (5, 70))):
            m = randomize_model(CRM(CRMConfig(layers=(1, 1, 1), width=8, depth=depth)))
            proj = torch.randn(B, 9, 11, 32)
            rows, cols = m.query_terms(proj, make_coord(out[0]), make_coord(out[1]), (2 / out[0], 2 / out[1]))
            with torch.no_grad():
                want = m._ensemble_torch(proj, rows, cols)
                got = kernels.fused_ensemble(proj, rows, cols, m.imnet.layers)
                via_model = m.ensemble(proj, rows, cols)  # dispatches to the kernel
            err = (got - want).abs().max().item()
            assert want.abs().max() > 1 and err < 1e-4 * want.abs().max().item(), err
            assert torch.equal(via_model, got)
        print("OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
def test_kernel_matches_torch_on_cuda(tiny_model):
    from crm_d2.refiner import Refiner

    model = tiny_model.cuda()
    proj, rows, cols = _terms(model, B=3, feat=(40, 60), out=(300, 450))
    proj = proj.cuda()
    rows, cols = [tuple(t.cuda() for t in x) for x in (rows, cols)]
    with torch.no_grad():
        want = model._ensemble_torch(proj, rows, cols)
        got = kernels.fused_ensemble(proj, rows, cols, model.imnet.layers)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    # end to end: the refiner on CUDA (kernel) against the refiner on CPU (torch)
    import numpy as np

    img = np.random.default_rng(0).integers(0, 255, (120, 160, 3)).astype(np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:120] = True
    outs = []
    for device in ("cpu", "cuda"):
        r = Refiner(weights=None, allow_random=True, device=device, config="tiny")
        r.model.load_state_dict(tiny_model.state_dict())
        outs.append(r.refine(img, mask))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)


def test_first_use_check_falls_back_to_torch_on_a_mismatch(tiny_model, monkeypatch):
    proj, rows, cols = _terms(tiny_model)
    with torch.no_grad():
        want = tiny_model._ensemble_torch(proj, rows, cols)
    monkeypatch.setattr(kernels, "_state", {"checked": False, "ok": True})
    # Where the kernel could run (Triton present, interpreter on): available until the check fails.
    monkeypatch.setattr(kernels, "triton", kernels.triton or object())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("CRM_D2_NO_TRITON", raising=False)
    assert kernels.fused_decoder_available(proj, 32)
    monkeypatch.setattr(kernels, "fused_ensemble", lambda *a, **k: want + 1)  # a kernel gone wrong
    with pytest.warns(RuntimeWarning, match="disagrees"):
        got = kernels.checked_fused_ensemble(proj, rows, cols, tiny_model.imnet.layers, lambda: want)
    assert torch.equal(got, want) and kernels._state["ok"] is False
    assert not kernels.fused_decoder_available(proj, 32)


def test_kernel_is_not_used_on_cpu_or_for_training(tiny_model, monkeypatch):
    proj, rows, cols = _terms(tiny_model)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.fused_decoder_available(proj, 32)
    monkeypatch.setattr("crm_d2.model.fused_decoder_available", lambda *a: True)  # as on CUDA
    called = []
    monkeypatch.setattr("crm_d2.model.checked_fused_ensemble", lambda *a: called.append(1))
    proj.requires_grad_(True)
    out = tiny_model.ensemble(proj, rows, cols)  # grad enabled: autograd needs the torch path
    assert out.requires_grad and not called
