"""Linear-attention kernels: Triton chunked scans and their PyTorch references (DESIGN §2)."""

from kernels.api import linear_attention
from kernels.reference import linear_attention_chunked, linear_attention_recurrent

__all__ = ["linear_attention", "linear_attention_chunked", "linear_attention_recurrent"]
