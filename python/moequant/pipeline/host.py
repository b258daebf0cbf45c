"""Hidden states and solved matrices between the device and host memory.

The calibration hidden states live in host memory between layers (or, beyond ``host_memory_gb``, in the disk-backed
store of :mod:`moequant.pipeline.states`, which writes each batch once its pinned copy is done) (a layer's inputs and outputs are
``samples x seq_len x hidden``: 1 GB for Qwen3-30B-A3B at 128 x 2048 tokens, 3.8 GB for DeepSeek-V3). Copied into
pageable memory, a GPU's device-to-host copies run at 1-2 GB/s (the whole output pass of a Qwen3-30B-A3B layer took
about 0.7 s of copies on an H100); into page-locked (pinned) memory they run at PCIe speed, and the next layer's
host-to-device copies of the same tensors do too. torch's caching host allocator keeps the freed pinned blocks for
the next layer."""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch


class HostCopies:
    """Collects device tensors as pinned host copies without blocking; :meth:`done` waits for all of them once.

    CPU tensors are kept as they are (the CPU path copies nothing). Read the copies only after :meth:`done`."""

    def __init__(self) -> None:
        self.out: list = []
        self._pending = False

    def add(self, t: torch.Tensor) -> None:
        if t.device.type != "cuda":
            self.out.append(t)
            return
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        self.out.append(host)
        self._pending = True

    append = add  # the states sinks' protocol (moequant.pipeline.states)

    def done(self) -> list:
        if self._pending:
            torch.cuda.current_stream().synchronize()
            self._pending = False
        return self.out


def to_host(tensors) -> list:
    """Host copies of ``tensors`` (pinned when they are on a GPU), complete when this returns."""
    copies = HostCopies()
    for t in tensors:
        copies.add(t)
    return copies.done()


def results_to_host(res: dict) -> dict:
    """Solved matrices (name -> quantized tensor) with their codes, scales and zero points (or scale bytes and
    global scales) in host memory, without the solver's dequantized values (the weights were written back already;
    the work directory and export keep the codes only). On a GPU the copies go to pinned memory without blocking and
    are waited for once: copied into pageable memory (``.cpu()``), a DeepSeek-V3 layer's 11.3 GB of int8 codes
    would move at 1-2 GB/s, and a copy made on the commit thread would hold up the next layer's kernels on the
    default stream for as long."""
    copies, kept = HostCopies(), []
    for name, qt in res.items():
        fields = [f.name for f in dataclasses.fields(qt)
                  if f.name != "values" and isinstance(getattr(qt, f.name), torch.Tensor)]
        for f in fields:
            copies.add(getattr(qt, f))
        kept.append((name, qt, fields))
    host = iter(copies.done())
    return {name: dataclasses.replace(qt, **{f: next(host) for f in fields}, values=None)
            for name, qt, fields in kept}


def layer_to_host(results: dict, dense: Optional[dict]) -> tuple[dict, Optional[dict]]:
    """A quantized layer's solved matrices (:func:`results_to_host`) and its export tensors (name -> tensor, or
    None when the recipe writes none: ``methods.base.layer_export_tensors``) in host memory."""
    if dense:
        dense = dict(zip(dense, to_host(list(dense.values()))))
    return results_to_host(results), dense


class HostResults:
    """A layer's solved groups on their way to host memory (:func:`results_to_host`), each group's copies made on a
    worker thread and a side stream while the engine goes on with the next group.

    Copied on the engine's thread, a DeepSeek-V3 layer's 9 groups spent 6.0 s in their copies (an H200, session
    11): most of it allocating the page-locked memory (which runs at a few GB/s the first time; torch's caching host
    allocator reuses the blocks from the next layers on); the GPU idled meanwhile. The device keeps a group's codes
    until its copies are done: one group more than the engine's own (``plan_layer`` budgets it). Without a GPU, the
    results are kept as :func:`results_to_host` makes them, at once. Use as a context manager: leaving it waits for
    the copies in flight (also after an error)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._device = device
        self._pool: Optional[ThreadPoolExecutor] = None
        self._stream = None
        self._pending: list = []

    def __enter__(self) -> "HostResults":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, res: dict) -> None:
        """Starts the copies of one group's results (name -> quantized tensor, as a solver returns them): the
        solver's dequantized values are dropped now, the device tensors of the codes once they are copied."""
        if not self.cuda:
            self._pending.append(results_to_host(res))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="moequant-results")
            self._stream = torch.cuda.Stream(self._device)
        codes = {name: dataclasses.replace(qt, values=None) for name, qt in res.items()}
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self._device))
        self._pending.append(self._pool.submit(self._copy, codes, ready))

    def _copy(self, codes: dict, ready) -> dict:
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            return results_to_host(codes)  # its wait is on this thread's (the side) stream

    def results(self) -> dict:
        """Every group's host results, in the order they were added (waits for the copies in flight)."""
        out: dict = {}
        pending, self._pending = self._pending, []
        for p in pending:
            out.update(p.result() if isinstance(p, Future) else p)
        return out

    def close(self) -> None:
        """Waits for the copies in flight (a failed copy's error is raised by :meth:`results` only)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class DeviceInputs:
    """A layer's input batches (``hidden[b]``, host tensors) on the compute device for the expert streaming
    engine's three passes: with ``keep`` each batch is copied once and kept (the group plan's slack holds them:
    1 GB for Qwen3-30B-A3B at 128 x 2048 tokens), else copied again at each pass (what the plan budgets)."""

    def __init__(self, hidden, device: torch.device, keep: bool) -> None:
        self.hidden, self.device, self.keep = hidden, device, keep
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, b: int) -> torch.Tensor:
        if b in self._cache:
            return self._cache[b]
        t = self.hidden[b].to(self.device)
        if self.keep:
            self._cache[b] = t
        return t

    def release(self) -> None:
        self._cache.clear()
