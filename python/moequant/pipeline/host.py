"""Hidden states and solved matrices between the device and host memory.

The calibration hidden states live in host memory between layers (or, beyond ``host_memory_gb``, in the disk-backed
store of :mod:`moequant.pipeline.states`, which writes each batch once its pinned copy is done) (a layer's inputs
and outputs are ``samples x seq_len x hidden``: 1 GB for Qwen3-30B-A3B at 128 x 2048 tokens, 3.8 GB for
DeepSeek-V3). Copied into pageable memory, a GPU's device-to-host copies run at 1-2 GB/s (the whole output pass of a
Qwen3-30B-A3B layer took about 0.7 s of copies on an H100); into page-locked (pinned) memory they run at PCIe speed,
and the next layer's host-to-device copies of the same tensors do too. torch's caching host allocator keeps the
freed pinned blocks for the next layer. The solved matrices, which wait in host memory for the work directory, go
through a few page-locked staging buffers into pageable memory instead (:class:`PinnedStaging`), off the layer's
thread."""
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


class PinnedStaging:
    """Device tensors to pageable host memory through a few page-locked buffers (``slots`` of ``slot_bytes``).

    Page-locked destinations of their own (:class:`HostCopies`) cost an allocation per tensor the first time
    (``cudaHostAlloc``: 1,162 calls, 306 ms for one Qwen3-30B-A3B layer on an H100; a DeepSeek-V3 layer's 11.3 GB
    of codes took 6 s), are rounded up to a power of two, and stay page-locked while the results wait for the work
    directory: memory a cgroup charges and cannot reclaim. Here each tensor's bytes are copied by the device into
    the next free buffer (the copies of several small tensors share one) on the current stream, and from there by
    the host into the tensor's own pageable copy once that buffer's copy is done, while the device fills the next
    buffers. The buffers come from torch's caching host allocator: allocated once, reused by the next staging of the
    same size. Not thread-safe: one staging per thread."""

    def __init__(self, slots: int = 4, slot_bytes: int = 64 * 2**20) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"PinnedStaging: slots and slot_bytes must be >= 1, got {slots}, {slot_bytes}")
        self.slots, self.slot_bytes = slots, slot_bytes
        self._bufs: list = []

    def to_host(self, tensors: list) -> list:
        """Pageable host copies of ``tensors`` (device tensors; each copy has its tensor's shape and dtype; views of
        one allocation, :func:`_one_buffer`), complete when this returns. The copies are made on the current
        stream: the caller orders it after the tensors' producers."""
        if not self._bufs:
            self._bufs = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
                          for _ in range(self.slots)]
        outs = _one_buffer(tensors)
        pending: list = []  # (event, slot, [(destination bytes, offset in the slot)]) in the order issued
        slot, fill, segs = 0, 0, []

        def drain_oldest() -> None:
            ev, k, parts = pending.pop(0)
            ev.synchronize()
            for dst, at in parts:
                dst.copy_(self._bufs[k][at:at + dst.numel()])

        def issue() -> None:
            nonlocal slot, fill, segs
            ev = torch.cuda.Event()
            ev.record()
            pending.append((ev, slot, segs))
            slot, fill, segs = (slot + 1) % self.slots, 0, []
            if len(pending) == self.slots:  # the next slot is the oldest one issued: empty it first
                drain_oldest()

        for t, out in zip(tensors, outs):
            if t.numel() == 0:
                continue
            src = t.detach().contiguous().reshape(-1).view(torch.uint8)
            dst = out.reshape(-1).view(torch.uint8)
            pos, n = 0, src.numel()
            while pos < n:
                if fill == self.slot_bytes:
                    issue()
                k = min(n - pos, self.slot_bytes - fill)
                self._bufs[slot][fill:fill + k].copy_(src[pos:pos + k], non_blocking=True)
                segs.append((dst[pos:pos + k], fill))
                fill, pos = fill + k, pos + k
        if segs:
            issue()
        while pending:
            drain_oldest()
        return outs


def _one_buffer(tensors: list) -> list:
    """Empty CPU tensors shaped as ``tensors``, views of one pageable allocation (each at a multiple of 64 bytes).

    One allocation, not one per tensor: glibc serves a freed size again from its heap once it has unmapped a block
    of that size (its mmap threshold rises to it, up to 32 MiB), and memory freed there is not returned to the
    system: a DeepSeek-V3 layer's per-expert codes (29 and 15 MB) stayed resident after their commit (measured: 60
    tensors of 29 MiB freed twice, RssAnon 2.07 GiB after the second free). One block per call is mapped and
    unmapped whole."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // 64) * 64
    buf = torch.empty(max(total, 1), dtype=torch.uint8)
    return [buf[o:o + n].view(t.dtype).reshape(t.shape) if n else torch.empty(t.shape, dtype=t.dtype)
            for t, o, n in zip(tensors, offsets, sizes)]


def results_to_host(res: dict, staging: Optional[PinnedStaging] = None) -> dict:
    """Solved matrices (name -> quantized tensor) with their codes, scales and zero points (or scale bytes and
    global scales) in host memory, without the solver's dequantized values (the weights were written back already;
    the work directory and export keep the codes only). On a GPU the copies go to pinned memory without blocking and
    are waited for once (with ``staging``: through its buffers into pageable memory, :class:`PinnedStaging`):
    copied into pageable memory directly (``.cpu()``), a DeepSeek-V3 layer's 11.3 GB of int8 codes would move at
    1-2 GB/s, and a copy made on the commit thread would hold up the next layer's kernels on the default stream for
    as long."""
    kept, tensors = [], []
    for name, qt in res.items():
        fields = [f.name for f in dataclasses.fields(qt)
                  if f.name != "values" and isinstance(getattr(qt, f.name), torch.Tensor)]
        tensors += [getattr(qt, f) for f in fields]
        kept.append((name, qt, fields))
    if staging is not None and any(t.is_cuda for t in tensors):
        host = iter(staging.to_host(tensors))
    else:
        copies = HostCopies()
        for t in tensors:
            copies.add(t)
        host = iter(copies.done())
    return {name: dataclasses.replace(qt, **{f: next(host) for f in fields}, values=None)
            for name, qt, fields in kept}


def layer_to_host_later(results: dict, dense: Optional[dict], device: torch.device):
    """A function that returns a layer's solved matrices (:func:`results_to_host`) and its export tensors (name ->
    tensor, or None when the recipe writes none: ``methods.base.layer_export_tensors``) in host memory, made when it
    is called, on its caller's thread (the commit thread, while the next layer computes). On a GPU the copies run on
    a stream of their own, after the work queued so far on this thread's stream (which produced them), through a
    :class:`PinnedStaging` into pageable memory; on the CPU there is nothing to copy. The solver's dequantized
    values are dropped now (their device memory goes at once); the codes stay on the device until the call.

    Copied on the layer loop's thread, a Qwen3-30B-A3B layer's codes took 0.4-0.7 s the first two layers (page-locked
    allocations), then 0.02 s, and stayed page-locked (rounded up to a power of two) while the commit wrote them."""
    codes = {name: dataclasses.replace(qt, values=None) for name, qt in results.items()}
    dense = dict(dense) if dense else dense
    if device.type != "cuda":
        return lambda: (results_to_host(codes), dense)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))

    def copy() -> tuple[dict, Optional[dict]]:
        stream = torch.cuda.Stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            staging = PinnedStaging()
            out = results_to_host(codes, staging)
            codes.clear()
            if dense:
                return out, dict(zip(dense, staging.to_host(list(dense.values()))))
            return out, dense

    return copy


class PartWrites:
    """The part-file writes of a layer still in flight when its engine is done (:meth:`HostResults.finish`): the
    layer's commit waits for them (:meth:`wait`), so a layer is never committed before its parts are on disk, and the
    write of the last group is not on the layer's critical path."""

    def __init__(self, futures: list) -> None:
        self._futures = list(futures)

    def __len__(self) -> int:
        return len(self._futures)

    def wait(self) -> None:
        """Waits for every write, then raises the first failed one's error."""
        first = None
        for f in self._futures:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other writes are done
                first = first or exc
        self._futures = []
        if first is not None:
            raise first


class HostResults:
    """A layer's solved groups on their way to host memory (:func:`results_to_host`), each group's copies made on a
    worker thread and a side stream, through a :class:`PinnedStaging` into pageable memory, while the engine goes on
    with the next group.

    Copied on the engine's thread, a DeepSeek-V3 layer's 9 groups spent 6.0 s in their copies (an H200, session
    11): most of it allocating the page-locked memory (which runs at a few GB/s the first time; torch's caching host
    allocator reuses the blocks from the next layers on); the GPU idled meanwhile. The device keeps a group's codes
    until its copies are done: one group more than the engine's own (``plan_layer`` budgets it). Without a GPU, the
    results are kept as :func:`results_to_host` makes them, at once. Use as a context manager: leaving it waits for
    the copies in flight (also after an error).

    ``sink``: ``sink(part, host_results)`` takes each group's host results once copied (on a thread of its own, so
    that a slow disk does not hold up the copies and the device memory they free; at once without a GPU), ``part``
    counting the groups from 0 (the work directory's part files,
    :meth:`moequant.pipeline.workdir.WorkDir.save_part`), and :meth:`results` then holds none of them: host memory
    keeps a group's results while they are written, not the layer's (a DeepSeek-V3 layer's codes are 11.3 GB, and
    the previous layer's wait for their commit meanwhile). The writes run on a thread of their own on every device;
    :meth:`finish` hands the ones still running to the caller (:class:`PartWrites`), which leaving the ``with`` block
    then does not wait for. :attr:`parts`: the groups handed to the sink."""

    def __init__(self, device: torch.device, sink=None) -> None:
        self.cuda = device.type == "cuda"
        self._sink = sink
        self.parts = 0
        self._device = device
        self._writer: Optional[ThreadPoolExecutor] = None  # the sink's thread: a slow disk never holds the copies
        self._pool: Optional[ThreadPoolExecutor] = None
        self._stream = None
        self._staging: Optional[PinnedStaging] = None
        self._pending: list = []  # per group a Future of its host results, or of its write's Future (with a sink)
        self._handed = False  # finish() gave the writes in flight to the caller

    def __enter__(self) -> "HostResults":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, res: dict) -> None:
        """Starts the copies of one group's results (name -> quantized tensor, as a solver returns them): the
        solver's dequantized values are dropped now, the device tensors of the codes once they are copied."""
        part = self.parts
        if self._sink is not None:
            self.parts += 1
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="moequant-parts")
        if not self.cuda:
            done: Future = Future()
            done.set_result(self._store(part, results_to_host(res)))
            self._pending.append(done)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="moequant-results")
            self._stream = torch.cuda.Stream(self._device)
            self._staging = PinnedStaging()
        codes = {name: dataclasses.replace(qt, values=None) for name, qt in res.items()}
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self._device))
        self._pending.append(self._pool.submit(self._copy, part, codes, ready))

    def _copy(self, part: int, codes: dict, ready) -> dict:
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            host = results_to_host(codes, self._staging)  # its copies are on this thread's (the side) stream
        codes.clear()  # the device's codes go now, before the write
        return self._store(part, host)

    def _store(self, part: int, host: dict):
        """``host`` kept (no sink), or handed to the sink on the writer thread (the copy worker, or the engine
        without a GPU, goes on with the next group; on a GPU the device holds that group's codes until they are
        copied)."""
        if self._sink is None:
            return host
        return self._writer.submit(self._write, part, host)

    def _write(self, part: int, host: dict) -> dict:
        self._sink(part, host)
        return {}

    def results(self) -> dict:
        """Every group's host results, in the order they were added (waits for the copies in flight; with a sink,
        for their writes, and none are returned)."""
        out, writes = self.finish()
        writes.wait()
        return out

    def finish(self) -> tuple[dict, PartWrites]:
        """:meth:`results` without waiting for the writes: every group's host results (none with a sink) once the
        copies are done, and the writes still in flight, for the caller to wait for (the layer's commit)."""
        out: dict = {}
        writes = []
        pending, self._pending = self._pending, []
        for p in pending:
            r = p.result()  # the copy
            if isinstance(r, Future):
                writes.append(r)
            else:
                out.update(r)
        self._handed = True
        return out, PartWrites(writes)

    def close(self) -> None:
        """Waits for the copies in flight (a failed copy's error is raised by :meth:`results` only) and, unless
        :meth:`finish` handed them over, for the writes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._writer is not None:
            self._writer.shutdown(wait=not self._handed)
            self._writer = None


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
        # without waiting for the stream (a pinned batch is copied by the copy engine; torch's host allocator keeps
        # a page-locked source alive until its copy is done): a blocking copy waited for all the work queued before
        # it, so the GPU idled while the host issued each batch (pass 1: 16 waits, 46 % idle, run 64's trace)
        t = self.hidden[b].to(self.device, non_blocking=True)
        if self.keep:
            self._cache[b] = t
        return t

    def release(self) -> None:
        self._cache.clear()
