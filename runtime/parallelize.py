"""Model → this rank's pipeline stage, under its sequence-parallel split (torchtitan's "parallelize")."""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from models import LinearLlama, ModelConfig
from parallel.context import SINGLE, SequenceParallel
from parallel.pipeline import partition
from runtime.config import JobConfig
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


def build_stage_model(cfg: JobConfig, mesh: ParallelMesh) -> tuple[LinearLlama, list[tuple[int, int]]]:
    """This rank's stage of the model: built on meta, pruned to its layers, materialised and
    initialised on its device exactly as the whole model would be (per-parameter seeds)."""
    ranges = stage_ranges(cfg, mesh)
    stage, pp = mesh.coord("pp"), mesh.size("pp")
    with torch.device("meta"):
        model = LinearLlama(cfg.model)
    model.keep_stage(range(*ranges[stage]), first=stage == 0, last=stage == pp - 1)
    model.to_empty(device=mesh.device)
    model.tie_weights()
    model.reset_parameters(cfg.train.seed)
    model.to(getattr(torch, cfg.train.dtype))
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
