"""Linear-Llama model configuration and presets."""

from __future__ import annotations

from dataclasses import dataclass

from kernels.api import BACKENDS
from parallel.context import ATTENTION_BACKENDS

LAYER_KINDS = {"L": "linear attention", "A": "softmax attention", "M": "Mamba-2 (SSD)", "D": "Gated DeltaNet"}
RECURRENT_KINDS = "LMD"  # layers that carry a state: they stream window by window
DECAYS = ("retnet", "none")


@dataclass
class ModelConfig:
    """A Linear-Llama decoder. `layout` is repeated over the depth: "L" linear, "A" softmax attention."""

    preset: str = "tiny"
    vocab_size: int = 32000
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # softmax layers (grouped-query); None = n_heads
    ffn_dim: int = 2048
    layout: str = "L"
    decay: str = "retnet"  # per-head constant decay λ_h = log(1 − 2^(−5−h)), or "none"
    gate: bool = False  # data-dependent log-gate g = logsigmoid(x W_g) / 16
    short_conv: int = 4  # causal depthwise conv width on q, k, v of linear layers (0 or 1: none)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    ssm_state: int = 128  # Mamba-2 (M) layers: state width N per head
    ssm_expand: int = 2  # Mamba-2: inner width = ssm_expand · dim
    ssm_head_dim: int = 64  # Mamba-2: head width P (heads = inner / P)
    ssm_groups: int = 1  # Mamba-2: groups sharing B and C
    chunk_size: int = 64
    backend: str = "auto"  # the Triton kernels (linear attention, conv, SwiGLU): auto (on CUDA) | triton | torch
    # softmax-attention kernel (A layers, every sp method): auto (cuDNN where it runs, else flash, else math) |
    # cudnn | flash (an error where it cannot run) | math (PyTorch / SDPA's efficient or math kernel)
    attention_backend: str = "auto"
    # Gated DeltaNet (D) layers on the Triton path: the chunk-parallel split kernels (outputs, dU's local share and
    # the gradients in fla's order; the default) or, false, the fused sweeps and gradient kernel
    # (kernels.delta_rule.fused_config)
    delta_split: bool = True
    # Gated DeltaNet (D) layers on the Triton path with parallel.sp = 1: > 0 runs the kernels' stages with
    # per-chunk transients (W, u, chunk states, their gradients) a window of about this many tokens at a time
    # (kernels.delta_rule's DeltaConfig.window_tokens: less memory, more time; the same results); 0: whole calls
    delta_window: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def layer_kinds(self) -> str:
        """One letter per layer: the layout string repeated (and cut) to n_layers."""
        return (self.layout * self.n_layers)[: self.n_layers]

    def validate(self) -> None:
        """Raise ValueError, one line naming the fix, on an inconsistent configuration."""
        bad = sorted(set(self.layout) - set(LAYER_KINDS))
        if not self.layout or bad:
            raise ValueError(
                f"model.layout={self.layout!r} has unknown layer letters {bad}; use L (linear), A (softmax), "
                f"M (Mamba-2), D (Gated DeltaNet)"
            )
        if "M" in self.layout and ((self.ssm_expand * self.dim) % self.ssm_head_dim
                                   or ((self.ssm_expand * self.dim) // self.ssm_head_dim) % self.ssm_groups):
            raise ValueError(f"Mamba-2 layers need ssm_expand·dim = {self.ssm_expand * self.dim} divisible by "
                             f"ssm_head_dim={self.ssm_head_dim} into heads divisible by ssm_groups={self.ssm_groups}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.kv_heads}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend={self.backend!r} is unknown; use auto, triton or torch")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend={self.attention_backend!r} is unknown; "
                             f"use auto, cudnn, flash or math")
        if self.decay not in DECAYS:
            raise ValueError(f"model.decay={self.decay!r} is unknown; use one of {DECAYS}")
        if not isinstance(self.delta_window, int) or self.delta_window < 0:
            raise ValueError(f"model.delta_window={self.delta_window!r} must be an integer ≥ 0 (tokens; 0: off)")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be ≥ 1")


PRESETS: dict[str, dict] = {
    # seconds on a CPU: a few hundred thousand parameters
    "tiny": dict(vocab_size=64, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, chunk_size=16,
                 tie_embeddings=True),
    "125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2560),
    "400m": dict(vocab_size=32000, dim=1024, n_layers=24, n_heads=8, ffn_dim=3584),
    "1b": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=6144),
    # Llama-3.2-3B-like width (head dim 128, 8 KV heads for softmax layers), 26 layers: 3.04B parameters
    "3b": dict(vocab_size=32000, dim=3072, n_layers=26, n_heads=24, n_kv_heads=8, ffn_dim=8192),
    # Llama-3-8B-like (dim 4096, 32 layers, 32 heads, 8 KV heads, FFN 14336), tied 32K vocabulary: 7.92B
    # parameters — 127 GiB of fp32 weights, gradients and AdamW moments: train it with parallel.shard=full
    "8b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    # Mamba-2 mixers (expand 2, state 128, heads of 64) with the SwiGLU of every block
    "mamba2-1b": dict(vocab_size=32000, dim=2048, n_layers=15, n_heads=16, n_kv_heads=8, ffn_dim=6144, layout="M",
                      gate=True),
    # Gated DeltaNet mixers (16 heads of 128: K = V = 128) 3 : 1 with softmax attention, as today's hybrids
    "gdn-1b": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=6144, layout="DDDA"),
}


# peak AdamW learning rate that suits each preset's size (train.lr defaults to it; 3e-3 diverges the 1B model)
# (3b and 8b: Llama-3's 3e-4 scaled down for size; not yet tuned by a run)
PRESET_LR: dict[str, float] = {"tiny": 3e-3, "125m": 1e-3, "400m": 6e-4, "1b": 4e-4, "mamba2-1b": 4e-4, "gdn-1b": 4e-4,
                               "3b": 3e-4, "8b": 2e-4}


def preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is unknown; use one of {sorted(PRESETS)}")
    cfg = ModelConfig(preset=name, **{**PRESETS[name], **overrides})
    cfg.validate()
    return cfg
