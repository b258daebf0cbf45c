"""Ranks of the distributed tests (tests/python/test_distributed.py): :func:`run_ranks` forks ``world`` processes,
each a rank of a gloo group running :func:`moequant.quantize` on one spec, and returns what each rank did.

Spec: ``model``, ``out``, ``recipe`` (dict), ``calibration`` (path), ``resume`` (bool), ``timeout_s`` (the process
group's), ``die_rank`` with ``die_at_layer`` (that rank kills itself with SIGKILL when that layer starts: a crashed
rank) or ``hang_at_layer`` (it sleeps instead: a hung rank), ``backend`` ("gloo", or "nccl" with ``gpu_per_rank``:
rank r on cuda:r)."""
from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import signal
import socket
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, spec: dict, result: str) -> None:
    import torch
    import torch.distributed as dist

    from moequant import pipeline

    torch.set_num_threads(1)
    out = {"rank": rank}
    if spec.get("gpu_per_rank"):  # NCCL: rank r on cuda:r
        torch.cuda.set_device(rank)

    class Fault(pipeline.LayerObserver):
        def layer_inputs(self, index, prefix, hidden, kwargs):
            if rank == spec.get("die_rank", -1) and index == spec.get("die_at_layer", -1):
                os.kill(os.getpid(), signal.SIGKILL)
            if rank == spec.get("die_rank", -1) and index == spec.get("hang_at_layer", -1):
                time.sleep(3600)

    t0 = time.time()
    try:
        dist.init_process_group(spec.get("backend", "gloo"), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=spec.get("timeout_s", 60)))
        report = pipeline.quantize(spec["model"], spec["recipe"], calibration=spec["calibration"],
                                   output_dir=spec.get("out"), resume=spec.get("resume", False), progress=False,
                                   observers=[Fault()])
        out.update(ok=True, layers=len(report.layers), resumed_from_layer=report.resumed_from_layer,
                   fallbacks=sum(1 for layer in report.layers for m in layer.modules if m.fallback))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.update(ok=False, error=f"{type(exc).__name__}: {exc}", type=type(exc).__name__)
    finally:
        out["seconds"] = round(time.time() - t0, 2)
        Path(result).write_text(json.dumps(out))
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    os._exit(0)  # no atexit handlers of the parent (pytest) in a forked child


def run_ranks(world: int, spec: dict, tmp: Path, wait_s: float = 300, straggle_s: float = 60,
              start: str = "fork") -> list:
    """Runs ``world`` forked ranks on ``spec``; per rank its result dict, or ``{"rank": r, "exitcode": code}`` for
    one that died. A rank still alive after ``wait_s``, or ``straggle_s`` after the first rank ended, is killed and
    reported as ``{"rank": r, "hung": True}``. ``start``: the start method ("spawn" once the parent has used CUDA)."""
    ctx = mp.get_context(start)
    port = _free_port()
    files = [tmp / f"rank{r}-{port}.json" for r in range(world)]
    procs = [ctx.Process(target=_rank, args=(r, world, port, spec, str(files[r])), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline, first_end = time.time() + wait_s, None
    while any(p.is_alive() for p in procs) and time.time() < deadline:
        if first_end is None and any(not p.is_alive() for p in procs):
            first_end = time.time()
        if first_end is not None and time.time() - first_end > straggle_s:
            break
        time.sleep(0.05)
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            results.append({"rank": r, "hung": True})
        elif files[r].is_file():
            results.append(json.loads(files[r].read_text()))
        else:
            results.append({"rank": r, "exitcode": p.exitcode})
    return results
