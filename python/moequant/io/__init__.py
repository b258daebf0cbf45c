"""Checkpoints on disk: reading, writing, exporting, and which loaders read what moequant writes.

* :mod:`~moequant.io.safetensors`: the one safetensors reader (:func:`check_checkpoint`, :class:`CheckpointIndex`,
  :class:`CheckpointReader`, :func:`scan_weights`);
* :mod:`~moequant.io.source`: FP8 block-scaled and MXFP4 source checkpoints, read decoded in their bf16 view;
* :mod:`~moequant.io.files`: atomic files, owned temporary directories, umask modes;
* :mod:`~moequant.io.writer`: the atomic, sharded :class:`CheckpointWriter`;
* :mod:`~moequant.io.export`: :func:`export_checkpoint` (pack-quantized or dequantized) from :class:`Replacements`;
* :mod:`~moequant.io.expert_layout`: where a MoE layer's routed experts go in the export, per family;
* :mod:`~moequant.io.exported`: moequant's own loader of an exported checkpoint;
* :mod:`~moequant.io.compat`: which loaders (transformers, vLLM) read a checkpoint;
* :mod:`~moequant.io.fingerprint`: a cheap fingerprint of a checkpoint's content.

Nothing here imports the pipeline or the methods. Import the modules themselves (this package imports nothing, so
that :mod:`moequant.models` may use the reader while :mod:`~moequant.io.exported` uses the lazy model).
"""
