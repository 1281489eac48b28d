"""`linear_attention`: the public op of DESIGN §2, dispatching to Triton or PyTorch."""

from __future__ import annotations

import torch

from kernels.reference import linear_attention_chunked

BACKENDS = ("auto", "triton", "torch")


def _check(q, k, v, log_decay, gate, initial_state, chunk_size, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, G, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T) or G < 1 or v.shape[2] % G:
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, H, V] with H a multiple of q and k's {G} heads; "
                         f"got {tuple(v.shape)}")
    H = v.shape[2]
    if T < 1:
        raise ValueError("the sequence is empty (T = 0); pass at least one token")
    if log_decay is not None and log_decay.shape != (H,):
        raise ValueError(f"log_decay must be [H] = [{H}]; got {tuple(log_decay.shape)}")
    if gate is not None and gate.shape != (B, T, H):
        raise ValueError(f"gate must be [B, T, H] = [{B}, {T}, {H}]; got {tuple(gate.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[-1]}]; got {tuple(initial_state.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1; got {chunk_size}")


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    chunk_size: int = 64, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with per-head decay λ_h and per-token gate g (DESIGN §2).

    q, k: [B, T, H, K], or [B, T, G, K] shared by groups of H / G heads (head h reads group h // (H / G): Mamba-2's
    B and C; only the grouped pair is kept for backward); v: [B, T, H, V]; log_decay: [H] ≤ 0; gate: [B, T, H] ≤ 0;
    initial_state / final_state: [B, H, K, V] float32 (float64 for float64 inputs).
    Returns (o [B, T, H, V] in q's dtype, final_state or None). scale defaults to K^-1/2.
    backend: "triton" (CUDA), "torch" (chunked PyTorch) or "auto" (Triton for CUDA tensors up to fp32).
    """
    _check(q, k, v, log_decay, gate, initial_state, chunk_size, backend)
    if resolve_backend(q, backend) == "triton":
        from kernels.triton import linear_attention_triton

        return linear_attention_triton(
            q, k, v, log_decay=log_decay, gate=gate, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )
    if q.shape[2] != v.shape[2]:  # the PyTorch path on per-head copies (autograd sums their gradients)
        from kernels.ssd_inputs.reference import expand_groups_reference

        q, k = expand_groups_reference(q, v.shape[2]), expand_groups_reference(k, v.shape[2])
    return linear_attention_chunked(
        q, k, v, log_decay=log_decay, gate=gate, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )


def resolve_backend(q: torch.Tensor, backend: str) -> str:
    """"triton" or "torch": "auto" takes the Triton kernels for CUDA tensors up to fp32."""
    if backend == "auto":
        return "triton" if q.is_cuda and q.dtype != torch.float64 and _triton_available() else "torch"
    return backend


def _triton_available() -> bool:
    try:
        import kernels.triton  # noqa: F401
    except ImportError:
        return False
    return True
