"""Quality gate: perplexity of moequant-quantized checkpoints of a trained MoE.

Protocol (same as ../shared/tools/ref_baseline.py): calibration = 128 random windows of 512 tokens of
calib.txt (seed 0), perplexity over non-overlapping 512-token windows of heldout.txt and wt2_test.txt,
all Linears of the decoder layers and every routed expert quantized, router / embeddings / lm_head in bf16.
Each row quantizes, exports (dequantized bf16 weights, which equal what the pack-quantized checkpoint
decompresses to), reloads with transformers and evaluates.

Configurations are composed: ``<method>[+feature...]-w<bits>[-g<N>][-sym]``, e.g. ``gptq-w4`` (plain GPTQ: min/max
scales, no act-order, the reference's algorithm), ``gptq+ao+mse-w3``, ``rtn+awq-w4-sym``, ``default-w4`` (the
library's default recipe), ``rtn-w2-g32`` (group size 32; ``g-1``: per-channel; default ``--group-size``),
``default+b3.0-w3`` (budgeted mixed precision at 3.0 bits per weight with the default candidates; the base scheme
gives the solver settings and the symmetry), or ``bf16``. Each row reports its bits per quantized weight (scales and
zero points included). Features (each switches one recipe setting on top of the plain method):

    ao      act-order                        mse     MSE scale search
    fbmean / fbrtn / fbid   fallback policy for experts below fallback.min_tokens (mean Hessian, RTN, identity)
    mt64    fallback.min_tokens = 64 (default 8): with few calibration samples, makes experts "rare"
    greedy  greedy rounding correction       agq     routing-weighted (affinity-guided) Hessians
    shrink  shrink rare experts' Hessians    awq     AWQ scales (+ clipping), then the method
    awq2    AWQ with the L2 salience sqrt(E[x^2]) instead of E|x|
    b<bits> budgeted mixed precision at <bits> bits per weight (scales included), default candidates
    bexp / bmodel   with a budget: routed experts allocated per expert / one scheme for all layers
    bnone   with a budget: the errors as measured (budget.sensitivity none; the default is matrix)
    bproj   with a budget: routed experts' gate+up and down allocated apart (budget.experts projection)
    bres    with a budget: each layer's errors relative to the residual stream's energy (budget.sensitivity)
    bfish   with a budget: each layer's errors times the loss's sensitivity to its output (sensitivity: layer)
    bmat    with a budget: each matrix's error times the loss's sensitivity to its output (sensitivity: matrix)
    b56     with a budget: the default candidates plus W5 g128 and W6 g128 (finer upgrades than W8 near 4 bits)
    bfine   with a budget: as b56 plus W4 g32 and W5 g64 (a finer ladder between W4 g128 and W6)
    b48     with a budget: only what vLLM's integer kernels serve (4 and 8 bits): W4 per-channel, g128, g64, g32 and
            W8 per-channel, g128
    rot     offline Hadamard rotation        ebss    calibrate on --ebss-jsonl (EBSS samples) instead of calib.txt
    mix     calibrate on half calib.txt windows + half --ebss-jsonl samples
    gptaq   asymmetric calibration (GPTAQ) of the routed and shared experts' down_proj and of o_proj (alpha 1);
            gptaq05 / gptaq025 / gptaq0: alpha 0.5 / 0.25 / 0 (0: solved on the new inputs, no correction);
            gptaqe: the routed experts' down_proj only (with another gptaq feature: that one's alpha)
    bf16h / fp32h   Hessian update precision on the GPU
    d03 / d10       GPTQ damping 0.03 / 0.1 (plain methods use 0.01; ``default`` uses the recipe default 0.1)      n2      MSE search norm 2.0 (default 2.4)

    python benchmarks/quality.py --model ../shared/models/qwen3moe-tiny --text-dir ../shared/data/evaltext \
        --configs gptq-w4,gptq+ao+mse-w3 [--device cuda] [--json out.json] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from moequant.methods.budget import DEFAULT_CANDIDATES

_PLAIN = dict(scale_search="minmax", act_order=False, damp=0.01)  # the reference's plain GPTQ / RTN
# feature -> (scheme fields, recipe fields); recipe values that are dicts are merged into that recipe section
FEATURES = {
    "ao": (dict(act_order=True), {}),
    "mse": (dict(scale_search="mse"), {}),
    "greedy": (dict(rounding_passes=1), {}),
    "agq": ({}, dict(routing_weighted=True)),
    "shrink": ({}, dict(fallback=dict(policy="shrink"))),
    "fbrtn": ({}, dict(fallback=dict(policy="rtn"))),
    "fbid": ({}, dict(fallback=dict(policy="identity"))),
    "fbmean": ({}, dict(fallback=dict(policy="mean"))),
    "mt64": ({}, dict(fallback=dict(min_tokens=64))),
    "awq": ({}, dict(awq=dict(enabled=True))),
    "awq2": ({}, dict(awq=dict(enabled=True, salience="l2"))),
    "bexp": ({}, dict(budget=dict(experts="expert"))),
    "bmodel": ({}, dict(budget=dict(experts="model"))),
    "bnone": ({}, dict(budget=dict(sensitivity="none"))),
    "bproj": ({}, dict(budget=dict(experts="projection"))),
    "bres": ({}, dict(budget=dict(sensitivity="residual"))),
    "bfish": ({}, dict(budget=dict(sensitivity="layer"))),
    "bmat": ({}, dict(budget=dict(sensitivity="matrix"))),
    "b56": ({}, dict(budget=dict(candidates=[*map(dict, DEFAULT_CANDIDATES), {"bits": 5, "group_size": 128},
                                             {"bits": 6, "group_size": 128}]))),
    "bfine": ({}, dict(budget=dict(candidates=[*map(dict, DEFAULT_CANDIDATES), {"bits": 5, "group_size": 128},
                                               {"bits": 6, "group_size": 128}, {"bits": 4, "group_size": 32},
                                               {"bits": 5, "group_size": 64}]))),
    "b48": ({}, dict(budget=dict(candidates=[{"bits": 4, "group_size": -1}, {"bits": 4, "group_size": 128},
                                             {"bits": 4, "group_size": 64}, {"bits": 4, "group_size": 32},
                                             {"bits": 8, "group_size": -1}, {"bits": 8, "group_size": 128}]))),
    "rot": ({}, dict(rotation=dict(enabled=True))),
    "ebss": ({}, {}),
    "mix": ({}, {}),
    "d03": (dict(damp=0.03), {}),
    "d10": (dict(damp=0.1), {}),
    "n2": (dict(mse_norm=2.0), {}),
    "gptaq": ({}, dict(gptaq=dict(enabled=True, alpha=1.0))),
    "gptaq05": ({}, dict(gptaq=dict(enabled=True, alpha=0.5))),
    "gptaq025": ({}, dict(gptaq=dict(enabled=True, alpha=0.25))),
    "gptaq0": ({}, dict(gptaq=dict(enabled=True, alpha=0.0))),
    "gptaqe": ({}, dict(gptaq=dict(enabled=True, modules=["routed"]))),
    "bf16h": ({}, dict(hessian_precision="bf16")),
    "fp32h": ({}, dict(hessian_precision="fp32")),
}
METHODS = ("rtn", "gptq", "default")
BUDGET = re.compile(r"^b\d+(\.\d+)?$")  # b3.0: budgeted mixed precision at 3.0 bits per weight


# Every scheme preset of moequant.formats.schemes.PRESETS, by its lower-case name. Weight-only presets are evaluated
# like the int rows (dequantized export, plain transformers); presets that quantize activations (W8A8, FP8,
# FP8_BLOCK, NVFP4, MXFP4) are exported as the compressed-tensors checkpoint and evaluated as deployed:
# moequant.eval.load_model with the runtime's activation quantization simulated (moequant eval's default).
PRESETS = {"w4a16": "W4A16", "w8a16": "W8A16", "w8a8": "W8A8", "fp8": "FP8", "fp8_block": "FP8_BLOCK",
           "nvfp4": "NVFP4", "nvfp4a16": "NVFP4A16", "mxfp4": "MXFP4", "mxfp4a16": "MXFP4A16",
           "mxfp6a16": "MXFP6A16", "mxfp6a8": "MXFP6A8", "mxfp8a16": "MXFP8A16", "mxfp8": "MXFP8"}
ACTIVATION_PRESETS = {"W8A8", "FP8", "FP8_BLOCK", "NVFP4", "MXFP4", "MXFP6A8", "MXFP8"}


def parse_config(name: str) -> tuple[dict, dict, set]:
    """``<method>[+feature...]-w<bits>[-g<N>][-sym]`` or ``<method>[+feature...]-<preset>`` (a key of
    :data:`PRESETS`: nvfp4a16, fp8, fp8_block, ...) -> (scheme fields, recipe fields, features)."""
    parts = name.split("-")
    bad = ValueError(f"config {name!r}: expected <method>[+feature...]-w<bits>[-g<N>][-sym], e.g. gptq+ao-w4, "
                     f"rtn-w3-g-1 (g-1: per-channel) or default+b3.0-w3, or <method>[+feature...]-<preset> with a "
                     f"preset of {sorted(PRESETS)}")
    if len(parts) == 2 and parts[1].lower() in PRESETS:
        method, *features = parts[0].split("+")
        if method not in METHODS:
            raise ValueError(f"config {name!r}: method must be one of {METHODS}, got {method!r}")
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise ValueError(f"config {name!r}: unknown feature(s) {unknown}; a preset row takes {sorted(FEATURES)}")
        scheme = dict(preset=PRESETS[parts[1].lower()])
        if method != "default":
            scheme.update(method=method, act_order=False, damp=0.01)
        recipe: dict = {}
        for f in features:
            sc, r = FEATURES[f]
            scheme.update(sc)
            for k, v in r.items():
                recipe[k] = {**recipe.get(k, {}), **v} if isinstance(v, dict) else v
        return scheme, recipe, set(features)
    if len(parts) < 2 or not parts[1].startswith("w") or not parts[1][1:].isdigit():
        raise bad
    rest, group = parts[2:], None
    if rest and rest[0] == "g" and len(rest) > 1 and rest[1] == "1":  # g-1 (per-channel) splits on its dash
        group, rest = -1, rest[2:]
    elif rest and rest[0].startswith("g") and rest[0][1:].isdigit():
        group, rest = int(rest[0][1:]), rest[1:]
    if rest not in ([], ["sym"]):
        raise bad
    method, *features = parts[0].split("+")
    if method not in METHODS:
        raise ValueError(f"config {name!r}: method must be one of {METHODS}, got {method!r}")
    budget = [f for f in features if BUDGET.match(f)]
    unknown = [f for f in features if f not in FEATURES and f not in budget]
    if unknown:
        raise ValueError(f"config {name!r}: unknown feature(s) {unknown}; known: {sorted(FEATURES)} and "
                         "b<bits> (a budget)")
    scheme = dict(bits=int(parts[1][1:]), symmetric=rest == ["sym"])
    if group is not None:
        scheme["group_size"] = group
    if method != "default":
        scheme.update(method=method, **_PLAIN)
    recipe: dict = {}
    for f in features:
        s, r = FEATURES[f] if f in FEATURES else ({}, dict(budget=dict(bits=float(f[1:]))))
        scheme.update(s)
        for k, v in r.items():
            recipe[k] = {**recipe.get(k, {}), **v} if isinstance(v, dict) else v
    return scheme, recipe, set(features)


def average_bits(model_dir: str, scheme, storage_bits: int = 16) -> float:
    """Bits per quantized weight of a uniform scheme (a dict of int fields, or a QuantScheme of any format) on the
    protocol's matrices (every 2-D weight of the decoder layers but the routers), scales, zero points and global
    scales included (the format's ``storage_bits``)."""
    from safetensors import safe_open

    from moequant.formats import IntFormat

    fmt = IntFormat(scheme["bits"], scheme.get("group_size", 128), scheme.get("symmetric", True)) \
        if isinstance(scheme, dict) else scheme.format
    bits = params = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                if ".layers." in k and k.endswith(".weight") and len(shape) == 2 and not k.endswith("mlp.gate.weight"):
                    bits += fmt.storage_bits(shape[0], shape[1], storage_bits)
                    params += shape[0] * shape[1]
    return bits / params


def evaluate(model_dir: str, held: torch.Tensor, wt2: torch.Tensor, device: str, seq_len: int,
             simulate: bool = False) -> dict:
    """Perplexities of a checkpoint: reloaded with plain transformers, or with ``simulate`` (a compressed-tensors
    checkpoint of a scheme that quantizes activations) through moequant.eval.load_model, which also quantizes what
    the runtime quantizes besides the weights."""
    import transformers

    from moequant.eval import perplexity

    # bf16 matmuls are slow on most CPUs: evaluate in float32 there (the weights are bf16 values either way)
    on_gpu = str(device).startswith("cuda")
    if simulate:
        from moequant.eval.loader import load_model

        model = load_model(model_dir, device, simulate=True)
    else:
        extra = {} if on_gpu else {"experts_implementation": "eager"}  # fastest on CPUs
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **extra)
        model = (model if on_gpu else torch.nn.Module.float(model)).to(device).eval()
    out = {"heldout": perplexity(model, held, seq_len=seq_len, device=device, progress=False),
           "wt2": perplexity(model, wt2, seq_len=seq_len, device=device, progress=False)}
    del model
    return out


def build_recipe(name: str, args, td: Path, tmp: Path):
    """The :class:`Recipe` of one config name (see the module docstring)."""
    from moequant.recipe import Recipe

    scheme, extra, features = parse_config(name)
    if "preset" not in scheme:
        scheme.setdefault("group_size", args.group_size)
    cal = dict(text_files=[str(td / "calib.txt")], num_samples=args.num_samples, seq_len=args.seq_len)
    if features & {"ebss", "mix"}:
        if not args.ebss_jsonl:
            raise ValueError(f"config {name!r}: EBSS rows need --ebss-jsonl FILE (moequant ebss MODEL --out FILE)")
        if "ebss" in features:
            cal.update(text_files=[], jsonl_files=[args.ebss_jsonl])
        else:  # half EBSS samples (the first ones), the rest random calib.txt windows
            lines = Path(args.ebss_jsonl).read_text().splitlines()[: args.num_samples // 2]
            half = tmp / "ebss_half.jsonl"
            half.write_text("\n".join(lines) + "\n")
            cal["jsonl_files"] = [str(half)]
    base = Recipe().to_dict()
    if "preset" in scheme:  # the preset fixes the element format, group and scale search
        for k in ("bits", "group_size", "symmetric", "scale_search"):
            base["scheme"].pop(k, None)
    base["scheme"].update(scheme)
    base["calibration"].update(cal)
    base["device"] = args.device
    for k, v in extra.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return Recipe.from_dict(base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/models/qwen3moe-tiny")
    ap.add_argument("--text-dir", default="../shared/data/evaltext")
    ap.add_argument("--configs", default="gptq-w4,gptq-w3", help="comma list of config names (module docstring)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--ebss-jsonl", help="EBSS calibration samples for the +ebss / +mix rows")
    ap.add_argument("--json", help="write the results here (merged into an existing file of the same model)")
    ap.add_argument("--keep-going", action="store_true", help="report a failing row and continue")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from moequant import pipeline
    from moequant.eval import load_token_ids

    td = Path(args.text_dir)
    for f in ("calib.txt", "heldout.txt", "wt2_test.txt"):
        if not (td / f).is_file():
            print(f"quality: {td / f} not found (pass --text-dir)", file=sys.stderr)
            return 2
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name in names:  # fail fast on a typo, before any work
        if name != "bf16":
            parse_config(name)
    held = load_token_ids(args.model, td / "heldout.txt")
    wt2 = load_token_ids(args.model, td / "wt2_test.txt")
    rows, failed = {}, 0
    for name in names:
        t = time.time()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if name == "bf16":
                    res, qsec = evaluate(args.model, held, wt2, args.device, args.seq_len), 0.0
                else:
                    recipe = build_recipe(name, args, td, Path(tmp))
                    out = Path(tmp) / "q"
                    sim = recipe.scheme.activations is not None  # evaluated as deployed (module docstring)
                    report = pipeline.quantize(args.model, recipe, output_dir=out,
                                               export_format="pack-quantized" if sim else "dequantized",
                                               progress=False)
                    qsec = report.seconds
                    res = evaluate(str(out), held, wt2, args.device, args.seq_len, simulate=sim)
                    res["simulated"] = sim
                    res["fallbacks"] = len(report.fallbacks)
                    if report.budget:
                        b = report.budget
                        res["bits"] = b["achieved_bits"]
                        res["budget"] = {"measure_seconds": b["measure_seconds"], "error": b["error"],
                                         "lower_bound": b["lower_bound"], "propagation": b["propagation"],
                                         "candidates": b["candidates"], "residual": b.get("residual_energy"),
                                         "sensitivity": b.get("sensitivity"),
                                         "units": [[u["key"], u["scheme"], u["bits"], u["errors"]]
                                                   for u in b["units"]]}
                    else:
                        res["bits"] = average_bits(args.model, recipe.scheme)
        except Exception as exc:  # noqa: BLE001 -- reported per row with --keep-going
            if not args.keep_going:
                raise
            failed += 1
            print(f"{name:24s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        res = {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}
        res.update(quantize_seconds=round(qsec, 1), total_seconds=round(time.time() - t, 1))
        rows[name] = res
        bits = f"  {res['bits']:.4f} bits" if "bits" in res else ""
        print(f"{name:24s} heldout {res['heldout']:.3f}  wt2 {res['wt2']:.2f}  quantize {qsec:.1f} s{bits} "
              f"(device {args.device})", flush=True)
        if args.json:  # after every row: a run stopped part way keeps the rows it finished
            write_json(Path(args.json), args, {name: res})
    return 1 if failed else 0


def write_json(p: Path, args, rows: dict) -> None:
    """Merges ``rows`` into the JSON file ``p`` (the rows of another model's file are dropped), atomically."""
    from moequant.io.files import atomic_write_json

    old = json.loads(p.read_text()) if p.is_file() else {}
    merged = old.get("rows", {}) if old.get("model") == args.model else {}
    merged.update(rows)
    name = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu"
    atomic_write_json(p, {"device": args.device, "device_name": name, "model": args.model, "rows": merged,
                          "torch": torch.__version__, "num_samples": args.num_samples, "seq_len": args.seq_len,
                          "group_size": args.group_size})


if __name__ == "__main__":
    sys.exit(main())
