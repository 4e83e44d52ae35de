"""The converter streams: converting ~600 MB with 50 MB shards must not hold the model (or a shard) in memory.

Peak RSS is measured in child processes, each reporting its own high-water mark (VmHWM: per address space, so
unlike `ru_maxrss` it does not inherit the forking test process's), against a child that only imports the package
and torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conversion_fixtures import released_config, tiny_config, write_checkpoint

from moe_mtp.conversion.spec import canonical_shapes

if not Path("/proc/self/status").exists():
    pytest.skip("needs Linux /proc", allow_module_level=True)

SHARD = 50 * 10**6
CHILD = """
import json, sys
import torch
import moe_mtp.conversion as conversion
if len(sys.argv) > 1:
    conversion.convert(sys.argv[1], sys.argv[2], dst_format=sys.argv[3], dtype=sys.argv[4], shard_size="50MB",
                       progress=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"peak_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


def big_config():
    # ~300M parameters (~600 MB in bf16), the largest tensor (the embedding) 65 MB
    return tiny_config(hidden_size=1024, intermediate_size=4096, moe_intermediate_size=1024, n_routed_experts=16,
                       n_group=2, topk_group=1, num_hidden_layers=4, vocab_size=32000, num_attention_heads=8,
                       q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                       v_head_dim=64)  # fmt: skip


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    config = big_config()
    pool = (torch.randn(1 << 23) * 0.02).to(torch.bfloat16)  # cheap "random" data: slices of one pool
    tensors = {}
    n = config.num_hidden_layers
    for name, shape in canonical_shapes(config).items():
        numel = torch.Size(shape).numel()
        data = pool.repeat(-(-numel // pool.numel()))[:numel] if numel > pool.numel() else pool[:numel].clone()
        if name.endswith("e_score_correction_bias"):
            data = data.float()
        name = name.replace("model.mtp_layers.0.", f"model.layers.{n}.")
        tensors[name] = data.view(shape)
    tensors[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    folder = tmp_path_factory.mktemp("big") / "src"
    write_checkpoint(folder, tensors, released_config(config, fp8=False), shards=6)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total > 10 * SHARD
    return folder


@pytest.fixture(scope="module")
def baseline_mb():
    return child_peak_mb()


def child_peak_mb(*args) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.parametrize("dst_format,dtype", [("moe_mtp", "fp32"), ("deepseek", "fp8")])
def test_peak_memory_is_bounded_by_a_shard(big_checkpoint, baseline_mb, tmp_path, dst_format, dtype):
    baseline = baseline_mb
    peak = child_peak_mb(big_checkpoint, tmp_path / "out", dst_format, dtype)
    files = list((tmp_path / "out").glob("*.safetensors"))
    assert len(files) >= 5  # many 50 MB shards
    limit = 2 * SHARD / 2**20 + 300
    print(f"{dst_format}/{dtype}: peak {peak:.0f} MB, baseline {baseline:.0f} MB, limit +{limit:.0f} MB")
    assert peak - baseline < limit
