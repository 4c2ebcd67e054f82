#!/usr/bin/env python
"""Matched comparison of MoE (`moge_loss_coef=0`) and MoGE (`moge_loss_coef>0`) arms, with routing diagnostics.

Every arm of a seed starts from the same initial weights (same seed, same architecture), sees the same examples in
the same order with the same augmentation, and runs the same number of steps with the same optimizer; the arms differ
only in the MoGE settings (lambda, padding of the map, sigma schedule). For each arm and seed the script records the
learning curves, the final validation metric (validation carved from the training data, never the test split), the
test metric with `--do_test`, and the diagnostics of `moge_hf.diagnostics` (expert load and entropy, redundancy,
specialization, routing invariance); then prints a table (per seed, and mean +- std per arm) and writes
`<output_dir>/results.json` with every number and PNG pictures (expert maps, learning curves, diagnostics).

Tasks:

- `vision`: a ViT MoGE trained from scratch on CIFAR-10 Parquet files (`--train_file`, `--test_file`; columns
  `--image_column`, `--label_column`). `--vision_setup paper`: 32 experts, top-1, 4x8 map, MoE in the last two
  blocks (the paper's from-scratch regime); `top2`: 16 experts, top-2, 4x4 map, every other block.
- `language`: a GPT-2 MoGE language model on a text file (`--train_file`), split by characters into train /
  validation / test (the last `--test_fraction` is test, the `--validation_fraction` before it validation), with a
  character tokenizer (`--tokenizer char`) or a byte-level BPE trained on the training part (`--tokenizer bpe`).

`--scale cpu` and `--scale gpu` are presets (see `PRESETS`); any argument given explicitly overrides them. The CPU
preset is sized for about 15 minutes per task on 2 CPU cores; the GPU preset for about 10 minutes per arm and seed on
one H100 in bf16 (an estimate: not measured).

Examples:

```bash
python scripts/compare_moe_moge.py --task vision --scale cpu --train_file path/to/cifar10/train.parquet \
    --test_file path/to/cifar10/test.parquet --output_dir runs/compare_vision_cpu --do_test
python scripts/compare_moe_moge.py --task language --scale cpu --train_file data/tinyshakespeare/input.txt \
    --output_dir runs/compare_language_cpu --do_test
```
"""

import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed

import moge_hf
from moge_hf import (
    GPT2MoGEConfig,
    GPT2MoGELMHeadModel,
    ViTMoGEConfig,
    ViTMoGEForImageClassification,
    add_moge_callback,
)
from moge_hf import diagnostics as diag


logger = logging.getLogger("compare_moe_moge")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# Defaults per (task, scale); an argument given on the command line wins.
PRESETS = {
    ("vision", "cpu"): dict(
        seeds=[0, 1],
        moge_loss_coefs=[0.003],
        paddings=["valid", "circular"],
        sigma_schedules=["10,1,0.2"],
        max_steps=500,
        batch_size=64,
        learning_rate=1e-3,
        weight_decay=0.05,
        warmup_steps=25,
        eval_every=100,
        eval_examples=1000,
        validation_size=5000,
        train_size=45000,
        diagnostic_examples=1000,
        augment=False,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        intermediate_size=128,
        expert_intermediate_size=64,
        dropout=0.0,
        bf16=False,
        torch_threads=1,
    ),
    ("vision", "gpu"): dict(
        seeds=[0, 1, 2],
        moge_loss_coefs=[0.003],
        paddings=["valid", "circular"],
        sigma_schedules=["10,1,0.2"],
        max_steps=8000,
        batch_size=256,
        learning_rate=1e-3,
        weight_decay=0.05,
        warmup_steps=400,
        eval_every=500,
        eval_examples=5000,
        validation_size=5000,
        train_size=45000,
        diagnostic_examples=5000,
        augment=True,
        hidden_size=256,
        num_layers=8,
        num_heads=4,
        intermediate_size=1024,
        expert_intermediate_size=1024,
        dropout=0.0,
        bf16=True,
        torch_threads=None,
    ),
    ("language", "cpu"): dict(
        seeds=[0, 1],
        moge_loss_coefs=[1e-5],
        paddings=["valid", "circular"],
        sigma_schedules=["10,1,0.2"],
        max_steps=300,
        batch_size=32,
        learning_rate=2e-3,
        weight_decay=0.1,
        warmup_steps=15,
        eval_every=50,
        eval_examples=256,
        block_size=128,
        diagnostic_examples=256,
        augment=False,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        intermediate_size=256,
        expert_intermediate_size=128,
        dropout=0.0,
        bf16=False,
        torch_threads=1,
        tokenizer="char",
    ),
    ("language", "gpu"): dict(
        seeds=[0, 1, 2],
        moge_loss_coefs=[1e-5],
        paddings=["valid", "circular"],
        sigma_schedules=["10,1,0.2"],
        max_steps=3000,
        batch_size=64,
        learning_rate=1e-3,
        weight_decay=0.1,
        warmup_steps=150,
        eval_every=250,
        eval_examples=1024,
        block_size=256,
        diagnostic_examples=512,
        augment=False,
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        intermediate_size=1536,
        expert_intermediate_size=768,
        dropout=0.1,
        bf16=True,
        torch_threads=None,
        tokenizer="char",
    ),
}


@dataclass
class StudyArguments:
    """What to compare, on which data, for how long."""

    task: str = field(default="vision", metadata={"help": "`vision` (ViT on CIFAR-10 Parquet) or `language` (GPT-2)."})
    scale: str = field(default="cpu", metadata={"help": "Preset: `cpu` (~15 min on 2 cores) or `gpu` (one H100)."})
    output_dir: str = field(default="runs/compare_moe_moge", metadata={"help": "Where results.json and PNGs go."})
    train_file: str | None = field(default=None, metadata={"help": "Training Parquet (vision) or text file."})
    test_file: str | None = field(default=None, metadata={"help": "Test Parquet (vision); language carves its own."})
    image_column: str = field(default="img", metadata={"help": "Image column of the Parquet files."})
    label_column: str = field(default="label", metadata={"help": "Label column of the Parquet files."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Seeds; every arm runs every seed."})
    moge_loss_coefs: list[float] | None = field(default=None, metadata={"help": "Lambdas of the MoGE arms (> 0)."})
    paddings: list[str] | None = field(default=None, metadata={"help": "Map paddings of the MoGE arms."})
    sigma_schedules: list[str] | None = field(
        default=None, metadata={"help": "Sigma schedules of the MoGE arms: `init,final,power` or `none` (fixed)."}
    )
    include_moe: bool = field(default=True, metadata={"help": "Also train the MoE baseline (lambda = 0)."})
    include_moge: bool = field(
        default=True, metadata={"help": "Train the MoGE arms (False: only the MoE baseline, e.g. to tune its knobs)."}
    )
    do_test: bool = field(default=False, metadata={"help": "Also evaluate every arm on the test split at the end."})
    split_seed: int = field(default=1234, metadata={"help": "Seed of the train/validation split (all runs share it)."})
    write_plots: bool = field(default=True, metadata={"help": "Write the PNG pictures (needs matplotlib)."})
    plot_from: str | None = field(
        default=None, metadata={"help": "Only redraw the PNGs of a results.json into --output_dir (no training)."}
    )
    merge_from: list[str] | None = field(
        default=None,
        metadata={
            "help": "Merge the runs of several results.json of one setting (e.g. seeds run on different days or "
            "machines) into --output_dir: one results.json, table and PNGs (no training)."
        },
    )


@dataclass
class TrainArguments:
    """Optimization and evaluation; `None` takes the preset's value."""

    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps per arm and seed."})
    batch_size: int | None = field(default=None, metadata={"help": "Training batch size."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak AdamW learning rate (cosine decay)."})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay."})
    warmup_steps: int | None = field(default=None, metadata={"help": "Linear warm-up steps."})
    eval_every: int | None = field(default=None, metadata={"help": "Steps between learning-curve evaluations."})
    eval_examples: int | None = field(default=None, metadata={"help": "Validation examples per curve evaluation."})
    validation_size: int | None = field(default=None, metadata={"help": "Images carved from train for validation."})
    train_size: int | None = field(default=None, metadata={"help": "At most this many training images."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Language: validation share of the text."})
    test_fraction: float = field(default=0.05, metadata={"help": "Language: test share (the end of the text)."})
    diagnostic_examples: int | None = field(default=None, metadata={"help": "Validation examples for diagnostics."})
    augment: bool | None = field(default=None, metadata={"help": "Vision: random crop (pad 4) and flip in training."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (GPU)."})
    torch_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads on CPU (None: torch's)."})
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of evaluations and diagnostics."})
    logging_steps: int = field(default=10, metadata={"help": "Training-loss logging interval."})


@dataclass
class ModelArguments:
    """The model; `None` takes the preset's value."""

    vision_setup: str = field(
        default="paper",
        metadata={
            "help": "`paper` (32 experts top-1, 4x8, 2 late blocks) or `top2` (16 experts top-2, 4x4, every other)."
        },
    )
    image_size: int = field(default=32, metadata={"help": "Vision: image size (images are resized if needed)."})
    patch_size: int = field(default=4, metadata={"help": "Vision: patch size."})
    hidden_size: int | None = field(default=None, metadata={"help": "Width of the Transformer."})
    num_layers: int | None = field(default=None, metadata={"help": "Number of Transformer blocks."})
    num_heads: int | None = field(default=None, metadata={"help": "Attention heads."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Dense MLP size (non-MoE blocks)."})
    expert_intermediate_size: int | None = field(default=None, metadata={"help": "Hidden size of each expert."})
    num_experts: int | None = field(
        default=None,
        metadata={
            "help": "Experts per MoE layer, instead of the setup's (vision: 32 for `paper`, 16 for `top2`; language: "
            "16). With --expert_intermediate_size fixed, the active FLOPs stay fixed as the experts grow."
        },
    )
    num_experts_per_tok: int | None = field(default=None, metadata={"help": "Top-k, instead of the setup's."})
    moge_map_shape: list[int] | None = field(
        default=None,
        metadata={"help": "Expert map `rows cols` (default with --num_experts: the most square)."},
    )
    dropout: float | None = field(default=None, metadata={"help": "Dropout (hidden/attention/residual)."})
    moge_window: int = field(default=3, metadata={"help": "Window side h of the regularizer."})
    moge_reduction: str = field(default="paper", metadata={"help": "`paper` (lambda values carry over) or `mean`."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Switch load-balancing loss weight."})
    tokenizer: str | None = field(default=None, metadata={"help": "Language: `char` or `bpe` (byte-level BPE)."})
    bpe_vocab_size: int = field(default=2048, metadata={"help": "Language: vocabulary of the trained BPE."})
    block_size: int | None = field(default=None, metadata={"help": "Language: tokens per training sequence."})
    experts_implementation: str | None = field(
        default=None, metadata={"help": "eager (default), grouped_mm, batched_mm or moge_triton (GPU)."}
    )


@dataclass
class Arm:
    """One arm of the comparison: the MoGE settings that differ between arms."""

    name: str
    moge_loss_coef: float
    padding: str
    sigma_schedule: list[float] | None


def apply_preset(study: StudyArguments, train: TrainArguments, model: ModelArguments) -> dict:
    """Fill the arguments left `None` from `PRESETS[(task, scale)]`; return the preset values that were used."""
    if (study.task, study.scale) not in PRESETS:
        raise ValueError(f"--task must be vision or language and --scale cpu or gpu, got {study.task}, {study.scale}")
    preset = PRESETS[(study.task, study.scale)]
    used = {}
    for group in (study, train, model):
        for item in fields(group):
            if item.name in preset and getattr(group, item.name) is None:
                setattr(group, item.name, preset[item.name])
                used[item.name] = preset[item.name]
    return used


def parse_schedule(text: str) -> list[float] | None:
    if text.lower() in ("none", "fixed", ""):
        return None
    values = [float(v) for v in text.split(",")]
    if len(values) != 3:
        raise ValueError(f"a sigma schedule is `init,final,power` or `none`, got {text!r}")
    return values


def build_arms(study: StudyArguments) -> list[Arm]:
    schedules = [parse_schedule(s) for s in study.sigma_schedules]
    coefs = [float(c) for c in study.moge_loss_coefs]
    if any(c <= 0 for c in coefs):
        raise ValueError("--moge_loss_coefs are the MoGE arms' lambdas and must be > 0 (the MoE arm is lambda = 0)")
    arms = []
    if study.include_moe:
        # lambda = 0 leaves the regularizer out of training; the padding only sets the map geometry that the
        # diagnostics (windows, map neighbours) use, so the baseline takes the first MoGE arm's.
        arms.append(Arm("moe", 0.0, study.paddings[0], schedules[0] if schedules else None))
    for coef in coefs if study.include_moge else []:
        for padding in study.paddings:
            for text, schedule in zip(study.sigma_schedules, schedules):
                name = "moge"
                name += f"-l{coef:g}" if len(coefs) > 1 else ""
                name += f"-{padding}"
                name += f"-s{text}" if len(schedules) > 1 else ""
                arms.append(Arm(name, coef, padding, schedule))
    if not arms:
        raise ValueError("no arm to train")
    return arms


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def load_images(path: str, image_column: str, label_column: str, indices, image_size: int):
    """Decode the images at `indices` (None: all) of a Parquet file to `(N, H, W, 3)` uint8 and `(N,)` labels."""
    import datasets

    data = datasets.load_dataset("parquet", data_files={"data": path})["data"]
    if indices is not None:
        data = data.select(indices)
    images = []
    for image in data[image_column]:
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size))
        images.append(np.asarray(image, dtype=np.uint8))
    return np.stack(images), np.asarray(data[label_column], dtype=np.int64)


def vision_data(study: StudyArguments, train: TrainArguments, model: ModelArguments) -> dict:
    import datasets

    if not study.train_file:
        raise ValueError("--train_file (a Parquet file of images and labels) is required for --task vision")
    num_rows = datasets.load_dataset("parquet", data_files={"data": study.train_file})["data"].num_rows
    order = np.random.default_rng(study.split_seed).permutation(num_rows)
    validation_size = min(train.validation_size, num_rows // 5)
    val_idx = np.sort(order[:validation_size])
    train_idx = np.sort(order[validation_size : validation_size + train.train_size])
    args = (study.image_column, study.label_column)
    x_train, y_train = load_images(study.train_file, *args, train_idx, model.image_size)
    x_val, y_val = load_images(study.train_file, *args, val_idx, model.image_size)
    data = {"train": (x_train, y_train), "validation": (x_val, y_val)}
    if study.do_test:
        if not study.test_file:
            raise ValueError("--do_test needs --test_file for --task vision")
        data["test"] = load_images(study.test_file, *args, None, model.image_size)
    # The classifier's size comes from the training data alone: the test split must not shape the model.
    data["num_labels"] = int(max(y_train.max(), y_val.max()) + 1)
    if study.do_test and int(data["test"][1].max()) >= data["num_labels"]:
        raise ValueError(
            f"the test file has label {int(data['test'][1].max())}, but the training file's labels end at "
            f"{data['num_labels'] - 1}"
        )
    return data


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """`(B, H, W, 3)` uint8 -> `(B, 3, H, W)` float, normalized with the CIFAR-10 mean and std."""
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "labels": self.labels[index]}


class ImageCollator:
    """Stack, optionally augment (random crop with 4-pixel padding, horizontal flip), normalize.

    The augmentation draws from its own generator, seeded per run, so that every arm of a seed gets the same crops
    and flips.
    """

    def __init__(self, augment: bool, seed: int):
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples: list[dict]) -> dict:
        images = torch.stack([example["image"] for example in examples])  # (B, H, W, 3) uint8
        labels = torch.stack([example["labels"] for example in examples])
        pixels = normalize_images(images)
        if self.augment:
            batch, _, height, width = pixels.shape
            padded = F.pad(pixels, (4, 4, 4, 4))
            offsets = torch.randint(0, 9, (batch, 2), generator=self.generator)
            flips = torch.rand(batch, generator=self.generator) < 0.5
            crops = []
            for i in range(batch):
                dy, dx = offsets[i].tolist()
                crop = padded[i, :, dy : dy + height, dx : dx + width]
                crops.append(torch.flip(crop, dims=(-1,)) if flips[i] else crop)
            pixels = torch.stack(crops)
        return {"pixel_values": pixels, "labels": labels}


class CharTokenizer:
    """Characters of the training text, plus id 0 for characters it never saw."""

    def __init__(self, text: str):
        self.chars = ["<unk>", *sorted(set(text))]
        self.index = {char: i for i, char in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        return np.fromiter((self.index.get(char, 0) for char in text), dtype=np.int64, count=len(text))


class BPETokenizer:
    """A byte-level BPE (the `tokenizers` library) trained on the training text only."""

    def __init__(self, text: str, vocab_size: int):
        from tokenizers import ByteLevelBPETokenizer

        self.tokenizer = ByteLevelBPETokenizer()
        lines = text.splitlines(keepends=True)
        self.tokenizer.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, show_progress=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        lines = text.splitlines(keepends=True)
        ids = [token for encoding in self.tokenizer.encode_batch(lines) for token in encoding.ids]
        return np.asarray(ids, dtype=np.int64)


def language_data(study: StudyArguments, train: TrainArguments, model: ModelArguments) -> dict:
    if not study.train_file:
        raise ValueError("--train_file (a text file) is required for --task language")
    with open(study.train_file, encoding="utf-8") as handle:
        text = handle.read()
    test_start = int(len(text) * (1.0 - train.test_fraction))
    val_start = int(len(text) * (1.0 - train.test_fraction - train.validation_fraction))
    parts = {"train": text[:val_start], "validation": text[val_start:test_start], "test": text[test_start:]}
    if model.tokenizer == "char":
        tokenizer = CharTokenizer(parts["train"])
    elif model.tokenizer == "bpe":
        tokenizer = BPETokenizer(parts["train"], model.bpe_vocab_size)
    else:
        raise ValueError(f"--tokenizer must be char or bpe, got {model.tokenizer!r}")
    data = {"vocab_size": tokenizer.vocab_size}
    for name, part in parts.items():
        if name == "test" and not study.do_test:
            continue
        ids = tokenizer.encode(part)
        blocks = len(ids) // model.block_size
        if blocks < 1:
            raise ValueError(f"the {name} part has {len(ids)} tokens, fewer than --block_size {model.block_size}")
        data[name] = ids[: blocks * model.block_size].reshape(blocks, model.block_size)
    train_ids = data["train"].reshape(-1)
    values, counts = np.unique(train_ids, return_counts=True)
    data["frequent_ids"] = values[np.argsort(-counts, kind="stable")[:64]].tolist()
    data["num_tokens"] = {name: int(data[name].size) for name in ("train", "validation", "test") if name in data}
    return data


class BlockDataset(torch.utils.data.Dataset):
    def __init__(self, blocks: np.ndarray):
        self.blocks = torch.from_numpy(blocks)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


# ------------------------------------------------------------------------------------------------------------------
# Models, evaluation
# ------------------------------------------------------------------------------------------------------------------


def last_layers(num_layers: int, count: int) -> list[int]:
    """The last `count` layers (the paper's "MoE in late blocks"); all of them in a shallower model."""
    return list(range(max(0, num_layers - count), num_layers))


def expert_overrides(moe: dict, model_args: ModelArguments) -> dict:
    """The setup's MoE fields with `--num_experts`, `--num_experts_per_tok`, `--moge_map_shape` applied (a new
    number of experts without a map gets the most square map)."""
    moe = dict(moe)
    if model_args.num_experts is not None:
        moe.update(num_experts=model_args.num_experts, moge_map_shape=None)
    if model_args.num_experts_per_tok is not None:
        moe["num_experts_per_tok"] = model_args.num_experts_per_tok
    if model_args.moge_map_shape is not None:
        moe["moge_map_shape"] = list(model_args.moge_map_shape)
    return moe


def build_model(study: StudyArguments, model_args: ModelArguments, arm: Arm, data: dict):
    common = dict(
        router_aux_loss_coef=model_args.router_aux_loss_coef,
        moge_loss_coef=arm.moge_loss_coef,
        moge_padding=arm.padding,
        moge_window=model_args.moge_window,
        moge_reduction=model_args.moge_reduction,
        moge_sigma=arm.sigma_schedule[0] if arm.sigma_schedule else 1.0,
        moge_sigma_schedule=arm.sigma_schedule,
        expert_intermediate_size=model_args.expert_intermediate_size,
    )
    if study.task == "vision":
        layers = model_args.num_layers
        if model_args.vision_setup == "paper":
            moe = dict(num_experts=32, num_experts_per_tok=1, moge_map_shape=[4, 8], moe_layers=last_layers(layers, 2))
        elif model_args.vision_setup == "top2":
            moe = dict(num_experts=16, num_experts_per_tok=2, moge_map_shape=[4, 4], moe_layers=None)
        else:
            raise ValueError(f"--vision_setup must be paper or top2, got {model_args.vision_setup!r}")
        config = ViTMoGEConfig(
            image_size=model_args.image_size,
            patch_size=model_args.patch_size,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=model_args.num_heads,
            intermediate_size=model_args.intermediate_size,
            hidden_dropout_prob=model_args.dropout,
            attention_probs_dropout_prob=model_args.dropout,
            num_labels=data["num_labels"],
            **expert_overrides(moe, model_args),
            **common,
        )
        model = ViTMoGEForImageClassification(config)
    else:
        config = GPT2MoGEConfig(
            vocab_size=data["vocab_size"],
            n_positions=model_args.block_size,
            n_embd=model_args.hidden_size,
            n_layer=model_args.num_layers,
            n_head=model_args.num_heads,
            n_inner=model_args.intermediate_size,
            resid_pdrop=model_args.dropout,
            embd_pdrop=model_args.dropout,
            attn_pdrop=model_args.dropout,
            bos_token_id=0,
            eos_token_id=0,
            **expert_overrides(dict(num_experts=16, num_experts_per_tok=2, moge_map_shape=[4, 4]), model_args),
            **common,
        )
        model = GPT2MoGELMHeadModel(config)
    if model_args.experts_implementation:
        model.set_experts_implementation(model_args.experts_implementation)
    return model


def eval_batches(study: StudyArguments, split, batch_size: int, limit: int | None, device):
    """Evaluation batches of a split (the first `limit` examples), as dicts of tensors on `device`."""
    if study.task == "vision":
        images, labels = split
        count = len(labels) if limit is None else min(limit, len(labels))
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            pixels = normalize_images(torch.from_numpy(images[start:stop]))
            yield {"pixel_values": pixels.to(device), "labels": torch.from_numpy(labels[start:stop]).to(device)}
    else:
        count = split.shape[0] if limit is None else min(limit, split.shape[0])
        for start in range(0, count, batch_size):
            yield {"input_ids": torch.from_numpy(split[start : min(start + batch_size, count)]).to(device)}


@torch.no_grad()
def evaluate(model, study: StudyArguments, split, batch_size: int, limit: int | None, bf16: bool) -> dict:
    """Vision: accuracy and cross-entropy; language: the LM loss (nats/token, routing losses left out), perplexity."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_correct, total = 0.0, 0, 0
    try:
        for batch in eval_batches(study, split, batch_size, limit, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if study.task == "vision":
                    logits = model(pixel_values=batch["pixel_values"]).logits.float()
                    labels = batch["labels"]
                    total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                    total_correct += int((logits.argmax(-1) == labels).sum())
                    total += int(labels.numel())
                else:
                    ids = batch["input_ids"]
                    logits = model(input_ids=ids).logits.float()
                    loss = F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                    )
                    total_loss += float(loss)
                    total += int(ids[:, 1:].numel())
    finally:
        model.train(was_training)
    if study.task == "vision":
        return {"accuracy": total_correct / max(total, 1), "loss": total_loss / max(total, 1)}
    loss = total_loss / max(total, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def primary_metric(study: StudyArguments) -> tuple[str, bool]:
    """The metric of the table and whether higher is better."""
    return ("accuracy", True) if study.task == "vision" else ("loss", False)


class CurveCallback(TrainerCallback):
    """Records the training loss of every log and evaluates on a validation subset every `eval_every` steps."""

    def __init__(self, study: StudyArguments, split, eval_every: int, eval_examples: int, batch_size: int, bf16: bool):
        self.study, self.split = study, split
        self.eval_every, self.eval_examples, self.batch_size, self.bf16 = eval_every, eval_examples, batch_size, bf16
        self.curve = {"train_steps": [], "train_loss": [], "eval_steps": [], "eval_metric": [], "eval_seconds": 0.0}
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.curve["train_steps"].append(state.global_step)
            self.curve["train_loss"].append(float(logs["loss"]))

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.eval_every == 0 or step == state.max_steps:
            start = time.perf_counter()
            metrics = evaluate(self.model, self.study, self.split, self.batch_size, self.eval_examples, self.bf16)
            self.curve["eval_seconds"] += time.perf_counter() - start
            self.curve["eval_steps"].append(step)
            self.curve["eval_metric"].append(metrics[primary_metric(self.study)[0]])


# ------------------------------------------------------------------------------------------------------------------
# One run, the summary, the table
# ------------------------------------------------------------------------------------------------------------------


def run_arm(study, train, model_args, arm: Arm, seed: int, data: dict) -> dict:
    set_seed(seed)
    model = build_model(study, model_args, arm, data)
    if study.task == "vision":
        train_dataset = ImageDataset(*data["train"])
        collator = ImageCollator(train.augment, seed)
    else:
        train_dataset = BlockDataset(data["train"])
        collator = None
    run_dir = os.path.join(study.output_dir, "runs", f"{arm.name}_seed{seed}")
    args = TrainingArguments(
        output_dir=run_dir,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=train.warmup_steps,
        logging_steps=train.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=bool(train.bf16),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    curves = CurveCallback(
        study, data["validation"], train.eval_every, train.eval_examples, train.eval_batch_size, bool(train.bf16)
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator, callbacks=[curves])
    add_moge_callback(trainer)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    model = trainer.model
    metric_name, _ = primary_metric(study)
    result = {
        "arm": arm.name,
        "seed": seed,
        "train_seconds": train_seconds,
        "curve": curves.curve,
        "log_history": trainer.state.log_history,
        "final_sigma": float(model.config.moge_sigma),
    }
    start = time.perf_counter()
    result["validation"] = evaluate(model, study, data["validation"], train.eval_batch_size, None, bool(train.bf16))
    if study.do_test:
        result["test"] = evaluate(model, study, data["test"], train.eval_batch_size, None, bool(train.bf16))
    result["eval_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    model.float()
    device = next(model.parameters()).device

    def diagnostic_batches():
        return eval_batches(study, data["validation"], train.eval_batch_size, train.diagnostic_examples, device)

    result["diagnostics"] = diag.routing_diagnostics(model, diagnostic_batches(), seed=seed)
    if study.task == "vision":
        result["invariance"] = diag.image_routing_invariance(model, diagnostic_batches(), seed=seed)
    else:
        result["invariance"] = diag.text_routing_invariance(
            model, diagnostic_batches(), data["frequent_ids"], seed=seed
        )
    result["diagnostic_seconds"] = time.perf_counter() - start
    logger.info(
        f"{arm.name} seed {seed}: validation {metric_name} {result['validation'][metric_name]:.4f}, "
        f"train {train_seconds:.0f}s"
    )
    del trainer
    return result


# Scalars of the table: (key in `scalars`, header, format).
def run_scalars(study: StudyArguments, run: dict) -> dict[str, float | None]:
    """The per-run scalars of the table: the metrics, and the diagnostics averaged over the MoGE layers."""
    metric_name, _ = primary_metric(study)
    layers = run["diagnostics"]["layers"]

    def mean_of(key, entries=layers):
        values = [entry.get(key) for entry in entries if entry.get(key) is not None]
        return float(np.mean(values)) if values else None

    scalars = {
        f"val_{metric_name}": run["validation"][metric_name],
        f"test_{metric_name}": run["test"][metric_name] if "test" in run else None,
        "train_seconds": run["train_seconds"],
        "load_entropy": mean_of("load_entropy"),
        "routing_entropy": mean_of("routing_entropy"),
        "top1_prob": mean_of("top1_prob"),  # how far the routers are from uniform (1 / E)
        "active_experts": mean_of("active_experts"),
        "output_cosine": mean_of("output_cosine_mean"),
        "coact_near_minus_far": None,
        "output_cos_near_minus_far": None,
    }
    near, far = mean_of("prob_correlation_neighbors"), mean_of("prob_correlation_far")
    if near is not None and far is not None:
        scalars["coact_near_minus_far"] = near - far
    near, far = mean_of("output_cosine_neighbors"), mean_of("output_cosine_far")
    if near is not None and far is not None:
        scalars["output_cos_near_minus_far"] = near - far
    if study.task == "vision":
        scalars["mi_class_bits"] = mean_of("mi_label_bits")
        scalars["mi_class_null_bits"] = mean_of("mi_label_shuffled_bits")
        for name in ("shift_right", "flip"):
            entries = run["invariance"].get(name, {}).get("layers", [])
            scalars[f"{name}_same"] = mean_of("same_top1", entries)
            scalars[f"{name}_window"] = mean_of("within_window", entries)
            scalars[f"{name}_chance_window"] = mean_of("chance_within_window", entries)
    else:
        scalars["mi_token_bits"] = mean_of("mi_token_bits")
        scalars["mi_token_null_bits"] = mean_of("mi_token_shuffled_bits")
        entries = run["invariance"].get("context_replacement", {}).get("layers", [])
        scalars["context_same_top1"] = mean_of("same_top1", entries)
        scalars["context_same_set"] = mean_of("same_set", entries)
        scalars["context_window"] = mean_of("within_window", entries)
        scalars["context_chance_window"] = mean_of("chance_within_window", entries)
    return scalars


def summarize(study: StudyArguments, runs: list[dict], arms: list[Arm]) -> dict:
    summary = {}
    for arm in arms:
        arm_runs = [run for run in runs if run["arm"] == arm.name]
        if not arm_runs:
            continue
        per_seed = [run_scalars(study, run) for run in arm_runs]
        summary[arm.name] = {}
        for key in per_seed[0]:
            values = [scalars[key] for scalars in per_seed if scalars[key] is not None]
            summary[arm.name][key] = {
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "values": values,
                "seeds": [run["seed"] for run, scalars in zip(arm_runs, per_seed) if scalars[key] is not None],
            }
    return summary


def student_t_quantile(probability: float, dof: int) -> float:
    """The `probability` quantile (> 0.5) of Student's t distribution with `dof` degrees of freedom.

    Its density integrated from 0 with Simpson's rule on a substitution that tames the tails, then bisection; agrees
    with tables to 1e-6 (tested), so no scipy is needed.
    """
    if not 0.5 < probability < 1 or dof < 1:
        raise ValueError(f"need 0.5 < probability < 1 and dof >= 1, got {probability}, {dof}")
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf_above_half(x: float) -> float:
        # P(0 < T < x) = int_0^atan(x) pdf(tan u) / cos(u)^2 du: a smooth integrand on a finite interval.
        steps = 2000
        top = math.atan(x)
        h = top / steps
        total = 0.0
        for i in range(steps + 1):
            u = i * h
            t = math.tan(u)
            value = math.exp(log_norm - (dof + 1) / 2 * math.log1p(t * t / dof)) / math.cos(u) ** 2
            total += value * (1 if i in (0, steps) else 4 if i % 2 else 2)
        return total * h / 3

    low, high = 0.0, 1.0
    while cdf_above_half(high) < probability - 0.5:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf_above_half(middle) < probability - 0.5 else (low, middle)
    return (low + high) / 2


def paired_differences(study: StudyArguments, runs: list[dict], baseline: str = "moe") -> dict:
    """Each other arm minus the `baseline` arm, seed by seed (a pair shares initial weights and data order), for
    every scalar of the table: the per-seed differences, their mean, sample std and 95% t-interval of the mean.

    The seeds of an arm that the baseline lacks are left out; fewer than 2 pairs give no interval.
    """
    base = {run["seed"]: run_scalars(study, run) for run in runs if run["arm"] == baseline}
    arms = list(dict.fromkeys(run["arm"] for run in runs if run["arm"] != baseline))
    paired = {}
    for arm in arms:
        mine = {run["seed"]: run_scalars(study, run) for run in runs if run["arm"] == arm}
        seeds = sorted(seed for seed in mine if seed in base)
        if not seeds:
            continue
        paired[arm] = {"baseline": baseline}
        for key in mine[seeds[0]]:
            pairs = [(s, mine[s][key] - base[s][key]) for s in seeds if None not in (mine[s][key], base[s][key])]
            if not pairs:
                continue
            diffs = np.array([d for _, d in pairs])
            entry = {"seeds": [s for s, _ in pairs], "differences": diffs.tolist(), "mean": float(diffs.mean())}
            entry["std"] = entry["ci95"] = None
            if len(diffs) > 1:
                entry["std"] = float(diffs.std(ddof=1))
                half = student_t_quantile(0.975, len(diffs) - 1) * entry["std"] / math.sqrt(len(diffs))
                entry["ci95"] = [entry["mean"] - half, entry["mean"] + half]
            paired[arm][key] = entry
    return paired


def format_table(study: StudyArguments, runs: list[dict], summary: dict, paired: dict | None = None) -> str:
    """Markdown table: one row per run, then mean +- std (sample std over seeds) per arm, then each arm's paired
    difference from the MoE baseline (mean and 95% t-interval over seeds)."""
    if not runs:
        return ""
    keys = [
        key
        for key in run_scalars(study, runs[0])
        if any(v["mean"] is not None for v in [summary[arm][key] for arm in summary])
    ]
    header = "| arm | seed | " + " | ".join(keys) + " |"
    lines = [header, "|" + " --- |" * (len(keys) + 2)]

    def fmt(value):
        if value is None:
            return "-"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"

    for run in runs:
        scalars = run_scalars(study, run)
        lines.append(f"| {run['arm']} | {run['seed']} | " + " | ".join(fmt(scalars[key]) for key in keys) + " |")

    def cell(entry: dict | None, spread: str) -> str:
        """The mean, then `+- std` (spread "std") or `[low, high]` (spread "ci95") where there is one."""
        if entry is None or entry["mean"] is None:
            return "-"
        if entry[spread] is None:
            return fmt(entry["mean"])
        if spread == "std":
            return f"{fmt(entry['mean'])} +- {fmt(entry['std'])}"
        return f"{fmt(entry['mean'])} [{fmt(entry['ci95'][0])}, {fmt(entry['ci95'][1])}]"

    for arm, values in summary.items():
        cells = [cell(values[key], "std") for key in keys]
        lines.append(f"| **{arm}** | mean | " + " | ".join(cells) + " |")
    for arm, entries in (paired or {}).items():
        cells = [cell(entries.get(key), "ci95") for key in keys]
        lines.append(f"| **{arm} - {entries['baseline']}** | paired | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(study: StudyArguments, runs: list[dict], summary: dict, arms: list[Arm]) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: no PNGs written (pip install matplotlib)")
        return []
    metric_name, _ = primary_metric(study)
    written = []
    out = study.output_dir
    seeds = sorted({run["seed"] for run in runs})
    map_shape = runs[0]["diagnostics"]["map_shape"]
    for seed in seeds[:1]:
        maps = {run["arm"]: run["diagnostics"]["layers"] for run in runs if run["seed"] == seed}
        written.append(
            diag.plot_expert_maps(
                maps,
                map_shape,
                os.path.join(out, f"expert_maps_seed{seed}.png"),
                title=f"{study.task}: mean routing probability and load per expert (validation, seed {seed})",
            )
        )
    curves = {arm.name: [run["curve"] for run in runs if run["arm"] == arm.name] for arm in arms}
    label = "validation accuracy" if study.task == "vision" else "validation LM loss (nats/token)"
    written.append(
        diag.plot_learning_curves(
            {k: v for k, v in curves.items() if v},
            os.path.join(out, "learning_curves.png"),
            label,
            title=f"{study.task} ({study.scale} preset): mean over seeds, band = min..max",
        )
    )
    values = {arm: {key: entry["values"] for key, entry in metrics.items()} for arm, metrics in summary.items()}
    keys = [
        f"val_{metric_name}",
        f"test_{metric_name}",
        "load_entropy",
        "routing_entropy",
        "top1_prob",
        "output_cosine",
        "coact_near_minus_far",
    ]
    if study.task == "vision":
        keys += ["mi_class_bits", "shift_right_same", "shift_right_window", "flip_same", "flip_window"]
    else:
        keys += ["mi_token_bits", "context_same_top1", "context_same_set", "context_window"]
    written.append(
        diag.plot_diagnostics(
            values,
            keys,
            os.path.join(out, "diagnostics.png"),
            title=f"{study.task} ({study.scale} preset): per arm, bars = mean, dots = seeds",
        )
    )
    return written


def replot(study: StudyArguments) -> dict:
    """Redraw the PNGs of a saved `results.json` (e.g. after changing the plots) into `study.output_dir`."""
    with open(study.plot_from) as handle:
        results = json.load(handle)
    saved = StudyArguments(**{**results["study"], "output_dir": study.output_dir, "plot_from": None})
    os.makedirs(study.output_dir, exist_ok=True)
    arms = [Arm(**arm) for arm in results["arms"]]
    results["figures"] = write_plots(saved, results["runs"], results["summary"], arms)
    print(f"wrote {results['figures']}")
    return results


def hardware() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    info["moge_hf_commit"] = source_commit()
    return info


def source_commit() -> str | None:
    """The git commit of the moge_hf source that ran (`+dirty` if changed since), None outside a checkout."""
    folder = os.path.dirname(os.path.abspath(moge_hf.__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def write_json(path: str, results: dict) -> None:
    """Write `results` to `path` whole or not at all (a reader, or a killed run, never sees half a file)."""
    partial = path + ".partial"
    with open(partial, "w") as handle:
        json.dump(diag.to_jsonable(results), handle, indent=1)
    os.replace(partial, path)


# What may differ between the results.json files that `--merge_from` pools: which seeds and arms ran, and where.
MERGE_FREE_FIELDS = ("seeds", "output_dir", "include_moe", "include_moge", "moge_loss_coefs", "paddings", "do_test")


def merge(study: StudyArguments) -> dict:
    """Pool the runs of several `results.json` of one setting into `study.output_dir` and summarize them again."""
    loaded = []
    for path in study.merge_from:
        with open(path) as handle:
            loaded.append((path, json.load(handle)))
    first_path, merged = loaded[0]
    merged = {**merged, "merged_from": [path for path, _ in loaded], "runs": []}
    arms: dict[str, dict] = {}
    seen = {}
    for path, results in loaded:
        for section in ("study", "train", "model", "preset_values_used"):
            ours, theirs = results.get(section) or {}, merged.get(section) or {}
            # Fields that an older results.json lacks are not compared.
            differ = sorted(k for k in ours.keys() & theirs.keys() - set(MERGE_FREE_FIELDS) if ours[k] != theirs[k])
            if differ:
                raise ValueError(f"{path} and {first_path} differ in {section} settings {differ}; cannot merge them")
        for arm in results["arms"]:
            if arms.setdefault(arm["name"], arm) != arm:
                raise ValueError(f"arm {arm['name']!r} is defined differently in {path} and an earlier file")
        for run in results["runs"]:
            key = (run["arm"], run["seed"])
            if key in seen:
                raise ValueError(f"arm {key[0]!r} seed {key[1]} is in both {seen[key]} and {path}")
            seen[key] = path
            merged["runs"].append({**run, "source": path, "hardware": results.get("hardware")})
    merged["arms"] = list(arms.values())
    seeds = sorted({run["seed"] for run in merged["runs"]})
    merged["study"] = {**merged["study"], "seeds": seeds, "output_dir": study.output_dir, "merge_from": None}
    saved = StudyArguments(**merged["study"])
    arm_objects = [Arm(**arm) for arm in merged["arms"]]
    merged["summary"] = summarize(saved, merged["runs"], arm_objects)
    merged["paired"] = paired_differences(saved, merged["runs"])
    merged["table_markdown"] = format_table(saved, merged["runs"], merged["summary"], merged["paired"])
    os.makedirs(study.output_dir, exist_ok=True)
    merged["figures"] = write_plots(saved, merged["runs"], merged["summary"], arm_objects) if study.write_plots else []
    path = os.path.join(study.output_dir, "results.json")
    write_json(path, merged)
    print(merged["table_markdown"])
    print(f"\nmerged {len(merged['runs'])} runs of {len(loaded)} files into {path}")
    return merged


def main(args: list[str] | None = None) -> dict:
    """Run the comparison; returns what it writes to `<output_dir>/results.json`."""
    parser = HfArgumentParser((StudyArguments, TrainArguments, ModelArguments))
    study, train, model_args = parser.parse_args_into_dataclasses(args=args)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    if study.plot_from:
        return replot(study)
    if study.merge_from:
        return merge(study)
    preset = apply_preset(study, train, model_args)
    if train.torch_threads and not torch.cuda.is_available():
        torch.set_num_threads(train.torch_threads)
    arms = build_arms(study)
    os.makedirs(study.output_dir, exist_ok=True)
    total_start = time.perf_counter()
    start = time.perf_counter()
    data = vision_data(study, train, model_args) if study.task == "vision" else language_data(study, train, model_args)
    data_seconds = time.perf_counter() - start
    sizes = {
        key: int(len(value[1]) if study.task == "vision" else value.shape[0])
        for key, value in data.items()
        if key in ("train", "validation", "test")
    }
    logger.info(f"data: {sizes} ({data_seconds:.0f}s); arms: {[arm.name for arm in arms]}; seeds: {study.seeds}")

    results = {
        "command": " ".join(["python", "scripts/compare_moe_moge.py", *(args if args is not None else sys.argv[1:])]),
        "study": asdict(study),
        "train": asdict(train),
        "model": asdict(model_args),
        "preset_values_used": preset,
        "arms": [asdict(arm) for arm in arms],
        "data_sizes": sizes,
        "data_seconds": data_seconds,
        "hardware": hardware(),
        "runs": [],
    }
    if study.task == "language":
        results["language_tokens"] = data["num_tokens"]
        results["vocab_size"] = data["vocab_size"]
    path = os.path.join(study.output_dir, "results.json")
    for seed in study.seeds:
        for arm in arms:
            results["runs"].append(run_arm(study, train, model_args, arm, seed, data))
            results["summary"] = summarize(study, results["runs"], arms)
            results["paired"] = paired_differences(study, results["runs"])
            results["total_seconds"] = time.perf_counter() - total_start
            write_json(path, results)
    table = format_table(study, results["runs"], results["summary"], results["paired"])
    results["table_markdown"] = table
    results["figures"] = write_plots(study, results["runs"], results["summary"], arms) if study.write_plots else []
    results["total_seconds"] = time.perf_counter() - total_start
    write_json(path, results)
    print(table)
    print(f"\nwrote {path} and {len(results['figures'])} PNGs; total {results['total_seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main()
