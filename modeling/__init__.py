from .modeling_moe_mtp import ROUTED_EXPERT_PARAMETERS, MoeMtpForCausalLM, MoeMtpModel, MoeMtpPreTrainedModel

__all__ = ["MoeMtpForCausalLM", "MoeMtpModel", "MoeMtpPreTrainedModel", "ROUTED_EXPERT_PARAMETERS"]
