"""What a `python -m moe_mtp.train` run keeps on disk: its output folder (never written over an earlier run unless
asked), checkpoints that `--resume` continues from exactly, and the final Hub-ready model folder `OUTPUT/model`.

A checkpoint (`OUTPUT/checkpoints/step-N`) holds the model, optimizer, scheduler, every process's RNG states, the data
position (the step) and the metrics history. Checkpoints and the model folder are written under a temporary name and
renamed into place once complete (moe_mtp/atomic.py): a killed run leaves whole ones, and at most a `.partial` folder
that the next run deletes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

from ..atomic import PARTIAL, REPLACED, atomic_path
from ..hub import TRAINING_SUMMARY
from .layout import PARALLEL_FLAGS
from .metrics import write_history, write_json
from .plots import PLOTS

CHECKPOINTS = "checkpoints"
SHARDED_STATE = "sharded_state"  # a checkpoint's model and optimizer under --tp/--ep/--fsdp-size (DCP files)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint only gets its `step-N` name once fully written."""
    root = output_dir / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[len("step-") :].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


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
        for stale in [
            *(output_dir / CHECKPOINTS).glob(f"*{PARTIAL}"),
            *(output_dir / CHECKPOINTS).glob(f"*{REPLACED}"),
        ]:
            shutil.rmtree(stale)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    return resume_from


def save_checkpoint(
    accelerator, output_dir: Path, step: int, state: dict, history: dict, keep: int, sharded=None
) -> Path:
    """Writes into `step-N.partial` then renames it: a killed run leaves either a whole checkpoint or a `.partial`
    folder, which the next run deletes. `sharded`: the (model, optimizer) of a --tp/--ep/--fsdp-size run, which
    accelerate does not hold; they go to `SHARDED_STATE` through torch.distributed.checkpoint."""
    final = output_dir / CHECKPOINTS / f"step-{step:08d}"
    main = accelerator.is_main_process
    with atomic_path(final, folder=True, active=main) as partial:  # the main process makes and renames it
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))  # model, optimizer and every process's RNG states
        if sharded is not None:
            save_sharded_state(*sharded, partial / SHARDED_STATE)
        accelerator.wait_for_everyone()  # all of them written before the rename
        if main:
            write_json(partial / "trainer_state.json", state)
            write_history(partial, history)
    if main:
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


def _model_file(output_dir, index: int) -> str:
    return str(Path(output_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors"))


def save_model_states(models, weights, output_dir) -> None:
    """Accelerate hook: writes the model into the checkpoint ourselves, every tensor cloned, so that weights sharing
    storage (`tie_word_embeddings=True`), which safetensors refuses to write under two names, keep both names."""
    from accelerate.state import PartialState
    from safetensors.torch import save_file

    if PartialState().is_main_process:
        for index, state in enumerate(weights):
            save_file({k: v.detach().cpu().clone() for k, v in state.items()}, _model_file(output_dir, index))
    weights.clear()  # accelerate then writes no model file itself


def load_model_states(models, input_dir) -> None:
    """Accelerate hook: the counterpart of `save_model_states` (copies into the existing parameters)."""
    from safetensors.torch import load_file

    for index, model in enumerate(models):
        device = next(model.parameters()).device
        model.load_state_dict(load_file(_model_file(input_dir, index), device=str(device)))
    models.clear()  # accelerate then loads no model itself


def save_sharded_state(model, optimizer, folder: Path) -> None:
    """The model and optimizer of a sharded run, with torch.distributed.checkpoint: every rank writes its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded_state(model, optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ..modeling.balancing import automatic_bias_update

    # A fresh optimizer has no states to load into: get_state_dict creates them with one step at lr 0, which must
    # not count as a balancing step.
    with automatic_bias_update(False):
        model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


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
    main = accelerator.is_main_process
    state_dict = None if sharded else accelerator.get_state_dict(model)  # gathers FSDP shards; every process
    core = model if sharded else accelerator.unwrap_model(model)
    with atomic_path(output_dir / "model", folder=True, active=main) as partial:  # the main process renames it
        if main:
            _add_card_files(output_dir, partial, card_facts)
        if main or sharded:
            # Training ran without a KV cache; generation from the saved model wants one (`generate` reads the
            # generation config's copy, which was made from the training config).
            core.config.use_cache = core.generation_config.use_cache = True
        if sharded:
            accelerator.wait_for_everyone()
            model.save_pretrained(partial)  # collective; rank 0 writes
        elif main:
            core.save_pretrained(partial, state_dict=state_dict, save_function=accelerator.save)
        if main:
            tokenizer.save_pretrained(partial)
    accelerator.wait_for_everyone()


def _add_card_files(output_dir: Path, folder: Path, card_facts: dict | None) -> None:
    """The plots and the training facts the generated model card shows."""
    if card_facts is None:
        return
    plots = [name for name in PLOTS if (output_dir / name).is_file()]
    for name in plots:
        shutil.copy2(output_dir / name, folder / name)
    write_json(folder / TRAINING_SUMMARY, {**card_facts, "plots": plots})
