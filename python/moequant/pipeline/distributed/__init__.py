"""Multi-process quantization (``torchrun --nproc-per-node N -m moequant quantize ...``, or
:func:`moequant.quantize` under an initialised ``torch.distributed`` process group); see ``docs/distributed.md``.

* :mod:`.context`: :class:`DistContext` (rank, world, the collectives, lost peers as :class:`DistributedError`),
  :func:`current_context`, :func:`init_from_env`;
* :mod:`.linears`: the plain Linears' Hessians rebuilt from every rank's inputs in batch order, solved on rank 0;
* :mod:`.experts`: the routed experts, unit by unit on the rank that owns them;
* :mod:`.states`: the hidden states between layers: each rank its batches, rank 0 all of them for the work
  directory.
"""
from .context import DEFAULT_TIMEOUT_S, DistContext, DistributedError, current_context, init_from_env
from .experts import all_calls, distributed_experts, units_of
from .linears import RecordingAccumulator, recording_factory, solve_linears
from .states import BatchSlice, gather_outputs, scatter_states

__all__ = ["DistContext", "DistributedError", "current_context", "init_from_env", "DEFAULT_TIMEOUT_S",
           "RecordingAccumulator", "recording_factory", "solve_linears", "all_calls", "units_of",
           "distributed_experts", "BatchSlice", "gather_outputs", "scatter_states"]
