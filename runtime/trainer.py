"""The training loop, top to bottom: config → mesh → model stage → pipeline → optimizer → steps.

Loss: the mean over all (non-ignored) target tokens of the global batch. Each rank divides
its token-loss sum by that global count, so gradients are summed over sp and over dp (the
sum of per-token shares; with equal token counts per replica this is the average of the
replica means) — whatever dp × pp × sp split is used, the step is the same.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from kernels.linear_cross_entropy import linear_argmax_hits, linear_cross_entropy
from models import num_parameters, token_loss_sum
from models.fused_weights import reuse_fused_weights
from parallel.attention.backends import explicit_backend_problem
from parallel.comm_clock import CommClock
from parallel.gradients import clip_gradients_, global_grad_norm, sync_gradients
from parallel.offload import ActivationOffloader
from parallel.pipeline import GPipe
from runtime.checkpoint import checkpoint_dir, load_checkpoint, resolve_resume
from runtime.checkpoint_writer import CheckpointWriter
from runtime.config import JobConfig, resolve_shard
from runtime.errors import ConfigError, TrainingError
from runtime.mesh import ParallelMesh, build_mesh
from runtime.metrics import MetricsLog, anchor_between_steps, flops_per_token, peak_flops, peak_memory_gib
from runtime.parallelize import build_stage_model, shard_stage, sharded, tied_embedding_group
from runtime.sources import DataSource, build_data_source
from runtime.synthetic import IGNORE


def learning_rate(cfg: JobConfig, step: int) -> float:
    """Linear warmup to train.lr, then cosine decay to min_lr_ratio·lr at the last step (a pure function
    of the step, so a resumed run needs no scheduler state)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min((step - t.warmup_steps) / max(1, t.steps - t.warmup_steps), 1.0)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    skipped: bool = False  # a non-finite loss or gradient: no update was made
    comm_s: float = math.nan  # host time in blocking collectives (CPU jobs: `parallel.comm_clock`; NaN on CUDA)
    bubble_s: float = math.nan  # host time in the pipeline's send / recv: waiting on the other stages + transfer


class Trainer:
    """One rank's part of the job. Its parts, in the order they are built:

    - `model`: this rank's pipeline stage (its layers, under its sequence-parallel split);
    - `pipe`: GPipe over the pp group, deciding re-materialization per micro-batch;
    - `optimizer`: AdamW, learning rate set per step by `learning_rate`;
    - `data`: this rank's batches (`runtime.sources`);
    - gradient synchronisation over sp, dp and the tied embedding pair (`parallel.gradients`); under
      parallel.shard the stage is FSDP2-sharded over its dp × sp ranks (`runtime.parallelize.shard_stage`),
      whose reduce-scatter is the sum over sp and dp, and parameters, gradients and AdamW state are DTensors;
    - `checkpoints`: saves, synchronous or with the write in a background thread (`runtime.checkpoint_writer`;
      run.checkpoint_async, None: asynchronous on CUDA).
    """

    def __init__(self, cfg: JobConfig, mesh: ParallelMesh):
        self.cfg, self.mesh, self.device = cfg, mesh, mesh.device
        self.dp, self.pp, self.sp = mesh.size("dp"), mesh.size("pp"), mesh.size("sp")
        check_backends(cfg, self.device)
        cfg.parallel.shard = resolve_shard(cfg.parallel.shard, self.dp * self.sp, self.device.type == "cuda",
                                           bool(cfg.train.window) and self.pp > 1,
                                           cfg.parallel.offload_optimizer)  # a cfg that skipped validate
        self.model, self.stage_layers = build_stage_model(cfg, mesh)
        self.n_params_total = cfg_param_count(cfg)
        self.sharded = sharded(cfg, mesh)
        # fused projection weights built once per step where blocks run several times with their weights live anyway
        # (windows; several micro-batches; no recomputation) — not for one recomputed micro-batch, where a kept copy
        # would only cost memory — and never under FSDP2, which owns the weights (models/fused_weights.py)
        self.reuse_weights = not self.sharded and (cfg.train.window > 0 or cfg.parallel.microbatches > 1
                                                   or cfg.parallel.remat == "never")
        # the loss applies the head itself, chunk by chunk (no [T, vocab] logits), unless loss_chunk = 0
        self.fused_loss = cfg.train.loss_chunk > 0
        self.pipe = GPipe(self.model, stage_index=mesh.coord("pp"), num_stages=self.pp, group=mesh.group("pp"),
                          device=self.device, microbatches=cfg.parallel.microbatches, loss_fn=self._token_loss_sum,
                          remat=cfg.parallel.remat, window=cfg.train.window // self.sp,
                          local_tokens=cfg.train.seq_len // self.sp,
                          forward_kwargs={"logits": not self.fused_loss},
                          wrap=partial(shard_stage, model=self.model, cfg=cfg, mesh=mesh) if self.sharded else None)
        # token counts and losses are summed over these; so are gradients, unless sharded (FSDP's reduce-scatter
        # over dp × sp sums them); the tied embedding/head pair (pp > 1) over its own group
        self.replica_groups = [mesh.group(axis) for axis in ("sp", "dp") if mesh.size(axis) > 1]
        self.grad_groups = [] if self.sharded else self.replica_groups
        self.shard_group = mesh.replica_mesh().get_group() if self.sharded else None
        self.tied_group = tied_embedding_group(cfg, mesh)
        self.tied = None
        if self.tied_group is not None:
            self.tied = (self.model.embed if self.model.embed is not None else self.model.head).weight
        t = cfg.train
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=learning_rate(cfg, 0), betas=(t.beta1, t.beta2), eps=1e-8,
            fused=self.device.type == "cuda" and t.dtype == "float32" and not cfg.parallel.offload_optimizer,
        )
        self.data: DataSource = build_data_source(cfg, mesh.coord("dp"), self.dp, mesh.coord("sp"), self.sp)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        self.offloader = ActivationOffloader(self.device) if cfg.parallel.offload else None
        self.skipped_steps = 0
        # the measured compute / communication / bubble split: host timers, so only where collectives block (gloo)
        self.comm_clock = CommClock() if self.device.type == "cpu" else None
        background = cfg.run.checkpoint_async
        self.checkpoints = CheckpointWriter(background=self.device.type == "cuda" if background is None else background,
                                            timeout_s=max(cfg.parallel.timeout_s, 300.0))

    def _token_loss_sum(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ cross-entropy of the last stage's output (hidden states under the fused loss, else logits)."""
        if not self.fused_loss:
            return token_loss_sum(out, targets)
        return linear_cross_entropy(out, self.model.head.weight, targets, ignore_index=IGNORE,
                                    chunk_tokens=self.cfg.train.loss_chunk)

    def _sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        for group in self.replica_groups:
            dist.all_reduce(t, group=group)
        return t

    # -- one step ------------------------------------------------------------------------------
    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Gradients of the global-mean loss, synchronised over sp, dp and tied copies; returns the loss
        (the same value on every rank)."""
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        n_tokens = self._sum_over_replicas((targets != IGNORE).sum().to(torch.float32))
        with self.autocast, self._saved_tensors_place(), reuse_fused_weights(enabled=self.reuse_weights):
            loss = self.pipe.step(inputs, targets, loss_divisor=n_tokens)
        sync_gradients(self.model.parameters(), self.grad_groups, self.tied, self.tied_group, device=self.device)
        loss = self._sum_over_replicas(loss.detach().double())
        if self.pp > 1:  # only the last stage has it
            dist.all_reduce(loss, group=self.mesh.group("pp"))
        return loss

    def _saved_tensors_place(self):
        """parallel.offload: tensors saved for backward wait in pinned host memory (parallel/offload.py)."""
        return self.offloader if self.offloader is not None else contextlib.nullcontext()

    def grad_norm(self) -> torch.Tensor:
        """Global gradient norm over all stages (a tied weight counted once, on the first stage)."""
        exclude = self.tied if self.model.embed is None else None  # the last stage's copy of the tied weight
        return global_grad_norm(self.model.parameters(), self.mesh.group("pp") if self.pp > 1 else None,
                                exclude=exclude, device=self.device, shard_group=self.shard_group)

    def step(self, step: int) -> StepResult:
        """One optimizer step on global batch `step`. A non-finite loss or gradient norm (the same on every
        rank) makes no update: it is skipped while `train.skip_nonfinite` allows, else a TrainingError."""
        start = time.perf_counter()
        with self.comm_clock if self.comm_clock is not None else contextlib.nullcontext():
            loss = self.forward_backward(*self.data.batch(step))
            norm = self.grad_norm()
            lr = learning_rate(self.cfg, step)
            finite = bool(torch.isfinite(loss) & torch.isfinite(norm))  # one host sync
            if finite:
                clip_gradients_(self.model.parameters(), norm, self.cfg.train.grad_clip)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        comm, bubble = self.comm_clock.take() if self.comm_clock is not None else (math.nan, math.nan)
        if not finite:
            self.skipped_steps += 1
            if self.skipped_steps > self.cfg.train.skip_nonfinite:
                raise TrainingError(
                    f"step {step + 1}: non-finite loss {float(loss)} or gradient norm {float(norm)}; no update was "
                    f"made and no checkpoint is written — lower train.lr (now {self.cfg.train.lr:g}), check the data, "
                    f"or allow skipping with --set train.skip_nonfinite=N")
        return StepResult(float(loss), float(norm), lr, time.perf_counter() - start, skipped=not finite, comm_s=comm,
                          bubble_s=bubble)

    @property
    def writes_params(self) -> bool:
        """Whether this rank's checkpoints hold its stage's replicated state (the stage's dp = 0, sp = 0 rank)."""
        return self.mesh.coord("dp") == 0 and self.mesh.coord("sp") == 0

    def prepare_saves(self) -> None:
        """Background saves: reserve the host snapshot buffer now, while training goes on (after the first step,
        once the optimizer has its state), so that the first save stops training for the copy only."""
        self.checkpoints.prepare(model=self.model, optimizer=self.optimizer, writes_params=self.writes_params)

    def save(self, path, step: int) -> None:
        """Checkpoint after `step` steps (collective). When asynchronous it returns once the state is copied to
        host memory, and the write goes on in the background; `self.checkpoints.wait()` waits for its commit."""
        self.checkpoints.save(path, step=step, model=self.model, optimizer=self.optimizer, config=self.cfg.to_dict(),
                              cursor=self.data.cursor(step), writes_params=self.writes_params, keep=self.cfg.run.keep)

    def restore(self, path) -> int:
        """Load a checkpoint; returns the number of steps it holds (the learning rate follows from it)."""
        attrs = load_checkpoint(path, model=self.model, optimizer=self.optimizer, config=self.cfg.to_dict(),
                                trust=self.cfg.run.trust_checkpoint)
        return int(attrs["step"])

    @torch.no_grad()
    def evaluate(self, batches: int) -> float | None:
        """Accuracy on the task's questions over `batches` held-out batches (same on every rank); None for 0."""
        if batches == 0:
            return None
        counts = torch.zeros(2, device=self.device)
        for b in range(batches):
            inputs, targets = (t.to(self.device) for t in self.data.eval_batch(b))
            with self.autocast:
                out = self.pipe.forward(inputs if self.pipe.is_first else None)
            if out is None:
                continue
            if self.fused_loss:
                hits, asked = linear_argmax_hits(out, self.model.head.weight, targets, ignore_index=IGNORE,
                                                 chunk_tokens=self.cfg.train.loss_chunk)
                counts += torch.stack([hits, asked]).to(counts.dtype)
            else:
                asked = targets != IGNORE
                counts[0] += (out.argmax(-1)[asked] == targets[asked]).sum()
                counts[1] += asked.sum()
        self._sum_over_replicas(counts)
        if self.pp > 1:
            dist.all_reduce(counts, group=self.mesh.group("pp"))
        return float(counts[0] / counts[1].clamp(min=1))

    def close(self) -> None:
        """On every exit path: the checkpoint in flight is finished (committed) first."""
        try:
            self.checkpoints.close()
        finally:
            self.data.close()


def check_backends(cfg: JobConfig, device: torch.device) -> None:
    """An explicit model.attention_backend (cudnn / flash) that cannot run the softmax layers here, or
    model.backend=triton without a GPU or Triton's interpreter: a ConfigError now rather than an error at the
    first step. Under CUDA autocast the layers see bf16 (fp64 runs stay fp64)."""
    m = cfg.model
    if m.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"model.backend=triton needs a CUDA device (this job runs on {device.type}); use "
                          f"model.backend=auto or torch, or set TRITON_INTERPRET=1 to run the kernels in Triton's "
                          f"interpreter (slow)")
    if "A" not in m.layer_kinds():
        return
    dtype = getattr(torch, cfg.train.dtype)
    if device.type == "cuda" and dtype == torch.float32:
        dtype = torch.bfloat16
    problem = explicit_backend_problem(m.attention_backend, device, dtype, m.n_heads, m.kv_heads, m.head_dim)
    if problem:
        raise ConfigError(f"model.attention_backend={m.attention_backend} cannot run the softmax layers on this "
                          f"{device.type} ({problem}); use model.attention_backend=auto")


def cfg_param_count(cfg: JobConfig) -> int:
    from models import LinearLlama

    with torch.device("meta"):
        return num_parameters(LinearLlama(cfg.model))


def train(cfg: JobConfig, on_report: Callable[[dict], None] | None = None,
          before_step: Callable[[int, int], None] | None = None) -> dict:
    """Run the job on this rank; returns the summary (same on every rank).

    `on_report(row)` is called on every rank every `run.report_every` steps and at the end (Ray's report);
    `before_step(step, rank)` before every step (fault injection in tests, see `runtime.faults`).
    """
    mesh = build_mesh(cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.sp, timeout_s=cfg.parallel.timeout_s)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, mesh)
    try:
        return _run(cfg, trainer, on_report, before_step)
    finally:
        trainer.close()


def _run(cfg: JobConfig, trainer: Trainer, on_report, before_step) -> dict:
    mesh, t = trainer.mesh, cfg.train
    is_main = mesh.rank == 0
    start_step = 0
    resume_from = resolve_resume(cfg.run.resume, cfg.run.dir, warn=False,  # the launcher warned
                                 trust=cfg.run.trust_checkpoint)
    if resume_from is not None:
        start_step = trainer.restore(resume_from)
        if is_main:
            print(f"longtrain: resumed from {resume_from} at step {start_step}", flush=True)
    if start_step >= t.steps:
        if is_main:
            print(f"longtrain: the run in {cfg.run.dir} is complete ({start_step} of train.steps={t.steps} steps); "
                  f"nothing to do — raise train.steps to continue it", flush=True)
        return dict(steps=t.steps, final_loss=float("nan"), eval_accuracy=None, seconds=0.0, tokens_per_s=0.0,
                    losses=[], complete=True)
    tokens_per_step = t.batch_size * t.seq_len
    flops_tok = flops_per_token(cfg.model, t.seq_len, trainer.n_params_total)
    peak = peak_flops(mesh.device) * mesh.world
    if is_main:
        print(f"longtrain: {trainer.n_params_total / 1e6:.2f}M params, world {mesh.world} = dp {trainer.dp} × "
              f"pp {trainer.pp} × sp {trainer.sp}, stages {trainer.stage_layers}, {mesh.device.type}"
              + (f", remat {cfg.parallel.remat} keeping {trainer.model.remat_policy} (parallel.remat_policy="
                 f"{cfg.parallel.remat_policy})" if cfg.parallel.remat != "never" else ""), flush=True)
    log = MetricsLog(cfg.run.dir, cfg.run.tensorboard, resume_step=start_step) if is_main else None
    bar = None
    if is_main and cfg.run.progress:
        import threading

        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: a rank ends with os._exit
        bar = tqdm(total=t.steps, initial=start_step, desc="train", dynamic_ncols=True)
    start, losses, window, anchors = time.perf_counter(), [], [], []
    ckpt_every = cfg.run.checkpoint_every
    try:
        for step in range(start_step, t.steps):
            if before_step is not None:
                before_step(step, mesh.rank)
            res = trainer.step(step)
            if cfg.run.speed_anchor:
                anchors.append(anchor_between_steps(mesh.rank, mesh.world))
            if ckpt_every and step == start_step:
                trainer.prepare_saves()
            losses.append(res.loss)
            window.append(res)
            if ckpt_every and ((step + 1) % ckpt_every == 0 or step + 1 == t.steps):
                trainer.save(checkpoint_dir(cfg.run.dir) / f"step_{step + 1:08d}", step + 1)
            if (step + 1) % cfg.run.log_every == 0 or step == t.steps - 1:
                secs, comm, bubble = (sum(getattr(r, f) for r in window) / len(window)
                                      for f in ("seconds", "comm_s", "bubble_s"))
                anchor = sum(anchors) / len(anchors) if anchors else math.nan
                window, anchors = [], []
                tps = tokens_per_step / secs
                mem = torch.tensor(peak_memory_gib(mesh.device), device=mesh.device)
                dist.all_reduce(mem, op=dist.ReduceOp.MAX)
                row = dict(step=step + 1, loss=res.loss, lr=res.lr, grad_norm=res.grad_norm,
                           tokens=tokens_per_step * (step + 1), tokens_per_s=tps, mfu=tps * flops_tok / peak,
                           max_mem_gib=float(mem), step_time_s=secs, comm_s=comm, bubble_s=bubble, anchor_s=anchor,
                           skipped_steps=trainer.skipped_steps,
                           **trainer.checkpoints.take_metrics(), wall_time=time.time())
                if is_main:
                    log.log(row)
                    if bar is not None:
                        mfu = "n/a" if math.isnan(row["mfu"]) else f"{row['mfu']:.1%}"
                        bar.set_postfix(loss=f"{res.loss:.4f}", tok_s=f"{tps:,.0f}", mfu=mfu,
                                        mem=f"{row['max_mem_gib']:.2f}GiB")
            if on_report is not None and ((step + 1) % cfg.run.report_every == 0 or step + 1 == t.steps):
                on_report(dict(step=step + 1, loss=res.loss, lr=res.lr, grad_norm=res.grad_norm))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    accuracy = trainer.evaluate(t.eval_batches)  # while the last checkpoint is written, when asynchronous
    trainer.checkpoints.wait()  # the last checkpoint is committed before the job returns
    elapsed = time.perf_counter() - start
    final_loss = losses[-1] if losses else float("nan")
    mem = torch.tensor(peak_memory_gib(mesh.device), device=mesh.device)
    mem_all = [torch.zeros_like(mem) for _ in range(mesh.world)]
    dist.all_gather(mem_all, mem)
    summary = dict(steps=t.steps, final_loss=final_loss, eval_accuracy=accuracy, seconds=elapsed,
                   tokens_per_s=tokens_per_step * max(1, t.steps - start_step) / elapsed, losses=losses,
                   peak_mem_gib=[float(m) for m in mem_all], skipped_steps=trainer.skipped_steps,
                   checkpoint_block_s=trainer.checkpoints.block_s, checkpoint_write_s=trainer.checkpoints.write_s)
    if is_main:
        acc = "" if accuracy is None else f", eval accuracy {accuracy:.1%} ({cfg.data.source})"
        unit = "GiB" if mesh.device.type == "cuda" else "GiB RSS"
        peaks = " ".join(f"{m:.2f}" for m in summary["peak_mem_gib"])
        ckpt = trainer.checkpoints
        saves = (f"; {ckpt.saves} checkpoints ({'background' if ckpt.background else 'synchronous'} writes "
                 f"{ckpt.write_s:.1f}s, training stopped {ckpt.block_s:.1f}s)") if ckpt.saves else ""
        print(f"longtrain: done {t.steps - start_step} steps in {elapsed:.1f}s — final loss {final_loss:.4f}{acc}, "
              f"{summary['tokens_per_s']:,.0f} tokens/s; peak memory per rank [{peaks}] {unit}{saves}; "
              f"metrics in {log.path}", flush=True)
    return summary
