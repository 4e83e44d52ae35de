"""QLoRA on a CPU or GPU: load a moe_mtp model in 8-bit (or 4-bit NF4) with bitsandbytes, train LoRA adapters with
`Trainer`, then merge them into a full-precision copy of the base model and save it.

Every routed expert, shared expert, attention projection and MTP projection is its own linear layer, so all of
them are quantized and all of them take adapters. Merging into quantized weights would round the adapters away,
so the merge reloads the base model in full precision (the usual QLoRA recipe).

    python examples/qlora_8bit.py --smoke                                   # seconds, on a tiny model it trains
    python examples/qlora_8bit.py --model outputs/pretrain/model --bits 4 --output-dir outputs/qlora-4bit

OUTPUT gets `adapters/` (the LoRA weights), `merged/` (a from_pretrained folder with the tokenizer) and
`eval.json` (response loss before training, after training on the quantized model, and of the merged model).
Needs bitsandbytes >= 0.48 on a CPU (`pip install 'bitsandbytes>=0.48'`).
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

from moe_mtp import MoeMtpForCausalLM

HERE = Path(__file__).resolve().parent
TARGETS = ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj", "eh_proj"]  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A moe_mtp folder with its tokenizer (default: train one).")
    parser.add_argument("--bits", type=int, choices=[8, 4], default=8, help="8: LLM.int8(); 4: NF4 with double quant.")
    parser.add_argument("--data", default=str(HERE / "data" / "instructions.jsonl"))
    parser.add_argument("--output-dir", default="outputs/qlora")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="A few steps on a tiny base model: seconds.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace the adapters and merged model of an earlier run."
    )
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(max_steps=12, rank=8, lr=5e-3)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    output = Path(args.output_dir)
    if (output / "merged").exists() and not args.overwrite:
        raise SystemExit(
            f"{output / 'merged'} already exists; pass --overwrite to replace it, or choose another --output-dir"
        )
    for folder in (output / "merged", output / "adapters"):
        shutil.rmtree(folder, ignore_errors=True)  # only with --overwrite, or left by a run that stopped early
    sys.path.insert(0, str(HERE))  # the data helpers of the LoRA example
    from finetune_trainer_lora import base_model, collate, load_pairs

    model_dir = base_model(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = MoeMtpForCausalLM.from_pretrained(model_dir, quantization_config=quantization)
    print(f"{args.bits}-bit model: {model.get_memory_footprint() / 1e6:.2f} MB")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    model.print_trainable_parameters()

    pairs = load_pairs(args.data, tokenizer).train_test_split(test_size=24, seed=0)
    training_args = TrainingArguments(
        output_dir=str(output / "trainer"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=max(1, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 5), save_strategy="no", report_to=[], remove_unused_columns=False,
        label_names=["labels"], use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    trainer = Trainer(model=model, args=training_args, train_dataset=pairs["train"], eval_dataset=pairs["test"],
                      data_collator=collate(tokenizer.pad_token_id))  # fmt: skip
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    model.save_pretrained(output / "adapters")

    # Merge into the full-precision base, save, and check the merged model on the same held-out pairs.
    base = MoeMtpForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, output / "adapters").merge_and_unload()
    merged.save_pretrained(output / "merged")
    tokenizer.save_pretrained(output / "merged")
    merged = MoeMtpForCausalLM.from_pretrained(output / "merged")
    trainer.model = merged
    merged_loss = trainer.evaluate()["eval_loss"]

    result = {"bits": args.bits, "eval_loss_before": before, "eval_loss_after": after,
              "eval_loss_merged": merged_loss, "eval_ppl_after": math.exp(after)}  # fmt: skip
    (output / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"held-out response loss: {before:.3f} before, {after:.3f} after ({args.bits}-bit + LoRA), "
          f"{merged_loss:.3f} merged into fp32; saved {output / 'merged'}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
