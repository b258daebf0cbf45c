"""Golden checkpoints: quantize a fixed set of models and recipes and record every output bit by bit.

A refactoring that promises "behaviour unchanged, checkpoints bit-identical" runs this before (``--manifest``)
and after (``--compare``): the manifest holds, per case, the sha256 of every tensor (with its dtype, shape and
shard), ``config.json`` (with ``quantization_config``), the saved recipe, the report minus its timing and path
fields, and the sha256 of every other file. ``--compare`` lists every difference and exits 1 if there is one.

Cases (CPU, 8 calibration windows of 64 tokens of examples/data/wikitext2_calib.txt, a few minutes in all):
tiny random checkpoints of every family (tests/python/family_checkpoints.py) with the default recipe, and the
trained examples/tiny_moe/model with the default recipe, RTN, asymmetric W3 per-channel, routing-weighted
Hessians + shrink fallback + calibrate_all_experts, AWQ, rotation, greedy rounding, an attention W8 override,
layer 0 skipped, a dequantized export, and a run interrupted after layer 0 and resumed.

    python scripts/golden_checkpoints.py --work /tmp/golden --manifest golden.json
    python scripts/golden_checkpoints.py --work /tmp/golden2 --compare golden.json [--only tiny_awq ...]

The models are read through the ``moequant`` on ``sys.path`` (``PYTHONPATH``), so an untouched copy of another
revision's ``python/`` gives that revision's manifest.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))  # family_checkpoints

TINY = REPO / "examples" / "tiny_moe" / "model"
CALIB = REPO / "examples" / "data" / "wikitext2_calib.txt"
CALIBRATION = {"num_samples": 8, "seq_len": 64}
REPORT_DROP = ("seconds", "model", "output_dir")  # timing and paths: differ between any two runs


def _recipe(**changes) -> dict:
    """A recipe dict: the defaults with ``changes`` (sections merged key by key) and the golden calibration size."""
    data: dict = {"calibration": dict(CALIBRATION)}
    for key, value in changes.items():
        if isinstance(value, dict) and key in data:
            data[key].update(value)
        else:
            data[key] = value
    return data


TINY_CASES = {
    "tiny_default": (_recipe(), {}),
    "tiny_rtn": (_recipe(scheme={"method": "rtn"}), {}),
    "tiny_w3_asym_channel": (_recipe(scheme={"bits": 3, "group_size": -1, "symmetric": False}), {}),
    "tiny_routing_shrink_all": (_recipe(routing_weighted=True, fallback={"policy": "shrink",
                                                                        "calibrate_all_experts": True}), {}),
    "tiny_awq": (_recipe(awq={"enabled": True, "max_tokens": 256, "clip_tokens": 64}), {}),
    "tiny_rotation": (_recipe(rotation={"enabled": True, "seed": 3}), {}),
    "tiny_rounding": (_recipe(scheme={"rounding_passes": 1}), {}),
    "tiny_attention_w8": (_recipe(overrides=[{"pattern": "model.layers.*.self_attn.*", "scheme": {"bits": 8}}]), {}),
    "tiny_skip_layer0": (_recipe(overrides=[{"pattern": "model.layers.0.*", "skip": True}]), {}),
    "tiny_dequantized": (_recipe(), {"export_format": "dequantized"}),
    "tiny_resumed": (_recipe(scheme={"bits": 3}), {"resume_after_layer_0": True}),
}
FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "deepseek_v2", "gpt_oss", "qwen3_next",
            "phimoe", "granitemoe")


class _Interrupt(RuntimeError):
    pass


def _crash_after_layer_0_kwargs(quantize) -> dict:
    """Keyword arguments of ``quantize`` that interrupt a run after layer 0 is committed, for the revision at hand
    (``_after_layer`` callback before the house plan, a ``observers`` entry after it)."""
    def crash(index, *rest):
        if index == 0:
            raise _Interrupt("interrupted after layer 0")

    params = inspect.signature(quantize).parameters
    if "_after_layer" in params:
        return {"_after_layer": crash}
    if "observers" in params:
        class Crash:
            def layer_inputs(self, *a, **k):
                pass

            def layer_done(self, index, *rest):
                crash(index)

        return {"observers": [Crash()]}
    raise SystemExit("golden: this moequant has no way to interrupt a run after a layer")


def _tensor_digest(t: torch.Tensor) -> str:
    raw = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return f"{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|{hashlib.sha256(raw.numpy().tobytes()).hexdigest()}"


def checkpoint_manifest(d: Path) -> dict:
    """What a checkpoint directory holds, bit for bit (timing and path fields of the report dropped)."""
    from safetensors import safe_open

    tensors, files = {}, {}
    for f in sorted(d.iterdir()):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    tensors[k] = f"{f.name}|{_tensor_digest(h.get_tensor(k))}"
        elif f.name not in ("config.json", "moequant_report.json", "moequant_recipe.json"):
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    report = json.loads((d / "moequant_report.json").read_text())
    for k in REPORT_DROP:
        report.pop(k, None)
    for layer in report.get("layers", []):
        layer.pop("seconds", None)
        layer.pop("phases", None)  # seconds per step
    return {"tensors": tensors, "config": json.loads((d / "config.json").read_text()),
            "recipe": json.loads((d / "moequant_recipe.json").read_text()), "report": report, "files": files}


def run_case(name: str, model: Path, recipe: dict, opts: dict, out_root: Path) -> dict:
    import moequant
    from moequant import pipeline

    out = out_root / name
    for p in (out, out.with_name(out.name + ".partial")):
        shutil.rmtree(p, ignore_errors=True)
    kw = {"progress": False, "export_format": opts.get("export_format", "pack-quantized")}
    t = time.time()
    if opts.get("resume_after_layer_0"):
        try:
            pipeline.quantize(str(model), recipe, str(CALIB), output_dir=str(out),
                              **kw, **_crash_after_layer_0_kwargs(pipeline.quantize))
            raise SystemExit(f"golden: {name}: the run was not interrupted")
        except _Interrupt:
            pass
        report = moequant.quantize(str(model), recipe, str(CALIB), str(out), resume=True, **kw)
        if report.resumed_from_layer != 1:
            raise SystemExit(f"golden: {name}: resumed from {report.resumed_from_layer}, expected 1")
    else:
        moequant.quantize(str(model), recipe, str(CALIB), str(out), **kw)
    print(f"  {name}: {time.time() - t:.1f} s", flush=True)
    return checkpoint_manifest(out)


def build(work: Path, only: list[str]) -> dict:
    from family_checkpoints import family_checkpoint

    cases = [(n, TINY, r, o) for n, (r, o) in TINY_CASES.items()]
    cases += [(f"family_{f}", None, _recipe(), {}) for f in FAMILIES]
    manifest = {}
    for name, model, recipe, opts in cases:
        if only and name not in only:
            continue
        if model is None:
            model = family_checkpoint(name.removeprefix("family_"), work / "families")
        manifest[name] = run_case(name, model, recipe, opts, work / "out")
    return manifest


def _diff(a, b, where: str, out: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{where}.{k}: new")
            elif k not in b:
                out.append(f"{where}.{k}: missing")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out)
    elif a != b:
        out.append(f"{where}: {str(a)[:120]} != {str(b)[:120]}")


def compare(golden: dict, now: dict) -> list[str]:
    diffs: list[str] = []
    for case in sorted(set(golden) | set(now)):
        if case not in now:
            continue  # --only
        if case not in golden:
            diffs.append(f"{case}: not in the golden manifest")
            continue
        _diff(golden[case], now[case], case, diffs)
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path, help="scratch directory (models and checkpoints)")
    ap.add_argument("--manifest", type=Path, help="write the manifest here")
    ap.add_argument("--compare", type=Path, help="compare with this golden manifest (exit 1 on a difference)")
    ap.add_argument("--only", nargs="*", default=[], help="case names to run (default: all)")
    args = ap.parse_args()
    import moequant

    print(f"golden: moequant from {Path(moequant.__file__).parent}", flush=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t = time.time()
    manifest = build(args.work, args.only)
    print(f"golden: {len(manifest)} checkpoints in {time.time() - t:.0f} s", flush=True)
    if args.manifest:
        args.manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if args.compare:
        diffs = compare(json.loads(args.compare.read_text()), manifest)
        for d in diffs[:200]:
            print("DIFF", d)
        tensors = sum(len(c["tensors"]) for c in manifest.values())
        print(f"golden: {len(manifest)} checkpoints, {tensors} tensors compared: "
              f"{'bit-identical' if not diffs else f'{len(diffs)} difference(s)'}")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
