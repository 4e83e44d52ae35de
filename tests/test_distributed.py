"""Tensor, expert and FSDP2 parallelism through transformers' `DistributedConfig`, on 2 gloo CPU processes, each
compared with one process running the same global batch (the config's parallel plans; docs/distributed.md).

Every worker asserts that its engine is really active (DTensor parameters, half the experts per rank), so a silent
fallback to a replicated model fails."""

import functools
import gc
import os

import pytest
import torch
import torch.distributed as dist

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.modeling.balancing import balancing_state
from moe_mtp.modeling.modeling_moe_mtp import MoeMtpExperts


def _helpers():
    """tests/conftest.py by path: spawned workers re-import this module, and the name `conftest` may be another
    folder's there (tests/transformers_common has one)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_moe_mtp_test_helpers", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPERTS = 16
STEPS = 3
LR = 0.5


def config():
    # fp32, 16 routed experts (4 groups of 4), top-2, one MTP module; bias moves fast enough to see in 3 steps.
    return _helpers().tiny_config("v3", n_routed_experts=EXPERTS, num_nextn_predict_layers=1, bias_update_speed=0.01)


def batch(rows=4, seq_len=10):
    return torch.randint(3, 128, (rows, seq_len), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)  # the same weights every run: a tolerance that holds once holds always
    model = MoeMtpForCausalLM(config())
    _helpers().randomize_router_bias(model)
    path = tmp_path_factory.mktemp("distributed") / "model"
    model.save_pretrained(path)
    return path


def reference(folder):
    return MoeMtpForCausalLM.from_pretrained(folder)


def spawn(worker, folder, out):
    """Runs `worker(rank, folder, out)` on 2 processes, one thread each (gloo, a file store in `out`)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.multiprocessing.spawn(worker, args=(str(folder), str(out)), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=True) for rank in range(2)]


def rank_of_two(worker):
    """Makes `worker(rank, folder, out, ...)` one rank of a 2-process gloo group (one thread, a file store in `out`).

    The group goes only once the worker's objects are freed and both ranks are done. Destroyed right after the worker,
    with its DTensors still alive, a rank aborted at exit about one run in ten ("terminate called without an active
    exception"); in this order 100 runs in a row passed. The exact cause inside torch was not pinned down."""

    @functools.wraps(worker)
    def run(rank: int, folder: str, out: str, *args):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
        try:
            worker(rank, folder, out, *args)
            gc.collect()
            dist.barrier()
        finally:
            dist.destroy_process_group()

    return run


def full(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def moe_experts(model) -> list[MoeMtpExperts]:
    return [m for m in model.modules() if isinstance(m, MoeMtpExperts)]


# ------------------------------------------------------------------------------------------------ tensor + expert


def logits_then_loss(model, ids):
    """Eval-mode logits without grad, then the training loss on `ids`, backpropagated."""
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return logits, loss.detach()


@rank_of_two
def _tp_ep_worker(rank, folder, out):
    from transformers.distributed import DistributedConfig

    model = MoeMtpForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=2, ep_size=2))
    experts = moe_experts(model)
    assert len(experts) == 3  # layers 1 and 2, and the MTP module
    for e in experts:  # half the experts live here, whole
        assert e.num_experts == EXPERTS // 2 and e._is_expert_parallel
        assert local(e.gate_up_proj).shape[0] == local(e.down_proj).shape[0] == EXPERTS // 2
    attention = model.model.layers[0].self_attn  # tensor parallel: half the heads
    assert local(attention.q_b_proj.weight).shape[0] == attention.q_b_proj.weight.shape[0] // 2
    assert local(model.lm_head.weight).shape[0] == model.config.vocab_size // 2

    ids = batch()
    logits, loss = logits_then_loss(model, ids)
    grads = {name: full(p.grad).clone() for name, p in model.named_parameters()}
    assert {e.last_path for e in experts} == {"grouped"}
    # 2 tokens against 16 experts: most experts get nothing on this rank, and nothing waits for them.
    model(ids[:1, :2], labels=ids[:1, :2]).loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()  # moves the bias from both batches' loads, counted once
    biases = {name: b.clone() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")}
    load = balancing_state(model.model).last_load

    model.eval()
    with torch.no_grad():
        stepped = model(ids).logits
    prompt = ids[:2, :5]
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False)
    drafted = model.generate(prompt, max_new_tokens=6, do_sample=False, use_mtp=True)
    model.save_pretrained(os.path.join(out, "saved"))
    torch.save(
        {
            "logits": logits,
            "loss": loss,
            "grads": grads,
            "plain": plain,
            "drafted": drafted,
            "biases": biases,
            "load": load,
            "stepped": stepped,
        },  # fmt: skip
        os.path.join(out, f"rank{rank}.pt"),
    )


def test_tensor_and_expert_parallel_match_one_process(folder, tmp_path):
    ranks = spawn(_tp_ep_worker, folder, tmp_path)
    model = reference(folder)
    ids = batch()
    want_logits, want_loss = logits_then_loss(model, ids)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model(ids[:1, :2], labels=ids[:1, :2]).loss.backward()
    before = {name: b.clone() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")}
    torch.optim.SGD(model.parameters(), lr=LR).step()
    model.eval()
    prompt = ids[:2, :5]
    want_tokens = model.generate(prompt, max_new_tokens=6, do_sample=False)
    for got in ranks:
        torch.testing.assert_close(got["logits"], want_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["loss"], want_loss, atol=1e-5, rtol=0)
        assert got["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
        assert torch.equal(got["load"], balancing_state(model.model).last_load)  # each token counted once
        for name, bias in got["biases"].items():
            assert not torch.equal(bias, before[name]) and torch.equal(bias, model.get_buffer(name)), name
        assert torch.equal(got["plain"], want_tokens) and torch.equal(got["drafted"], want_tokens)

    # Saved after the step from the sharded model: per-expert keys, MTP included, loading in one process.
    saved = MoeMtpForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, ranks[0]["stepped"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------ FSDP2


def sgd_steps(model, rows, steps=STEPS):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)  # not Adam, which would hide a sum-vs-mean mistake
    model.train()
    for _ in range(steps):
        model(rows, labels=rows).loss.backward()
        optimizer.step()  # moves the balancing bias too (the optimizer-step hook)
        optimizer.zero_grad()
    return optimizer


@rank_of_two
def _fsdp_worker(rank, folder, out):
    from torch.distributed.tensor import DTensor
    from transformers.distributed import DistributedConfig

    model = MoeMtpForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(fsdp_size=2))
    for name, param in model.named_parameters():  # sharded, half the rows here
        assert isinstance(param, DTensor), name
        assert param.to_local().shape[0] in (param.shape[0] // 2, (param.shape[0] + 1) // 2), name
    ids = batch()
    optimizer = sgd_steps(model, ids[2 * rank : 2 * rank + 2])  # each rank its own half of the batch
    experts = moe_experts(model)
    assert {e.last_path for e in experts} == {"grouped"}  # on the unsharded 3-D parameters, no per-forward copy
    # 2 tokens per rank against 16 experts: some expert gets nothing on some rank, and nothing hangs.
    model(ids[rank : rank + 1, :2], labels=ids[rank : rank + 1, :2]).loss.backward()
    optimizer.zero_grad()
    params = {name: full(p).detach() for name, p in model.named_parameters()}
    biases = {name: b.clone() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")}
    model.save_pretrained(os.path.join(out, "saved"))
    torch.save({"params": params, "biases": biases}, os.path.join(out, f"rank{rank}.pt"))

    # torch.distributed.checkpoint: rank-local files, reloaded sharded, then training resumes.
    model.save_pretrained(os.path.join(out, "dcp"), distributed_checkpoint=True)
    again = MoeMtpForCausalLM.from_pretrained(
        os.path.join(out, "dcp"), distributed_config=DistributedConfig(fsdp_size=2)
    )
    for name, param in again.named_parameters():
        assert isinstance(param, DTensor) and torch.equal(full(param), params[name]), name
    for name, bias in again.named_buffers():
        if name in biases:
            assert torch.equal(bias, biases[name]), name
    # The restored routers have no token counts yet (built on the meta device): a step must still work.
    torch.optim.SGD(again.parameters(), lr=LR).step()
    sgd_steps(again, ids[2 * rank : 2 * rank + 2], steps=1)


def test_fsdp2_step_equals_the_full_batch_step(folder, tmp_path):
    ranks = spawn(_fsdp_worker, folder, tmp_path)
    model = reference(folder)
    before = {name: b.clone() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")}
    sgd_steps(model, batch())
    params = dict(model.named_parameters())
    for got in ranks:
        assert got["params"].keys() == params.keys()
        for name, param in params.items():
            torch.testing.assert_close(got["params"][name], param.detach(), atol=1e-5, rtol=1e-4, msg=name)
        for name, bias in got["biases"].items():  # moved, the same on both ranks, as one process moves it
            assert not torch.equal(bias, before[name]), name
            torch.testing.assert_close(bias, model.get_buffer(name), atol=1e-6, rtol=0, msg=name)
    for name in ranks[0]["biases"]:
        assert torch.equal(ranks[0]["biases"][name], ranks[1]["biases"][name]), name

    # The save reloads in one process as exactly the parameters the ranks held, which differ from the reference's
    # by the reduction order (up to 2e-5 in the logits).
    saved = MoeMtpForCausalLM.from_pretrained(tmp_path / "saved").eval()
    held = reference(folder).eval()
    held.load_state_dict({**ranks[0]["params"], **ranks[0]["biases"]}, strict=False)
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, held(ids).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------------ Trainer

TRAINER_ROWS = 8  # two optimizer steps of 4 rows: one epoch, the same batches in every run
TRAINER_ENGINES = {
    "fsdp2": dict(fsdp_size=2),
    "fsdp2+ep": dict(fsdp_size=2, ep_size=2),  # experts split over the two FSDP ranks, tokens exchanged all-to-all
    "tp+ep": dict(tp_size=2, ep_size=2),
}


def trainer_rows() -> list[list[int]]:
    return torch.randint(3, 128, (TRAINER_ROWS, 10), generator=torch.Generator().manual_seed(11)).tolist()


def sgd_trainer(model, out: str, per_device: int, **options):
    """transformers.Trainer with SGD (not Adam, which would hide a sum-vs-mean mistake), gradient clipping, and
    MoeMtpCallback logging the loss parts. `options`: more TrainingArguments."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from moe_mtp.training import MoeMtpCallback

    args = TrainingArguments(
        output_dir=out, max_steps=2, per_device_train_batch_size=per_device, optim="sgd", learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[],
        save_strategy="no", disable_tqdm=True, seed=0, **{"use_cpu": True, **options},
    )  # fmt: skip
    rows = trainer_rows()
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[MoeMtpCallback()])


@rank_of_two
def _trainer_worker(rank, folder, out, engine):
    from torch.distributed.tensor import DTensor
    from transformers.distributed import DistributedConfig

    # accelerate (inside Trainer) reads the launch from the environment, as torchrun would set it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    sizes = TRAINER_ENGINES[engine]
    model = MoeMtpForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(**sizes))
    for e in moe_experts(model):  # really sharded: DTensor experts, half the rows (EP: half the experts) here
        assert isinstance(e.gate_up_proj, DTensor) and local(e.gate_up_proj).shape[0] == EXPERTS // 2
        assert e.num_experts == (EXPERTS // 2 if sizes.get("ep_size", 1) > 1 else EXPERTS)
    data_parallel = sizes.get("fsdp_size", 1)
    trainer = sgd_trainer(model, os.path.join(out, "trainer"), per_device=4 // data_parallel)
    trainer.train()
    assert {e.last_path for e in moe_experts(model)} == {"grouped"}
    params = {name: full(p).detach().clone() for name, p in model.named_parameters()}
    record = trainer_record(model, trainer, params=params)
    trainer.save_model(os.path.join(out, "saved"))  # every rank takes part; rank 0 writes
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))


def trainer_record(model, trainer, **extra) -> dict:
    """What a Trainer worker rank hands back: its balancing biases, how often they were updated, its loss logs."""
    return {
        **extra,
        "biases": {name: b.clone() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")},
        "updates": balancing_state(model.model).updates,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
    }


def trained_reference(folder, tmp_path):
    """One process, the whole batch, the same SGD Trainer: (model, biases before training, loss logs)."""
    model = reference(folder)
    before = {name: b.clone() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")}
    trainer = sgd_trainer(model, str(tmp_path / "reference"), per_device=4)
    trainer.train()
    return model, before, [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_bias_as_reference(got: dict, model, before: dict) -> None:
    """The rank's biases moved, and equal the reference's, which moved once per step (2 steps)."""
    for name, bias in got["biases"].items():
        assert not torch.equal(bias, before[name]) and torch.equal(bias, model.get_buffer(name)), name
    assert got["updates"] == balancing_state(model.model).updates == 2


def _accelerate_takes_tensor_parallel_on_cpu() -> bool:
    """accelerate's ParallelismConfig, which Trainer builds for a model with tp_size > 1, accepts only GPU-type
    (multi-device), FSDP2 or DeepSpeed launches: not gloo CPU processes (DistributedType.MULTI_CPU)."""
    from types import SimpleNamespace

    try:
        from accelerate import ParallelismConfig
        from accelerate.utils import DistributedType

        launch = SimpleNamespace(
            num_processes=2, is_fsdp2=False, multi_device=False, distributed_type=DistributedType.MULTI_CPU,
            is_main_process=True,
        )  # fmt: skip
        ParallelismConfig(tp_size=2)._validate_accelerator(launch)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("engine", list(TRAINER_ENGINES))
def test_trainer_trains_a_model_loaded_with_a_distributed_config_as_one_process(folder, tmp_path, engine):
    if "tp_size" in TRAINER_ENGINES[engine] and not _accelerate_takes_tensor_parallel_on_cpu():
        pytest.skip(
            "Trainer hands a tensor-parallel model's sizes to accelerate's ParallelismConfig, which refuses gloo CPU "
            "processes (DistributedType.MULTI_CPU): TP under Trainer needs GPUs (docs/distributed.md)"
        )
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.multiprocessing.spawn(_trainer_worker, args=(str(folder), str(tmp_path), engine), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]

    model, before, want_logs = trained_reference(folder, tmp_path)
    for got in ranks:
        for name, param in model.named_parameters():
            torch.testing.assert_close(got["params"][name], param.detach(), atol=1e-5, rtol=1e-4, msg=name)
        assert_bias_as_reference(got, model, before)
        # The callback's loss parts are each forward's means, averaged over ranks: the values one process logs.
        assert len(got["logs"]) == len(want_logs) == 2
        for entry, want in zip(got["logs"], want_logs, strict=True):
            for key in ("loss", "main_loss", "mtp_loss_1", "balance_loss", "max_vio/layers.1"):
                assert entry[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (key, entry[key], want[key])

    # trainer.save_model from the sharded model: the per-expert keys, loading in one process as the trained weights.
    from safetensors.torch import load_file

    assert "model.layers.1.mlp.experts.15.down_proj.weight" in load_file(tmp_path / "saved" / "model.safetensors")
    saved = MoeMtpForCausalLM.from_pretrained(tmp_path / "saved")
    for name, param in saved.named_parameters():
        assert torch.equal(param, ranks[0]["params"][name]), name


# The DeepSpeed config a Trainer user passes (TrainingArguments(deepspeed=...)): ZeRO-3, the batch and clipping from
# the TrainingArguments, the full weights gathered for save_model.
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "zero_allow_untested_optimizer": True,
}  # fmt: skip


@rank_of_two
def _zero3_trainer_worker(rank, folder, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator, gloo collectives
    from accelerate import PartialState

    model = MoeMtpForCausalLM.from_pretrained(folder)
    # On CPU processes accelerate needs the backend named (TrainingArguments does not pass ddp_backend under
    # DeepSpeed, and accelerate then counts one process): a state configured here, which the Trainer reuses.
    # use_cpu=True would turn DeepSpeed off; on a machine without GPUs it runs on the CPU anyway.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(cpu=False, backend="gloo")
    trainer = sgd_trainer(
        model, os.path.join(out, "trainer"), per_device=2, deepspeed=ZERO3, use_cpu=False,
        accelerator_config={"use_configured_state": True},
    )  # fmt: skip
    trainer.train()
    assert trainer.accelerator.num_processes == 2  # each rank on its half of the batch
    params = list(model.parameters())
    record = trainer_record(
        model, trainer,
        partitioned=sum(hasattr(p, "ds_tensor") for p in params) / len(params),
        held=sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params),
        leaf_modules=sum(bool(getattr(m, "_z3_leaf", False)) for m in model.modules()),
    )  # fmt: skip
    trainer.save_model(os.path.join(out, "saved"))  # gathers the partitions; rank 0 writes
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))


def test_trainer_with_deepspeed_zero3_trains_as_one_process(folder, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed, or the dev extras)")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.multiprocessing.spawn(_zero3_trainer_worker, args=(str(folder), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]

    model, before, want_logs = trained_reference(folder, tmp_path)
    for got in ranks:
        # ZeRO-3 is active: every parameter partitioned, half of it here; the 3 MoE blocks are leaf modules.
        assert got["partitioned"] == 1 and got["held"] < 0.6 and got["leaf_modules"] == 3
        # The bias moved once per step (ZeRO steps flat partitions: the callback bound the update explicitly).
        assert_bias_as_reference(got, model, before)
        for entry, want in zip(got["logs"], want_logs, strict=True):
            for key in ("loss", "main_loss", "mtp_loss_1", "balance_loss"):
                assert entry[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (key, entry[key], want[key])
    saved = MoeMtpForCausalLM.from_pretrained(tmp_path / "saved")
    for name, param in model.named_parameters():
        torch.testing.assert_close(saved.get_parameter(name), param.detach(), atol=1e-5, rtol=1e-4, msg=name)
