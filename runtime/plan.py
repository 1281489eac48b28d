"""The cost model behind `longtrain plan` (DESIGN §11): per-rank peak memory and step time of a job, before launch.

Memory per rank (busiest pipeline stage): the runtime's own (`process_gib`: a CPU rank's resident set before the
job's tensors; 0 on CUDA, whose measured peak counts allocated tensors only), the model state exactly as the stage
allocates it (`runtime.memory.stage_state`: parameters, gradients, AdamW state — under parallel.shard=optimizer |
full rank 0's dim-0 shards over N = dp·sp, the largest — plus, when sharded, the gathered bf16 working copies
(optimizer: the whole stage; full: the root and two blocks) and the fp32 gradients not yet reduce-scattered (one
block, or the stage with several micro-batches)), the activation terms of `runtime.memory` (stored layer inputs,
carried window states, one layer's internals, fitted on the H200, less the gradients not yet allocated when the
activations peak), and the other transients: the loss chunk, softmax attention's gathered K, V, LASP-2's gathered
states, the flat gradient buffer of the replica all-reduce (after backward).

Step time (busiest stage, one step):

    compute   GEMM FLOPs / F_gemm: 3 passes of every GEMM, r more of those a re-materialized forward repeats (not
              the down projection; under remat_policy=selective not the widening ones: `recomputed_gemm`), with
              train.mlp_tile one more forward of the SwiGLU's gate/up GEMM (its tiled backward) and none of the
              SwiGLU's in a full recompute, and
              (W − 1)/W more of every GEMM with train.window in W windows (each but the last is run twice), plus
              window_overhead per layer and window; linear-attention tokens / kernel rate; causal softmax FLOPs /
              F_attention (cuDNN's rate where model.attention_backend takes it); elementwise bytes / copy
              bandwidth; the loss; the optimizer (parallel.offload_optimizer: host_optimizer_ns per parameter);
              parallel.offload: the stored layer inputs out and back over the host link, overlapped with compute
    comm      every collective of the stage as α + bytes / B_link (LASP-2 states, K/V all-gathers, ring, Ulysses
              all-to-all, halos, pipeline sends); ring attention's traffic hides behind its block compute
    host      per layer and micro-batch layer_overhead · (3 + r)/3 (+ chunk_overhead per chunk of a recurrent
              layer's local sequence: the CPU path loops over chunks), and step_overhead once per step: the host
              time a CPU spends dispatching ops (`longtrain calibrate` measures them on a CPU; 0 on CUDA); all
              × shared_host_factor when several ranks share one node's cores (calibrate: two probe ranks at once),
              and the per-layer part × peer_wait_factor as communication (their waits for each other in collectives)
    bubble    (P − 1)/M of the stage's time (GPipe fill–drain)
    sync      the gradient all-reduce over sp and dp and the tied embedding pair, after backward; sharded: one
              reduce-scatter of the stage's fp32 gradients over dp·sp instead of the all-reduce
    sharding  optimizer: one all-gather of each block's bf16 parameters per micro-batch; full: two (forward, and
              again in backward); the root's once per micro-batch; (N−1)/N of the bytes each (no overlap credited)

r is the number of recomputed forwards: 1 for `parallel.remat=always`, (M−1)/M for `except_last`, plus (W−1)/W
with `train.window`. B_link is the node's collective bandwidth for a group inside one node and the inter-node
bandwidth per GPU otherwise (sp innermost, then pp, then dp). The constants come from a hardware file
(configs/hardware/*.toml, or `longtrain calibrate`); ELEMENTWISE_BYTES, LOSS_BYTES and the H200's
window_overhead_ms are fitted to the measured `1b` / `3b` steps on the Triton SwiGLU, RMSNorm and cross-entropy
(2026-12-02, tenth session: within 5 % of all eleven — selective recomputation at 4K×32, 32K and 128K, 16K /
32K / 64K windows with and without recomputation, 32K–4M tokens, the 3b at 128K; tests/runtime/test_plan.py).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from models.config import RECURRENT_KINDS, ModelConfig
from runtime.config import JobConfig, read_toml, resolve_shard
from runtime.errors import ConfigError
from runtime.memory import (
    SHARD_MODES,
    activation_bytes,
    gradients_absent,
    mlp_tiled,
    resolve_remat_policy,
    stage_state,
    widening_width,
)

HARDWARE_DIR = Path(__file__).resolve().parents[1] / "configs" / "hardware"
REFERENCE_HKV = 16 * 128 * 128  # the head geometry the kernel rates are measured at (H × K × V)
ELEMENTWISE_BYTES = 22.5  # device-memory bytes per token and layer, in units of (4d + 3f), of a fwd+bwd (fitted)
LOSS_BYTES = 6.0  # bytes per token and vocabulary entry moved by the chunked head + cross-entropy (fitted)
LOSS_MEMORY_BYTES = 10.0  # live bytes per token and vocabulary entry of one loss chunk (bf16 logits, fp32, grad)
OPTIMIZER_BYTES = 40.0  # bytes per parameter moved by clipping, the norm and fused AdamW
GIB = 2.0**30
# a Gated DeltaNet layer's chunked kernels in units of a (gated) linear layer's, fwd+bwd, measured on an H200:
# `benchmarks/delta_rule.py` 1×1M, H 16, K = V 128: 180.7 ms (benchmarks/RESULTS.md, fifteenth session) against the
# linear layer's 1M / la_gate_tokens_per_s = 43.5 ms
DELTA_COST = 4.15
# a block's elementwise device traffic (norms, gates, short convs, activations) in units of a linear-attention
# block's, by the kind of its mixer: fitted to measured H200 steps at 128K under full recomputation
# (benchmarks/RESULTS.md, sixteenth session: gdn-1b (D) 2306 ms with q and k's L2 norms on the Triton norm kernel,
# mamba2-1b (M) 2194 ms on kernels.ssd_inputs and kernels.gated_norm), checked against their selective, windowed and
# offloaded steps (tests/runtime/test_plan.py). D adds L2 norms of q and k, β, the gate and three short convs; M its
# 2d-wide inner stream (convs of x, B and C, the broadcast of B and C to heads, Δ, the gated norm)
KIND_ELEMENTWISE = {"L": 1.0, "A": 1.0, "D": 1.07, "M": 1.41}
LIMIT_SHARE = 0.10  # `--scaling`: a method stops scaling where its communication passes this share of compute


@dataclass
class Hardware:
    """The measured constants of one device kind (a `[hardware]` table of a TOML file)."""

    name: str
    memory_gib: float
    peak_tflops: float
    gemm_tflops: float
    attention_tflops: float
    la_tokens_per_s: float
    la_gate_tokens_per_s: float
    la_forward_tokens_per_s: float
    copy_gbps: float
    intra_node_gbps: float
    inter_node_gbps: float
    latency_us: float
    gpus_per_node: int
    source: str = ""
    # host time the device does not hide (a CPU runs every op in the Python thread; CUDA queues kernels ahead, 0):
    layer_overhead_ms: float = 0.0  # per layer and micro-batch, forward + backward (× (3 + r)/3 with recompute)
    chunk_overhead_ms: float = 0.0  # per chunk of a recurrent layer's local sequence and micro-batch, likewise
    step_overhead_ms: float = 0.0  # per step: embedding, loss, optimizer loop, gradient norm
    process_gib: float = 0.0  # memory the runtime holds besides the job's tensors (a CPU rank's resident set)
    autocast_bf16: bool = True  # layers run under bf16 autocast (CUDA); False: in the parameters' dtype (CPU)
    attention_cudnn_tflops: float = 0.0  # causal attention on cuDNN (model.attention_backend auto | cudnn); 0: none
    host_link_gbps: float = 0.0  # device ↔ pinned host copies (parallel.offload's layer inputs); 0: not modelled
    host_optimizer_ns: float = 0.0  # ns per parameter of a step with parallel.offload_optimizer (copies + CPU AdamW)
    window_overhead_ms: float = 0.0  # per layer and window of a streamed sequence (train.window): its fixed cost
    # the host terms above × this when several ranks run on one node and share its CPU cores (a CPU: `longtrain
    # calibrate` times its host probe as one rank and as two ranks at once); 1: not modelled (CUDA, older files)
    shared_host_factor: float = 1.0
    # ranks sharing a node's cores also wait in their collectives for each other: this × a stage's one-rank host
    # time per layer, as communication (a CPU: calibrate's two-rank probe, timed inside its collectives); 0: none
    peer_wait_factor: float = 0.0
    # runtime.metrics.speed_anchor_s while the host probe ran (ms; a CPU profile): the machine's speed that the host
    # terms above were measured at. A point timed beside its own anchor (run.speed_anchor) is predicted at its
    # speed by × its anchor / this one (`longtrain report`); 0: not measured
    anchor_ms: float = 0.0
    # the same while the two-rank probe ran: the reference of points with two ranks on a node, whose anchor runs
    # beside a rank waiting at a barrier and reads slower than one rank's alone; 0: not measured
    shared_anchor_ms: float = 0.0


def load_hardware(spec: str, inter_node_gbps: float | None = None, gpus_per_node: int | None = None) -> Hardware:
    """A shipped profile by name (h200, h100, a100) or a TOML file (`longtrain calibrate` writes one);
    `inter_node_gbps` (GB/s per GPU) and `gpus_per_node` override the file's."""
    path = Path(spec)
    if not path.is_file():
        path = HARDWARE_DIR / f"{spec.lower()}.toml"
    if not path.is_file():
        names = sorted(p.stem for p in HARDWARE_DIR.glob("*.toml"))
        raise ConfigError(f"--gpu {spec!r} is neither a hardware file nor one of {names}; "
                          f"pass a name or a file written by `longtrain calibrate`")
    raw = read_toml(path, "hardware file", "configs/hardware/h200.toml").get("hardware", {})
    try:
        hw = Hardware(**raw)
    except TypeError as e:
        known = ", ".join(f.name for f in dataclasses.fields(Hardware))
        raise ConfigError(f"hardware file {str(path)!r} is not a [hardware] table of {known}: {e}") from None
    for f in dataclasses.fields(Hardware):  # numbers must be numbers, flags flags (TOML keeps "1.0" a string)
        value, kind = getattr(hw, f.name), {"str": str, "bool": bool, "int": int}.get(f.type, float)
        ok = isinstance(value, bool) if kind is bool else isinstance(value, kind) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"hardware file {str(path)!r}: {f.name} = {value!r} is not a {kind.__name__}; "
                              f"write it as in configs/hardware/h200.toml")
    if hw.peer_wait_factor < 0:
        raise ConfigError(f"hardware file {str(path)!r}: peer_wait_factor = {hw.peer_wait_factor} is negative; "
                          f"0 means not modelled, as the shipped profiles have")
    for name in ("anchor_ms", "shared_anchor_ms"):
        if getattr(hw, name) < 0:
            raise ConfigError(f"hardware file {str(path)!r}: {name} = {getattr(hw, name)} is negative; "
                              f"0 means not measured, as the shipped profiles have")
    if hw.shared_host_factor < 1:
        raise ConfigError(f"hardware file {str(path)!r}: shared_host_factor = {hw.shared_host_factor} is below 1; "
                          f"1 means not modelled (ranks sharing cores are never faster), as calibrate writes")
    if inter_node_gbps is not None:
        hw.inter_node_gbps = inter_node_gbps
    if gpus_per_node is not None:
        hw.gpus_per_node = gpus_per_node
    return hw


@dataclass
class Plan:
    """One job's prediction: memory terms (GiB per rank) and time terms (seconds per step)."""

    cfg: JobConfig
    hardware: Hardware
    world: int
    dp: int
    pp: int
    sp: int
    shard: str
    memory: dict[str, float]  # GiB: parameters, gradients, optimizer, stored, windows, transient terms
    peak_gib: float
    compute: dict[str, float]
    comm: dict[str, float]
    bubble_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.hardware.memory_gib

    @property
    def compute_s(self) -> float:
        return sum(self.compute.values())

    @property
    def comm_s(self) -> float:
        return sum(self.comm.values())


@functools.lru_cache(maxsize=64)
def _geometry(model_key: tuple, pp: int, dtype: str) -> tuple:
    """(GEMM weights per layer, stage layer ranges, unsharded stage states, total parameters, parameters per
    layer) of a model config."""
    import torch

    from models import LinearLlama, ModelConfig, num_parameters
    from parallel.pipeline import partition
    from runtime.parallelize import layer_costs_by_params

    mcfg = ModelConfig(*model_key)
    with torch.device("meta"):
        model = LinearLlama(mcfg)
    gemm = [sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
            for block in model.layers.values()]
    down = [block.mlp.down.weight.numel() for block in model.layers.values()]
    ranges = partition(layer_costs_by_params(mcfg), pp)
    job = JobConfig(model=mcfg)
    job.train.dtype = dtype
    blocks = [num_parameters(block) for block in model.layers.values()]
    return gemm, ranges, stage_state(job, pp), num_parameters(model), blocks, down


def _link_gbps(hw: Hardware, stride: int, size: int, world: int) -> float:
    """A group of `size` ranks `stride` apart: inside one node if it spans at most a node."""
    if world <= hw.gpus_per_node or stride * size <= hw.gpus_per_node:
        return hw.intra_node_gbps
    return hw.inter_node_gbps


def _collective(hw: Hardware, nbytes: float, gbps: float) -> float:
    return hw.latency_us * 1e-6 + nbytes / (gbps * 1e9)


def recompute_passes(cfg: JobConfig) -> float:
    """Extra forward passes per step relative to one forward + backward (DESIGN §5, §9): the layer re-runs of
    parallel.remat, and with train.window `_rebuilt_passes` more."""
    return _remat_passes(cfg) + _rebuilt_passes(cfg)


def stream_windows(cfg: JobConfig) -> int:
    """Windows a streamed sequence runs in (0 without train.window)."""
    t = cfg.train
    return -(-t.seq_len // t.window) if t.window else 0


def _rebuilt_passes(cfg: JobConfig) -> float:
    """With train.window, the share of a forward run twice: every window but the last runs once without autograd
    (to carry its state on) and again before its backward, (W − 1)/W; over pipeline stages every window does."""
    W = stream_windows(cfg)
    if not W:
        return 0.0
    return 1.0 if cfg.parallel.pp > 1 else (W - 1) / W


def _remat_passes(cfg: JobConfig) -> float:
    par, m = cfg.parallel, cfg.parallel.microbatches
    return {"never": 0.0, "always": 1.0, "except_last": (m - 1) / m}[par.remat]


def recomputed_gemm(cfg: JobConfig, kind: str, gemm: int, down: int, tiled: bool = False) -> int:
    """Weights of one block's GEMMs a re-materialized forward runs again: not SwiGLU's down projection (backward
    needs nothing after it), and under remat_policy=selective not the widening ones either (their outputs are
    kept: `runtime.memory.widening_width`). With a `tiled` MLP (`mlp_tiled`) under full recomputation none of the
    SwiGLU's (the block's recompute skips it: parallel.tiling's ends_region; its tiled backward runs the gate/up
    GEMM again, counted apart); selective recomputation replays it, down projection included."""
    selective = cfg.parallel.remat_policy == "selective"
    kept = cfg.model.dim * widening_width(cfg, kind) if selective else 0
    if tiled:
        return max(0, gemm - kept) if selective else max(0, gemm - 3 * down)
    return max(0, gemm - down - kept)


def recurrence_geometry(m: ModelConfig, kind: str) -> tuple[float, bool, int, int]:
    """A recurrent layer's chunked kernels and what LASP-2 and the halo move, per token and row: (kernel work in
    units of the calibrated linear layer's, H·K·V over REFERENCE_HKV times DELTA_COST for D; whether its decay is
    per token (the gated rate); floats of its LASP-2 state per shard; channels of its conv halo). L: n_heads
    heads of K = V = head_dim, state [M | log A]; D: the same heads, state [P | M] (K·(K+V)); M (Mamba-2, DESIGN
    §12): inner/P heads with K = N (state width), V = P (head width), a per-token decay, convolving x, B and C."""
    if kind == "M":
        heads = m.ssm_expand * m.dim // m.ssm_head_dim
        hkv = heads * m.ssm_state * m.ssm_head_dim
        conv = m.ssm_expand * m.dim + 2 * m.ssm_groups * m.ssm_state
        return hkv / REFERENCE_HKV, True, heads * (m.ssm_state * m.ssm_head_dim + 1), conv
    hkv = m.n_heads * m.head_dim * m.head_dim
    if kind == "D":
        return DELTA_COST * hkv / REFERENCE_HKV, True, m.n_heads * m.head_dim * 2 * m.head_dim, 3 * m.dim
    return hkv / REFERENCE_HKV, m.gate, m.n_heads * m.head_dim * (m.head_dim + 1), 3 * m.dim


def plan_job(cfg: JobConfig, world: int, hw: Hardware, shard: str | None = None) -> Plan:
    """Predict `cfg` on `world` ranks of `hw` (cfg must validate for `world`); `shard` overrides parallel.shard."""
    from parallel.layout import num_shards
    from runtime.mesh import resolve_dims
    from runtime.metrics import flops_per_token

    policy = resolve_remat_policy(cfg, world, hw.memory_gib if hw.autocast_bf16 else None)  # auto: as the job would
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, remat_policy=policy))
    m, t, par = cfg.model, cfg.train, cfg.parallel
    dp, pp, sp = resolve_dims(world, par.dp, par.pp, par.sp)
    shard = resolve_shard(par.shard if shard is None else shard, dp * sp, True, bool(t.window) and pp > 1,
                          par.offload_optimizer)
    if shard not in SHARD_MODES:
        raise ConfigError(f"shard mode {shard!r} is not modelled by the plan (see `longtrain presets`); "
                          f"use one of {list(SHARD_MODES)}")
    replicas = dp * sp
    sharded = shard != "none" and (replicas > 1 or par.offload_optimizer)  # runtime.parallelize.sharded
    gemm, ranges, whole, n_params, blocks, down = _geometry(dataclasses.astuple(m), pp, t.dtype)
    states = stage_state(cfg, pp, shard, replicas) if sharded else whole  # rank 0's shards: the largest
    kinds = m.layer_kinds()
    width = 8 if t.dtype == "float64" else 4
    M = par.microbatches
    rows = t.batch_size // dp
    local = t.seq_len // sp
    tokens = rows * local  # this rank's tokens per step
    mb_rows = rows / M
    r = recompute_passes(cfg)
    r_layer, rebuilt, n_windows = _remat_passes(cfg), _rebuilt_passes(cfg), stream_windows(cfg)
    tiled = mlp_tiled(cfg, sp)
    sp_gbps = _link_gbps(hw, 1, sp, world)
    pp_gbps = _link_gbps(hw, sp, pp, world)
    dp_gbps = _link_gbps(hw, sp * pp, dp, world)
    alpha = hw.latency_us * 1e-6
    shard_gbps = sp_gbps if dp == 1 else dp_gbps  # the stage's dp × sp ranks, flattened
    compute_width = 2 if t.dtype == "float32" else width  # bf16 working copies on CUDA
    n_local = num_shards(sp, par.layout) // sp
    cudnn = m.attention_backend in ("auto", "cudnn") and hw.attention_cudnn_tflops > 0
    attention_tflops = hw.attention_cudnn_tflops if cudnn else hw.attention_tflops

    sharing = min(world, hw.gpus_per_node) > 1  # ranks sharing a node's cores
    shared = hw.shared_host_factor if sharing else 1.0

    # a recurrent layer's host time grows with its chunks (the CPU path loops over them): per micro-batch and rank
    chunks = -(-local // m.chunk_size)
    stages = []
    for s, (start, end) in enumerate(ranges):
        recurrent = sum(kinds[i] in RECURRENT_KINDS for i in range(start, end))
        per_pass_ms = (end - start) * hw.layer_overhead_ms + recurrent * chunks * hw.chunk_overhead_ms
        c = dict(gemm=0.0, linear_attention=0.0, softmax_attention=0.0, elementwise=0.0, loss=0.0,
                 host_overhead=M * (3 + r) / 3 * per_pass_ms / 1e3 * shared,
                 window_overhead=(end - start) * M * n_windows * hw.window_overhead_ms / 1e3)
        k = dict(lasp2=0.0, halo=0.0, softmax_sp=0.0, pipeline_p2p=0.0)
        if sharing and hw.peer_wait_factor:
            k["peer_wait"] = hw.peer_wait_factor * c["host_overhead"] / shared
        for i in range(start, end):
            # a tiled SwiGLU's backward runs its gate/up GEMM again, not the down projection (tiled_residual)
            again = (r_layer * recomputed_gemm(cfg, kinds[i], gemm[i], down[i], tiled) + rebuilt * gemm[i]
                     + (2 * down[i] if tiled else 0))
            c["gemm"] += 2 * (3 * gemm[i] + again) * tokens / (hw.gemm_tflops * 1e12)
            c["elementwise"] += tokens * ELEMENTWISE_BYTES * KIND_ELEMENTWISE.get(kinds[i], 1.0) * (
                4 * m.dim + 3 * m.ffn_dim) * (1 + r / 3) / (hw.copy_gbps * 1e9)
            # collectives per layer and step: forward, backward, recomputed forwards — in each streamed window
            passes = M * (2 + r) * max(1, n_windows)
            if kinds[i] in RECURRENT_KINDS:  # L, D (its UT transform and sweeps: DELTA_COST linear layers), M
                work, gated, state_floats, conv_channels = recurrence_geometry(m, kinds[i])
                la_rate = hw.la_gate_tokens_per_s if gated else hw.la_tokens_per_s
                c["linear_attention"] += work * tokens * (1 / la_rate + r / hw.la_forward_tokens_per_s)
                if sp > 1:
                    state = (sp - 1) * n_local * mb_rows * state_floats * 4
                    k["lasp2"] += passes * _collective(hw, state, sp_gbps)
                    if m.short_conv > 1:
                        halo = n_local * mb_rows * (m.short_conv - 1) * conv_channels * 2
                        k["halo"] += passes * _collective(hw, halo, sp_gbps)
            else:
                flops = 2.0 * rows * t.seq_len**2 * m.n_heads * m.head_dim / sp
                attn = flops * (3.5 + r) / (attention_tflops * 1e12)
                c["softmax_attention"] += attn
                if sp > 1:
                    kv = mb_rows * t.seq_len * 2 * m.kv_heads * m.head_dim * 2 * (sp - 1) / sp
                    if par.sp_attention == "allgather":
                        k["softmax_sp"] += passes * _collective(hw, kv, sp_gbps)
                    elif par.sp_attention == "ring":  # P2P blocks overlap the block compute
                        k["softmax_sp"] += max(0.0, passes * _collective(hw, kv, sp_gbps) - attn) + \
                            passes * (sp - 1) * alpha
                    else:  # ulysses: q, k, v in and o out per pass
                        a2a = mb_rows * local * (2 * m.n_heads + 2 * m.kv_heads) * m.head_dim * 2 * (sp - 1) / sp
                        k["softmax_sp"] += passes * _collective(hw, a2a, sp_gbps)
        if s == pp - 1:
            c["gemm"] += 2 * m.dim * m.vocab_size * tokens * 3 / (hw.gemm_tflops * 1e12)
            c["loss"] += tokens * m.vocab_size * LOSS_BYTES / (hw.copy_gbps * 1e9)
        if pp > 1:
            act = mb_rows * local * m.dim * 4
            k["pipeline_p2p"] += 2 * _collective(hw, act, pp_gbps)  # the sends no other work hides
        if sharded and replicas > 1:
            gathers = 2 if shard == "full" else 1  # per block and micro-batch: forward (and backward when full)
            root = whole[s].params // width - sum(blocks[start:end])
            k["fsdp_allgather"] = M * (sum(gathers * _collective(hw, (replicas - 1) / replicas * b * compute_width,
                                                                 shard_gbps) for b in blocks[start:end]) +
                                       _collective(hw, (replicas - 1) / replicas * root * compute_width, shard_gbps))
        stages.append((c, k))
    busiest = max(range(pp), key=lambda s: sum(stages[s][0].values()) + sum(stages[s][1].values()))
    compute, comm = dict(stages[busiest][0]), dict(stages[busiest][1])
    stage_s = sum(compute.values()) + sum(comm.values())
    bubble = (pp - 1) / M * stage_s

    heaviest = max(range(pp), key=lambda s: states[s].total)
    state = states[heaviest]
    grad_bytes = whole[heaviest].params  # the stage's gradients in the parameters' dtype
    sync = 0.0
    if sharded:  # one reduce-scatter of the fp32 gradients per step (accumulated over micro-batches unsharded)
        if replicas > 1:
            sync += _collective(hw, (replicas - 1) / replicas * grad_bytes, shard_gbps)
    else:
        for size, gbps in ((sp, sp_gbps), (dp, dp_gbps)):
            if size > 1:
                sync += _collective(hw, 2 * (size - 1) / size * grad_bytes, gbps)
    if pp > 1 and m.tie_embeddings:
        sync += _collective(hw, m.vocab_size * m.dim * width, _link_gbps(hw, sp * (pp - 1), 2, world))
    comm["gradient_sync"] = sync
    comm["small_collectives"] = 4 * alpha  # token count, loss, gradient norm
    compute["optimizer"] = state.params / width * OPTIMIZER_BYTES / (hw.copy_gbps * 1e9)
    compute["step_overhead"] = hw.step_overhead_ms / 1e3 * shared
    if sharded and par.offload_optimizer:  # gradients out, CPU AdamW, parameters back: instead of the device's
        compute["optimizer"] = state.params / width * hw.host_optimizer_ns * 1e-9
    act = activation_bytes(cfg, dp, pp, sp, compute_width if hw.autocast_bf16 else width)
    if par.offload and hw.host_link_gbps > 0:  # the stored layer inputs go out in forward and come back in backward,
        # on a side stream beside the compute (parallel/offload.py): only the part the stage's compute does not cover
        transfer = 2 * act["stored"] / (hw.host_link_gbps * 1e9)
        comm["activation_offload"] = max(0.0, transfer - stage_s)
    step = (stage_s + bubble + sync + comm["small_collectives"] + compute["optimizer"] + compute["step_overhead"]
            + comm.get("activation_offload", 0.0))

    stored = act["stored"]
    if par.offload:  # in host memory but for the layer in flight each way (parallel/offload.py)
        stored = min(stored, 2 * stored / max(1, -(-m.n_layers // pp)))
    mb_tokens = mb_rows * local
    loss_tokens = min(t.loss_chunk, mb_tokens) if t.loss_chunk else mb_tokens
    transient = {"layer": act["layer"], "loss_chunk": loss_tokens * m.vocab_size * LOSS_MEMORY_BYTES}
    if "A" in kinds and sp > 1:
        per = {"allgather": t.seq_len * 2 * m.kv_heads, "ring": 2 * 2 * local * m.kv_heads,
               "ulysses": t.seq_len * (m.n_heads + 2 * m.kv_heads) / sp}[par.sp_attention]
        transient["attention_kv"] = mb_rows * per * m.head_dim * 2 * 2  # the gathered tensors and their gradients
    recurrent = set(kinds) & set(RECURRENT_KINDS)
    if recurrent and sp > 1:  # every shard's state, gathered, and its gradient
        state_floats = max(recurrence_geometry(m, kind)[2] for kind in recurrent)
        transient["lasp2_states"] = mb_rows * sp * n_local * state_floats * 4 * 2
    largest = max(transient, key=transient.get)
    flat = grad_bytes if (sp > 1 or dp > 1) and not sharded else 0.0
    gathered = unsharded_grads = 0.0
    if sharded:  # runtime.memory.state_bytes: bf16 working copies, fp32 gradients before their reduce-scatter
        stage_params = whole[heaviest].params // width
        start, end = ranges[heaviest]
        block = max(blocks[start:end], default=0)
        root = stage_params - sum(blocks[start:end])
        gathered = compute_width * (stage_params if shard == "optimizer" else root + 2 * block)
        unsharded_grads = width * (stage_params if M > 1 else block)
    during_step = stored + act["windows"] + transient[largest]
    offloaded = sharded and par.offload_optimizer
    on_device = 0 if offloaded else state.total
    start, end = ranges[heaviest]
    first_block = width * (whole[heaviest].params // width - sum(blocks[start:end]) + max(blocks[start:end], default=0))
    absent = 0.0 if offloaded else gradients_absent(cfg, state.grads, first_block / (replicas if sharded else 1))
    peak = hw.process_gib * GIB + on_device + gathered + unsharded_grads + max(during_step - absent, flat, 0.0)
    memory = {"process": hw.process_gib, "parameters": state.params / GIB, "gradients": state.grads / GIB,
              "optimizer": state.optimizer / GIB,
              "gathered_parameters": gathered / GIB, "unsharded_gradients": unsharded_grads / GIB,
              "stored_activations": stored / GIB, "window_states": act["windows"] / GIB,
              **{f"transient_{k}": v / GIB for k, v in transient.items()}, "gradient_buffer": flat / GIB}
    tps = t.batch_size * t.seq_len / step
    mfu = tps * flops_per_token(m, t.seq_len, n_params) / (hw.peak_tflops * 1e12 * world)
    notes = [f"largest transient: {largest.replace('_', ' ')}"]
    if sharded and par.offload_optimizer:
        notes.append("parameters, gradients and optimizer state offloaded to CPU memory (not in the peak)")
    if flat > during_step:
        notes.append("the peak is the gradient all-reduce's flat buffer, after backward")
    return Plan(cfg=cfg, hardware=hw, world=world, dp=dp, pp=pp, sp=sp, shard=shard if sharded else "none",
                memory=memory,
                peak_gib=peak / GIB, compute=compute, comm=comm, bubble_s=bubble, step_s=step, tokens_per_s=tps,
                mfu=mfu, notes=notes)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


SEARCH_MLP_TILE = 16384  # the train.mlp_tile `search` also tries where a layer call holds more tokens than that


def search(cfg: JobConfig, world: int, hw: Hardware, top: int = 10) -> tuple[list[Plan], int]:
    """Every (dp, pp, sp, microbatches, remat, window, sp_attention, shard, mlp_tile) of `cfg` on `world` ranks that
    validates; returns those that fit, best predicted tokens/s first (at most `top`), and how many were tried.
    If none validates, the first setting's refusal is raised (a bad value of a field the search does not vary).
    mlp_tile: the config's, and SEARCH_MLP_TILE where it is off and a layer call holds more tokens (tiles cost a
    little time, so they rank first only where they are what makes a setting fit)."""
    from parallel.context import SOFTMAX_METHODS
    from parallel.pipeline import REMAT_MODES

    m, t = cfg.model, cfg.train
    kinds = m.layer_kinds()
    tried, fitting, refusal = 0, [], None
    for pp in _divisors(world):
        for sp in _divisors(world // pp):
            dp = world // (pp * sp)
            if pp > m.n_layers or t.batch_size % dp:
                continue
            rows = t.batch_size // dp
            micro = [d for d in _divisors(rows) if d >= pp or pp == 1] or [rows]
            windows = [0]
            if set(kinds) <= set(RECURRENT_KINDS) and pp == 1 and sp == 1:  # streamed windows: recurrent layers
                windows += [w for w in (t.seq_len >> k for k in range(1, 6)) if w >= 4096 and t.seq_len % w == 0]
            methods = list(SOFTMAX_METHODS) if "A" in kinds and sp > 1 else [cfg.parallel.sp_attention]
            shards = SHARD_MODES if dp * sp > 1 else ("none",)  # one rank per stage: nothing to shard
            tiles = [t.mlp_tile] + ([SEARCH_MLP_TILE] if not t.mlp_tile and t.seq_len // sp > SEARCH_MLP_TILE else [])
            for M, remat, window, method, shard, tile in itertools.product(micro, REMAT_MODES, windows, methods, shards,
                                                                           tiles):
                if tile and window and window <= tile:
                    continue  # the same setting as untiled
                c = copy.deepcopy(cfg)
                c.parallel.dp, c.parallel.pp, c.parallel.sp = dp, pp, sp
                c.parallel.microbatches, c.parallel.remat = M, remat
                c.parallel.sp_attention, c.train.window = method, window
                c.parallel.shard, c.train.mlp_tile = shard, tile
                try:
                    c.validate(world)
                except ConfigError as e:
                    refusal = refusal or e
                    continue
                tried += 1
                p = plan_job(c, world, hw)
                if p.fits:
                    fitting.append(p)
    if not tried and refusal is not None:
        raise refusal
    fitting.sort(key=lambda p: -p.tokens_per_s)
    return fitting[:top], tried


def scaling_table(cfg: JobConfig, hw: Hardware, gpus: list[int]) -> list[dict]:
    """Weak scaling of one sequence over sp = N GPUs (dp = pp = 1, the config's tokens per GPU): per layer and
    step, the compute of a linear and a softmax layer and the communication of each method, in milliseconds."""
    m, t = cfg.model, cfg.train
    local = t.seq_len // max(1, cfg.parallel.sp)
    rows = t.batch_size // max(1, cfg.parallel.dp or 1)
    rows_tokens = rows * local
    work, _, state_floats, _ = recurrence_geometry(m, "L")
    la = rows_tokens * work / hw.la_tokens_per_s
    gemm_w = 4 * m.dim * m.dim + 3 * m.dim * m.ffn_dim
    dense = 2 * gemm_w * rows_tokens * 3 / (hw.gemm_tflops * 1e12)
    out = []
    for n in gpus:
        seq = local * n
        gbps = _link_gbps(hw, 1, n, n)
        state = (n - 1) * 2 * rows * state_floats * 4
        kv = rows * seq * 2 * m.kv_heads * m.head_dim * 2 * (n - 1) / n
        a2a = rows * local * (2 * m.n_heads + 2 * m.kv_heads) * m.head_dim * 2 * (n - 1) / n
        softmax = 2.0 * rows * seq**2 * m.n_heads * m.head_dim / n * 3.5 / (hw.attention_tflops * 1e12)
        ring = max(0.0, 2 * _collective(hw, kv, gbps) - softmax) + 2 * (n - 1) * hw.latency_us * 1e-6
        out.append(dict(gpus=n, seq_len=seq, link="intra" if gbps == hw.intra_node_gbps else "inter",
                        linear_ms=1e3 * (la + dense), lasp2_ms=1e3 * 2 * _collective(hw, state, gbps),
                        softmax_ms=1e3 * (softmax + dense), allgather_ms=1e3 * 2 * _collective(hw, kv, gbps),
                        ring_exposed_ms=1e3 * ring,
                        ulysses_ms=1e3 * 2 * 2 * _collective(hw, a2a, gbps) if m.kv_heads % n == 0 else math.nan))
    return out


# -- text -------------------------------------------------------------------------------------------------------
SHARD_NOTES = {
    "none": "shard none: parameters, gradients and AdamW state replicated over dp × sp",
    "optimizer": "shard optimizer: rank 0's dim-0 shards over dp × sp (the largest), the stage's bf16 parameters "
                 "gathered from forward to backward",
    "full": "shard full: rank 0's dim-0 shards over dp × sp (the largest), bf16 parameters re-gathered per block in "
            "forward and backward"}


def describe(p: Plan) -> str:
    """The plan as the `plan` command prints it."""
    cfg, hw = p.cfg, p.hardware
    m, t, par = cfg.model, cfg.train, cfg.parallel
    nodes = -(-p.world // hw.gpus_per_node)
    lines = [f"plan: {m.preset} (layout {m.layout}), {p.world} × {hw.name} ({nodes} node(s) of {hw.gpus_per_node}) "
             f"= dp {p.dp} × pp {p.pp} × sp {p.sp}; batch {t.batch_size} × {t.seq_len:,} tokens, "
             f"M={par.microbatches}, remat={par.remat} ({par.remat_policy}), window={t.window}, "
             f"mlp_tile={t.mlp_tile}, sp_attention={par.sp_attention}",
             f"memory per rank (GiB, busiest stage) — {SHARD_NOTES[p.shard]}"]
    for key, value in p.memory.items():
        if value or key in ("parameters", "gradients", "optimizer"):
            lines.append(f"  {key.replace('_', ' '):<28}{value:10.2f}")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"  {'peak':<28}{p.peak_gib:10.2f}   of {hw.memory_gib:.1f} GiB: {verdict} ({'; '.join(p.notes)})")
    lines.append("step time (ms)")
    for group, terms in (("compute", p.compute), ("communication", p.comm)):
        lines.append(f"  {group:<28}{1e3 * sum(terms.values()):10.2f}")
        for key, value in terms.items():
            if value:
                lines.append(f"    {key.replace('_', ' '):<26}{1e3 * value:10.2f}")
    lines.append(f"  {'pipeline bubble':<28}{1e3 * p.bubble_s:10.2f}   (P−1)/M = {p.pp - 1}/{par.microbatches}")
    lines.append(f"  {'step':<28}{1e3 * p.step_s:10.2f}")
    lines.append(f"throughput: {p.tokens_per_s:,.0f} tokens/s, {p.tokens_per_s / p.world:,.0f} tokens/s/GPU, "
                 f"MFU {p.mfu:.1%} of {hw.peak_tflops:g} TFLOP/s (constants: {hw.source or hw.name})")
    return "\n".join(lines)


def describe_search(plans: list[Plan], tried: int, world: int, hw: Hardware) -> str:
    if not plans:
        return (f"search: none of the {tried} settings tried fits {world} × {hw.name} ({hw.memory_gib:.0f} GiB); "
                f"try more GPUs, a shorter train.seq_len or a smaller batch")
    head = f"{'rank':>4} {'dp':>3} {'pp':>3} {'sp':>3} {'M':>3} {'remat':>11} {'window':>8} {'mlp_tile':>8} " \
           f"{'sp_attn':>9} {'shard':>9} {'tokens/s':>12} {'tok/s/GPU':>10} {'MFU':>6} {'peak GiB':>9}"
    lines = [f"search: {len(plans)} best of the settings that fit ({tried} tried) on {world} × {hw.name}", head]
    for i, p in enumerate(plans, 1):
        par = p.cfg.parallel
        lines.append(f"{i:>4} {p.dp:>3} {p.pp:>3} {p.sp:>3} {par.microbatches:>3} {par.remat:>11} "
                     f"{p.cfg.train.window:>8} {p.cfg.train.mlp_tile:>8} {par.sp_attention:>9} {p.shard:>9} "
                     f"{p.tokens_per_s:>12,.0f} "
                     f"{p.tokens_per_s / p.world:>10,.0f} {p.mfu:>6.1%} {p.peak_gib:>9.1f}")
    lines.append("shard (parallel.shard, DESIGN §10): " + "; ".join(SHARD_NOTES.values()))
    return "\n".join(lines)


def describe_scaling(rows: list[dict], cfg: JobConfig, hw: Hardware) -> str:
    local = cfg.train.seq_len // max(1, cfg.parallel.sp)
    seqs = cfg.train.batch_size // max(1, cfg.parallel.dp or 1)
    lines = [f"scaling: {seqs} sequence(s) over sp = N GPUs, {local:,} tokens each per GPU, {hw.name}: "
             f"{hw.intra_node_gbps:g} GB/s inside a node of {hw.gpus_per_node}, {hw.inter_node_gbps:g} GB/s "
             f"per GPU between nodes; ms per layer and step (forward + backward)",
             f"{'GPUs':>5} {'seq_len':>14} {'link':>5} {'linear':>9} {'LASP-2':>9} {'softmax':>10} "
             f"{'allgather':>10} {'ring exp.':>10} {'ulysses':>9}"]
    for r in rows:
        uly = "—" if math.isnan(r["ulysses_ms"]) else f"{r['ulysses_ms']:.2f}"
        lines.append(f"{r['gpus']:>5} {r['seq_len']:>14,} {r['link']:>5} {r['linear_ms']:>9.2f} {r['lasp2_ms']:>9.3f} "
                     f"{r['softmax_ms']:>10.1f} {r['allgather_ms']:>10.2f} {r['ring_exposed_ms']:>10.2f} {uly:>9}")
    limits = []
    methods = (("LASP-2", "lasp2_ms", "linear_ms"), ("all-gather KV", "allgather_ms", "softmax_ms"),
               ("ring (exposed)", "ring_exposed_ms", "softmax_ms"), ("Ulysses", "ulysses_ms", "softmax_ms"))
    for name, key, base in methods:
        over = [r["gpus"] for r in rows if r[key] > LIMIT_SHARE * r[base]]
        usable = [r["gpus"] for r in rows if not math.isnan(r[key])]
        limits.append(f"{name} from {over[0]} GPUs" if over else
                      f"{name} none up to {usable[-1] if usable else '—'} GPUs")
    lines.append(f"communication above {LIMIT_SHARE:.0%} of its layer's compute: " + "; ".join(limits) +
                 ". LASP-2 moves N−1 states of B·H·K·V per rank (independent of the tokens), all-gather and ring the "
                 "whole K/V; Ulysses needs the kv heads divisible by N (—).")
    return "\n".join(lines)
