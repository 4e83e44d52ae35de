"""How the processes of `python -m moe_mtp.train` share the work: the parallel sizes (--tp/--ep/--fsdp-size, loaded
through transformers' `DistributedConfig`), which slice of every batch each process reads, and what each holds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

PARALLEL_FLAGS = ("tp_size", "ep_size", "fsdp_size")


def sharded_requested(args) -> bool:
    """Whether the run loads the model through transformers' `DistributedConfig` (any of the sizes above 1)."""
    return any(getattr(args, name, 1) > 1 for name in PARALLEL_FLAGS)


def model_shape(args) -> tuple[int, int] | None:
    """(routed experts, attention heads) of the model this run trains, for checking the parallel sizes; None when
    --model is not a local folder (transformers' own checks then apply)."""
    if not args.model:
        return args.n_routed_experts, args.num_heads
    if not Path(args.model).is_dir():
        return None
    from ..conversion import read_config_dict

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
    from ..modeling.modeling_moe_mtp import MoeMtpExperts

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
