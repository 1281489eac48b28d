"""The kernels behind block attention and which one runs (DESIGN §4, §8): cuDNN, flash, math.

Every kernel computes one block (o_b, l_b) — o_b [B, Tq, Hq, D] in the inputs' dtype (fp32 / fp64 for
math), l_b = logsumexp_k(scale · q·k) [B, Hq, Tq] fp32 (fp64 for fp64 inputs) — and the block's
gradients given the FINAL (merged) output and log-sum-exp of its query rows:

- "cudnn": `aten._scaled_dot_product_cudnn_attention` (compute_log_sumexp) and its backward op; CUDA
  fp16 / bf16 where torch's own cuDNN SDPA checks pass (`torch.backends.cuda.can_use_cudnn_attention`:
  cuDNN ≥ 9, sm80+, head dim, not disabled, no deterministic mode). 1.7× flash on an H200 (DESIGN §8).
- "flash": `aten._scaled_dot_product_flash_attention` and its backward op; CUDA fp16 / bf16, head dim a
  multiple of 8 up to 256.
- "math": PyTorch in fp32 (fp64 for fp64 inputs); any device and dtype. Whole-sequence attention
  (`block.dense_attention`) runs torch SDPA here instead: its memory-efficient or math kernel on CUDA,
  whatever SDPA picks on the CPU (the results of before this module).

`model.attention_backend` ("auto" by default) picks one; `choose_backend` resolves it per block:
"auto" → cudnn where it can run, else flash, else math; "cudnn" / "flash" where that kernel cannot
run → a one-line ValueError naming the fix (use auto). The choice is printed once per process (rank 0):
`longtrain: attention backend: cudnn (auto; cuda bfloat16, 32 q / 8 kv heads, head dim 128, …)`.
A fused kernel that raises at run time under "auto" (an error other than out-of-memory, e.g. a shape
this cuDNN build refuses) is dropped for the rest of the process, with a line on the rank it happened
on, and the next backend computes the block; under an explicit choice the error propagates.

The private ops are called by argument NAME, filtered through the installed op's schema, so torch
versions that add or drop optional arguments (2.11 on the GPU machine, 2.13 here) take the same call;
a schema that needs an argument this module does not know makes the op unavailable (a reason, not a crash).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.reference import state_dtype
from parallel.context import ATTENTION_BACKENDS

HALF = (torch.float16, torch.bfloat16)
_OP_NAMES = {
    ("cudnn", "forward"): "_scaled_dot_product_cudnn_attention",
    ("cudnn", "backward"): "_scaled_dot_product_cudnn_attention_backward",
    ("flash", "forward"): "_scaled_dot_product_flash_attention",
    ("flash", "backward"): "_scaled_dot_product_flash_attention_backward",
}
_REFUSED: dict[str, str] = {}  # fused backend → why it failed at run time (auto skips it from then on)
_LOGGED: set = set()  # log lines (keys) already printed by this process
_GQA: dict[str, bool] = {}  # backend → does its op take fewer kv heads than query heads? (probed once)
_LAST: dict[str, tuple] = {}  # backend → the extras of its latest forward (for a backward whose block ran elsewhere)


# ---------------------------------------------------------------------------------------------
# capability probes (tests replace them to pretend a GPU)
# ---------------------------------------------------------------------------------------------

def _op(backend: str, which: str):
    """The aten OpOverload of `backend`'s forward / backward, or None where this torch has none."""
    packet = getattr(torch.ops.aten, _OP_NAMES[backend, which], None)
    return None if packet is None else packet.default


def _device_problem(q: torch.Tensor) -> str:
    """'' for CUDA fp16 / bf16 tensors (what both fused kernels take), else why not."""
    if not q.is_cuda:
        return f"{q.device.type} tensors"
    if q.dtype not in HALF:
        return f"{str(q.dtype).removeprefix('torch.')} tensors (fused kernels take float16 / bfloat16)"
    return ""


_CUDNN_CHECKED: dict[tuple, str] = {}  # (shapes, dtype, device, causal, torch's switches) → _cudnn_check's answer


def _cudnn_check(q: torch.Tensor, k: torch.Tensor, causal: bool) -> str:
    """torch's own cuDNN SDPA checks for these [B, T, H, D] tensors, '' when they pass (cached by shape)."""
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, causal, torch.backends.cuda.cudnn_sdp_enabled(),
           torch.are_deterministic_algorithms_enabled())
    if key not in _CUDNN_CHECKED:
        _CUDNN_CHECKED[key] = _torch_cudnn_verdict(q, k, causal)
    return _CUDNN_CHECKED[key]


def _torch_cudnn_verdict(q: torch.Tensor, k: torch.Tensor, causal: bool) -> str:
    if not torch.backends.cudnn.is_available():
        return "torch was built without cuDNN"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN SDPA is disabled (torch.backends.cuda.enable_cudnn_sdp(False))"
    can_use = getattr(torch.backends.cuda, "can_use_cudnn_attention", None)
    if can_use is None:
        return f"torch {torch.__version__} cannot tell whether cuDNN attention runs"
    qt, kt = q.detach().transpose(1, 2), k.detach().transpose(1, 2)  # the layout the op will see
    gqa = q.shape[2] != k.shape[2]
    try:
        params = torch.backends.cuda.SDPAParams(qt, kt, kt, None, 0.0, causal, gqa)
    except TypeError:  # a torch without the enable_gqa argument
        params = torch.backends.cuda.SDPAParams(qt, kt, kt, None, 0.0, causal)
    if can_use(params, False):
        return ""
    cc = ".".join(map(str, torch.cuda.get_device_capability(q.device)))
    return (f"torch's cuDNN SDPA checks refuse q {list(q.shape)}, k {list(k.shape)} (causal {causal}) on "
            f"sm {cc} with cuDNN {torch.backends.cudnn.version()}: head dim, deterministic mode, …")


_SCHEMA_CHECKED: dict[tuple, str] = {}  # (forward op, backward op) → _schema_problem's answer


def _schema_problem(backend: str) -> str:
    key = (_op(backend, "forward"), _op(backend, "backward"))
    if key not in _SCHEMA_CHECKED:
        _SCHEMA_CHECKED[key] = _unknown_arguments(backend)
    return _SCHEMA_CHECKED[key]


def _unknown_arguments(backend: str) -> str:
    for which in ("forward", "backward"):
        op = _op(backend, which)
        if op is None:
            return f"torch {torch.__version__} has no aten.{_OP_NAMES[backend, which]}"
        unknown = [a.name for a in op._schema.arguments if a.name not in _KNOWN_ARGS and not a.has_default_value()]
        if unknown:
            return f"aten.{_OP_NAMES[backend, which]} of torch {torch.__version__} needs unknown arguments {unknown}"
    return ""


def cudnn_problem(q: torch.Tensor, k: torch.Tensor, causal: bool) -> str:
    """'' where the cuDNN kernel can compute this block, else why not (one clause)."""
    return (_device_problem(q) or _REFUSED.get("cudnn", "") or _schema_problem("cudnn")
            or _cudnn_check(q, k, causal))


def flash_problem(q: torch.Tensor, k: torch.Tensor, causal: bool) -> str:
    """'' where the flash kernel can compute this block, else why not (one clause)."""
    D = q.shape[-1]
    if not _device_problem(q) and (D % 8 or D > 256):
        return f"head dim {D} (flash takes multiples of 8 up to 256)"
    return _device_problem(q) or _REFUSED.get("flash", "") or ("" if _op("flash", "forward") else
                                                                 f"torch {torch.__version__} has no flash op")


PROBLEMS = {"cudnn": cudnn_problem, "flash": flash_problem}


# ---------------------------------------------------------------------------------------------
# the choice, logged once
# ---------------------------------------------------------------------------------------------

def check_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={backend!r} is unknown; use one of {list(ATTENTION_BACKENDS)}")


def _describe(q: torch.Tensor, k: torch.Tensor) -> str:
    text = (f"{q.device.type} {str(q.dtype).removeprefix('torch.')}, {q.shape[2]} q / {k.shape[2]} kv heads, "
            f"head dim {q.shape[-1]}, torch {torch.__version__}")
    if q.is_cuda:
        text += f", cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(q.device)}"
    return text


def _log(key, line, every_rank: bool = False) -> None:
    """Print `line` (a string, or a function giving it) once per process for `key`; rank 0 only unless `every_rank`."""
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    if every_rank or not dist.is_initialized() or dist.get_rank() == 0:
        print(f"longtrain: attention backend: {line() if callable(line) else line}", flush=True)


def choose_backend(q: torch.Tensor, k: torch.Tensor, causal: bool, backend: str = "auto") -> str:
    """"cudnn", "flash" or "math" for this block under `model.attention_backend=backend` (module docstring)."""
    check_backend(backend)
    if backend == "math":
        choice, why = "math", "model.attention_backend=math"
    elif backend != "auto":
        problem = PROBLEMS[backend](q, k, causal)
        if problem:
            raise ValueError(f"model.attention_backend={backend} cannot run here ({problem}); "
                             f"use model.attention_backend=auto")
        choice, why = backend, f"model.attention_backend={backend}"
    else:
        skipped: dict[str, list[str]] = {}  # why not → the fused backends it rules out
        for choice in ("cudnn", "flash"):
            problem = PROBLEMS[choice](q, k, causal)
            if not problem:
                break
            skipped.setdefault(problem, []).append(choice)
        else:
            choice = "math"
        why = "; ".join(["auto"] + [f"not {' or '.join(names)}: {p}" for p, names in skipped.items()])
    _log((backend, choice), lambda: f"{choice} ({why}; {_describe(q, k)})")
    return choice


def refuse(backend: str, requested: str, error: BaseException) -> None:
    """A fused kernel raised: re-raise under an explicit choice (or out of memory), else drop it for this process."""
    if requested == backend or backend == "math" or isinstance(error, torch.OutOfMemoryError):
        raise error
    msg = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    _REFUSED[backend] = f"it failed earlier in this process: {msg}"
    _log(("refused", backend), f"{backend} failed ({type(error).__name__}: {msg}); the next backend takes over "
                               f"for the rest of this process", every_rank=True)


# ---------------------------------------------------------------------------------------------
# the kernels: fwd(q, k, v, scale, causal) -> (o, lse [B, Hq, Tq], extras); bwd(..., extras) -> dq, dk, dv
# ---------------------------------------------------------------------------------------------

_KNOWN_ARGS = {"query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal",
               "return_debug_mask", "scale", "grad_out", "out", "logsumexp", "philox_seed", "philox_offset",
               "cum_seq_q", "cum_seq_k", "max_q", "max_k"}


def _call(op, **kwargs):
    """op(**kwargs) with only the arguments the installed schema has (versions differ in optional ones)."""
    names = {a.name for a in op._schema.arguments}
    return op(**{name: value for name, value in kwargs.items() if name in names})


def _returned(op, result, name: str, position: int):
    names = [r.name for r in op._schema.returns]
    return result[names.index(name) if name in names else position]


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _gqa_forward(backend: str, fwd, q, k, v, scale, causal):
    """fwd on the kv heads as they are, or repeated to the query heads where `backend`'s op refuses fewer."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1 and not _GQA.get(backend, True):
        k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    try:
        res = fwd(q, k, v, scale, causal)
    except RuntimeError as e:
        if groups == 1 or backend in _GQA or isinstance(e, torch.OutOfMemoryError):
            raise
        _GQA[backend] = False
        return _gqa_forward(backend, fwd, q, k, v, scale, causal)
    if groups > 1:
        _GQA.setdefault(backend, True)
    return res


def _gqa_backward(backend: str, bwd, dout, q, k, v, out, lse, scale, causal, extras):
    groups = q.shape[2] // k.shape[2]
    expand = groups > 1 and not _GQA.get(backend, True)
    ke, ve = (_expand_kv(k, groups), _expand_kv(v, groups)) if expand else (k, v)
    dq, dk, dv = bwd(dout, q, ke, ve, out, lse, scale, causal, extras)
    if expand:
        B, T, _, D = dk.shape
        dk = dk.reshape(B, T, k.shape[2], groups, D).sum(3)
        dv = dv.reshape(B, T, k.shape[2], groups, D).sum(3)
    return dq, dk, dv


def _cudnn_fwd(q, k, v, scale: float, causal: bool):
    # [B, T, H, D] contiguous, seen as [B, H, T, D]: the layout cuDNN's graph cache keys on (q, k, v strides only)
    op = _op("cudnn", "forward")
    res = _call(op, query=q.contiguous().transpose(1, 2), key=k.contiguous().transpose(1, 2),
                value=v.contiguous().transpose(1, 2), attn_bias=None, compute_log_sumexp=True, dropout_p=0.0,
                is_causal=causal, return_debug_mask=False, scale=scale)
    out, lse = _returned(op, res, "output", 0), _returned(op, res, "logsumexp", 1)
    B, Hq, Tq = out.shape[:3]
    extras = (_returned(op, res, "philox_seed", 6), _returned(op, res, "philox_offset", 7), lse.dim())
    return out.transpose(1, 2), lse.reshape(B, Hq, Tq), extras


def _cudnn_bwd(dout, q, k, v, out, lse, scale: float, causal: bool, extras):
    seed, offset, lse_dim = extras
    B, Tq, Hq, _ = q.shape
    # the backward graph is cached by q, k, v alone: out, dO and the statistics always in one layout —
    # [B, T, H, D] contiguous for out / dO (as the forward wrote out), [B, H, Tq(, 1)] contiguous fp32 for l
    stats = lse.to(torch.float32).contiguous()
    stats = stats.view(B, Hq, Tq, 1) if lse_dim == 4 else stats.view(B, Hq, Tq)
    op = _op("cudnn", "backward")
    dq, dk, dv = _call(op, grad_out=dout.contiguous().transpose(1, 2), query=q.contiguous().transpose(1, 2),
                       key=k.contiguous().transpose(1, 2), value=v.contiguous().transpose(1, 2),
                       out=out.contiguous().transpose(1, 2), logsumexp=stats, philox_seed=seed,
                       philox_offset=offset, attn_bias=None, cum_seq_q=None, cum_seq_k=None, max_q=Tq,
                       max_k=k.shape[1], dropout_p=0.0, is_causal=causal, scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _flash_fwd(q, k, v, scale: float, causal: bool):
    res = _op("flash", "forward")(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False,
                                  scale=scale)
    out, lse = res[0], res[1]
    return out.transpose(1, 2), lse, tuple(res[2:4]) + tuple(res[6:8])


def _flash_bwd(dout, q, k, v, out, lse, scale: float, causal: bool, extras):
    # cu-seqlens and rng state exactly as the forward returned them: None (undefined) without varlen input;
    # any defined stand-in would make the kernel take the varlen path ("batch size must be positive")
    cum_q, cum_k, seed, offset = extras
    dq, dk, dv = _op("flash", "backward")(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse.contiguous(), cum_q, cum_k, q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """scale · q kᵀ per kv head and group, [B, Hkv, G, Tq, Tk] in the accumulation dtype; −inf above the diagonal."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    acc = state_dtype(q)
    s = torch.einsum("bqhgd,bkhd->bhgqk", q.to(acc).view(B, Tq, Hkv, Hq // Hkv, D), k.to(acc)) * scale
    if causal:
        if Tq != k.shape[1]:
            raise ValueError("a causal block must be square (the diagonal block of one shard range)")
        s = s.masked_fill(torch.ones(Tq, Tq, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s


def _math_fwd(q, k, v, scale: float, causal: bool):
    B, Tq, Hq, D = q.shape
    s = _scores(q, k, scale, causal)
    lse = s.logsumexp(-1)  # [B, Hkv, G, Tq]
    o = torch.einsum("bhgqk,bkhd->bqhgd", (s - lse.unsqueeze(-1)).exp(), v.to(s.dtype))
    return o.reshape(B, Tq, Hq, D), lse.reshape(B, Hq, Tq), None


def _math_bwd(dout, q, k, v, out, lse, scale: float, causal: bool, extras=None):
    B, Tq, Hq, D = q.shape
    Hkv, G = k.shape[2], Hq // k.shape[2]
    s = _scores(q, k, scale, causal)
    acc = s.dtype
    p = (s - lse.to(acc).view(B, Hkv, G, Tq, 1)).exp()
    do = dout.to(acc).view(B, Tq, Hkv, G, D)
    delta = (do * out.to(acc).view(B, Tq, Hkv, G, D)).sum(-1).permute(0, 2, 3, 1)  # [B, Hkv, G, Tq]
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, do)
    ds = p * (torch.einsum("bqhgd,bkhd->bhgqk", do, v.to(acc)) - delta.unsqueeze(-1))
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(acc)).reshape(B, Tq, Hq, D) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, q.to(acc).view(B, Tq, Hkv, G, D)) * scale
    return dq, dk, dv


_FWD = {"cudnn": _cudnn_fwd, "flash": _flash_fwd}
_BWD = {"cudnn": _cudnn_bwd, "flash": _flash_bwd}


def kernel_forward(backend: str, q, k, v, scale: float, causal: bool):
    """(o, lse, extras) of one block on `backend` ("cudnn", "flash" or "math")."""
    if backend == "math":
        return _math_fwd(q, k, v, scale, causal)
    res = _gqa_forward(backend, _FWD[backend], q, k, v, scale, causal)
    _LAST[backend] = res[2]
    return res


def kernel_backward(backend: str, dout, q, k, v, out, lse, scale: float, causal: bool, extras):
    """(dq, dk, dv) of one block on `backend`, given the final out and lse of its query rows."""
    if backend == "math":
        return _math_bwd(dout, q, k, v, out, lse, scale, causal)
    if extras is None:  # this block's forward ran on another backend (a fallback in between): dropout is 0,
        extras = _LAST.get(backend) or _default_extras(backend, q)  # so the rng extras are never read
    return _gqa_backward(backend, _BWD[backend], dout, q, k, v, out, lse, scale, causal, extras)


def _default_extras(backend: str, q: torch.Tensor) -> tuple:
    seed, offset = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    return (seed, offset, 4) if backend == "cudnn" else (None, None, seed, offset)


def explicit_backend_problem(backend: str, device: torch.device, dtype: torch.dtype, n_heads: int, kv_heads: int,
                             head_dim: int) -> str:
    """'' where `backend` can run causal attention of these heads on `device` in `dtype`, else why not — checked
    on 128 tokens before training starts, so that an explicit cudnn / flash that cannot run fails at once."""
    if backend in ("auto", "math"):
        return ""
    check_backend(backend)
    q = torch.empty(1, 128, n_heads, head_dim, device=device, dtype=dtype)
    return PROBLEMS[backend](q, torch.empty(1, 128, kv_heads, head_dim, device=device, dtype=dtype), True)
