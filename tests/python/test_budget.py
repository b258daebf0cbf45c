"""Budgeted mixed precision: the allocator against enumeration, the units, the exact bit accounting, the recipe
section and the CLI flag, the two-pass run on a tiny random MoE (allocation applied, checkpoint loads, sizes exact,
resume), and the errors raised before any work."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from checkpoints import CrashAfterLayer0, checkpoint_tensors, crash_observer, transformers_logits
from testdata import tiny_qwen3_checkpoint

from moequant import cli, ops, pipeline
from moequant.formats import (FloatFormat, IntFormat, compressed_tensor_names, compression_format, nvfp4_global_scale,
                              scheme_storage_bits)
from moequant.io.exported import checkpoint_schemes, load_model
from moequant.methods.budget import (BudgetConfig, Matrix, allocate, build_units, candidate_label, greedy,
                                     lower_bound, min_cost, parse_budget)
from moequant.pipeline import budget as pbudget
from moequant.pipeline.report import LayerRecord, QuantizationReport, budget_grid
from moequant.recipe import CalibrationConfig, Override, QuantScheme, Recipe, match_pattern
from moequant.ref import allocate_ref

REPO = Path(__file__).resolve().parents[2]
CALIB = REPO / "examples" / "data" / "wikitext2_calib.txt"
IDS = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
CANDIDATES = [{"bits": 2, "group_size": 32}, {"bits": 3, "group_size": 32}, {"bits": 4, "group_size": 32},
              {"bits": 8, "group_size": -1}]


# ------------------------------------------------------------------------------------------------ allocator
def _instance(rng: random.Random, units: int, options: int, none_rate: float = 0.2, int_costs: bool = True):
    out = []
    for _ in range(units):
        row = []
        for _ in range(options):
            if rng.random() < none_rate:
                row.append(None)
            else:
                c = rng.choice([1, 2, 3, 5, 8]) if int_costs else rng.uniform(0.5, 8)
                row.append((c, rng.choice([0.0, rng.random(), rng.random() * 10])))
        if all(o is None for o in row):
            row[rng.randrange(options)] = (rng.choice([1, 4]), rng.random())
        out.append(row)
    return out


def test_allocate_equals_enumeration_on_small_instances():
    rng = random.Random(0)
    checked = infeasible = 0
    for trial in range(400):
        opts = _instance(rng, rng.randint(1, 6), rng.randint(1, 5), int_costs=trial % 2 == 0)
        lo = min_cost(opts)
        budget = rng.choice([lo, lo + rng.uniform(0, 12), lo - 0.5, rng.uniform(0, 40)])
        try:
            ref = allocate_ref(opts, budget)
        except ValueError:
            with pytest.raises(ValueError, match="below the cheapest choice"):
                allocate(opts, budget)
            assert lower_bound(opts, budget) == float("inf")
            infeasible += 1
            continue
        got = allocate(opts, budget)
        assert got.exact
        assert got.error == pytest.approx(ref[2], abs=1e-12), (opts, budget)
        assert got.cost <= budget
        assert got.cost == sum(opts[i][j][0] for i, j in enumerate(got.choice))
        assert got.error == pytest.approx(sum(opts[i][j][1] for i, j in enumerate(got.choice)), abs=1e-12)
        assert all(opts[i][j] is not None for i, j in enumerate(got.choice))
        assert got.bound <= got.error + 1e-12  # the LP relaxation never exceeds the optimum
        g = greedy(opts, budget)  # feasible, never better than the optimum
        assert sum(opts[i][j][0] for i, j in enumerate(g)) <= budget
        assert sum(opts[i][j][1] for i, j in enumerate(g)) >= ref[2] - 1e-12
        checked += 1
    assert checked > 250 and infeasible > 20


def test_allocate_breaks_ties_toward_the_cheaper_choice():
    opts = [[(1, 0.5), (3, 0.5)], [(2, 1.0), (4, 0.0)]]
    got = allocate(opts, 10)
    assert got.choice == (0, 1) and got.cost == 5 and got.error == 0.5


def test_lower_bound_is_the_lp_relaxation():
    # one unit, options (0, 10), (10, 0): at budget 4 the LP takes 40% of the step -> 6; the integer optimum is 10
    opts = [[(0, 10.0), (10, 0.0)]]
    assert lower_bound(opts, 4) == pytest.approx(6.0)
    assert allocate(opts, 4).error == 10.0 and allocate(opts, 10).error == 0.0
    # a non-convex middle option is skipped by the hull: (5, 9) lies above the chord from (0, 10) to (10, 0)
    assert lower_bound([[(0, 10.0), (5, 9.0), (10, 0.0)]], 5) == pytest.approx(5.0)


def test_thinned_front_stays_feasible_and_bounded():
    rng = random.Random(3)
    opts = _instance(rng, 9, 4, none_rate=0.0, int_costs=False)
    budget = min_cost(opts) + 12
    exact = allocate(opts, budget)
    thin = allocate(opts, budget, max_states=3)
    assert exact.exact and not thin.exact
    assert thin.cost <= budget and thin.error >= exact.error - 1e-12 and thin.bound <= exact.error + 1e-12
    g = greedy(opts, budget)  # a thinned front falls back to the greedy choice when that is better
    assert thin.error <= sum(opts[i][j][1] for i, j in enumerate(g)) + 1e-12
    assert allocate_ref(opts, budget)[2] == pytest.approx(exact.error, abs=1e-12)


def test_allocate_error_paths():
    with pytest.raises(ValueError, match=r"budget: 1 bits is below the cheapest choice, 2 bits"):
        allocate([[(2, 1.0), None]], 1)
    with pytest.raises(ValueError, match=r"options\[1\]: no candidate applies"):
        allocate([[(1, 1.0)], [None, None]], 5)
    with pytest.raises(ValueError, match=r"options\[0\]\[0\]: expected a finite"):
        allocate([[(1, float("nan"))]], 5)
    with pytest.raises(ValueError, match=r"options\[0\]\[0\]: expected a finite"):
        allocate([[(-1, 1.0)]], 5)
    with pytest.raises(ValueError, match="budget: expected a finite number"):
        allocate([[(1, 1.0)]], float("inf"))
    with pytest.raises(ValueError, match="max_states"):
        allocate([[(1, 1.0)]], 5, max_states=0)


# ------------------------------------------------------------------------------------------------ bits
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape,gs", [((33, 96), 32), ((33, 96), -1), ((7, 100), -1), ((64, 128), 128),
                                      ((5, 64), 16)])
@pytest.mark.parametrize("sym", [True, False])
def test_storage_bits_equals_the_packed_tensors(bits, shape, gs, sym, gen):
    w = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    qt = ops.quantize_rtn(w, bits, gs, sym, scale_dtype=torch.bfloat16)
    tensors = compressed_tensor_names("m", qt, torch.bfloat16)
    on_disk = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert IntFormat(bits, gs, sym).storage_bits(*shape, scale_bits=16) == on_disk


def test_storage_bits_rejects_a_group_that_does_not_divide():
    with pytest.raises(ValueError, match="group_size"):
        IntFormat(4, 32).storage_bits(8, 100)
    with pytest.raises(ValueError, match="in_features: NVFP4 g16 needs a multiple of 16"):
        FloatFormat("nvfp4").storage_bits(8, 40)


@pytest.mark.parametrize("name", ["W4A16", "W8A16", "W8A8", "FP8", "FP8_BLOCK", "NVFP4", "NVFP4A16", "MXFP4",
                                  "MXFP4A16"])
@pytest.mark.parametrize("shape", [(33, 96), (130, 260), (16, 128)])
def test_scheme_storage_bits_equals_the_written_tensors_of_every_preset(name, shape, gen):
    """A pinned module's fixed bits (any preset, floating-point ones included) are the bytes the export writes."""
    sc = QuantScheme(preset=name)
    if not sc.format.divides(shape[1]):
        pytest.skip(f"{name} does not fit {shape}")
    w = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    fmt = sc.format
    if isinstance(fmt, FloatFormat):
        qt = ops.quantize_float(w, fmt, scale_dtype=torch.bfloat16)
        if sc.activations is not None and sc.activations.static_global_scale:
            qt.input_global_scale = nvfp4_global_scale(3.0)
    else:
        qt = ops.quantize_rtn(w, fmt.bits, fmt.group_size if fmt.divides(shape[1]) else -1, fmt.symmetric,
                              scale_dtype=torch.bfloat16)
    if isinstance(fmt, FloatFormat):
        tensors = compressed_tensor_names("m", qt, torch.bfloat16, activations=sc.activations)
    else:  # W8A8: int-quantized (the RTN result states its per-channel group as the row's width)
        tensors = compressed_tensor_names("m", qt, torch.bfloat16, compression_format(fmt, sc.activations))
    on_disk = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert scheme_storage_bits(sc.format, sc.activations, *shape, 16) == on_disk


# ------------------------------------------------------------------------------------------------ units
def _names() -> list[Matrix]:
    """A Qwen2-MoE-like layer 0 with a dense MLP, a MoE layer 1 with a shared expert, a Mixtral-like layer 2 and a
    DeepSeek-MLA-like attention in layer 3."""
    out = []
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out += [Matrix(f"model.layers.{i}.self_attn.{p}", 8, 8, i) for i in (0, 1, 2)]
    out += [Matrix(f"model.layers.0.mlp.{p}", 8, 8, 0) for p in ("gate_proj", "up_proj", "down_proj")]
    out += [Matrix(f"model.layers.1.mlp.experts.{e}.{p}", 8, 8, 1) for e in range(3)
            for p in ("gate_proj", "up_proj", "down_proj")]
    out += [Matrix(f"model.layers.1.mlp.shared_expert.{p}", 8, 8, 1) for p in ("gate_proj", "up_proj", "down_proj")]
    out += [Matrix(f"model.layers.2.block_sparse_moe.experts.{e}.{p}", 8, 8, 2) for e in range(12)
            for p in ("w1", "w3", "w2")]
    out += [Matrix(f"model.layers.3.self_attn.{p}", 8, 8, 3)
            for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
    return out


@pytest.mark.parametrize("experts", ["layer", "model", "projection", "expert"])
def test_units_group_what_loaders_fuse_and_patterns_select_exactly_their_members(experts):
    mats = _names()
    units = build_units(mats, experts)
    names = [m.name for m in mats]
    seen = [n for u in units for n in u.members]
    assert sorted(seen) == sorted(names)  # every matrix in exactly one unit
    for u in units:
        hits = {n for n in names if any(match_pattern(p, n) for p in u.patterns)}
        assert hits == set(u.members), u.key
    keys = {u.key: u for u in units}
    assert keys["model.layers.0.self_attn.q_proj+k_proj+v_proj"].kind == "attention"
    assert keys["model.layers.0.mlp.gate_proj+up_proj"].kind == "dense"
    assert keys["model.layers.1.mlp.shared_expert.gate_proj+up_proj"].kind == "shared"
    assert keys["model.layers.3.self_attn.q_a_proj+kv_a_proj_with_mqa"].label == "self_attn.q_a_proj+kv_a_proj_with_mqa"
    assert "model.layers.3.self_attn.q_b_proj" in keys and "model.layers.0.self_attn.o_proj" in keys
    routed = [u for u in units if u.kind == "routed"]
    if experts == "layer":
        assert [len(u.members) for u in routed] == [9, 36]
        assert keys["model.layers.2.block_sparse_moe.experts"].patterns == ("model.layers.2.block_sparse_moe.experts.*",)
    elif experts == "model":
        assert len(routed) == 1 and routed[0].layers == (1, 2) and len(routed[0].members) == 45
    elif experts == "projection":
        assert sorted(u.label for u in routed) == ["block_sparse_moe.experts.down", "block_sparse_moe.experts.gate_up",
                                                  "mlp.experts.down", "mlp.experts.gate_up"]
        # w1 and w3 (Mixtral's gate and up) together, w2 apart
        assert set(keys["model.layers.2.block_sparse_moe.experts.gate_up"].members) == \
            {f"model.layers.2.block_sparse_moe.experts.{e}.{p}" for e in range(12) for p in ("w1", "w3")}
    else:
        assert len(routed) == 2 * 15 and {u.expert for u in routed} == set(range(12))
        # expert 1's patterns must not select expert 10 or 11
        u1 = keys["model.layers.2.block_sparse_moe.experts.1.gate_up"]
        assert set(u1.members) == {"model.layers.2.block_sparse_moe.experts.1.w1",
                                   "model.layers.2.block_sparse_moe.experts.1.w3"}


def test_units_keep_a_lone_sibling_on_its_own():
    units = build_units([Matrix("model.layers.0.self_attn.q_proj", 4, 4, 0),
                         Matrix("model.layers.0.self_attn.o_proj", 4, 4, 0)])
    assert [u.key for u in units] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"]
    with pytest.raises(ValueError, match="experts: expected one of"):
        build_units([], "layers")


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("data,match", [
    ({"bits": 0}, "budget.bits: expected a positive number"),
    ({"bits": True}, "budget.bits: expected a positive number"),
    ({"bits": 20}, r"budget.bits: expected a number of bits per weight in \[1, 16\]"),
    ({"size_gb": -1}, "budget.size_gb: expected a positive number"),
    ({"bits": 3, "size_gb": 1}, "budget: expected one of bits or size_gb"),
    ({"candidates": []}, "budget.candidates: expected a non-empty list"),
    ({"candidates": [{"bits": 3}]}, r"budget.candidates\[0\]: expected a mapping with bits and group_size"),
    ({"candidates": [{"bits": 3, "group_size": 32, "method": "rtn"}]}, r"budget.candidates\[0\]: expected keys"),
    ({"candidates": [{"bits": 9, "group_size": 32}]}, r"budget.candidates\[0\].bits: expected an integer"),
    ({"candidates": [{"bits": 3, "group_size": 32}, {"bits": 3, "group_size": 32}]},
     r"budget.candidates\[1\]: expected a candidate not listed before"),
    ({"candidates": [{"preset": "NVFP4A16"}]},
     r"budget.candidates\[0\]: expected an integer format .* got 'preset NVFP4A16'; floating-point and named"),
    ({"bits": 3.5, "candidates": [{"bits": 4, "group_size": 32}, {"preset": "MXFP4A16", "bits": 4, "group_size": 32}]},
     r"budget.candidates\[1\]: expected an integer format"),
    ({"candidates": ["MXFP4A16"]}, r"budget.candidates\[0\]: expected an integer format .* got 'preset MXFP4A16'"),
    ({"candidates": [4]}, r"budget.candidates\[0\]: expected a mapping with bits and group_size"),
    ({"experts": "layers"}, "budget.experts: expected one of"),
    ({"expert_weight": "weight"}, "budget.expert_weight: expected one of"),
])
def test_budget_config_rejects_bad_values(data, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"budget": data})


def test_budget_needs_an_integer_base_scheme():
    with pytest.raises(ValueError, match="scheme.preset: expected null .an integer base scheme. with a budget, got "
                                         "'NVFP4A16'; the budget's candidates are integer formats"):
        Recipe.from_dict({"scheme": "NVFP4A16", "budget": {"bits": 3.5}})
    with pytest.raises(ValueError, match="scheme.preset: expected null"):
        Recipe.from_cli(None, scheme="W8A8", budget="3.5")
    assert Recipe.from_cli(None, scheme="W4A16", budget="3.5").budget.bits == 3.5  # stored as its integer fields
    assert Recipe.from_dict({"scheme": "MXFP4A16"}).scheme.preset == "MXFP4A16"  # without a budget: fine


def test_budget_config_round_trip_and_parse():
    r = Recipe(budget=BudgetConfig(bits=3.5, experts="model"))
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r and r.budget.enabled
    assert not Recipe().budget.enabled and Recipe().budget.sensitivity == "matrix"
    assert parse_budget("3.5") == {"bits": 3.5}
    assert parse_budget("12GB") == {"size_gb": 12.0}
    assert parse_budget("512 MiB") == {"size_gb": pytest.approx(512 * 2**20 / 1e9)}
    with pytest.raises(ValueError, match="--budget: expected bits per weight"):
        parse_budget("3.5 bits")
    assert candidate_label({"bits": 3, "group_size": -1, "symmetric": False}) == "W3 per-channel asym"
    r = Recipe.from_cli(Recipe(budget=BudgetConfig(size_gb=2.0)), budget="3")
    assert r.budget.bits == 3.0 and r.budget.size_gb is None


# ------------------------------------------------------------------------------------------------ the run
def _recipe(**budget) -> Recipe:
    """The tiny models' budget recipe; the errors as measured unless ``sensitivity`` is given (the default, matrix,
    is exercised by the tests that name it)."""
    budget.setdefault("sensitivity", "none")
    return Recipe(scheme=QuantScheme(group_size=32),
                  calibration=CalibrationConfig(text_files=[str(CALIB)], num_samples=4, seq_len=64, batch_size=2),
                  budget=BudgetConfig(candidates=CANDIDATES, **budget))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("budget") / "model")


@pytest.fixture(scope="module")
def budget_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget-run") / "q"
    return out, pipeline.quantize(tiny, _recipe(bits=3.4), output_dir=out, progress=False)


def test_budget_run_applies_the_allocation_within_the_budget(budget_run):
    out, report = budget_run
    b = report.budget
    assert b["target"] == {"bits": 3.4} and b["achieved_bits"] <= 3.4 and b["exact"]
    assert b["lower_bound"] <= b["error"] and b["propagation"] in b["candidates"]
    assert len(b["residual_energy"]) == 2 and all(v > 0 for v in b["residual_energy"])
    assert [u["label"] for u in b["units"]] == ["self_attn.q_proj+k_proj+v_proj", "self_attn.o_proj",
                                                "mlp.experts"] * 2
    _, schemes = checkpoint_schemes(out)
    units = {u.key: u for u in build_units([Matrix(n, 1, 1, int(n.split(".")[2])) for n in schemes])}
    assert set(units) == {u["key"] for u in b["units"]}
    for u in b["units"]:
        fields = b["candidate_fields"][u["choice"]]
        want = IntFormat(fields["bits"], fields["group_size"], True)
        assert {schemes[n].format for n in units[u["key"]].members} == {want}, u["key"]
    # the bits the allocation counted are exactly the quantized tensors on disk
    tensors = checkpoint_tensors(out)
    qbits = sum(t.numel() * t.element_size() * 8 for n, t in tensors.items()
                if n.endswith((".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")))
    assert -(-qbits // 8) == b["quantized_bytes"]
    assert abs(qbits / b["quantized_params"] - b["achieved_bits"]) < 1e-5
    saved = json.loads((out / "moequant_recipe.json").read_text())
    assert saved["budget"]["bits"] is None and len(saved["overrides"]) == 10  # the recipe that ran
    assert json.loads((out / "moequant_report.json").read_text())["budget"] == b
    assert not pbudget.budget_file(out).exists()
    text = report.budget_table()
    assert text.splitlines()[1].split() == ["layer", "self_attn.q_proj+k_proj+v_proj", "self_attn.o_proj",
                                            "mlp.experts"]
    assert "budget 3.4 bits per weight" in report.summary()


def test_budget_checkpoint_loads_like_its_dequantized_export(tiny, budget_run, tmp_path):
    out, report = budget_run
    deq = tmp_path / "deq"
    rep2 = pipeline.quantize(tiny, _recipe(bits=3.4), output_dir=deq, progress=False, export_format="dequantized")
    assert [u["choice"] for u in rep2.budget["units"]] == [u["choice"] for u in report.budget["units"]]
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = load_model(out)(ids).logits, load_model(deq)(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unit_errors_weigh_experts_by_routing_mass_or_tokens():
    mats = [Matrix("model.layers.0.self_attn.o_proj", 4, 4, 0)] + \
        [Matrix(f"model.layers.0.mlp.experts.{e}.{p}", 4, 4, 0) for e in range(2) for p in ("gate_proj", "up_proj",
                                                                                             "down_proj")]
    units = build_units(mats)
    p = pbudget.BudgetProblem(units, [{"bits": 2, "group_size": -1}, {"bits": 4, "group_size": -1}],
                              [[1, 2], [1, 2]], [16, 96], {m.name: 0 for m in mats}, {}, 0, 112, 0, 10.0)
    probe = pbudget.CandidateProbe(p.candidates)
    probe.records = {
        "model.layers.0.self_attn.o_proj": {"members": ["model.layers.0.self_attn.o_proj"], "tokens": 100,
                                            "errors": [1.0, 0.5]},
        "model.layers.0.mlp.experts.0.gate_proj+up": {"members": ["model.layers.0.mlp.experts.0.gate_proj",
                                                                  "model.layers.0.mlp.experts.0.up_proj"],
                                                      "tokens": 60, "errors": [2.0, None]},
        "model.layers.0.mlp.experts.1.down_proj": {"members": ["model.layers.0.mlp.experts.1.down_proj"],
                                                   "tokens": 40, "errors": [3.0, 1.0]},
    }
    layer = LayerRecord(index=0, prefix="model.layers.0", seconds=0.0, moe=True, expert_tokens=[60, 40],
                        routing_mass=[30.0, 10.0])
    assert pbudget.unit_errors(p, probe, [layer], "mass") == [[100.0, 50.0], [2.0 * 30 + 3.0 * 10, None]]
    assert pbudget.unit_errors(p, probe, [layer], "tokens")[1] == [2.0 * 60 + 3.0 * 40, None]
    assert pbudget.unit_errors(p, probe, [layer], "mass", {0: 0.5}) == [[50.0, 25.0], [30.0 + 15.0, None]]
    per_matrix = {"model.layers.0.self_attn.o_proj": 4.0, "model.layers.0.mlp.experts.0.gate_proj": 2.0}
    assert pbudget.unit_errors(p, probe, [layer], "mass", None, per_matrix) == [[4.0, 2.0], [4.0, None]]


def test_loss_sensitivity_equals_whole_model_autograd(tiny):
    """The layer-by-layer backward gives what autograd through the whole transformers model gives: per layer output,
    per Linear output, and per routed expert's gate/up and down outputs (the reference runs the experts as an
    explicit loop over experts whose outputs keep their gradients)."""
    import transformers

    from moequant.calibration.sensitivity import loss_sensitivity
    from moequant.models import detect_family, split_expert
    from moequant.models.lazy import LazyModel

    ids = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    lazy = LazyModel(tiny, dtype=torch.float64, experts_implementation="eager")
    got = loss_sensitivity(lazy, ids, "cpu", batch_size=2, matrices=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float64,
                                                              experts_implementation="eager").eval()
    fam = detect_family(model.config)
    kept: dict = {}

    def keep(name, t):
        t.retain_grad()
        kept.setdefault(name, []).append(t)
        return t

    def loop_experts(ex, prefix):
        def forward(hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e in range(ex.gate_up_proj.shape[0]):
                tok, slot = torch.where(top_k_index == e)
                if tok.numel() == 0:
                    continue
                t = split_expert(ex, fam, e)
                names = fam.disk_expert_names(prefix, e)
                x = hidden_states[tok]
                gate, up = keep(names["gate"], x @ t.gate.t()), keep(names["up"], x @ t.up.t())
                y = keep(names["down"], fam.glu(ex, gate, up) @ t.down.t())
                out = out.index_add(0, tok, top_k_weights[tok, slot, None] * y)
            return out
        return forward

    handles = []
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: keep(i, o[0] if isinstance(o, tuple) else o)))
        for n, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear) and not n.endswith("mlp.gate"):
                handles.append(m.register_forward_hook(lambda mod, a, o, n=f"{prefix}.{n}": keep(n, o)))
        layer.mlp.experts.forward = loop_experts(layer.mlp.experts, prefix)
    want_layers = [0.0] * len(model.model.layers)
    want: dict = {}
    for b in ids.split(2):
        kept.clear()
        logits = model(b).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                                 reduction="sum")
        loss.backward()
        for name, ts in kept.items():
            for t in ts:
                v = float(t.grad.pow(2).sum())
                if isinstance(name, int):
                    want_layers[name] += v / ids.numel()
                else:
                    want[name] = want.get(name, 0.0) + v / t.shape[-1]
        model.zero_grad()
    for h in handles:
        h.remove()
    assert got.layers == pytest.approx(want_layers, rel=1e-9) and got.tokens == ids.numel()
    assert got.layers[0] != pytest.approx(got.layers[1], rel=1e-3)  # the layers differ: the test can tell them apart
    assert set(got.matrices) == set(want)
    assert "model.layers.1.mlp.experts.3.down_proj" in want and "model.layers.0.self_attn.k_proj" in want
    for name in want:
        if name.endswith(("gate_proj", "up_proj")):  # gate and up share one value: their outputs' pooled gradient
            pair = [want[name.rsplit(".", 1)[0] + p] for p in (".gate_proj", ".up_proj")]
            assert got.matrices[name] == pytest.approx(sum(pair) / 2, rel=1e-7), name
        else:
            assert got.matrices[name] == pytest.approx(want[name], rel=1e-7), name


def test_loader_warnings_before_the_run():
    mats = [Matrix("model.layers.0.self_attn.o_proj", 4, 4, 0), Matrix("model.layers.0.mlp.experts.0.down_proj", 4, 4, 0)]
    units = build_units(mats)

    def warnings(cands, experts="layer", unfit=()):
        costs = [[None if k in unfit else 1 for k in range(len(cands))] for _ in units]
        p = pbudget.BudgetProblem(units, cands, costs, [16, 16], {}, {}, 0, 32, 0, 10.0)
        return pbudget.loader_warnings(Recipe(budget=BudgetConfig(bits=4, experts=experts)), p)

    w = warnings([{"bits": 3, "group_size": -1}, {"bits": 4, "group_size": -1, "symmetric": False}])
    assert len(w) == 3 and "transformers 5.23 loads with wrong" in w[0] and "asymmetric" in w[1] and "3-bit" in w[2]
    assert warnings([{"bits": 4, "group_size": -1}, {"bits": 8, "group_size": -1}], "model") == []
    assert len(warnings([{"bits": 4, "group_size": -1}, {"bits": 8, "group_size": -1}])) == 1
    assert warnings([{"bits": 4, "group_size": -1}, {"bits": 3, "group_size": 64}], "layer", unfit=(1,)) == []


def test_budget_grid_per_expert_cells():
    units = [{"label": f"mlp.experts.{e}.gate_up", "expert": e, "layers": [1], "params": 10,
              "scheme": "W2 g32" if e < 3 else "W4 g32", "bits": 2.5 if e < 3 else 4.5} for e in range(4)]
    units.append({"label": "self_attn.o_proj", "expert": None, "layers": [1], "params": 40, "scheme": "W8 per-channel",
                  "bits": 8.0})
    cols, grid = budget_grid({"units": units})
    assert cols == ["mlp.experts.*.gate_up", "self_attn.o_proj"]
    assert grid[1]["mlp.experts.*.gate_up"] == ("W2 g32 x3, W4 g32 x1", pytest.approx(3.0))


def test_budget_layer_scales_change_the_errors_not_the_costs(tiny, budget_run, tmp_path):
    plain = budget_run[1].budget
    fisher = pipeline.quantize(tiny, _recipe(bits=3.4, sensitivity="layer", sensitivity_samples=2),
                               progress=False).budget
    resid = pipeline.quantize(tiny, _recipe(bits=3.4, sensitivity="residual"), progress=False).budget
    assert len(fisher["sensitivity"]) == 2 and all(v > 0 for v in fisher["sensitivity"])
    assert plain["sensitivity"] is None and resid["sensitivity_kind"] == "residual"
    matrix = pipeline.quantize(tiny, _recipe(bits=3.4, sensitivity="matrix", sensitivity_samples=2),
                               progress=False).budget
    assert matrix["sensitivity"] == pytest.approx(fisher["sensitivity"], rel=1e-6) and matrix["achieved_bits"] <= 3.4
    for b, factor in ((fisher, fisher["sensitivity"]), (resid, [1 / v for v in resid["residual_energy"]])):
        for u, u0 in zip(b["units"], plain["units"]):
            assert u["costs"] == u0["costs"]
            f = factor[u["layers"][0]]
            assert u["errors"] == pytest.approx([e * f for e in u0["errors"]], rel=1e-4)  # separate pass-1 runs


def test_budget_model_granularity_loads_in_transformers_and_expert_granularity_exports(tiny, tmp_path):
    rep = pipeline.quantize(tiny, _recipe(bits=3.2, experts="model"), output_dir=tmp_path / "m", progress=False)
    routed = [u for u in rep.budget["units"] if u["kind"] == "routed"]
    assert len(routed) == 1 and routed[0]["layers"] == [0, 1]
    assert rep.loaders[0]["loader"] == "transformers" and rep.loaders[0]["loads"] is True
    torch.save(IDS, tmp_path / "ids.pt")  # plain transformers (no moequant import) reads it as our loader does
    assert transformers_logits(tmp_path / "ids.pt", [tmp_path / "m"]) == {str(tmp_path / "m"): "ok"}
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "m" / "logits.pt"), load_model(tmp_path / "m")(IDS).logits)
    rep = pipeline.quantize(tiny, _recipe(bits=3.2, experts="expert"), output_dir=tmp_path / "e", progress=False,
                            export_format="dequantized")
    routed = [u for u in rep.budget["units"] if u["kind"] == "routed"]
    assert len(routed) == 2 * 2 * 4 and sorted({u["expert"] for u in routed}) == [0, 1, 2, 3]
    assert rep.budget["achieved_bits"] <= 3.2


def test_budget_resume_reuses_the_allocation_and_is_bit_identical(tiny, budget_run, tmp_path, monkeypatch):
    ref_out, ref = budget_run
    out = tmp_path / "q"
    with pytest.raises(CrashAfterLayer0):
        pipeline.quantize(tiny, _recipe(bits=3.4), output_dir=out, progress=False, observers=crash_observer())
    assert pbudget.budget_file(out).is_file() and not out.exists()

    def no_pass1(*a, **k):
        raise AssertionError("pass 1 ran again on resume")

    monkeypatch.setattr(pbudget.CandidateProbe, "__call__", no_pass1)
    rep = pipeline.quantize(tiny, _recipe(bits=3.4), output_dir=out, progress=False, resume=True)
    timeless = [{k: v for k, v in b.items() if k != "measure_seconds"} for b in (rep.budget, ref.budget)]
    assert timeless[0] == timeless[1] and not pbudget.budget_file(out).exists()
    a, b = checkpoint_tensors(out), checkpoint_tensors(ref_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ errors
def _no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a layer ran")

    monkeypatch.setattr(pipeline.layer.LayerQuantizer, "quantize_layer", boom)


@pytest.mark.parametrize("recipe,match", [
    (dict(bits=2.0), r"budget.bits: 2 bits per weight is below the cheapest allocation, 2\.5"),
    (dict(size_gb=1e-6), "budget.size_gb: 1e-06 GB is below the smallest checkpoint"),
    (dict(bits=3.0, experts="projection"), "budget.experts: 'projection' gives a MoE layer's experts several"),
])
def test_budget_errors_before_any_work(tiny, tmp_path, monkeypatch, recipe, match):
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=match):
        pipeline.quantize(tiny, _recipe(**recipe), output_dir=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_budget_partly_pinned_unit_is_an_error_and_an_unfit_candidate_a_warning(tiny, tmp_path, monkeypatch,
                                                                                caplog):
    _no_work(monkeypatch)
    r = _recipe(bits=3.5)
    r.overrides = [Override("model.layers.0.self_attn.q_proj", {"bits": 8})]
    with pytest.raises(ValueError, match="overrides: model.layers.0.self_attn.q_proj has an override but "
                                         "model.layers.0.self_attn.k_proj does not"):
        pipeline.quantize(tiny, r, progress=False)
    r = _recipe(bits=1.5)
    r.budget.candidates = CANDIDATES + [{"bits": 4, "group_size": 256}]
    with pytest.raises(ValueError, match="below the cheapest allocation"):  # the check after the warning
        pipeline.quantize(tiny, r, progress=False)
    assert "budget.candidates[4]: W4 g256 fits no module group of this model" in caplog.text
    r.budget.candidates = [{"bits": 4, "group_size": 256}]
    with pytest.raises(ValueError, match="budget.candidates: no candidate fits model.layers.0.self_attn"):
        pipeline.quantize(tiny, r, progress=False)


def test_budget_pinned_modules_keep_their_scheme_and_count_as_fixed(tiny, tmp_path):
    r = _recipe(bits=3.6)
    r.overrides = [Override("model.layers.1.self_attn.o_proj", {"bits": 8, "group_size": -1})]
    rep = pipeline.quantize(tiny, r, output_dir=tmp_path / "q", progress=False)
    b = rep.budget
    assert b["pinned"] == ["model.layers.1.self_attn.o_proj"]
    assert "model.layers.1.self_attn.o_proj" not in [u["key"] for u in b["units"]]
    _, schemes = checkpoint_schemes(tmp_path / "q")
    assert schemes["model.layers.1.self_attn.o_proj"].format.bits == 8
    assert b["achieved_bits"] <= 3.6


def test_budget_pinned_float_modules_count_their_written_bits(tiny, tmp_path):
    """A floating-point override (MXFP4A16 attention of layer 1, NVFP4A16 o_proj of layer 0) is pinned: not measured
    (the integer candidates cannot be applied to it), its bits counted as written, the rest allocated."""
    r = _recipe(bits=3.6)
    r.overrides = [Override("re:model\\.layers\\.1\\.self_attn\\..*", "MXFP4A16"),
                   Override("model.layers.0.self_attn.o_proj", "NVFP4A16")]
    rep = pipeline.quantize(tiny, r, output_dir=tmp_path / "q", progress=False)
    b = rep.budget
    assert "model.layers.1.self_attn.q_proj" in b["pinned"] and "model.layers.0.self_attn.o_proj" in b["pinned"]
    assert not any(k.startswith("model.layers.1.self_attn") for k in (u["key"] for u in b["units"]))
    _, schemes = checkpoint_schemes(tmp_path / "q")
    assert schemes["model.layers.1.self_attn.k_proj"].format == FloatFormat("mxfp4")
    assert schemes["model.layers.0.self_attn.o_proj"].format == FloatFormat("nvfp4")
    tensors = checkpoint_tensors(tmp_path / "q")
    quantized = [n for n in schemes]
    written = sum(t.numel() * t.element_size() * 8 for n, t in tensors.items()
                  if any(n.startswith(q + ".weight") for q in quantized))
    assert abs(written / b["quantized_params"] - b["achieved_bits"]) < 1e-5  # pinned and allocated bits as written
    assert b["achieved_bits"] <= 3.6


def test_cli_budget_flag(tiny, tmp_path, capsys):
    rc = cli.main(["-q", "quantize", str(tiny), "--out", str(tmp_path / "x"), "--calib", str(CALIB),
                   "--budget", "3.5 bits"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().startswith("moequant: error: --budget: expected bits per weight")
    assert len(err.strip().splitlines()) == 1
    rc = cli.main(["-q", "quantize", str(tiny), "--out", str(tmp_path / "x"), "--calib", str(CALIB),
                   "--budget", "1.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "below the cheapest allocation" in err and not (tmp_path / "x").exists()
    rc = cli.main(["-q", "quantize", str(tiny), "--out", str(tmp_path / "x"), "--calib", str(CALIB),
                   "--scheme", "NVFP4A16", "--budget", "3.5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == ("moequant: error: scheme.preset: expected null (an integer base scheme) with "
                                       "a budget, got 'NVFP4A16'; the budget's candidates are integer formats "
                                       "applied to the base scheme; give floating-point or named schemes to modules "
                                       "through overrides (they are pinned, as fixed bits)")


def test_report_renders_the_allocation(budget_run):
    pytest.importorskip("matplotlib")
    from moequant.eval import report_html
    from moequant.eval.report_html import Run

    out, report = budget_run
    run = Run(out, QuantizationReport.load(out / "moequant_report.json"), None)
    text = report_html.render_text(run)
    assert "allocation (scheme per layer" in text
    page = report_html.render_html(run)
    assert "<h2>Budget allocation</h2>" in page and page.count("data:image/png;base64,") >= 4


@pytest.mark.gpu
def test_budget_on_the_gpu_measures_with_the_batched_solver(tiny, budget_run, tmp_path, monkeypatch):
    """On CUDA (bf16 layers): pass 1 solves the candidates with the batched GPTQ; the measured errors are those of
    the CPU run to within the bf16 layers' difference; the loss sensitivities run on the GPU too."""
    from moequant.methods.gptq.solver import GPTQSolver

    calls = {"n": 0}
    real = GPTQSolver.solve_batched

    def counted(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(GPTQSolver, "solve_batched", counted)
    r = _recipe(bits=3.4, sensitivity="matrix", sensitivity_samples=2)
    r.device = "cuda"
    rep = pipeline.quantize(tiny, r, output_dir=tmp_path / "q", progress=False)
    assert calls["n"] >= 2 * len(CANDIDATES)  # every candidate of both layers' experts, batched
    b, cpu = rep.budget, budget_run[1].budget
    assert b["achieved_bits"] <= 3.4 and len(b["sensitivity"]) == 2
    r = _recipe(bits=3.4)
    r.device = "cuda"
    plain = pipeline.quantize(tiny, r, progress=False).budget
    for u, c in zip(plain["units"], cpu["units"]):
        assert u["errors"] == pytest.approx(c["errors"], rel=0.3), u["key"]
