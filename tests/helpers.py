"""Shared test helpers: a gloo process group of spawned CPU ranks, relative errors, small training runs."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

# Without a GPU, Triton kernels run under the interpreter: set before any test imports triton (conftest.py
# imports this module before pytest collects a test module).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if KERNEL_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
needs_cuda = pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="needs a CUDA device")


class CountingTorch:
    """`torch` as a module sees it (monkeypatch the module's `torch`), counting that module's `torch.cat` calls."""

    def __init__(self):
        self.cats = 0

    def cat(self, *args, **kwargs):
        self.cats += 1
        return torch.cat(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks start from a fork server that imported torch and the runtime once per session (a spawned rank spends
# ≈ 3.5 s of one core importing them: more than most tests' work). Every rank is still a fresh process of its
# own, forked from a server that only imported modules; it takes the caller's environment, working directory
# and sys.path as a spawned one would.
_PRELOAD = ["torch", "torch.distributed", "models", "runtime.trainer", "runtime.checkpoint", "helpers"]
mp.get_context("forkserver").set_forkserver_preload(_PRELOAD)


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)  # the caller's environment now, not the fork server's at its start
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()  # every rank's own error, not only the first one spawn reports
        raise
    finally:
        dist.destroy_process_group()
    # A rank that passed leaves without interpreter finalization: gloo worker threads that still hold
    # tensors can abort it there ("terminate called without an active exception", SIGABRT), which
    # spawn would report as a failure of a test whose checks all passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` fresh gloo processes (forked from the fork server); any rank's failure
    fails the test."""
    mp.start_processes(_entry, args=(world, _free_port(), fn, args, dict(os.environ)), nprocs=world, join=True,
                       start_method="forkserver")


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="longtrain-test-")


def model_step(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, n_tokens: int):
    """(loss, {parameter name: gradient}) of one step of the mean token loss over n_tokens."""
    from models import token_loss_sum

    model.zero_grad()
    loss = token_loss_sum(model(tokens), targets) / n_tokens
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def seeded_model_and_batch(cfg, world: int):
    """A model seeded as every rank seeds it, and a batch of 2 sequences splittable over `world` zigzag ranks."""
    from models import LinearLlama

    torch.manual_seed(0)
    model = LinearLlama(cfg)
    data = torch.randint(0, cfg.vocab_size, (2, 8 * world * 3 + 1), generator=torch.Generator().manual_seed(1))
    return model, data[:, :-1], data[:, 1:]


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """‖a − b‖ / max(‖b‖, floor): relative error (absolute where the reference is below `floor`)."""
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def kernel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (the plain difference where b is 0); NaN or inf in a gives inf."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def one_line_error(capsys, *needles: str) -> str:
    """The captured stderr: exactly one `longtrain: error:` line containing every needle."""
    err = capsys.readouterr().err
    assert err.startswith("longtrain: error: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err
    return err


def make_token_store(root) -> str:
    """A small byte-tokenized zarr token store (rows of 32 tokens, chunks of 8)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime.data import prepare_data

    docs = [" ".join(f"w{(i * j) % 97}" for j in range(30)) for i in range(400)]
    pq.write_table(pa.table({"text": docs}), root / "d.parquet")
    prepare_data(str(root / "d.parquet"), str(root / "s.zarr"), seq_len=32, chunk_len=8)
    return str(root / "s.zarr")


def _train(rank: int, world: int, overrides: list[str]) -> None:
    from runtime.config import load_config
    from runtime.trainer import train

    train(load_config(None, overrides))


def _train_each(rank: int, world: int, runs: list[list[str]]) -> None:
    for overrides in runs:
        _train(rank, world, overrides)


def run_trainings(world: int, runs: list[list[str]]) -> None:
    """Several training jobs one after another in one spawn of `world` ranks (one process start-up)."""
    run_distributed(_train_each, world, runs)


def run_overrides(world: int, store: str, run_dir, steps: int, extra: list[str] = ()) -> list[str]:
    """A zarr-data run: world 4 is pp 2 × sp 2, world 1 one process; a checkpoint every 10 steps."""
    dims = ["parallel.pp=2", "parallel.sp=2"] if world == 4 else ["parallel.pp=1", "parallel.sp=1"]
    return [*dims, "parallel.microbatches=2", f"data.source=zarr:{store}", "model.vocab_size=257",
            "train.seq_len=32", "train.batch_size=8", f"train.steps={steps}", "run.checkpoint_every=10",
            "run.keep=5", "run.log_every=1", "run.progress=false", "run.tensorboard=false",
            "train.eval_batches=1", f"run.dir={run_dir}", *extra]


def run_training(world: int, store: str, run_dir, steps: int, extra: list[str] = ()) -> None:
    run_distributed(_train, world, run_overrides(world, store, run_dir, steps, extra))


def run_many(world: int, store: str, jobs: list[tuple]) -> None:
    """`run_training` for each (run_dir, steps, extra) in one spawn."""
    run_trainings(world, [run_overrides(world, store, *job) for job in jobs])


LASP2_CASES = [(layout, decay, gate, False) for layout in ("contiguous", "zigzag")
               for decay in (False, True) for gate in (False, True)]
LASP2_CASES += [(layout, True, True, True) for layout in ("contiguous", "zigzag")]  # a carried initial state
# each layout, decay and gate on and off, and the initial state, in four cases (the interpreter's Triton runs)
LASP2_BRANCH_CASES = [("contiguous", False, False, False), ("zigzag", True, False, False),
                      ("contiguous", False, True, False), ("zigzag", True, True, True)]


def _lasp2_inputs(seed: int, decay: bool, gate: bool, T: int):
    g = torch.Generator().manual_seed(seed)
    B, H, K, V = 2, 3, 8, 12
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, V))
    log_decay = -torch.rand(H, generator=g) * 0.3 if decay else None
    gates = F.logsigmoid(torch.randn(B, T, H, generator=g) + 2.0) if gate else None
    w = torch.randn(B, T, H, V, generator=g)
    return q, k, v, log_decay, gates, w


def check_lasp2(rank: int, world: int, T: int, backend: str = "auto", tol: float = 1e-5,
                cases: list[tuple] | None = None) -> None:
    """LASP-2 on `world` ranks equals single-process linear attention: outputs, final state, every input
    gradient (the initial state's too), both layouts, with and without decay, gate and initial state
    (`cases`, default LASP2_CASES: every combination)."""
    import torch.distributed as dist

    from kernels import linear_attention
    from parallel.lasp2 import lasp2_linear_attention
    from parallel.layout import shard_sequence, unshard_sequence

    for i, (layout, decay, gate, init) in enumerate(cases or LASP2_CASES):
        q, k, v, ld, g, w = _lasp2_inputs(100 + i, decay, gate, T)
        B, _, H, K = q.shape
        gen = torch.Generator().manual_seed(7 + i)
        s0 = torch.randn(B, H, K, v.shape[-1], generator=gen) if init else None
        wf = torch.randn(B, H, K, v.shape[-1], generator=gen)
        leaves = [t.requires_grad_() for t in (q, k, v, ld, g, s0) if t is not None]
        ref, ref_final = linear_attention(q, k, v, log_decay=ld, gate=g, chunk_size=16, initial_state=s0,
                                          output_final_state=True)
        ref_grads = torch.autograd.grad((ref * w).sum() + (ref_final * wf).sum(), leaves)

        def local(x, layout=layout):
            return shard_sequence(x.detach(), rank, world, layout).requires_grad_()

        ql, kl, vl = local(q), local(k), local(v)
        gl = local(g) if g is not None else None
        ldl = ld.detach().clone().requires_grad_() if ld is not None else None
        s0l = s0.detach().clone().requires_grad_() if s0 is not None else None
        out, final = lasp2_linear_attention(ql, kl, vl, log_decay=ldl, gate=gl, chunk_size=16, layout=layout,
                                            backend=backend, initial_state=s0l, output_final_state=True)
        case = (layout, decay, gate, init)
        assert rel_err(out, shard_sequence(ref.detach(), rank, world, layout)) < tol, case
        assert rel_err(final, ref_final.detach()) < tol, case
        wl = shard_sequence(w, rank, world, layout)
        local_leaves = [t for t in (ql, kl, vl, ldl, gl, s0l) if t is not None]
        # the final state is replicated: each rank's copy carries a 1/world share of its loss term
        grads = list(torch.autograd.grad((out * wl).sum() + (final * wf).sum() / world, local_leaves))
        names = [n for n, t in zip("q k v log_decay gate initial".split(), (ql, kl, vl, ldl, gl, s0l))
                 if t is not None]
        for name, got, want in zip(names, grads, ref_grads):
            if name in ("log_decay", "initial"):  # replicated: the gradient is the sum over ranks
                dist.all_reduce(got)
            else:
                want = shard_sequence(want, rank, world, layout)
            assert rel_err(got, want) < tol, (name, case, rel_err(got, want))
        # the pieces reassemble into the whole sequence
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.detach().contiguous())
        assert rel_err(unshard_sequence(parts, layout), ref.detach()) < tol


def check_sp_model(rank: int, world: int, cfg) -> None:
    """The model under sequence parallelism (contiguous and zigzag) equals the one-process model: the loss
    summed over sp, and every gradient summed over sp."""
    from parallel.context import SequenceParallel
    from parallel.layout import shard_sequence
    from runtime.mesh import build_mesh

    mesh = build_mesh(pp=1, sp=world)
    assert mesh.size("sp") == world and mesh.size("dp") == 1 and mesh.coord("sp") == rank
    model, tokens, targets = seeded_model_and_batch(cfg, world)
    ref_loss, ref_grads = model_step(model, tokens, targets, targets.numel())
    for layout in ("contiguous", "zigzag"):
        model.set_sequence_parallel(SequenceParallel(mesh.group("sp"), layout))
        loss, grads = model_step(model, shard_sequence(tokens, rank, world, layout),
                                 shard_sequence(targets, rank, world, layout), targets.numel())
        dist.all_reduce(loss, group=mesh.group("sp"))
        assert abs(loss - ref_loss) / ref_loss < 1e-6, (layout, loss, ref_loss)
        for name, grad in grads.items():
            dist.all_reduce(grad, group=mesh.group("sp"))  # gradients are summed over sp
            assert rel_err(grad, ref_grads[name]) < 1e-5, (layout, name, rel_err(grad, ref_grads[name]))


def check_pipeline_model(rank: int, world: int, overrides: list[str]) -> None:
    """pp 2 × 2 micro-batches through the Trainer equals the single-process model's step (loss and every
    gradient); `overrides`: the model's (layout and sizes) on top of the default job."""
    from models import LinearLlama, token_loss_sum
    from runtime.config import load_config
    from runtime.mesh import build_mesh
    from runtime.synthetic import IGNORE, SyntheticTask
    from runtime.trainer import Trainer

    cfg = load_config(None, ["parallel.pp=2", "parallel.sp=1", "parallel.microbatches=2", "train.batch_size=4",
                             "train.seq_len=24", "data.num_pairs=2", *overrides])
    trainer = Trainer(cfg, build_mesh(1, 2, 1))
    ref = LinearLlama(cfg.model)
    ref.reset_parameters(cfg.train.seed)
    x, y = SyntheticTask("mqar", cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed, 2).rows(0, range(4))
    ref_loss = token_loss_sum(ref(x), y) / (y != IGNORE).sum()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    loss = trainer.forward_backward(*trainer.data.batch(0))
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-5, (loss, ref_loss)
    for name, p in trainer.model.named_parameters():
        want = ref_params["embed.weight" if name == "head.weight" else name].grad
        assert rel_err(p.grad, want) < 1e-5, name


def check_streaming(model, window: int, grad_tol: float, seq_len: int = 40) -> None:
    """A float64 model's step over windows of `window` tokens (`parallel.streaming.streaming_step`: each recurrent
    layer carries its state and conv tail) equals its whole-sequence step: the loss and every gradient."""
    from kernels.linear_cross_entropy import linear_cross_entropy
    from parallel.streaming import streaming_step

    data = torch.randint(0, model.cfg.vocab_size, (2, seq_len + 1), generator=torch.Generator().manual_seed(2))
    x, y = data[:, :-1], data[:, 1:]

    def loss_fn(h, t):
        return linear_cross_entropy(h, model.head.weight, t) / y.numel()

    model.zero_grad()
    ref = loss_fn(model(x, logits=False), y)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = streaming_step(model, x, y, window, loss_fn, False, {"logits": False})
    assert abs(loss - ref.detach()) / ref.detach() < 1e-10
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[name]) < grad_tol, name
