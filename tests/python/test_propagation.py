"""The pipeline's central promise: layer L+1 is calibrated on the outputs of the *quantized* layer L.

(a) The hidden states layer L+1's calibration sees (captured by a :class:`moequant.pipeline.LayerObserver`) are
    exactly the outputs of layer L as the exported checkpoint holds it (reloaded and dequantized by
    :func:`moequant.io.exported.load_model`, float32 on the CPU) on the inputs layer L's calibration saw, and not the
    outputs of the unquantized layer L.
(b) The checkpoint equals one built layer by layer through the public step (:class:`moequant.pipeline.LayerQuantizer`)
    with the quantized outputs propagated, and differs from one where every layer is calibrated on the unquantized
    model's own hidden states (the same step fed the outputs of the original layers).

Both fail when the pipeline does not propagate the layer outputs at all, and when it propagates the outputs of the
unquantized layer (the two mutants of issue #12).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moequant import pipeline
from moequant.formats import compressed_tensor_names
from moequant.io.exported import load_model
from moequant.models import detect_family
from moequant.models.lazy import LazyModel
from moequant.pipeline import LayerObserver, LayerQuantizer, layer_inputs
from moequant.recipe import CalibrationConfig, QuantScheme, Recipe
from checkpoints import checkpoint_tensors
from testdata import tiny_qwen3_checkpoint

NUM_LAYERS = 2


def _recipe() -> Recipe:
    # W2 GPTQ: outputs change visibly, and the codes depend on the Hessian (hence on the layer's inputs)
    return Recipe(scheme=QuantScheme(bits=2, group_size=32, scale_search="minmax"),
                  calibration=CalibrationConfig(num_samples=4, seq_len=32, batch_size=2))


def _ids() -> torch.Tensor:
    return torch.randint(0, 8000, (4, 32), generator=torch.Generator().manual_seed(7))


class _Inputs(LayerObserver):
    """Records what every layer's calibration sees."""

    def __init__(self):
        self.hidden, self.kwargs = {}, None

    def layer_inputs(self, index, prefix, hidden, kwargs):
        self.hidden[index] = [h.clone() for h in hidden]
        self.kwargs = kwargs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("propagation") / "model")


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """The pipeline's checkpoint of the tiny model and the inputs each layer's calibration saw."""
    out = tmp_path_factory.mktemp("propagation-run") / "q"
    seen = _Inputs()
    pipeline.quantize(tiny, _recipe(), calibration=_ids(), output_dir=out, progress=False, observers=[seen])
    assert sorted(seen.hidden) == list(range(NUM_LAYERS))
    return out, seen


def test_next_layer_sees_exactly_the_quantized_layer_outputs(tiny, run):
    out, seen = run
    model = load_model(out, dtype=torch.float32)  # the checkpoint, dequantized: what a loader computes with
    layers = detect_family(model.config).layers(model)
    original = LazyModel(tiny, dtype=torch.float32)
    with torch.no_grad():
        for index in range(NUM_LAYERS - 1):
            source = original.load_layer(index)
            for b, (x, y) in enumerate(zip(seen.hidden[index], seen.hidden[index + 1])):
                kw = seen.kwargs[b][index]
                quantized = layers[index](x, **kw)
                quantized = quantized[0] if isinstance(quantized, tuple) else quantized
                assert torch.equal(y, quantized), f"layer {index + 1}, batch {b}: not the quantized layer's outputs"
                unquantized = source(x, **kw)
                unquantized = unquantized[0] if isinstance(unquantized, tuple) else unquantized
                assert not torch.equal(y, unquantized), "the recipe does not change the layer outputs: no test"


def _packed(results: dict) -> dict:
    return {n: t for name, qt in results.items() for n, t in compressed_tensor_names(name, qt, torch.bfloat16).items()}


def _layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def test_checkpoint_is_calibrated_on_quantized_outputs_not_on_the_original_model(tiny, run):
    out, _ = run
    recipe = _recipe().validated()
    lazy = LazyModel(tiny, dtype=torch.float32)
    hidden, kwargs = layer_inputs(lazy, _ids(), recipe.calibration.batch_size, torch.device("cpu"))
    step = LayerQuantizer(lazy, recipe, torch.device("cpu"), torch.bfloat16)
    propagated, on_original = {}, {}
    h_quantized = h_original = hidden
    for index in range(NUM_LAYERS):
        res = step.quantize_layer(index, h_quantized, kwargs)
        propagated.update(_packed(res.results))
        h_quantized = step.run_layer(res.layer, index, h_quantized, kwargs)
        res = step.quantize_layer(index, h_original, kwargs)
        on_original.update(_packed(res.results))
        h_original = step.run_layer(lazy.load_layer(index), index, h_original, kwargs)
    ckpt = checkpoint_tensors(out)
    assert propagated and set(propagated) <= set(ckpt)
    for name, t in propagated.items():  # the pipeline is the public step with the quantized outputs propagated
        assert torch.equal(ckpt[name], t), name
    differ = {_layer_of(n) for n, t in on_original.items() if not torch.equal(ckpt[n], t)}
    assert 0 not in differ  # layer 0 sees the embeddings either way
    assert differ == set(range(1, NUM_LAYERS)), f"layers calibrated on the original model's hidden states: {differ}"
