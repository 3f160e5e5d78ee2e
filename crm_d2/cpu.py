"""CPU inference helpers: oneDNN's fused linear, glibc's malloc thresholds, and one worker per core.

Each exists because eager torch leaves time on the table at 2K-4K on a CPU (docs/benchmark.md, issue 32); none
changes a result beyond float rounding.
"""
import functools
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


def fused_linear(x, weight, bias, relu=False):
    """F.linear(x, weight, bias), then a ReLU where asked; for inference.

    For float32 on the CPU this goes through oneDNN's linear with the bias and the ReLU in the product's
    epilogue (`torch.ops.mkldnn._linear_pointwise`, the op that torch.compile emits on CPU), when it exists and
    agreed with F.linear on a first small call (`fused_linear_ok`); otherwise, under autograd, or when oneDNN is
    switched off (`torch.backends.mkldnn.enabled`), F.linear then an in-place ReLU. aten's addmm copies the bias
    into its output before the product: for the decoder's 32x32 layers that pass and the ReLU's are a fifth of
    the time, and for the encoder's 1x1 convolutions they cost about as much as the products themselves."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and torch.backends.mkldnn.enabled and fused_linear_ok()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
    y = F.linear(x, weight, bias)
    return y.relu_() if relu else y


def linear_relu(x, layer):
    """relu(layer(x)) for inference (`fused_linear`)."""
    return fused_linear(x, layer.weight, layer.bias, relu=True)


@functools.cache
def fused_linear_ok():
    """Whether `fused_linear` may use oneDNN's fused op (an internal op: checked once per process)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        with torch.no_grad():
            x = torch.linspace(-2, 2, 7 * 5).view(7, 5)
            w, b = torch.linspace(1, -1, 3 * 5).view(3, 5), torch.tensor([0.1, -0.2, 0.3])
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "relu", [], "")
            return got.shape == (7, 3) and torch.allclose(got, F.linear(x, w, b).relu(), atol=1e-6)
    except (AttributeError, RuntimeError, TypeError):  # no such op in this build, or it cannot run here
        return False


@functools.cache
def warm_malloc_thresholds():
    """Make glibc's malloc keep freed blocks of up to 24 MB for reuse (once per process; CPU inference).

    glibc serves big requests with mmap, and raises that threshold (and, to twice it, the threshold above which
    it trims the heap) only when it frees an mmapped block: to that block's size, at most 32 MB. Until it has,
    blocks of a few MB are handed back to the OS as soon as they are freed and page-faulted in again when the
    next one is made: the decoder's blocks at 4K were up to 2.5x slower for it (2.1M page faults in one
    full-resolution decode), and the encoder's fusion slabs 10 % at 2K. Freeing one untouched 24 MB tensor sets
    the thresholds where a long-running process ends up anyway. Other allocators ignore it."""
    torch.empty(24 << 20, dtype=torch.uint8)


def add_relu_(x, other):
    """x = relu(x + other) in one pass (aten's fused add-ReLU, which torch's JIT uses; add_ then relu_ without
    it)."""
    op = getattr(torch.ops.aten, "_add_relu_", None)
    return op(x, other) if op is not None else x.add_(other).relu_()


@functools.cache
def thread_counts_are_per_thread():
    """Whether torch.set_num_threads in one thread leaves the others' intra-op thread counts alone: true with
    OpenMP, torch's parallel backend in its Linux, Windows and macOS wheels (each thread has its own count);
    with a native or TBB backend the count is one pool's size for the whole process."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def core_workers():
    """How many workers `per_core` runs its items on: torch's thread count, or 1 (in turn) where thread counts are
    the whole process's (`thread_counts_are_per_thread`). Callers size their work items from it."""
    return torch.get_num_threads() if thread_counts_are_per_thread() else 1


def per_core(fn, items):
    """fn(item) for each item, on torch.get_num_threads() worker threads that run one intra-op thread each.

    Why: the CPU decoder is thousands of small products (32x32 MLP layers over ~1 MB blocks). Run with oneDNN's
    own threads, every product splits its block across the cores and waits for the slowest; a 2K decode took
    1.0-1.6 s and varied from run to run. With a whole block per core, nothing waits and a core's block stays in
    its own cache: 0.8-1.0 s (docs/benchmark.md, "Third pass"). Each item runs the same ops on one thread (a 2K
    decode gave the same bits as a serial one). The caller's grad and inference modes and its CPU autocast hold in
    the workers (they are per thread in torch); items must not depend on each other. Exceptions reach the caller;
    on an error or an interrupt, items not yet started are dropped. With one worker (`core_workers`) the items run
    in turn, in the caller's thread."""
    items = list(items)
    threads = core_workers()
    if threads <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    amp, amp_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def call(item):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=amp_dtype, enabled=amp):
            fn(item)

    pool = ThreadPoolExecutor(min(threads, len(items)), initializer=torch.set_num_threads, initargs=(1,))
    try:
        for _ in pool.map(call, items):
            pass
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)  # torch keeps the last count set in any thread for threads started later
