"""Activation offload (parallel/offload.py) changes no number: losses and gradients bitwise equal to the step
without it, through the trainer (remat always / never, streaming windows) and for the cases its bookkeeping
must get right (tensors saved twice, views, checkpoint's recompute, tiles, prefetch, the buffer pool)."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import rel_err, run_distributed
from torch.utils.checkpoint import checkpoint

from models import LinearLlama, preset
from parallel.offload import ActivationOffloader

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only contend (seconds on a loaded machine instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eager(device="cpu", **kw) -> ActivationOffloader:
    """Every tensor moved (tiny sizes), only the newest kept in flight, one tensor fetched ahead."""
    return ActivationOffloader(device, **{"min_bytes": 0, "inflight_bytes": 0, "prefetch_bytes": 0, **kw})


def _run(fn, ctx, *leaves: torch.Tensor):
    """fn's scalar, and the gradients of `leaves`, with `ctx` (an offloader or nothing) around both passes."""
    _zero(leaves)
    with ctx or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = fn()
        out.backward()
    return [out.detach()] + [t.grad.clone() for t in leaves]


def _zero(leaves) -> None:
    for t in leaves:
        t.grad = None


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# -- through the trainer -------------------------------------------------------------------------------
def _check_trainer(rank: int, world: int) -> None:
    from runtime.config import load_config
    from runtime.mesh import build_mesh
    from runtime.trainer import Trainer

    common = ["parallel.dp=1", "parallel.pp=1", "parallel.sp=1", "parallel.microbatches=1", "train.batch_size=4",
              "train.seq_len=32", "model.gate=true"]
    for extra in (["parallel.remat=always"], ["parallel.remat=never"], ["parallel.remat=always", "train.window=12"]):
        runs = []
        for offload in (False, True):
            trainer = Trainer(load_config(None, [*common, *extra, f"parallel.offload={str(offload).lower()}"]),
                              build_mesh(1, 1, 1))
            if offload:
                off = trainer.offloader
                off.min_bytes = off.inflight_bytes = off.prefetch_bytes = 0
            steps = []
            for step in range(2):
                loss = trainer.forward_backward(*trainer.data.batch(step))
                steps.append([loss, *(p.grad.clone() for p in trainer.model.parameters())])
                trainer.optimizer.zero_grad(set_to_none=True)
                if offload and step == 0:
                    allocated = off.pool.allocated
            runs.append(steps)
        for ref, got in zip(*runs):
            _same(ref, got)
        assert off.stats["moved"] > 0 and off.stats["fetched_ahead"] > 0, (extra, off.stats)
        assert off.pool.allocated == allocated and off.pool.reused > 0, extra  # step 2 pinned nothing new
        assert sum(map(len, off.pool.free.values())) == off.pool.allocated  # every buffer came back


def test_offload_through_the_trainer_is_bitwise_exact() -> None:
    run_distributed(_check_trainer, 1)


# -- the bookkeeping -------------------------------------------------------------------------------------
def _stack(layers: int = 4, T: int = 24):
    """Blocks of the tiny model (their parameters as a list), an input leaf and output weights."""
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="L", gate=True, n_layers=layers))
    x = torch.randn(2, T, model.cfg.dim, requires_grad=True)
    w = torch.randn(2, T, model.cfg.dim)
    return model, [p for block in model.layers.values() for p in block.parameters()], x, w


def _blocks(model, x, w, remat: bool, tile: int = 0):
    def fn():
        h = x * 1.0  # not a leaf: the first layer input is moved too
        for block in model.layers.values():
            block.mlp_tile = tile
            h = checkpoint(block, h, use_reentrant=False) if remat else block(h)
        return (h * w).sum()
    return fn


@pytest.mark.parametrize("remat,tile", [(True, 0), (True, 8), (False, 0), (False, 8)])
def test_layers_exact_and_recompute_not_moved(remat: bool, tile: int) -> None:
    """With checkpoint the moved tensors are the layer inputs alone: checkpoint's recompute (and a tile's,
    in backward) saves through hooks above ours, or while backward runs: nothing new is moved in backward."""
    model, params, x, w = _stack()
    fn = _blocks(model, x, w, remat, tile)
    ref = _run(fn, None, x, *params)
    off = _eager()
    moved = []
    _zero([x, *params])
    with off:
        out = fn()
        moved.append(off.stats["moved"])
        out.backward()
        moved.append(off.stats["moved"])
    _same(ref, [out.detach(), x.grad, *(p.grad for p in params)])
    assert moved[0] == moved[1]
    if remat:
        assert moved[0] == len(model.layers) + 1  # the layer inputs, and w (saved by the last product)
    else:
        assert moved[0] > 4 * len(model.layers)


def test_saved_twice_and_views_share_one_copy() -> None:
    x = torch.randn(6, 40, requires_grad=True)

    def fn():
        h = torch.tanh(x)  # tanh saves its output h
        a, b = h.chunk(2, dim=1)  # two views of h's storage
        sq = h * h  # h saved twice by one op
        return (a * b).sum() + (sq[1:] * h[:-1]).sum() + (h.t() @ h).sum()  # offset and transposed views

    ref = _run(fn, None, x)
    off = _eager()
    _same(ref, _run(fn, off, x))
    assert off.stats["moved"] >= 2  # h, and the products
    assert off.stats["shared"] >= 6  # every further save of h's storage


def test_kept_on_the_device() -> None:
    """Parameters and their (autocast) casts, leaves wanting a gradient, narrow views of a big storage and
    storages under min_bytes are not moved."""
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)

    def fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = lin(x * 2.0)
        big = torch.sin(x.repeat(20, 1))
        narrow = big[:8]  # 1/20 of its storage
        return h.float().sum() + (narrow * narrow).sum() + torch.cos(x * 3.0).sum() + (x * torch.exp(x)).sum()

    ref = _run(fn, None, x, lin.weight)
    off = _eager(min_bytes=2048)
    _same(ref, _run(fn, off, x, lin.weight))
    # moved: sin's input (big), cos's input, exp(x) (saved by exp and by the product, which also saves the
    # leaf x: kept); kept: the bf16 weight cast, the linear's bf16 input (8·64·2 bytes < 2048), narrow
    assert off.stats["moved_bytes"] == 20 * 8 * 64 * 4 + 2 * 8 * 64 * 4 and off.stats["shared"] == 1


def test_prefetch_and_in_flight() -> None:
    """Backward fetches ahead in reverse packing order (6 layer inputs and w: w, the newest, is used from the
    device): no unpack waits on a copy it started itself; with a large in-flight allowance nothing is copied
    back at all."""
    model, params, x, w = _stack(layers=6)
    fn = _blocks(model, x, w, remat=True)
    ref = _run(fn, None, x, *params)
    off = _eager()
    _same(ref, _run(fn, off, x, *params))
    assert off.stats["fetched_on_demand"] == 0 and off.stats["fetched_ahead"] == 6 and off.stats["used_in_flight"] == 1
    lazy = _eager(inflight_bytes=1 << 30)
    _same(ref, _run(fn, lazy, x, *params))
    assert lazy.stats["used_in_flight"] == 7 and lazy.stats["fetched_ahead"] == lazy.stats["fetched_on_demand"] == 0


def test_pool_reuses_buffers_across_steps() -> None:
    model, params, x, w = _stack()
    fn = _blocks(model, x, w, remat=False)
    off = _eager()
    first = _run(fn, off, x, *params)
    allocated = off.pool.allocated
    assert allocated > 0 and sum(map(len, off.pool.free.values())) == allocated
    for _ in range(2):
        _same(first, _run(fn, off, x, *params))
    assert off.pool.allocated == allocated and off.pool.reused >= 2 * allocated


def test_retained_graph_unpacks_twice() -> None:
    model, params, x, w = _stack(layers=2)
    fn = _blocks(model, x, w, remat=False)
    ref = _run(fn, None, x, *params)
    off = _eager()
    _zero([x, *params])
    with off:
        out = fn()
        out.backward(retain_graph=True)
        out.backward()
    _same([2 * g for g in ref[1:]], [x.grad, *(p.grad for p in params)])


def test_not_reentrant() -> None:
    off = _eager()
    with off, pytest.raises(RuntimeError, match="already active"), off:
        pass


# -- on the GPU ------------------------------------------------------------------------------------------
def _gpu_step(fn, x: torch.Tensor, params, ctx):
    """(loss and gradients, peak bytes above what was allocated before, seconds) of one step."""
    _zero([x, *params])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    got = _run(fn, ctx, x, *params)
    torch.cuda.synchronize()
    return got, torch.cuda.max_memory_allocated() - before, time.perf_counter() - start


@gpu
@needs_cuda
@pytest.mark.parametrize("layers,remat", [(1, False), (8, True)])
def test_gpu_1b_blocks_32k(layers: int, remat: bool) -> None:
    """1b-shaped blocks (gate on) at 32K tokens under bf16 autocast: the same numbers as without offload
    (bitwise where two runs without it agree bitwise) and a lower peak. One block without remat moves its
    internals; eight blocks with remat move their inputs (and the loss's weights w)."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    T, d = 32768, 2048
    model = LinearLlama(preset("1b", gate=True, n_layers=layers)).to(dev)
    blocks = list(model.layers.values())
    params = [p for b in blocks for p in b.parameters()]
    x = (0.5 * torch.randn(1, T, d, device=dev)).to(torch.bfloat16).requires_grad_()
    w = torch.randn(1, T, d, device=dev)

    def fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = x * 1.0
            for block in blocks:
                h = checkpoint(block, h, use_reentrant=False) if remat else block(h)
            return (h.float() * w).sum()

    off = ActivationOffloader(dev)
    _gpu_step(fn, x, params, off)  # warm-up: kernels, the pinned pool
    moved, pinned = off.stats["moved_bytes"], off.pool.allocated
    ref, ref_peak, ref_s = _gpu_step(fn, x, params, None)
    ref2, _, _ = _gpu_step(fn, x, params, None)
    got, peak, s = _gpu_step(fn, x, params, off)
    moved = off.stats["moved_bytes"] - moved
    print(f"\n{layers} layer(s), remat={remat}: peak {ref_peak / 2**30:.2f} → {peak / 2**30:.2f} GiB, "
          f"moved {moved / 2**30:.2f} GiB, {ref_s * 1e3:.0f} → {s * 1e3:.0f} ms, stats {off.stats}")
    deterministic = all(torch.equal(a, b) for a, b in zip(ref, ref2))
    for a, b, c in zip(got, ref, ref2):
        if deterministic:
            assert torch.equal(a, b)
        else:
            assert rel_err(a.float(), b.float()) <= max(2 * rel_err(c.float(), b.float()), 1e-6)
    assert off.pool.allocated == pinned  # the timed step pinned nothing new
    layer_input = T * d * 2  # bf16
    if remat:
        assert moved == layers * layer_input + w.nbytes
        # H200, 2026-12-01: peak 5.44 → 5.44 GiB with 1.25 GiB moved — at 32K the peak is one block's
        # recompute and backward, reached while the inputs in flight (≤ 256 MiB each way) are resident; the
        # saving shows at 128K in benchmarks/train_step.py (34.0 → 29.8 GiB). Here: no peak above the plain one.
        assert peak <= ref_peak, (ref_peak, peak)
    else:
        assert moved > 2**30
        assert ref_peak - peak > moved / 3, (ref_peak, peak, moved)


def test_tensors_on_other_devices_stay() -> None:
    off = _eager(device="meta")
    x = torch.randn(4, 4, requires_grad=True)
    _same(_run(lambda: (torch.exp(x) * x).sum(), None, x), _run(lambda: (torch.exp(x) * x).sum(), off, x))
    assert off.stats["moved"] == 0 and off.stats["kept"] > 0
