from .configuration_moe_mtp import MoeMtpConfig

__all__ = ["MoeMtpConfig"]
