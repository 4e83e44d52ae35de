"""LoRA fine-tuning of a moe_mtp model with transformers' `Trainer` and DeepSeek-V3's recipe.

Adapters go on every projection: attention, dense MLPs, shared and routed experts, MTP modules. The balancing bias
keeps moving after each optimizer step by itself; `MoeMtpCallback` adds the MTP-weight schedule and logs the loss
parts and per-layer MaxVio. The model can be one that `python -m moe_mtp.train` saved:

    python -m moe_mtp.train --smoke --output-dir outputs/smoke
    python examples/finetune_lora_trainer.py --model outputs/smoke/model --output-dir outputs/lora
"""

import argparse

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, Trainer, TrainingArguments

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.train import default_documents, pack
from moe_mtp.training import MoeMtpCallback

TARGETS = ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"]  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A moe_mtp folder with its tokenizer.")
    parser.add_argument("--output-dir", default="outputs/lora")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = MoeMtpForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    model.print_trainable_parameters()

    blocks = pack(default_documents()[-20:], tokenizer, args.seq_len).tolist()
    data = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 10), logging_steps=max(1, args.max_steps // 10),
        save_strategy="no", report_to=[],
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=training_args, train_dataset=data, callbacks=[MoeMtpCallback(mtp_loss_weight="0.3,0.1@0.7")]
    )
    trainer.train()
    model.save_pretrained(args.output_dir)  # the adapters only
    return trainer


if __name__ == "__main__":
    main()
