"""`python -m moe_mtp.train --mtp-only / --add-mtp`, the Trainer path to it, and MTP modules over a model's life."""

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.modeling.speculative import ADAPTIVE_MAX_DRAFTS_BATCHED
from moe_mtp.train import main as train_main

MTP = "model.mtp_layers."
# A smoke-sized model trained long enough to predict something: its greedy next tokens are far from uniform.
TRAIN = ["--smoke", "--max-steps", "100", "--eval-every", "100", "--save-every", "0", "--no-progress", "--no-plots"]
ALIGN = ["--smoke", "--max-steps", "60", "--no-progress", "--mtp-drafts", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    train_main([*TRAIN, "--output-dir", str(out)])
    return out / "model"


@pytest.fixture(scope="module")
def transformers_folder(trained, tmp_path_factory):
    """The trained model saved by transformers' own DeepseekV3ForCausalLM, which drops the MTP layer."""
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    from moe_mtp.conversion import convert_state_dict, transformers_config

    ours = MoeMtpForCausalLM.from_pretrained(trained, dtype=torch.float32)
    theirs = DeepseekV3ForCausalLM(transformers_config(ours.config))
    with warnings.catch_warnings():  # that transformers' layout has no MTP module is the point here
        warnings.simplefilter("ignore")
        state = convert_state_dict(ours.state_dict(), ours.config, "moe_mtp_model", "transformers")
    theirs.load_state_dict({k: v for k, v in state.items() if k in theirs.state_dict()}, strict=True)
    folder = tmp_path_factory.mktemp("transformers") / "model"
    theirs.save_pretrained(folder)
    AutoTokenizer.from_pretrained(trained).save_pretrained(folder)
    assert not any("layers.2." in k for k in load_file(folder / "model.safetensors"))  # no MTP layer saved
    return folder


def summary_of(output_dir) -> dict:
    return json.loads((output_dir / "mtp_align.json").read_text())


def assert_main_identical(before: dict, after: dict) -> None:
    main = [k for k in before if not k.startswith(MTP)]
    assert main and main == [k for k in after if not k.startswith(MTP)]
    for key in main:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


def assert_greedy_exact(model, prompts, new_tokens=24):
    with torch.no_grad():
        plain = model.generate(prompts, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        mtp = model.generate(prompts, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_mtp=True)
    assert torch.equal(plain, mtp)
    return model.last_mtp_stats


def prompts_of(folder, count=3, length=16):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    from pydoc_data.topics import topics

    ids = []  # documents joined with EOS, as the token store holds them
    for document in tokenizer([topics[name] for name in sorted(topics)[-20:]], add_special_tokens=False)["input_ids"]:
        ids += [*document, tokenizer.eos_token_id]
    return torch.tensor(ids[: count * length]).view(count, length)


def test_mtp_only_keeps_every_main_tensor_bit_identical(trained, tmp_path):
    out = tmp_path / "aligned"
    train_main(["--mtp-only", "--model", str(trained), "--output-dir", str(out), *ALIGN])
    before, after = load_file(trained / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert_main_identical(before, after)
    mtp = [k for k in before if k.startswith(MTP)]
    assert mtp and set(mtp) == {k for k in after if k.startswith(MTP)}
    assert any(not torch.equal(before[k], after[k]) for k in mtp), "the MTP module did not train"
    assert summary_of(out)["main_tensors_identical"] == len(before) - len(mtp)
    with pytest.raises(SystemExit, match="already holds files"):  # never writes over a run
        train_main(["--mtp-only", "--model", str(trained), "--output-dir", str(out), *ALIGN])


def test_mtp_train_depth_distills_the_reused_module_at_every_draft_depth(trained, tmp_path):
    """--mtp-train-depth 3 trains the one module at depths 1-3 (on its own output past depth 1): same seed and data as
    depth 1, different weights; the main model stays bit-identical."""
    flags = [*ALIGN, "--max-steps", "10", "--acceptance-prompts", "1", "--acceptance-tokens", "8"]
    for depth in ("1", "3"):
        train_main(["--mtp-only", "--model", str(trained), "--output-dir", str(tmp_path / depth), *flags,
                    "--mtp-train-depth", depth])  # fmt: skip
        assert summary_of(tmp_path / depth)["train_depth"] == int(depth)
    once, thrice = (load_file(tmp_path / depth / "model" / "model.safetensors") for depth in ("1", "3"))
    assert_main_identical(once, thrice)
    assert any(not torch.equal(once[k], thrice[k]) for k in once if k.startswith(MTP))
    with pytest.raises(SystemExit, match="--mtp-train-depth 0 leaves MTP modules untrained"):
        train_main(["--mtp-only", "--model", str(trained), "--output-dir", str(tmp_path / "0"), *flags,
                    "--mtp-train-depth", "0"])  # fmt: skip


def test_mtp_drafts_default_saves_adaptive(trained, tmp_path):
    out = tmp_path / "default"
    flags = [*ALIGN[:-2], "--max-steps", "20", "--acceptance-prompts", "2", "--acceptance-tokens", "24"]
    train_main(["--mtp-only", "--model", str(trained), "--output-dir", str(out), *flags])
    # generate chooses the drafts per step as it decodes: nothing is timed here
    assert summary_of(out)["num_mtp_draft_tokens"] == "adaptive" and summary_of(out)["speed_by_drafts"] == {}
    model = MoeMtpForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert model.config.num_mtp_draft_tokens == "adaptive"
    stats = assert_greedy_exact(model, prompts_of(out / "model"))
    # 3 prompts: up to ADAPTIVE_MAX_DRAFTS_BATCHED drafts per step
    assert len(stats.drafted_per_position) == ADAPTIVE_MAX_DRAFTS_BATCHED
    assert sum(stats.steps_by_drafts.values()) == stats.steps


def test_mtp_drafts_auto_times_each_count_and_saves_the_fastest(trained, tmp_path, capsys):
    out = tmp_path / "auto"
    flags = [*ALIGN[:-2], "--max-steps", "20", "--acceptance-prompts", "2", "--acceptance-tokens", "24"]
    train_main(["--mtp-only", "--model", str(trained), "--output-dir", str(out), *flags, "--mtp-drafts", "auto",
                "--max-mtp-drafts", "3"])  # fmt: skip
    summary = summary_of(out)
    speeds = {int(count): ratio for count, ratio in summary["speed_by_drafts"].items()}
    assert sorted(speeds) == [1, 2, 3] and all(ratio > 0 for ratio in speeds.values())
    assert summary["num_mtp_draft_tokens"] == max(speeds, key=speeds.get)
    model = MoeMtpForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert model.config.num_mtp_draft_tokens == summary["num_mtp_draft_tokens"]
    stats = assert_greedy_exact(model, prompts_of(out / "model"))  # generate drafts the saved count by default
    assert len(stats.drafted_per_position) == summary["num_mtp_draft_tokens"]
    assert "saving num_mtp_draft_tokens=" in capsys.readouterr().out

    fixed = tmp_path / "fixed"
    train_main(["--mtp-only", "--model", str(trained), "--output-dir", str(fixed), *flags, "--mtp-drafts", "3"])
    assert summary_of(fixed)["num_mtp_draft_tokens"] == 3 and summary_of(fixed)["speed_by_drafts"] == {}
    for bad in ("0", "two"):
        with pytest.raises(SystemExit, match="--mtp-drafts must be"):  # refused before any training
            train_main(["--mtp-only", "--model", str(trained), "--output-dir", str(tmp_path / bad), *flags,
                        "--mtp-drafts", bad])  # fmt: skip
        assert not (tmp_path / bad / "model").exists()


def test_add_mtp_to_a_transformers_folder_raises_acceptance_and_stays_exact(transformers_folder, trained, tmp_path):
    """A new, randomly initialized module starts near 0 acceptance; self-distillation must take it far above."""
    out = tmp_path / "added"
    with pytest.raises(SystemExit, match="--add-mtp"):  # no MTP modules to re-align
        train_main(["--mtp-only", "--model", str(transformers_folder), "--output-dir", str(tmp_path / "x"), *ALIGN])
    train_main(["--add-mtp", "1", "--model", str(transformers_folder), "--output-dir", str(out), *ALIGN])
    summary = summary_of(out)
    assert summary["added"] == 1 and summary["mtp_data"] == "generated"
    assert summary["before"]["teacher_forced"] < 0.1 and summary["before"]["acceptance"] < 0.1
    # aligned along the model's own continuations: drafts along its own output are what it learned (~0.9)
    assert summary["after"]["acceptance"] > 0.8
    assert summary["after"]["teacher_forced"] > 0.25  # along human text it learned less (~0.37), but far from 0
    # the main weights are the transformers folder's (which holds the trained model's), in moe_mtp names
    assert_main_identical(
        {k: v for k, v in load_file(trained / "model.safetensors").items() if not k.startswith(MTP)},
        {k: v for k, v in load_file(out / "model" / "model.safetensors").items() if not k.startswith(MTP)},
    )
    model = MoeMtpForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert model.config.num_nextn_predict_layers == 1
    stats = assert_greedy_exact(model, prompts_of(out / "model"))
    assert stats.acceptance_rate > 0.5


def test_mtp_data_text_aligns_along_the_corpus(transformers_folder, tmp_path):
    """`--mtp-data text`: contexts are the corpus's blocks, so teacher-forced acceptance along text rises most."""
    out = tmp_path / "text"
    train_main(["--add-mtp", "1", "--mtp-data", "text", "--model", str(transformers_folder), "--output-dir", str(out),
                *ALIGN])  # fmt: skip
    summary = summary_of(out)
    assert summary["mtp_data"] == "text" and summary["generated"] is None
    assert summary["after"]["teacher_forced"] > 0.5 and summary["after"]["acceptance"] > 0.6


def test_generated_data_continues_prompts_of_each_length(trained, tmp_path):
    from transformers import AutoTokenizer

    from moe_mtp.train import parse_args
    from moe_mtp.training.mtp_align import (
        Batches,
        generated_buckets,
        generation_plan,
        token_blocks,
        warn_past_positions,
    )

    args = parse_args(["--mtp-only", "--model", str(trained), "--output-dir", str(tmp_path), *ALIGN,
                       "--generate-prompt-lengths", "8", "24", "--generate-tokens", "6", "--generated-sequences", "5"])  # fmt: skip
    model = MoeMtpForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    store, _, _ = token_blocks(args, AutoTokenizer.from_pretrained(trained))
    buckets, _ = generated_buckets(model, store, args, "cpu", *generation_plan(args))
    assert [(b.prompt_len, len(b), b.sequences.shape[1]) for b in buckets] == [(8, 3, 14), (24, 2, 30)]
    short = buckets[0].sequences
    windows = torch.from_numpy(np.lib.stride_tricks.sliding_window_view(store.tokens["train"], 8).astype("int64"))
    assert all((windows == row[:8]).all(1).any() for row in short)  # prompts are windows of the training text
    with torch.no_grad():  # continuations are the model's own greedy tokens
        again = model.generate(short[:, :8], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(again, short)
    batches = Batches(buckets, seed=0)
    drawn = [batches.next() for _ in range(40)]  # buckets in proportion to their size, whole micro-batches
    assert {tuple(batch.shape) for batch in drawn} == {(3, 14), (2, 30)}  # batch_size 9 and 4, capped
    with pytest.warns(UserWarning, match="max_position_embeddings"):  # the smoke model's is 32
        warn_past_positions(model.config, 6, [8, 30])

    refused = {  # before any loading, each naming its flag
        ("--generate-tokens", "0"): "--generate-tokens must be at least 1",
        ("--generate-tokens", "32"): "leaves no prompt in --seq-len 32",
        ("--generate-prompt-lengths", "1", "--generate-tokens", "1"): "too short a sequence for 1 MTP module",
        ("--generate-prompt-lengths", "8", "16", "--generated-sequences", "1"): "--generated-sequences 1 is fewer",
        ("--mtp-data", "text", "--generate-tokens", "8"): "--generate-tokens: only with --mtp-data generated",
    }
    for flags, message in refused.items():
        with pytest.raises(SystemExit, match=message):
            train_main(["--mtp-only", "--model", str(trained), "--output-dir", str(tmp_path / "bad"), *ALIGN, *flags])
        assert not (tmp_path / "bad").exists()


def test_mtp_only_on_an_int8_base(trained, tmp_path):
    out = tmp_path / "int8"
    train_main(["--mtp-only", "--load-in-8bit", "--model", str(trained), "--output-dir", str(out), *ALIGN])
    summary = summary_of(out)
    assert summary["quantized"] == "int8"
    before, after = load_file(trained / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert_main_identical(before, after)  # written from the full-precision input, not from the int8 copy
    assert after["model.mtp_layers.0.eh_proj.weight"].dtype == torch.float32
    assert summary["after"]["acceptance"] > summary["before"]["acceptance"]  # ~0.91 -> ~0.99 (the generation ran int8)


def test_mtp_modules_survive_lora_merge_save_release_layout_and_reload(trained, tmp_path):
    from peft import LoraConfig, get_peft_model

    from moe_mtp.conversion import convert

    model = MoeMtpForCausalLM.from_pretrained(trained, dtype=torch.float32)
    original = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(MTP)}
    targets = ["q_a_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = prompts_of(trained, count=2, length=32)
    for _ in range(3):
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = peft_model.merge_and_unload()
    state = {k: v.clone() for k, v in merged.state_dict().items() if k.startswith(MTP)}
    assert set(state) == set(original)  # no module lost, no adapter left
    assert torch.equal(state["model.mtp_layers.0.eh_proj.weight"], original["model.mtp_layers.0.eh_proj.weight"])
    assert not torch.equal(  # LoRA reached the MTP module's projections and was merged into them
        state["model.mtp_layers.0.self_attn.o_proj.weight"], original["model.mtp_layers.0.self_attn.o_proj.weight"]
    )

    merged.save_pretrained(tmp_path / "merged")
    reloaded = MoeMtpForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    for key, value in state.items():
        assert torch.equal(reloaded.state_dict()[key], value), key

    convert(tmp_path / "merged", tmp_path / "release", dst_format="deepseek", dtype="fp32", progress=False)
    layers = reloaded.config.num_hidden_layers
    released = load_file(tmp_path / "release" / "model.safetensors")
    assert f"model.layers.{layers}.eh_proj.weight" in released  # MTP at layer num_hidden_layers, as vLLM reads it
    from_release = MoeMtpForCausalLM.from_pretrained(tmp_path / "release", dtype=torch.float32).eval()
    for key, value in state.items():
        assert torch.equal(from_release.state_dict()[key], value), key
    assert_greedy_exact(from_release, prompts_of(trained))


def test_trainer_path_trains_only_the_mtp_module_on_the_models_own_predictions(trained, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from moe_mtp.training import MoeMtpCallback
    from moe_mtp.training.mtp_align import teacher_forced_acceptance

    model = MoeMtpForCausalLM.from_pretrained(trained, dtype=torch.float32)
    with torch.no_grad():  # start from a useless module, so that the gain is the callback's doing
        for parameter in model.model.mtp_layers.parameters():
            parameter.normal_(0, 0.02)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = prompts_of(trained, count=64, length=32)
    heldout = blocks[-8:]
    start = teacher_forced_acceptance(model.eval(), heldout, 8, "cpu")
    data = Dataset.from_dict({"input_ids": blocks[:-8].tolist(), "labels": blocks[:-8].tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=80, per_device_train_batch_size=8, learning_rate=3e-3, report_to=[],
        logging_steps=10, save_strategy="no", use_cpu=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[MoeMtpCallback(mtp_only=True)]).train()
    assert model.config.mtp_loss_targets == "labels" and model.config.bias_update_speed == before_speed(trained)
    after = model.state_dict()
    assert_main_identical(before, after)  # buffers (balancing bias) included
    end = teacher_forced_acceptance(model.eval(), heldout, 8, "cpu")
    # From ~0.01: a module that learned the main model's next tokens, not noise (80 steps on the token-store-trained
    # smoke model reach ~0.25; the CLI test above holds the stronger bar).
    assert end > start + 0.2, (start, end)


def before_speed(folder) -> float:
    return json.loads((folder / "config.json").read_text())["bias_update_speed"]
