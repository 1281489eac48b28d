"""A process's RNG states (torch, CUDA, numpy, Python) as plain typed arrays, and back (DESIGN §7).

A checkpoint stores each rank's states as integer arrays with typed JSON attributes, never as a
pickle (issue 23):

    torch          uint8 [n]      torch.get_rng_state()
    cuda           uint8 [n]      torch.cuda.get_rng_state(), when CUDA is available
    numpy_key      uint32 [624]   numpy's legacy MT19937 key; attrs algorithm, pos, has_gauss, cached_gaussian
    python_state   uint32 [625]   random.getstate()'s internal state; attrs version, gauss_next

`parse_rng_state` rebuilds the states field by field and refuses anything unexpected before any
generator is touched; `set_rng_state` then applies them. (Old-format checkpoints pickled these
states; their trusted loader lives in runtime/checkpoint.py.)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

RNG_REQUIRED = ("torch", "numpy_key", "python_state")  # every rank's checkpoint holds these
RNG_KEYS = (*RNG_REQUIRED, "cuda")  # and this one when it was written with CUDA
_MT_WORDS = 624  # Mersenne Twister state words (numpy's legacy generator and Python's random)


def rng_arrays() -> dict[str, tuple[np.ndarray, dict]]:
    """This process's RNG states as {name: (integer array, typed attributes)}."""
    out = {"torch": (torch.get_rng_state().numpy().copy(), {})}
    if torch.cuda.is_available():
        out["cuda"] = (torch.cuda.get_rng_state().numpy().copy(), {})
    algorithm, key, pos, has_gauss, cached = np.random.get_state()
    out["numpy_key"] = (np.asarray(key, dtype=np.uint32), {"algorithm": str(algorithm), "pos": int(pos),
                                                           "has_gauss": int(has_gauss),
                                                           "cached_gaussian": float(cached)})
    version, internal, gauss_next = random.getstate()
    out["python_state"] = (np.asarray(internal, dtype=np.uint32),
                           {"version": int(version), "gauss_next": None if gauss_next is None else float(gauss_next)})
    return out


@dataclass
class RngState:
    """One rank's validated RNG states, in the form each generator's setter takes."""

    torch: torch.Tensor
    numpy: tuple
    python: tuple
    cuda: torch.Tensor | None = None


def parse_rng_state(arrays: dict[str, np.ndarray], attrs: dict[str, dict],
                    fail: Callable[[str], Exception]) -> RngState:
    """Typed reconstruction of one rank's RNG states from `rng_arrays`' form; anything unexpected is
    refused with `fail("RNG state <name> is invalid (…)")`. `arrays` holds every name in RNG_REQUIRED."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise fail(f"RNG state {name} is invalid ({what})")

    t = arrays["torch"]
    need(t.dtype == np.uint8 and t.shape == tuple(torch.get_rng_state().shape), "torch",
         f"{t.dtype}{list(t.shape)}, expected uint8{list(torch.get_rng_state().shape)}")
    key, k = arrays["numpy_key"], attrs["numpy_key"]
    need(key.dtype == np.uint32 and key.shape == (_MT_WORDS,), "numpy_key", f"{key.dtype}{list(key.shape)}")
    need(k.get("algorithm") == "MT19937" and type(k.get("pos")) is int and 0 <= k["pos"] <= _MT_WORDS
         and k.get("has_gauss") in (0, 1) and type(k.get("has_gauss")) is int
         and type(k.get("cached_gaussian")) is float and np.isfinite(k["cached_gaussian"]),
         "numpy_key", "attributes algorithm/pos/has_gauss/cached_gaussian")
    py, p = arrays["python_state"], attrs["python_state"]
    need(py.dtype == np.uint32 and py.shape == (_MT_WORDS + 1,) and int(py[-1]) <= _MT_WORDS, "python_state",
         f"{py.dtype}{list(py.shape)}")
    gauss = p.get("gauss_next")
    need(p.get("version") == 3 and type(p.get("version")) is int
         and (gauss is None or (type(gauss) is float and np.isfinite(gauss))),
         "python_state", "attributes version/gauss_next")
    cuda = None
    if "cuda" in arrays:
        c = arrays["cuda"]
        need(c.dtype == np.uint8 and c.ndim == 1, "cuda", f"{c.dtype}{list(c.shape)}")
        if torch.cuda.is_available():
            need(c.shape == tuple(torch.cuda.get_rng_state().shape), "cuda", f"{list(c.shape)} bytes")
        cuda = torch.from_numpy(c.copy())
    return RngState(
        torch=torch.from_numpy(t.copy()),
        numpy=("MT19937", key.copy(), k["pos"], k["has_gauss"], k["cached_gaussian"]),
        python=(3, tuple(int(x) for x in py), gauss),
        cuda=cuda,
    )


def set_rng_state(state: RngState) -> None:
    """Apply validated states to this process's generators (CUDA's only where CUDA is available)."""
    torch.set_rng_state(state.torch)
    np.random.set_state(state.numpy)
    random.setstate(state.python)
    if state.cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state.cuda)
