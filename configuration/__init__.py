from .configuration_moe_mtp import MoeMtpConfig
from .presets import PRESETS, preset, preset_kwargs, preset_names

__all__ = ["MoeMtpConfig", "PRESETS", "preset", "preset_kwargs", "preset_names"]
