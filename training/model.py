"""The model a `python -m moe_mtp.train` run trains (from scratch, fine-tuned from --model, or loaded sharded through
transformers' `DistributedConfig`), its optimizer and its learning-rate schedule."""

from __future__ import annotations

import torch

from ..configuration import MoeMtpConfig
from ..configuration.presets import TRAIN_FLAGS
from ..modeling import MoeMtpForCausalLM
from .distributed import split_groups_by_mesh


def build_model(args, tokenizer) -> MoeMtpForCausalLM:
    if args.model:
        return MoeMtpForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # The script's model flags under their config names (the mapping the presets use), then what the data decides.
    fields = {field: getattr(args, flag) for field, flag in TRAIN_FLAGS.items()}
    fields.update(vocab_size=len(tokenizer), q_lora_rank=args.q_lora_rank or None)  # the BPE's real size; 0 = none
    config = MoeMtpConfig(
        **fields,
        max_position_embeddings=args.seq_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
    )
    return MoeMtpForCausalLM(config)


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


def build_optimizer(args, model, device: torch.device, sharded: bool) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW (or --optimizer sgd) with weight decay on the matrices only, and whether it runs fused. A sharded model
    gets one parameter group per device mesh (one fused call each)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if sharded:  # plain tensors and each device mesh's DTensors in groups of their own (one fused call each)
        groups = split_groups_by_mesh(groups)
    # One kernel call for all parameters: the routed experts are hundreds of small tensors per layer, and the
    # default per-tensor loop took a third of a step at DeepSeek-V3's 256 experts (benchmarks/bench_train.py).
    fused = device.type in ("cpu", "cuda")
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr)  # foreach: DTensors have no fused SGD kernel
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), fused=fused)
    return optimizer, fused


def build_scheduler(args, optimizer):
    """Warmup, then cosine decay to lr * --min-lr-ratio at --max-steps. Not handed to accelerate: its wrapper steps
    the schedule once per process, and this one follows optimizer steps."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, args.warmup_steps, args.max_steps, min_lr_rate=args.min_lr_ratio
    )
