"""The ("dp", "pp", "sp") device mesh (DESIGN §6), sp innermost.

`init_distributed` joins whatever process group the launcher prepared — an already
initialized one (Ray Train, a test harness), the torchrun / Ray environment variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), or a world of one — and
`build_mesh` lays dp × pp × sp over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from runtime.errors import ConfigError

AXES = ("dp", "pp", "sp")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None, timeout_s: float | None = None) -> torch.device:
    """Make sure a default process group exists; returns this rank's device. `timeout_s` bounds every
    collective and P2P of a group created here (a launcher that made the group sets its own)."""
    device = device or default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    if backend == "nccl":  # a collective that times out raises (and tears the process down) instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timeout)
    else:  # a world of one: no rendezvous needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device


def resolve_dims(world: int, dp: int | None, pp: int, sp: int) -> tuple[int, int, int]:
    """(dp, pp, sp) with dp defaulting to world / (pp·sp); a ConfigError when they do not multiply to world."""
    for name, n in (("pp", pp), ("sp", sp), ("dp", dp)):
        if n is not None and n < 1:
            raise ConfigError(f"parallel.{name}={n} must be ≥ 1")
    if dp is None:
        if world % (pp * sp):
            raise ConfigError(
                f"pp·sp = {pp}·{sp} = {pp * sp} does not divide the world of {world} processes; "
                f"launch a multiple of {pp * sp} processes or change parallel.pp / parallel.sp"
            )
        dp = world // (pp * sp)
    if dp * pp * sp != world:
        raise ConfigError(
            f"dp·pp·sp = {dp}·{pp}·{sp} = {dp * pp * sp} but the world has {world} processes; "
            f"launch {dp * pp * sp} processes or set parallel.dp={max(world // (pp * sp), 1)}"
        )
    return dp, pp, sp


@dataclass
class ParallelMesh:
    """The device mesh plus the facts every layer asks about: group, size and coordinate per axis."""

    mesh: DeviceMesh
    device: torch.device
    timeout_s: float | None = None
    _replicas: DeviceMesh | None = field(default=None, init=False, repr=False)

    def replica_mesh(self) -> DeviceMesh:
        """The dp × sp ranks of this rank's pipeline stage as one flat mesh dimension "dp_sp" (index
        dp·sp_size + sp): the ranks that hold the same parameters, over which sharded model state is split.
        Collective on first use (every rank creates every stage's group); cached."""
        if self._replicas is None:
            dp, pp, sp = (self.size(axis) for axis in AXES)
            grid = self.mesh.mesh.permute(1, 0, 2).reshape(pp, dp * sp)  # [stage, replica] global ranks
            self._replicas = DeviceMesh(self.device.type, grid, mesh_dim_names=("pp", "dp_sp"))["dp_sp"]
            if self.timeout_s:
                set_timeout(self._replicas.get_group(), self.timeout_s)
        return self._replicas

    def size(self, axis: str) -> int:
        return self.mesh.size(AXES.index(axis))

    def coord(self, axis: str) -> int:
        return self.mesh.get_local_rank(axis)

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.mesh.get_group(axis)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return dist.get_world_size()


def build_mesh(dp: int | None = None, pp: int = 1, sp: int = 1, device: torch.device | None = None,
               timeout_s: float | None = None) -> ParallelMesh:
    """Join or create the process group and lay the ("dp", "pp", "sp") mesh over it."""
    device = init_distributed(device, timeout_s)
    dp, pp, sp = resolve_dims(dist.get_world_size(), dp, pp, sp)
    mesh = init_device_mesh(device.type, (dp, pp, sp), mesh_dim_names=AXES)
    if timeout_s:  # also a group the launcher made (Ray, torchrun's elastic agent) and the mesh's subgroups
        for group in {None: None, **{axis: mesh.get_group(axis) for axis in AXES}}.values():
            set_timeout(group, timeout_s)
    return ParallelMesh(mesh, device, timeout_s)


def set_timeout(group: dist.ProcessGroup | None, timeout_s: float) -> None:
    """Bound every collective and P2P on `group` (None: the default group) by `timeout_s` seconds."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=timeout_s), group)
