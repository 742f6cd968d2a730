"""The numeric libraries' thread counts, held at one inside a block, and the pools of curator's own
threads.

curator runs its own threads where work splits (queries sorted beside reads, correlations beside
sorts); a library's extra threads on top of those only wait for cores the process already uses.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager


@contextmanager
def one_blas_thread():
    """numpy's OpenBLAS at one thread inside (and its own count restored after). On cores other
    processes share, OpenBLAS's second thread spins waiting for a core, and its spinning slows the
    rest of the process too: the audit's correlation products (100 × 65,536 blocks) took 0.59 s a
    block on two threads against 0.06 s on one, re-scoring's products (128 rows × 16 queries) 18 ms
    against 1.8 ms (medians; docs/results/out_of_core.md, search_scale.md). threadpoolctl does this for
    any BLAS; curator does not depend on it, so this finds numpy's bundled OpenBLAS among the loaded
    libraries (Linux) and does nothing where there is none."""
    setter = getter = None
    try:
        import ctypes
        import re

        with open("/proc/self/maps") as maps:
            libraries = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps.read())))
        for library in libraries:
            handle = ctypes.CDLL(library)
            for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
                if hasattr(handle, f"{prefix}_set_num_threads{suffix}"):
                    setter = getattr(handle, f"{prefix}_set_num_threads{suffix}")
                    getter = getattr(handle, f"{prefix}_get_num_threads{suffix}")
                    break
            if setter is not None:
                break
    except OSError:
        setter = None
    if setter is None:
        yield
        return
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)


@contextmanager
def one_torch_thread():
    """torch at one intra-op thread inside (restored after). Decoding 128 rows of float16 took 20 ms on
    torch's default two threads and 7 ms on one, on cores other processes share (medians of 40): the
    second thread waits for a core it does not get, and a block is too small to gain from it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def thread_pool(count: int):
    """A thread pool whose queued tasks are dropped when the block fails: an error is not held up by
    reads or sorts nobody will use (those already running finish first)."""
    pool = ThreadPoolExecutor(count)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
