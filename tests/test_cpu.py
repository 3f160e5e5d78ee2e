"""crm_d2.cpu: oneDNN's fused linear and its fallback, glibc's malloc thresholds, and the per-core workers that the
CPU decoder runs on."""
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import crm_d2.cpu as crm_cpu
from crm_d2.cpu import per_core


def test_fused_linear_falls_back_when_onednn_is_missing_or_fails(monkeypatch):
    """`linear_relu` uses oneDNN's internal fused op only after a first check passed; a missing op, one that
    raises, or oneDNN switched off gives F.linear + ReLU, with the same result."""
    layer = torch.nn.Linear(32, 32)
    x = torch.randn(50, 32)
    with torch.no_grad():
        want = F.linear(x, layer.weight, layer.bias).relu()

        def broken(*args):
            raise RuntimeError("oneDNN cannot run here")

        torch.ops.mkldnn._linear_pointwise  # resolved once, so that the namespace holds it and monkeypatch restores it
        for patch in ("raises", "unavailable"):
            with monkeypatch.context() as m:
                crm_cpu.fused_linear_ok.cache_clear()  # not checked yet
                if patch == "raises":
                    m.setattr(torch.ops.mkldnn, "_linear_pointwise", broken)
                else:
                    m.setattr(torch.backends.mkldnn, "is_available", lambda: False)
                assert not crm_cpu.fused_linear_ok()
                torch.testing.assert_close(crm_cpu.linear_relu(x, layer), want, rtol=0, atol=0)
            crm_cpu.fused_linear_ok.cache_clear()  # checked again without the patch
        if crm_cpu.fused_linear_ok():
            torch.testing.assert_close(crm_cpu.linear_relu(x, layer), want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds: Linux only")
def test_warm_malloc_thresholds_stops_page_faults_on_repeated_blocks():
    """After `warm_malloc_thresholds`, freeing and making again a block of a few MB (what the CPU decoder does
    per block) reuses the same memory: no page faults. Measured in a fresh process, where glibc has not yet
    raised its thresholds by itself."""
    code = """
import resource, torch
from crm_d2.cpu import warm_malloc_thresholds
torch.empty(1 << 18)  # a freed 1 MB mmapped block: glibc's thresholds become 1 MB (mmap) and 2 MB (trim)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        blocks = [torch.empty(225 << 10).fill_(1.0) for _ in range(3)]  # 900 KB each: from the heap
        del blocks  # 2.7 MB free at the heap's top, over the trim threshold: handed back to the OS
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
cold = faults()
warm_malloc_thresholds()
print(cold, faults())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    cold, warm = int(out[0]), int(out[1])
    if cold < 500:
        pytest.skip(f"this allocator already reuses the freed blocks ({cold} page faults): nothing to show")
    assert warm < cold / 10, (cold, warm)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_per_core_runs_each_item_once_on_one_thread_per_worker(two_threads):
    """Every item runs once, on worker threads that each run one intra-op thread; the caller keeps its thread
    count, and its no-grad and inference modes hold in the workers."""
    seen = []

    def record(item):
        seen.append((item, threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(),
                     torch.is_inference_mode_enabled()))

    with torch.no_grad():
        per_core(record, range(12))
    assert sorted(s[0] for s in seen) == list(range(12))
    assert all(s[1] != threading.get_ident() and s[2] == 1 and not s[3] and not s[4] for s in seen)
    assert torch.get_num_threads() == 2
    seen.clear()
    with torch.inference_mode():
        per_core(record, range(4))
    assert all(s[4] and not s[3] for s in seen)
    seen.clear()
    per_core(record, range(3))  # grad mode on: it is on in the workers too
    assert all(s[3] for s in seen)


def test_per_core_carries_the_callers_cpu_autocast_into_the_workers(two_threads):
    """Autocast is per thread in torch: the encoder's fusion runs in per-core workers, and with `amp=True` its
    products must still run in bfloat16 there (and in float32 without it)."""
    dtypes = []
    x = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_core(lambda i: dtypes.append((torch.is_autocast_enabled("cpu"), (x @ x).dtype)), range(4))
    assert dtypes == [(True, torch.bfloat16)] * 4
    dtypes.clear()
    per_core(lambda i: dtypes.append((torch.is_autocast_enabled("cpu"), (x @ x).dtype)), range(4))
    assert dtypes == [(False, torch.float32)] * 4


def test_per_core_is_serial_with_one_thread_one_item_or_a_shared_thread_count(two_threads, monkeypatch):
    """In the caller's thread, in order: one item, one torch thread, or a parallel backend whose thread count
    is the whole process's (a worker's set_num_threads(1) would change everybody's)."""
    me = threading.get_ident()
    seen = []
    per_core(lambda i: seen.append((i, threading.get_ident())), [0])
    monkeypatch.setattr(crm_cpu, "thread_counts_are_per_thread", lambda: False)
    per_core(lambda i: seen.append((i, threading.get_ident())), range(1, 4))
    monkeypatch.undo()
    torch.set_num_threads(1)
    per_core(lambda i: seen.append((i, threading.get_ident())), range(4, 7))
    assert seen == [(i, me) for i in range(7)]


def test_per_core_passes_errors_on_and_restores_the_thread_count(two_threads):
    def fail(item):
        if item == 3:
            raise ValueError("item 3 is bad")

    with pytest.raises(ValueError, match="item 3 is bad"):
        per_core(fail, range(8))
    assert torch.get_num_threads() == 2
