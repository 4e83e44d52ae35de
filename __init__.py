"""moe-mtp: DeepSeek-V3-style models (MLA, DeepSeekMoE, MTP) for the Hugging Face stack.

Importing the package registers the `moe_mtp` model type with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import MoeMtpConfig
from .modeling import ROUTED_EXPERT_PARAMETERS, MoeMtpForCausalLM, MoeMtpModel, MoeMtpPreTrainedModel
from .quantization import hide_unused_kernel_warning

hide_unused_kernel_warning()

AutoConfig.register(MoeMtpConfig.model_type, MoeMtpConfig, exist_ok=True)
AutoModel.register(MoeMtpConfig, MoeMtpModel, exist_ok=True)
AutoModelForCausalLM.register(MoeMtpConfig, MoeMtpForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["MoeMtpConfig", "MoeMtpModel", "MoeMtpForCausalLM", "MoeMtpPreTrainedModel", "ROUTED_EXPERT_PARAMETERS"]
