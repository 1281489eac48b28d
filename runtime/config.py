"""Job configuration: dataclass sections, TOML presets, `--set section.key=value` overrides.

    cfg = load_config("configs/125m.toml", ["train.steps=500", "parallel.sp=4"])
    cfg.validate(world_size=8)

The model section starts from `model.preset` and any other model key overrides it.
Every problem is a ConfigError: one line that names the fix, raised before any process starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from models.config import PRESET_LR, PRESETS, ModelConfig, preset
from parallel.context import SOFTMAX_METHODS
from parallel.layout import LAYOUTS, num_shards
from parallel.pipeline import REMAT_MODES, REMAT_POLICIES
from runtime.errors import ConfigError

BALANCE = ("params", "time")
SHARD_MODES = ("auto", "none", "optimizer", "full")


def resolve_shard(shard: str, replicas: int, cuda: bool, window_over_stages: bool = False,
                  offload_optimizer: bool = False) -> str:
    """parallel.shard=auto as what it means for this job: full on CUDA when a stage has dp · sp > 1 ranks, and
    wherever the optimizer state is offloaded (it offloads sharded state) — unless train.window streams over
    pipeline stages, which does not shard yet; none otherwise."""
    if shard != "auto":
        return shard
    wanted = offload_optimizer or (cuda and replicas > 1)
    return "full" if wanted and not window_over_stages else "none"


@dataclass
class ParallelConfig:
    """How the world is split: a ("dp", "pp", "sp") device mesh, sp innermost (DESIGN §5, §6)."""

    dp: int | None = None
    """Data-parallel replicas; None: world size / (pp · sp)."""
    pp: int = 2
    """Pipeline stages (GPipe); consecutive layers per stage."""
    sp: int = 2
    """Sequence-parallel ranks per sequence (LASP-2 for linear layers, `sp_attention` for softmax layers)."""
    layout: str = "zigzag"
    """How a sequence is cut over sp: contiguous (rank r owns shard r) | zigzag (shards r and 2P−1−r)."""
    microbatches: int = 2
    """GPipe micro-batches M per step; must divide the sequences per dp replica."""
    remat: str = "never"
    """Per-layer re-materialization: never | except_last (all micro-batches but the last) | always."""
    remat_policy: str = "auto"
    """What a re-materialized layer keeps: full (its input only) | selective (also the outputs of its widening
    matmuls — q/k/v/gate and SwiGLU gate/up — so backward recomputes only the cheap work: faster, more memory) |
    auto (selective on CUDA when the memory estimate with it, plus its margin, fits the GPU; else full)."""
    balance: str = "params"
    """How layers are cut into stages: by parameter count (params) or measured layer time (time)."""
    sp_attention: str = "allgather"
    """Softmax layers under sp > 1: allgather (LASP-2H) | ring (zigzag ring) | ulysses (all-to-all over heads)."""
    offload: bool = False
    """Keep what a step saves for backward (with remat: the layer inputs) in pinned host memory instead of
    the GPU (`parallel/offload.py`): copied out on a side stream while forward goes on, fetched back a tensor
    ahead of backward's need; storages under 1 MiB, parameters and their casts stay. Saves ≈ L·T·d·2 bytes per
    rank with remat=always, using as much pinned host memory; the copies hide behind compute when the layers
    are wide enough (cost model in the module; see README)."""
    timeout_s: float = 600.0
    """Seconds any collective or P2P may wait for a peer before the job fails (a stopped or dead rank)."""
    shard: str = "auto"
    """Model state over the dp × sp ranks of each pipeline stage (FSDP2, DESIGN §10): auto (full on CUDA when
    dp · sp > 1 or with offload_optimizer, else none; resolved by validate) | none (replicated) |
    optimizer (parameters gathered once per step and kept through backward; gradients, optimizer state and
    fp32 master weights sharded between steps: ZeRO-1/2-like) | full (parameters also re-gathered per block in
    forward and backward: ZeRO-3). No effect when dp · sp = 1 (unless offload_optimizer)."""
    offload_optimizer: bool = False
    """With parallel.shard: keep the sharded fp32 weights, gradients and AdamW state in CPU memory (FSDP2
    CPUOffloadPolicy); the optimizer step runs on the CPU, the GPU holds only what is gathered for compute."""


@dataclass
class TrainConfig:
    """The optimisation: AdamW with linear warmup and cosine decay, gradient clipping."""

    steps: int = 300
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    batch_size: int = 16
    """Sequences per step, global (over all dp replicas)."""
    seq_len: int = 64
    """Tokens per sequence (over all sp ranks)."""
    lr: float | None = None
    """Peak learning rate (after warmup); None: the model preset's (models.config.PRESET_LR)."""
    min_lr_ratio: float = 0.1
    """The cosine ends at min_lr_ratio · lr on the last step."""
    warmup_steps: int = 10
    """Steps of linear warmup from lr / warmup_steps to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay of matrices (norm weights and vectors get none)."""
    beta1: float = 0.9
    """AdamW's first-moment (momentum) decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: int = 0
    """Seed of parameters, data order and every random stream."""
    eval_batches: int = 4
    """Held-out batches evaluated at the end (accuracy on the task's questions); 0: no evaluation."""
    dtype: str = "float32"
    """Parameter dtype: float32 (bf16 autocast on CUDA) | float64 (CPU reference runs)."""
    skip_nonfinite: int = 0
    """Steps with a non-finite loss or gradient that may be skipped (no update) before the run stops."""
    loss_chunk: int = 8192
    """Tokens per chunk of the head + cross-entropy (no [T, vocab] logits are ever held); 0: whole logits."""
    mlp_tile: int = 0
    """> 0: each block's token-wise part (norm, SwiGLU, residual) runs in tiles of this many tokens, so its
    internals never exceed one tile (exact; costs one more forward of the MLP); 0: off."""
    compile: bool = False
    """torch.compile each block's token-wise part (norm, SwiGLU, residual) on CUDA; ignored on CPU."""
    window: int = 0
    """Streaming windows: run each sequence through the model this many tokens at a time, carrying every
    recurrent layer's state and conv tail (memory flat in seq_len; layouts of L, M and D layers only; over pp > 1
    stages the windows are the micro-batches; under sp the windows are global, each sharded over the sp ranks);
    0: off."""


@dataclass
class DataConfig:
    """Where the tokens come from."""

    source: str = "synthetic:mqar"
    """synthetic:mqar (associative recall) | synthetic:passkey (any length) | synthetic:zipf (dense next-token
    targets from one Zipf law: a loss that falls) | zarr:PATH (`longtrain prepare-data`)."""
    num_pairs: int = 4
    """MQAR key–value pairs per sequence."""
    passkey_digits: int = 5
    """Digits of the passkey to retrieve."""


@dataclass
class RunConfig:
    """Outputs, checkpoints and resumption."""

    dir: str = "runs/tiny"
    """Run folder: metrics.parquet, tensorboard/, checkpoints/, logs/."""
    log_every: int = 10
    """Steps between metric rows (the last step is always logged)."""
    tensorboard: bool = True
    """Also write metrics to <dir>/tensorboard."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: none); the last step is always saved when > 0."""
    keep: int = 2
    """Newest committed checkpoints kept under <dir>/checkpoints."""
    checkpoint_async: bool | None = None
    """Write checkpoints in a background thread: the step waits only for the copy of this rank's state into one
    (pinned) host buffer, kept between saves; the commit marker follows once every rank's write is done, at most
    one save is in flight and the last one is committed before the job ends; None: true on CUDA, false on CPU."""
    resume: str = ""
    """"" (fresh start) | auto (newest valid checkpoint of dir, or fresh) | PATH of a step_* checkpoint."""
    report_every: int = 20
    """Steps between metric reports to Ray (its controller polls about every 2 s)."""
    overwrite: bool = False
    """Start afresh in a dir that already holds a run, deleting its metrics, checkpoints and logs."""
    skip_memory_check: bool = False
    """Start a CUDA job even when the memory estimate (runtime.memory) says it cannot fit."""
    trust_checkpoint: bool = False
    """Load a legacy checkpoint whose RNG state is a pickle (only one you wrote yourself: it can run code)."""
    speed_anchor: bool = False
    """After each step, rank 0 times a fixed host workload (runtime.metrics.speed_anchor_s) while the other ranks
    wait at a barrier, outside the step's time: the metrics' anchor_s, how fast the machine ran then. `longtrain
    sweep` sets it; `longtrain report` scales a calibrated CPU profile's prediction by it."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def world_size(self) -> int:
        """Processes this configuration asks for when parallel.dp is set (else pp·sp)."""
        return (self.parallel.dp or 1) * self.parallel.pp * self.parallel.sp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobConfig:
        """Inverse of `to_dict` (e.g. to ship a config to Ray workers)."""
        return cls(model=ModelConfig(**d["model"]), parallel=ParallelConfig(**d["parallel"]),
                   train=TrainConfig(**d["train"]), data=DataConfig(**d["data"]), run=RunConfig(**d["run"]))

    def validate(self, world_size: int, cuda: bool | None = None) -> None:
        """Check everything that can be checked before processes start, and resolve parallel.shard=auto for
        `cuda` (None: whether this process sees a CUDA device; `longtrain plan` plans for GPUs: True)."""
        par, train, m = self.parallel, self.train, self.model
        try:
            m.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for key in ("pp", "sp", "microbatches"):
            if getattr(par, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(par, key)} must be ≥ 1")
        if par.dp is not None and par.dp < 1:
            raise ConfigError(f"parallel.dp={par.dp} must be ≥ 1")
        if par.pp > m.n_layers:
            raise ConfigError(
                f"parallel.pp={par.pp} is more than the model's {m.n_layers} layers; use pp ≤ {m.n_layers}"
            )
        from runtime.mesh import resolve_dims

        dp, pp, sp = resolve_dims(world_size, par.dp, par.pp, par.sp)
        for key, allowed in (("layout", LAYOUTS), ("remat", REMAT_MODES), ("remat_policy", REMAT_POLICIES),
                             ("balance", BALANCE), ("sp_attention", SOFTMAX_METHODS), ("shard", SHARD_MODES)):
            if getattr(par, key) not in allowed:
                raise ConfigError(f"parallel.{key}={getattr(par, key)!r} is unknown; use one of {list(allowed)}")
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        par.shard = resolve_shard(par.shard, dp * sp, cuda, bool(train.window) and par.pp > 1, par.offload_optimizer)
        if train.dtype not in ("float32", "float64"):
            raise ConfigError(f"train.dtype={train.dtype!r} is unknown; use float32 or float64")
        if train.steps < 1:
            raise ConfigError(f"train.steps={train.steps} must be a positive integer")
        if train.lr is None or not (train.lr > 0 and math.isfinite(train.lr)):
            raise ConfigError(f"train.lr={train.lr} must be positive and finite, e.g. train.lr=3e-4")
        if train.eval_batches < 0:
            raise ConfigError(f"train.eval_batches={train.eval_batches} must be ≥ 0 (0: no evaluation)")
        if train.loss_chunk < 0 or train.window < 0 or train.mlp_tile < 0:
            raise ConfigError("train.loss_chunk, train.window and train.mlp_tile must be ≥ 0 (0: off)")
        if train.window and "A" in m.layer_kinds():
            raise ConfigError(f"train.window={train.window} streams recurrent layer stacks (model.layout of L, M and "
                              f"D); softmax layers (A) cannot stream: set train.window=0 for this layout")
        if par.offload_optimizer and par.shard == "none":
            raise ConfigError("parallel.offload_optimizer=true offloads sharded state; set parallel.shard=optimizer "
                              "or parallel.shard=full")
        if train.window and par.pp > 1 and par.shard != "none":
            raise ConfigError(f"train.window over {par.pp} pipeline stages does not run with parallel.shard="
                              f"{par.shard} yet; set parallel.shard=none or parallel.pp=1")
        if train.window and sp > 1 and (train.seq_len % train.window or train.window % num_shards(sp, par.layout)):
            raise ConfigError(f"under sp={sp} train.window={train.window} must divide train.seq_len={train.seq_len} "
                              f"and split into {num_shards(sp, par.layout)} equal {par.layout} shards")
        if train.skip_nonfinite < 0:
            raise ConfigError(f"train.skip_nonfinite={train.skip_nonfinite} must be ≥ 0")
        if not (par.timeout_s > 0 and math.isfinite(par.timeout_s)):
            raise ConfigError(f"parallel.timeout_s={par.timeout_s} must be a positive number of seconds")
        if train.seq_len < 1 or train.batch_size < 1:
            raise ConfigError("train.seq_len and train.batch_size must be positive")
        shards = num_shards(sp, par.layout)
        if train.seq_len % shards:
            raise ConfigError(
                f"train.seq_len={train.seq_len} does not split into {shards} equal {par.layout} shards for sp={sp}; "
                f"use a multiple of {shards}"
            )
        if train.batch_size % dp:
            raise ConfigError(
                f"train.batch_size={train.batch_size} is not divisible by dp={dp}; use a multiple of {dp}"
            )
        per_replica = train.batch_size // dp
        if per_replica % par.microbatches:
            raise ConfigError(
                f"parallel.microbatches={par.microbatches} does not divide the {per_replica} sequences per dp replica; "
                f"use a divisor of {per_replica}"
            )
        if "A" in m.layer_kinds() and sp > 1 and par.sp_attention == "ulysses" and m.kv_heads % sp:
            raise ConfigError(f"ulysses needs model.n_kv_heads={m.kv_heads} divisible by sp={sp}")
        if m.delta_window and sp > 1:
            raise ConfigError(f"model.delta_window={m.delta_window} applies with parallel.sp=1 (under sp each rank's "
                              f"shard already bounds the kernels' transients); set model.delta_window=0")
        kind, _, where = self.data.source.partition(":")
        if kind not in ("synthetic", "zarr") or not where:
            raise ConfigError(f"data.source={self.data.source!r} is unknown; use synthetic:mqar, synthetic:passkey, "
                              f"synthetic:zipf or zarr:PATH")
        if kind == "synthetic":
            from runtime.synthetic import SyntheticTask

            SyntheticTask(where, m.vocab_size, train.seq_len, train.seed, self.data.num_pairs,
                          self.data.passkey_digits)  # checks the task and its settings
        if kind == "zarr":
            from runtime.data import open_store

            group, attrs = open_store(where)
            rows = group["tokens"].shape[0]
            if rows < train.batch_size:
                raise ConfigError(f"token store {where!r} holds {rows} sequences, fewer than train.batch_size="
                                  f"{train.batch_size}; set train.batch_size ≤ {rows} or add data")
            if attrs["seq_len"] != train.seq_len:
                raise ConfigError(f"token store {where!r} has rows of {attrs['seq_len']} tokens but train.seq_len="
                                  f"{train.seq_len}; set train.seq_len={attrs['seq_len']} or prepare the data again")
            if attrs["vocab_size"] > m.vocab_size:
                raise ConfigError(f"token store {where!r} has a vocabulary of {attrs['vocab_size']} but "
                                  f"model.vocab_size={m.vocab_size}; set model.vocab_size={attrs['vocab_size']}")
        if self.run.report_every < 1:
            raise ConfigError(f"run.report_every={self.run.report_every} must be ≥ 1")
        if self.run.checkpoint_every < 0 or self.run.keep < 1:
            raise ConfigError("run.checkpoint_every must be ≥ 0 and run.keep ≥ 1")
        if self.run.log_every < 1:
            raise ConfigError(f"run.log_every={self.run.log_every} must be ≥ 1")


_ANNOTATED = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def _coerce(value, annotation, where: str):
    """Check/convert a TOML or command-line value to the field's type."""
    if isinstance(annotation, str):  # `from __future__ import annotations`: "int", "int | None", …
        options = tuple(_ANNOTATED[part.strip()] for part in annotation.split("|"))
        annotation = options[0] if len(options) == 1 else typing.Union[options]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, options[0], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    fix = {bool: "true or false", int: "a whole number", float: "a number"}.get(annotation, "a string")
    raise ConfigError(f"{where}={value!r} is not a valid {getattr(annotation, '__name__', annotation)}; use {fix}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, str]]:
    """["train.lr=1e-3", ...] → {"train": {"lr": "1e-3"}}."""
    out: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise ConfigError(f"override {pair!r} is not of the form section.key=value (e.g. train.lr=1e-3)")
        out.setdefault(section, {})[name] = value.strip()
    return out


def read_toml(path: str | Path, what: str, example: str) -> dict:
    """A TOML file's tables; a missing or malformed file is a one-line ConfigError naming `what` it should be."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; pass a TOML file such as {example}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """The default job, updated by a TOML file, then by `section.key=value` overrides."""
    raw: dict[str, dict] = {} if path is None else read_toml(path, "config file", "configs/tiny.toml")
    for section, values in parse_overrides(overrides or []).items():
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"[{section}] in the config file must be a table")
        raw.setdefault(section, {}).update(values)

    sections = _fields(JobConfig)
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; use one of {list(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{section} must be a table of keys, e.g. [{section}]")

    model_values = dict(raw.get("model", {}))
    name = str(model_values.pop("preset", "tiny"))
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; use one of {sorted(PRESETS)}")
    cfg = JobConfig(model=ModelConfig(preset=name, **PRESETS[name]))
    cfg.train.lr = PRESET_LR[name]  # unless the file or an override sets train.lr below
    for section, values in raw.items():
        target = getattr(cfg, section)
        known = _fields(type(target))
        for key, value in values.items():
            if section == "model" and key == "preset":
                continue
            if key not in known:
                raise ConfigError(f"unknown config key {section}.{key}; known keys: {', '.join(sorted(known))}")
            setattr(target, key, _coerce(value, known[key].type, f"{section}.{key}"))
    return cfg
