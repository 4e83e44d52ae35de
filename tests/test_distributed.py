"""Tensor, expert and FSDP2 parallelism through transformers' `DistributedConfig`, on 2 gloo CPU processes, each
compared with one process running the same global batch (the config's parallel plans; docs/distributed.md).

Every worker asserts that its engine is really active (DTensor parameters, half the experts per rank), so a silent
fallback to a replicated model fails."""

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


def init(rank: int, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)


def full(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def moe_experts(model) -> list[MoeMtpExperts]:
    return [m for m in model.modules() if isinstance(m, MoeMtpExperts)]


# ------------------------------------------------------------------------------------------------ tensor + expert


def _tp_ep_worker(rank, folder, out):
    from transformers.distributed import DistributedConfig

    init(rank, out)
    try:
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
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        model.train()
        result = model(ids, labels=ids)
        result.loss.backward()
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
                "loss": result.loss.detach(),
                "grads": grads,
                "plain": plain,
                "drafted": drafted,
                "biases": biases,
                "load": load,
                "stepped": stepped,
            },  # fmt: skip
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_tensor_and_expert_parallel_match_one_process(folder, tmp_path):
    ranks = spawn(_tp_ep_worker, folder, tmp_path)
    model = reference(folder)
    ids = batch()
    model.eval()
    with torch.no_grad():
        want_logits = model(ids).logits
    model.train()
    want = model(ids, labels=ids)
    want.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model(ids[:1, :2], labels=ids[:1, :2]).loss.backward()
    before = {name: b.clone() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")}
    torch.optim.SGD(model.parameters(), lr=LR).step()
    model.eval()
    prompt = ids[:2, :5]
    want_tokens = model.generate(prompt, max_new_tokens=6, do_sample=False)
    for got in ranks:
        torch.testing.assert_close(got["logits"], want_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["loss"], want.loss.detach(), atol=1e-5, rtol=0)
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


def _fsdp_worker(rank, folder, out):
    from torch.distributed.tensor import DTensor
    from transformers.distributed import DistributedConfig

    init(rank, out)
    try:
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
    finally:
        dist.destroy_process_group()


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

    saved = MoeMtpForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=0)
