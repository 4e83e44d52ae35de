"""train.py, end to end in subprocesses: a smoke run's outputs, SIGKILL + resume bit for bit, two gloo processes
sharing one token store; in-process: the data cache reused across runs, --streaming, reruns in one folder."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_corpus
from safetensors.torch import load_file

from moe_mtp.train import parse_args, train
from moe_mtp.training.layout import parallel_layout

STEPS = 10
# A smoke run with a checkpoint every step, so a kill lands between, or inside, checkpoint writes.
RUN = ["--smoke", "--max-steps", str(STEPS), "--save-every", "1", "--eval-every", "5", "--no-progress"]


def launch(output_dir: Path, *extra: str, processes: int = 1) -> subprocess.Popen:
    if processes == 1:
        command = [sys.executable, "-m", "moe_mtp.train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command += ["-m", "moe_mtp.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: the same float results
    return subprocess.Popen(
        [*command, *RUN, "--output-dir", str(output_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().split("\n")[:-1]  # a line still being appended is left out
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted single-process run, shared by the tests below."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(launch(output_dir, "--batch-size", "4"))
    return output_dir


def test_smoke_run_writes_a_loadable_model_metrics_and_plots(reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("loss.png", "expert_load.png", "metrics.csv", "metrics.jsonl", "summary.json", "model", "tokenizer"):
        assert (reference_run / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(reference_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(reference_run / "model")
    assert len(tokenizer) == model.config.vocab_size == 512
    assert any(r.e_score_correction_bias.abs().sum() > 0 for r in model.moe_routers())  # the bias moved and was saved
    # Trained without a KV cache, saved for generation with one (`generate` reads the generation config's flag).
    assert model.config.use_cache and model.generation_config.use_cache

    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    for key in ("main_loss", "mtp_loss_1", "balance_loss", "max_vio/layers.1", "tokens_per_s", "lr", "grad_norm"):
        assert all(key in r for r in train_records), key
    assert train_records[-1]["main_loss"] < train_records[0]["main_loss"]
    assert [r["step"] for r in records if "eval_ppl" in r] == [5, 10]
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["eval"]["eval_ppl"] < 512 and summary["replicas_identical"]
    # Only complete checkpoints, the last two kept, each with every tensor (the packed experts' views included).
    assert sorted(p.name for p in (reference_run / "checkpoints").iterdir()) == ["step-00000009", "step-00000010"]
    checkpoint = load_file(reference_run / "checkpoints" / "step-00000010" / "model.safetensors")
    assert checkpoint.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(checkpoint[name], tensor), name


def test_sigkill_then_resume_ends_bit_identical(reference_run, tmp_path):
    output_dir = tmp_path / "run"
    kill_after = random.Random().randint(2, STEPS - 3)
    process = launch(output_dir, "--batch-size", "4")
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(losses(output_dir)) >= kill_after:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate()

    checkpoints = output_dir / "checkpoints"
    complete = [p for p in checkpoints.iterdir() if not p.name.endswith(".partial")]
    assert complete, f"killed after step {kill_after} with no checkpoint"
    for checkpoint in complete:  # a complete name means complete content
        for name in (
            "trainer_state.json",
            "model.safetensors",
            "optimizer.bin",
            "random_states_0.pkl",
            "metrics.jsonl",
        ):
            assert (checkpoint / name).is_file(), f"{checkpoint.name} lacks {name}"

    finish(launch(output_dir, "--batch-size", "4", "--resume"))
    resumed, reference = (
        load_file(output_dir / "model" / "model.safetensors"),
        load_file(reference_run / "model" / "model.safetensors"),
    )
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after resuming (killed after step {kill_after})"
    assert losses(output_dir) == losses(reference_run)
    assert not list(checkpoints.glob("*.partial"))


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(reference_run, tmp_path):
    store = Path(json.loads((reference_run / "summary.json").read_text())["data"]["store"])
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.iterdir()}
    output_dir = tmp_path / "ddp"
    finish(launch(output_dir, "--batch-size", "2", processes=2))
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Both ranks read the store the single-process run built: neither tokenized the corpus, the files are the
    # same ones, and each rank maps all of them (whole pages: the kernel rounds each file up to the page size).
    data = summary["data"]
    assert Path(data["store"]) == store and data["built_store"] == [False, False]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.iterdir()} == written
    page = os.sysconf("SC_PAGE_SIZE")
    store_pages = sum(-(-(store / name).stat().st_size // page) * page for name in ("train.bin", "eval.bin"))
    assert data["mapped_bytes"] == [store_pages, store_pages] and store_pages - data["store_bytes"] < 2 * page
    assert summary["replicas_identical"], "weights or balancing biases differ between the ranks"
    two, one = losses(output_dir), losses(reference_run)
    assert two.keys() == one.keys()
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-4, (step, two[step], one[step])
    ddp_model = load_file(output_dir / "model" / "model.safetensors")
    for name, tensor in load_file(reference_run / "model" / "model.safetensors").items():
        torch.testing.assert_close(ddp_model[name], tensor, rtol=1e-4, atol=1e-4, msg=name)


def test_a_second_run_in_the_same_folder_stops_with_one_line_saying_what_to_do(reference_run):
    again = subprocess.run(
        [sys.executable, "-m", "moe_mtp.train", *RUN, "--output-dir", str(reference_run)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"{reference_run} already holds files; pass --resume to continue that run, --overwrite to start over in it, "
        "or choose another --output-dir"
    )


def in_process(*argv: str) -> dict:
    return train(parse_args(["--smoke", "--no-plots", "--no-progress", *argv]))


def test_the_tokenizer_and_token_store_are_reused_by_later_runs_and_rebuilt_for_another_corpus(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    flags = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", "--eval-batches", "1"]
    first = in_process(*flags, "--output-dir", str(tmp_path / "first"))
    assert first["data"]["built_store"] == [True] and "tokenizer: trained" in capsys.readouterr().out
    second = in_process(*flags, "--output-dir", str(tmp_path / "second"))
    assert second["data"]["built_store"] == [False] and "tokenizer: reused" in capsys.readouterr().out
    assert second["data"]["store"] == first["data"]["store"]
    assert second["data"]["prep_seconds"] < 0.25 * first["data"]["prep_seconds"], (first["data"], second["data"])
    assert (tmp_path / "first" / "tokenizer" / "tokenizer.json").read_text() == (
        tmp_path / "second" / "tokenizer" / "tokenizer.json"
    ).read_text()

    write_corpus(corpus, documents=250)  # --smoke reads at most 300
    third = in_process(*flags, "--output-dir", str(tmp_path / "third"))
    assert third["data"]["built_store"] == [True] and third["data"]["store"] != first["data"]["store"]
    assert third["data"]["documents"] == 250 and "tokenizer: trained" in capsys.readouterr().out


def test_streaming_trains_from_a_local_datasets_stream_and_resumes_exactly(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    documents = write_corpus(tmp_path / "corpus.txt").read_text().split("\n\n")
    corpus.write_text("".join(json.dumps({"body": text}) + "\n" for text in documents))
    flags = ["--streaming", "--data", str(corpus), "--text-column", "body", "--max-steps", "4", "--save-every", "2"]
    flags += ["--eval-every", "2", "--eval-batches", "2", "--cache-dir", str(tmp_path / "cache")]
    full = in_process(*flags, "--output-dir", str(tmp_path / "full"))
    assert full["data"]["mode"] == "streaming" and full["data"]["built_store"] == [None]
    assert full["data"]["eval_blocks"] == 8 and full["eval"]["eval_ppl"] < 512
    assert not (tmp_path / "cache" / "tokens").exists()  # no store: the stream was tokenized as it was read

    # From the step-2 checkpoint, in another folder: the stream is replayed up to step 2, and the run ends the same.
    checkpoint = tmp_path / "full" / "checkpoints" / "step-00000002"
    in_process(*flags, "--output-dir", str(tmp_path / "resumed"), "--resume", str(checkpoint))
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "full" / "model" / "model.safetensors").items():
        assert torch.equal(resumed[name], tensor), name
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")


def test_refuses_to_write_over_an_earlier_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already holds files; pass --resume"):
        train(parse_args(["--smoke", "--output-dir", str(tmp_path)]))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        parse_args(["--mtp-loss-weight", "0.3,x@0.5"])
    assert "--mtp-loss-weight: cannot read 'x@0.5'" in capsys.readouterr().err


def test_lora_trainer_example_fine_tunes_the_trained_model(reference_run, tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_trainer_lora.py"
    spec = importlib.util.spec_from_file_location("finetune_trainer_lora", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--model", str(reference_run / "model"), "--output-dir", str(tmp_path), "--max-steps", "4"]
    logs = example.main([*argv, "--eval-pairs", "8"])["train_log"]
    assert logs and all("mtp_loss_1" in entry and "max_vio/layers.1" in entry for entry in logs)
    assert (tmp_path / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------- sharded engines (DistributedConfig)

# A short SGD run (not AdamW, whose normalization hides a sum-vs-mean gradient mistake), a checkpoint half way.
SHARDED = ["--smoke", "--optimizer", "sgd", "--max-steps", "4", "--save-every", "2", "--eval-every", "4"]
SHARDED += ["--eval-batches", "1", "--no-plots", "--no-progress"]


def run_sharded(output_dir: Path, *extra: str, processes: int = 1) -> dict:
    command = [sys.executable, "-m", "moe_mtp.train"]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, *SHARDED, "--output-dir", str(output_dir), *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads((output_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def sgd_reference(tmp_path_factory) -> Path:
    """One process, 4 blocks per step: the global batch the sharded runs below split or share."""
    output_dir = tmp_path_factory.mktemp("sgd") / "run"
    run_sharded(output_dir, "--batch-size", "4")
    return output_dir


def assert_same_training(run: Path, reference: Path, atol: float = 1e-5):
    """Per-step losses, and the saved model: the per-expert keys one process writes, every weight within `atol`,
    every balancing bias moved and equal."""
    got, want = losses(run), losses(reference)
    assert got.keys() == want.keys()
    for step in want:
        assert abs(got[step] - want[step]) <= atol, (step, got[step], want[step])
    saved, expected = (
        load_file(run / "model" / "model.safetensors"),
        load_file(reference / "model" / "model.safetensors"),
    )
    assert saved.keys() == expected.keys()
    assert (
        "model.layers.1.mlp.experts.7.down_proj.weight" in saved
        and "model.mtp_layers.0.mlp.experts.0.up_proj.weight" in saved
    )
    for name, tensor in expected.items():
        if name.endswith("e_score_correction_bias"):
            assert tensor.abs().sum() > 0 and torch.equal(saved[name], tensor), name
        else:
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=atol, msg=name)


def test_tensor_and_expert_parallel_training_under_torchrun_matches_one_process(sgd_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "tp_ep"
    summary = run_sharded(run, "--batch-size", "4", "--tp-size", "2", "--ep-size", "2", processes=2)
    assert summary["parallel"] == {"tp_size": 2, "ep_size": 2, "fsdp_size": 1}
    assert summary["world_size"] == 2 and summary["data_parallel_size"] == 1  # both ranks on the same batch
    for rank in summary["sharding"]:  # really sharded: half the experts of each MoE layer here, DTensor weights
        assert rank["experts_held"] == rank["expert_rows"] == [4, 4], rank  # 8 experts: layer 1 and the MTP module
        assert rank["dtensor_parameters"] > 0 and rank["local_elements"] < 0.6 * rank["elements"], rank
        assert rank["expert_path"] == ["grouped"]
    assert summary["bias_updates"] == 4  # once per optimizer step
    assert summary["replicas_identical"]  # the biases and replicated weights equal on both ranks
    assert_same_training(run, sgd_reference)

    # The folder loads in one process and predicts as the single-process model does.
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(run / "model").eval()(ids).logits
        want = AutoModelForCausalLM.from_pretrained(sgd_reference / "model").eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


# Each rank its own block of every micro-batch, two micro-batches per step: 2 x 1 x 2 = the 4 blocks above.
FSDP = ["--batch-size", "1", "--grad-accum", "2", "--fsdp-size", "2"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    return run, run_sharded(run, *FSDP, processes=2)


def test_fsdp2_training_under_torchrun_matches_one_process(sgd_reference, fsdp_run):
    run, summary = fsdp_run
    assert summary["parallel"] == {"tp_size": 1, "ep_size": 1, "fsdp_size": 2}
    assert summary["data_parallel_size"] == 2  # each rank its own blocks
    for rank in summary["sharding"]:  # every parameter a DTensor, half of it here
        assert rank["dtensor_parameters"] == rank["parameters"] and rank["expert_rows"] == [4, 4], rank
        assert rank["local_elements"] < 0.6 * rank["elements"], rank
    assert summary["bias_updates"] == 4 and summary["replicas_identical"]
    assert_same_training(run, sgd_reference)


def test_fsdp2_training_resumes_from_its_sharded_checkpoint_bit_for_bit(fsdp_run, tmp_path):
    run, _ = fsdp_run
    checkpoint = run / "checkpoints" / "step-00000002"
    # The model and optimizer as torch.distributed.checkpoint shards, beside accelerate's RNG states.
    assert (checkpoint / "sharded_state").is_dir() and not (checkpoint / "model.safetensors").exists()
    resumed = tmp_path / "resumed"
    run_sharded(resumed, *FSDP, "--resume", str(checkpoint), processes=2)
    want = load_file(run / "model" / "model.safetensors")
    for name, tensor in load_file(resumed / "model" / "model.safetensors").items():
        assert torch.equal(tensor, want[name]), name
    assert losses(resumed) == losses(run)


@pytest.mark.parametrize(
    "flags, processes, message",
    [
        (["--tp-size", "2", "--fsdp-size", "2"], 2, "--tp-size 2 x --fsdp-size 2 = 4 processes, but 2 were launched"),
        (["--tp-size", "2"], 1, "--tp-size 2 x --fsdp-size 1 = 2 processes, but 1 were launched"),
        (["--ep-size", "2"], 2, "--ep-size 2 must divide --tp-size x --fsdp-size = 1"),
        (["--tp-size", "2", "--ep-size", "3"], 2, "--ep-size 3 must be a multiple of --tp-size 2"),
        (["--fsdp-size", "2", "--ep-size", "2", "--n-routed-experts", "5"], 2, "--ep-size 2 must divide the model's 5 routed experts"),
        (["--tp-size", "2", "--num-heads", "3"], 2, "--tp-size 2 must divide the model's 3 attention heads"),
    ],
)  # fmt: skip
def test_parallel_sizes_that_cannot_work_stop_with_the_flag_named(flags, processes, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        parallel_layout(parse_args(["--smoke", *flags]), processes, 0)


def test_parallel_layout_gives_tensor_parallel_ranks_the_same_data():
    for rank, data_rank in enumerate([0, 0, 1, 1]):  # transformers' (fsdp, tp) mesh: TP ranks adjacent
        layout = parallel_layout(
            parse_args(["--smoke", "--tp-size", "2", "--ep-size", "2", "--fsdp-size", "2"]), 4, rank
        )
        assert (layout.dp_rank, layout.dp_world) == (data_rank, 2)
        assert (layout.config.tp_size, layout.config.ep_size, layout.config.fsdp_size) == (2, 2, 2)
    assert parallel_layout(parse_args(["--smoke"]), 2, 1).config is None  # DDP through accelerate, as before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tp-size", "0"], "--tp-size must be at least 1, got 0"),
        (["--fsdp-size", "2", "--mixed-precision", "fp16"], "--fsdp-size 2: --mixed-precision fp16 needs a gradient scaler"),
        (["--tp-size", "2", "--mtp-only"], "--tp-size 2: --mtp-only/--add-mtp run in one process or under DDP only"),
    ],
)  # fmt: skip
def test_parallel_flags_that_do_not_combine_are_refused_by_the_parser(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--smoke", *flags])
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------- DeepSpeed ZeRO-3 (accelerate launch)

ROOT = Path(__file__).resolve().parents[1]
# The shipped config, in fp32 here (it asks for bf16, for GPUs), on 2 gloo CPU processes (DeepSpeed's CPU accelerator).
ZERO3 = ["--config_file", str(ROOT / "examples" / "accelerate" / "deepspeed_zero3.yaml"), "--mixed_precision", "no"]
ZERO3_RUN = ["--batch-size", "1", "--grad-accum", "2"]  # 2 processes x 1 x 2 = the 4 blocks of sgd_reference


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_zero3(output_dir: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    # A free port rather than accelerate's default 29500, which another test process may hold (make test runs two).
    port = ["--main_process_port", str(free_port())]
    command = [sys.executable, "-m", "accelerate.commands.launch", *port, *ZERO3, "-m", "moe_mtp.train"]
    done = subprocess.run(
        [*command, *SHARDED, *ZERO3_RUN, "--output-dir", str(output_dir), *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads((output_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> tuple[Path, dict]:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed, or the dev extras)")
    run = tmp_path_factory.mktemp("zero3") / "run"
    return run, run_zero3(run)


def test_deepspeed_zero3_under_accelerate_launch_matches_one_process(sgd_reference, zero3_run):
    run, summary = zero3_run
    assert summary["world_size"] == summary["data_parallel_size"] == 2 and summary["parallel"] is None
    for rank in summary["sharding"]:  # ZeRO-3 partitions: every parameter, half of its elements on each rank
        assert rank["zero3_parameters"] == rank["parameters"], rank
        assert rank["local_elements"] < 0.6 * rank["elements"], rank
        assert rank["zero3_leaf_modules"] == 2, rank  # the MoE blocks of layer 1 and of the MTP module
    # ZeRO steps the optimizer over flat partitions: the bias moves only through the explicit binding, once a step.
    assert summary["bias_updates"] == 4 and summary["replicas_identical"]
    assert_same_training(run, sgd_reference)


def test_deepspeed_zero3_resumes_from_its_checkpoint_bit_for_bit(zero3_run, tmp_path):
    run, _ = zero3_run
    checkpoint = run / "checkpoints" / "step-00000002"
    assert (checkpoint / "pytorch_model").is_dir()  # DeepSpeed's own partitioned checkpoint, through accelerate
    resumed = tmp_path / "resumed"
    run_zero3(resumed, "--resume", str(checkpoint))
    want = load_file(run / "model" / "model.safetensors")
    for name, tensor in load_file(resumed / "model" / "model.safetensors").items():
        assert torch.equal(tensor, want[name]), name
    assert losses(resumed) == losses(run)
