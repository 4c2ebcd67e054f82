#!/usr/bin/env python
r"""Train and evaluate a MoGE language model (GPT-2 MoGE, or any MoGE family with a causal LM) on a text data set with
`Trainer`.

The model is built from scratch (`--model_type`, default `gpt2_moge`: the family's small architecture, changed with
the config arguments below or `--config_overrides`), upcycled from a dense model of a MoGE family
(`--dense_model_name_or_path`, e.g. a GPT-2, see `from_dense`), or loaded from a saved MoGE model
(`--model_name_or_path`). A dense Llama, Mistral, Qwen2 or Qwen3 causal LM given as `--dense_model_name_or_path` is
upcycled into its MoE sibling in transformers (`moge_hf.upcycle_to_moe`: Mixtral, Qwen2-MoE, Qwen3-MoE; with
`--num_experts`, `--num_experts_per_tok`, `--expert_noise_std`) and trained as a loaded one is.
`--model_name_or_path` may also be a transformers MoE language model (Qwen3-MoE, OLMoE,
Mixtral, ...): it is fine-tuned with the MoGE regularizer (`moge_hf.add_moge_regularizer`, the `--moge_*` fields of
the regularizer only). The text is a Hub data set (`--dataset_name`) or local text files (`--train_file`, optional
`--validation_file`; without one, the last `--validation_split_percentage` percent of the training lines are held
out). The tokenizer is `--tokenizer_name`, else the loaded or dense model's (a folder without one is refused: a new
vocabulary would not fit its embeddings), else, for a model built from scratch, a byte-level BPE trained on the
training text and saved with the model. Texts are concatenated and cut into `--block_size` blocks. Evaluation reports
the language modeling loss alone (`eval_lm_loss`, without the routing losses that `eval_loss` includes) and
`perplexity = exp(eval_lm_loss)`. Every output folder gets `run_record.json`: what the run trained and evaluated on
(data set or file, split, part, number of blocks; `--train_data_description` says what local text is), from which
the model cards (`--push_to_hub`, `scripts/push_to_hub.py`) are rendered.

`--moge_loss_coef 0` is the plain MoE baseline; `--compare_moe_baseline` trains that baseline too, with the same
seed, data, tokenizer and steps (in `<output_dir>/moe_baseline`), and prints both arms side by side.

Example (the repository's main job: tiny Shakespeare, a few minutes on a 2-core CPU):

```bash
OMP_NUM_THREADS=1 python scripts/run_clm.py --train_file data/tinyshakespeare/input.txt \
    --output_dir runs/clm_tinyshakespeare --moge_loss_coef 0.1 --moge_sigma_schedule 10 1 0.2 \
    --max_steps 200 --per_device_train_batch_size 16 --learning_rate 2e-3 --warmup_steps 20 \
    --logging_steps 50 --save_steps 100 --compare_moe_baseline
```

The model is the default from-scratch GPT-2 MoGE: 4 layers, hidden 128, 4 heads, layers 1 and 3 MoGE layers with 16
experts top-2 on a 4x4 map (window 3), a byte-level BPE of 2,048 tokens, blocks of 128 tokens.

It runs with `python` and with `accelerate launch`.
"""

import functools
import json
import logging
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from itertools import chain
from urllib.parse import urlparse

import datasets
import torch
import transformers
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from moge_hf import add_moge_regularizer, upcycle_to_moe
from moge_hf.configuration_moge import MOGE_FIELDS
from moge_hf.hub import add_moge_hub_callback
from moge_hf.moge_layer import moge_regularizers
from moge_hf.moge_model import EXPERTS_IMPLEMENTATIONS, HOSTS, MoGEHost, MoGEModelMixin, hosts_with
from moge_hf.routing import moge_routers
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
from moge_hf.transformers_moe import MOGE_REGULARIZER_FIELDS
from moge_hf.upcycling import MOE_SIBLINGS


logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
AUTO_CLASS = "AutoModelForCausalLM"
# The `datasets` loader of each kind of --train_file / --validation_file, and the column types that hold text.
FILE_LOADERS = {".txt": "text", ".text": "text", ".csv": "csv", ".json": "json", ".jsonl": "json"}
TEXT_DTYPES = ("string", "large_string")
DEFAULT_MODEL_TYPE = "gpt2_moge"
# Config fields settable by their own argument on a model built from scratch (others: `--config_overrides`); the
# default architecture is the family's small one (its record's `small_config`: for GPT-2 MoGE, the main job's).
SCRATCH_FIELDS = ("n_layer", "n_embd", "n_head", "n_inner", "n_positions")


@dataclass
class ModelArguments(MoGEArguments, EngineArguments):
    """Which model to train: from scratch (config arguments), upcycled from a dense model, or a saved model."""

    model_type: str | None = field(
        default=None,
        metadata={
            "help": f"The MoGE family of a model built from scratch: one of {sorted(hosts_with(AUTO_CLASS))} "
            f"(default {DEFAULT_MODEL_TYPE}). A loaded or upcycled model's folder says its own."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A saved model (folder or Hub id) to train further: a MoGE language model, or a transformers MoE "
            "causal LM (Qwen3-MoE, OLMoE, Mixtral, ...) given the MoGE regularizer. Default: from scratch."
        },
    )
    dense_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A dense model (folder or Hub id) to upcycle: every expert starts as a copy of its layer's MLP. A "
            "dense model of a MoGE family (a GPT-2) becomes that family's MoGE model (`from_dense`); a Llama, "
            "Mistral, Qwen2 or Qwen3 causal LM becomes its MoE sibling in transformers (`moge_hf.upcycle_to_moe`: "
            "Mixtral, Qwen2-MoE, Qwen3-MoE) given the MoGE regularizer. Its tokenizer is used unless --tokenizer_name "
            "is given."
        },
    )
    expert_noise_std: float = field(
        default=0.0, metadata={"help": "Upcycling only: relative std of the noise added to each expert copy."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer (folder or Hub id). Default: the loaded or dense model's (a folder without one is "
            "refused); for a model built from scratch, a byte-level BPE trained on the training text (see "
            "--vocab_size)."
        },
    )
    vocab_size: int = field(
        default=2048, metadata={"help": "Vocabulary size of the byte-level BPE trained when no tokenizer is given."}
    )
    n_layer: int | None = field(default=None, metadata={"help": "From scratch: GPT-2 layers (default 4)."})
    n_embd: int | None = field(default=None, metadata={"help": "From scratch: GPT-2 hidden size (default 128)."})
    n_head: int | None = field(default=None, metadata={"help": "From scratch: GPT-2 attention heads (default 4)."})
    n_inner: int | None = field(default=None, metadata={"help": "From scratch: GPT-2 MLP size (default 4 * n_embd)."})
    n_positions: int | None = field(
        default=None, metadata={"help": "From scratch: position embeddings (default: --block_size)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "From scratch: other config fields as `name=value` pairs separated by commas, values as Python "
            "literals, e.g. `activation_function=gelu,layer_norm_epsilon=1e-6`."
        },
    )
    dropout: float | None = field(
        default=None,
        metadata={
            "help": "Sets resid_pdrop, embd_pdrop and attn_pdrop (from scratch default 0.0: short runs; a loaded or "
            "upcycled model keeps its own unless given)."
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
            "help": "Also train the lambda = 0 MoE baseline with the same seed, data, tokenizer and steps in "
            "<output_dir>/moe_baseline, and print both arms' eval loss and perplexity."
        },
    )


@dataclass
class DataArguments:
    """Which text to train and evaluate on, and how to cut it into blocks."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub data set name, e.g. `wikitext`."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Its configuration, e.g. `wikitext-2-raw-v1`."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training text (.txt, .csv, .json or .jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation text, same format."})
    validation_split_percentage: int = field(
        default=10,
        metadata={"help": "Without a validation set: the last this-many percent of the training lines are held out."},
    )
    train_data_description: str | None = field(
        default=None,
        metadata={
            "help": "What the training text is, in words (e.g. `the plays of Shakespeare`), for the run record "
            "(run_record.json in the output folder) and the model card."
        },
    )
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the text (default: `text`, else the first column)."}
    )
    block_size: int = field(default=128, metadata={"help": "Length in tokens of each training block."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation blocks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks in .txt files."})


# ----------------------------------------------------------------------------------------------------------------
# Checks of the input, all before any data is loaded or any model trained
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
    for name in ("model_name_or_path", "dense_model_name_or_path", "tokenizer_name"):
        check_local_source(f"--{name}", getattr(model_args, name))
    upcycled_natively = bool(model_args.dense_model_name_or_path) and upcycles_natively(
        model_args.dense_model_name_or_path
    )
    if upcycled_natively or (model_args.model_name_or_path and not is_moge_hf_model(model_args.model_name_or_path)):
        # A transformers MoE model (Qwen3-MoE, OLMoE, Mixtral, ...), loaded or upcycled into: the regularizer's fields
        # and the family's own load-balancing coefficient apply (and, to upcycle, the experts and the top-k).
        allowed = (*MOGE_REGULARIZER_FIELDS, "router_aux_loss_coef")
        allowed += ("num_experts", "num_experts_per_tok") if upcycled_natively else ()
        given = [name for name in model_args.moge_overrides() if name not in allowed]
        if given:
            raise ValueError(
                f"--{given[0]} is a field of moge_hf's own MoGE models; on a transformers MoE model only "
                f"{', '.join('--' + name for name in allowed)} apply."
            )
        if model_args.dropout is not None:
            raise ValueError("--dropout sets GPT-2's dropout rates; it does not apply to a transformers MoE model.")
        if model_args.model_type is not None:
            raise ValueError("--model_type names a MoGE family; it does not apply to a transformers MoE model.")
    else:
        model_host(model_args)  # the family: known, and not contradicted by --model_type
        given = model_args.shape_changing_overrides() if model_args.model_name_or_path else []
        if given:
            raise ValueError(f"--{given[0]} changes weight shapes and cannot be changed on a saved MoGE model.")
    implementation = model_args.experts_implementation
    if implementation is not None and implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown --experts_implementation {implementation!r}; choose one of {', '.join(EXPERTS_IMPLEMENTATIONS)}."
        )
    if model_args.tokenizer_name is None and not model_args.model_name_or_path:
        if not model_args.dense_model_name_or_path and model_args.vocab_size < 257:
            raise ValueError(
                f"--vocab_size must be at least 257 (256 bytes and {END_OF_TEXT}), got {model_args.vocab_size}."
            )
    if data_args.dataset_name is None and data_args.train_file is None:
        raise ValueError(
            "Pass a data set: --dataset_name NAME or --train_file FILE (e.g. data/tinyshakespeare/input.txt)."
        )
    if data_args.dataset_name is not None and data_args.train_file is not None:
        raise ValueError("Pass either --dataset_name or --train_file, not both.")
    if data_args.validation_file is not None and data_args.train_file is None:
        raise ValueError("--validation_file goes with --train_file (a --dataset_name has its own validation split).")
    for name in ("train_file", "validation_file"):
        path = getattr(data_args, name)
        if path is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--{name} {path!r} does not exist or is not a file.")
            if os.path.getsize(path) == 0:
                raise ValueError(f"--{name} {path!r} is empty.")
            if os.path.splitext(path)[1].lower() not in FILE_LOADERS:
                raise ValueError(f"--{name} {path!r} must be a .txt, .csv, .json or .jsonl file.")
    check_same_format(data_args.train_file, data_args.validation_file, FILE_LOADERS)
    if not 0 < data_args.validation_split_percentage < 100:
        raise ValueError(
            f"--validation_split_percentage must be in (0, 100), got {data_args.validation_split_percentage}."
        )
    if data_args.block_size < 2:
        raise ValueError(f"--block_size must be at least 2, got {data_args.block_size}.")


def model_host(model_args: ModelArguments) -> MoGEHost:
    """The MoGE family of the saved or dense MoGE-family model given, else of `--model_type` (default `gpt2_moge`)."""
    return script_host(AUTO_CLASS, DEFAULT_MODEL_TYPE, model_args)


def scratch_model_config(model_args: ModelArguments, data_args: DataArguments, vocab_size: int, eos_id: int):
    """The config of a model built from scratch (see `moge_hf.training.scratch_config`), its context as long as
    `--block_size` unless given; invalid values raise its `ValueError`."""
    host = model_host(model_args)
    given = {name: getattr(model_args, name) for name in SCRATCH_FIELDS if getattr(model_args, name) is not None}
    context = next(
        name for name in ("n_positions", "max_position_embeddings") if name in host.config_class().to_dict()
    )
    given.setdefault(context, data_args.block_size)
    return scratch_config(
        host,
        given,
        model_args.config_overrides,
        dropout=model_args.dropout if model_args.dropout is not None else 0.0,
        vocab_size=vocab_size,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        **model_args.moge_overrides(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Data and tokenizer
# ----------------------------------------------------------------------------------------------------------------


def describe_data(data_args: DataArguments, lm_datasets: DatasetDict) -> tuple[dict, dict]:
    """The run record's entries (`moge_hf.run_record`) of the training and the evaluation blocks: which data set or
    local file, which split and part of it, how many blocks. Follows `load_raw_datasets` and `tokenize_and_group`."""
    pct = data_args.validation_split_percentage
    description = data_args.train_data_description
    if data_args.dataset_name is not None:
        split = getattr(data_args, "dataset_validation_split", None)  # set by `load_raw_datasets`
        if split is not None:  # the data set's own validation split
            train, evaluation = {"split": "train"}, {"split": split}
        else:  # held out of its train split
            train = {"split": "train", "part": f"the first {100 - pct}%"}
            evaluation = {"split": "train", "part": f"the last {pct}%"}
        if os.path.exists(data_args.dataset_name):  # a local data set folder, not a Hub id
            source = {"path": data_args.dataset_name, "description": description}
        else:
            source = {"dataset": data_args.dataset_name, "config": data_args.dataset_config_name}
            source["description"] = description
        train, evaluation = {**source, **train}, {**source, **evaluation}
    elif data_args.validation_file is not None:
        train = {"path": data_args.train_file, "description": description}
        evaluation = {"path": data_args.validation_file}
    else:  # held out of the training file
        lines = "lines" if os.path.splitext(data_args.train_file)[1].lower() in (".txt", ".text") else "rows"
        train = {"path": data_args.train_file, "description": description}
        evaluation = {**train, "part": f"the last {pct}% of the {lines}"}
        train["part"] = f"the first {100 - pct}% of the {lines}"
    entries = []
    for fields, split, limit in (
        (train, "train", data_args.max_train_samples),
        (evaluation, "validation", data_args.max_eval_samples),
    ):
        examples = len(lm_datasets[split])
        if limit is not None and examples == limit:  # `tokenize_and_group` kept only the first `limit` blocks
            fields["part"] = f"the first {examples} blocks" + (f" of {fields['part']}" if fields.get("part") else "")
        make = hub_data if "dataset" in fields else local_data
        entries.append(make(**fields, examples=examples, unit=f"blocks of {data_args.block_size} tokens"))
    return entries[0], entries[1]


def load_raw_datasets(data_args: DataArguments, cache_dir: str | None = None) -> DatasetDict:
    """`train` and `validation` splits of raw text, from the Hub or from local files."""
    pct = data_args.validation_split_percentage
    if data_args.dataset_name is not None:
        if not os.path.exists(data_args.dataset_name) and not hub_reachable():
            raise ConnectionError(
                f"--dataset_name {data_args.dataset_name!r}: the Hugging Face Hub cannot be reached from here (no "
                "network, or HF_HUB_OFFLINE=1) and it is not a local folder. Pass local text with --train_file "
                "(e.g. data/tinyshakespeare/input.txt)."
            )
        name, config = data_args.dataset_name, data_args.dataset_config_name
        try:
            raw = load_dataset(name, config, cache_dir=cache_dir)
            data_args.dataset_validation_split = "validation" if "validation" in raw else None  # for the card
            if "validation" not in raw:
                raw = DatasetDict(
                    train=load_dataset(name, config, split=f"train[:{100 - pct}%]", cache_dir=cache_dir),
                    validation=load_dataset(name, config, split=f"train[{100 - pct}%:]", cache_dir=cache_dir),
                )
        except (ConnectionError, FileNotFoundError, OSError) as error:
            raise ConnectionError(f"Could not load --dataset_name {name!r}: {error}") from error
        return raw

    loader = FILE_LOADERS[os.path.splitext(data_args.train_file)[1].lower()]
    kwargs = {"keep_linebreaks": data_args.keep_linebreaks} if loader == "text" else {}
    if data_args.validation_file is not None:
        data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
        try:
            return load_dataset(loader, data_files=data_files, cache_dir=cache_dir, **kwargs)
        except datasets.exceptions.DatasetGenerationError as error:
            raise ValueError(
                f"--train_file {data_args.train_file!r} and --validation_file {data_args.validation_file!r} do not "
                f"read as one data set (the same columns of the same types): {error.__cause__ or error}"
            ) from error
    data_files = {"train": data_args.train_file}
    splits = {"train": f"train[:{100 - pct}%]", "validation": f"train[{100 - pct}%:]"}
    try:
        return DatasetDict(
            {
                name: load_dataset(loader, data_files=data_files, split=split, cache_dir=cache_dir, **kwargs)
                for name, split in splits.items()
            }
        )
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        raise ValueError(
            f"--train_file {data_args.train_file!r} has too few lines (examples) to split {pct}% off for validation: "
            "pass more text, a --validation_file, or another --validation_split_percentage."
        ) from error


def text_column(raw: DatasetDict, data_args: DataArguments) -> str:
    """`--text_column_name`, else `text`, else the first column of strings; checked to hold strings in every split."""
    features = raw["train"].features
    strings = [name for name, feature in features.items() if getattr(feature, "dtype", None) in TEXT_DTYPES]
    name = data_args.text_column_name or ("text" if "text" in features else (strings or list(features))[0])
    if name not in features:
        raise ValueError(f"--text_column_name {name!r} is not a column of the training data {list(features)}.")
    for split, dataset in raw.items():
        feature = dataset.features.get(name)
        if getattr(feature, "dtype", None) not in TEXT_DTYPES:
            raise ValueError(
                f"The text column {name!r} of the {split} data holds {feature or 'nothing'}, not text: name the "
                f"column of text with --text_column_name (the training data's columns of text: {strings or 'none'})."
            )
    return name


def train_byte_level_bpe(texts, vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer with `<|endoftext|>`, trained on an iterable of text batches.

    Args:
        texts (`Iterable[list[str]]`): Batches of training text.
        vocab_size (`int`): Vocabulary size, the 256 bytes and `<|endoftext|>` included.
        model_max_length (`int`): The tokenizer's `model_max_length` (the model's context length).

    Returns:
        `PreTrainedTokenizerFast`: the tokenizer, ready for `save_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=False)
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT], show_progress=False
    )
    tokenizer = Tokenizer.from_str(bpe.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,  # GPT-2's convention: batched pipelines and padding collators need one
        model_max_length=model_max_length,
    )


def get_tokenizer(model_args: ModelArguments, data_args: DataArguments, raw: DatasetDict, column: str):
    """`--tokenizer_name`, else the loaded model's tokenizer, else a byte-level BPE trained on the training text."""
    source = model_args.tokenizer_name or model_args.model_name_or_path or model_args.dense_model_name_or_path
    if source is not None:
        flag = "--tokenizer_name" if model_args.tokenizer_name else "the model's folder"
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            hint = "" if model_args.tokenizer_name else " Pass --tokenizer_name."
            raise ValueError(f"Could not load a tokenizer from {flag} {source!r}: {error}.{hint}") from error
        # transformers builds an empty tokenizer for a folder that has no tokenizer files (every text: 0 tokens).
        if tokenizer.vocab_size == 0 or not tokenizer("a b c")["input_ids"]:
            hint = "" if model_args.tokenizer_name else " (it holds no tokenizer files); pass --tokenizer_name"
            raise ValueError(f"The tokenizer from {flag} {source!r} has an empty vocabulary{hint}.")
        return tokenizer
    logger.info(f"Training a byte-level BPE tokenizer (vocab {model_args.vocab_size}) on the training text")
    train = raw["train"]
    batches = (train[i : i + 1000][column] for i in range(0, len(train), 1000))
    return train_byte_level_bpe(batches, model_args.vocab_size, model_max_length=data_args.block_size)


def tokenize_and_group(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, column: str, data_args: DataArguments):
    """Tokenize the text and cut the concatenated tokens into `block_size` blocks (`labels` = `input_ids`).

    Raises a `ValueError` when a split has fewer tokens than one block.
    """
    block_size = data_args.block_size

    def tokenize(examples):
        return tokenizer(examples[column])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in ("input_ids", "attention_mask")}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in concatenated.items()}
        result["labels"] = [list(ids) for ids in result["input_ids"]]
        return result

    tokenized = raw.map(
        tokenize,
        batched=True,
        num_proc=data_args.preprocessing_num_workers,
        remove_columns=raw["train"].column_names,
        desc="Tokenizing",
    )
    grouped = DatasetDict()
    for split, dataset in tokenized.items():
        # Small splits are grouped in one batch, so that no split with a block's worth of tokens comes out empty;
        # large ones in batches of 1,000 texts (each batch drops its last partial block).
        grouped[split] = dataset.map(
            group_texts,
            batched=True,
            batch_size=None if len(dataset) <= 100_000 else 1000,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"Grouping {split} texts in blocks of {block_size}",
        )
        if len(grouped[split]) == 0:
            num_tokens = sum(len(ids) for ids in dataset["input_ids"])
            percentage = "smaller" if split == "train" else "larger"
            raise ValueError(
                f"The {split} text has {num_tokens} tokens, fewer than --block_size {block_size}: pass more text "
                f"(a longer file, or a {percentage} --validation_split_percentage), or a smaller --block_size."
            )
    if data_args.max_train_samples is not None:
        grouped["train"] = grouped["train"].select(range(min(len(grouped["train"]), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        grouped["validation"] = grouped["validation"].select(
            range(min(len(grouped["validation"]), data_args.max_eval_samples))
        )
    return grouped


# ----------------------------------------------------------------------------------------------------------------
# Model, metrics, training
# ----------------------------------------------------------------------------------------------------------------


@functools.cache  # called when checking the arguments and when building the model: the config is read once
def is_moge_hf_model(name_or_path: str) -> bool:
    """Whether a saved model is a moge_hf MoGE language model (else: a transformers MoE model, given the
    regularizer). A moge_hf model without a language-model head (an image classifier) is refused, naming it."""
    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type in HOSTS and model_type not in hosts_with(AUTO_CLASS):
        raise ValueError(
            f"--model_name_or_path {name_or_path!r} is a {model_type} model, which has no causal language model: "
            f"run_clm.py trains {', '.join(hosts_with(AUTO_CLASS))} models and transformers' MoE language models."
        )
    return model_type in hosts_with(AUTO_CLASS)


def upcycles_natively(name_or_path: str) -> bool:
    """Whether a dense model is one `upcycle_to_moe` turns into its MoE sibling in transformers (Llama, Mistral,
    Qwen2, Qwen3), rather than a dense model of a MoGE family (a GPT-2) for its `from_dense`."""
    return (AutoConfig.from_pretrained(name_or_path).architectures or [None])[0] in MOE_SIBLINGS


def load_transformers_moe(name_or_path: str, router_aux_loss_coef: float | None) -> PreTrainedModel:
    """A transformers MoE causal LM that trains with its family's own load-balancing loss: the configs of these
    families save `output_router_logits=False`, under which the head computes no aux loss and the experts drift to a
    few (measured: all load on 2 of 8 experts in 30 steps). `router_aux_loss_coef` (given: `--router_aux_loss_coef`)
    replaces the family's coefficient."""
    config = AutoConfig.from_pretrained(name_or_path)
    if router_aux_loss_coef is not None:
        if not hasattr(config, "router_aux_loss_coef"):
            raise ValueError(
                f"--router_aux_loss_coef: {type(config).__name__} has no `router_aux_loss_coef` (its load balancing "
                "is not a loss this script can weigh)"
            )
        config.router_aux_loss_coef = router_aux_loss_coef
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = True  # the family's load-balancing loss joins `loss`
    return AutoModelForCausalLM.from_pretrained(name_or_path, config=config)


def build_model(model_args: ModelArguments, config, overrides: dict) -> PreTrainedModel:
    """From scratch (`config`), upcycled from the dense model, loaded (a MoGE model, or a transformers MoE model given
    the MoGE regularizer by `add_moge_regularizer`); then the experts implementation."""
    regularizer = {name: value for name, value in overrides.items() if name in MOGE_REGULARIZER_FIELDS}
    if model_args.dense_model_name_or_path and upcycles_natively(model_args.dense_model_name_or_path):
        # Into Mixtral / Qwen2-MoE / Qwen3-MoE, with the family's own load-balancing loss on (as for a loaded one).
        aux = {key: overrides[key] for key in ("router_aux_loss_coef",) if key in overrides}
        model = upcycle_to_moe(
            model_args.dense_model_name_or_path,
            num_experts=overrides.get("num_experts", MOGE_FIELDS["num_experts"].default),
            num_experts_per_tok=overrides.get("num_experts_per_tok", MOGE_FIELDS["num_experts_per_tok"].default),
            expert_noise_std=model_args.expert_noise_std,
            output_router_logits=True,
            **aux,
        )
        model = add_moge_regularizer(model, **regularizer)
    elif model_args.dense_model_name_or_path:
        host = model_host(model_args)
        model = host.heads[AUTO_CLASS].model_class.from_dense(
            model_args.dense_model_name_or_path,
            expert_noise_std=model_args.expert_noise_std,
            **dropout_fields(host, model_args.dropout),
            **overrides,
        )
    elif model_args.model_name_or_path and not is_moge_hf_model(model_args.model_name_or_path):
        model = load_transformers_moe(model_args.model_name_or_path, overrides.get("router_aux_loss_coef"))
        model = add_moge_regularizer(model, **regularizer)
    elif model_args.model_name_or_path:
        host = model_host(model_args)
        model = host.heads[AUTO_CLASS].model_class.from_pretrained(
            model_args.model_name_or_path, **dropout_fields(host, model_args.dropout), **overrides
        )
    else:
        model = model_host(model_args).heads[AUTO_CLASS].model_class(config)
    if model_args.experts_implementation is not None:
        model.set_experts_implementation(model_args.experts_implementation)
    return model


def lm_loss_per_block(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`(batch, 2)`: each block's summed next-token loss and its number of predicted tokens (Trainer gathers these
    instead of the logits, so evaluation needs no memory for `vocab_size` floats per token)."""
    if isinstance(logits, tuple):  # the logits, then what Trainer kept of the other outputs (router logits, aux loss)
        logits = logits[0]
    logits = logits[..., :-1, :].float()
    labels = labels[..., 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(-1)
    return torch.stack([losses.sum(-1), counts.to(losses.dtype)], dim=-1)


def compute_metrics(eval_prediction) -> dict[str, float]:
    """`lm_loss` (mean next-token loss, routing losses left out) and `perplexity = exp(lm_loss)`."""
    sums = torch.as_tensor(eval_prediction.predictions).reshape(-1, 2).double().sum(0)
    lm_loss = float(sums[0] / sums[1])
    return {"lm_loss": lm_loss, "perplexity": math.exp(lm_loss) if lm_loss < 700 else float("inf")}


def run_arm(
    name: str,
    model: PreTrainedModel,
    data_args: DataArguments,
    training_args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    lm_datasets: DatasetDict,
    main_arm: bool = True,
    engine_args: EngineArguments | None = None,
) -> dict[str, float]:
    """Train, save and evaluate one model with `Trainer` (and the MoGE sigma-schedule callback); return its metrics.
    With `engine_args` asking for it, the model is first sharded by transformers' distributed engine."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    config = model.config
    positions = getattr(config, "n_positions", None) or config.max_position_embeddings
    if data_args.block_size > positions:
        raise ValueError(f"--block_size {data_args.block_size} is longer than the model's {positions} positions.")
    if engine_args is not None:
        model = shard_with_engine(model, engine_args, training_args, log=logger)
        config = model.config
    regularizer, routers = moge_regularizers(model)[0], moge_routers(model)
    logger.info(
        f"[{name}] {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{config.num_hidden_layers} layers, MoE layers {[router.name for router in routers]}: "
        f"{regularizer.num_experts} experts top-{routers[0].top_k} on a "
        f"{'x'.join(map(str, regularizer.map_shape))} map, moge_loss_coef={config.moge_loss_coef}, "
        f"moge_sigma_schedule={config.moge_sigma_schedule}, experts_implementation={config._experts_implementation}"
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=lm_datasets["train"] if training_args.do_train else None,
        eval_dataset=lm_datasets["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=lm_loss_per_block if training_args.do_eval else None,
    )
    add_moge_callback(trainer)
    # What this run trains and evaluates on (run_record.json in the output folder, written as it comes true): the
    # model cards read it.
    train_data, eval_data = describe_data(data_args, lm_datasets)
    record = script_run_record(
        trainer,
        script="run_clm.py",
        train=train_data if training_args.do_train else None,
        eval=eval_data if training_args.do_eval else None,
    )
    # Trainer's pushes then carry the model code and a MoGE model card (a transformers MoE model is pushed as it is,
    # a native checkpoint with the MoGE settings in its config).
    if training_args.push_to_hub and isinstance(model, MoGEModelMixin):
        add_moge_hub_callback(trainer, run_record=record)

    return train_and_evaluate(
        trainer,
        name,
        len(lm_datasets["train"]),
        len(lm_datasets["validation"]),
        log=logger,
        main_arm=main_arm,
        run_record=record,
    )


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def print_comparison(rows: list[tuple[str, float, dict]], output_dir: str) -> None:
    """Print the arms' eval losses and perplexities as a table and save them as `comparison.json`."""
    lines = [
        "| arm | lambda (moge_loss_coef) | eval LM loss | perplexity | eval loss (with routing losses) "
        "| moge_loss (unscaled, last train log) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    table = []
    for name, coef, metrics in rows:
        nan = float("nan")
        row = {
            "arm": name,
            "moge_loss_coef": coef,
            "eval_lm_loss": metrics.get("eval_lm_loss", nan),
            "perplexity": metrics.get("eval_perplexity", nan),
            "eval_loss": metrics.get("eval_loss", nan),
            "train_moge_loss_last_log": metrics.get("train_moge_loss_last_log", nan),
        }
        lines.append(
            f"| {name} | {coef:g} | {row['eval_lm_loss']:.4f} | {row['perplexity']:.2f} | {row['eval_loss']:.4f} "
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

    # Everything that can be checked before the data is read: the arguments, the files, the MoGE config values
    # (a model built from scratch is checked through its config, an upcycled or saved one is built right away).
    check_arguments(model_args, data_args)
    check_run_arguments(model_args, data_args, training_args)
    overrides = model_args.moge_overrides()
    from_scratch = not (model_args.model_name_or_path or model_args.dense_model_name_or_path)
    if from_scratch:
        model_args.check_experts(
            scratch_model_config(model_args, data_args, model_args.vocab_size, eos_id=0).num_experts
        )
        model = None
    else:
        set_seed(training_args.seed)
        model = build_model(model_args, None, overrides)
        model_args.check_experts(moge_regularizers(model)[0].num_experts)

    with training_args.main_process_first(desc="loading and tokenizing the text"):
        raw = load_raw_datasets(data_args)
        column = text_column(raw, data_args)
        tokenizer = get_tokenizer(model_args, data_args, raw, column)
        lm_datasets = tokenize_and_group(raw, tokenizer, column, data_args)
    logger.info(
        f"{len(lm_datasets['train'])} training and {len(lm_datasets['validation'])} validation blocks of "
        f"{data_args.block_size} tokens (vocabulary {len(tokenizer)})"
    )

    arms = [(True, overrides, training_args)]
    if model_args.compare_moe_baseline:
        arms.append((False, {**overrides, "moge_loss_coef": 0.0}, baseline_training_args(training_args)))
    results, rows = {}, []
    for main_arm, arm_overrides, arm_args in arms:
        if model is None:
            set_seed(training_args.seed)  # the same initial weights in every arm
            config = None
            if from_scratch:
                config = scratch_model_config(model_args, data_args, len(tokenizer), tokenizer.eos_token_id)
                config.moge_loss_coef = arm_overrides.get("moge_loss_coef", config.moge_loss_coef)
            model = build_model(model_args, config, arm_overrides)
        name = main_arm_name(model.config.moge_loss_coef) if main_arm else "MoE baseline"
        results[name] = run_arm(name, model, data_args, arm_args, tokenizer, lm_datasets, main_arm, model_args)
        rows.append((name, float(model.config.moge_loss_coef), results[name]))
        model = None
    if training_args.do_eval and training_args.process_index == 0:
        print_comparison(rows, training_args.output_dir)
    return results


if __name__ == "__main__":
    main()
