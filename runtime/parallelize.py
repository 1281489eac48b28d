"""Model → this rank's pipeline stage, under its sequence-parallel split (torchtitan's "parallelize")."""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from models import LinearLlama, ModelConfig
from parallel.context import SINGLE, SequenceParallel
from parallel.pipeline import partition
from runtime.config import JobConfig
from runtime.memory import resolve_remat_policy
from runtime.mesh import ParallelMesh


def layer_costs_by_params(cfg: ModelConfig) -> list[float]:
    """Parameters per layer; the embedding is charged to layer 0, final norm + head to the last layer."""
    with torch.device("meta"):
        model = LinearLlama(cfg)
    costs = [float(sum(p.numel() for p in block.parameters())) for block in model.layers.values()]
    costs[0] += model.embed.weight.numel()
    costs[-1] += model.head.weight.numel() + model.norm.weight.numel()
    return costs


def layer_costs_by_time(
    cfg: ModelConfig, tokens: tuple[int, int], device: torch.device, repeats: int = 3
) -> list[float]:
    """Measured forward+backward seconds per layer on one micro-batch (one measurement per layer kind),
    embedding and head charged to the first and last layer. Run on one rank and broadcast."""
    torch.manual_seed(0)
    small = ModelConfig(**{**cfg.__dict__, "n_layers": len(set(cfg.layer_kinds())), "layout": "".join(
        dict.fromkeys(cfg.layer_kinds()))})
    model = LinearLlama(small).to(device)
    B, T = tokens
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def timed(fn) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    h = torch.randn(B, T, cfg.dim, device=device, requires_grad=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    per_kind = {}
    with autocast:
        for block in model.layers.values():
            per_kind[block.kind] = timed(lambda b=block: b(h).sum().backward())
        embed = timed(lambda: model.embed(ids).sum().backward())
        head = timed(lambda: model.head(model.norm(h)).float().sum().backward())
    costs = [per_kind[k] for k in cfg.layer_kinds()]
    costs[0] += embed
    costs[-1] += head
    return costs


def stage_ranges(cfg: JobConfig, mesh: ParallelMesh) -> list[tuple[int, int]]:
    """[start, end) layers of every pipeline stage, identical on all ranks."""
    pp = cfg.parallel.pp
    if cfg.parallel.balance == "time":
        costs = torch.zeros(cfg.model.n_layers, dtype=torch.float64)
        if mesh.rank == 0:
            mb = cfg.train.batch_size // mesh.size("dp") // cfg.parallel.microbatches
            costs = torch.tensor(layer_costs_by_time(cfg.model, (mb, cfg.train.seq_len // mesh.size("sp")),
                                                     mesh.device), dtype=torch.float64)
        costs = costs.to(mesh.device)
        dist.broadcast(costs, src=0)
        costs = costs.cpu().tolist()
    else:
        costs = layer_costs_by_params(cfg.model)
    return partition(costs, pp)


def sharded(cfg: JobConfig, mesh: ParallelMesh) -> bool:
    """Whether this job shards model state (parallel.shard ≠ none over more than one dp × sp rank, or offloaded)."""
    return cfg.parallel.shard != "none" and (mesh.size("dp") * mesh.size("sp") > 1 or cfg.parallel.offload_optimizer)


def build_stage_model(cfg: JobConfig, mesh: ParallelMesh) -> tuple[LinearLlama, list[tuple[int, int]]]:
    """This rank's stage of the model: built on meta, pruned to its layers, materialised and
    initialised on its device exactly as the whole model would be (per-parameter seeds). Under sharded
    model state it stays on meta: `shard_stage` shards it, then materialises only this rank's shards."""
    ranges = stage_ranges(cfg, mesh)
    stage, pp = mesh.coord("pp"), mesh.size("pp")
    with torch.device("meta"):
        model = LinearLlama(cfg.model)
    model.keep_stage(range(*ranges[stage]), first=stage == 0, last=stage == pp - 1)
    if sharded(cfg, mesh):
        model.to(getattr(torch, cfg.train.dtype))  # still on meta; a tied head is still the embedding
    else:
        model.to_empty(device=mesh.device)
        model.tie_weights()
        model.reset_parameters(cfg.train.seed)
        model.to(getattr(torch, cfg.train.dtype))
    capacity = torch.cuda.get_device_properties(mesh.device).total_memory / 2**30 if mesh.device.type == "cuda" \
        else None
    model.remat_policy = resolve_remat_policy(cfg, mesh.world, capacity)
    for block in model.layers.values():
        block.mlp_tile = cfg.train.mlp_tile
    if cfg.train.compile and mesh.device.type == "cuda":
        for block in model.layers.values():
            block.compile_token_wise()
    sp = mesh.size("sp")
    model.set_sequence_parallel(
        SequenceParallel(mesh.group("sp"), cfg.parallel.layout, cfg.parallel.sp_attention) if sp > 1 else SINGLE
    )
    return model, ranges


def tied_embedding_group(cfg: JobConfig, mesh: ParallelMesh) -> dist.ProcessGroup | None:
    """With pp > 1 and tied embeddings, the first stage's embedding and the last stage's head hold
    copies of one weight; their gradients are summed over this group (first + last stage of this
    (dp, sp) coordinate). Every rank takes part in creating every such group."""
    pp = mesh.size("pp")
    if pp == 1 or not cfg.model.tie_embeddings:
        return None
    ranks = mesh.mesh.mesh  # [dp, pp, sp] global ranks
    mine = None
    for d in range(ranks.shape[0]):
        for s in range(ranks.shape[2]):
            members = [int(ranks[d, 0, s]), int(ranks[d, pp - 1, s])]
            group = dist.new_group(members, timeout=timedelta(seconds=cfg.parallel.timeout_s))
            if mesh.rank in members:
                mine = group
    return mine


def shard_stage(stage: nn.Module, model: LinearLlama, cfg: JobConfig, mesh: ParallelMesh) -> nn.Module:
    """FSDP2 over the dp × sp ranks of this pipeline stage (DESIGN §10), torchtitan-style: one FSDP group per
    block, then the stage module (what the pipeline calls, wrapping `model`) as the root, holding what is
    left — embedding, final norm, head (one group, so a tied embedding/head stays one parameter). Returns
    `stage`, now sharded, with `model` materialised shard by shard.

    - Mesh: `ParallelMesh.replica_mesh`, the stage's dp × sp ranks flattened to one dimension, so
      parameters, gradients and AdamW state are split dp·sp ways (HSDP over a 2-D mesh would shard over sp
      only and all-reduce over dp, keeping dp copies).
    - Gradients: the loss is already divided by the global token count, so the step's gradient is the SUM
      over dp × sp: the divide factor is 1 and the collectives use plain SUM (gloo has no pre-multiplied
      sum) — one reduce-scatter gives the sum over sp and over dp.
    - Precision: on CUDA (train.dtype float32) bf16 parameters for compute and all-gathers, fp32
      reduce-scatters and fp32 sharded master weights; on CPU the stored dtype throughout.
    - parallel.shard=full re-gathers each block in backward (reshard after forward, ZeRO-3); optimizer
      keeps the gathered blocks from forward to backward (one all-gather per block and micro-batch).
      The root is never resharded after forward (FSDP2's rule for the root), so the loss may use the
      head's weight after the stage's forward.
    - Each block prefetches the next block's all-gather in forward; FSDP2 prefetches in backward itself.
    - parallel.offload_optimizer: the shards (fp32 weights, gradients, hence AdamW state) live in CPU memory
      (FSDP2 CPUOffloadPolicy, pinned on CUDA); buffers stay on the device.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from parallel.sharding import local, local_rows

    replicas = mesh.replica_mesh()
    # streamed windows pass fp32 carried states into the blocks: FSDP must not cast them to bf16
    cast = cfg.train.window == 0
    if mesh.device.type == "cuda" and cfg.train.dtype == "float32":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=cast)
    else:
        policy = MixedPrecisionPolicy(cast_forward_inputs=cast)
    offload = cfg.parallel.offload_optimizer
    offload_policy = CPUOffloadPolicy(pin_memory=mesh.device.type == "cuda") if offload else OffloadPolicy()
    blocks = list(model.layers.values())
    for block in blocks:
        fully_shard(block, mesh=replicas, mp_policy=policy, offload_policy=offload_policy,
                    reshard_after_forward=cfg.parallel.shard == "full")
    fully_shard(stage, mesh=replicas, mp_policy=policy, offload_policy=offload_policy)
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])
    for module in stage.modules():
        if isinstance(module, FSDPModule):  # set_gradient_divide_factor's older name on torch < 2.8
            (getattr(module, "set_gradient_divide_factor", None) or module.set_reduce_scatter_divide_factor)(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    # materialise: every parameter whole, one at a time, initialised as the unsharded model would be; this
    # rank keeps its rows (peak: one extra parameter, not the stage)
    stage.to_empty(device="cpu" if offload else mesh.device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            whole = model.init_parameter_(name, torch.empty(p.shape, device=mesh.device), cfg.train.seed)
            start, stop = local_rows(p)
            local(p).copy_(whole[start:stop])
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(mesh.device)
    return stage
