"""benchmarks/profile_split.py: a torch.profiler table → GPU time by kind of work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from profile_split import CATEGORIES, main, split_table  # noqa: E402

COLUMNS = ["Name", "Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg", "Self CUDA", "Self CUDA %",
           "CUDA total", "CUDA time avg", "# of Calls"]


def table(rows: list[tuple[str, str]], total: str) -> str:
    """A `key_averages().table()` lookalike: the columns of a CUDA profile, rows (name, self CUDA)."""
    def line(cells):
        return "  ".join(f"{c:>14}" for c in cells)

    rule = "-" * 200
    body = [line([name, "0.1%", "1.0ms", "0.1%", "1.0ms", "1.0us", cuda, "1.0%", cuda, "1.0us", "3"])
            for name, cuda in rows]
    return "\n".join([rule, line(COLUMNS), rule, *body, rule, "Self CPU time total: 2.0s",
                      f"Self CUDA time total: {total}", ""])


def test_operator_rows_are_summed_by_kind_and_kernel_rows_skipped():
    text = table([("aten::mm", "1.000s"), ("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN", "600.000ms"),
                  ("_SwiGLUTriton", "30.000ms"), ("_SwiGLUTritonBackward", "20.000ms"),
                  ("_swiglu_fwd_kernel", "30.000ms"),
                  ("_LinearAttentionTriton", "40.000ms"), ("_ShortConvTritonBackward", "100.000ms"),
                  ("aten::cat", "25.000ms"), ("aten::copy_", "500.000us"), ("Optimizer.step#AdamW.step", "8.000ms"),
                  ("aten::_fused_adamw_", "8.000ms"), ("Command Buffer Full", "20.000ms")], total="1.300s")
    split, step = split_table(text)
    assert step == 1300.0
    assert split["GEMMs"] == 1000.0
    assert split["fused elementwise (Triton: SwiGLU, RMSNorm, cross-entropy)"] == 50.0
    assert split["linear attention (Triton)"] == 40.0
    assert split["short conv (Triton)"] == 100.0
    assert split["eager elementwise and copies"] == pytest.approx(25.5)
    assert split["optimizer"] == 8.0
    assert split["rest (below the table's cut)"] == pytest.approx(1300 - 1223.5)
    assert sum(split.values()) == pytest.approx(step)
    assert set(split) == set(CATEGORIES)


def test_a_cpu_table_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "cpu.txt"
    path.write_text("Name  Self CPU\nSelf CPU time total: 1.0s\n")
    with pytest.raises(SystemExit) as e:
        main([str(path)])
    assert "not a torch.profiler table with CUDA columns" in str(e.value)
