"""Peak memory per rank of a training step, estimated before any process starts (DESIGN §9).

On CUDA (fp32 parameters, bf16 autocast: c = 2 bytes; without autocast c is the parameters' width), for the
busiest pipeline stage with P parameters, L layers, T tokens per micro-batch stored (all M micro-batches of a
replica under GPipe), width d, FFN width f, widening width w (q/k/v/gate and gate/up outputs, `widening_width`):

    state        16·P                                    fp32 parameter, gradient, two AdamW moments
                 (parallel.shard over N = dp·sp ranks: `state_bytes`, 16·P/N plus the gathered working copies;
                 exactly, per tensor: `stage_state`, rank 0's ⌈rows / N⌉-row dim-0 shards, the largest)
    stored       L·T_stored·d·c                          layer inputs kept for recomputation (the residual stream)
                 (parallel.remat_policy=selective: + L·T_stored·w·c, the widening matmuls' outputs)
                 (without re-materialization: every layer's saved internals, ≈ L·T·NEVER_STORED·(4d + 3f)·c;
                 remat=except_last: so for the last of M micro-batches, 1/M of T_stored — all of it when M = 1)
    transient    ACTIVATION·T_layer·(4d + 3f)·c          one layer's internals, recomputed, and its backward
                 (selective: less the kept widening outputs, T_layer·w·c)
                 (train.mlp_tile = N < T_layer, full or no recomputation: less TILED_MLP_SAVING·(T_layer − N)·f·c)
                 + LOSS_RESIDUE·min(loss_chunk, T)·vocab  what of the chunked loss is still live in backward
    windows      W·L·H·K·V·4                             carried states of a streamed sequence
    absent       −(gradients not yet allocated when the activations peak, at the start of backward: all but the
                 root's and the first block's) — none with several micro-batches or windows, which accumulate

peak = state + max(0, stored + windows + transient − absent). ACTIVATION = 2.07 and LOSS_RESIDUE = 6.5 are
fitted to the `1b` step on an H200 (17.9 / 34.0 GiB at 32K / 128K tokens, remat always; benchmarks/RESULTS.md,
2026-12-02); with them the estimate is within 3 % of all ten measured peaks (full and selective recomputation,
32K–4M tokens, windows of 16K and 64K: tests/runtime/test_memory.py). NEVER_STORED = 1.5 is fitted to 1M tokens
in 16K / 32K windows without recomputation (39.5 / 60.4 GiB, tenth session; both within 5 %).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from parallel.sharding import shard_rows
from runtime.config import JobConfig
from runtime.errors import ConfigError

ACTIVATION = 2.07  # live internals per token and layer, in units of (4d + 3f)·compute bytes (fitted, see above)
LOSS_RESIDUE = 6.5  # bytes per token and vocabulary entry of a loss chunk still live in backward (fitted, above)
NEVER_STORED = 1.5  # saved internals per token and layer without re-materialization, units as ACTIVATION (fitted)
# A block's saved internals per token relative to a linear-attention (L) block's, by layer kind: the slope over T of
# the bytes autograd saves for one block of the 1b / gdn-1b / mamba2-1b presets (Triton kernels under the
# interpreter, T = 128 → 256, one Block's saved storages counted through saved_tensors_hooks): L 41.0K, D 51.4K,
# M 65.9K elements per token (M's since kernels.ssd_inputs and kernels.gated_norm; 70.3K before) (L's, 1.54·(4d + 3f),
# agrees with the GPU-fitted NEVER_STORED). Softmax (A) blocks are taken as L's. Scales NEVER_STORED and ACTIVATION
# for D and M. Since the M mixer hands B and C to the kernels per group (only [B, T, G, N] kept for backward) the
# same count gives M 49.8K (1.22); M's 1.45 is fitted to that code's H200 step at 128K (full recomputation with
# activation offload, 33.9 GiB, seventeenth session; 64K windows 29.4 GiB measured, 30.2 planned): the count misses
# the backward's transients.
KIND_INTERNALS = {"L": 1.0, "A": 1.0, "D": 1.25, "M": 1.45}
# What train.mlp_tile = N (the SwiGLU in tiles of N tokens, parallel.tiling) takes off a layer's transient, per token
# beyond N and FFN channel, in compute bytes, by the kind of the widest block: the SwiGLU's internals and their
# gradients are a tile's, but the layer's peak only drops to where its mixer's backward peaks. Measured on an H200
# at 128K under full recomputation (benchmarks/RESULTS.md, seventeenth session): 1b (L, A) 32.5 → 26.4 GiB, 4.65;
# gdn-1b (D, with activation offload) 31.9 → 28.9 GiB, 2.29; mamba2-1b (M) 33.9 → 33.9 GiB, 0 (its mixer's backward
# is the peak).
TILED_MLP_SAVING = {"L": 4.65, "A": 4.65, "D": 2.29, "M": 0.0}
MARGIN = 0.15  # the estimate's stated accuracy


@dataclass
class MemoryEstimate:
    state_gib: float
    stored_gib: float
    transient_gib: float
    absent_gib: float = 0.0  # gradients in state_gib not yet allocated when the activations peak

    @property
    def total_gib(self) -> float:
        return self.state_gib + max(0.0, self.stored_gib + self.transient_gib - self.absent_gib)


def state_bytes(n_params_stage: int, replicas: int, shard: str, block_params: int = 0, root_params: int = 0,
                microbatches: int = 1, offload: bool = False) -> float:
    """Bytes per rank of a stage's model state on CUDA (fp32 master weights, bf16 compute copies):

    - none (or one replica): 16 per parameter — fp32 parameter, gradient and two AdamW moments;
    - sharded over N = dp·sp ranks: 16/N per parameter, plus what is gathered while the step runs — bf16
      parameters (optimizer: the whole stage, from forward to backward; full: the root's embedding / head
      and two blocks, the one running and the one prefetched) and the fp32 gradients of one block before its
      reduce-scatter; with several micro-batches the stage's gradients accumulate unsharded in fp32 until the
      step's single reduce-scatter (4 per parameter). `offload`: the 16/N live in CPU memory instead."""
    if shard == "none" or (replicas == 1 and not offload):
        return 16.0 * n_params_stage
    gathered = n_params_stage if shard == "optimizer" else root_params + 2 * block_params
    accumulate = n_params_stage if microbatches > 1 else block_params
    return (0.0 if offload else 16.0 * n_params_stage / replicas) + 2.0 * gathered + 4.0 * accumulate


def widening_width(cfg: JobConfig, kind: str) -> int:
    """Output width of the matmuls of one block that widen the stream (what `parallel.remat_policy=selective`
    keeps, `models.llama._keep_widening_matmuls`): q/k/v(/gate) as one GEMM in a linear layer, SwiGLU's gate/up
    in every block; Mamba-2 / Gated DeltaNet in-projections taken as 4d."""
    m = cfg.model
    mixer = {"L": 3 * m.dim + (m.n_heads if m.gate else 0), "A": 0}.get(kind, 4 * m.dim)
    return mixer + 2 * m.ffn_dim


def activation_bytes(cfg: JobConfig, dp: int, pp: int, sp: int, compute_bytes: int = 2) -> dict[str, float]:
    """The activation terms of the estimate, in bytes per rank of the busiest stage: `stored` (layer inputs, or
    every layer's internals without re-materialization), `windows` (carried states of a streamed sequence) and
    `layer` (one layer's internals, recomputed, and its backward, with the loss's residue: the fitted
    transient). `compute_bytes`: the width of the residual stream and of the layers' internals (2 under bf16
    autocast on CUDA; the parameters' width without autocast, as on a CPU)."""
    m, t, par = cfg.model, cfg.train, cfg.parallel
    layers = -(-m.n_layers // pp)
    rows = t.batch_size // dp
    local = t.seq_len // sp
    kinds = m.layer_kinds()
    widest_internals = max(KIND_INTERNALS.get(k, 1.0) for k in kinds)  # the transient: one layer at a time
    mean_internals = sum(KIND_INTERNALS.get(k, 1.0) for k in kinds) / len(kinds)
    per_token_layer = ACTIVATION * widest_internals * (4 * m.dim + 3 * m.ffn_dim) * compute_bytes
    window = rank_window(cfg, sp)
    kept = layers * rows * window  # token-layers whose input (or internals) stay for backward
    layer_tokens = window * rows // par.microbatches
    widest = max(widening_width(cfg, k) for k in kinds)
    layer = per_token_layer * layer_tokens
    # the share of the kept tokens whose layers are not re-materialized (parallel.pipeline.recompute_plan):
    # except_last keeps every internal of the last micro-batch — of all of them with one micro-batch
    plain = {"never": 1.0, "always": 0.0, "except_last": 1.0 / par.microbatches}[par.remat]
    stored = kept * plain * NEVER_STORED * mean_internals * (4 * m.dim + 3 * m.ffn_dim) * compute_bytes
    if plain < 1:
        stored += kept * (1 - plain) * m.dim * compute_bytes
        if par.remat_policy == "selective":  # the widening matmuls' outputs, kept; not recomputed in backward
            stored += kept * (1 - plain) * widest * compute_bytes
            layer -= layer_tokens * widest * compute_bytes
    tile_tokens = t.mlp_tile * rows // par.microbatches
    if mlp_tiled(cfg, sp) and par.remat_policy != "selective":
        # the SwiGLU runs in tiles (parallel.tiling): its internals are a tile's; without recomputation its
        # forward keeps only its input, not its internals (selective recomputation: modelled as untiled)
        saving = TILED_MLP_SAVING[max(kinds, key=lambda k: KIND_INTERNALS.get(k, 1.0))]
        layer -= saving * m.ffn_dim * compute_bytes * (layer_tokens - tile_tokens)
        stored -= kept * plain * NEVER_STORED * 3 * m.ffn_dim * compute_bytes
    n_windows = -(-local // window) if t.window else 0  # = seq_len / train.window
    windows = n_windows * layers * rows * m.n_heads * m.head_dim**2 * 4
    loss_tokens = min(t.loss_chunk, rows * local // par.microbatches) if t.loss_chunk else rows * local
    layer += LOSS_RESIDUE * loss_tokens * m.vocab_size
    return dict(stored=float(stored), windows=float(windows), layer=float(layer))


def rank_window(cfg: JobConfig, sp: int) -> int:
    """Tokens of one sequence a rank runs per layer call: its shard of a streamed window (train.window is global,
    each window sharded over the sp ranks, as the Trainer runs it), else its whole local sequence."""
    local = cfg.train.seq_len // sp
    return min(max(1, cfg.train.window // sp), local) if cfg.train.window else local


def mlp_tiled(cfg: JobConfig, sp: int) -> bool:
    """Whether train.mlp_tile cuts the SwiGLU of a layer call into tiles (fewer tokens per tile than per call)."""
    return 0 < cfg.train.mlp_tile < rank_window(cfg, sp)


def gradients_absent(cfg: JobConfig, grads: float, grads_first_block: float) -> float:
    """Bytes of the stage's gradients not yet allocated when its activations peak (the start of backward: only
    the root's and the first block's exist) — none missing when several micro-batches or windows accumulate
    them (after the first backward every gradient is live)."""
    if cfg.parallel.microbatches > 1 or cfg.train.window and cfg.train.window < cfg.train.seq_len:
        return 0.0
    return max(0.0, grads - grads_first_block)


def estimate_memory(cfg: JobConfig, n_params_stage: int, dp: int, pp: int, sp: int, block_params: int = 0,
                    root_params: int = 0) -> MemoryEstimate:
    """The per-rank peak of `cfg`'s step on its busiest stage (bf16 autocast on CUDA); `block_params` (the
    largest block) and `root_params` (embedding, final norm, head) refine the state of a sharded stage."""
    act = activation_bytes(cfg, dp, pp, sp)
    par = cfg.parallel
    state = state_bytes(n_params_stage, dp * sp, par.shard, block_params, root_params, par.microbatches,
                        par.offload_optimizer)
    replicas = dp * sp if par.shard != "none" else 1
    absent = 0.0 if par.offload_optimizer else gradients_absent(cfg, 4.0 * n_params_stage / replicas,
                                                               4.0 * (block_params + root_params) / replicas)
    gib = 2.0**30
    return MemoryEstimate(state / gib, (act["stored"] + act["windows"]) / gib, act["layer"] / gib, absent / gib)


SHARD_MODES = ("none", "optimizer", "full")
"""The shard modes `stage_state` and the cost model (`longtrain plan`) predict (parallel.shard): none, every rank
of a stage holding all of its stage's state; optimizer and full, FSDP2 over the stage's N = dp·sp ranks
(runtime.parallelize.shard_stage), each rank holding its dim-0 rows of every parameter, gradient and AdamW
moment. Both sharded modes hold the same state between steps; they differ in what is gathered while the step
runs (`state_bytes`, and the all-gathers `longtrain plan` times)."""


@dataclass
class StageState:
    """Bytes one rank of a pipeline stage allocates for its model state, and the tensors behind them."""

    params: int
    grads: int
    optimizer: int
    tensors: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


@functools.lru_cache(maxsize=32)
def stage_shapes(model_key: tuple, pp: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per pipeline stage, the shapes of its parameter tensors (a tied weight once per stage)."""
    from models import LinearLlama, ModelConfig
    from parallel.pipeline import partition
    from runtime.parallelize import layer_costs_by_params

    mcfg = ModelConfig(*model_key)
    out = []
    for stage, (start, end) in enumerate(partition(layer_costs_by_params(mcfg), pp)):
        with torch.device("meta"):
            model = LinearLlama(mcfg)
        model.keep_stage(range(start, end), first=stage == 0, last=stage == pp - 1)
        tensors = {id(p): p for p in model.parameters()}.values()  # tied weights once (both ends here: pp = 1)
        out.append(tuple(tuple(p.shape) for p in tensors))
    return tuple(out)


def local_numel(shape: tuple[int, ...], replicas: int, index: int = 0) -> int:
    """Elements shard `index` of `replicas` holds of a tensor of `shape` sharded on dim 0 the FSDP2 way
    (`torch.chunk`: ⌈rows / N⌉ rows each, the trailing ranks fewer or none; parallel.sharding.shard_rows)."""
    if not shape:
        return 1
    start, stop = shard_rows(shape[0], replicas, index)
    return (stop - start) * math.prod(shape[1:])


def stage_state(cfg: JobConfig, pp: int, shard: str = "none", replicas: int = 1) -> list[StageState]:
    """Per pipeline stage (cut by parameter count, `parallel.balance=params`): the bytes of the parameters rank 0
    of the stage holds (a tied embedding/head weight twice when pp > 1: both end stages keep a copy), their
    gradients (same dtype) and AdamW's state (two moments per parameter and one fp32 step count per tensor).

    shard=optimizer | full over `replicas` = N = dp·sp ranks (more than one): every tensor is cut on dim 0
    into ⌈rows / N⌉-row shards, so rank 0 holds the most (a full shard of every tensor; the last ranks may
    hold fewer rows or none) and its numbers are the stage's per-GPU maximum. Gradients and moments have the
    local shard's size; the gathered bf16 working copies are transients (`state_bytes`, `longtrain plan`)."""
    if shard not in SHARD_MODES:
        raise ConfigError(f"shard mode {shard!r} is not modelled by the plan (see `longtrain presets`); "
                          f"use one of {list(SHARD_MODES)}")
    n = replicas if shard != "none" else 1
    width = torch.finfo(getattr(torch, cfg.train.dtype)).bits // 8
    out = []
    for shapes in stage_shapes(dataclasses.astuple(cfg.model), pp):
        numel = sum(local_numel(s, n) for s in shapes)
        out.append(StageState(params=numel * width, grads=numel * width, optimizer=2 * numel * width + 4 * len(shapes),
                              tensors=len(shapes)))
    return out


def job_estimate(cfg: JobConfig, world: int) -> MemoryEstimate:
    """`estimate_memory` of `cfg` on `world` ranks, with the stage's parameter counts taken from the model."""
    from models import LinearLlama, num_parameters
    from runtime.mesh import resolve_dims

    dp, pp, sp = resolve_dims(world, cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.sp)
    with torch.device("meta"):
        model = LinearLlama(cfg.model)
    n_params = num_parameters(model)
    block = max(num_parameters(b) for b in model.layers.values())
    root = cfg.model.vocab_size * cfg.model.dim * (2 if pp == 1 and not cfg.model.tie_embeddings else 1)
    return estimate_memory(cfg, n_params // pp + (cfg.model.vocab_size * cfg.model.dim if pp > 1 else 0), dp, pp,
                           sp, block, root)


def resolve_remat_policy(cfg: JobConfig, world: int, capacity_gib: float | None) -> str:
    """parallel.remat_policy=auto as what it means for this job on GPUs of `capacity_gib` (None: not CUDA):
    selective — the faster recompute (1.12× the tokens/s of full at 128K on one H200) — when re-materialization
    is on, no train.window streams the sequence (windows are chosen to save memory), and the estimate with it,
    plus its margin, fits; full otherwise — and full for stacks with Mamba-2 (M) blocks, whose selective peak the
    estimate does not cover yet (`mamba2-1b` at 128K ran out of an H200's memory where 114 GiB was estimated; an
    explicit remat_policy=selective still runs)."""
    policy = cfg.parallel.remat_policy
    if policy != "auto":
        return policy
    if capacity_gib is None or cfg.parallel.remat == "never" or cfg.train.window or "M" in cfg.model.layer_kinds():
        return "full"
    selective = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, remat_policy="selective"))
    return "selective" if job_estimate(selective, world).total_gib * (1 + MARGIN) <= capacity_gib else "full"


def check_fits(cfg: JobConfig, world: int) -> MemoryEstimate | None:
    """Refuse (one line) a CUDA job whose estimate, less its margin, exceeds the device's memory."""
    if not torch.cuda.is_available() or cfg.run.skip_memory_check:
        return None
    capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
    policy = resolve_remat_policy(cfg, world, capacity)
    est = job_estimate(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, remat_policy=policy)),
                       world)
    if est.total_gib * (1 - MARGIN) > capacity:
        raise ConfigError(
            f"this job needs about {est.total_gib:.0f} GiB per GPU (state {est.state_gib:.0f}, stored activations "
            f"{est.stored_gib:.0f}, one layer {est.transient_gib:.0f}; ±{MARGIN:.0%}) but the GPU has "
            f"{capacity:.0f} GiB; set parallel.shard=full (with dp·sp > 1), train.window (layouts of L, M and D "
            f"layers), parallel.remat=always, train.mlp_tile=16384, more sp or pp — "
            f"or run anyway with --set run.skip_memory_check=true")
    return est
