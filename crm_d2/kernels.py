"""A fused Triton kernel for CRM's decoder: neighbour gather + MLP + area blend in one pass, on CUDA when asked.

The torch path (`CRM.ensemble`) materialises, per neighbour, a B x R x C x hidden tensor of gathered features
and one per MLP layer; here each program keeps a block of queries' 32-d hidden vectors in registers from the
gather to the blended logit, so the decoder reads the projected feature map and writes one float per pixel.
It computes exactly what `CRM.ensemble` computes (fp32, IEEE dot products), and is checked against it: in
tests on CUDA, in Triton's interpreter on CPU (`TRITON_INTERPRET=1`), and once per process on first use.

Off by default: measured on an H200 (docs/benchmark.md, "GPU"), it is correct to 1.5e-5 but 5x slower than the
torch path (18 ms against 4 ms for one full-scale decode at 1K). Set CRM_D2_TRITON=1 to use it.
"""
import os
import warnings

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs go without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_state = {"checked": False, "ok": True}


def fused_decoder_available(proj, hidden):
    """True when `proj` (B x Hf x Wf x hidden) can go through the fused kernel."""
    if triton is None or os.environ.get("CRM_D2_TRITON") != "1" or not _state["ok"]:
        return False
    on_device = proj.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and proj.dtype == torch.float32 and hidden >= 16 and hidden & (hidden - 1) == 0


if triton is not None:

    @triton.jit
    def _decode_kernel(proj_ptr, iy_ptr, row_ptr, ay_ptr, ix_ptr, col_ptr, ax_ptr, w_ptr, b_ptr, wo_ptr, bo,
                       out_ptr, R, C, Hl, Wl, n_queries,
                       K: tl.constexpr, DEPTH: tl.constexpr, BLOCK: tl.constexpr):
        q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = q < n_queries
        c = q % C
        r = (q // C) % R
        b = q // (R * C)
        k = tl.arange(0, K)
        wo = tl.load(wo_ptr + k)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        blend = tl.zeros((BLOCK,), dtype=tl.float32)
        for a in tl.static_range(2):  # shift -1 / +1 along rows
            iy = tl.load(iy_ptr + a * R + r, mask=valid, other=0).to(tl.int64)
            for v in tl.static_range(2):  # shift -1 / +1 along columns
                ix = tl.load(ix_ptr + v * C + c, mask=valid, other=0).to(tl.int64)
                base = ((b * Hl + iy) * Wl + ix) * K
                m2 = valid[:, None]
                h = tl.load(proj_ptr + base[:, None] + k[None, :], mask=m2, other=0.0)
                h += tl.load(row_ptr + (a * R + r)[:, None] * K + k[None, :], mask=m2, other=0.0)
                h += tl.load(col_ptr + (v * C + c)[:, None] * K + k[None, :], mask=m2, other=0.0)
                h = tl.maximum(h, 0.0)
                for layer in tl.static_range(DEPTH - 1):
                    # W is (out, in): load it transposed so that h @ Wt applies it to row vectors.
                    wt = tl.load(w_ptr + layer * K * K + k[None, :] * K + k[:, None])
                    h = tl.dot(h, wt, input_precision="ieee") + tl.load(b_ptr + layer * K + k)[None, :]
                    h = tl.maximum(h, 0.0)
                logit = tl.sum(h * wo[None, :], axis=1) + bo
                # each neighbour is weighted by the area of the diagonally opposite one
                area = (tl.load(ay_ptr + (1 - a) * R + r, mask=valid, other=1.0)
                        * tl.load(ax_ptr + (1 - v) * C + c, mask=valid, other=1.0) + 1e-9)
                blend += logit * area
                total += area
        tl.store(out_ptr + q, blend / total, mask=valid)


def fused_ensemble(proj, rows, cols, mlp_layers, block=64):
    """Logits B x R x C, as `CRM.ensemble(proj, rows, cols)`; mlp_layers is `imnet.layers` (Linear, ReLU, ...)."""
    (iy, row_term, area_y), (ix, col_term, area_x) = rows, cols
    linears = [m for m in mlp_layers if isinstance(m, torch.nn.Linear)]
    hidden = linears[1:-1]
    K = proj.shape[-1]
    dev = proj.device
    w = (torch.stack([m.weight for m in hidden]) if hidden else proj.new_zeros(1, K, K)).float().contiguous()
    bias = (torch.stack([m.bias for m in hidden]) if hidden else proj.new_zeros(1, K)).float().contiguous()
    wo = linears[-1].weight[0].float().contiguous()
    B, Hl, Wl = proj.shape[:3]
    R, C = iy.shape[1], ix.shape[1]
    out = torch.empty(B, R, C, device=dev, dtype=torch.float32)
    n = B * R * C
    if n == 0:
        return out
    grid = (triton.cdiv(n, block),)
    _decode_kernel[grid](
        proj.contiguous(), iy.to(torch.int32).contiguous(), row_term.float().contiguous(),
        area_y.float().contiguous(), ix.to(torch.int32).contiguous(), col_term.float().contiguous(),
        area_x.float().contiguous(), w, bias, wo, float(linears[-1].bias[0]), out, R, C, Hl, Wl, n,
        K=K, DEPTH=len(linears) - 1, BLOCK=block)
    return out


def checked_fused_ensemble(proj, rows, cols, mlp_layers, reference):
    """`fused_ensemble`, compared once per process with the torch path (`reference()`) on this very call; on a
    mismatch or a compile error the kernel is switched off with a warning and the torch result is used."""
    if _state["checked"]:
        return fused_ensemble(proj, rows, cols, mlp_layers)
    _state["checked"] = True
    want = reference()
    try:
        got = fused_ensemble(proj, rows, cols, mlp_layers)
        err = float((got - want).abs().max()) if got.numel() else 0.0
    except Exception as e:  # noqa: BLE001 - any compile/launch failure means: use torch
        err, got = f"{type(e).__name__}: {e}", None
    if got is None or err > 1e-3:
        _state["ok"] = False
        why = f"could not run ({err})" if got is None else f"disagrees with the torch path (max difference {err})"
        warnings.warn(f"crm_d2: the fused Triton decoder {why}; using torch", RuntimeWarning, stacklevel=3)
        return want
    return got
