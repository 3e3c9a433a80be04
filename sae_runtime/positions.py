"""Absolute token positions: the one constant both sides share, with no dependencies (the
worker's kernels and tables import it on machines that have only torch, e.g.
``make gpu-check``)."""

POS_INF = 2**62
"""End of a window without an end (larger than any position vLLM can reach): selectors'
windows (``sae_runtime.spec.selectors``) and the edit record's ``pos_hi``
(``sae_runtime.step.edits``)."""
