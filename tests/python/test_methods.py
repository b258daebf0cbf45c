"""Method registration: every registered solver is reachable from the recipe (``method: <name>``) and the CLI
(``--method``) and has a reference twin; the transforms are registered in order with their recipe sections; a
method registered in a local registry runs through the pipeline end to end without changing the built-in one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moequant.ref
from moequant import ops, pipeline
from moequant.cli import CliError, build_parser
from moequant.formats import compressed_tensor_names
from moequant.io.safetensors import CheckpointReader
from moequant.methods import LayerTransform, Solver, SolverRegistry, build_transforms, default_solvers
from moequant.methods.registry import TRANSFORMS
from moequant.recipe import QuantScheme, Recipe
from checkpoints import checkpoint_tensors
from testdata import tiny_qwen3_checkpoint

BUILTIN = ("gptq", "rtn")


def test_builtin_solvers_are_registered_in_order():
    assert default_solvers().names() == BUILTIN
    assert [s.name for s in default_solvers()] == list(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_registered_method_is_reachable_from_recipe_cli_and_has_a_twin(name):
    solver = default_solvers().get(name)
    recipe = Recipe.from_dict({"scheme": {"method": name}})  # the recipe
    assert recipe.scheme.solver is solver
    assert Recipe.from_dict({"overrides": [{"pattern": "x", "scheme": {"method": name}}]}).resolve("x").solver is solver
    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--method", name])  # the CLI
    assert args.method == name
    assert Recipe.from_cli(method=args.method).scheme.method == name
    twin = getattr(moequant.ref, solver.reference, None)  # the plain-PyTorch reference twin
    assert callable(twin) and twin.__module__.startswith("moequant.ref."), solver.reference
    assert isinstance(solver.needs_hessian, bool) and isinstance(solver.act_order, bool)


def test_unregistered_method_is_refused_by_recipe_and_cli_with_the_registered_names():
    with pytest.raises(ValueError, match=r"^method: expected one of 'gptq', 'rtn', got 'dummy'"):
        QuantScheme(method="dummy")
    with pytest.raises(CliError, match="invalid choice: 'dummy'"):
        build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "dummy"])


def test_transforms_are_registered_in_order_with_their_recipe_sections():
    assert [t.name for t in TRANSFORMS] == ["rotation", "awq"]
    for t in TRANSFORMS:
        section = getattr(Recipe(), t.name)
        assert section.enabled is False and not t.enabled(Recipe())
        on = Recipe.from_dict({t.name: {"enabled": True}})
        assert t.enabled(on)
        assert [type(x) for x in build_transforms(on, object(), torch.bfloat16)] == \
            [type(t.build(on, object(), torch.bfloat16))]
        assert isinstance(t.build(on, object(), torch.bfloat16), LayerTransform)


class MinMaxRTN(Solver):
    """A dummy method: round to nearest with min/max scales whatever the scheme's scale search (so its codes
    differ from the built-in ones); counts its calls."""

    name = "dummy"
    needs_hessian = False
    reference = "quantize_rtn_ref"

    def __init__(self):
        self.calls = 0

    def solve(self, w, h, scheme, storage):
        self.calls += 1
        return ops.quantize_rtn(w, scheme.bits, scheme.group_size, scheme.symmetric, scale_search="minmax",
                                scale_dtype=storage)


def test_registries_are_immutable_values():
    base = default_solvers()
    local = base.with_solver(MinMaxRTN())
    assert local.names() == (*BUILTIN, "dummy") and base.names() == BUILTIN and "dummy" not in default_solvers()
    with pytest.raises(ValueError, match="registered twice"):
        local.with_solver(MinMaxRTN())
    with pytest.raises(ValueError, match="Solver"):
        SolverRegistry([object()])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("methods") / "model")


def test_method_of_a_local_registry_runs_through_the_pipeline(tiny, tmp_path):
    dummy = MinMaxRTN()
    solvers = default_solvers().with_solver(dummy)
    recipe = Recipe.from_dict({"scheme": {"method": "dummy", "group_size": 32},
                               "calibration": {"num_samples": 2, "seq_len": 32}}, solvers)
    ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(3))
    out = tmp_path / "q"
    report = pipeline.quantize(tiny, recipe, calibration=ids, output_dir=out, progress=False, solvers=solvers)
    modules = [m for layer in report.layers for m in layer.modules]
    assert modules and all(m.method == "dummy" and m.scheme.endswith("dummy mse") for m in modules)
    assert dummy.calls == len(modules)
    # the checkpoint holds the dummy's codes: RTN min/max of the source weights (it ignores the layer inputs)
    ckpt = checkpoint_tensors(out)
    packed = sorted(n[: -len(".weight_packed")] for n in ckpt if n.endswith(".weight_packed"))
    assert len(packed) == len(modules) + sum(".experts." in n and n.endswith("gate_proj") for n in packed)
    with CheckpointReader(tiny) as src:
        for prefix in packed:
            qt = ops.quantize_rtn(src.get(prefix + ".weight"), 4, 32, True, scale_search="minmax",
                                  scale_dtype=torch.bfloat16)
            for name, t in compressed_tensor_names(prefix, qt, torch.bfloat16).items():
                assert torch.equal(ckpt[name], t), name
    # nothing leaked: the built-in registry and recipes do not know the method
    assert "dummy" not in default_solvers()
    with pytest.raises(ValueError, match="method"):
        Recipe.from_dict(recipe.to_dict())
