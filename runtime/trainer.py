"""The training loop, top to bottom: config → mesh → model stage → pipeline → optimizer → steps.

Loss: the mean over all (non-ignored) target tokens of the global batch. Each rank divides
its token-loss sum by that global count, so gradients are summed over sp and over dp (the
sum of per-token shares; with equal token counts per replica this is the average of the
replica means) — whatever dp × pp × sp split is used, the step is the same.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from models import num_parameters, token_loss_sum
from parallel.layout import shard_sequence
from parallel.pipeline import GPipe
from runtime.checkpoint import checkpoint_dir, load_checkpoint, resolve_resume, save_checkpoint
from runtime.config import JobConfig
from runtime.data import ZarrTokens
from runtime.mesh import ParallelMesh, build_mesh
from runtime.metrics import MetricsLog, flops_per_token, peak_flops, peak_memory_gib
from runtime.parallelize import build_stage_model, tied_embedding_group
from runtime.synthetic import IGNORE, SyntheticTask


def lr_lambda(cfg: JobConfig):
    """Linear warmup to lr, then cosine decay to min_lr_ratio·lr at the last step."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def all_reduce_(tensors: list[torch.Tensor], group: dist.ProcessGroup, op=dist.ReduceOp.SUM) -> None:
    """In-place all-reduce of many tensors as one flat buffer."""
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, op=op, group=group)
    for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(reduced)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    seconds: float


class Trainer:
    def __init__(self, cfg: JobConfig, mesh: ParallelMesh):
        self.cfg, self.mesh, self.device = cfg, mesh, mesh.device
        self.dp, self.pp, self.sp = mesh.size("dp"), mesh.size("pp"), mesh.size("sp")
        self.model, self.stage_layers = build_stage_model(cfg, mesh)
        self.n_params_total = cfg_param_count(cfg)
        self.embed_group = tied_embedding_group(cfg, mesh)
        self.pipe = GPipe(self.model, stage_index=mesh.coord("pp"), num_stages=self.pp, group=mesh.group("pp"),
                          device=self.device, microbatches=cfg.parallel.microbatches, loss_fn=self._loss)
        self.n_tokens = torch.ones((), device=self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        kind, _, where = cfg.data.source.partition(":")
        self.task = self.store = self._prefetched = None
        if kind == "zarr":
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longtrain-data")
            self.store = ZarrTokens(where, t.seq_len, t.batch_size, mesh.coord("dp"), self.dp, mesh.coord("sp"),
                                    self.sp, cfg.parallel.layout, t.seed)
        else:
            self.task = SyntheticTask(where, cfg.model.vocab_size, t.seq_len, t.seed, cfg.data.num_pairs,
                                      cfg.data.passkey_digits)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # -- data ---------------------------------------------------------------------------------
    def local_batch(self, step: int, seed_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows (its dp replica) and sequence shards (its sp rank) of global batch `step`."""
        if self.store is not None:
            if seed_offset == 0 and self._prefetched is not None and self._prefetched[0] == step:
                x, y = self._prefetched[1].result()
            else:
                x, y = self.store.batch(step + seed_offset)
            if seed_offset == 0 and step + 1 < self.cfg.train.steps:  # read the next batch during this step
                self._prefetched = (step + 1, self._reader.submit(self.store.batch, step + 1))
            return x.to(self.device).long(), y.to(self.device).long()
        per_replica = self.cfg.train.batch_size // self.dp
        d = self.mesh.coord("dp")
        x, y = self.task.rows(step + seed_offset, range(d * per_replica, (d + 1) * per_replica))
        r, layout = self.mesh.coord("sp"), self.cfg.parallel.layout
        x, y = shard_sequence(x, r, self.sp, layout), shard_sequence(y, r, self.sp, layout)
        return x.to(self.device), y.to(self.device)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, targets) / self.n_tokens

    def _sum_over_dp_sp(self, t: torch.Tensor) -> torch.Tensor:
        for axis in ("sp", "dp"):
            if self.mesh.size(axis) > 1:
                dist.all_reduce(t, group=self.mesh.group(axis))
        return t

    # -- one step ------------------------------------------------------------------------------
    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Gradients of the global-mean loss, synchronised over sp, dp and tied copies; returns the loss
        (the same value on every rank)."""
        self.n_tokens = self._sum_over_dp_sp((targets != IGNORE).sum().to(torch.float32))
        with self.autocast:
            loss = self.pipe.step(inputs, targets)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for axis in ("sp", "dp"):
            if self.mesh.size(axis) > 1:
                all_reduce_(grads, self.mesh.group(axis))
        if self.embed_group is not None:
            shared = self.model.embed if self.model.embed is not None else self.model.head
            all_reduce_([shared.weight.grad], self.embed_group)
        loss = self._sum_over_dp_sp(loss.detach().double())
        if self.pp > 1:  # only the last stage has it
            dist.all_reduce(loss, group=self.mesh.group("pp"))
        return loss

    def grad_norm(self) -> torch.Tensor:
        """Global gradient norm over all stages (a tied weight counted once, on the first stage)."""
        params = [p for n, p in self.model.named_parameters()
                  if p.grad is not None and not (n == "head.weight" and self.embed_group is not None)]
        sq = torch.stack([p.grad.float().pow(2).sum() for p in params]).sum() if params else \
            torch.zeros((), device=self.device)
        if self.pp > 1:
            dist.all_reduce(sq, group=self.mesh.group("pp"))
        return sq.sqrt()

    def step(self, step: int) -> StepResult:
        start = time.perf_counter()
        inputs, targets = self.local_batch(step)
        loss = self.forward_backward(inputs, targets)
        norm = self.grad_norm()
        if self.cfg.train.grad_clip > 0:
            coef = (self.cfg.train.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)  # synchronises
        return StepResult(loss_value, float(norm), lr, time.perf_counter() - start)

    def data_cursor(self, next_step: int) -> dict:
        """Where the data stands before `next_step` (saved in checkpoints)."""
        if self.store is not None:
            epoch, position = self.store.cursor(next_step)
            return {"epoch": epoch, "position": position, "step": next_step}
        return {"step": next_step}

    def save(self, path, step: int) -> None:
        """Checkpoint after `step` steps (collective)."""
        writes = self.mesh.coord("dp") == 0 and self.mesh.coord("sp") == 0
        save_checkpoint(path, step=step, model=self.model, optimizer=self.optimizer, config=self.cfg.to_dict(),
                        cursor=self.data_cursor(step), writes_params=writes, keep=self.cfg.run.keep)

    def restore(self, path) -> int:
        """Load a checkpoint; returns the number of steps it holds."""
        attrs = load_checkpoint(path, model=self.model, optimizer=self.optimizer, config=self.cfg.to_dict())
        step = int(attrs["step"])
        factor = lr_lambda(self.cfg)
        self.scheduler.last_epoch = step
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        return step

    @torch.no_grad()
    def evaluate(self, batches: int) -> float:
        """Accuracy on the task's questions over `batches` held-out batches (same on every rank)."""
        counts = torch.zeros(2, device=self.device)
        for b in range(batches):
            if self.store is None:  # synthetic: held-out batches
                inputs, targets = self.local_batch(b, seed_offset=10**9)
            else:  # a token store: its first batches (it has no held-out split)
                inputs, targets = (t.to(self.device).long() for t in self.store.batch(b))
            with self.autocast:
                logits = self.pipe.forward(inputs if self.pipe.is_first else None)
            if logits is not None:
                asked = targets != IGNORE
                counts[0] += (logits.argmax(-1)[asked] == targets[asked]).sum()
                counts[1] += asked.sum()
        self._sum_over_dp_sp(counts)
        if self.pp > 1:
            dist.all_reduce(counts, group=self.mesh.group("pp"))
        return float(counts[0] / counts[1].clamp(min=1))


def cfg_param_count(cfg: JobConfig) -> int:
    from models import LinearLlama

    with torch.device("meta"):
        return num_parameters(LinearLlama(cfg.model))


def _maybe_inject_failure(cfg: JobConfig, step: int, rank: int) -> None:
    """Test hook: LONGTRAIN_FAIL_AT_STEP=k kills rank LONGTRAIN_FAIL_RANK (default 1) before step k,
    on the first attempt only (a marker file in run.dir remembers that it happened)."""
    at = os.environ.get("LONGTRAIN_FAIL_AT_STEP")
    if at is None or step != int(at) or rank != int(os.environ.get("LONGTRAIN_FAIL_RANK", 1)):
        return
    marker = Path(cfg.run.dir) / ".failure_injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed rank {rank} before step {step}\n")
    os._exit(17)


def train(cfg: JobConfig, on_report: Callable[[dict], None] | None = None) -> dict:
    """Run the job on this rank; returns the summary (same on every rank). `on_report(row)` is called
    on every rank every `run.report_every` steps and at the end (Ray's report)."""
    mesh = build_mesh(cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.sp)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, mesh)
    is_main = mesh.rank == 0
    t = cfg.train
    start_step = 0
    resume_from = resolve_resume(cfg.run.resume, cfg.run.dir, warn=False)  # the launcher warned
    if resume_from is not None:
        start_step = trainer.restore(resume_from)
        if is_main:
            print(f"longtrain: resumed from {resume_from} at step {start_step}", flush=True)
    tokens_per_step = t.batch_size * t.seq_len
    flops_tok = flops_per_token(cfg.model, t.seq_len, trainer.n_params_total)
    peak = peak_flops(mesh.device) * mesh.world
    log = MetricsLog(cfg.run.dir, cfg.run.tensorboard, resume_step=start_step) if is_main else None
    bar = None
    if is_main and cfg.run.progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start_step, desc="train", dynamic_ncols=True)
    if is_main:
        print(f"longtrain: {trainer.n_params_total / 1e6:.2f}M params, world {mesh.world} = dp {trainer.dp} × "
              f"pp {trainer.pp} × sp {trainer.sp}, stages {trainer.stage_layers}, {mesh.device.type}", flush=True)
    start, losses, window = time.perf_counter(), [], []
    ckpt_every = cfg.run.checkpoint_every
    res = None
    for step in range(start_step, t.steps):
        _maybe_inject_failure(cfg, step, mesh.rank)
        res = trainer.step(step)
        losses.append(res.loss)
        window.append(res.seconds)
        if (step + 1) % cfg.run.log_every == 0 or step == t.steps - 1:
            secs = sum(window) / len(window)
            window = []
            tps = tokens_per_step / secs
            mem = torch.tensor(peak_memory_gib(mesh.device), device=mesh.device)
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
            row = dict(step=step + 1, loss=res.loss, lr=res.lr, grad_norm=res.grad_norm,
                       tokens=tokens_per_step * (step + 1), tokens_per_s=tps, mfu=tps * flops_tok / peak,
                       max_mem_gib=float(mem), step_time_s=secs, wall_time=time.time())
            if is_main:
                log.log(row)
                if bar is not None:
                    mfu = "n/a" if math.isnan(row["mfu"]) else f"{row['mfu']:.1%}"
                    bar.set_postfix(loss=f"{res.loss:.4f}", tok_s=f"{tps:,.0f}", mfu=mfu,
                                    mem=f"{row['max_mem_gib']:.2f}GiB")
        if ckpt_every and ((step + 1) % ckpt_every == 0 or step + 1 == t.steps):
            trainer.save(checkpoint_dir(cfg.run.dir) / f"step_{step + 1:08d}", step + 1)
        if on_report is not None and ((step + 1) % cfg.run.report_every == 0 or step + 1 == t.steps):
            on_report(dict(step=step + 1, loss=res.loss, lr=res.lr, grad_norm=res.grad_norm))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    accuracy = trainer.evaluate(t.eval_batches)
    elapsed = time.perf_counter() - start
    final_loss = losses[-1] if losses else float("nan")
    summary = dict(steps=t.steps, final_loss=final_loss, eval_accuracy=accuracy, seconds=elapsed,
                   tokens_per_s=tokens_per_step * max(1, t.steps - start_step) / elapsed, losses=losses)
    if is_main:
        log.close()
        print(f"longtrain: done {t.steps - start_step} steps in {elapsed:.1f}s — final loss {final_loss:.4f}, "
              f"eval accuracy {accuracy:.1%} ({cfg.data.source}), {summary['tokens_per_s']:,.0f} tokens/s; "
              f"metrics in {log.path}", flush=True)
    return summary
