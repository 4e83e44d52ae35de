"""LoRA fine-tuning of a moe_mtp model on a small instruction set, with transformers' `Trainer` and PEFT.

Adapters go on every projection: attention, dense MLPs, shared and routed experts, MTP modules. The balancing bias
keeps moving after each optimizer step by itself; `MoeMtpCallback` adds DeepSeek-V3's MTP-weight schedule and logs
the loss parts and per-layer MaxVio. The data is `examples/data/instructions.jsonl` (366 instruction/response
pairs written for this project); the loss counts the response tokens only, and the eval perplexity on held-out
pairs is printed before and after training.

    python examples/finetune_trainer_lora.py --smoke                      # seconds: trains a tiny base model first
    python -m moe_mtp.train --output-dir outputs/base                     # or start from a better base model:
    python examples/finetune_trainer_lora.py --model outputs/base/model --output-dir outputs/lora

OUTPUT gets the adapters (`adapter_model.safetensors`, load them with `PeftModel.from_pretrained`) and
`eval.json` with the perplexities.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, Trainer, TrainingArguments

from moe_mtp import ROUTED_EXPERT_PARAMETERS, MoeMtpForCausalLM
from moe_mtp.training import MoeMtpCallback

DATA = Path(__file__).resolve().parent / "data" / "instructions.jsonl"
TARGETS = ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"]  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A moe_mtp folder with its tokenizer (default: train one).")
    parser.add_argument("--data", default=str(DATA), help="jsonl with 'instruction' and 'response' fields.")
    parser.add_argument("--output-dir", default="outputs/lora")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-pairs", type=int, default=40, help="Pairs held out for the eval perplexity.")
    parser.add_argument("--smoke", action="store_true", help="A few steps on a tiny base model: seconds.")
    parser.add_argument("--overwrite", action="store_true", help="Replace the adapters of an earlier run here.")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(max_steps=20, rank=8, lr=5e-3, eval_pairs=24)  # explicit flags still win
    return parser.parse_args(argv)


def base_model(args) -> str:
    """The model folder to fine-tune: --model, or one trained here by `python -m moe_mtp.train`."""
    if args.model:
        return args.model
    run = Path(args.output_dir) / "base"
    if not (run / "model").is_dir():
        steps = "12" if args.smoke else "300"
        # --resume: a base run that was interrupted continues instead of refusing its folder
        trained = subprocess.run([sys.executable, "-m", "moe_mtp.train", "--smoke", "--max-steps", steps, "--resume",
                                  "--no-progress", "--output-dir", str(run)])  # fmt: skip
        if trained.returncode:
            raise SystemExit(f"training the base model in {run} failed (above); pass --model to use another one")
    return str(run / "model")


def load_pairs(path: str, tokenizer, max_len: int = 64) -> Dataset:
    """Prompt + response + EOS per pair; labels are -100 on the prompt, so the loss is the response's."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    input_ids, labels = [], []
    for row in rows:
        prompt = tokenizer(f"Instruction: {row['instruction']}\nResponse:", add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids.append((prompt + answer)[:max_len])
        labels.append(([-100] * len(prompt) + answer)[:max_len])
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def collate(pad_id: int):
    """Right-pads a batch; padding is masked out of attention and loss."""

    def fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [pad_id] * pad)
            batch["labels"].append(r["labels"] + [-100] * pad)
            batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v) for k, v in batch.items()}

    return fn


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output_dir)
    if (output / "adapter_model.safetensors").exists() and not args.overwrite:
        raise SystemExit(
            f"{output} already holds adapters; pass --overwrite to replace them, or choose another --output-dir"
        )
    torch.manual_seed(0)
    model_dir = base_model(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = MoeMtpForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The routed experts are 3-D parameters (gate_up_proj, down_proj): PEFT reaches them through target_parameters.
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, target_parameters=ROUTED_EXPERT_PARAMETERS
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    pairs = load_pairs(args.data, tokenizer).train_test_split(test_size=args.eval_pairs, seed=0)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10), logging_steps=max(1, args.max_steps // 10), save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, label_names=["labels"],
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=training_args, train_dataset=pairs["train"], eval_dataset=pairs["test"],
        data_collator=collate(tokenizer.pad_token_id), callbacks=[MoeMtpCallback(mtp_loss_weight="0.3,0.1@0.7")],
    )  # fmt: skip
    before = math.exp(trainer.evaluate()["eval_loss"])
    trainer.train()
    after = math.exp(trainer.evaluate()["eval_loss"])
    model.save_pretrained(args.output_dir)  # the adapters only
    result = {"eval_ppl_before": before, "eval_ppl_after": after, "steps": args.max_steps, "base_model": model_dir,
              "train_log": [entry for entry in trainer.state.log_history if "loss" in entry]}  # fmt: skip
    (Path(args.output_dir) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"eval perplexity on {args.eval_pairs} held-out responses: {before:.1f} before, {after:.1f} after")
    return result


if __name__ == "__main__":
    main()
