"""`longtrain sweep --launcher ray` on a Ray cluster of two simulated CPU nodes: a point of dp = 2 × sp = 2
runs with the two ranks of each sp group on one node and the two sp groups on different nodes."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from launch import sweep
from runtime.mesh import build_mesh

DP, PP, SP = 2, 1, 2

GRID = f"""
[sweep]
warmup_steps = 1
steps = 2
timeout_s = 300

[base]
"model.preset" = "tiny"
"parallel.dp" = {DP}
"parallel.pp" = {PP}
"parallel.microbatches" = 1
"train.batch_size" = 2
"train.seq_len" = 32

[axes]
"parallel.sp" = [{SP}]
"""


@pytest.mark.slow
def test_sp_groups_stay_inside_one_node(tmp_path, monkeypatch) -> None:
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    record = tmp_path / "placement"
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 shared cores, 4 ranks
    monkeypatch.setenv("LONGTRAIN_PLACEMENT_RECORD", str(record))  # the workers' debug record (launch.ray_train)
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        grid = tmp_path / "grid.toml"
        grid.write_text(GRID)
        rows = sweep.run_sweep(str(grid), out=str(tmp_path / "sweep"), launcher="ray", address=cluster.address,
                               gpus_per_worker=0.0, echo=lambda line: None)
        nodes = {node.node_id for node in cluster.list_all_nodes()}
    finally:
        cluster.shutdown()
    (row,) = rows
    assert row["status"] == "ok", (row["cause"], row.get("log"))
    assert row["world"] == DP * PP * SP and (row["parallel.dp"], row["parallel.sp"]) == (DP, SP)
    placed = {r["rank"]: r for r in (json.loads(p.read_text()) for p in record.glob("rank_*.json"))}
    assert sorted(placed) == list(range(DP * PP * SP))
    assert all(r["torch_rank"] == k for k, r in placed.items())  # the mesh is laid over Ray's world ranks
    assert {r["node_id"] for r in placed.values()} == nodes  # both simulated nodes hold workers
    # (Ray numbers local ranks and node ranks by IP, which the simulated nodes share: node ids tell them apart)
    sp_groups = _sp_groups(DP * PP * SP)
    assert len(sp_groups) == DP * PP
    group_nodes = [{placed[k]["node_id"] for k in group} for group in sp_groups]
    assert all(len(n) == 1 for n in group_nodes), (sp_groups, placed)  # every sp group inside one node
    assert len(set.union(*group_nodes)) == len(sp_groups), (sp_groups, placed)  # and the two on different nodes


def _sp_groups(world: int) -> list[tuple[int, ...]]:
    """The sp groups runtime.mesh lays over a world of `world` ranks (each rank's view, on a fake process group)."""
    groups = set()
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            mesh = build_mesh(DP, PP, SP)
            groups.add(tuple(dist.get_process_group_ranks(mesh.mesh.get_group("sp"))))
        finally:
            dist.destroy_process_group()
    return sorted(groups)
