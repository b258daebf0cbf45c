"""Who this process is in a multi-process run (:class:`DistContext`) and the collectives the pipeline uses, each
turning a lost peer into one :class:`DistributedError` (orchestration only: no math here).

A context is made from an initialised ``torch.distributed`` process group (:func:`current_context`; ``torchrun``
and the CLI initialise one, :func:`init_from_env`) and passed explicitly to what needs it: nothing is kept in a
module. Tensors travel on :attr:`DistContext.device` (the CPU for gloo, the rank's GPU for NCCL); a tensor elsewhere
goes through a copy there and back.
"""
from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["DistContext", "DistributedError", "current_context", "init_from_env", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800.0  # the CLI's process-group timeout (MOEQUANT_DIST_TIMEOUT_S overrides it)


class DistributedError(ConnectionError):
    """Another rank died, hung past the process group's timeout, or failed: the run ends on this rank too. A
    ConnectionError (an OSError): the CLI prints it as its one ``moequant: error:`` line and exits 2."""


@dataclass
class DistContext:
    """This process's place in the run: ``rank`` of ``world`` ranks of ``group`` (None: the default group);
    ``device``: where collectives' tensors live; ``timeout_s``: the group's timeout; ``where``: the step in progress
    and ``kept``: what a failure leaves (set by the run), both for messages."""

    rank: int
    world: int
    device: torch.device
    timeout_s: Optional[float] = None
    group: Any = None
    where: str = "the run"
    kept: str = "the finished layers are kept in OUT.partial: rerun with --resume (resume=True)"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------------------------------------- partitions
    def batch_range(self, num_batches: int) -> range:
        """The calibration batches this rank runs: a contiguous range (rank order is batch order), every rank at
        least one (checked by :meth:`check_batches`)."""
        return range(self.rank * num_batches // self.world, (self.rank + 1) * num_batches // self.world)

    def all_batch_ranges(self, num_batches: int) -> list[range]:
        return [range(r * num_batches // self.world, (r + 1) * num_batches // self.world) for r in range(self.world)]

    def check_batches(self, num_batches: int, batch_size: int) -> None:
        if num_batches < self.world:
            raise ValueError(f"calibration.batch_size: {num_batches} calibration batch(es) of {batch_size} samples "
                             f"for {self.world} ranks; every rank needs at least one batch: lower "
                             f"calibration.batch_size or raise calibration.num_samples to at least "
                             f"{self.world * batch_size}, or run fewer processes")

    def owner(self, unit: int) -> int:
        """The rank that owns expert unit ``unit`` (round robin, so a round of ``world`` units runs in parallel)."""
        return unit % self.world

    # -------------------------------------------------------------------------------------------- collectives
    def _fail(self, what: str, exc: BaseException) -> DistributedError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        timeout = f" (timeout {self.timeout_s:g} s)" if self.timeout_s else ""
        return DistributedError(
            f"rank {self.rank} of {self.world}: lost the other ranks during {what} in {self.where}{timeout}: a rank "
            f"died, hung or failed (see its own error) [{first[:200]}]; every rank stops; {self.kept}")

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except DistributedError:
            raise
        except Exception as exc:  # gloo: "Connection closed by peer", timeouts; NCCL: DistBackendError
            raise self._fail(what, exc) from exc

    def broadcast_(self, t: torch.Tensor, src: int, what: str = "a broadcast") -> torch.Tensor:
        """Broadcasts ``t`` from ``src`` into ``t`` on every rank (in place; returns it)."""
        if t.device == self.device and t.is_contiguous():
            self._call(what, dist.broadcast, t, src=src)
            return t
        buf = t.detach().to(self.device).contiguous()
        self._call(what, dist.broadcast, buf, src=src)
        t.copy_(buf.to(t.device))
        return t

    def broadcast_object(self, obj: Any, src: int, what: str = "a broadcast") -> Any:
        """``obj`` of rank ``src`` on every rank (pickled)."""
        box = [obj if self.rank == src else None]
        self._call(what, dist.broadcast_object_list, box, src=src,
                   device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def send_object(self, obj: Any, dst: int, what: str = "a transfer") -> None:
        self._call(what, dist.send_object_list, [obj], dst=dst,
                   device=self.device if self.device.type == "cuda" else None)

    def recv_object(self, src: int, what: str = "a transfer") -> Any:
        box = [None]
        self._call(what, dist.recv_object_list, box, src=src,
                   device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def send_tensor(self, t: torch.Tensor, dst: int, what: str = "a transfer") -> None:
        buf = t.detach().to(self.device).contiguous()
        self._call(what, dist.send, buf, dst=dst)

    def recv_tensor(self, shape, dtype: torch.dtype, src: int, what: str = "a transfer") -> torch.Tensor:
        """A tensor of ``shape`` / ``dtype`` sent by ``src``, on :attr:`device`."""
        buf = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        self._call(what, dist.recv, buf, src=src)
        return buf.cpu()

    def on_root(self, fn: Callable[[], Any], what: str) -> Any:
        """Runs ``fn`` on rank 0 only; its result, or the exception it raised (the same type and message), on every
        rank: a check that fails fails the same way everywhere, before any work."""
        if self.is_root:
            try:
                result, error = fn(), None
            except Exception as exc:  # noqa: BLE001 - handed to every rank, then raised
                result, error = None, exc
            payload = None
            if error is not None:
                try:
                    raw = pickle.dumps(error)
                except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
                    raw = None
                payload = (raw, f"rank 0: {type(error).__name__}: {error}")
            self.broadcast_object((result, payload), 0, what)
        else:
            result, payload = self.broadcast_object(None, 0, what)
            error = None
            if payload is not None:
                raw, text = payload
                try:
                    error = pickle.loads(raw) if raw is not None else RuntimeError(text)
                except Exception:  # noqa: BLE001 - one that does not unpickle, as its text
                    error = RuntimeError(text)
        if error is not None:
            raise error
        return result


def current_context(device: Optional[torch.device] = None) -> Optional[DistContext]:
    """The :class:`DistContext` of the initialised default process group with more than one rank, else None (a
    single-process run). ``device``: the run's compute device (NCCL needs the rank's GPU)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend:
        if device is None or device.type != "cuda":
            raise ValueError(f"device: an NCCL process group needs a CUDA device, got {device}; set device: cuda "
                             f"(--device cuda) or initialise a gloo group for a CPU run")
        comm = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    else:
        comm = torch.device("cpu")
    timeout = None
    try:  # the group's timeout, for messages only (a private API: messages omit it when it moves)
        pg = dist.distributed_c10d._get_default_group()  # noqa: SLF001
        backend_dev = torch.device("cuda") if comm.type == "cuda" else torch.device("cpu")
        timeout = pg._get_backend(backend_dev).options._timeout.total_seconds()  # noqa: SLF001
    except Exception:  # noqa: BLE001
        timeout = None
    return DistContext(rank=dist.get_rank(), world=world, device=comm, timeout_s=timeout)


def init_from_env(device_spec: str = "cpu") -> bool:
    """Initialises the default process group from ``torchrun``'s environment (``WORLD_SIZE`` > 1 and no group
    yet): NCCL for a CUDA device (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU, with the timeout
    ``MOEQUANT_DIST_TIMEOUT_S`` (default 1800 s). True when it initialised one (the caller destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not dist.is_available() or dist.is_initialized():
        return False
    raw = os.environ.get("MOEQUANT_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        timeout = float(raw)
        if timeout <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"MOEQUANT_DIST_TIMEOUT_S: expected a positive number of seconds, got {raw!r}") from None
    cuda = str(device_spec).startswith("cuda")
    kw = {}
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        kw["device_id"] = torch.device("cuda", local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout), **kw)
    return True
