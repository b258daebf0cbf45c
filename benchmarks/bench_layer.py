"""One DeepSeek-V3-shaped MoE layer end to end on the GPU: routed tokens -> packed 4-bit weights (target <= 8 s).

Layer: hidden 7168, 256 experts of width 2048, top-8 routing, 65,536 calibration tokens (524,288 routed rows),
random bf16 weights (gate, up [2048, 7168], down [7168, 2048] per expert) and random router logits. Only public
moequant ops are used:
  route       router logits x @ Wr, softmax, top-8, stable sort of the (token, slot) pairs by expert (once)
  H gate_up   ops.HessianAccumulator(G, 7168).add(bf16 rows of the group's experts, local ids, routing weights):
              the layer's bf16 activations as they are, which is what the pipeline's capture passes
  down input  h = silu(x We_g^T) * (x We_u^T) per expert (torch, bf16 matmuls, fp32 result)
  H down      ops.HessianAccumulator(G, 2048).add(h, ...)
  GPTQ        ops.gptq_quantize_batched: gate+up as one [4096, 7168] problem per expert, down [7168, 2048];
              4-bit asymmetric g128, block 128, compute_loss=False, overwrite_h=True (chunks of experts);
              --recipe-default: the default recipe's solver instead (the settings of moequant.recipe.QuantScheme(),
              printed with the results, and the proxy loss of every expert that the pipeline's report shows)
  pack        ops.pack_int32(codes, 4) and ops.pack_zero_points(zero_point, 4) per projection
Experts are processed in groups of --group (default 32) so that the group's Hessians fit (256 gate_up Hessians
alone would be 52.6 GB); the weights of a group are generated before its stages and are not timed. Every stage is
timed with torch.cuda.synchronize() + perf_counter and summed over the groups.
--experts N < 256 processes only the first N experts' groups (routing still over all 256) and extrapolates the
per-expert stages linearly to 256 experts; the table then says "extrapolated".
Usage: python benchmarks/bench_layer.py [--experts 256] [--group 32] [--gptq-chunk 16] [--hessian-precision bf16]
       [--recipe-default] [--profile FILE]
The default Hessian precision is bf16, what the pipeline uses for bf16 layers on CUDA (recipe
``hessian_precision: auto``); pass fp32 for the SIMT update.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table  # noqa: E402
from shapes import SHAPES  # noqa: E402

from moequant import ops  # noqa: E402
from moequant.recipe import QuantScheme  # noqa: E402

TARGET_S = 8.0


class Stages:
    def __init__(self):
        self.t = {}

    def run(self, name, fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
        return out


def make_weights(G, hidden, width, gen):
    """Random bf16 expert weights, scaled like a trained layer (std 1/sqrt(fan_in))."""
    wgu = (torch.randn(G, 2 * width, hidden, device="cuda", generator=gen) * hidden ** -0.5).bfloat16()
    wd = (torch.randn(G, hidden, width, device="cuda", generator=gen) * width ** -0.5).bfloat16()
    return wgu, wd


def process_group(st, g0, G, xbf, tok_sorted, exp_sorted, w_sorted, offsets, wgu, wd, shp, args, solver):
    hidden, width = shp.hidden, shp.width
    r0, r1 = int(offsets[g0]), int(offsets[g0 + G])
    counts = (offsets[g0 + 1:g0 + G + 1] - offsets[g0:g0 + G]).tolist()
    toks = tok_sorted[r0:r1]
    ids = (exp_sorted[r0:r1] - g0).to(torch.int32)
    cw = w_sorted[r0:r1]

    def h_gate_up():
        acc = ops.HessianAccumulator(G, hidden, device="cuda", precision=args.hessian_precision)
        acc.add(xbf.index_select(0, toks), ids, cw)  # the layer's bf16 activations, as the pipeline passes them
        return acc

    acc_gu = st.run("H gate_up", h_gate_up)

    def down_inputs():
        h = torch.empty(r1 - r0, width, device="cuda")
        o = 0
        for e in range(G):
            xe = xbf.index_select(0, toks[o:o + counts[e]])
            gu = xe @ wgu[e].t()  # [m, 2 * width] bf16
            h[o:o + counts[e]] = (torch.nn.functional.silu(gu[:, :width].float()) * gu[:, width:].float())
            o += counts[e]
        return h

    hdown = st.run("down inputs (silu*up)", down_inputs)

    def h_down():
        acc = ops.HessianAccumulator(G, width, device="cuda", precision=args.hessian_precision)
        acc.add(hdown, ids, cw)
        return acc

    acc_d = st.run("H down", h_down)
    del hdown

    packed = []

    def gptq_and_pack(name, w, H, chunk):
        for c0 in range(0, G, chunk):
            c1 = min(G, c0 + chunk)
            qts = st.run(f"GPTQ {name}", lambda: ops.gptq_quantize_batched(
                w[c0:c1], H[c0:c1], overwrite_h=True, **solver))

            def pack():
                return [(ops.pack_int32(q.codes, 4), ops.pack_zero_points(q.zero_point, 4), q.scale) for q in qts]

            packed.extend(st.run("pack", pack))
            del qts

    gptq_and_pack("gate_up", wgu, acc_gu.hessians, args.gptq_chunk)
    del acc_gu
    gptq_and_pack("down", wd, acc_d.hessians, args.gptq_chunk_down)
    del acc_d
    return len(packed)


def profiled(path: str, fn):
    """fn() under torch.profiler; the kernels by total GPU time go to ``path`` and stdout."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    with open(path, "w") as f:
        f.write(table)
    print(table, flush=True)
    return out


def gptq_kwargs(args) -> dict:
    """The solver settings: the plain issue configuration, or with --recipe-default what the pipeline's default
    recipe runs (moequant.recipe.QuantScheme().gptq_kwargs(), and the proxy loss of every expert for the report)."""
    if not args.recipe_default:
        return dict(bits=4, group_size=128, symmetric=False, compute_loss=False)
    return {**QuantScheme().gptq_kwargs(), "compute_loss": True}


def describe_solver(args, kwargs: dict) -> str:
    """The solver as run: the default recipe's label, then every setting of ops.gptq_quantize_batched (its own
    defaults where kwargs leaves one out), so the printout cannot drift from the code."""
    sig = inspect.signature(ops.gptq_quantize_batched).parameters
    settings = {k: p.default for k, p in sig.items() if p.default is not inspect.Parameter.empty}
    settings.update(kwargs, overwrite_h=True)
    label = f"as the default recipe ({QuantScheme().describe()})" if args.recipe_default else "plain"
    return f"{label}: " + ", ".join(f"{k}={v}" for k, v in settings.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=256, help="experts actually processed (rest extrapolated)")
    ap.add_argument("--group", type=int, default=32, help="experts whose Hessians are held at once")
    ap.add_argument("--gptq-chunk", type=int, default=16, help="gate_up experts per gptq_quantize_batched call")
    ap.add_argument("--gptq-chunk-down", type=int, default=32, help="down experts per gptq_quantize_batched call")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--hessian-precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--recipe-default", action="store_true",
                    help="GPTQ as the default recipe (moequant.recipe.QuantScheme()) runs it, with the proxy "
                         "loss; the settings are printed with the results")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="profile the first group's stages with torch.profiler (CUDA kernels) and write the table of "
                         "kernels by GPU time to FILE (also printed); the group's times then include the profiler")
    args = ap.parse_args()
    solver = gptq_kwargs(args)
    shp = SHAPES["deepseek-v3"]
    E, K, hidden = shp.experts, shp.top_k, shp.hidden
    G = min(args.group, args.experts)
    n_exp = (args.experts + G - 1) // G * G
    assert E % G == 0 and n_exp <= E, "--group must divide 256 and --experts <= 256"
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.tokens, hidden, device="cuda", generator=gen).bfloat16()
    wr = (torch.randn(E, hidden, device="cuda", generator=gen) * hidden ** -0.5).bfloat16()

    # Warm-up (not timed): cuBLAS handles, kernels, allocator pools, on one small expert chunk of each shape.
    wgu, wd = make_weights(2, hidden, shp.width, gen)
    for w, d in ((wgu, hidden), (wd, shp.width)):
        acc = ops.HessianAccumulator(2, d, device="cuda", precision=args.hessian_precision)
        acc.add(torch.randn(4096, d, device="cuda", generator=gen), torch.arange(4096, device="cuda") % 2)
        qts = ops.gptq_quantize_batched(w, acc.hessians, overwrite_h=True, **solver)
        ops.pack_int32(qts[0].codes, 4), ops.pack_zero_points(qts[0].zero_point, 4)
    del wgu, wd, acc, qts
    torch.cuda.synchronize()

    st = Stages()

    def route():
        probs = torch.softmax((x @ wr.t()).float(), dim=-1)
        topw, tope = probs.topk(K, dim=-1)  # [T, K]
        flat_e = tope.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        tok_sorted = (order // K).to(torch.int64)
        exp_sorted = flat_e.index_select(0, order)
        w_sorted = topw.reshape(-1).index_select(0, order).contiguous()
        offsets = torch.zeros(E + 1, dtype=torch.int64, device="cuda")
        offsets[1:] = torch.cumsum(torch.bincount(flat_e, minlength=E), 0)
        return tok_sorted, exp_sorted, w_sorted, offsets.cpu()

    tok_sorted, exp_sorted, w_sorted, offsets = st.run("route (once)", route)
    n_packed = 0
    setup_s = 0.0
    wall0 = time.perf_counter()
    for g0 in range(0, n_exp, G):
        t0 = time.perf_counter()
        wgu, wd = make_weights(G, hidden, shp.width, gen)
        torch.cuda.synchronize()
        setup_s += time.perf_counter() - t0
        def group():
            return process_group(st, g0, G, x, tok_sorted, exp_sorted, w_sorted, offsets, wgu, wd, shp, args, solver)

        n_packed += profiled(args.profile, group) if args.profile and g0 == 0 else group()
        del wgu, wd
        done = sum(v for k, v in st.t.items() if k != "route (once)")
        print(f"  experts {g0}..{g0 + G - 1} done: {done:.2f} s of stages so far, peak memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    wall = time.perf_counter() - wall0
    assert n_packed == 2 * n_exp

    scale = E / n_exp
    label = "measured" if scale == 1.0 else f"extrapolated x{scale:.0f} from {n_exp} experts"
    rows = []
    total = 0.0
    for name, t in st.t.items():
        full = t if name == "route (once)" else t * scale
        total += full
        rows.append([name, f"{t:.3f}", f"{full:.3f}", "measured" if full == t else "extrapolated"])
    rows.append(["TOTAL", f"{sum(st.t.values()):.3f}", f"{total:.3f}",
                 f"{'MET' if total <= TARGET_S else 'NOT MET'} (target {TARGET_S:.0f} s)"])
    print(f"\nrouted rows {args.tokens * K}, experts processed {n_exp}/{E}, Hessian precision "
          f"{args.hessian_precision}, GPTQ {describe_solver(args, solver)}; untimed weight generation {setup_s:.2f} s; "
          f"loop wall {wall:.2f} s; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print_table(f"DeepSeek-V3 MoE layer, {args.tokens} tokens top-{K}, 4-bit g128 asym ({label})",
                ["stage", f"s ({n_exp} experts)", "s (256 experts)", "note"], rows)


if __name__ == "__main__":
    main()
