"""benchmarks/kernel_registers.py: one small delta-rule kernel compiled ahead of time for sm_90 on the CPU.

The script runs in a subprocess: CPU test modules import the kernels under TRITON_INTERPRET=1, and interpreted
kernels cannot be compiled for a GPU target.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _has_ptxas() -> bool:
    """Triton's bundled ptxas (or TRITON_PTXAS_PATH), found without importing triton: an import here, at
    collection, would fix Triton's interpreter flag before the kernel test modules set TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_PTXAS_PATH"):
        return Path(os.environ["TRITON_PTXAS_PATH"]).is_file()
    spec = importlib.util.find_spec("triton")
    return spec is not None and spec.origin is not None and \
        (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file()


@pytest.mark.skipif(not _has_ptxas(), reason="no ptxas for sm_90 (Triton's bundled one or TRITON_PTXAS_PATH)")
def test_prep_kernel_row(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "benchmarks/kernel_registers.py", "--arch", "90", "--heads", "1", "--seq-len", "64",
           "--head-dim", "16", "--set", "chunk=16", "--set", "prep_warps=8", "--kernels", "_prep_kernel"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| _prep_kernel")]
    # the forward's UT transform, and the backward's that also stores every chunk's Tᵀ (the default split gradient)
    assert sorted(r[0].strip() for r in rows) == ["_prep_kernel[STORE_T=False]", "_prep_kernel[STORE_T=True]"], \
        res.stdout
    for row in rows:
        name, regs, spill_st, spill_ld, stack, smem, warps, stages, notes = (c.strip() for c in row)
        assert 0 < int(regs) <= 255
        assert min(int(spill_st), int(spill_ld), int(stack), int(smem)) >= 0
        assert int(warps) == 8 and int(stages) >= 1  # the launcher's num_warps, from the --set config
