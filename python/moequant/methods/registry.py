"""Which methods exist: the solver registry (:class:`SolverRegistry`, the built-in one from
:func:`default_solvers`) and the layer transforms in the order the pipeline applies them
(:func:`build_transforms`).

A registry is immutable: :meth:`SolverRegistry.with_solver` returns a new one, so registering a method never
changes what another run (or test) sees. The recipe's allowed ``method`` values and the CLI's ``--method`` choices
are the names of the registry in use (:func:`default_solvers` unless a recipe / run is given another).

Adding a rounding method: ``methods/<name>/`` with a :class:`~moequant.methods.base.Solver` subclass (its core in
``libmoequant``, a CUDA kernel if it has one, the binding, the :mod:`moequant.ops` entry point and a
:mod:`moequant.ref` twin), and one line in :func:`default_solvers`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Iterator

from .base import LayerTransform, Solver

__all__ = ["SolverRegistry", "default_solvers", "TransformMethod", "TRANSFORMS", "build_transforms"]


class SolverRegistry:
    """Solvers by name (immutable). ``fallback``: the solver used for a matrix without a Hessian whose method needs
    one (the pipeline reports it as that method)."""

    fallback = "rtn"

    def __init__(self, solvers: Iterable[Solver] = ()):
        table: dict[str, Solver] = {}
        for s in solvers:
            if not isinstance(s, Solver) or not isinstance(s.name, str) or not s.name:
                raise ValueError(f"solvers: expected Solver instances with a name, got {s!r}")
            if s.name in table:
                raise ValueError(f"solvers: {s.name!r} is registered twice")
            table[s.name] = s
        self._solvers = MappingProxyType(table)

    def names(self) -> tuple:
        """The method names, in registration order."""
        return tuple(self._solvers)

    def get(self, name: str) -> Solver:
        try:
            return self._solvers[name]
        except KeyError:
            raise ValueError(f"method: expected one of {', '.join(map(repr, self._solvers))}, got {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._solvers

    def __iter__(self) -> Iterator[Solver]:
        return iter(self._solvers.values())

    def __len__(self) -> int:
        return len(self._solvers)

    def with_solver(self, solver: Solver) -> "SolverRegistry":
        """A new registry with ``solver`` added (a name already registered is an error); this one is unchanged."""
        return SolverRegistry([*self, solver])

    def __deepcopy__(self, memo) -> "SolverRegistry":  # immutable: recipes deep-copied for a run share it
        return self

    def __repr__(self) -> str:
        return f"SolverRegistry({list(self._solvers)})"


@functools.lru_cache(maxsize=None)
def default_solvers() -> SolverRegistry:
    """The built-in solvers: ``gptq`` (the default), ``rtn``."""
    from .gptq import GPTQSolver
    from .rtn import RTNSolver

    return SolverRegistry([GPTQSolver(), RTNSolver()])


@dataclass(frozen=True)
class TransformMethod:
    """A method that changes weights before they are quantized: ``enabled(recipe)`` says whether the recipe turns
    it on, ``build(recipe, family, storage)`` makes its :class:`~moequant.methods.base.LayerTransform`."""

    name: str
    enabled: Callable
    build: Callable


def _rotation(recipe, family, storage):
    from .rotation import RotationTransform

    return RotationTransform(recipe.rotation.seed, storage)


def _awq(recipe, family, storage):
    from .awq import AWQTransform

    return AWQTransform(recipe, family, storage)


# In the order they are applied: the rotation first (AWQ then smooths in the rotated basis), both before the
# Hessian capture.
TRANSFORMS = (
    TransformMethod("rotation", lambda recipe: recipe.rotation.enabled, _rotation),
    TransformMethod("awq", lambda recipe: recipe.awq.enabled, _awq),
)


def build_transforms(recipe, family, storage) -> list[LayerTransform]:
    """The transforms ``recipe`` enables, in the order the pipeline applies them (rotation, then AWQ).

    ``family``: the model's :class:`~moequant.models.MoEFamily`; ``storage``: the checkpoint's dtype (changed
    tensors the transforms export are rounded to or written in it)."""
    return [t.build(recipe, family, storage) for t in TRANSFORMS if t.enabled(recipe)]
