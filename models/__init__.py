"""Linear-Llama family: linear, softmax and hybrid layer stacks, and their presets."""

from models.config import PRESETS, ModelConfig, preset
from models.llama import LinearLlama, num_parameters, token_loss_sum

__all__ = ["PRESETS", "ModelConfig", "preset", "LinearLlama", "num_parameters", "token_loss_sum"]
