"""Where a profiled training step's GPU time goes, by kind of work, from `torch.profiler` kernel tables.

    python benchmarks/profile_split.py BEFORE.txt AFTER.txt     # tables written by train_step.py --profile

Reads the operator rows of each table (aten ops and the autograd Functions of our Triton kernels; kernel rows
would count the same time twice) and sums their self CUDA time into: GEMMs, linear attention (Triton), short
convolution (Triton), fused elementwise (our Triton SwiGLU, RMSNorm and cross-entropy), eager elementwise and
copies (every other aten op), optimizer, communication (c10d / NCCL), and the rest of the step's total (rows
below the table's cut). Prints one markdown table, a column per file, ms and share of the step's CUDA time.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CATEGORIES = ("GEMMs", "linear attention (Triton)", "short conv (Triton)",
              "fused elementwise (Triton: SwiGLU, RMSNorm, cross-entropy)", "eager elementwise and copies",
              "optimizer", "communication", "rest (below the table's cut)")
UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3}


def _ms(cell: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(s|ms|us)", cell.strip()).groups()
    return float(value) * UNITS[unit]


def category(name: str) -> str | None:
    """The kind of work of an operator row (None: a kernel row or a record_function, not counted)."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm"):
        return CATEGORIES[0]
    if name.startswith("_LinearAttentionTriton"):
        return CATEGORIES[1]
    if name.startswith("_ShortConvTriton"):
        return CATEGORIES[2]
    if name.startswith(("_SwiGLUTriton", "_RMSNormTriton", "_LinearCrossEntropy")):
        return CATEGORIES[3]
    if name.startswith(("c10d::", "nccl:", "record_param_comms")):
        return CATEGORIES[6]
    if name.startswith(("aten::_fused_adamw", "aten::_foreach_")):
        return CATEGORIES[5]
    if name.startswith("aten::"):
        return CATEGORIES[4]
    return None


def split_table(text: str) -> tuple[dict[str, float], float]:
    """({category: ms}, the step's total CUDA ms) of one `key_averages().table()` sorted by self CUDA time."""
    lines = text.splitlines()
    header = next((ln for ln in lines if "Self CUDA" in ln and "Name" in ln), None)
    total = re.search(r"Self CUDA time total:\s*(\S+)", text)
    if header is None or total is None:
        raise ValueError("not a torch.profiler table with CUDA columns (train_step.py --profile on a GPU)")
    columns = re.split(r"\s{2,}", header.strip())
    col = columns.index("Self CUDA")
    split = dict.fromkeys(CATEGORIES, 0.0)
    for line in lines:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(columns) or cells[0] == "Name":
            continue
        kind = category(cells[0])
        if kind is not None:
            split[kind] += _ms(cells[col])
    step = _ms(total.group(1))
    split[CATEGORIES[-1]] = max(0.0, step - sum(split.values()))
    return split, step


def render(named: dict[str, tuple[dict[str, float], float]]) -> str:
    """Markdown: a row per category, a column per profile (ms and share of its step)."""
    out = ["| GPU time | " + " | ".join(named) + " |", "|---|" + "---:|" * len(named)]
    for kind in CATEGORIES:
        out.append(f"| {kind} | " + " | ".join(f"{split[kind]:,.0f} ms ({100 * split[kind] / step:.1f} %)"
                                               for split, step in named.values()) + " |")
    out.append("| **step (CUDA time)** | " + " | ".join(f"**{step:,.0f} ms**" for _, step in named.values()) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        sys.exit("profile_split: pass one or more profile tables (train_step.py --profile DIR writes them)")
    named = {}
    for path in paths:
        try:
            named[path.stem] = split_table(path.read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"profile_split: {path}: {e}")
    print(render(named))


if __name__ == "__main__":
    main()
