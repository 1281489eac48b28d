"""Peak memory per rank of a training step, estimated before any process starts (DESIGN §9).

On CUDA (fp32 parameters, bf16 autocast), for the busiest pipeline stage with P parameters, L layers,
T tokens per micro-batch stored (all M micro-batches of a replica under GPipe), width d, FFN width f:

    state        16·P                                    fp32 parameter, gradient, two AdamW moments
    stored       L·T_stored·d·4                          layer inputs kept for recomputation (fp32 stream)
                 (without re-materialization: every layer's internals, ≈ L·T·ACTIVATION·(4d + 3f)·2)
    transient    ACTIVATION·T_layer·(4d + 3f)·2          one layer's internals, recomputed, and its backward
    windows      W·L·H·K·V·4                             carried states of a streamed sequence

ACTIVATION = 2.2 is fitted to the measured `1b` step on an H200 (44.5 GiB at 128K tokens with remat always,
32.4 GiB at 1M with 64K windows; benchmarks/RESULTS.md); the estimate is within ±15 % of those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.config import JobConfig
from runtime.errors import ConfigError

ACTIVATION = 2.2  # bytes of live internals per token and layer, in units of (4d + 3f)·2 (fitted, see above)
MARGIN = 0.15  # the estimate's stated accuracy


@dataclass
class MemoryEstimate:
    state_gib: float
    stored_gib: float
    transient_gib: float

    @property
    def total_gib(self) -> float:
        return self.state_gib + self.stored_gib + self.transient_gib


def estimate_memory(cfg: JobConfig, n_params_stage: int, dp: int, pp: int, sp: int) -> MemoryEstimate:
    """The per-rank peak of `cfg`'s step on its busiest stage (bf16 autocast on CUDA)."""
    m, t, par = cfg.model, cfg.train, cfg.parallel
    layers = -(-m.n_layers // pp)
    rows = t.batch_size // dp
    local = t.seq_len // sp
    per_token_layer = ACTIVATION * (4 * m.dim + 3 * m.ffn_dim) * 2
    window = t.window or local
    layer_tokens = min(window, local) * rows // par.microbatches
    if par.remat == "never":
        stored = layers * rows * min(window, local) * per_token_layer
    else:
        stored = layers * rows * min(window, local) * m.dim * 4
    windows = -(-local // window) if t.window else 0
    stored += windows * layers * rows * m.n_heads * m.head_dim**2 * 4
    transient = per_token_layer * layer_tokens
    gib = 2.0**30
    return MemoryEstimate(16 * n_params_stage / gib, stored / gib, transient / gib)


def check_fits(cfg: JobConfig, world: int) -> MemoryEstimate | None:
    """Refuse (one line) a CUDA job whose estimate, less its margin, exceeds the device's memory."""
    if not torch.cuda.is_available() or cfg.run.skip_memory_check:
        return None
    from models import LinearLlama, num_parameters
    from runtime.mesh import resolve_dims

    dp, pp, sp = resolve_dims(world, cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.sp)
    with torch.device("meta"):
        n_params = num_parameters(LinearLlama(cfg.model))
    est = estimate_memory(cfg, n_params // pp + (cfg.model.vocab_size * cfg.model.dim if pp > 1 else 0), dp, pp, sp)
    capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
    if est.total_gib * (1 - MARGIN) > capacity:
        raise ConfigError(
            f"this job needs about {est.total_gib:.0f} GiB per GPU (state {est.state_gib:.0f}, stored activations "
            f"{est.stored_gib:.0f}, one layer {est.transient_gib:.0f}; ±{MARGIN:.0%}) but the GPU has "
            f"{capacity:.0f} GiB; set train.window (pure linear layouts), parallel.remat=always, more sp or pp — "
            f"or run anyway with --set run.skip_memory_check=true")
    return est
