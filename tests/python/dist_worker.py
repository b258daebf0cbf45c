"""Worker of the distributed tests (tests/python/test_distributed.py): one rank of a gloo run of
:func:`moequant.quantize`, started with ``python dist_worker.py RANK WORLD PORT SPEC_JSON``.

SPEC_JSON: ``model``, ``out``, ``recipe`` (dict), ``calibration`` (path), ``resume`` (bool), ``timeout_s``,
``die_at_layer`` / ``die_rank`` (that rank kills itself with SIGKILL when that layer starts: a crashed rank),
``hang_at_layer`` (that rank sleeps instead: a hung one). Exit 0; 2 with ``ERROR <type>: <message>`` on stderr."""
from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time


def main() -> int:
    rank, world, port, spec = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from moequant import pipeline

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=spec.get("timeout_s", 60)))

    class Fault(pipeline.LayerObserver):
        def layer_inputs(self, index, prefix, hidden, kwargs):
            if rank == spec.get("die_rank", -1) and index == spec.get("die_at_layer", -1):
                os.kill(os.getpid(), signal.SIGKILL)
            if rank == spec.get("die_rank", -1) and index == spec.get("hang_at_layer", -1):
                time.sleep(3600)

    try:
        report = pipeline.quantize(spec["model"], spec["recipe"], calibration=spec["calibration"],
                                   output_dir=spec["out"], resume=spec.get("resume", False), progress=False,
                                   observers=[Fault()])
        print(json.dumps({"rank": rank, "layers": len(report.layers),
                          "resumed_from_layer": report.resumed_from_layer}))
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the test
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


if __name__ == "__main__":
    sys.exit(main())
