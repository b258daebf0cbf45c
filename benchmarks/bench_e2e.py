"""End to end on real MoE shapes: a random-weight model with N decoder layers built from a real config, quantized
through the public API (``moequant.quantize``) as a user runs it, optionally side by side with llm-compressor's
oneshot GPTQ W4A16 on the same model, tokens and machine.

Prints per-layer seconds (steady state: the median of the layers after the first), the phase breakdown of each
layer when the pipeline reports one (load, forwards, Hessians, solve, write), the GPU peak (torch's allocator) and
the host's anonymous-memory peak (RssAnon of this process, sampled every 50 ms), and, with llm-compressor, its
seconds per layer and the ratio. Random weights: timing and memory only, never quality.

Usage (GPU machine, repository root):
    python benchmarks/bench_e2e.py --model qwen3-30b-a3b --layers 4 [--samples 128 --seq-len 2048]
        [--work /tmp/e2e] [--out DIR] [--llmcompressor ITS_PYTHONPATH] [--recipe FILE] [--json OUT.json]
Several GPUs (docs/distributed.md): python -m torch.distributed.run --nproc-per-node N benchmarks/bench_e2e.py ...
Models: deepseek-v3, kimi-k2, qwen3-30b-a3b, qwen3-235b-a22b, gpt-oss-120b, mixtral-8x7b (and smoke: a few-MB
model to check the script on a CPU with --device cpu).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Public configs (config.json of each release), decoder shapes only; vocabularies are real, routers too.
CONFIGS = {
    "deepseek-v3": dict(
        model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, num_attention_heads=128, num_key_value_heads=128, vocab_size=129280,
        routed_scaling_factor=2.5, norm_topk_prob=True, tie_word_embeddings=False, rms_norm_eps=1e-6,
        max_position_embeddings=4096),
    "kimi-k2": dict(
        model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
        first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, num_attention_heads=64, num_key_value_heads=64, vocab_size=163840,
        routed_scaling_factor=2.827, norm_topk_prob=True, tie_word_embeddings=False, rms_norm_eps=1e-6,
        max_position_embeddings=4096),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=151936, norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=40960,
        rope_theta=1e6, rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3-235b-a22b": dict(
        model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_experts=128, num_experts_per_tok=8, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
        vocab_size=151936, norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=40960,
        rope_theta=1e6, rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[]),
    "gpt-oss-120b": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_local_experts=128,
        num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
        sliding_window=128, tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=131072),
    # Not a release: a few-MB model of the Qwen3-MoE family for checking this script on a CPU (``--device cpu``).
    "smoke": dict(
        model_type="qwen3_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
        num_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        vocab_size=8192, norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=4096,
        rope_theta=1e6, rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral-8x7b": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
        num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=1e6),
}
# gpt-oss alternates sliding and full attention; its default group size 32 keeps 2880 divisible.
GROUP_SIZE = {"gpt-oss-120b": 32}


def build_model(name: str, layers: int, out: Path, device: str) -> float:
    """Saves a random-weight bf16 model of ``layers`` decoder layers (built on the GPU: fast init) with the
    repository's tokenizer files; returns its parameter count in billions."""
    import transformers

    cfg = dict(CONFIGS[name])
    cfg["num_hidden_layers"] = layers
    if cfg["model_type"] == "gpt_oss":
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.dtype = "bfloat16"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    model.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "examples" / "tiny_moe" / "tokenizer" / f, out / f)
    return n


class HostPeak:
    """Samples this process's anonymous resident memory (``RssAnon`` of /proc/self/status) and its whole resident
    set (``VmRSS``: also the page-locked memory the CUDA driver maps, which RssAnon does not count, and the mapped
    libraries) every 50 ms."""

    def __init__(self):
        self.peak = self.rss_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        anon = rss = 0
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return anon, rss

    @classmethod
    def now(cls) -> int:
        return cls.read()[0]

    def _sample(self):
        anon, rss = self.read()
        self.peak, self.rss_peak = max(self.peak, anon), max(self.rss_peak, rss)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _pinned_peak_gb() -> float:
    """The peak of page-locked host memory torch's caching host allocator held (0 where torch does not say)."""
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})() or {}
    for key in ("reserved_bytes.peak", "reserved_bytes.all.peak", "allocated_bytes.peak", "allocated_bytes.all.peak"):
        if key in stats:
            return round(stats[key] / 1e9, 2)
    peaks = [v for k, v in stats.items() if "bytes" in k and k.endswith("peak") and isinstance(v, (int, float))]
    return round(max(peaks) / 1e9, 2) if peaks else 0.0


_LLMC = r"""
import sys, time, json, torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
model_dir, ids_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
ids = torch.load(ids_path)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$", "re:.*router$"])
t = time.time()
oneshot(model=model_dir, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], output_dir=out)
print(json.dumps({"seconds": time.time() - t, "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9}))
"""


def run_llmcompressor(pythonpath: str, model_dir: Path, ids_path: Path, out: Path) -> dict:
    # Its own PYTHONPATH only: llm-compressor pins its compressed-tensors (and runs on the image's transformers),
    # so moequant's folders must not shadow them.
    env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.run([sys.executable, "-c", _LLMC, str(model_dir), str(ids_path), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": "\n".join(proc.stderr.strip().splitlines()[-25:]) or f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class LayerProfiler:
    """A layer observer: torch.profiler from layer ``index``'s inputs to the next layer's (or the run's end), then
    the top operators by self CUDA time and by self CPU time, and the phase markers' wall times (the interface of
    moequant.pipeline.LayerObserver, which this script imports only once its arguments are parsed)."""

    def __init__(self, index: int, out, trace=None) -> None:
        self.index, self.out, self.trace, self.prof, self.t0 = index, out, trace, None, 0.0

    def layer_inputs(self, index, prefix, hidden, kwargs) -> None:
        if index == self.index:
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.time()
        elif index == self.index + 1:
            self.stop()

    def layer_done(self, index, result) -> None:
        pass

    def stop(self) -> None:
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.time() - self.t0
        self.prof.__exit__(None, None, None)
        if self.trace:  # a Chrome / Perfetto timeline (gzip: a Qwen3 layer's trace is tens of MB as text)
            tmp = str(self.trace) + ".json"
            self.prof.export_chrome_trace(tmp)
            with open(tmp, "rb") as src, gzip.open(self.trace, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
            Path(tmp).unlink()
        ka = self.prof.key_averages()
        text = [f"profile of layer {self.index}: {wall:.2f} s wall"]
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            text.append(f"-- by {key}")
            text.append(ka.table(sort_by=key, row_limit=45, max_name_column_width=140))
        self.prof = None
        msg = "\n".join(text)
        print(msg)
        if self.out:
            Path(self.out).write_text(msg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS), default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: only to check the script")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--work", default="/tmp/moequant-e2e", help="where the model, outputs and tokens go")
    ap.add_argument("--out", help="where the quantized checkpoint and its work directory go (default: under --work;"
                    " e.g. /dev/shm when the disk holds the model but not both)")
    ap.add_argument("--recipe", help="recipe file (default: the default recipe)")
    ap.add_argument("--device-memory-gb", type=float, help="the GPU memory a MoE layer may use (recipe setting)")
    ap.add_argument("--host-memory-gb", type=float, help="the host memory the calibration hidden states may use "
                    "(recipe setting; 0: the disk-backed store)")
    ap.add_argument("--llmcompressor", metavar="PATHS",
                    help="PYTHONPATH (folders joined by ':') under which llm-compressor imports; it replaces this "
                         "process's PYTHONPATH in llm-compressor's subprocess")
    ap.add_argument("--keep", action="store_true", help="keep the built model for the next run")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile-layer", type=int, metavar="N",
                    help="run layer N under torch.profiler and print where its time goes (CPU and CUDA tables)")
    ap.add_argument("--profile-out", help="with --profile-layer: write the tables here (default: print only)")
    ap.add_argument("--profile-trace", help="with --profile-layer: write the layer's timeline here (Chrome trace "
                    "JSON, gzip-compressed; open it in Perfetto or chrome://tracing)")
    args = ap.parse_args()
    from moequant.pipeline.distributed import init_from_env
    from moequant.recipe import Recipe

    # under torchrun (docs/distributed.md): every rank quantizes, rank 0 builds the model, writes and prints
    owned = init_from_env(args.device)
    try:
        return _run(args, Recipe)
    finally:
        if owned:
            torch.distributed.destroy_process_group()


def _run(args, Recipe) -> int:
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    work = Path(args.work)
    model_dir = work / f"{args.model}-{args.layers}l"
    if rank == 0 and not (model_dir / "config.json").is_file():
        t = time.time()
        n = build_model(args.model, args.layers, model_dir, args.device)
        print(f"built {args.model} x {args.layers} layers ({n:.2f} B parameters) in {time.time() - t:.1f} s")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 8000, (args.samples, args.seq_len), generator=g)
    ids_path = work / "ids.pt"
    if rank == 0:
        torch.save(ids, ids_path)
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    data = recipe.to_dict()
    data["device"] = args.device
    cuda = args.device == "cuda"
    if args.model in GROUP_SIZE:
        data["scheme"]["group_size"] = GROUP_SIZE[args.model]
    if args.device_memory_gb is not None:
        data["device_memory_gb"] = args.device_memory_gb
    if args.host_memory_gb is not None:
        data["host_memory_gb"] = args.host_memory_gb
    recipe = Recipe.from_dict(data)
    out = Path(args.out or work) / f"{args.model}-{args.layers}l-w4"
    if rank == 0:
        for d in (out, Path(str(out) + ".partial")):
            shutil.rmtree(d, ignore_errors=True)
    if world > 1:
        dist.barrier()

    import moequant

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        observers = [] if args.profile_layer is None else \
            [LayerProfiler(args.profile_layer, args.profile_out, args.profile_trace)]
        with HostPeak() as host:
            report = moequant.quantize(str(model_dir), recipe, calibration=ids, output_dir=str(out),
                                       progress=rank == 0, observers=observers)
        for o in observers:
            o.stop()
    except BaseException:
        if rank == 0:
            for d in (out, Path(str(out) + ".partial")) + (() if args.keep else (model_dir,)):
                shutil.rmtree(d, ignore_errors=True)  # the next run's disk
        raise
    total = time.time() - t0
    if rank != 0:
        return 0
    secs = [layer.seconds for layer in report.layers]
    steady = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
    res = {"model": args.model, "layers": args.layers, "tokens": [args.samples, args.seq_len], "ranks": world,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "total_s": round(total, 2), "layer_s": secs,
           "steady_layer_s": steady, "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else 0.0,
           "host_anon_peak_gb": round(host.peak / 1e9, 2), "host_rss_peak_gb": round(host.rss_peak / 1e9, 2),
           "pinned_peak_gb": _pinned_peak_gb() if cuda else 0.0, "hidden_states": report.hidden_states,
           "phases": [layer.phases for layer in report.layers], "groups": [layer.groups for layer in report.layers]}
    print(f"\n== moequant {args.model} x {args.layers} layers, {args.samples} x {args.seq_len} tokens, "
          f"{res['device']}{f' x {world} ranks (GPU peak: rank 0)' if world > 1 else ''} ==")
    # one layer is no steady state: its time holds the first layer's load (no previous layer to hide it behind) and
    # the first allocations of pinned host memory (torch's caching host allocator reuses them from the third layer)
    note = "" if len(secs) > 1 else " (one layer: not a steady state; it includes the load and first allocations)"
    print(f"total {total:.1f} s; per layer {', '.join(f'{s:.2f}' for s in secs)} s; steady state {steady:.2f} s{note}")
    hs = report.hidden_states or {}
    print(f"GPU peak {res['gpu_peak_gb']:.1f} GB; host anonymous peak {res['host_anon_peak_gb']:.1f} GB, resident "
          f"{res['host_rss_peak_gb']:.1f} GB, page-locked (torch's host allocator) {res['pinned_peak_gb']:.1f} GB; "
          f"hidden states {'on disk' if hs.get('on_disk') else 'in memory'} (2 x {hs.get('bytes', 0) / 1e9:.2f} GB)")
    print(f"experts: {res['groups'][-1]}")
    if any(res["phases"]):
        keys = sorted({k for p in res["phases"] if p for k in p})
        print("phase seconds per layer: " + " | ".join(keys))
        for i, p in enumerate(res["phases"]):
            if p:
                print(f"  layer {i}: " + " | ".join(f"{p.get(k, 0):.2f}" for k in keys))
    if args.llmcompressor:
        lc_out = work / f"{args.model}-{args.layers}l-llmc"
        shutil.rmtree(lc_out, ignore_errors=True)
        lc = run_llmcompressor(args.llmcompressor, model_dir, ids_path, lc_out)
        res["llmcompressor"] = lc
        if "seconds" in lc:
            per = lc["seconds"] / args.layers
            print(f"llm-compressor oneshot GPTQ W4A16: {lc['seconds']:.1f} s ({per:.2f} s per layer, GPU peak "
                  f"{lc['gpu_peak_gb']:.1f} GB); moequant is {per / steady:.1f}x faster per layer (steady state)")
        else:
            print(f"llm-compressor failed: {lc['error']}")
        shutil.rmtree(lc_out, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
