"""Linear-attention kernels: Triton chunked scans and their PyTorch references (DESIGN §2), and the gated delta rule
(DESIGN §12, `kernels.delta_rule`)."""

from kernels.api import linear_attention
from kernels.delta_rule import gated_delta_rule
from kernels.reference import linear_attention_chunked, linear_attention_recurrent

__all__ = ["gated_delta_rule", "linear_attention", "linear_attention_chunked", "linear_attention_recurrent"]
