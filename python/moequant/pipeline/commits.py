"""Layer commits on a background thread: the work directory's writes of layer L (its results, record and
activations: :meth:`moequant.pipeline.workdir.WorkDir.save_layer`) run while layer L+1 computes.

One writer thread, so layers are committed in order; :meth:`LayerCommits.submit` first waits for the previous
layer's commit, so at most one is in flight and a failed write (a full disk) surfaces at the next layer or at the
end of the loop, as the exception the write raised. The observers' ``layer_done(index, result)`` runs on the calling
thread once layer ``index`` is committed (i.e. resumable from the next layer). A layer whose expert groups went to
part files is committed once their writes, still running when its engine returned, are done
(``result.part_writes``). Leaving the ``with`` block waits for the last commit, also when the loop ends with an
exception (its own is raised, the commit's logged)."""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

__all__ = ["LayerCommits"]

logger = logging.getLogger(__name__)


class LayerCommits:
    """Commits layers to a :class:`~moequant.pipeline.workdir.WorkDir` on one background thread (see the module
    docstring)."""

    def __init__(self, work, observers: Sequence = ()) -> None:
        self.work, self.observers = work, list(observers)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moequant-commit")
        self._pending: Optional[tuple[int, object, Future]] = None

    def submit(self, index: int, result, record, hidden: list, tensors: dict, to_host=None) -> None:
        """Commits layer ``index`` (after the previous one's commit has finished). ``to_host``: a function run first
        on the commit thread that returns the results and tensors in host memory (run.py passes
        :func:`moequant.pipeline.host.layer_to_host_later`); ``result.results`` is then the host copy."""
        self.wait()

        def commit() -> None:
            writes = getattr(result, "part_writes", None)
            if writes is not None:  # the layer's part files are on disk before the layer is committed
                result.part_writes = None
                writes.wait()
            results, dense = (result.results, tensors) if to_host is None else to_host()
            result.results = results
            self.work.save_layer(index, results, record, hidden, tensors=dense,
                                 added=getattr(result, "kv_scales", None), parts=getattr(result, "parts", 0))

        self._pending = (index, result, self._pool.submit(commit))

    def wait(self) -> None:
        """Waits for the commit in flight; re-raises its error; then tells the observers."""
        if self._pending is None:
            return
        index, result, future = self._pending
        self._pending = None
        future.result()
        for obs in self.observers:
            obs.layer_done(index, result)

    def __enter__(self) -> "LayerCommits":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None:
                try:
                    self._pending[2].result()  # the layer before the failure stays committed
                except Exception:  # noqa: BLE001 - the loop's own exception is the one raised
                    logger.exception("the commit of layer %d failed too", self._pending[0])
                self._pending = None
        finally:
            self._pool.shutdown(wait=True)
