"""Quantizing while loading never holds the full-precision model: loading a released FP8 folder in int8 peaks within
1.3x of the loaded process's RSS (both above the RSS before loading), measured in a child process from /proc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not Path("/proc/self/status").exists():
    pytest.skip("needs Linux /proc", allow_module_level=True)
pytest.importorskip("bitsandbytes")

CHILD = r"""
import ctypes, gc, json, sys
import torch, bitsandbytes
from transformers import BitsAndBytesConfig
from moe_mtp import MoeMtpForCausalLM

def rss(field):
    return int(dict(l.split(":", 1) for l in open("/proc/self/status"))[field].split()[0]) * 1024

before = rss("VmRSS")
model = MoeMtpForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16,
                                          quantization_config=BitsAndBytesConfig(load_in_8bit=True))
peak = rss("VmHWM")
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"before": before, "peak": peak, "final": rss("VmRSS"), "footprint": model.get_memory_footprint()}))
"""


def test_int8_load_of_a_released_fp8_folder_peaks_near_its_final_rss(tmp_path):
    from moe_mtp import MoeMtpForCausalLM
    from moe_mtp.configuration import preset
    from moe_mtp.conversion import convert

    config = preset("bench-model", vocab_size=1024, num_hidden_layers=2, num_nextn_predict_layers=1)
    MoeMtpForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # ~60 MB in bf16
    convert(tmp_path / "bf16", tmp_path / "release", dst_format="deepseek", dtype="fp8", progress=False)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "release")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    peak, final = r["peak"] - r["before"], r["final"] - r["before"]
    print(f"int8 load: peak {peak >> 20} MiB, final {final >> 20} MiB, footprint {r['footprint'] >> 20} MiB")
    assert final >= 0.8 * r["footprint"]
    assert peak <= 1.3 * final
