"""Linear-Llama: a Llama decoder whose mixers are linear attention (L) or softmax attention (A).

    h = embed(tokens)
    for each block:  h = h + mixer(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))
    logits = head(RMSNorm(h))

The model sees only this rank's part of the sequence; `set_sequence_parallel` tells the
mixers how the sequence is split (LASP-2 for linear layers, positions for RoPE).
Embedding, blocks, final norm and head are separate attributes (blocks in a ModuleDict
keyed by global layer index) so that a pipeline stage can drop what it does not own.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from kernels import linear_attention
from kernels.conv import short_conv
from kernels.norm import rms_norm
from kernels.swiglu import swiglu
from models.config import RECURRENT_KINDS, ModelConfig
from models.fused_weights import fused_weight
from parallel.attention import dense_attention, sp_attention
from parallel.context import SINGLE, SequenceParallel
from parallel.halo import previous_tokens
from parallel.lasp2 import lasp2_linear_attention
from parallel.layout import shard_ids, stack_local_shards, unstack_local_shards
from parallel.tiling import replaying_recompute, tiled_residual


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) ⊙ w over the last dim: on `kernels.norm`'s Triton kernels for CUDA inputs
    (backend auto or triton; the fp32 weight used as it is), else PyTorch's fused op."""

    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton" or (self.backend == "auto" and x.is_cuda):
            return rms_norm(x, self.weight, self.eps, self.backend)
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    """down(silu(x W_gate) ⊙ x W_up): one GEMM for gate and up, the elementwise part on `kernels.swiglu`
    (one Triton kernel each way on CUDA)."""

    def __init__(self, dim: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x W_gate) ⊙ x W_up."""
        gate_up = F.linear(x, fused_weight([self.gate.weight, self.up.weight]))  # one GEMM
        return swiglu(gate_up, backend=self.backend)


def retnet_log_decay(n_heads: int) -> torch.Tensor:
    """λ_h = log(1 − 2^(−5−h)): per-head constant log decay (RetNet slopes)."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(n_heads, dtype=torch.float64))).float()


class ShortConv(nn.Module):
    """Causal depthwise convolution of width w followed by SiLU (as in GLA / Mamba-2 / Based):
    y_t = silu(Σ_{i<w} W_i ⊙ x_{t−w+1+i}). The w−1 tokens before the input (the halo) are zeros at the
    sequence start, the previous shards' tails under sp (halo exchange), or the previous window's tail
    when the sequence streams through the model window by window."""

    def __init__(self, channels: int, width: int, backend: str = "auto"):
        super().__init__()
        self.width, self.backend = width, backend
        self.weight = nn.Parameter(torch.empty(channels, 1, width))

    def forward(self, x: torch.Tensor, sp: SequenceParallel, halo: torch.Tensor | None = None,
                split: list[int] | None = None):
        """y = silu(conv(x)); with `halo` (streaming: the w−1 inputs before this window, [B, w−1, D]) →
        (y, the last w−1 inputs of the window — of the whole window under sp, the same on every rank).
        With `split` (channel counts summing to D) y is a tuple of those parts, each a tensor of its own
        (one launch per part; the Triton kernel writes each contiguous, so the kernels downstream read them
        without copying them apart)."""
        keep = self.width - 1
        weight = self.weight.to(x.dtype)
        sizes = split or [x.shape[-1]]
        # split, not slicing: backward joins the parts' gradients in one cat (a slice would zero-fill all of x)
        xs, weights = x.split(sizes, dim=-1), weight.split(sizes, dim=0)
        if sp.world == 1:
            halos = [None] * len(sizes) if halo is None else halo.split(sizes, dim=-1)
            ys = [short_conv(*args, backend=self.backend) for args in zip(xs, weights, halos)]
            y = ys[0] if split is None else tuple(ys)
            if halo is None:
                return y
            tail = x[:, -keep:] if x.shape[1] >= keep else torch.cat([halo, x], dim=1)[:, -keep:]
            return y, tail.clone()  # a copy: a view would keep all of x alive while it is carried
        n_local = len(shard_ids(sp.rank, sp.world, sp.layout))
        stacked = stack_local_shards(x, n_local)
        halos, last = previous_tokens(stacked, keep, sp.group, sp.layout, first=halo, return_last=True)
        ys = [unstack_local_shards(short_conv(*args, backend=self.backend), n_local)
              for args in zip(stacked.split(sizes, dim=-1), weights, halos.split(sizes, dim=-1))]
        y = ys[0] if split is None else tuple(ys)
        return y if halo is None else (y, last)


Carry = tuple  # a linear layer's (state S [B, H, K, V] fp32, conv tail [B, w−1, 3d] or None) between windows


class LinearAttention(nn.Module):
    """Linear attention with per-head decay and an optional data-dependent gate (DESIGN §2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.chunk_size = cfg.n_heads, cfg.head_dim, cfg.chunk_size
        self.backend = cfg.backend
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.g = nn.Linear(cfg.dim, cfg.n_heads, bias=False) if cfg.gate else None
        self.conv = ShortConv(3 * cfg.dim, cfg.short_conv, cfg.backend) if cfg.short_conv > 1 else None
        self.out_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.backend)
        self.decay = cfg.decay
        self.register_buffer("log_decay", None, persistent=False)
        self.reset_buffers()
        self.sp = SINGLE

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """(Re)create the constant decay slopes, e.g. after `to_empty` on a meta-built model (on `device`, by
        default the weights' device)."""
        device = device or self.q.weight.device
        if self.decay == "retnet" and device.type != "meta":
            self.log_decay = retnet_log_decay(self.n_heads).to(device)

    def forward(self, x: torch.Tensor, carry: Carry | None = None, output: bool = True):
        """x [B, T, d] → output [B, T, d]; with `carry` = (S, tail) entering this window, → (output, carry
        leaving it): the state after the window's last token and the last w−1 conv inputs. `output=False`
        (with a carry): → (None, carry), skipping the output's norm and projection."""
        if not output and carry is None:
            raise ValueError("output=False needs a carry: only the carry leaving the window is returned")
        B, T, d = x.shape
        weights = [self.q.weight, self.k.weight, self.v.weight] + ([self.g.weight] if self.g is not None else [])
        qkvg = F.linear(x, fused_weight(weights))  # q, k, v and the gate logits in one GEMM
        qkv, g = qkvg.split([3 * d, qkvg.shape[-1] - 3 * d], dim=-1)  # backward: one cat, not two zero-fills
        state, halo = carry if carry is not None else (None, None)
        tail, parts = None, qkv.chunk(3, dim=-1)
        if self.conv is not None:  # q, k, v come out of the convolution as three contiguous tensors
            if halo is not None:
                parts, tail = self.conv(qkv, self.sp, halo.to(qkv.dtype), split=[d] * 3)
            else:
                parts = self.conv(qkv, self.sp, split=[d] * 3)
        q, k, v = (t.reshape(B, T, self.n_heads, self.head_dim) for t in parts)
        gate = F.logsigmoid(g.float()) / 16 if self.g is not None else None
        if self.sp.world > 1:
            o = lasp2_linear_attention(q, k, v, log_decay=self.log_decay, gate=gate, group=self.sp.group,
                                       layout=self.sp.layout, chunk_size=self.chunk_size, backend=self.backend,
                                       initial_state=state, output_final_state=carry is not None)
            if carry is not None:
                o, state = o
        else:
            o, state = linear_attention(q, k, v, log_decay=self.log_decay, gate=gate, chunk_size=self.chunk_size,
                                        backend=self.backend, initial_state=state,
                                        output_final_state=carry is not None)
        if not output:
            return None, (state, tail)
        out = self.o(self.out_norm(o).reshape(B, T, -1))
        return out if carry is None else (out, (state, tail))

    def zero_carry(self, batch: int, device: torch.device) -> Carry:
        """The carry entering the first window: a zero state and a zero conv tail."""
        state = torch.zeros(batch, self.n_heads, self.head_dim, self.head_dim, device=device, dtype=torch.float32)
        dtype = self.q.weight.dtype
        tail = None if self.conv is None else torch.zeros(batch, self.conv.width - 1, 3 * self.n_heads *
                                                          self.head_dim, device=device, dtype=dtype)
        return state, tail


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [B, T, H, D] at global `positions` [T] (rotate-half form)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs  # [T, D/2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Causal grouped-query attention with RoPE at global positions, on the kernel `model.attention_backend`
    picks (cuDNN / flash / math, the same block entry at sp = 1 and under every sp method)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.rope_theta, self.attention_backend = cfg.rope_theta, cfg.attention_backend
        self.q = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.sp = SINGLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v(x).view(B, T, self.kv_heads, self.head_dim)
        pos = self.sp.positions(T, device=x.device)
        q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        if self.sp.world > 1:
            o = sp_attention(q, k, v, method=self.sp.attention, group=self.sp.group, layout=self.sp.layout,
                             causal=True, backend=self.attention_backend)
        else:  # scale None: SDPA's own D^−½ on the math path, so CPU results are those of plain SDPA
            o = dense_attention(q, k, v, None, True, self.attention_backend)
        return self.o(o.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.backend)
        if kind == "M":
            from models.mamba2 import Mamba2  # it builds on this module's RMSNorm and ShortConv

            self.mixer = Mamba2(cfg)
        elif kind == "D":
            from models.gated_deltanet import GatedDeltaNet  # likewise

            self.mixer = GatedDeltaNet(cfg)
        else:
            self.mixer = LinearAttention(cfg) if kind == "L" else SoftmaxAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.backend)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim, cfg.backend)
        self.mlp_tile = 0  # > 0: the token-wise part runs in tiles of this many tokens (parallel.tiling)

    def forward(self, h: torch.Tensor, carry: Carry | None = None, output: bool = True):
        """h → h + mixer(norm(h)), then + SwiGLU(norm(h)); with a carry (linear layers streaming windows),
        → (h, carry leaving the window); `output=False` (with a carry): → (None, that carry) (`carry`)."""
        if not output:
            return self.mixer(self.mixer_norm(h), carry, output=False)
        if carry is None:
            return self._mlp(h + self.mixer(self.mixer_norm(h)))
        out, carry = self.mixer(self.mixer_norm(h), carry)
        return self._mlp(h + out), carry

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        """h + SwiGLU(RMSNorm(h)), in tiles of mlp_tile tokens when set (`parallel.tiling.tiled_residual`: the
        down projection is not recomputed; as the end of a re-materialized block, the block's recompute skips it)."""
        if self.mlp_tile <= 0 or h.shape[1] <= self.mlp_tile:
            return self.mlp_residual(h)
        params = [*self.mlp_norm.parameters(), self.mlp.gate.weight, self.mlp.up.weight]
        return tiled_residual(self.mlp_hidden, self.mlp.down, h, self.mlp_tile, params, ends_region=True)

    def carry(self, h: torch.Tensor, carry: Carry) -> tuple[None, Carry]:
        """Only the carry leaving the window, as `self(h, carry)` computes it: (None, the mixer's leaving carry),
        no mixer output, residual or MLP (for a pass that discards the output). It goes through `__call__`,
        so that hooks on the block (FSDP2's unshard) run."""
        return self(h, carry, output=False)

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        """h + SwiGLU(RMSNorm(h)): token-wise work only (`compile_token_wise` fuses its elementwise parts)."""
        return h + self.mlp(self.mlp_norm(h))

    def mlp_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The SwiGLU's hidden layer of RMSNorm(h), before its down projection (token-wise)."""
        return self.mlp.hidden(self.mlp_norm(h))

    def compile_token_wise(self) -> None:
        """torch.compile the block's purely token-wise part (norm, SwiGLU, residual) — its norm and SwiGLU's
        elementwise part as PyTorch ops, for the compiler to fuse; the mixer's kernels stay as they are."""
        self.mlp.backend = self.mlp_norm.backend = "torch"
        self.mlp_residual = torch.compile(self.mlp_residual)
        self.mlp_hidden = torch.compile(self.mlp_hidden)


class LinearLlama(nn.Module):
    """tokens [B, T_local] → logits [B, T_local, vocab]. Missing parts (None) pass their input on."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, kind) for i, kind in enumerate(cfg.layer_kinds())})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.backend)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.remat_policy = "full"  # what a re-materialized block keeps: "full" | "selective" (parallel.remat_policy)
        self.tie_weights()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Normal(0, init_std) weights, residual-output projections scaled by 1/√(2·n_layers), norms 1.

        Each parameter draws from its own generator seeded by (seed, its name), so a pipeline
        stage that holds only some layers initialises them exactly as the whole model would.
        """
        for module in self.modules():
            if isinstance(module, LinearAttention):
                module.reset_buffers()
        for name, p in self.named_parameters():
            if not p.is_meta:
                self.init_parameter_(name, p, seed)

    @torch.no_grad()
    def init_parameter_(self, name: str, p: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Fill `p` (the whole parameter `name`, or a tensor of its shape) with its initial value: a function
        of (seed, name) only — a sharded stage materialises each parameter whole, one at a time, with this."""
        std = self.cfg.init_std
        if name.endswith("norm.weight"):
            return p.fill_(1.0)
        key = "embed.weight" if name == "head.weight" and self.cfg.tie_embeddings else name
        field = None
        if name.endswith(("mixer.A_log", "mixer.dt_bias", "mixer.D")):  # Mamba-2 (Gated DeltaNet: A, Δ bias): all
            key, field = name.rsplit(".", 1)                              # drawn from A_log's generator
            key += ".A_log"
        gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        if field is not None:
            from models.mamba2 import ssm_initial_values

            return p.copy_(ssm_initial_values(p.shape[0], gen, p.device)[field])
        if name.endswith("conv.weight"):  # depthwise kernel: uniform ±1/√w, as PyTorch's Conv1d
            bound = 1.0 / math.sqrt(p.shape[-1])
            return p.uniform_(-bound, bound, generator=gen)
        scaled = name.endswith(("mixer.o.weight", "mlp.down.weight"))
        return p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers) if scaled else std, generator=gen)

    def tie_weights(self) -> None:
        """Share the embedding with the head (again: `to_empty` breaks the tie) when both are here."""
        if self.cfg.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.weight

    def keep_stage(self, layers: range, first: bool, last: bool) -> None:
        """Drop what a pipeline stage does not own: other layers, the embedding unless first,
        the final norm and head unless last. A tied head keeps its own copy of the weight."""
        for key in list(self.layers):
            if int(key) not in layers:
                del self.layers[key]
        if not first:
            self.embed = None
        if not last:
            self.norm = self.head = None

    def set_sequence_parallel(self, sp: SequenceParallel) -> None:
        """Run every mixer under the sequence-parallel split `sp`."""
        for block in self.layers.values():
            block.mixer.sp = sp

    def forward(self, x: torch.Tensor, checkpoint_layers: bool = False, logits: bool = True) -> torch.Tensor:
        """Tokens (first stage) or hidden states → logits (last stage; with `logits=False` the final-normed
        hidden states, for a loss that applies the head itself) or hidden states (other stages).
        `checkpoint_layers`: keep only each block's input and recompute the block in backward (the
        pipeline schedule decides, per micro-batch)."""
        h = _stream_dtype(self.embed(x) if self.embed is not None else x)
        for block in self.layers.values():
            h = self._checkpointed(block)(h) if checkpoint_layers else block(h)
        return self._head(h, logits)

    def _checkpointed(self, block: Callable):
        """`block` re-materialized in backward under `remat_policy`: "full" keeps only its input; "selective"
        also keeps the outputs of its widening matmuls (`_keep_widening_matmuls`)."""
        if self.remat_policy == "selective":
            return partial(checkpoint, block, use_reentrant=False, context_fn=_selective_contexts)
        return partial(checkpoint, block, use_reentrant=False)

    def forward_window(self, x: torch.Tensor, carries: dict[str, Carry], checkpoint_layers: bool = False,
                       logits: bool = True, carry_only: bool = False) -> tuple[torch.Tensor | None, dict[str, Carry]]:
        """One window of a sequence that streams through the model (DESIGN §9): as `forward`, each linear
        layer starting from the carry of the previous window; returns (output, carries leaving the window).
        `carry_only`: → (None, the same carries) for a pass that discards the output — the last block
        computes only its carry (`Block.carry`: no mixer output, no MLP) and the final norm / head are skipped."""
        h = _stream_dtype(self.embed(x) if self.embed is not None else x)
        leaving = {}
        last = next(reversed(self.layers.keys()), None) if carry_only else None
        for key, block in self.layers.items():
            step = block.carry if key == last else block
            run = self._checkpointed(step) if checkpoint_layers else step
            h, leaving[key] = run(h, carries[key])
        if carry_only:
            return None, leaving
        return self._head(h, logits), leaving

    def zero_carries(self, batch: int, device: torch.device) -> dict[str, Carry]:
        """Carries entering the first window; only pure linear-attention stacks stream."""
        if any(block.kind not in RECURRENT_KINDS for block in self.layers.values()):
            raise ValueError("streaming windows need a layout of recurrent layers only (model.layout of L, M and D)")
        return {key: block.mixer.zero_carry(batch, device) for key, block in self.layers.items()}

    def _head(self, h: torch.Tensor, logits: bool) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h) if self.head is not None and logits else h


def _selective_contexts() -> tuple:
    """Selective re-materialization's (forward, recompute) contexts: the recompute replays the forward's operations
    one for one, a tiled MLP's too (`parallel.tiling.replaying_recompute`)."""
    forward, recompute = create_selective_checkpoint_contexts(_keep_widening_matmuls)
    return forward, _entered_together(recompute, replaying_recompute())


@contextmanager
def _entered_together(*contexts) -> Iterator[None]:
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _keep_widening_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective re-materialization: keep the output of every matmul that widens the stream ([N, d] @ [d, n]
    with n > d: q/k/v/gate, SwiGLU's gate/up — of the `1b` block's recomputed GEMM FLOPs, 90 %) and recompute
    the rest (norms, the short conv, the kernels, SiLU, the narrowing output projection). The down projection is
    not recomputed at all either way: the recompute stops after the last tensor backward needs."""
    if op is torch.ops.aten.mm.default and args[1].shape[1] > args[0].shape[1]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _stream_dtype(h: torch.Tensor) -> torch.Tensor:
    """Under autocast the residual stream — and so every stored layer input — is in the autocast dtype
    (bf16: half the memory of the re-materialization checkpoints); otherwise it stays as it is."""
    device = h.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device) and h.is_floating_point():
        return h.to(torch.get_autocast_dtype(device))
    return h


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over the local tokens (at least fp32); targets −100 are ignored. Divide by the
    global token count for the mean."""
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum")
