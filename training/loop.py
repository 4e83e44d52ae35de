"""`train(args)`: the training loop of `python -m moe_mtp.train`, with DeepSeek-V3's recipe.

AdamW with warmup and cosine decay, gradient accumulation, bf16 autocast on GPUs that support it, gradient clipping
and optional activation checkpointing; the loss is the main cross-entropy plus the scheduled MTP loss and the
sequence-wise balance loss, and the balancing bias moves after every optimizer step (modeling/balancing.py). One
process, DDP or FSDP through accelerate, DeepSpeed ZeRO-3 through `accelerate launch`, or transformers' TP/EP/FSDP2
(--tp/--ep/--fsdp-size, under torchrun). The parts live beside this module: data (dataloader.py), model and optimizer
(model.py), checkpoints (checkpoint.py), metrics and plots (metrics.py, plots.py), the process layout (layout.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import data as token_data
from ..modeling.balancing import balancing_state, named_routers, take_balance_metrics
from .checkpoint import (
    SHARDED_STATE,
    check_resume_layout,
    load_model_states,
    load_sharded_state,
    model_card_facts,
    prepare_output_dir,
    save_checkpoint,
    save_final_model,
    save_model_states,
)
from .dataloader import batch_source, prepare_data
from .distributed import (
    bind_deepspeed,
    clip_grad_norm_,
    deferred_fsdp_sync,
    prepare_deepspeed_model,
    uses_deepspeed,
)
from .layout import check_layout, parallel_layout, sharding_record
from .metrics import append_records, new_history, read_history, write_csv, write_history, write_json
from .model import build_model, build_optimizer, build_scheduler, build_sharded_model
from .plots import save_plots
from .recorder import LossRecorder
from .schedules import apply_schedules


def train(args) -> dict:
    """Trains as `args` (from `moe_mtp.train.parse_args`) say, writes the output folder, and returns the summary."""
    run = TrainingRun(args)
    run.resume()
    run.loop()
    return run.finish()


class TrainingRun:
    """One run of the loop, set up in the order its results depend on (seed, data, model, optimizer)."""

    def __init__(self, args):
        self.args = args
        self.accelerator = _accelerator(args)
        self._place()
        self.data = prepare_data(args, self.accelerator, self.output_dir, self.resume_from, self.layout.dp_world)
        self.num_train_blocks, self.draw = batch_source(args, self.data, self.layout.dp_world)
        self.blocks_per_step = args.batch_size * args.grad_accum * self.layout.dp_world
        self.tokens_per_step = self.blocks_per_step * args.seq_len
        self._build()
        self.recorder = LossRecorder(self.core)
        self.history = new_history([name for name, _ in named_routers(self.core.model)])
        self.start_step = 0

    def _place(self) -> None:
        """How the processes share the work, and where the run writes (and resumes from)."""
        from accelerate.utils import DistributedType, set_seed

        args, accelerator = self.args, self.accelerator
        # --tp/--ep/--fsdp-size: transformers shards the model (DistributedConfig); accelerate only runs the processes.
        self.layout = parallel_layout(args, accelerator.num_processes, accelerator.process_index)
        self.sharded = self.layout.config is not None
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed and self.sharded:
            raise SystemExit("--tp/--ep/--fsdp-size shard the model through transformers; launch them with torchrun, "
                             "not with a DeepSpeed config")  # fmt: skip
        self.resume_from = prepare_output_dir(args, accelerator)
        self.saved = None
        if self.resume_from is not None:
            self.saved = json.loads((self.resume_from / "trainer_state.json").read_text())
            check_resume_layout(self.resume_from, self.saved, self.layout)
        self.output_dir = Path(args.output_dir)
        set_seed(args.seed)

    def _build(self) -> None:
        """Builds the model, optimizer and schedule; accelerate (or DeepSpeed) wraps them unless transformers shards."""
        from accelerate.utils import DistributedType

        args, accelerator, tokenizer = self.args, self.accelerator, self.data.tokenizer
        if self.sharded:
            model = build_sharded_model(args, tokenizer, self.layout.config)
            check_layout(model, self.layout, accelerator.process_index)
        else:
            model = build_model(args, tokenizer)
        model.config.seq_aux_loss_alpha = args.seq_aux_loss_alpha
        if args.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        optimizer, self.fused = build_optimizer(args, model, accelerator.device, self.sharded)
        self.scheduler = build_scheduler(args, optimizer)
        if self.deepspeed:
            _configure_deepspeed(args, accelerator, model)
        if self.sharded:
            # Not prepared: accelerate would wrap the DTensor model in DDP. The optimizer steps the sharded parameters
            # itself, and its step hook moves the balancing bias (loads summed over ranks / tp_size,
            # modeling/balancing.py).
            core = model
        else:
            model, optimizer = accelerator.prepare(model, optimizer)
            if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):  # their own paths
                accelerator.register_save_state_pre_hook(save_model_states)
                accelerator.register_load_state_pre_hook(load_model_states)
            core = accelerator.unwrap_model(model)
        self.engine = None
        if self.deepspeed:
            # ZeRO steps our optimizer over flat partitions, where the automatic bias hook cannot find the model.
            bind_deepspeed(optimizer, core)
            self.engine = accelerator.deepspeed_engine_wrapped.engine
        self.model, self.optimizer, self.core = model, optimizer, core

    def resume(self) -> None:
        """Loads the checkpoint to resume from (if any), and (re)starts OUTPUT/metrics.jsonl where it was taken."""
        args, accelerator, resume_from, saved = self.args, self.accelerator, self.resume_from, self.saved
        if resume_from is not None:
            accelerator.load_state(str(resume_from))  # sharded: only the RNG states, the rest is not accelerate's
            if self.sharded:
                load_sharded_state(self.model, self.optimizer, resume_from / SHARDED_STATE)
            for group in self.optimizer.param_groups:  # a checkpoint's saved groups carry their own `fused` flag
                group["fused"] = self.fused and args.optimizer == "adamw"
            _check_same_data(resume_from, saved, self.blocks_per_step, self.num_train_blocks, self.data.key)
            self.scheduler.load_state_dict(saved["scheduler"])
            self.start_step = saved["step"]
            self.history = read_history(resume_from, self.history["layers"])
            if args.streaming and self.start_step and accelerator.is_main_process:
                print(f"--streaming: replaying the stream's first {self.start_step * self.blocks_per_step} blocks to "
                      f"resume at step {self.start_step}", flush=True)  # fmt: skip
        if accelerator.is_main_process:
            write_history(self.output_dir, self.history)  # the log (re)starts where the checkpoint was taken, or empty
        self.history["written"] = len(self.history["records"])  # records already in OUTPUT/metrics.jsonl

    def loop(self) -> None:
        args, accelerator = self.args, self.accelerator
        progress = tqdm(
            total=args.max_steps, initial=self.start_step, unit="step", dynamic_ncols=True,
            disable=args.no_progress or not accelerator.is_main_process, desc="train",
        )  # fmt: skip
        self.window_start, self.window_steps = time.perf_counter(), 0
        step_loss = torch.zeros((), device=accelerator.device)
        for step in range(self.start_step, args.max_steps):
            schedules = {"mtp_loss_weight": args.mtp_schedule, "bias_update_speed": args.bias_schedule}
            apply_schedules(self.core.config, schedules, step, args.max_steps)
            grad_norm = self.step(step, step_loss)
            done = step + 1
            self.window_steps += 1
            progress.update(1)
            if done % args.log_every == 0 or done == args.max_steps:
                self.log(done, step_loss, grad_norm, progress)
            if (args.eval_every and done % args.eval_every == 0) or done == args.max_steps:
                layout = self.layout if self.sharded else None
                self.history["records"].append(
                    {"step": done, **evaluate(self.model, self.data.eval_blocks, args, accelerator, layout)}
                )
            if accelerator.is_main_process and self.history["records"] and self.history["records"][-1]["step"] == done:
                append_records(self.output_dir, self.history)  # only when this step logged something
            if (args.save_every and done % args.save_every == 0) or done == args.max_steps:
                self.save(done)
        progress.close()
        self.recorder.remove()

    def step(self, step: int, step_loss: torch.Tensor):
        """One optimizer step over --grad-accum micro-batches; `step_loss` gets their mean loss. Returns the gradient
        norm before clipping (None without clipping)."""
        args, accelerator, model = self.args, self.accelerator, self.model
        step_loss.zero_()
        for micro in range(args.grad_accum):
            batch = self.draw(step, micro, self.layout.dp_rank).to(accelerator.device)
            # Gradients are all-reduced (FSDP: reduce-scattered) on the last micro-batch only.
            sync = micro == args.grad_accum - 1
            if sync:
                defer = contextlib.nullcontext()
            else:
                defer = deferred_fsdp_sync(model) if self.sharded else accelerator.no_sync(model)
            if self.deepspeed:  # the engine accumulates (dividing by --grad-accum itself), clips and steps on the last
                loss = model(input_ids=batch, labels=batch).loss
                self.engine.set_gradient_accumulation_boundary(sync)
                self.engine.backward(loss)
                if sync:
                    self.engine.step()  # the balancing bias moves here (bind_deepspeed above)
                step_loss += loss.detach() / args.grad_accum
                continue
            with defer:
                if self.sharded:
                    with accelerator.autocast():
                        loss = model(input_ids=batch, labels=batch).loss / args.grad_accum
                    loss.backward()
                else:
                    loss = model(input_ids=batch, labels=batch).loss / args.grad_accum
                    accelerator.backward(loss)
            step_loss += loss.detach()
        grad_norm = self._clip()
        self.optimizer.step()  # the balancing bias moves here, through the optimizer-step hook (modeling/balancing.py)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _clip(self):
        args = self.args
        if not args.max_grad_norm:
            return None
        if self.deepspeed:
            return self.engine.get_global_grad_norm()  # DeepSpeed clipped in engine.step
        if self.sharded:  # plain tensors and DTensors on several meshes, which torch's clip cannot stack
            return clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        return self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)

    def log(self, done: int, step_loss: torch.Tensor, grad_norm, progress) -> None:
        """A train record: the loss and its parts, balance metrics, schedule values, throughput since the last one."""
        accelerator, core, history = self.accelerator, self.core, self.history
        elapsed = time.perf_counter() - self.window_start
        record = {"step": done, "loss": float(accelerator.reduce(step_loss.clone(), reduction="mean"))}
        record.update(self.recorder.take())
        max_vio, load = take_balance_metrics(core)
        record.update(max_vio)
        record.update(
            lr=self.scheduler.get_last_lr()[0], grad_norm=float(grad_norm) if grad_norm is not None else None,
            mtp_loss_weight=core.config.mtp_loss_weight, bias_update_speed=core.config.bias_update_speed,
            tokens=done * self.tokens_per_step,
            tokens_per_s=self.window_steps * self.tokens_per_step / max(elapsed, 1e-9),
        )  # fmt: skip
        history["records"].append(record)
        if load is not None:
            history["load_steps"].append(done)
            history["loads"].append(load / load.sum(dim=-1, keepdim=True).clamp(min=1) * load.shape[-1])
        progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.window_start, self.window_steps = time.perf_counter(), 0

    def save(self, done: int) -> None:
        state = {
            "step": done, "scheduler": self.scheduler.state_dict(), "blocks_per_step": self.blocks_per_step,
            "num_train_blocks": self.num_train_blocks, "world_size": self.accelerator.num_processes,
            "data_key": self.data.key, "parallel": self.layout.sizes,
        }  # fmt: skip
        save_checkpoint(self.accelerator, self.output_dir, done, state, self.history, self.args.keep_checkpoints,
                        sharded=(self.model, self.optimizer) if self.sharded else None)  # fmt: skip

    def finish(self) -> dict:
        """Writes the summary, metrics, plots and the final model; returns the summary."""
        args, accelerator, output_dir = self.args, self.accelerator, self.output_dir
        summary = self.summary()
        if accelerator.is_main_process:
            write_history(output_dir, self.history)
            write_json(output_dir / "summary.json", summary)
            write_csv(output_dir / "metrics.csv", self.history["records"])
            if not args.no_plots:
                save_plots(output_dir, self.history)
        card_facts = model_card_facts(args, summary, self.history)
        save_final_model(accelerator, self.model, self.data.tokenizer, output_dir, card_facts, self.sharded)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary

    def summary(self) -> dict:
        """What the run did, gathered from every process (collective)."""
        from accelerate.utils import DistributedType, gather_object

        args, accelerator, core, data, layout = self.args, self.accelerator, self.core, self.data, self.layout
        # FSDP shards the weights, so only replicated (DDP or single-process) weights can be compared; a sharded run
        # compares what every rank holds whole (the balancing biases among it).
        accelerate_fsdp = accelerator.distributed_type == DistributedType.FSDP
        fingerprints = gather_object(
            [None if accelerate_fsdp else state_fingerprint(core, replicated_only=self.sharded)]
        )
        sharding = gather_object([sharding_record(core)]) if self.sharded or self.deepspeed else None
        # What each process did with the data: whether it tokenized the corpus, and how much of the store it maps.
        processes = gather_object([{
            "built_store": data.info.get("built_store"),
            "mapped_bytes": data.store.mapped_bytes() if data.store is not None else None,
        }])  # fmt: skip
        return {
            "steps": args.max_steps,
            "world_size": accelerator.num_processes,
            "data_parallel_size": layout.dp_world,
            "parallel": layout.sizes,
            "sharding": sharding,
            "bias_updates": balancing_state(core.model).updates,
            "tokens": args.max_steps * self.tokens_per_step,
            "train_blocks": self.num_train_blocks,
            "eval": next((r for r in reversed(self.history["records"]) if "eval_loss" in r), None),
            "replicas_identical": None if accelerate_fsdp else len(set(fingerprints)) == 1,
            "fingerprint": fingerprints[0],
            "data": {**data.info, "built_store": [p["built_store"] for p in processes],
                     "mapped_bytes": [p["mapped_bytes"] for p in processes]},
        }  # fmt: skip


def _accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # cpu=True where there is no GPU: accelerate only takes a multi-process CPU launch (gloo) as distributed then.
    # find_unused_parameters: an expert that no token of a micro-batch picked gets no gradient on that rank.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    cpu = args.cpu or not torch.cuda.is_available()
    if uses_deepspeed() and not torch.cuda.is_available():
        # DeepSpeed on CPU processes (gloo): accelerate turns DeepSpeed off for cpu=True, and without a backend named
        # it would start DeepSpeed's process group yet count a single process.
        cpu, handlers = False, [*handlers, InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(mixed_precision=mixed_precision(args.mixed_precision), cpu=cpu, kwargs_handlers=handlers)


def _configure_deepspeed(args, accelerator, model) -> None:
    """The MoE blocks as ZeRO-3 leaf modules, and the batch shape DeepSpeed wants in its config (this loop has no
    dataloader for accelerate to read it from). DeepSpeed clips and accumulates: --max-grad-norm and --grad-accum go
    to its config."""
    prepare_deepspeed_model(model)
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config.update(
        train_micro_batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        train_batch_size=args.batch_size * args.grad_accum * accelerator.num_processes,
        gradient_clipping=args.max_grad_norm,
    )  # fmt: skip


def _check_same_data(resume_from: Path, saved: dict, blocks_per_step: int, num_train_blocks, key: str) -> None:
    """A checkpoint resumes only on the same data, read in the same blocks per step."""
    if saved["blocks_per_step"] != blocks_per_step or saved["num_train_blocks"] != num_train_blocks:
        raise SystemExit(
            f"--resume {resume_from}: that run used {saved['blocks_per_step']} blocks per step over "
            f"{saved['num_train_blocks']} blocks; this one has {blocks_per_step} over {num_train_blocks}. "
            "Keep --batch-size x --grad-accum x processes, --seq-len, --data and --streaming the same to resume."
        )
    if saved.get("data_key", key) != key:  # checkpoints from before the token store have no key
        raise SystemExit(
            f"--resume {resume_from}: that run trained on other data (the corpus files, the tokenizer or "
            "--eval-fraction changed); resume with the same ones, or start a new run in another --output-dir"
        )


def evaluate(model, blocks: token_data.Blocks, args, accelerator, layout=None) -> dict[str, float]:
    """Perplexity of the main head over the held-out blocks (split over processes), and each MTP depth's loss.

    `layout` (a sharded run): the blocks are split over the data-parallel ranks, the ranks of a tensor-parallel group
    reading the same ones, and every rank gets as many (the sharded forward is collective: a rank with one batch
    more would wait forever), so up to dp_world - 1 blocks are left out. The sums over all ranks count each block
    tp_size times, in the loss and the block count alike."""
    model.eval()
    rank, world = (
        (layout.dp_rank, layout.dp_world) if layout else (accelerator.process_index, accelerator.num_processes)
    )
    mine = list(range(rank, len(blocks), world))
    if layout is not None:
        mine = mine[: len(blocks) // world]
    if args.eval_batches:
        mine = mine[: args.eval_batches * args.batch_size]
    depth = accelerator.unwrap_model(model).config.num_nextn_predict_layers
    totals = torch.zeros(2 + depth, dtype=torch.float64, device=accelerator.device)  # sums of loss * batches, batches
    with torch.no_grad(), accelerator.autocast() if layout else contextlib.nullcontext():
        for start in range(0, len(mine), args.batch_size):
            batch = blocks[mine[start : start + args.batch_size]].to(accelerator.device)
            output = model(input_ids=batch, labels=batch, output_mtp_logits=depth > 0)
            totals[0] += output.main_loss.double() * len(batch)
            totals[1] += len(batch)
            for k, depth_loss in enumerate(output.mtp_losses or ()):
                totals[2 + k] += depth_loss.double() * len(batch)
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    count = max(float(totals[1]), 1.0)
    result = {"eval_loss": float(totals[0]) / count, "eval_ppl": math.exp(min(float(totals[0]) / count, 50.0))}
    result.update({f"eval_mtp_loss_{k + 1}": float(totals[2 + k]) / count for k in range(depth)})
    return result


def state_fingerprint(model, replicated_only: bool = False) -> str:
    """A hash of every parameter and buffer, to check that data-parallel replicas agree. `replicated_only` (a
    sharded model): of what every rank holds whole, the balancing biases among it, skipping the DTensor shards."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if replicated_only and hasattr(tensor, "to_local"):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
