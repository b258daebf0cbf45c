"""``moequant eval`` simulates what the runtime quantizes besides the weights (issue 14, "evaluation that tells the
truth"): the fake quantization of Linear inputs and of the FP8 KV cache (:mod:`moequant.ops.act_quant`) against
its plain twin (:mod:`moequant.ref.act_quant`), bit for bit; the simulated model against a brute-force model that
fake-quantizes every dense Linear's and every routed expert's input token by token with the twin; the
``--no-simulate-activations`` flag; the errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from family_checkpoints import CALIB_TEXT, HELDOUT_TEXT, family_checkpoint

import moequant
from moequant import cli
from moequant.eval import Simulation, SimulationPlan, load_model, simulation_of
from moequant.formats import ACTIVATION_KINDS, ActivationFormat, nvfp4_global_scale
from moequant.models import detect_family
from moequant.models.base import split_expert
from moequant.ops import fake_quantize_activations, fake_quantize_fp8
from moequant.recipe import Recipe
from moequant.ref import fake_quantize_activations_ref, fake_quantize_fp8_ref

CALIBRATION = {"num_samples": 4, "seq_len": 64, "batch_size": 4}
IDS = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ the math
def _awkward(gen: torch.Generator) -> torch.Tensor:
    """Rows of mixed scales, a zero row, a zero group, an outlier, exact ties of the FP4 grid."""
    x = torch.randn(6, 256, generator=gen) * torch.logspace(-3, 2, 6).reshape(6, 1)
    x[1] = 0
    x[2, :32] = 0
    x[3, 7] = 3e4
    x[4, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0])  # ties once scaled by 1 (amax 6)
    x[4, 8:16] = 6.0
    return x


@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_activation_fake_quant_matches_its_twin(kind, gen):
    x = _awkward(gen)
    g = nvfp4_global_scale(x.abs().max()) if kind == "nvfp4" else None
    fmt = ActivationFormat(kind)
    for t in (x, x.bfloat16(), x.reshape(2, 3, 256), x[:0], x[:, :192]):  # 3-D, empty, 192 columns
        if kind in ("nvfp4", "mxfp4", "mxfp8") and t.shape[-1] % (16 if kind == "nvfp4" else 32):
            continue
        out = fake_quantize_activations(t, fmt, g)
        assert out.dtype == t.dtype and out.shape == t.shape
        assert torch.equal(out, fake_quantize_activations_ref(t, kind, g)), (kind, t.dtype, tuple(t.shape))
    out = fake_quantize_activations(x, fmt, g)
    assert torch.isfinite(out).all() and not torch.equal(out, x)
    assert torch.equal(out[1], torch.zeros(256))


def test_fp8_group_has_partial_edge_groups(gen):
    x = torch.randn(3, 200, generator=gen)
    x[:, 150] = 100.0  # in the partial second group only: the first group's scale does not see it
    out = fake_quantize_activations(x, ActivationFormat("fp8_group"))
    assert torch.equal(out, fake_quantize_activations_ref(x, "fp8_group"))
    assert torch.equal(out[:, :128], fake_quantize_activations(x[:, :128], ActivationFormat("fp8_token")))


def test_int8_is_vllms_per_token_rounding():
    x = torch.tensor([[127.0, 63.5, -0.5, 1.5, -128.0]])  # amax 128: x * 127/128, ties to even
    out = fake_quantize_activations(x, ActivationFormat("int8_token"))
    q = torch.round(x * (127 / 128))
    assert torch.equal(out, q * (128 / 127))


def test_kv_fp8_matches_its_twin_and_saturates(gen):
    x = torch.randn(2, 2, 5, 32, generator=gen) * 3
    for s in (0.01, 0.5, torch.tensor([0.0078125], dtype=torch.bfloat16)):
        assert torch.equal(fake_quantize_fp8(x, s), fake_quantize_fp8_ref(x, s))
        assert torch.equal(fake_quantize_fp8(x.bfloat16(), s), fake_quantize_fp8_ref(x.bfloat16(), s))
    out = fake_quantize_fp8(torch.tensor([1000.0, -1000.0, 0.0]), 1.0)
    assert out.tolist() == [448.0, -448.0, 0.0]


def test_fake_quant_errors():
    x = torch.ones(2, 32)
    with pytest.raises(ValueError, match="global_scale: A4 NVFP4 needs input_global_scale"):
        fake_quantize_activations(x, ActivationFormat("nvfp4"))
    with pytest.raises(ValueError, match="global_scale: A8 FP8 per-token takes no input_global_scale"):
        fake_quantize_activations(x, ActivationFormat("fp8_token"), torch.ones(1))
    with pytest.raises(ValueError, match="fmt: expected an ActivationFormat"):
        fake_quantize_activations(x, "fp8_token")
    with pytest.raises(ValueError, match="x: expected a floating-point tensor"):
        fake_quantize_activations(torch.ones(2, 32, dtype=torch.int32), ActivationFormat("fp8_token"))
    for bad in (0.0, -1.0, float("nan"), torch.ones(2)):
        with pytest.raises(ValueError, match="scale: expected one finite value > 0"):
            fake_quantize_fp8(x, bad)


# ------------------------------------------------------------------------------------------------ on a model
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """scheme -> an exported qwen3_moe tiny checkpoint (RTN, built lazily)."""
    root = tmp_path_factory.mktemp("simulation")
    src = family_checkpoint("qwen3_moe", root / "models")
    cache = {}

    def get(scheme: str, **extra) -> Path:
        key = (scheme, json.dumps(extra, sort_keys=True))
        if key not in cache:
            out = root / f"{scheme}-{len(cache)}"
            recipe = Recipe.from_dict({"scheme": {"preset": scheme, "method": "rtn"}, "calibration": CALIBRATION,
                                       **extra})
            moequant.quantize(str(src), recipe, calibration=str(CALIB_TEXT), output_dir=out, progress=False)
            cache[key] = out
        return cache[key]

    get.src = src
    return get


class _BruteForce:
    """The reference: every dense Linear's input and every routed expert's inputs fake-quantized by the twin, one
    token (and one expert) at a time, on the unsimulated model."""

    def __init__(self, model, family, plan):
        self.handles, self.patched = [], []
        for name, mod in model.named_modules():
            spec = plan.inputs.get(family.disk_name(name))
            if isinstance(mod, nn.Linear) and spec is not None:
                fmt, g = spec
                self.handles.append(mod.register_forward_pre_hook(
                    lambda m, a, fmt=fmt, g=g: (fake_quantize_activations_ref(a[0], fmt.kind, g),)))
        for _, prefix, layer in family.iter_layers(model):
            ex = family.experts_of(layer)
            if ex is not None:
                ex.forward = self._experts(ex, family, prefix, plan)
                self.patched.append(ex)

    @staticmethod
    def _experts(ex, family, prefix, plan):
        def fq(name, v):
            fmt, g = plan.inputs[name]
            return fake_quantize_activations_ref(v.reshape(1, -1), fmt.kind, g).reshape(-1)

        def forward(hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states, dtype=torch.float32)
            for t in range(hidden_states.shape[0]):
                for e, w in zip(top_k_index[t].tolist(), top_k_weights[t].tolist()):
                    names, m = family.disk_expert_names(prefix, e), split_expert(ex, family, e)
                    gs = [plan.inputs[names[k]][1] for k in ("gate", "up")]
                    x = hidden_states[t].float()
                    if gs[0] is not None:  # NVFP4: gate and up read the input with the smaller global scale
                        fmt = plan.inputs[names["gate"]][0]
                        xq = fake_quantize_activations_ref(x.reshape(1, -1), fmt.kind, torch.minimum(*gs))[0]
                    else:
                        xq = fq(names["gate"], x)
                    h = family.glu(ex, (m.gate.float() @ xq).reshape(1, -1), (m.up.float() @ xq).reshape(1, -1))
                    out[t] += w * (m.down.float() @ fq(names["down"], h.reshape(-1)))
            return out.to(hidden_states.dtype)
        return forward

    def remove(self):
        for h in self.handles:
            h.remove()
        for ex in self.patched:
            del ex.forward


@pytest.mark.parametrize("scheme", ["FP8", "NVFP4", "W8A8", "FP8_BLOCK"])
def test_simulation_matches_a_brute_force_reference(checkpoints, scheme):
    """Every simulated module, on the inputs it receives in the simulated model, computes what the brute force
    computes (dense Linears bit for bit; experts up to float32 summation order); the whole model differs from the
    weights-only one and stays close to the brute-force model (a value on an FP8 rounding boundary may round the
    other way after a different summation order, and later tokens attend to it)."""
    d = checkpoints(scheme)
    model = load_model(d, loader="moequant")
    sim = simulation_of(model)
    assert sim is not None and sim.attached
    assert len(sim.experts) == 2 and len(sim.linears) == 15, sim.describe()
    fam = detect_family(model.config)
    seen, handles = {}, []
    for name, (mod, *_) in [*sim.linears.items(), *sim.experts.items()]:
        def pre(m, args, kwargs, name=name):
            seen[name] = [tuple(a.clone() for a in (*args, *kwargs.values()))]
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        handles.append(mod.register_forward_hook(lambda m, a, out, name=name: seen[name].append(out.clone())))
    with torch.no_grad():
        simulated = model(IDS).logits
        for h in handles:
            h.remove()
        sim.remove()
        weights_only = model(IDS).logits
        ref = _BruteForce(model, fam, sim.plan)
        for name, (inputs, out) in seen.items():
            mod = sim.linears[name][0] if name in sim.linears else sim.experts[name][0]
            want = mod(*inputs)
            if name in sim.linears:
                assert torch.equal(out, want), name
            else:
                # an FP8 / FP4 rounding of h (whose float32 sums run in another order) may flip: then one token's
                # row differs by one element's step times a column of down
                bad = ((out - want).abs() > 1e-5 * want.abs().max()).any(dim=-1)
                assert bad.float().mean() <= 0.1 and (out - want).abs().max() < 0.05 * want.abs().max(), name
        brute = model(IDS).logits
        ref.remove()
        again = model(IDS).logits
    assert len(seen) == len(sim.linears) + len(sim.experts)
    assert torch.equal(again, weights_only)  # the brute force and the simulation leave the model as it was
    effect = (simulated - weights_only).abs().max()
    assert effect > 1e-2
    torch.testing.assert_close(simulated[:, 0], brute[:, 0], rtol=1e-5, atol=1e-5)  # nothing to attend to yet
    assert (simulated - brute).abs().max() < 0.1 * effect, ((simulated - brute).abs().max(), effect)


def test_weight_only_checkpoints_simulate_nothing(checkpoints):
    model = load_model(checkpoints("NVFP4A16"), loader="moequant")
    assert simulation_of(model) is None
    model = load_model(checkpoints.src)
    assert simulation_of(model) is None


def test_transformers_loader_simulates_the_same(checkpoints):
    d = checkpoints("FP8")
    a = load_model(d, loader="moequant")
    b = load_model(d, loader="transformers")
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)  # the same weights and the same simulation
        simulation_of(b).remove()
        simulation_of(a).remove()
        assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_simulation_errors(checkpoints, tmp_path):
    d = checkpoints("FP8")
    model = load_model(d, loader="moequant", simulate=False)
    plan = SimulationPlan.from_checkpoint(d)
    bad = SimulationPlan({**plan.inputs, "model.layers.9.self_attn.q_proj": next(iter(plan.inputs.values()))})
    with pytest.raises(ValueError, match="the model has no module 'model.layers.9.self_attn.q_proj'"):
        Simulation(model, detect_family(model.config), bad)
    # an NVFP4 W4A4 checkpoint without its input_global_scale
    import shutil

    from safetensors.torch import load_file, save_file
    nv = tmp_path / "nvfp4"
    shutil.copytree(checkpoints("NVFP4"), nv)
    files = sorted(nv.glob("*.safetensors"))
    tensors = load_file(files[0])
    name = next(n for n in tensors if n.endswith(".input_global_scale"))
    del tensors[name]
    save_file(tensors, files[0], metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"has no {name.replace('.', '[.]')}"):
        SimulationPlan.from_checkpoint(nv)


def test_cli_says_what_it_simulated_and_the_flag_turns_it_off(checkpoints, capsys, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text(HELDOUT_TEXT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    args = ["-q", "eval", str(checkpoints("FP8")), "--text", str(text), "--seq-len", "64", "--batch-size", "16"]
    outs = []
    for extra in ([], ["--no-simulate-activations"]):
        assert cli.main(args + extra) == 0
        outs.append(capsys.readouterr().out.strip().splitlines()[-2:])
    (said_on, ppl_on), (said_off, ppl_off) = outs
    assert said_on.startswith("simulated: activations A8 FP8 per-token (")
    assert said_off.startswith("simulated: nothing (--no-simulate-activations: weights only; the runtime also")
    assert ppl_on.startswith("ppl=") and ppl_off.startswith("ppl=") and ppl_on != ppl_off
    assert cli.main(["-q", "eval", str(checkpoints("NVFP4A16")), "--text", str(text), "--seq-len", "64"]) == 0
    said, ppl = capsys.readouterr().out.strip().splitlines()[-2:]
    assert said == "simulated: nothing (the checkpoint quantizes weights only)" and ppl.startswith("ppl=")


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "qwen3_next",
                                    "phimoe", "granitemoe"])
def test_every_family_simulates_every_quantized_module(family, tmp_path):
    """The runtime names of each family's Linears and experts map to the checkpoint's modules (Mixtral / PhiMoE
    renames, GPT-OSS / GraniteMoE experts written per expert from fused sources, shared experts, MLA projections):
    the simulation finds every one of them, and changes the logits."""
    src = family_checkpoint(family, tmp_path / "models")
    out = tmp_path / "fp8"
    recipe = Recipe.from_dict({"scheme": {"preset": "FP8", "method": "rtn"}, "calibration": CALIBRATION})
    moequant.quantize(str(src), recipe, calibration=str(CALIB_TEXT), output_dir=out, progress=False)
    model = load_model(out, loader="moequant")
    sim = simulation_of(model)
    fam = detect_family(model.config)
    moe_layers = sum(fam.experts_of(layer) is not None for layer in fam.layers(model))
    assert len(sim.experts) == moe_layers > 0 and sim.linears, sim.describe()
    assert len(sim.linears) + 3 * sum(e.gate_up_proj.shape[0] for e, *_ in sim.experts.values()) == \
        len(sim.plan.inputs)
    with torch.no_grad():
        on = model(IDS).logits
        sim.remove()
        off = model(IDS).logits
    assert torch.isfinite(on).all() and not torch.equal(on, off)


def test_experts_forward_with_idle_experts_and_per_expert_scales(checkpoints):
    """Unsimulated, experts_forward is the module's own output, bit for bit, also with experts that get no token;
    with NVFP4's per-expert input scales each expert's rows are quantized with its own scale."""
    from moequant.calibration.routing import experts_forward

    model = load_model(checkpoints("NVFP4"), loader="moequant", simulate=False)
    fam = detect_family(model.config)
    ex = fam.experts_of(fam.layers(model)[0])
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, 128, generator=gen)
    idx = torch.tensor([[0, 2]] * 5 + [[2, 0]] * 4)  # experts 1 and 3 idle
    w = torch.rand(9, 2, generator=gen)
    with torch.no_grad():
        assert torch.equal(experts_forward(ex, fam, x, idx, w), ex(x, idx, w))
        seen = []

        def fn(ids, rows):
            seen.append(ids.tolist())
            return rows * (1 + ids.float()[:, None])  # a different transform per expert

        y = experts_forward(ex, fam, x, idx, w, gate_up_input=fn)
        assert seen == [[0] * 9 + [2] * 9]
        # expert 0 sees x, expert 2 sees 3 x: the sum of the two experts' outputs on those inputs
        zero = torch.zeros_like(w)
        want = ex(x, idx, torch.stack([torch.where(idx[:, k] == 0, w[:, k], zero[:, k]) for k in range(2)], 1)) + \
            ex(3 * x, idx, torch.stack([torch.where(idx[:, k] == 2, w[:, k], zero[:, k]) for k in range(2)], 1))
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
