"""Bad input: every case raises ConversionError naming the file or tensor, exits 2 from the CLI, and leaves neither
DST nor DST.partial behind."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conversion_fixtures import INDEX, edit_shard, shard_of, snapshot
from safetensors.torch import load_file, save_file

from moe_mtp.conversion import ConversionError, convert
from moe_mtp.conversion import fp8 as fp8_module
from moe_mtp.conversion.cli import main

SCALE = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"


def assert_fails(src: Path, tmp_path: Path, *patterns: str, **kwargs):
    dst = tmp_path / "dst"
    with pytest.raises(ConversionError) as info:
        convert(src, dst, progress=False, **kwargs)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"
    assert not dst.exists() and not (tmp_path / "dst.partial").exists()
    return message


def test_missing_scale(src, tmp_path):
    path = edit_shard(src, SCALE)
    assert_fails(src, tmp_path, SCALE.removesuffix("_scale_inv"), "missing", path.name)


def test_scale_of_the_wrong_shape(src, tmp_path):
    path = edit_shard(src, SCALE, torch.ones(2, 3))
    assert_fails(src, tmp_path, SCALE, "(2, 3)", "(1, 2)", path.name)


def test_scale_for_a_tensor_that_is_not_fp8(src, tmp_path):
    edit_shard(src, "model.norm.weight", torch.ones(192, dtype=torch.bfloat16))
    shard = shard_of(src, "model.norm.weight")
    tensors = load_file(shard)
    tensors["model.norm.weight_scale_inv"] = torch.ones(1)
    save_file(tensors, shard)
    index = json.loads((src / INDEX).read_text())
    index["weight_map"]["model.norm.weight_scale_inv"] = shard.name
    (src / INDEX).write_text(json.dumps(index))
    assert_fails(src, tmp_path, "model.norm.weight_scale_inv", "not FP8")


def test_shape_disagrees_with_config(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["moe_intermediate_size"] = 64
    (src / "config.json").write_text(json.dumps(config))
    message = assert_fails(src, tmp_path, "shape", "(64, 192)", "(72, 192)", "model-0000")
    assert "mlp.experts.0." in message or "shared_experts" in message


def test_wrongly_shaped_single_tensor(src, tmp_path):
    path = edit_shard(src, "model.layers.2.input_layernorm.weight", torch.ones(191, dtype=torch.bfloat16))
    assert_fails(src, tmp_path, "'model.layers.2.input_layernorm.weight'", "(191,)", "(192,)", path.name)


def test_unknown_tensor(src, tmp_path):
    path = edit_shard(src, "model.norm.weight", torch.ones(192, dtype=torch.bfloat16))
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, path)
    index = json.loads((src / INDEX).read_text())
    index["weight_map"].update(
        {"model.norm.weight": path.name, "model.layers.0.self_attn.rotary_emb.inv_freq": path.name}
    )
    (src / INDEX).write_text(json.dumps(index))
    assert_fails(src, tmp_path, "'model.layers.0.self_attn.rotary_emb.inv_freq'", path.name, "--allow-unknown")
    with pytest.warns(UserWarning, match="skipping 1 unknown"):
        convert(src, tmp_path / "ok", allow_unknown=True, progress=False)
    assert (tmp_path / "ok" / "config.json").exists()


def test_missing_tensor(src, tmp_path):
    edit_shard(src, "model.layers.2.mlp.experts.7.down_proj.weight")
    edit_shard(src, "model.layers.2.mlp.experts.7.down_proj.weight_scale_inv")
    assert_fails(src, tmp_path, "missing", "'model.layers.2.mlp.experts.7.down_proj.weight'")


def test_truncated_shard(src, tmp_path):
    path = src / "model-00002-of-00003.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert_fails(src, tmp_path, str(path), "truncated")
    path.write_bytes(data[:20])  # not even the whole header
    assert_fails(src, tmp_path, str(path), "truncated")


def test_corrupt_file_is_reported_by_name(src, tmp_path):
    path = src / "model-00003-of-00003.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at " if data[8:9] == b"{" else data[8:20]
    path.write_bytes(bytes(data))
    assert_fails(src, tmp_path, str(path))


def test_index_points_to_a_missing_file(src, tmp_path):
    (src / "model-00003-of-00003.safetensors").unlink()
    assert_fails(src, tmp_path, INDEX, "model-00003-of-00003.safetensors", "does not exist")


def test_tensor_stored_twice(src, tmp_path):
    first = load_file(src / "model-00001-of-00003.safetensors")
    key = next(iter(first))
    last = src / "model-00003-of-00003.safetensors"
    tensors = load_file(last)
    tensors[key] = first[key]
    save_file(tensors, last)
    assert_fails(src, tmp_path, repr(key), "model-00001-of-00003.safetensors")


def test_config_without_needed_fields(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    del config["num_hidden_layers"], config["qk_rope_head_dim"]
    (src / "config.json").write_text(json.dumps(config))
    assert_fails(src, tmp_path, "lacks required fields", "num_hidden_layers", "qk_rope_head_dim")


def test_config_missing_or_invalid(src, tmp_path):
    (src / "config.json").write_text("{not json")
    assert_fails(src, tmp_path, "config.json", "not valid JSON")
    (src / "config.json").unlink()
    assert_fails(src, tmp_path, "config.json", "not found")


def test_config_with_an_invalid_value(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["topk_group"] = 5
    (src / "config.json").write_text(json.dumps(config))
    assert_fails(src, tmp_path, "config.json", "topk_group")


class _Boom:
    """Unpickling this would create a marker file: it must never happen."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_checkpoints_are_refused_unread(tmp_path, pristine):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(pristine / "config.json", folder / "config.json")
    marker = tmp_path / "unpickled"
    boom = _Boom()
    boom.marker = marker
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(boom))
    assert_fails(folder, tmp_path, "pytorch_model.bin", "only safetensors are supported")
    assert_fails(folder / "pytorch_model.bin", tmp_path, "pickle")
    assert not marker.exists()


def test_error_while_writing_removes_the_partial_output(src, tmp_path, monkeypatch):
    calls = fail_after(monkeypatch, 60, watch=tmp_path / "dst.partial")
    assert_fails(src, tmp_path, "simulated failure", shard_size="50KB")
    assert calls[-1]  # it failed half-way, after writing several shards


def test_interrupt_while_writing_removes_the_partial_output(src, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fp8_module, "iter_dequantize_block_fp8", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()


def fail_after(monkeypatch, n: int, watch: Path | None = None) -> list:
    """Make the n-th FP8 dequantization fail, i.e. half-way through writing; returns the record of the calls and,
    at the failure, the shards `watch` (DST.partial) held."""
    calls = []
    real = fp8_module.iter_dequantize_block_fp8

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            if watch is not None:
                calls.append(sorted(p.name for p in watch.glob("*.safetensors")))
            raise ConversionError("tensor 'x': simulated failure half-way")
        return real(*args, **kwargs)

    monkeypatch.setattr(fp8_module, "iter_dequantize_block_fp8", failing)
    return calls


def test_force_keeps_the_old_destination_when_the_new_one_fails(src, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    convert(src, dst, dtype="bf16", progress=False)  # the old DST: an earlier, complete conversion
    (dst / "old.txt").write_text("old")
    before = snapshot(dst)
    calls = fail_after(monkeypatch, 60, watch=tmp_path / "dst.partial")
    with pytest.raises(ConversionError, match="simulated failure"):
        convert(src, dst, dtype="fp32", force=True, shard_size="50KB", progress=False)
    assert calls[-1], "the failure should come after some shards of the new DST were written"
    assert snapshot(dst) == before and not (tmp_path / "dst.partial").exists()


def test_stale_partial_from_a_killed_run_is_replaced(src, tmp_path):
    stale = tmp_path / "dst.partial"
    stale.mkdir()
    (stale / ".moe_mtp_partial").write_text("")  # the marker every run writes into its DST.partial
    (stale / "junk").write_text("x")
    convert(src, tmp_path / "dst", progress=False)
    assert not stale.exists() and not (tmp_path / "dst" / "junk").exists()
    assert not (tmp_path / "dst" / ".moe_mtp_partial").exists() and (tmp_path / "dst" / "config.json").exists()


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_named_like_a_partial_output_is_never_deleted(src, tmp_path, force):
    mine = tmp_path / "dst.partial"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "notes.txt").write_text("mine")
    before = snapshot(mine)
    with pytest.raises(ConversionError) as info:
        convert(src, tmp_path / "dst", force=force, progress=False)
    assert str(mine) in str(info.value) and "another DST" in str(info.value)
    assert snapshot(mine) == before and not (tmp_path / "dst").exists()


def test_destination_inside_source_is_refused(src, tmp_path):
    with pytest.raises(ConversionError, match="must not be the source"):
        convert(src, src / "out", progress=False)


@pytest.mark.parametrize("relation", ["same", "parent", "grandparent"])
def test_destination_that_is_or_contains_the_source_is_refused(pristine, tmp_path, relation):
    models = tmp_path / "models"
    src = Path(shutil.copytree(pristine, models / "deep" / "rel"))
    dst = {"same": src, "parent": src.parent, "grandparent": models}[relation]
    before = snapshot(models)
    with pytest.raises(ConversionError, match="must not be the source folder, inside it, or a folder that contains"):
        convert(src, dst, force=True, progress=False)
    assert snapshot(models) == before and not dst.with_name(dst.name + ".partial").exists()


def test_failed_run_removes_the_parent_folders_it_created(src, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    calls = fail_after(monkeypatch, 60)
    with pytest.raises(ConversionError, match="simulated failure"):
        convert(src, tmp_path / "a" / "b" / "c" / "dst", shard_size="50KB", progress=False)
    assert len(calls) == 60
    assert (tmp_path / "a").is_dir() and not (tmp_path / "a" / "b").exists()  # "a" was there before


@pytest.mark.parametrize("args", [["--from", "transformers"], ["--shard-size", "lots"], ["--dtype", "fp8"]])
def test_cli_exit_code_2_without_traceback(src, tmp_path, capsys, args):
    assert main([str(src), str(tmp_path / "dst"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()
