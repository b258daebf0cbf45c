"""Calibration: the data (:mod:`~moequant.calibration.data`: text windows, JSONL samples, token ids; EBSS
self-generated samples in :mod:`~moequant.calibration.ebss`) and what a layer's forward yields from it: the routed
tokens of each experts call (:mod:`~moequant.calibration.routing`) and the Hessians the capture hooks accumulate
(:mod:`~moequant.calibration.capture`); the loss's sensitivity to each layer's output
(:mod:`~moequant.calibration.sensitivity`, the budget's ``sensitivity: layer`` and ``matrix``)."""
