"""The run record: what a training run trained and evaluated on, saved beside the model it produced.

`scripts/run_clm.py` and `scripts/run_image_classification.py` write it into every output folder as `run_record.json`;
[`moge_hf.hub.render_model_card`] (and so `scripts/push_to_hub.py` and Trainer's pushes) renders the card's data
section and `model-index` from it, and refuses data arguments that contradict it. It is a small JSON object:

```json
{
  "format": 1,
  "script": "run_clm.py",
  "train": {"local": "input.txt", "description": "the plays of Shakespeare", "part": "the first 90% of the lines",
            "examples": 2430, "unit": "blocks of 128 tokens"},
  "eval": {"dataset": "karpathy/tiny_shakespeare", "config": null, "split": "validation", "examples": 55,
           "unit": "blocks of 128 tokens"},
  "hyperparameters": {"learning_rate": 0.002, "train_batch_size": 16}
}
```

`train`, `eval` and `test` (each optional; `null` when the run did not train / evaluate / test) each describe one
data source, with:

- `dataset`, `config`, `split`: a Hub data set (its id, its config name, the split used), or
- `local`: a local file (`input.txt`) or folder (`train/`, with a slash), by its last path part, and `split` where
  the local data has splits; `description`: the data in words (given by whoever ran the training);
- `part`: which part of that split or file was used, in words (`"the last 10% of the lines"`), absent or `null` when
  all of it was;
- `examples`: how many examples were used, and `unit`: what an example is (`"blocks of 128 tokens"`; default
  `"examples"`).

An entry with only a `description` says what the data was in words and nothing more. `train` may also be a list of
such entries. A card claims an evaluation on a Hub split (a `model-index` entry) only for an entry with `dataset` and
`split` and no `part`: a Hub split evaluated on whole.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .model_folder import read_json


__all__ = [
    "RUN_RECORD_NAME",
    "check_against_run_record",
    "describe_data",
    "find_run_record",
    "hub_data",
    "load_run_record",
    "local_data",
    "make_run_record",
    "run_record_from_arguments",
    "whole_hub_split",
    "write_run_record",
]

RUN_RECORD_NAME = "run_record.json"
RUN_RECORD_FORMAT = 1

_ENTRY_KEYS = ("dataset", "config", "split", "local", "description", "part", "examples", "unit")
_RECORD_KEYS = ("format", "script", "train", "eval", "test", "hyperparameters")
_ROLES = ("train", "eval", "test")


# ------------------------------------------------------------------------------------------------------------------
# Building and writing records
# ------------------------------------------------------------------------------------------------------------------


def hub_data(
    dataset: str,
    *,
    config: str | None = None,
    split: str | None = None,
    part: str | None = None,
    examples: int | None = None,
    unit: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """The record entry of data from a Hub data set.

    Args:
        dataset (`str`): The data set's Hub id, e.g. `"karpathy/tiny_shakespeare"`.
        config (`str`, *optional*): Its config name.
        split (`str`, *optional*): The split used, e.g. `"validation"`.
        part (`str`, *optional*): Which part of the split was used, in words (`"the last 10%"`); `None`: all of it.
        examples (`int`, *optional*): How many examples were used.
        unit (`str`, *optional*): What an example is, e.g. `"blocks of 128 tokens"`.
        description (`str`, *optional*): What the data is, in words.

    Returns:
        `dict`: the entry (checked).
    """
    entry = {"dataset": dataset, "config": config, "split": split, "part": part, "examples": examples, "unit": unit}
    entry["description"] = description
    return _check_entry({key: value for key, value in entry.items() if value is not None or key == "config"}, "data")


def local_data(
    path: str | os.PathLike | None = None,
    *,
    description: str | None = None,
    split: str | None = None,
    part: str | None = None,
    examples: int | None = None,
    unit: str | None = None,
) -> dict[str, Any]:
    """The record entry of local data: a file or folder (recorded by its last path part), and/or a description.

    Args:
        path (`str` or `os.PathLike`, *optional*): The local file or folder; only its name is recorded (a folder's
            with a trailing `/`).
        description (`str`, *optional*): What the data is, in words.
        split (`str`, *optional*): The split used, where the local data has splits (a saved `datasets` folder).
        part (`str`, *optional*): Which part was used, in words (`"the last 10% of the lines"`); `None`: all of it.
        examples (`int`, *optional*): How many examples were used.
        unit (`str`, *optional*): What an example is, e.g. `"blocks of 128 tokens"`.

    Returns:
        `dict`: the entry (checked).
    """
    entry: dict[str, Any] = {}
    if path is not None:
        name = os.path.basename(os.path.normpath(os.fspath(path)))
        entry["local"] = name + "/" if os.path.isdir(path) else name
    for key, value in (("description", description), ("split", split), ("part", part)):
        if value is not None:
            entry[key] = value
    if examples is not None:
        entry["examples"] = examples
    if unit is not None:
        entry["unit"] = unit
    return _check_entry(entry, "data")


def make_run_record(
    *,
    train: Mapping[str, Any] | list[Mapping[str, Any]] | None,
    eval: Mapping[str, Any] | None,
    test: Mapping[str, Any] | None = None,
    script: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A run record (checked): what the run trained, evaluated and tested on (entries of [`hub_data`] or
    [`local_data`]; `None` for what it did not do), the script that ran it and its hyperparameters."""
    record = {"format": RUN_RECORD_FORMAT, "script": script, "train": train, "eval": eval}
    if test is not None:
        record["test"] = test
    if hyperparameters:
        record["hyperparameters"] = dict(hyperparameters)
    return check_run_record(record)


def write_run_record(output_dir: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Check `record` and write it to `output_dir/run_record.json` (the folder is created if needed); return the
    path."""
    record = check_run_record(record)
    path = Path(output_dir) / RUN_RECORD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def trainer_hyperparameters(trainer) -> dict[str, Any]:
    """The hyperparameters transformers' own model cards list for `trainer` (learning rate, batch sizes, ...); `{}`
    when transformers cannot tell them."""
    try:
        from transformers.modelcard import extract_hyperparameters_from_trainer

        return dict(extract_hyperparameters_from_trainer(trainer))
    except Exception as error:  # an internal helper of transformers: never let it break a run or a push
        from transformers.utils import logging

        logging.get_logger(__name__).warning(f"Could not read the trainer's hyperparameters: {error}")
        return {}


# ------------------------------------------------------------------------------------------------------------------
# Reading and checking records
# ------------------------------------------------------------------------------------------------------------------


def script_run_record(
    trainer, *, script: str, train: Mapping[str, Any] | None, eval: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The record of a training script's run with `trainer`: training, what it trained on (`train`) and its
    hyperparameters; evaluating only, the training of the model it evaluates as that model's own record says (the
    `run_record.json` of the folder it was loaded from; none for a model without one), not this run's unused
    training arguments. `eval`: what it evaluates on, `None` without an evaluation."""
    if trainer.args.do_train:
        hyperparameters = trainer_hyperparameters(trainer)
        return make_run_record(train=train, eval=eval, script=script, hyperparameters=hyperparameters)
    source = str(getattr(trainer.model, "name_or_path", "") or "")  # the folder `from_pretrained` read
    found = find_run_record(source) if source and os.path.isdir(source) else None
    trained = load_run_record(found) if found else {}
    return make_run_record(
        train=trained.get("train"),
        eval=eval,
        test=trained.get("test"),
        script=trained.get("script", script),
        hyperparameters=trained.get("hyperparameters"),
    )


def find_run_record(model_dir: str | os.PathLike) -> Path | None:
    """`model_dir/run_record.json` if it exists, else `None`."""
    path = Path(model_dir) / RUN_RECORD_NAME
    return path if path.is_file() else None


def load_run_record(record: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    """A checked run record: from a mapping, or from the JSON file at a path (a folder: its `run_record.json`).

    Raises:
        `FileNotFoundError`: the path does not exist (or the folder holds no record).
        `ValueError`: the file is not JSON, or the record is not of the documented form (the message says where).
    """
    if record is None:
        return None
    if isinstance(record, (str, os.PathLike)):
        path = Path(record)
        if path.is_dir():
            path = path / RUN_RECORD_NAME
        if not path.is_file():
            raise FileNotFoundError(f"run record {str(path)!r} does not exist")
        record = read_json(path, f"run record {str(path)!r}")
        try:
            return check_run_record(record)
        except ValueError as error:
            raise ValueError(f"run record {str(path)!r}: {error}") from error
    return check_run_record(record)


def _check_entry(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be an object (a data entry) or null, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown} (a data entry has {list(_ENTRY_KEYS)})")
    for key in ("dataset", "config", "split", "local", "description", "part", "unit"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{where}.{key} must be a non-empty string or null, got {value!r}")
    examples = entry.get("examples")
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 0):
        raise ValueError(f"{where}.examples must be a whole number of examples, at least 0, got {examples!r}")
    if entry.get("dataset") and entry.get("local"):
        raise ValueError(f"{where} names both a Hub data set and local data; an entry describes one source")
    if not (entry.get("dataset") or entry.get("local") or entry.get("description")):
        raise ValueError(f"{where} names no data: give `dataset` (a Hub id), `local` (a file name) or `description`")
    if entry.get("config") and not entry.get("dataset"):
        raise ValueError(f"{where}.config goes with a Hub `dataset`")
    return dict(entry)


def check_run_record(record: Any) -> dict[str, Any]:
    """`record`, checked to be a run record of the documented form (see the module docstring).

    Raises:
        `ValueError`: naming the part that is not.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"a run record is a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_RECORD_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} (a run record has {list(_RECORD_KEYS)})")
    if record.get("format", RUN_RECORD_FORMAT) != RUN_RECORD_FORMAT:
        raise ValueError(
            f"format {record.get('format')!r}: this moge_hf reads run records of format {RUN_RECORD_FORMAT}"
        )
    checked: dict[str, Any] = {"format": RUN_RECORD_FORMAT, "script": record.get("script")}
    for role in _ROLES:
        entry = record.get(role)
        if entry is None:
            checked[role] = None
        elif role == "train" and isinstance(entry, list):
            checked[role] = [_check_entry(item, f"train[{i}]") for i, item in enumerate(entry)] or None
        else:
            checked[role] = _check_entry(entry, role)
    hyperparameters = record.get("hyperparameters")
    if hyperparameters is not None and not isinstance(hyperparameters, Mapping):
        raise ValueError(f"hyperparameters must be an object, got {type(hyperparameters).__name__}")
    if hyperparameters:
        checked["hyperparameters"] = dict(hyperparameters)
    return checked


def train_entries(record: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The record's training entries, as a list (none without a record or training data)."""
    train = (record or {}).get("train")
    return [] if train is None else list(train) if isinstance(train, list) else [train]


def whole_hub_split(entry: Mapping[str, Any] | None) -> bool:
    """Whether `entry` is a whole split of a Hub data set (what a `model-index` entry claims)."""
    return bool(entry and entry.get("dataset") and entry.get("split") and not entry.get("part"))


def hub_datasets(record: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The record's Hub entries (training, then evaluation, then test), one per data set id."""
    entries, seen = [], set()
    for entry in [*train_entries(record), (record or {}).get("eval"), (record or {}).get("test")]:
        if entry and entry.get("dataset") and entry["dataset"] not in seen:
            seen.add(entry["dataset"])
            entries.append(entry)
    return entries


# ------------------------------------------------------------------------------------------------------------------
# What a record says, in words
# ------------------------------------------------------------------------------------------------------------------


def _source(entry: Mapping[str, Any], markdown: bool) -> str:
    if entry.get("dataset"):
        dataset = entry["dataset"]
        name = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if markdown else f"`{dataset}`"
        if entry.get("config"):
            name += f" (config `{entry['config']}`)"
    elif entry.get("local"):
        local = entry["local"]
        name = f"the local {'folder' if local.endswith('/') else 'file'} `{local}`"
    else:
        return entry["description"]
    if entry.get("split"):
        name = f"the `{entry['split']}` split of {name}"
    if entry.get("description"):
        name += f" ({entry['description']})"
    return name


def describe_data(entry: Mapping[str, Any], markdown: bool = True) -> str:
    """What `entry` says, in words: how many examples of which part of which data, e.g. "55 blocks of 128 tokens from
    the `validation` split of [karpathy/tiny_shakespeare](https://huggingface.co/datasets/karpathy/tiny_shakespeare)".
    `markdown=False`: without links."""
    text = _source(entry, markdown)
    if entry.get("part"):
        text = f"{entry['part']} of {text}"
    if entry.get("examples") is not None:
        text = f"{entry['examples']:,} {entry.get('unit') or 'examples'} from {text}"
    return text


def _summary(record: Mapping[str, Any]) -> str:
    """The record's data in one line, for error messages."""
    train = "; ".join(describe_data(entry, markdown=False) for entry in train_entries(record)) or "not recorded"
    evaluation = describe_data(record["eval"], markdown=False) if record.get("eval") else "not recorded"
    return f"training data: {train}; evaluation data: {evaluation}"


# ------------------------------------------------------------------------------------------------------------------
# Data given as arguments
# ------------------------------------------------------------------------------------------------------------------


def run_record_from_arguments(
    dataset: str | list[str] | None = None,
    dataset_config: str | None = None,
    eval_split: str | None = None,
    eval_data: str | None = None,
    training_hyperparameters: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """A run record of what a caller states about a run that recorded none (the data arguments of
    [`moge_hf.hub.render_model_card`] and `scripts/push_to_hub.py`).

    Args:
        dataset (`str` or `list[str]`, *optional*): Hub id(s) of the training data (the first one also that of the
            evaluation, when `eval_split` is given, and of `test_*` results).
        dataset_config (`str`, *optional*): Config name of the first data set.
        eval_split (`str`, *optional*): The split of the first data set that the evaluation used whole; `None` or
            `"none"`: anything else (no `model-index` entry claims a Hub split).
        eval_data (`str`, *optional*): What the evaluation used, in words (without `eval_split`).
        training_hyperparameters (`Mapping`, *optional*): The run's hyperparameters.

    Returns:
        `dict` or `None`: the record, or `None` when nothing is stated.
    """
    if isinstance(eval_split, str) and eval_split.lower() == "none":
        eval_split = None
    ids = [dataset] if isinstance(dataset, str) else list(dataset or [])
    if not ids and eval_split is not None:
        raise ValueError(f"eval_split {eval_split!r} names a split of a Hub data set: give the data set too")
    if not (ids or eval_data or training_hyperparameters):
        return None
    train = [hub_data(name, config=dataset_config if i == 0 else None) for i, name in enumerate(ids)] or None
    evaluation = test = None
    if ids and eval_split is not None:
        evaluation = hub_data(ids[0], config=dataset_config, split=eval_split)
    elif eval_data:
        evaluation = {"description": eval_data}
    if ids:  # `test_*` results: on the first data set's `test` split
        test = hub_data(ids[0], config=dataset_config, split="test")
    return make_run_record(train=train, eval=evaluation, test=test, hyperparameters=training_hyperparameters)


def check_against_run_record(
    record: Mapping[str, Any],
    *,
    dataset: str | list[str] | None = None,
    dataset_config: str | None = None,
    eval_split: str | None = None,
    eval_data: str | None = None,
    names: Mapping[str, str] | None = None,
    source: str = "the run record",
) -> None:
    """Raise a `ValueError` naming both values when a data argument contradicts what `record` says.

    `dataset` must name Hub data sets of the record; `dataset_config` the config recorded for the first of them;
    `eval_split` the split the record says the evaluation used whole (`"none"`: that it used no whole Hub split);
    `eval_data` (words) is refused when the record says what the evaluation used. `names` gives each argument's name
    for the message (e.g. `{"dataset": "--dataset"}`); `source` the record's.
    """
    names = {"dataset": "dataset", "dataset_config": "dataset_config", "eval_split": "eval_split", **(names or {})}
    names.setdefault("eval_data", "eval_data")
    hub = hub_datasets(record)
    recorded_ids = [entry["dataset"] for entry in hub]
    for name in [dataset] if isinstance(dataset, str) else list(dataset or []):
        if name not in recorded_ids:
            recorded = f"the Hub data sets {recorded_ids}" if recorded_ids else "no Hub data set"
            raise ValueError(
                f"{names['dataset']} {name!r} contradicts {source}, which records {recorded} ({_summary(record)})"
            )
    if dataset_config is not None:
        first = [dataset] if isinstance(dataset, str) else list(dataset or [])
        entry = next((e for e in hub if e["dataset"] == first[0]), None) if first else (hub[0] if hub else None)
        recorded_config = entry.get("config") if entry else None
        if entry is None or recorded_config != dataset_config:
            what = f"config {recorded_config!r} of {entry['dataset']!r}" if entry else "no Hub data set"
            raise ValueError(
                f"{names['dataset_config']} {dataset_config!r} contradicts {source}, which records {what} "
                f"({_summary(record)})"
            )
    evaluation = record.get("eval")
    if eval_split is not None:
        recorded_split = evaluation["split"] if whole_hub_split(evaluation) else None
        given = None if eval_split.lower() == "none" else eval_split
        if given != recorded_split:
            if evaluation is None:
                recorded = "no evaluation data"
            elif recorded_split is None:
                recorded = f"an evaluation on {describe_data(evaluation, markdown=False)}, not a whole Hub split"
            else:
                recorded = f"an evaluation on the whole {recorded_split!r} split of {evaluation['dataset']!r}"
            raise ValueError(f"{names['eval_split']} {eval_split!r} contradicts {source}, which records {recorded}")
    if eval_data is not None and evaluation is not None:
        raise ValueError(
            f"{names['eval_data']} {eval_data!r} contradicts {source}, which records the evaluation data: "
            f"{describe_data(evaluation, markdown=False)} (leave {names['eval_data']} out)"
        )
