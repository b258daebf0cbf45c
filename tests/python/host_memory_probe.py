"""Runs ``moequant.quantize`` on a checkpoint and measures this process's anonymous host memory (``RssAnon``): the
baseline before the run (imports done, the model's non-layer parts read once) and the peak during it, sampled every
2 ms from a thread, per phase: ``setup`` (preflight, calibration inputs: up to the first layer), ``layers`` (the
layer loop), ``export``. Writes a JSON object: ``base`` bytes, ``peaks`` {phase: bytes}, ``peak`` (the largest),
``layer`` (the largest decoder layer's parameters in the compute dtype), ``nonlayer`` (the embeddings, norm and
lm_head as the run holds them), ``states`` (one copy of the calibration
hidden states), ``layers``, ``model`` (every decoder layer together), ``hidden_states`` (the report's placement),
``seconds``.

Usage: python host_memory_probe.py MODEL OUT.json [--samples N] [--seq-len S] [--batch-size B]
           [--host-memory-gb GB] [--device cpu|cuda] [--method gptq|rtn] [--leak]
(``--leak`` keeps every loaded layer alive: a deliberately broken run, for checking that the bound can fail.)

Used by tests/python/test_host_memory.py (CPU, in CI) and scripts/host_memory_cgroup.py (GPU machine, under a
cgroup memory limit)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Peak:
    """The largest :func:`rss_anon` seen every ``interval`` seconds while the ``with`` block runs, per phase
    (:meth:`phase` starts the next one)."""

    def __init__(self, interval: float = 0.002):
        self.peaks, self.current, self.interval = {}, "setup", interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        now = rss_anon()
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), now)
        return now

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def phase(self, name: str) -> None:
        self._sample()
        self.current = name
        self._sample()

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--host-memory-gb", type=float)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--leak", action="store_true")
    ap.add_argument("--work", help="where the output goes (default: a temporary directory)")
    args = ap.parse_args()

    import torch

    from moequant import pipeline
    from moequant.pipeline import LayerObserver
    from moequant.models import text_config
    from moequant.models.lazy import LazyModel
    from moequant.recipe import Recipe

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    lazy = LazyModel(args.model, dtype=dtype)  # imports, the meta model, the non-layer parts: in the baseline
    elt = torch.empty((), dtype=dtype).element_size()
    sizes = [sum(p.numel() for p in lazy.meta_layer(i).parameters()) * elt for i in range(lazy.num_layers)]
    hidden = text_config(lazy.config).hidden_size
    nonlayer = sum(p.numel() * p.element_size() for p in lazy.model.parameters() if not p.is_meta)
    del lazy
    leaked = []
    if args.leak:
        original = LazyModel.load_layer

        def load_and_keep(self, *a, **kw):
            layer = original(self, *a, **kw)
            leaked.append(layer)
            return layer

        LazyModel.load_layer = load_and_keep
    recipe = Recipe.from_dict({"scheme": {"method": args.method, "scale_search": "minmax"}, "device": args.device,
                               "calibration": {"num_samples": args.samples, "seq_len": args.seq_len,
                                               "batch_size": args.batch_size},
                               "host_memory_gb": args.host_memory_gb})
    ids = torch.randint(100, 8000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    work = Path(args.work or tempfile.mkdtemp(prefix="moequant-probe-"))
    out = work / "out"
    base = rss_anon()
    t = time.time()
    with Peak() as peak:
        class Phases(LayerObserver):
            def layer_inputs(self, index, prefix, hidden, kwargs):
                if peak.current == "setup":
                    peak.phase("layers")

            def layer_done(self, index, result):
                if index == len(sizes) - 1:
                    peak.phase("export")

        report = pipeline.quantize(args.model, recipe, calibration=ids, output_dir=out, progress=False,
                                   observers=[Phases()])
    seconds = time.time() - t
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    result = {"base": base, "peak": peak.peak, "peaks": peak.peaks, "layer": max(sizes), "layers": len(sizes), "model": sum(sizes), "nonlayer": nonlayer,
              "states": args.samples * args.seq_len * hidden * elt, "hidden_states": report.hidden_states,
              "seconds": round(seconds, 2), "leaked_layers": len(leaked)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
