"""Triton chunked gated delta rule: forward and backward (DESIGN §12; the mathematics: `kernels.delta_rule.reference`).

Modules, one per stage: ``common`` (DeltaConfig, launch planning, the per-chunk UT transform), ``forward`` (W and u,
the chunk sweeps, the segment scans), ``backward`` (the reverse sweep and the chunk gradients) and ``function``
(the stage functions, the autograd Function and `delta_rule_triton`). The stage functions exported here are what
the sequence-sharded form (LASP-2 for affine recurrences, `parallel.lasp2_delta_triton`) is built from.
"""

from kernels.delta_rule.triton.common import DEFAULT_CONFIG, FUSED, DeltaConfig, fused_config, with_config
from kernels.delta_rule.triton.function import (
    backward_pass,
    boundary_states,
    decay_grads,
    delta_rule_triton,
    entering_grad,
    row_summary,
    segment_summaries,
    setup,
)

__all__ = ["DEFAULT_CONFIG", "DeltaConfig", "backward_pass", "boundary_states", "decay_grads", "delta_rule_triton",
           "entering_grad", "row_summary", "segment_summaries", "setup", "with_config", "fused_config", "FUSED"]
