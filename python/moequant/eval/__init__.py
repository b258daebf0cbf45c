"""Evaluation: perplexity with the reference protocol (:mod:`~moequant.eval.ppl`) of a model loaded by
transformers or moequant's own loader (:mod:`~moequant.eval.loader`)."""
from .loader import LOADERS, choose_loader, load_model, simulation_of
from .simulate import Simulation, SimulationPlan
from .ppl import load_token_ids, perplexity, window_starts

__all__ = ["load_token_ids", "perplexity", "window_starts", "load_model", "choose_loader", "LOADERS",
           "simulation_of", "Simulation", "SimulationPlan"]
