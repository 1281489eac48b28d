"""Shared test helpers: a gloo process group of spawned CPU ranks, relative errors, small training runs."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
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
    """Run fn(rank, world, *args) in `world` spawned gloo processes; any rank's failure fails the test."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


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


def run_overrides(world: int, store: str, run_dir, steps: int, extra: list[str] = ()) -> list[str]:
    """A zarr-data run: world 4 is pp 2 × sp 2, world 1 one process; a checkpoint every 10 steps."""
    dims = ["parallel.pp=2", "parallel.sp=2"] if world == 4 else ["parallel.pp=1", "parallel.sp=1"]
    return [*dims, "parallel.microbatches=2", f"data.source=zarr:{store}", "model.vocab_size=257",
            "train.seq_len=32", "train.batch_size=8", f"train.steps={steps}", "run.checkpoint_every=10",
            "run.keep=5", "run.log_every=1", "run.progress=false", "run.tensorboard=false",
            "train.eval_batches=1", f"run.dir={run_dir}", *extra]


def run_training(world: int, store: str, run_dir, steps: int, extra: list[str] = ()) -> None:
    run_distributed(_train, world, run_overrides(world, store, run_dir, steps, extra))
