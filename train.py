"""`python -m moe_mtp.train`: pretrain a moe_mtp model from scratch, or fine-tune one, with DeepSeek-V3's recipe.

    python -m moe_mtp.train --smoke                               # seconds: tiny model on the stdlib's English text
    python -m moe_mtp.train --data corpus.txt --output-dir outputs/run1
    accelerate launch --config_file examples/accelerate/ddp.yaml -m moe_mtp.train --data corpus.jsonl
    torchrun --nproc_per_node 2 -m moe_mtp.train --smoke           # DDP (gloo on CPU)
    torchrun --nproc_per_node 2 -m moe_mtp.train --smoke --tp-size 2 --ep-size 2   # transformers' TP + EP
    torchrun --nproc_per_node 2 -m moe_mtp.train --smoke --fsdp-size 2             # transformers' FSDP2
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml -m moe_mtp.train --data corpus.jsonl

Without `--data` the corpus is the English text of the stdlib's `pydoc_data/topics.py`. The corpus is tokenized once
into a memory-mapped token store in a cache folder, reused by later runs and every process (a byte-level BPE is
trained on a sample of it when no tokenizer is given; see data.py), and training reads fixed-length blocks from it;
`--streaming` tokenizes as it trains instead. The loop is AdamW with
warmup and cosine decay, gradient accumulation, bf16 autocast on GPUs that support it, gradient clipping and optional
activation checkpointing; the loss is the main cross-entropy plus the scheduled MTP loss and the sequence-wise
balance loss, and the balancing bias moves after every optimizer step (modeling/balancing.py). Every `--save-every` steps an
atomic checkpoint (model, optimizer, scheduler, RNG and data position) lands in `OUTPUT/checkpoints/step-N`;
`--resume` continues from the latest one exactly. The output folder gets the trained model and tokenizer
(`OUTPUT/model`, a `from_pretrained` folder), `metrics.jsonl`/`metrics.csv`, `summary.json` and PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from . import data as token_data
from . import mtp_align
from .configuration import MoeMtpConfig
from .data import Corpus
from .hub import TRAINING_SUMMARY
from .modeling import MoeMtpForCausalLM
from .modeling.balancing import balancing_state, named_routers, take_balance_metrics
from .training import (
    LossRecorder,
    StepSchedule,
    apply_schedules,
    bind_deepspeed,
    clip_grad_norm_,
    prepare_deepspeed_model,
    split_groups_by_mesh,
    uses_deepspeed,
)

CHECKPOINTS = "checkpoints"
PLOTS = ("loss.png", "expert_load.png")
# A run shrunk to seconds, for tests and `make quickstart`; explicit flags still win.
SMOKE = dict(
    max_documents=300, vocab_size=512, seq_len=32, hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
    num_layers=2, num_heads=2, n_routed_experts=8, top_k=2, n_group=2, topk_group=1, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, batch_size=4, max_steps=12, warmup_steps=2,
    log_every=1, eval_every=6, save_every=6, eval_batches=2, lr=3e-3,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_mtp.train", description=__doc__.split("\n\n")[0])
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default="outputs/train", help="Folder for checkpoints, model, metrics and plots.")
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="Continue from the latest checkpoint in OUTPUT/checkpoints, or from the folder given.",
    )
    run.add_argument("--overwrite", action="store_true", help="Start over in an output folder that already has a run.")
    run.add_argument("--smoke", action="store_true", help="A tiny run that finishes in seconds.")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--cpu", action="store_true", help="Train on the CPU even when a GPU is present.")
    run.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    run.add_argument("--no-progress", action="store_true", help="No tqdm bar.")
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="Local .txt/.jsonl/.json/.parquet files, or a dataset name on the Hub (when online). "
        "Default: the English text of the stdlib's pydoc_data/topics.py.",
    )
    data.add_argument("--data-config", default=None, help="Configuration name of a Hub dataset.")
    data.add_argument("--text-column", default="text")
    data.add_argument("--max-documents", type=int, default=None, help="Use only the first N documents.")
    data.add_argument("--seq-len", type=int, default=256, help="Tokens per packed training block.")
    data.add_argument(
        "--eval-fraction",
        type=float,
        default=0.05,
        help="Share of the documents held out for eval (chosen by a hash of each document's text).",
    )
    data.add_argument("--tokenizer", default=None, help="Tokenizer to use (default: the model's, or a new BPE).")
    data.add_argument("--vocab-size", type=int, default=4096, help="Vocabulary of the BPE trained from scratch.")
    data.add_argument(
        "--tokenizer-sample-bytes",
        type=int,
        default=100_000_000,
        help="The BPE is trained on the first this many bytes of the training documents.",
    )
    data.add_argument(
        "--cache-dir",
        default=None,
        help="Where trained tokenizers and token stores are kept and reused "
        "(default: $MOE_MTP_CACHE, else ~/.cache/moe_mtp).",
    )
    data.add_argument(
        "--streaming",
        action="store_true",
        help="Tokenize while training, from a datasets stream, without a token store (no full pass first).",
    )
    data.add_argument(
        "--shuffle-buffer",
        type=int,
        default=10_000,
        help="--streaming: documents in the seeded shuffle buffer (0: corpus order).",
    )
    model = p.add_argument_group("model (from scratch unless --model is given)")
    model.add_argument("--model", default=None, help="Fine-tune this moe_mtp (or released DeepSeek) folder.")
    for flag, default in [
        ("hidden-size", 256), ("intermediate-size", 512), ("moe-intermediate-size", 128), ("num-layers", 4),
        ("num-heads", 4), ("first-k-dense", 1), ("n-routed-experts", 16), ("n-shared-experts", 1), ("top-k", 2),
        ("n-group", 4), ("topk-group", 2), ("q-lora-rank", 128), ("kv-lora-rank", 64), ("qk-nope-head-dim", 32),
        ("qk-rope-head-dim", 16), ("v-head-dim", 32), ("mtp-depth", 1),
    ]:  # fmt: skip
        model.add_argument(f"--{flag}", type=int, default=default)
    recipe = p.add_argument_group("recipe (schedules are VALUE[@FRACTION],...; see training.StepSchedule)")
    recipe.add_argument("--mtp-loss-weight", default="0.3,0.1@0.7", help="MTP loss weight schedule (DeepSeek-V3).")
    recipe.add_argument("--bias-update-speed", default="1e-3,0@0.97", help="Balancing speed gamma schedule.")
    recipe.add_argument("--seq-aux-loss-alpha", type=float, default=1e-4, help="Sequence-wise balance loss weight.")
    optim = p.add_argument_group("optimization")
    optim.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="AdamW (the recipe), or plain SGD (no momentum), which shows a sum-vs-mean gradient mistake that "
        "AdamW's normalization hides: what the parity tests against one process use.",
    )
    optim.add_argument("--max-steps", type=int, default=300, help="Optimizer steps.")
    optim.add_argument("--batch-size", type=int, default=8, help="Blocks per micro-batch per process.")
    optim.add_argument("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
    optim.add_argument("--lr", type=float, default=1e-3)
    optim.add_argument("--min-lr-ratio", type=float, default=0.1, help="Cosine decay ends at lr * this.")
    optim.add_argument("--warmup-steps", type=int, default=20)
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--adam-beta1", type=float, default=0.9)
    optim.add_argument("--adam-beta2", type=float, default=0.95)
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="Gradient clipping; 0 turns it off.")
    optim.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 on GPUs that support it, else fp32.",
    )
    optim.add_argument("--activation-checkpointing", action="store_true")
    parallel = p.add_argument_group(
        "sharded engines (under torchrun; the model is loaded through transformers' DistributedConfig, "
        "docs/distributed.md)"
    )
    parallel.add_argument(
        "--tp-size", type=int, default=1, help="Tensor-parallel ranks (attention heads, dense and shared MLPs)."
    )
    parallel.add_argument(
        "--ep-size",
        type=int,
        default=1,
        help="Expert-parallel ranks: each holds n_routed_experts / ep_size whole experts. A multiple of --tp-size "
        "that divides --tp-size x --fsdp-size.",
    )
    parallel.add_argument(
        "--fsdp-size",
        type=int,
        default=1,
        help="FSDP2 ranks (data parallel, parameters, gradients and optimizer states sharded). "
        "--tp-size x --fsdp-size must equal the number of processes.",
    )
    loop = p.add_argument_group("logging, eval, checkpoints")
    loop.add_argument("--log-every", type=int, default=10)
    loop.add_argument("--eval-every", type=int, default=100, help="Eval perplexity every N steps (and at the end).")
    loop.add_argument("--eval-batches", type=int, default=20, help="Eval micro-batches per process; 0: all blocks.")
    loop.add_argument("--save-every", type=int, default=100, help="Checkpoint every N steps; 0: only at the end.")
    loop.add_argument("--keep-checkpoints", type=int, default=2, help="Complete checkpoints kept.")
    mtp_align.add_arguments(p)
    return p


PARALLEL_FLAGS = ("tp_size", "ep_size", "fsdp_size")


def sharded_requested(args) -> bool:
    """Whether the run loads the model through transformers' `DistributedConfig` (any of the sizes above 1)."""
    return any(getattr(args, name, 1) > 1 for name in PARALLEL_FLAGS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if "--smoke" in argv:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "tokenizer_sample_bytes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in PARALLEL_FLAGS:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if sharded_requested(args):
        flags = " ".join(f"--{n.replace('_', '-')} {getattr(args, n)}" for n in PARALLEL_FLAGS if getattr(args, n) > 1)
        if args.mtp_only or args.add_mtp is not None:
            parser.error(f"{flags}: --mtp-only/--add-mtp run in one process or under DDP only")
        if args.mixed_precision == "fp16":
            parser.error(f"{flags}: --mixed-precision fp16 needs a gradient scaler, which the sharded engines lack here; "
                         "use bf16 or no")  # fmt: skip
    if args.streaming and not args.eval_batches:
        parser.error("--eval-batches 0 (every held-out block) needs the token store; give a number with --streaming")
    if not 0 < args.eval_fraction < 1:
        parser.error(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
    try:
        args.mtp_schedule = StepSchedule.parse(args.mtp_loss_weight, "--mtp-loss-weight")
        args.bias_schedule = StepSchedule.parse(args.bias_update_speed, "--bias-update-speed")
    except ValueError as error:
        parser.error(str(error))
    return args


# ------------------------------------------------------------------------------------------------------------- data


class BlockSampler:
    """Which blocks each process trains on at each optimizer step; a pure function of the step, so the data position
    in a checkpoint is the step itself. Each epoch is a seeded permutation. Process r of W takes the r-th slice of
    every micro-batch, so W processes see exactly the blocks one process would with a W-times larger batch."""

    def __init__(self, num_blocks: int, batch_size: int, grad_accum: int, world_size: int, seed: int):
        self.num_blocks, self.batch_size, self.grad_accum = num_blocks, batch_size, grad_accum
        self.world_size, self.seed = world_size, seed
        self._epoch, self._order = -1, None

    @property
    def blocks_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _position(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_blocks)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_blocks, generator=generator)
        return int(self._order[offset])

    def micro_batch(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.blocks_per_step + (micro * self.world_size + rank) * self.batch_size
        return [self._position(start + i) for i in range(self.batch_size)]


def cache_dir(args) -> Path:
    return Path(args.cache_dir) if args.cache_dir else token_data.default_cache_dir()


def load_tokenizer(args, accelerator, corpus: Corpus, output_dir: Path, resume_from: Path | None):
    """Given, the fine-tuned model's, the resumed run's, or a BPE trained once per corpus into the cache (by one
    process per machine) and copied into OUTPUT/tokenizer."""
    from transformers import AutoTokenizer

    if args.tokenizer or args.model:
        return AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    run_copy = output_dir / "tokenizer"
    if not (resume_from and run_copy.is_dir()):
        start = time.perf_counter()
        cached, trained = token_data.cached_tokenizer(
            corpus, args.vocab_size, args.tokenizer_sample_bytes, args.eval_fraction, cache_dir(args),
            builder=accelerator.is_local_main_process, streaming=args.streaming,
        )  # fmt: skip
        if accelerator.is_main_process:
            done = f"trained in {time.perf_counter() - start:.1f}s into" if trained else "reused from"
            print(f"tokenizer: {done} {cached}", flush=True)
            partial = run_copy.with_name(run_copy.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(cached, partial)
            shutil.rmtree(run_copy, ignore_errors=True)
            os.replace(partial, run_copy)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(run_copy)


def prepare_data(
    args, accelerator, output_dir: Path, resume_from: Path | None, dp_world: int | None = None
) -> SimpleNamespace:
    """The tokenizer, the training blocks (a memory-mapped store, or a stream), the held-out blocks, the data key
    kept in checkpoints, and facts for the summary. `dp_world`: the data-parallel replicas that split each batch
    (the processes, unless tensor-parallel groups share batches)."""
    dp_world = accelerator.num_processes if dp_world is None else dp_world
    start = time.perf_counter()
    corpus = Corpus.from_args(args)
    tokenizer = load_tokenizer(args, accelerator, corpus, output_dir, resume_from)
    key = token_data.data_key(corpus, tokenizer, args.eval_fraction, args.streaming)
    store, info = None, {"mode": "streaming" if args.streaming else "store"}
    if args.streaming:
        train_blocks = token_data.StreamedBlocks(
            corpus, tokenizer, args.seq_len, args.eval_fraction, args.batch_size, args.grad_accum,
            dp_world, args.seed, args.shuffle_buffer,
        )  # fmt: skip
        wanted = args.eval_batches * args.batch_size * dp_world
        eval_blocks = token_data.streamed_eval_blocks(corpus, tokenizer, args.seq_len, args.eval_fraction, wanted)
        eval_tokens = len(eval_blocks) * args.seq_len
    else:
        store, built = token_data.prepare_store(
            corpus, tokenizer, args.eval_fraction, cache_dir(args), builder=accelerator.is_local_main_process,
            progress=not args.no_progress,
        )  # fmt: skip
        train_blocks, eval_blocks = store.blocks("train", args.seq_len), store.blocks("eval", args.seq_len)
        index, eval_tokens = store.index, store.index["eval_tokens"]
        if not len(train_blocks):
            raise SystemExit(
                f"the training documents make {index['train_tokens']} tokens, fewer than one block of --seq-len "
                f"{args.seq_len}; give more data or a shorter --seq-len"
            )
        info.update(store=str(store.folder), store_bytes=store.nbytes, built_store=built)
        info.update({name: index[name] for name in ("documents", "eval_documents", "train_tokens", "eval_tokens")})
        if accelerator.is_main_process:
            done = f"built in {index['build_seconds']:.1f}s:" if built else "reused:"
            print(f"token store {done} {store.folder} ({index['documents']} documents, {index['train_tokens']} "
                  f"training tokens, {index['eval_tokens']} held out)", flush=True)  # fmt: skip
    if not len(eval_blocks):
        raise SystemExit(
            f"the held-out documents make {eval_tokens} tokens, fewer than one block of --seq-len {args.seq_len}: "
            "raise --eval-fraction, give more documents (a .txt file's documents are its paragraphs, between blank "
            "lines) or a shorter --seq-len"
        )
    info.update(train_blocks=len(train_blocks) if store is not None else None, eval_blocks=len(eval_blocks))
    info["prep_seconds"] = round(time.perf_counter() - start, 3)
    return SimpleNamespace(tokenizer=tokenizer, train=train_blocks, eval_blocks=eval_blocks, key=key, info=info,
                           store=store)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ model


def build_model(args, tokenizer) -> MoeMtpForCausalLM:
    if args.model:
        return MoeMtpForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = MoeMtpConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        first_k_dense_replace=args.first_k_dense,
        n_routed_experts=args.n_routed_experts,
        n_shared_experts=args.n_shared_experts,
        num_experts_per_tok=args.top_k,
        n_group=args.n_group,
        topk_group=args.topk_group,
        q_lora_rank=args.q_lora_rank or None,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        num_nextn_predict_layers=args.mtp_depth,
        max_position_embeddings=args.seq_len,
        seq_aux_loss_alpha=args.seq_aux_loss_alpha,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
    )
    return MoeMtpForCausalLM(config)


# ------------------------------------------------------------------------------------------------- sharded engines

SHARDED_STATE = "sharded_state"  # a checkpoint's model and optimizer under --tp/--ep/--fsdp-size (DCP files)


def model_shape(args) -> tuple[int, int] | None:
    """(routed experts, attention heads) of the model this run trains, for checking the parallel sizes; None when
    --model is not a local folder (transformers' own checks then apply)."""
    if not args.model:
        return args.n_routed_experts, args.num_heads
    if not Path(args.model).is_dir():
        return None
    from .conversion import read_config_dict

    saved = read_config_dict(args.model, mtp_from_weights=False)
    return saved["n_routed_experts"], saved["num_attention_heads"]


def parallel_layout(args, world_size: int, rank: int) -> SimpleNamespace:
    """How the processes share the work. `config` is the `DistributedConfig` the model is loaded with (None: one
    process, or DDP through accelerate); `dp_rank` of `dp_world` says which slice of every global batch this process
    reads. The ranks of one tensor-parallel group (expert parallelism inside it included) hold one model replica
    between them and read the same batch; the FSDP ranks read their own. transformers lays the ranks out as
    (fsdp, tp), tensor-parallel ranks adjacent, so the data-parallel rank is rank // tp_size (checked against the
    model's device mesh once it is loaded, see `check_layout`)."""
    if not sharded_requested(args):
        return SimpleNamespace(config=None, dp_rank=rank, dp_world=world_size, sizes=None)
    tp, ep, fsdp = args.tp_size, args.ep_size, args.fsdp_size
    if ep > 1 and ep % tp:
        raise SystemExit(f"--ep-size {ep} must be a multiple of --tp-size {tp} (the ranks of a tensor-parallel group "
                         "share one batch, whose tokens their experts split)")  # fmt: skip
    if ep > 1 and (tp * fsdp) % ep:
        raise SystemExit(f"--ep-size {ep} must divide --tp-size x --fsdp-size = {tp * fsdp}: expert parallelism "
                         "splits the experts over those ranks (e.g. --tp-size 2 --ep-size 2, or --fsdp-size 2 "
                         "--ep-size 2 on 2 processes)")  # fmt: skip
    if tp * fsdp != world_size:
        raise SystemExit(
            f"--tp-size {tp} x --fsdp-size {fsdp} = {tp * fsdp} processes, but {world_size} were launched: start "
            f"{tp * fsdp} (torchrun --nproc_per_node {tp * fsdp}), or choose sizes whose product is {world_size}"
        )
    shape = model_shape(args)
    if shape is not None:
        experts, heads = shape
        if ep > 1 and experts % ep:
            where = args.model or "--n-routed-experts"
            raise SystemExit(f"--ep-size {ep} must divide the model's {experts} routed experts ({where}): every "
                             "expert-parallel rank holds the same number of whole experts")  # fmt: skip
        if tp > 1 and heads % tp:
            where = args.model or "--num-heads"
            raise SystemExit(f"--tp-size {tp} must divide the model's {heads} attention heads ({where}): tensor "
                             "parallelism splits attention by heads")  # fmt: skip
    from transformers.distributed import DistributedConfig

    config = DistributedConfig(tp_size=tp, ep_size=ep, fsdp_size=fsdp)
    sizes = {"tp_size": tp, "ep_size": ep, "fsdp_size": fsdp}
    return SimpleNamespace(config=config, dp_rank=rank // tp, dp_world=world_size // tp, sizes=sizes)


def build_sharded_model(args, tokenizer, distributed_config) -> MoeMtpForCausalLM:
    """The model loaded through `from_pretrained(..., distributed_config=...)`: transformers applies the config's
    TP/EP plans and FSDP2, and each rank keeps its shards. From scratch, every process first builds the whole model
    from the same seed (the weights one process would train), which is then loaded, sharded, from memory."""
    if args.model:
        return MoeMtpForCausalLM.from_pretrained(args.model, dtype=torch.float32, distributed_config=distributed_config)
    whole = build_model(args, tokenizer)
    model = MoeMtpForCausalLM.from_pretrained(
        None, config=whole.config, state_dict=whole.state_dict(), dtype=torch.float32,
        distributed_config=distributed_config,
    )  # fmt: skip
    model.config._name_or_path = model.name_or_path = ""  # loading from a state dict leaves the string 'None'
    # transformers keeps the key mappings a load used, to undo them at save; this load read the in-memory 3-D
    # expert keys and used none, which would save those instead of the per-expert keys on disk. Without a record,
    # the save applies the class's mapping, as it does for the model built in one process.
    model._weight_conversions = None
    return model


def check_layout(model, layout: SimpleNamespace, rank: int) -> None:
    """The data split assumes transformers' rank layout; a silent change would feed the wrong ranks the same data."""
    mesh = model._device_mesh
    if mesh is None:
        raise RuntimeError("the model was loaded without a device mesh: the sharded engines are not active")
    fsdp_rank = mesh.get_local_rank("fsdp") if layout.sizes["fsdp_size"] > 1 else 0
    tp_rank = mesh.get_local_rank("tp") if layout.sizes["tp_size"] > 1 else 0
    if (fsdp_rank, tp_rank) != (layout.dp_rank, rank % layout.sizes["tp_size"]):
        raise RuntimeError(
            f"rank {rank} sits at fsdp {fsdp_rank}, tp {tp_rank} of the model's device mesh, not at "
            f"{layout.dp_rank}, {rank % layout.sizes['tp_size']} as the data split assumes"
        )


def sharding_record(model) -> dict:
    """What this rank holds, for the summary: a silent fallback to a replicated model shows as 0 DTensors and all
    the elements local."""
    from .modeling.modeling_moe_mtp import MoeMtpExperts

    def local(tensor):
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    def held(tensor):  # DeepSpeed ZeRO-3 keeps this rank's partition in ds_tensor, the parameter itself empty
        return tensor.ds_tensor.numel() if hasattr(tensor, "ds_tensor") else local(tensor).numel()

    params = [p for _, p in model.named_parameters()]
    experts = [m for m in model.modules() if isinstance(m, MoeMtpExperts)]
    return {
        "dtensor_parameters": sum(hasattr(p, "to_local") for p in params),
        "zero3_parameters": sum(hasattr(p, "ds_tensor") for p in params),
        "zero3_leaf_modules": sum(bool(getattr(m, "_z3_leaf", False)) for m in model.modules()),
        "parameters": len(params),
        "local_elements": sum(held(p) for p in params),
        "elements": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "experts_held": [e.num_experts for e in experts],  # whole experts this rank runs (expert parallelism)
        "expert_rows": [local(e.gate_up_proj).shape[0] for e in experts],  # stored here (FSDP shards them too)
        "expert_path": sorted({e.last_path for e in experts if e.last_path}),
    }


def save_sharded_state(model, optimizer, folder: Path) -> None:
    """The model and optimizer of a sharded run, with torch.distributed.checkpoint: every rank writes its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded_state(model, optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .modeling.balancing import automatic_bias_update

    # A fresh optimizer has no states to load into: get_state_dict creates them with one step at lr 0, which must
    # not count as a balancing step.
    with automatic_bias_update(False):
        model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contextlib.contextmanager
def deferred_fsdp_sync(model):
    """No gradient reduce-scatter until the last micro-batch (FSDP2's own `no_sync`); nothing to defer otherwise."""
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if set_sync is None:
        yield
        return
    set_sync(False)
    try:
        yield
    finally:
        set_sync(True)


# ------------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint only gets its `step-N` name once fully written."""
    root = output_dir / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    accelerator, output_dir: Path, step: int, state: dict, history: dict, keep: int, sharded=None
) -> Path:
    """Writes into `step-N.partial` then renames it: a killed run leaves either a whole checkpoint or a `.partial`
    folder, which the next run deletes. `sharded`: the (model, optimizer) of a --tp/--ep/--fsdp-size run, which
    accelerate does not hold; they go to `SHARDED_STATE` through torch.distributed.checkpoint."""
    final = output_dir / CHECKPOINTS / f"step-{step:08d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # model, optimizer and every process's RNG states
    if sharded is not None:
        save_sharded_state(*sharded, partial / SHARDED_STATE)
    accelerator.wait_for_everyone()  # all of them written before the rename
    if accelerator.is_main_process:
        write_json(partial / "trainer_state.json", state)
        write_history(partial, history)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_resume_layout(resume_from: Path, saved: dict, layout: SimpleNamespace) -> None:
    """A checkpoint resumes only under the parallel sizes that wrote it: a sharded run's model and optimizer are
    DCP files (`SHARDED_STATE`), a single-process or DDP run's are accelerate's."""
    ones = dict.fromkeys(PARALLEL_FLAGS, 1)
    then, now = saved.get("parallel") or ones, layout.sizes or ones
    if then != now:

        def flags(sizes):
            return " ".join(f"--{name.replace('_', '-')} {sizes[name]}" for name in PARALLEL_FLAGS)

        raise SystemExit(
            f"--resume {resume_from}: that run used {flags(then)}, this one {flags(now)}; resume with the same sizes "
            "(a sharded run's checkpoint holds its model and optimizer as torch.distributed.checkpoint shards)"
        )
    if layout.sizes and not (resume_from / SHARDED_STATE).is_dir():
        raise SystemExit(f"--resume {resume_from}: no {SHARDED_STATE} folder, which a sharded run's checkpoint has")


def save_model_states(models, weights, output_dir) -> None:
    """Accelerate hook: writes the model into the checkpoint ourselves. The routed experts are views into packed
    weights (shared storage), which accelerate's safetensors writer would keep only one name of."""
    from accelerate.state import PartialState
    from safetensors.torch import save_file

    if PartialState().is_main_process:
        for index, state in enumerate(weights):
            name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
            save_file({k: v.detach().cpu().clone() for k, v in state.items()}, str(Path(output_dir) / name))
    weights.clear()  # accelerate then writes no model file itself


def load_model_states(models, input_dir) -> None:
    """Accelerate hook: the counterpart of `save_model_states` (copies into the existing, packed storage)."""
    from safetensors.torch import load_file

    for index, model in enumerate(models):
        name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
        device = next(model.parameters()).device
        model.load_state_dict(load_file(str(Path(input_dir) / name), device=str(device)))
    models.clear()  # accelerate then loads no model itself


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def write_history(folder: Path, history: dict) -> None:
    """metrics.jsonl (one line per log step, eval lines included) and the expert-load record, written whole: into
    checkpoints, on resume and at the end. During the run, `append_records` extends metrics.jsonl instead."""
    from safetensors.torch import save_file

    tmp = folder / "metrics.jsonl.partial"
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history["records"]))
    os.replace(tmp, folder / "metrics.jsonl")
    if history["load_steps"]:
        tensors = {"steps": torch.tensor(history["load_steps"]), "load": torch.stack(history["loads"])}
        save_file(
            tensors, str(folder / "expert_load.safetensors.partial"), metadata={"layers": ",".join(history["layers"])}
        )
        os.replace(folder / "expert_load.safetensors.partial", folder / "expert_load.safetensors")


def append_records(folder: Path, history: dict) -> None:
    """Appends the records logged since the last write to metrics.jsonl, in one write: rewriting the whole log
    (and the expert load, layers x experts per log step) at every log step grew quadratically over a long run."""
    new = history["records"][history["written"] :]
    with open(folder / "metrics.jsonl", "a") as log:
        log.write("".join(json.dumps(record) + "\n" for record in new))
    history["written"] = len(history["records"])


def read_history(folder: Path, layers: list[str]) -> dict:
    from safetensors.torch import load_file

    history = {"records": [], "load_steps": [], "loads": [], "layers": layers}
    if (folder / "metrics.jsonl").exists():
        history["records"] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    if (folder / "expert_load.safetensors").exists():
        tensors = load_file(str(folder / "expert_load.safetensors"))
        history["load_steps"], history["loads"] = tensors["steps"].tolist(), list(tensors["load"])
    return history


def prepare_output_dir(args, accelerator) -> Path | None:
    """Returns the checkpoint to resume from. Never writes over an earlier run unless asked to."""
    output_dir = Path(args.output_dir)
    resume_from = None
    if args.resume:
        if args.resume != "latest":
            resume_from = Path(args.resume)
            if not (resume_from / "trainer_state.json").is_file():
                raise SystemExit(f"--resume {resume_from}: not a checkpoint folder (no trainer_state.json)")
        elif checkpoint_dirs(output_dir):
            resume_from = checkpoint_dirs(output_dir)[-1]
        elif accelerator.is_main_process:
            print(f"--resume: no checkpoint in {output_dir / CHECKPOINTS} yet; starting from scratch", flush=True)
    elif output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise SystemExit(
            f"{output_dir} already holds files; pass --resume to continue that run, --overwrite to start over in it, "
            "or choose another --output-dir"
        )
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        if args.overwrite and not args.resume and output_dir.exists():
            for name in (CHECKPOINTS, "model", "tokenizer"):
                shutil.rmtree(output_dir / name, ignore_errors=True)
        (output_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        for stale in (output_dir / CHECKPOINTS).glob("*.partial"):
            shutil.rmtree(stale)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    return resume_from


# --------------------------------------------------------------------------------------------------------- the loop


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


def train(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        InitProcessGroupKwargs,
        gather_object,
        set_seed,
    )
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    # cpu=True where there is no GPU: accelerate only takes a multi-process CPU launch (gloo) as distributed then.
    # find_unused_parameters: an expert that no token of a micro-batch picked gets no gradient on that rank.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    cpu = args.cpu or not torch.cuda.is_available()
    if uses_deepspeed() and not torch.cuda.is_available():
        # DeepSpeed on CPU processes (gloo): accelerate turns DeepSpeed off for cpu=True, and without a backend named
        # it would start DeepSpeed's process group yet count a single process.
        cpu, handlers = False, [*handlers, InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(mixed_precision=mixed_precision(args.mixed_precision), cpu=cpu, kwargs_handlers=handlers)
    # --tp/--ep/--fsdp-size: transformers shards the model (DistributedConfig); accelerate only runs the processes.
    layout = parallel_layout(args, accelerator.num_processes, accelerator.process_index)
    sharded = layout.config is not None
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and sharded:
        raise SystemExit("--tp/--ep/--fsdp-size shard the model through transformers; launch them with torchrun, "
                         "not with a DeepSpeed config")  # fmt: skip
    resume_from = prepare_output_dir(args, accelerator)
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        check_resume_layout(resume_from, saved, layout)
    output_dir = Path(args.output_dir)
    set_seed(args.seed)

    data = prepare_data(args, accelerator, output_dir, resume_from, layout.dp_world)
    tokenizer, eval_blocks = data.tokenizer, data.eval_blocks
    blocks_per_step = args.batch_size * args.grad_accum * layout.dp_world
    if args.streaming:
        num_train_blocks, draw = None, data.train.micro_batch
    else:
        num_train_blocks = len(data.train)
        sampler = BlockSampler(num_train_blocks, args.batch_size, args.grad_accum, layout.dp_world, args.seed)

        def draw(step: int, micro: int, rank: int) -> torch.Tensor:
            return data.train[sampler.micro_batch(step, micro, rank)]

    if sharded:
        model = build_sharded_model(args, tokenizer, layout.config)
        check_layout(model, layout, accelerator.process_index)
    else:
        model = build_model(args, tokenizer)
    model.config.seq_aux_loss_alpha = args.seq_aux_loss_alpha
    if args.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if sharded:  # plain tensors and each device mesh's DTensors in groups of their own (one fused call each)
        groups = split_groups_by_mesh(groups)
    # One kernel call for all parameters: the routed experts are hundreds of small tensors per layer, and the
    # default per-tensor loop took a third of a step at DeepSeek-V3's 256 experts (benchmarks/bench_train.py).
    fused = accelerator.device.type in ("cpu", "cuda")
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr)  # foreach: DTensors have no fused SGD kernel
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), fused=fused)
    # Not handed to accelerate: its wrapper steps the schedule once per process, and ours follows optimizer steps.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, args.warmup_steps, args.max_steps, min_lr_rate=args.min_lr_ratio
    )
    if deepspeed:
        # The MoE blocks as ZeRO-3 leaf modules, and the batch shape DeepSpeed wants in its config (this loop has
        # no dataloader for accelerate to read it from). DeepSpeed clips and accumulates: --max-grad-norm and
        # --grad-accum go to its config.
        prepare_deepspeed_model(model)
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.update(
            train_micro_batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=args.grad_accum,
            train_batch_size=args.batch_size * args.grad_accum * accelerator.num_processes,
            gradient_clipping=args.max_grad_norm,
        )  # fmt: skip
    if sharded:
        # Not prepared: accelerate would wrap the DTensor model in DDP. The optimizer steps the sharded parameters
        # itself, and its step hook moves the balancing bias (loads summed over ranks / tp_size, modeling/balancing.py).
        core = model
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):  # their own paths
            accelerator.register_save_state_pre_hook(save_model_states)
            accelerator.register_load_state_pre_hook(load_model_states)
        core = accelerator.unwrap_model(model)
    if deepspeed:
        # ZeRO steps our optimizer over flat partitions, where the automatic bias hook cannot find the model.
        bind_deepspeed(optimizer, core)
        engine = accelerator.deepspeed_engine_wrapped.engine
    recorder = LossRecorder(core)
    layers = [name for name, _ in named_routers(core.model)]

    start_step, history = 0, {"records": [], "load_steps": [], "loads": [], "layers": layers}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))  # sharded: only the RNG states, the rest is not accelerate's
        if sharded:
            load_sharded_state(model, optimizer, resume_from / SHARDED_STATE)
        for group in optimizer.param_groups:  # a checkpoint's saved groups carry their own `fused` flag
            group["fused"] = fused and args.optimizer == "adamw"
        if saved["blocks_per_step"] != blocks_per_step or saved["num_train_blocks"] != num_train_blocks:
            raise SystemExit(
                f"--resume {resume_from}: that run used {saved['blocks_per_step']} blocks per step over "
                f"{saved['num_train_blocks']} blocks; this one has {blocks_per_step} over {num_train_blocks}. "
                "Keep --batch-size x --grad-accum x processes, --seq-len, --data and --streaming the same to resume."
            )
        if saved.get("data_key", data.key) != data.key:  # checkpoints from before the token store have no key
            raise SystemExit(
                f"--resume {resume_from}: that run trained on other data (the corpus files, the tokenizer or "
                "--eval-fraction changed); resume with the same ones, or start a new run in another --output-dir"
            )
        scheduler.load_state_dict(saved["scheduler"])
        start_step = saved["step"]
        history = read_history(resume_from, layers)
        if args.streaming and start_step and accelerator.is_main_process:
            print(f"--streaming: replaying the stream's first {start_step * blocks_per_step} blocks to resume at "
                  f"step {start_step}", flush=True)  # fmt: skip
    if accelerator.is_main_process:
        write_history(output_dir, history)  # the log (re)starts where the checkpoint was taken, or empty
    history["written"] = len(history["records"])  # records already in OUTPUT/metrics.jsonl (see append_records)

    tokens_per_step = blocks_per_step * args.seq_len
    progress = tqdm(
        total=args.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
        disable=args.no_progress or not accelerator.is_main_process, desc="train",
    )  # fmt: skip
    window_start, window_steps = time.perf_counter(), 0
    step_loss = torch.zeros((), device=accelerator.device)
    for step in range(start_step, args.max_steps):
        apply_schedules(core.config, {"mtp_loss_weight": args.mtp_schedule, "bias_update_speed": args.bias_schedule},
                        step, args.max_steps)  # fmt: skip
        step_loss.zero_()
        for micro in range(args.grad_accum):
            batch = draw(step, micro, layout.dp_rank).to(accelerator.device)
            # Gradients are all-reduced (FSDP: reduce-scattered) on the last micro-batch only.
            sync = micro == args.grad_accum - 1
            if sync:
                defer = contextlib.nullcontext()
            else:
                defer = deferred_fsdp_sync(model) if sharded else accelerator.no_sync(model)
            if deepspeed:  # the engine accumulates (dividing by --grad-accum itself), clips and steps on the last
                loss = model(input_ids=batch, labels=batch).loss
                engine.set_gradient_accumulation_boundary(sync)
                engine.backward(loss)
                if sync:
                    engine.step()  # the balancing bias moves here (bind_deepspeed above)
                step_loss += loss.detach() / args.grad_accum
                continue
            with defer:
                if sharded:
                    with accelerator.autocast():
                        loss = model(input_ids=batch, labels=batch).loss / args.grad_accum
                    loss.backward()
                else:
                    loss = model(input_ids=batch, labels=batch).loss / args.grad_accum
                    accelerator.backward(loss)
            step_loss += loss.detach()
        if not args.max_grad_norm:
            grad_norm = None
        elif deepspeed:
            grad_norm = engine.get_global_grad_norm()  # DeepSpeed clipped in engine.step
        elif sharded:  # plain tensors and DTensors on several meshes, which torch's clip cannot stack
            grad_norm = clip_grad_norm_(model.parameters(), args.max_grad_norm)
        else:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()  # the balancing bias moves here, through the optimizer-step hook (modeling/balancing.py)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        window_steps += 1
        progress.update(1)

        if done % args.log_every == 0 or done == args.max_steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "loss": float(accelerator.reduce(step_loss.clone(), reduction="mean"))}
            record.update(recorder.take())
            max_vio, load = take_balance_metrics(core)
            record.update(max_vio)
            record.update(
                lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm) if grad_norm is not None else None,
                mtp_loss_weight=core.config.mtp_loss_weight, bias_update_speed=core.config.bias_update_speed,
                tokens=done * tokens_per_step, tokens_per_s=window_steps * tokens_per_step / max(elapsed, 1e-9),
            )  # fmt: skip
            history["records"].append(record)
            if load is not None:
                history["load_steps"].append(done)
                history["loads"].append(load / load.sum(dim=-1, keepdim=True).clamp(min=1) * load.shape[-1])
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window_start, window_steps = time.perf_counter(), 0
        if (args.eval_every and done % args.eval_every == 0) or done == args.max_steps:
            history["records"].append(
                {"step": done, **evaluate(model, eval_blocks, args, accelerator, layout if sharded else None)}
            )
        if accelerator.is_main_process and history["records"] and history["records"][-1]["step"] == done:
            append_records(output_dir, history)  # only when this step logged something
        if (args.save_every and done % args.save_every == 0) or done == args.max_steps:
            state = {
                "step": done, "scheduler": scheduler.state_dict(), "blocks_per_step": blocks_per_step,
                "num_train_blocks": num_train_blocks, "world_size": accelerator.num_processes, "data_key": data.key,
                "parallel": layout.sizes,
            }  # fmt: skip
            save_checkpoint(accelerator, output_dir, done, state, history, args.keep_checkpoints,
                            sharded=(model, optimizer) if sharded else None)  # fmt: skip
    progress.close()
    recorder.remove()

    # FSDP shards the weights, so only replicated (DDP or single-process) weights can be compared; a sharded run
    # compares what every rank holds whole (the balancing biases among it).
    accelerate_fsdp = accelerator.distributed_type == DistributedType.FSDP
    fingerprints = gather_object([None if accelerate_fsdp else state_fingerprint(core, replicated_only=sharded)])
    sharding = gather_object([sharding_record(core)]) if sharded or deepspeed else None
    # What each process did with the data: whether it tokenized the corpus, and how much of the store it maps.
    processes = gather_object([{
        "built_store": data.info.get("built_store"),
        "mapped_bytes": data.store.mapped_bytes() if data.store is not None else None,
    }])  # fmt: skip
    summary = {
        "steps": args.max_steps,
        "world_size": accelerator.num_processes,
        "data_parallel_size": layout.dp_world,
        "parallel": layout.sizes,
        "sharding": sharding,
        "bias_updates": balancing_state(core.model).updates,
        "tokens": args.max_steps * tokens_per_step,
        "train_blocks": num_train_blocks,
        "eval": next((r for r in reversed(history["records"]) if "eval_loss" in r), None),
        "replicas_identical": None if accelerate_fsdp else len(set(fingerprints)) == 1,
        "fingerprint": fingerprints[0],
        "data": {**data.info, "built_store": [p["built_store"] for p in processes],
                 "mapped_bytes": [p["mapped_bytes"] for p in processes]},
    }  # fmt: skip
    if accelerator.is_main_process:
        write_history(output_dir, history)
        write_json(output_dir / "summary.json", summary)
        write_csv(output_dir / "metrics.csv", history["records"])
        if not args.no_plots:
            save_plots(output_dir, history)
    save_final_model(accelerator, model, tokenizer, output_dir, model_card_facts(args, summary, history), sharded)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def model_card_facts(args, summary: dict, history: dict) -> dict:
    """What the generated model card says about training (see `moe_mtp.hub.model_card`)."""
    last_train = next((r for r in reversed(history["records"]) if "loss" in r), {})
    metrics = {"steps": summary["steps"], "tokens": summary["tokens"], "processes": summary["world_size"]}
    metrics.update({k: v for k, v in (summary["eval"] or {}).items() if k != "step"})
    metrics.update({f"train_{k}": last_train[k] for k in ("loss", "main_loss") if k in last_train})
    data = ", ".join(args.data) if args.data else "the English text of Python's stdlib `pydoc_data/topics.py`"
    return {"name": args.output_dir.rstrip("/").split("/")[-1], "data": data, "metrics": metrics}


def save_final_model(
    accelerator, model, tokenizer, output_dir: Path, card_facts: dict | None = None, sharded: bool = False
) -> None:
    """`OUTPUT/model`: a Hub-ready from_pretrained folder (remote code, tokenizer, model card with the training
    metrics and plots), renamed into place once complete. A sharded model (--tp/--ep/--fsdp-size) is saved by every
    rank together: transformers gathers the shards and rank 0 writes the same per-expert keys one process would."""
    final, partial = output_dir / "model", output_dir / "model.partial"
    if sharded:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            _add_card_files(output_dir, partial, card_facts)
        model.config.use_cache = model.generation_config.use_cache = True  # see below
        accelerator.wait_for_everyone()
        model.save_pretrained(partial)  # collective; rank 0 writes
        if accelerator.is_main_process:
            tokenizer.save_pretrained(partial)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        accelerator.wait_for_everyone()
        return
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards; every process takes part
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _add_card_files(output_dir, partial, card_facts)
        core = accelerator.unwrap_model(model)
        # Training ran without a KV cache; generation from the saved model wants one (`generate` reads the
        # generation config's copy, which was made from the training config).
        core.config.use_cache = core.generation_config.use_cache = True
        core.save_pretrained(partial, state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    accelerator.wait_for_everyone()


def _add_card_files(output_dir: Path, folder: Path, card_facts: dict | None) -> None:
    """The plots and the training facts the generated model card shows."""
    if card_facts is None:
        return
    plots = [name for name in PLOTS if (output_dir / name).is_file()]
    for name in plots:
        shutil.copy2(output_dir / name, folder / name)
    write_json(folder / TRAINING_SUMMARY, {**card_facts, "plots": plots})


def write_csv(path: Path, records: list[dict]) -> None:
    columns = list(dict.fromkeys(key for record in records for key in record))
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, path)


def save_plots(output_dir: Path, history: dict) -> None:
    """loss.png (total, main, MTP and balance losses, eval loss) and expert_load.png (per MoE layer, the load of
    each expert relative to the mean over the run: 1 is balanced)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(f"plots need matplotlib ({error}); `pip install matplotlib`, or pass --no-plots") from None

    records = history["records"]
    fig, ax = plt.subplots(figsize=(8, 5))
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if k.endswith("loss") or k.startswith("mtp_loss")]
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=key, marker="o" if key.startswith("eval") else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    _save_figure(fig, output_dir / "loss.png")

    if history["loads"]:
        loads, layers = torch.stack(history["loads"]), history["layers"]
        columns = min(4, len(layers))
        rows = math.ceil(len(layers) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
        vmax = max(2.0, float(loads.max()))
        for index, ax in enumerate(axes.flat):
            if index >= len(layers):
                ax.axis("off")
                continue
            image = ax.imshow(
                loads[:, index].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest",
                extent=(-0.5, loads.shape[-1] - 0.5, history["load_steps"][-1], history["load_steps"][0]),
            )  # fmt: skip
            ax.set_title(layers[index])
            ax.set_xlabel("expert")
            ax.set_ylabel("step")
        fig.colorbar(image, ax=axes, label="load / mean load")
        _save_figure(fig, output_dir / "expert_load.png")


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = mtp_align.run(args) if args.mtp_only or args.add_mtp is not None else train(args)
    if summary is not None and os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.items() if k not in ("fingerprint", "history")}))


if __name__ == "__main__":
    main()
