"""Host memory: how much this process may still take (:func:`available_host_memory`: ``MemAvailable`` lowered by
every cgroup memory limit above the process), and where a run keeps its calibration hidden states
(:func:`plan_states`: in memory when their two copies fit ``host_memory_gb``, else in the disk-backed store of
:mod:`moequant.pipeline.states`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["GIB", "StatesPlan", "available_host_memory", "layer_host_bytes", "plan_states"]

logger = logging.getLogger(__name__)

GIB = 2**30


def _meminfo_available(proc: Path) -> Optional[int]:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(p: Path) -> Optional[int]:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) or garbage: no limit


def _stat(p: Path, *keys: str) -> int:
    """The first of ``keys`` found in a cgroup ``memory.stat`` file (0 if none)."""
    try:
        values = dict(line.split()[:2] for line in p.read_text().splitlines() if len(line.split()) >= 2)
    except (OSError, ValueError):
        return 0
    for k in keys:
        if k in values and values[k].isdigit():
            return int(values[k])
    return 0


def _cgroup_available(proc: Path, cgroup_root: Path) -> Optional[int]:
    """The least room left under any memory limit of the cgroups above this process: ``limit - usage +
    page cache`` (the page cache is reclaimed under a limit; anonymous memory is not). None without a limit."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    best: Optional[int] = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2: memory.max at every level up to the root
            d, stop = cgroup_root / rel.lstrip("/"), cgroup_root
            limit_file, usage_file, cache = "memory.max", "memory.current", ("file",)
        elif "memory" in controllers.split(","):  # cgroup v1: the memory hierarchy
            d, stop = cgroup_root / "memory" / rel.lstrip("/"), cgroup_root / "memory"
            limit_file, usage_file, cache = "memory.limit_in_bytes", "memory.usage_in_bytes", ("total_cache", "cache")
        else:
            continue
        while True:
            limit = _read_int(d / limit_file)
            if limit is not None and limit < 2**60:  # v1 writes a huge number for "no limit"
                usage = _read_int(d / usage_file) or 0
                room = max(0, limit - usage + _stat(d / "memory.stat", *cache))
                best = room if best is None else min(best, room)
            if d == stop or d == d.parent:
                break
            d = d.parent
    return best


def available_host_memory(proc: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes of host memory this process may still take: ``MemAvailable`` (/proc/meminfo), lowered by the room under
    every cgroup (v1 or v2) memory limit above the process (a container's, a ``systemd-run -p MemoryMax=`` scope's).
    None when nothing can be read (not Linux)."""
    proc, cgroup_root = Path(proc), Path(cgroup_root)
    found = [v for v in (_meminfo_available(proc), _cgroup_available(proc, cgroup_root)) if v is not None]
    return min(found) if found else None


@dataclass(frozen=True)
class StatesPlan:
    """Where the calibration hidden states live: ``bytes`` one copy (num_samples x seq_len x hidden in the compute
    dtype); a layer holds two in memory (its inputs and outputs); ``budget``: the host memory they may use
    (``host_memory_gb``, else automatic); ``on_disk``: two copies exceed it."""

    bytes: int
    budget: int
    on_disk: bool
    automatic: bool

    def describe(self) -> str:
        where = "on disk, in the work directory" if self.on_disk else "in host memory"
        how = "automatic" if self.automatic else "host_memory_gb"
        return (f"calibration hidden states {where} (2 x {self.bytes / 1e9:.2f} GB; host budget "
                f"{self.budget / 1e9:.2f} GB, {how})")

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "budget": self.budget, "on_disk": self.on_disk, "automatic": self.automatic}


def layer_host_bytes(tensor_bytes: list, pinned: bool, margin: int = GIB) -> int:
    """Host memory a run needs besides the calibration hidden states, for a decoder layer whose tensors are
    ``tensor_bytes`` (pure): the next layer read ahead (page-locked when ``pinned``, i.e. bound for a GPU: torch's
    caching host allocator rounds each tensor up to a power of two, 1.55 GiB for Qwen3-30B-A3B's 1.16 GiB layer),
    the quantized results of up to two layers in flight (int8 codes of the 16-bit weights, at most half a layer
    each: one layer), and ``margin`` for the rest (allocator caches, the runtime's own growth).

    A Qwen3-30B-A3B run under a cgroup limit of one layer + one copy of the states + 4 GiB (6.16 GiB) was OOM-killed
    with its states in memory while its results were page-locked copies (rounded up); with the results pageable
    (:class:`moequant.pipeline.host.PinnedStaging`) and this budget it kept them in memory and finished, peak
    RssAnon 2.44 GiB (an H100, session 12)."""
    sizes = [int(b) for b in tensor_bytes]
    read = sum(1 << (b - 1).bit_length() if b > 0 else 0 for b in sizes) if pinned else sum(sizes)
    return read + sum(sizes) + int(margin)


def plan_states(states_bytes: int, host_memory_gb: Optional[float], layer_bytes: int,
                available: Optional[int]) -> StatesPlan:
    """Chooses where the hidden states live (pure).

    Args:
        states_bytes: one copy of the hidden states. host_memory_gb: the recipe's budget (0 keeps them on disk);
            None: automatic, what ``available`` leaves after ``layer_bytes`` (:func:`layer_host_bytes`: what the
            run holds in host memory besides the states); with nothing known (``available`` None) they stay in
            memory.
    """
    if host_memory_gb is not None:
        budget, auto = int(host_memory_gb * GIB), False
    elif available is None:
        budget, auto = 2 * states_bytes, True
    else:
        budget, auto = max(0, available - layer_bytes), True
    return StatesPlan(int(states_bytes), int(budget), 2 * states_bytes > budget, auto)
