from .modeling_moe_mtp import MoeMtpForCausalLM, MoeMtpModel, MoeMtpPreTrainedModel

__all__ = ["MoeMtpForCausalLM", "MoeMtpModel", "MoeMtpPreTrainedModel"]
