#!/usr/bin/env python
r"""Train and evaluate a MoGE image classifier (ViT MoGE, or any MoGE family with an image-classification model) with
`Trainer`.

The model is built from scratch (`--model_type`, default `vit_moge`: the family's small architecture for 32x32
images, changed with the config arguments below or `--config_overrides`), upcycled from a dense model of a MoGE
family (`--dense_model_name_or_path`, e.g. a ViT or a Swin, see `from_dense`), or loaded from a saved MoGE model
(`--model_name_or_path`). The images come from a Hub data set (`--dataset_name`), `imagefolder`
folders (`--train_dir`, optional `--validation_dir`: one sub-folder per class), or Parquet / CSV / JSON / Arrow files
(`--train_file`, optional `--validation_file`). The image and label columns are found by their features (`Image`,
`ClassLabel`) or common names, or given with `--image_column_name` / `--label_column_name`. Without a validation set,
`--train_val_split` of the training images are held out. Every output folder gets `run_record.json`: what the run
trained and evaluated on (data set, folder or file, split, part, number of images; `--train_data_description` says
what local images are), from which the model cards (`--push_to_hub`, `scripts/push_to_hub.py`) are rendered.

Training images are randomly cropped (with padding) and flipped (drawn from the seed, the epoch and the example's
index, so a resumed run augments exactly as an uninterrupted one); all are resized to the model's image size and
normalized with the mean and std of a `ViTImageProcessor`, which is saved with the model. Accuracy comes from
`evaluate.load("accuracy")`, or, when that cannot be loaded (it needs the Hub), is computed directly.

`--moge_loss_coef 0` is the plain MoE baseline; `--compare_moe_baseline` trains that baseline too, with the same
seed, data and steps (in `<output_dir>/moe_baseline`), and prints both arms side by side.

Example (CIFAR-10 from Parquet files):

```bash
python scripts/run_image_classification.py --train_file path/to/cifar10/train.parquet \
    --validation_file path/to/cifar10/test.parquet --output_dir runs/vit_cifar10 \
    --num_experts 32 --num_experts_per_tok 1 --moge_map_shape 4 8 --moe_layers 4 5 \
    --moge_loss_coef 0.003 --moge_reduction paper --moge_sigma_schedule 10 1 0.2 --max_steps 2000
```

It runs with `python` and with `accelerate launch`.
"""

import json
import logging
import math
import os
import random
import socket
import sys
from dataclasses import dataclass, field
from urllib.parse import urlparse

import datasets
import numpy as np
import torch
import transformers
from datasets import ClassLabel, DatasetDict, Value, load_dataset
from transformers import (
    AutoImageProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTImageProcessor,
    set_seed,
)

from moge_hf.hub import add_moge_hub_callback
from moge_hf.moge_model import EXPERTS_IMPLEMENTATIONS, MoGEHost, hosts_with
from moge_hf.run_record import hub_data, local_data, script_run_record
from moge_hf.training import (
    EngineArguments,
    MoGEArguments,
    add_moge_callback,
    baseline_training_args,
    check_local_source,
    check_run_arguments,
    check_same_format,
    dropout_fields,
    main_arm_name,
    parse_script_arguments,
    scratch_config,
    script_host,
    script_parser,
    shard_with_engine,
    train_and_evaluate,
)


logger = logging.getLogger(__name__)

AUTO_CLASS = "AutoModelForImageClassification"
DEFAULT_MODEL_TYPE = "vit_moge"
# Config fields settable by their own argument on a model built from scratch (others: `--config_overrides`); the
# default architecture is the family's small one (its record's `small_config`).
SCRATCH_FIELDS = (
    "image_size",
    "patch_size",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
)
IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values", "picture", "photo")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target", "category")
IMAGE_FEATURE = datasets.Image()  # decodes the undecoded image values (`decode_image`)
FILE_LOADERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


@dataclass
class ModelArguments(MoGEArguments, EngineArguments):
    """Which model to train: from scratch (config arguments), upcycled from a dense model, or a saved MoGE model."""

    model_type: str | None = field(
        default=None,
        metadata={
            "help": f"The MoGE family of a model built from scratch: one of {sorted(hosts_with(AUTO_CLASS))} "
            f"(default {DEFAULT_MODEL_TYPE}). A loaded or upcycled model's folder says its own."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved MoGE image classifier (folder or Hub id) to train further. Default: from scratch."},
    )
    dense_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A dense model of a MoGE family (folder or Hub id: a ViT, a Swin, ...) to upcycle with "
            "`from_dense`: every expert starts as a copy of its layer's MLP. Its image processor is used if it has "
            "one."
        },
    )
    expert_noise_std: float = field(
        default=0.0, metadata={"help": "Upcycling only: relative std of the noise added to each expert copy."}
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "An image processor (folder or Hub id). Default: the model's, else a new ViTImageProcessor."
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "From scratch: image side (default 32)."})
    patch_size: int | None = field(default=None, metadata={"help": "From scratch: patch side (ViT default 4)."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "From scratch: ViT layers (default 6)."})
    hidden_size: int | None = field(default=None, metadata={"help": "From scratch: ViT hidden size (default 192)."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "From scratch: ViT heads (default 3)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "From scratch: ViT MLP size (default 768)."})
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "From scratch: other config fields as `name=value` pairs separated by commas, values as Python "
            "literals, e.g. `embed_dim=48,depths=[2,2,2],num_heads=[3,6,12],window_size=4` for a Swin MoGE."
        },
    )
    dropout: float | None = field(
        default=None,
        metadata={
            "help": "Sets the family's dropout rates (ViT: hidden_dropout_prob and attention_probs_dropout_prob; from "
            "scratch default 0.0; a loaded or upcycled model keeps its own unless given)."
        },
    )
    experts_implementation: str | None = field(
        default=None,
        metadata={
            "help": f"Experts implementation, one of {EXPERTS_IMPLEMENTATIONS} (default `eager`: moge_hf's own, "
            "the fastest on a CPU; `moge_triton` is the fused Triton kernel for a GPU)."
        },
    )
    compare_moe_baseline: bool = field(
        default=False,
        metadata={
            "help": "Also train the lambda = 0 MoE baseline with the same seed, data and steps in "
            "<output_dir>/moe_baseline, and print both arms' accuracy."
        },
    )


@dataclass
class DataArguments:
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub data set name, e.g. `cifar10`."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, if any."})
    train_dir: str | None = field(
        default=None, metadata={"help": "An `imagefolder` of training images: one sub-folder per class."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "An `imagefolder` of validation images."})
    train_file: str | None = field(
        default=None, metadata={"help": "Training images in a .parquet, .csv, .json(l) or .arrow file."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation images, same format."})
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Without a validation (or test) split: the fraction of training images held out."},
    )
    train_data_description: str | None = field(
        default=None,
        metadata={
            "help": "What the training images are, in words (e.g. `CIFAR-10, 32x32 photos`), for the run record "
            "(run_record.json in the output folder) and the model card."
        },
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column of the images (default: the `Image` feature, else a common name)."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Column of the labels (default: the `ClassLabel` feature, else `label`, ...)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation images."})


# ----------------------------------------------------------------------------------------------------------------
# Checks of the input, before any data is loaded or any model trained
# ----------------------------------------------------------------------------------------------------------------


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub can be reached (a quick TCP connection), so that offline runs fail fast."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def check_arguments(model_args: ModelArguments, data_args: DataArguments) -> None:
    """Raise a `ValueError` (or `FileNotFoundError`) naming the bad argument, before anything is loaded."""
    if model_args.model_name_or_path and model_args.dense_model_name_or_path:
        raise ValueError("Pass either --model_name_or_path (a MoGE model) or --dense_model_name_or_path, not both.")
    if model_args.model_name_or_path or model_args.dense_model_name_or_path:
        given = [name for name in (*SCRATCH_FIELDS, "config_overrides") if getattr(model_args, name) is not None]
        if given:
            raise ValueError(f"--{given[0]} only applies to a model built from scratch; the loaded model sets it.")
    if model_args.model_name_or_path:
        given = model_args.shape_changing_overrides()
        if given:
            raise ValueError(f"--{given[0]} changes weight shapes and cannot be changed on a saved MoGE model.")
    implementation = model_args.experts_implementation
    if implementation is not None and implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown --experts_implementation {implementation!r}; choose one of {', '.join(EXPERTS_IMPLEMENTATIONS)}."
        )
    for name in ("model_name_or_path", "dense_model_name_or_path", "image_processor_name"):
        check_local_source(f"--{name}", getattr(model_args, name))
    model_host(model_args)  # the family: known, and not contradicted by --model_type
    sources = [name for name in ("dataset_name", "train_dir", "train_file") if getattr(data_args, name)]
    if len(sources) != 1:
        raise ValueError(
            "Pass exactly one image source: --dataset_name NAME, --train_dir FOLDER (an imagefolder) or "
            f"--train_file FILE (e.g. path/to/cifar10/train.parquet); got {sources or 'none'}."
        )
    if data_args.validation_dir and not data_args.train_dir:
        raise ValueError("--validation_dir goes with --train_dir.")
    if data_args.validation_file and not data_args.train_file:
        raise ValueError("--validation_file goes with --train_file.")
    for name in ("train_dir", "validation_dir"):
        path = getattr(data_args, name)
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"--{name} {path!r} does not exist or is not a folder.")
    for name in ("train_file", "validation_file"):
        path = getattr(data_args, name)
        if path is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--{name} {path!r} does not exist or is not a file.")
            if os.path.getsize(path) == 0:
                raise ValueError(f"--{name} {path!r} is empty.")
            if os.path.splitext(path)[1].lower() not in FILE_LOADERS:
                raise ValueError(f"--{name} {path!r} must be one of {', '.join(FILE_LOADERS)} files.")
    check_same_format(data_args.train_file, data_args.validation_file, FILE_LOADERS)
    if not 0 < data_args.train_val_split < 1:
        raise ValueError(f"--train_val_split must be in (0, 1), got {data_args.train_val_split}.")
    try:
        import PIL  # noqa: F401  (datasets decodes images with Pillow)
    except ImportError as error:
        raise ImportError("Images need Pillow: pip install Pillow") from error


def model_host(model_args: ModelArguments) -> MoGEHost:
    """The MoGE family of the saved or dense model given, else of `--model_type` (default `vit_moge`)."""
    return script_host(AUTO_CLASS, DEFAULT_MODEL_TYPE, model_args)


def scratch_model_config(model_args: ModelArguments, labels: list[str]):
    """The config of a model built from scratch (see `moge_hf.training.scratch_config`); invalid values raise its
    `ValueError`."""
    given = {name: getattr(model_args, name) for name in SCRATCH_FIELDS if getattr(model_args, name) is not None}
    return scratch_config(
        model_host(model_args),
        given,
        model_args.config_overrides,
        dropout=model_args.dropout if model_args.dropout is not None else 0.0,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        **model_args.moge_overrides(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_image_datasets(data_args: DataArguments, seed: int) -> DatasetDict:
    """`train` and `validation` splits: the data set's own (`validation`, else `test`), or held out of `train`."""
    if data_args.dataset_name is not None:
        name = data_args.dataset_name
        if not os.path.exists(name) and not hub_reachable():
            raise ConnectionError(
                f"--dataset_name {name!r}: the Hugging Face Hub cannot be reached from here (no network, or "
                "HF_HUB_OFFLINE=1) and it is not a local folder. Pass local images with --train_dir or --train_file "
                "(e.g. --train_file path/to/cifar10/train.parquet)."
            )
        try:
            raw = load_dataset(name, data_args.dataset_config_name)
        except (ConnectionError, FileNotFoundError, OSError) as error:
            raise ConnectionError(f"Could not load --dataset_name {name!r}: {error}") from error
    elif data_args.train_dir is not None:
        data_files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        raw = load_dataset("imagefolder", data_files=data_files)
    else:
        data_files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        loader = FILE_LOADERS[os.path.splitext(data_args.train_file)[1].lower()]
        raw = load_dataset(loader, data_files=data_files)

    # What the run record (`moge_hf.run_record`) says of the training and the evaluation images: their source, then
    # which split and which part of it.
    description = data_args.train_data_description
    if data_args.dataset_name is not None:
        if os.path.exists(data_args.dataset_name):  # a local data set folder, not a Hub id
            train_source = {"path": data_args.dataset_name, "description": description}
        else:
            train_source = {"dataset": data_args.dataset_name, "config": data_args.dataset_config_name}
            train_source["description"] = description
        eval_source = train_source
    else:  # local files or folders, each one split
        train_source = {"path": data_args.train_dir or data_args.train_file, "description": description}
        eval_path = data_args.validation_dir or data_args.validation_file
        eval_source = {"path": eval_path} if eval_path else train_source
    named_splits = data_args.dataset_name is not None  # a data set's splits have names; a local file or folder is one
    train = {**train_source, "split": "train" if named_splits else None}
    if "validation" in raw:
        evaluation = {**eval_source, "split": "validation" if named_splits else None}
    elif "test" in raw:
        raw["validation"] = raw.pop("test")
        evaluation = {**eval_source, "split": "test"}
    else:
        fraction = data_args.train_val_split
        split = raw["train"].train_test_split(test_size=fraction, seed=seed)
        raw = DatasetDict(train=split["train"], validation=split["test"])
        total = len(split["train"]) + len(split["test"])  # the split rounds the fraction to whole images

        def share(count: int) -> str:
            return f"{100 * count / total:.3g}%"

        held_out = f"a random {share(len(split['test']))} of the images (seed {seed}), held out"
        evaluation = {**train, "part": held_out}
        train["part"] = f"the {share(len(split['train']))} of the images not held out for evaluation (seed {seed})"
    raw = DatasetDict(train=raw["train"], validation=raw["validation"])
    if data_args.max_train_samples is not None:
        raw["train"] = (
            raw["train"].shuffle(seed=seed).select(range(min(len(raw["train"]), data_args.max_train_samples)))
        )
        if len(raw["train"]) == data_args.max_train_samples:
            train["part"] = f"a random {len(raw['train'])} images (seed {seed})" + (
                f" of {train['part']}" if train.get("part") else ""
            )
    if data_args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(len(raw["validation"]), data_args.max_eval_samples)))
        if len(raw["validation"]) == data_args.max_eval_samples:
            evaluation["part"] = f"the first {len(raw['validation'])} images" + (
                f" of {evaluation['part']}" if evaluation.get("part") else ""
            )
    data_args.recorded_data = tuple(  # the run record's entries of the training and the evaluation images
        (hub_data if "dataset" in fields else local_data)(**fields, examples=len(raw[name]), unit="images")
        for fields, name in ((train, "train"), (evaluation, "validation"))
    )
    return raw


def find_columns(raw: DatasetDict, data_args: DataArguments) -> tuple[str, str]:
    """The image and label columns: given, else by feature type (`Image`, `ClassLabel`), else by common names."""
    features = raw["train"].features
    columns = list(features)

    def pick(given: str | None, feature_type: type, names: tuple[str, ...], flag: str) -> str | None:
        if given is not None:
            if given not in columns:
                raise ValueError(f"--{flag} {given!r} is not a column of the training images {columns}.")
            return given
        typed = [name for name in columns if isinstance(features[name], feature_type)]
        if typed:
            return typed[0]
        return next((name for name in names if name in columns), None)

    image_column = pick(data_args.image_column_name, datasets.Image, IMAGE_COLUMN_NAMES, "image_column_name")
    if image_column is None:
        raise ValueError(
            f"Found no image column among {columns}: no `Image` feature and none of {IMAGE_COLUMN_NAMES}. Pass "
            "--image_column_name."
        )
    label_column = pick(data_args.label_column_name, ClassLabel, LABEL_COLUMN_NAMES, "label_column_name")
    if label_column is None or label_column == image_column:
        hint = (
            "put the images of each class in a sub-folder named after the class"
            if data_args.train_dir
            else "pass --label_column_name"
        )
        raise ValueError(
            f"The image data set has no labels: its columns are {columns}, with no `ClassLabel` feature and none of "
            f"{LABEL_COLUMN_NAMES}. For classification every image needs a label: {hint}."
        )
    for split, dataset in raw.items():
        if label_column not in dataset.column_names or image_column not in dataset.column_names:
            raise ValueError(
                f"The {split} images lack the column {label_column!r} or {image_column!r}: {dataset.column_names}"
            )
    return image_column, label_column


def image_files(raw: DatasetDict, image_column: str) -> DatasetDict:
    """The image column as undecoded `datasets.Image` values (`{bytes, path}`), decoded one by one by
    [`decode_image`] when an example is drawn: a column of encoded bytes, `{bytes, path}` records or file paths
    (Parquet written by pandas, say) is taken as images; anything else is refused, naming it."""
    for split, dataset in raw.items():
        feature = dataset.features[image_column]
        try:
            raw[split] = dataset.cast_column(image_column, datasets.Image(decode=False))
        except (TypeError, ValueError, NotImplementedError) as error:  # pyarrow's cast errors are among them
            raise ValueError(
                f"The image column {image_column!r} of the {split} images holds {feature}, not images (an `Image` "
                f"feature, encoded image bytes or file paths): {error}"
            ) from error
    return raw


def decode_image(value: dict):
    """The PIL image of an undecoded `datasets.Image` value, decoded by `datasets`; a file PIL cannot read (truncated,
    corrupt) raises a `ValueError` naming it."""
    try:
        return IMAGE_FEATURE.decode_example(value)
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for a broken file
        where = value.get("path") if isinstance(value, dict) else None
        raise ValueError(f"The image {where or '(stored as bytes, no file name)'} cannot be read: {error}") from error


def class_names(raw: DatasetDict, label_column: str) -> tuple[DatasetDict, list[str]]:
    """The class names, with string labels encoded as a `ClassLabel` and both splits sharing its names."""
    column = {split: dataset[label_column] for split, dataset in raw.items()}  # read once, checked, then used
    for split, labels in column.items():
        missing = next((row for row, label in enumerate(labels) if label is None), None)
        if missing is not None:
            raise ValueError(f"The label column {label_column!r} of the {split} images has no label in row {missing}.")
    feature = raw["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        other = raw["validation"].features[label_column]
        if isinstance(other, ClassLabel) and list(other.names) != names:
            raise ValueError(
                f"The training and validation images have different classes: {names} and {list(other.names)}."
            )
        return raw, names
    if feature.dtype in ("string", "large_string"):
        names = sorted(set(column["train"]) | set(column["validation"]))
        label = ClassLabel(names=names)
        raw = DatasetDict({split: ds.cast_column(label_column, label) for split, ds in raw.items()})
        return raw, names
    if feature.dtype.startswith("int"):
        values = set(column["train"]) | set(column["validation"])
        if min(values) < 0:
            raise ValueError(f"Integer labels must be >= 0, found {min(values)} in {label_column!r}.")
        return raw, [str(i) for i in range(max(values) + 1)]
    raise ValueError(f"The label column {label_column!r} holds {feature}, not class labels (ints or strings).")


def match_saved_classes(
    raw: DatasetDict, label_column: str, labels: list[str], model_args: ModelArguments, do_train: bool
) -> tuple[DatasetDict, list[str]]:
    """A saved classifier (`--model_name_or_path`) keeps its classes: images of the same classes get its ids (the data
    may list them in another order); images of other classes get a new classifier head to train, and are refused for
    an evaluation-only run, which would score a head that does not know them."""
    if not model_args.model_name_or_path:
        return raw, labels
    id2label = PreTrainedConfig.get_config_dict(model_args.model_name_or_path)[0].get("id2label") or {}
    saved = [id2label.get(str(index), id2label.get(index)) for index in range(len(id2label))]
    if saved == labels:
        return raw, labels
    if sorted(map(str, saved)) == sorted(labels):
        new_id = [saved.index(name) for name in labels]
        logger.info(f"The images' classes get the ids {model_args.model_name_or_path} gives them: {saved[:10]}")
        raw = DatasetDict(
            {
                split: dataset.cast_column(label_column, Value("int64")).map(
                    lambda batch: {label_column: [new_id[label] for label in batch[label_column]]}, batched=True
                )
                for split, dataset in raw.items()
            }
        )
        return raw, saved
    problem = (
        f"--model_name_or_path {model_args.model_name_or_path} classifies into {len(saved)} classes "
        f"({', '.join(map(str, saved[:10]))}{' ...' if len(saved) > 10 else ''}), the images have {len(labels)} "
        f"({', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''})"
    )
    if not do_train:
        raise ValueError(f"{problem}: its classifier head does not know them, so an evaluation-only run is refused.")
    logger.warning(f"{problem}: a new classifier head is trained for the images' classes.")
    return raw, labels


class AugmentationEpoch(TrainerCallback):
    """Tells the training transform which epoch Trainer is in (`on_epoch_begin`, also when a run resumes), so that an
    example's augmentation is a function of (seed, epoch, index) alone and a resumed run sees the same crops and flips
    as an uninterrupted one."""

    def __init__(self):
        # In shared memory: dataloader workers (persistent ones too) read the value the main process sets.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch.fill_(int(state.epoch or 0))


def augmentation_draws(seed: int, epoch: int, index: int, padding: int) -> tuple[int, int, bool]:
    """`(top, left, flip)` of one training example's random crop and flip, drawn from (seed, epoch, index) alone."""
    rng = random.Random(f"{seed}-{epoch}-{index}")  # a string seed: the same in every process and Python run
    return rng.randint(0, 2 * padding), rng.randint(0, 2 * padding), rng.random() < 0.5


def image_transforms(processor: ViTImageProcessor, seed: int, epoch: AugmentationEpoch):
    """`(train, eval)` transforms: `train(image, index)` and `eval(image)` give a normalized `(3, H, W)` float tensor
    of an image as the data set stores it (an undecoded `datasets.Image` value, decoded by [`decode_image`]).

    Training: resize, random crop with zero padding of 1/8 of the side, horizontal flip, drawn from (seed, epoch,
    example index) by [`augmentation_draws`]. Evaluation: resize. Both normalize with the processor's mean and std.
    torchvision resizes if installed, else plain torch.
    """
    size = processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    mean = torch.tensor(processor.image_mean).view(-1, 1, 1)
    std = torch.tensor(processor.image_std).view(-1, 1, 1)
    padding = max(1, min(height, width) // 8)
    try:
        from torchvision import transforms as T
    except ImportError:  # plain torch
        T = None

    def to_tensor(value: dict) -> torch.Tensor:
        image = decode_image(value).convert("RGB")
        if T is not None:
            return T.functional.to_tensor(T.functional.resize(image, [height, width]))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
        if pixels.shape[1:] != (height, width):
            pixels = torch.nn.functional.interpolate(
                pixels[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False
            )[0].clamp(0, 1)
        return pixels

    def train(image, index: int) -> torch.Tensor:
        top, left, flip = augmentation_draws(seed, epoch.epoch, index, padding)
        pixels = torch.nn.functional.pad(to_tensor(image), (padding,) * 4)
        pixels = pixels[:, top : top + height, left : left + width]
        if flip:
            pixels = pixels.flip(-1)
        return (pixels - mean) / std

    def evaluate(image) -> torch.Tensor:
        return (to_tensor(image) - mean) / std

    return train, evaluate


INDEX_COLUMN = "__example_index"  # added to the training split: the augmentation is drawn per example


def with_transforms(
    raw: DatasetDict,
    processor: ViTImageProcessor,
    image_column: str,
    label_column: str,
    seed: int,
    epoch: AugmentationEpoch,
) -> DatasetDict:
    """The splits as `{"pixel_values", "labels"}` examples, transformed on the fly (augmented for training)."""
    train_transform, eval_transform = image_transforms(processor, seed, epoch)

    def train(batch: dict) -> dict:
        pixels = [train_transform(image, index) for image, index in zip(batch[image_column], batch[INDEX_COLUMN])]
        return {"pixel_values": pixels, "labels": batch[label_column]}

    def evaluate(batch: dict) -> dict:
        return {
            "pixel_values": [eval_transform(image) for image in batch[image_column]],
            "labels": batch[label_column],
        }

    train_split = raw["train"].add_column(INDEX_COLUMN, list(range(len(raw["train"]))))
    return DatasetDict(train=train_split.with_transform(train), validation=raw["validation"].with_transform(evaluate))


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Model, metrics, training
# ----------------------------------------------------------------------------------------------------------------


def build_model(model_args: ModelArguments, config, overrides: dict, labels: list[str]) -> PreTrainedModel:
    """From scratch (`config`), upcycled from the dense model, or loaded; then the experts implementation."""
    host = model_host(model_args)
    model_class = host.heads[AUTO_CLASS].model_class
    label_fields = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    if model_args.dense_model_name_or_path:
        model = model_class.from_dense(
            model_args.dense_model_name_or_path,
            expert_noise_std=model_args.expert_noise_std,
            **label_fields,
            **dropout_fields(host, model_args.dropout),
            **overrides,
        )
    elif model_args.model_name_or_path:
        model = model_class.from_pretrained(
            model_args.model_name_or_path,
            **label_fields,
            **dropout_fields(host, model_args.dropout),
            **overrides,
            ignore_mismatched_sizes=True,
        )
    else:
        model = model_class(config)
    if model_args.experts_implementation is not None:
        model.set_experts_implementation(model_args.experts_implementation)
    return model


def load_image_processor(name_or_path: str) -> ViTImageProcessor:
    """`AutoImageProcessor.from_pretrained`, or `ViTImageProcessor`'s where the Auto class needs torchvision (as in
    some transformers versions when torchvision is not installed)."""
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except ImportError:
        return ViTImageProcessor.from_pretrained(name_or_path)


def get_image_processor(model_args: ModelArguments, image_size: int) -> ViTImageProcessor:
    """`--image_processor_name`, else the loaded model's processor, else a new `ViTImageProcessor` for `image_size`."""
    if model_args.image_processor_name:
        return load_image_processor(model_args.image_processor_name)
    source = model_args.model_name_or_path or model_args.dense_model_name_or_path
    if source is not None:
        try:
            return load_image_processor(source)
        except (OSError, ValueError):
            logger.info(
                f"{source} has no image processor: using a new ViTImageProcessor for {image_size}x{image_size}"
            )
    return ViTImageProcessor(size={"height": image_size, "width": image_size})


def accuracy_metric():
    """`compute(predictions=..., references=...)` of `evaluate.load("accuracy")`, or the same computed directly."""
    import evaluate
    from huggingface_hub import constants

    if hub_reachable() or constants.HF_HUB_OFFLINE:  # online, or offline with a possibly cached copy: fails fast
        try:
            metric = evaluate.load("accuracy")
            return metric.compute
        except Exception as error:  # noqa: BLE001  (any failure: fall back)
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    else:
        reason = "the Hugging Face Hub cannot be reached"
    logger.warning(
        f'evaluate.load("accuracy") is not available ({reason}); computing accuracy directly as the fraction of '
        "correct predictions (the same metric)."
    )

    def compute(predictions, references) -> dict[str, float]:
        return {"accuracy": float((np.asarray(predictions) == np.asarray(references)).mean())}

    return compute


def run_arm(
    name: str,
    model: PreTrainedModel,
    training_args: TrainingArguments,
    processor: ViTImageProcessor,
    image_datasets: DatasetDict,
    accuracy,
    main_arm: bool = True,
    augmentation_epoch: AugmentationEpoch | None = None,
    recorded_data: tuple[dict, dict] | None = None,
    engine_args: EngineArguments | None = None,
) -> dict[str, float]:
    """Train, save and evaluate one model with `Trainer` (and the MoGE sigma-schedule callback); return its metrics.
    With `engine_args` asking for it, the model is first sharded by transformers' distributed engine."""
    if engine_args is not None:
        model = shard_with_engine(model, engine_args, training_args, log=logger)
    config = model.config
    logger.info(
        f"[{name}] {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{config.moge_num_layers} "
        f"layers, MoGE layers {config.moe_layers}: {config.num_experts} experts top-{config.num_experts_per_tok} on "
        f"a {'x'.join(map(str, config.moge_resolved_map_shape))} map, moge_loss_coef={config.moge_loss_coef}, "
        f"moge_sigma_schedule={config.moge_sigma_schedule}, experts_implementation={config._experts_implementation}"
    )

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return accuracy(predictions=np.argmax(logits, axis=-1), references=eval_prediction.label_ids)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=image_datasets["train"] if training_args.do_train else None,
        eval_dataset=image_datasets["validation"] if training_args.do_eval else None,
        processing_class=processor,
        data_collator=collate_fn,
        compute_metrics=compute_metrics,
        callbacks=[augmentation_epoch] if augmentation_epoch is not None else None,
    )
    add_moge_callback(trainer)
    # What this run trains and evaluates on (run_record.json in the output folder, written as it comes true): the
    # model cards read it.
    train_data, eval_data = recorded_data or (None, None)
    record = script_run_record(
        trainer,
        script="run_image_classification.py",
        train=train_data if training_args.do_train else None,
        eval=eval_data if training_args.do_eval else None,
    )
    if training_args.push_to_hub:  # Trainer's pushes then carry the model code and a MoGE model card
        add_moge_hub_callback(trainer, run_record=record)

    return train_and_evaluate(
        trainer,
        name,
        len(image_datasets["train"]),
        len(image_datasets["validation"]),
        log=logger,
        main_arm=main_arm,
        run_record=record,
    )


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def print_comparison(rows: list[tuple[str, float, dict]], output_dir: str) -> None:
    """Print the arms' eval accuracy and loss as a table and save them as `comparison.json`."""
    lines = [
        "| arm | lambda (moge_loss_coef) | eval accuracy | eval loss | moge_loss (unscaled, last train log) |",
        "| --- | --- | --- | --- | --- |",
    ]
    table = []
    for name, coef, metrics in rows:
        nan = float("nan")
        row = {
            "arm": name,
            "moge_loss_coef": coef,
            "eval_accuracy": metrics.get("eval_accuracy", nan),
            "eval_loss": metrics.get("eval_loss", nan),
            "train_moge_loss_last_log": metrics.get("train_moge_loss_last_log", nan),
        }
        lines.append(
            f"| {name} | {coef:g} | {row['eval_accuracy']:.4f} | {row['eval_loss']:.4f} "
            f"| {_fmt(row['train_moge_loss_last_log'])} |"
        )
        table.append(row)
    print("\n" + "\n".join(lines) + "\n", flush=True)
    with open(os.path.join(output_dir, "comparison.json"), "w") as f:
        json.dump(table, f, indent=2)


def main(args: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Parse `args` (default: the command line), train and evaluate; return the metrics of each arm."""
    parser = script_parser((ModelArguments, DataArguments, TrainingArguments), __doc__)
    # Neither --do_train nor --do_eval: both; refused: evaluation during training without training, and options under
    # which Trainer would not train the routing losses (--label_smoothing_factor).
    model_args, data_args, training_args = parse_script_arguments(parser, args)
    model_args.check(training_args)  # sharding by transformers' distributed engine (--ep_size / --fsdp_size)
    training_args.remove_unused_columns = False  # the transforms need the image column

    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # nothing to pin to (and torch warns about it)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    # Everything that can be checked before the images are read: the arguments, the paths, the MoGE config values
    # (a model built from scratch is checked through its config; an upcycled or saved one is built once the
    # classes are known, still before training).
    check_arguments(model_args, data_args)
    check_run_arguments(model_args, data_args, training_args)
    overrides = model_args.moge_overrides()
    from_scratch = not (model_args.model_name_or_path or model_args.dense_model_name_or_path)
    if from_scratch:
        model_args.check_experts(scratch_model_config(model_args, labels=["a", "b"]).num_experts)

    with training_args.main_process_first(desc="loading the images"):
        raw = load_image_datasets(data_args, training_args.seed)
    image_column, label_column = find_columns(raw, data_args)
    raw = image_files(raw, image_column)
    raw, labels = class_names(raw, label_column)
    raw, labels = match_saved_classes(raw, label_column, labels, model_args, training_args.do_train)
    accuracy = accuracy_metric() if training_args.do_eval else None
    logger.info(
        f"{len(raw['train'])} training and {len(raw['validation'])} validation images, columns "
        f"{image_column!r} / {label_column!r}, {len(labels)} classes: {', '.join(labels[:10])}"
        + (" ..." if len(labels) > 10 else "")
    )

    arms = [(True, overrides, training_args)]
    if model_args.compare_moe_baseline:
        arms.append((False, {**overrides, "moge_loss_coef": 0.0}, baseline_training_args(training_args)))
    results, rows = {}, []
    for main_arm, arm_overrides, arm_args in arms:
        set_seed(training_args.seed)  # the same initial weights and augmentations in every arm
        config = None
        if from_scratch:
            config = scratch_model_config(model_args, labels)
            config.moge_loss_coef = arm_overrides.get("moge_loss_coef", config.moge_loss_coef)
        model = build_model(model_args, config, arm_overrides, labels)
        processor = get_image_processor(model_args, model.config.image_size)
        epoch = AugmentationEpoch()
        image_datasets = with_transforms(raw, processor, image_column, label_column, training_args.seed, epoch)
        name = main_arm_name(model.config.moge_loss_coef) if main_arm else "MoE baseline"
        recorded = getattr(data_args, "recorded_data", None)  # set by `load_image_datasets`
        results[name] = run_arm(
            name, model, arm_args, processor, image_datasets, accuracy, main_arm, epoch, recorded, model_args
        )
        rows.append((name, float(model.config.moge_loss_coef), results[name]))
        del model
    if training_args.do_eval and training_args.process_index == 0:
        print_comparison(rows, training_args.output_dir)
    return results


if __name__ == "__main__":
    main()
