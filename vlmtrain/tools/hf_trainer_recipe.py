"""The stock ``transformers.Trainer`` recipe our users run today (qwen-vl-finetune / JanusVLN / InternNav
style), for ``vlmtrain bench --compare hf-trainer``: the same model, data and hyper-parameters as a
vlmtrain config, trained the way those recipes train.

The recipe, as those repositories write it:

- a map-style ``Dataset`` over a LLaVA-style JSON list whose ``__getitem__`` opens the sample's images
  with PIL on every access, runs the model's ``Qwen2VLImageProcessor`` (the PIL one), expands each
  ``<image>`` into ``<|vision_start|><|image_pad|> x n <|vision_end|>``, writes the Qwen chat format
  and masks the labels to the answer (the assistant text and its ``<|im_end|>``, which is also what
  vlmtrain labels, so both report the same loss);
- a collator that pads each batch to its longest sample and concatenates the pixel patches;
- ``Trainer`` with one loader worker, AdamW, linear warmup + cosine decay, gradient clipping; LoRA
  through PEFT on the language model's attention and MLP projections (everything else frozen), or
  every parameter trained.

Needs the optional extra ``vlmtrain[compare]`` (``accelerate``, which ``Trainer`` requires). Qwen-VL
families only (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``) with ``data.format=llava_json``: that is the
recipe being reproduced.

Run alone: ``python -m vlmtrain.tools.hf_trainer_recipe CONFIG.yaml [key=value ...]`` trains one epoch
and writes ``output_dir/summary.json`` (wall time from process start, samples/s, loss history).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from vlmtrain.config import ConfigError, RunConfig, load_config

PROCESS_START = time.time()

IGNORE = -100
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# The language model's attention and MLP projections: what the recipes' LoRA targets.
LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def check_supported(cfg: RunConfig) -> None:
    """The recipe reproduces Qwen-VL fine-tuning on LLaVA JSON; anything else is a ConfigError."""
    if cfg.model.family not in QWEN_FAMILIES:
        raise ConfigError(f"--compare hf-trainer reproduces the Qwen-VL recipe: model.family must be one of "
                          f"{QWEN_FAMILIES}, not {cfg.model.family!r}")
    if cfg.data.sources or cfg.data.format != "llava_json":
        raise ConfigError("--compare hf-trainer reads one LLaVA-style JSON file: set data.format=llava_json and "
                          "data.root (data.sources is not part of the stock recipe)")
    if cfg.train.grad_accum != 1 or cfg.parallel.backend not in ("none", "ddp"):
        raise ConfigError("--compare hf-trainer runs one process without gradient accumulation "
                          "(train.grad_accum=1, parallel.backend=none)")


class StockVLNDataset(torch.utils.data.Dataset):
    """The recipes' dataset: every access reads and preprocesses the sample's images again."""

    def __init__(self, annotation: str | Path, model_path: str | Path, frame_size: int):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        self.path = Path(annotation)
        self.records = json.loads(self.path.read_text())
        self.root = self.path.parent
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.processor = Qwen2VLImageProcessorPil.from_pretrained(model_path, local_files_only=True)
        self.frame_size = frame_size
        self.merge = self.processor.merge_size

    def __len__(self) -> int:
        return len(self.records)

    def _images(self, record: dict) -> dict[str, torch.Tensor]:
        from PIL import Image

        paths = record.get("images") or ([record["image"]] if "image" in record else [])
        images = []
        for p in paths:
            with Image.open(self.root / p) as im:
                im = im.convert("RGB")
                if im.size != (self.frame_size, self.frame_size):
                    im = im.resize((self.frame_size, self.frame_size), Image.Resampling.BICUBIC)
                images.append(im)
        if not images:
            return {}
        out = self.processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        vision = self._images(record)
        tokens_per_image = ([int(g.prod()) // self.merge ** 2 for g in vision["image_grid_thw"]]
                            if vision else [])
        ids: list[int] = []
        labels: list[int] = []
        image = 0
        for turn in record["conversations"]:
            role = ROLE[turn.get("from", turn.get("role"))]
            text = turn.get("value", turn.get("content", ""))
            pieces = text.split("<image>")
            expanded = pieces[0]
            for piece in pieces[1:]:
                expanded += "<|vision_start|>" + "<|image_pad|>" * tokens_per_image[image] + "<|vision_end|>" + piece
                image += 1
            head = self.tokenizer(f"<|im_start|>{role}\n", add_special_tokens=False)["input_ids"]
            body = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
            end = self.tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
            newline = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
            ids += head + body + end + newline
            learn = role == "assistant"
            labels += [IGNORE] * len(head) + (body + end if learn else [IGNORE] * (len(body) + len(end)))
            labels += [IGNORE] * len(newline)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), **vision}


def collate(pad_id: int):
    """Pad each batch to its longest sample; concatenate the images' patches and grids."""

    def fn(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        with_images = [r for r in rows if "pixel_values" in r]
        if with_images:
            out["pixel_values"] = torch.cat([r["pixel_values"] for r in with_images])
            out["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in with_images])
        return out

    return fn


def load_stock_model(cfg: RunConfig):
    """The HF model as the recipes load it, with LoRA (PEFT) on the LLM or every parameter trainable."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(cfg.model.path, dtype=torch.float32, local_files_only=True)
    if cfg.model.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
                          target_modules=LLM_LORA_TARGETS, bias="none")
        model = get_peft_model(model, lora)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(not (("visual" in name and cfg.train.freeze_vision and "merger" not in name)
                                  or ("merger" in name and cfg.train.freeze_projector)
                                  or ("visual" not in name and cfg.train.freeze_llm)))
    return model


def training_arguments(cfg: RunConfig, out: Path, epochs: float):
    """``TrainingArguments`` with the vlmtrain config's hyper-parameters."""
    from transformers import TrainingArguments

    o = cfg.optim
    scheduler = "cosine_with_min_lr" if o.min_lr_ratio > 0 else "cosine"
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.train.batch_size, num_train_epochs=epochs,
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.beta1, adam_beta2=o.beta2,
        adam_epsilon=o.eps, max_grad_norm=o.grad_clip if o.grad_clip > 0 else 0.0,
        lr_scheduler_type=scheduler, lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio} if o.min_lr_ratio > 0 else {},
        warmup_steps=o.warmup_steps, logging_steps=cfg.train.log_every, save_strategy="no", report_to="none",
        dataloader_num_workers=1, remove_unused_columns=False, seed=cfg.seed, data_seed=cfg.seed,
        bf16=cfg.train.precision == "bf16", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )


def run_recipe(cfg: RunConfig, out: str | Path, epochs: float = 1.0) -> dict:
    """Train ``epochs`` epochs of ``cfg``'s model and data the stock way; returns (and writes to
    ``out/summary.json``) samples, wall seconds since process start, samples/s and the loss history."""
    check_supported(cfg)
    from transformers import Trainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    dataset = StockVLNDataset(cfg.data.root, cfg.model.path, cfg.model.frame_size or 448)
    model = load_stock_model(cfg)
    trainer = Trainer(model=model, args=training_arguments(cfg, out, epochs), train_dataset=dataset,
                      data_collator=collate(int(dataset.tokenizer.pad_token_id)))
    t0 = time.time()
    result = trainer.train()
    train_s = time.time() - t0
    steps = int(result.global_step)
    # The last batch of an epoch holds the remainder (the loader does not drop it).
    samples = min(steps * cfg.train.batch_size, math.ceil(epochs * len(dataset)))
    wall = time.time() - PROCESS_START
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    if cfg.model.lora:
        model = model.merge_and_unload()
    model.save_pretrained(out / "model")
    summary = {"recipe": "hf-trainer", "samples": samples, "steps": steps, "wall_s": round(wall, 2),
               "train_s": round(train_s, 2), "samples_per_s": round(samples / wall, 3),
               "train_samples_per_s": round(samples / train_s, 3), "loss_history": losses,
               "epochs": epochs, "steps_per_epoch": math.ceil(len(dataset) / cfg.train.batch_size)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m vlmtrain.tools.hf_trainer_recipe CONFIG [key=value ...] [--out DIR] [--epochs E]``."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="vlmtrain YAML config (model, data, hyper-parameters)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as vlmtrain train takes")
    p.add_argument("--out", required=True, help="output directory (summary.json, model/)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs to train")
    args = p.parse_args(argv)
    try:
        cfg = load_config(None, args.config, args.overrides)
        summary = run_recipe(cfg, args.out, args.epochs)
    except (ConfigError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
