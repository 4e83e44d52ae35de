"""Checkpoint conversion between the released DeepSeek layout, transformers' built-in classes and moe_mtp.

    python -m moe_mtp.conversion SRC DST [--to moe_mtp|deepseek|transformers] [--dtype bf16|fp32|fp8]

This subpackage never imports `moe_mtp.modeling` (modeling imports it); transformers is imported lazily.
"""

from .configs import deepseek_config_dict, moe_mtp_config_dict, transformers_config
from .convert import check_folder, convert, folder_family, load_state_dict_from_folder, read_config_dict
from .errors import ConversionError, DestinationExistsError
from .fp8 import dequantize_block_fp8, iter_dequantize_block_fp8, quantize_block_fp8, round_scale_ue8m0
from .layouts import convert_state_dict
from .spec import canonical_shapes
from .summary import inspect

__all__ = [
    "ConversionError",
    "DestinationExistsError",
    "canonical_shapes",
    "check_folder",
    "convert",
    "convert_state_dict",
    "deepseek_config_dict",
    "dequantize_block_fp8",
    "folder_family",
    "inspect",
    "iter_dequantize_block_fp8",
    "load_state_dict_from_folder",
    "moe_mtp_config_dict",
    "quantize_block_fp8",
    "read_config_dict",
    "round_scale_ue8m0",
    "transformers_config",
]
