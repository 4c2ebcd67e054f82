"""Sharing MoGE models on the Hugging Face Hub: model cards, upload folders, pushes, and `Trainer`'s own pushes.

A folder written by `save_pretrained` holds everything a Hub repo needs for loading without moge_hf: the weights,
`config.json` with an `auto_map`, and the code (`modeling_moge.py` and the files it imports). This module adds:

- [`render_model_card`]: a MoGE model card (a `huggingface_hub.ModelCard`) rendered from the template in
  `moge_hf/model_cards/` and the host family's [`HostCard`], with the model's real config, the data its run recorded
  (`run_record.json`, see `moge_hf.run_record`) and only the metrics the caller's results hold;
- [`check_moge_model_dir`], [`prepare_upload_folder`], [`push_model_dir`]: the checked folder that goes to the Hub
  (what `scripts/push_to_hub.py` uploads, or writes with `--dry-run`), and the upload itself;
- [`add_moge_hub_callback`]: makes `Trainer(push_to_hub=True)` push the code and a MoGE card too.
"""

import importlib.metadata
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import validate_repo_id
from packaging.requirements import Requirement
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files
from transformers.utils import logging

from .losses import resolve_map_shape
from .model_folder import PROCESSOR_FILES, SAFE_WEIGHTS_INDEX_NAME, ModelFolder, inspect_model_dir, read_json
from .moge_model import HOSTS, HostCard, MoGEHead, MoGEHost
from .run_record import (
    RUN_RECORD_NAME,
    check_against_run_record,
    describe_data,
    find_run_record,
    load_run_record,
    run_record_from_arguments,
    train_entries,
    trainer_hyperparameters,
    whole_hub_split,
    write_run_record,
)
from .training import unwrap_moge_model


logger = logging.get_logger(__name__)

__all__ = [
    "MODEL_CARD_TEMPLATE",
    "MODEL_CARD_TEMPLATES",  # noqa: F822 (module __getattr__: read from the host records)
    "TESTED_TRANSFORMERS",
    "HubTokenError",
    "MoGEHubCallback",
    "add_moge_hub_callback",
    "check_moge_model_dir",
    "find_results_file",
    "load_results",
    "prepare_upload_folder",
    "push_model_dir",
    "render_model_card",
]

# The card template (jinja), one for every host family (whose own parts are its `MoGEHost`'s `HostCard`), ships inside
# the package (`moge_hf/model_cards/`, package data), so an editable install and a wheel find it alike.
MODEL_CARD_TEMPLATES_DIR = Path(__file__).resolve().parent / "model_cards"
MODEL_CARD_TEMPLATE = MODEL_CARD_TEMPLATES_DIR / "model_card.md"
MOGE_TAGS = ("moge", "mixture-of-experts")
# The transformers releases moge_hf's whole test suite runs on (`.ci/run`): the floor of setup.cfg's range (pinned in
# `.ci/transformers-floor.txt`) and the newest release (noxfile.py's last, what a fresh install resolves). The cards
# name these, and no others, as tested.
TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")


def __getattr__(name: str):
    # `MODEL_CARD_TEMPLATES` (model type -> template path: the one template for every family) follows the host records,
    # which the modeling files register after this module is imported: a new dict at each access.
    if name == "MODEL_CARD_TEMPLATES":
        return {model_type: MODEL_CARD_TEMPLATE for model_type in HOSTS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Results files written by `Trainer.save_metrics`, most complete first.
RESULTS_FILES = ("all_results.json", "eval_results.json")

# Weight files of an earlier push that would shadow or contradict the new weights (e.g. a stale shard index).
STALE_WEIGHT_PATTERNS = ["model*.safetensors", SAFE_WEIGHTS_INDEX_NAME]


class HubTokenError(RuntimeError):
    """No Hugging Face token to push with (no `token` argument, no `HF_TOKEN`, no saved `hf auth login`)."""


# ------------------------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------------------------

# Keys of Trainer's metrics that describe the run's bookkeeping rather than the model's quality.
_BOOKKEEPING = {
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "samples",
    "flos",
    "total_flos",
    "jit_compilation_time",
    "model_preparation_time",
    "step",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def find_results_file(model_dir: str | os.PathLike) -> Path | None:
    """The results JSON that `Trainer.save_metrics` left in `model_dir`: `all_results.json`, else `eval_results.json`.

    Args:
        model_dir (`str` or `os.PathLike`): A model folder, e.g. a Trainer `output_dir`.

    Returns:
        `Path` or `None`: the file, or `None` when the folder holds neither.
    """
    for name in RESULTS_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            return path
    return None


def load_results(results: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, float]:
    """The numeric metrics of a run's results: a mapping, or the path of a JSON file holding one.

    Args:
        results (`Mapping`, `str`, `os.PathLike` or `None`):
            Metrics such as `Trainer`'s `all_results.json` / `eval_results.json` (`{"eval_loss": 3.2,
            "eval_accuracy": 0.61, "epoch": 3.0, ...}`), or the path of such a file. `None` means no results.

    Returns:
        `dict[str, float]`: the entries whose values are numbers (others, such as strings, are left out).

    Raises:
        `FileNotFoundError`: the path does not exist.
        `ValueError`: the file is not JSON, or not a JSON object, or a metric is not finite (NaN or infinite: the run
        diverged or overflowed; a card would otherwise leave it out and look like one without results).
    """
    if results is None:
        return {}
    results_path = None
    if isinstance(results, (str, os.PathLike)):
        path = results_path = Path(results)
        if path.is_dir():
            raise ValueError(f"results file {str(path)!r} is a folder; pass the JSON file (e.g. its all_results.json)")
        if not path.is_file():
            raise FileNotFoundError(f"results file {str(path)!r} does not exist")
        results = read_json(path, f"results file {str(path)!r}")
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a mapping of metric names to numbers, got {type(results).__name__}")
    # JSON's NaN / Infinity (Python's json reads and writes them) and float values that are not finite.
    not_finite = [
        f"{key} = {value}" for key, value in results.items() if isinstance(value, float) and not math.isfinite(value)
    ]
    if not_finite:
        source = f"results file {str(results_path)!r}" if results_path is not None else "the results"
        raise ValueError(
            f"{source}: metrics that are not finite ({', '.join(not_finite)}): "
            "the run diverged or overflowed. A card will neither leave them out nor claim a number for them; check "
            "the run, or write a card without results (push_to_hub.py --no-results)."
        )
    return {str(key): value for key, value in results.items() if _is_number(value)}


@dataclass(frozen=True)
class _Metric:
    split: str  # "eval", "test" or "train"
    name: str  # e.g. "accuracy", "loss", "perplexity"
    value: float


def _classify_metrics(metrics: Mapping[str, float]) -> list[_Metric]:
    """Trainer-style keys (`eval_accuracy`, `test_loss`, `train_loss`, `perplexity`, `epoch`) as split and name."""
    classified = []
    for key, value in metrics.items():
        if key == "epoch":
            split, name = "train", "epoch"
        elif key == "perplexity":  # what the `run_clm` example scripts add to the evaluation metrics
            split, name = "eval", "perplexity"
        elif key.startswith(("eval_", "test_", "train_")):
            split, name = key.split("_", 1)
        else:
            continue
        if name in _BOOKKEEPING or name.startswith("mem_") or not name:
            continue
        classified.append(_Metric(split, name, value))
    return classified


def _format_number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _train_metric_name(name: str) -> str:
    return "epochs" if name == "epoch" else _metric_display_name(name)


def _metric_display_name(name: str) -> str:
    if name == "loss":
        return "loss (task + weighted routing losses)"
    return name


# ------------------------------------------------------------------------------------------------------------------
# Model folders
# ------------------------------------------------------------------------------------------------------------------


def _check_model_loads(folder: ModelFolder) -> None:
    """Load the folder's model as `from_pretrained` would (with the installed moge_hf) and raise a `ValueError` with
    the reason if it does not load, its weights do not match its config, or a weight is NaN or Inf."""
    # Imported here, not with the package: `python -m moge_hf.upgrade_code` runs that module as a script, which
    # `import moge_hf` must not have imported before (runpy would then run a second copy of it).
    from .upgrade_code import upgrade_model_code

    # What is checked below is the installed code; what would be uploaded is the folder's own copy: they must agree.
    plan = upgrade_model_code(folder.path, dry_run=True)
    if not plan.up_to_date:
        raise ValueError(
            f"{folder.path}: its code files ({', '.join(plan.changed + plan.added)}) differ from the installed "
            f"moge_hf {_moge_hf_version()}'s (the folder was saved by another release, and its code may not load "
            f"with today's transformers): run `python -m moge_hf.upgrade_code {folder.path}` first, or push it with "
            "the moge_hf that saved it"
        )

    families = HOSTS[folder.config["model_type"]].auto_classes
    architecture = (folder.config.get("architectures") or [None])[0]
    model_class = next((cls for cls in families.values() if cls.__name__ == architecture), None)
    model_class = model_class or next(iter(families.values()))
    try:
        # Mismatched shapes are reported below, by name (transformers' own error points to a log).
        model, info = model_class.from_pretrained(folder.path, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{folder.path} does not load as {model_class.__name__}: {error}") from error
    problems = {kind: info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)}
    if problems:
        raise ValueError(f"{folder.path}: the weights do not match config.json ({problems})")
    bad = [name for name, param in model.named_parameters() if not param.isfinite().all()]
    if bad:
        raise ValueError(f"{folder.path}: weights with NaN or Inf values: {bad[:5]}{' ...' if len(bad) > 5 else ''}")


def check_moge_model_dir(model_dir: str | os.PathLike) -> dict:
    """Check that `model_dir` holds what loading a saved moge_hf model with `trust_remote_code=True` needs (the files
    only: [`prepare_upload_folder`] also loads the model and compares its code with the installed moge_hf's).

    It must hold a `config.json` of a moge_hf model type (`gpt2_moge`, `vit_moge`, ...) whose `auto_map` names the
    config and the saved architecture, the code files of that `auto_map` and every file they import relatively, and
    safetensors weights (`model.safetensors`, or an index and all its shards).

    Args:
        model_dir (`str` or `os.PathLike`): The folder, as written by `save_pretrained` or `Trainer.save_model`.

    Returns:
        `dict`: the folder's config (`config.json`).

    Raises:
        `ValueError`: the folder is not a moge_hf model, or lacks a file that loading needs; the message says which.
    """
    return inspect_model_dir(model_dir).config


# ------------------------------------------------------------------------------------------------------------------
# Model cards
# ------------------------------------------------------------------------------------------------------------------


def _head_of(
    host: MoGEHost, architecture: str | None, auto_map: Mapping[str, Any], mro_names: tuple[str, ...] = ()
) -> tuple[str, MoGEHead]:
    """The Auto class name and head record of `architecture` (a class of the family, or a subclass of one)."""
    by_name = {head.model_class.__name__: (auto_class, head) for auto_class, head in host.heads.items()}
    for name in [architecture, *mro_names]:
        if name in by_name:
            return by_name[name]
    for auto_class, reference in auto_map.items():
        if isinstance(reference, str) and reference.rsplit(".", 1)[-1] == architecture:
            if auto_class in host.heads and host.heads[auto_class].kind != "base":
                return auto_class, host.heads[auto_class]
    raise ValueError(f"cannot tell which MoGE model {architecture!r} is (not one of {sorted(by_name)})")


def _count_parameters(folder: Path, weight_files: list[str]) -> int | None:
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a requirement
        return None
    total = 0
    for name in weight_files:
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), framework="pt") as handle:
                for key in handle.keys():
                    total += math.prod(handle.get_slice(key).get_shape())
    return total


def _moge_hf_version() -> str:
    from . import __version__

    return __version__


def _transformers_requirement() -> str:
    """The transformers range the installed moge_hf declares (setup.cfg), e.g. `transformers>=5.17,<5.25`."""
    try:
        requirements = importlib.metadata.requires("moge_hf") or []
    except importlib.metadata.PackageNotFoundError:  # moge_hf on the path, not installed
        requirements = []
    for requirement in map(Requirement, requirements):
        if requirement.name == "transformers" and requirement.marker is None:
            specifiers = sorted(requirement.specifier, key=lambda spec: spec.operator != ">=")
            return "transformers" + ",".join(str(spec) for spec in specifiers)
    return "transformers"


def _cell(value: Any) -> Any:
    """A value for a markdown table cell: `|` escaped, newlines flattened."""
    return value.replace("|", "\\|").replace("\n", " ") if isinstance(value, str) else value


def _rows(pairs: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": _cell(name), "value": _cell(value)} for name, value in pairs]


def _moge_rows(config: Mapping[str, Any], host: MoGEHost) -> list[dict[str, Any]]:
    shape = host.config_class.from_dict(dict(config))  # the family's names for the layer count and the MLP size
    with torch.device("meta"):  # the experts' sizes as the model builds them (they may differ from layer to layer)
        blocks = host.heads["AutoModel"].model_class(shape).moge_blocks()
    num_layers = shape.moge_num_layers
    sizes = [block.experts.intermediate_dim for block in blocks]
    expert_sizes = sizes[0] if len(set(sizes)) == 1 else " / ".join(map(str, sizes)) + " (per MoGE layer)"
    map_rows, map_cols = resolve_map_shape(config["num_experts"], config.get("moge_map_shape"))
    top_k = config["num_experts_per_tok"]
    norm_topk = config.get("norm_topk_prob")
    norm_topk = top_k > 1 if norm_topk is None else norm_topk
    schedule = config.get("moge_sigma_schedule")
    lam = config.get("moge_loss_coef", 0.0)

    def row(name, field, value):
        return {"name": name, "field": field, "value": value}

    rows = [
        row("experts per MoGE layer", "num_experts", config["num_experts"]),
        row("experts per token (top-k)", "num_experts_per_tok", top_k),
        row("renormalized top-k gate weights", "norm_topk_prob", "yes" if norm_topk else "no"),
        row("MoGE layers", "moe_layers", f"{sorted(config['moe_layers'])} of {num_layers}"),
        row("expert hidden size", "expert_intermediate_size", expert_sizes),
        row("expert map (rows x cols)", "moge_map_shape", f"{map_rows} x {map_cols}"),
        row("window side h", "moge_window", config.get("moge_window")),
        row("Gaussian sigma (as saved)", "moge_sigma", config.get("moge_sigma")),
        row(
            "sigma schedule [init, final, power]",
            "moge_sigma_schedule",
            "none (sigma fixed)" if schedule is None else str(list(schedule)),
        ),
        row("window padding", "moge_padding", f"`{config.get('moge_padding')}`"),
        row("reduction", "moge_reduction", f"`{config.get('moge_reduction')}`"),
        row(
            "lambda (group-sparsity weight)",
            "moge_loss_coef",
            f"{lam} (plain MoE baseline)" if not lam else lam,
        ),
        row("load-balancing loss weight", "router_aux_loss_coef", config.get("router_aux_loss_coef")),
        row("router z-loss weight", "router_z_loss_coef", config.get("router_z_loss_coef")),
        row("router jitter noise", "router_jitter_noise", config.get("router_jitter_noise")),
    ]
    if "router_aux_loss_global" in config:  # configs saved before the field existed lack it
        global_aux = "yes" if config["router_aux_loss_global"] else "no"
        rows.insert(-2, row("load balancing over the global batch", "router_aux_loss_global", global_aux))
    return rows


def _labels(config: Mapping[str, Any], limit: int = 50) -> tuple[list[str], int]:
    """Up to `limit` class names of `id2label` and their total number; none when they are transformers' defaults."""
    id2label = config.get("id2label") or {}
    labels = [str(id2label[key]) for key in sorted(id2label, key=lambda key: int(key))]
    if not labels or all(re.fullmatch(r"LABEL_\d+", label) for label in labels):
        return [], 0
    return labels[:limit], len(labels)


def _layers_text(layers: list[int]) -> str:
    layers = sorted(layers)
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return "layers " + ", ".join(str(i) for i in layers[:-1]) + f" and {layers[-1]}"


# -- What the card is about: the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelFacts:
    """What a card says of the model itself, read from its saved folder or from the instance."""

    config: dict
    host: MoGEHost
    head: MoGEHead
    auto_class: str  # the Auto class that loads it, e.g. "AutoModelForCausalLM"
    architecture: str  # its class name
    num_parameters: int | None
    code_files: list[str]  # the code files its repo carries
    has_processor: bool | None  # whether its repo holds the tokenizer / image processor (None: unknown)
    folder: Path | None  # the saved folder, for a card rendered from one


def _model_facts(model_dir_or_model: str | os.PathLike | PreTrainedModel, has_processor: bool | None) -> _ModelFacts:
    """Read the facts of a MoGE model from a saved folder (checked with [`check_moge_model_dir`]) or an instance."""
    if isinstance(model_dir_or_model, nn.Module):
        model = unwrap_moge_model(model_dir_or_model)
        config_object = getattr(model, "config", None)
        if config_object is None or getattr(config_object, "model_type", None) not in HOSTS:
            raise ValueError(f"render_model_card needs a MoGE model ({' / '.join(HOSTS)}), got {type(model).__name__}")
        config = config_object.to_dict()
        mro_names = tuple(klass.__name__ for klass in type(model).__mro__)
        architecture = type(model).__name__
        num_parameters = model.num_parameters()
        code_module = sys.modules.get(type(model).__module__)
        code_files = [Path(code_module.__file__).name] if code_module is not None else []
        if code_module is not None:
            imported = {Path(path).name for path in get_relative_import_files(code_module.__file__)}
            code_files += sorted(imported - set(code_files))
        folder_path = None
    else:
        folder = inspect_model_dir(model_dir_or_model)
        config = folder.config
        mro_names = ()
        architecture = (config.get("architectures") or [None])[0]
        num_parameters = _count_parameters(folder.path, folder.weight_files)
        code_files = folder.code_files
        if has_processor is None:
            has_processor = bool(folder.processor_files)
        folder_path = folder.path
    host = HOSTS[config["model_type"]]
    auto_class, head = _head_of(host, architecture, config.get("auto_map") or {}, mro_names)
    return _ModelFacts(
        config=config,
        host=host,
        head=head,
        auto_class=auto_class,
        architecture=architecture or head.model_class.__name__,
        num_parameters=num_parameters,
        code_files=code_files,
        has_processor=has_processor,
        folder=folder_path,
    )


# -- What the card is about: the run --------------------------------------------------------------------------------

# The data arguments of `render_model_card` for runs that recorded none (see `run_record_from_arguments`).
DATA_ARGUMENTS = ("dataset", "dataset_config", "eval_split", "eval_data", "training_hyperparameters")


def _run_record_for_card(
    run_record: Mapping[str, Any] | str | os.PathLike | None, facts: _ModelFacts, data_arguments: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """The run record the card is rendered from, and how the card names where it came from (`None`: from the data
    arguments). `run_record`, else the `run_record.json` of the model's folder; data arguments that contradict it
    are refused; without a record, the data arguments make one."""
    unknown = sorted(set(data_arguments) - set(DATA_ARGUMENTS))
    if unknown:
        raise TypeError(f"render_model_card got unexpected keyword arguments {unknown}")
    stated = {key: value for key, value in data_arguments.items() if value is not None}
    if run_record is None and facts.folder is not None:
        run_record = find_run_record(facts.folder)
    record = load_run_record(run_record)
    if record is None:
        return run_record_from_arguments(**stated), None
    if isinstance(run_record, (str, os.PathLike)):  # the card names the record's file; an error, its path
        path = Path(run_record) / RUN_RECORD_NAME if Path(run_record).is_dir() else Path(run_record)
        source, where = f"`{path.name}`", f"the run record {path}"
    else:
        source = where = "the run record"
    hyperparameters = stated.pop("training_hyperparameters", None)  # not a claim about the data: may add to it
    check_against_run_record(record, source=where, **stated)
    if hyperparameters:
        record = {**record, "hyperparameters": dict(hyperparameters)}
    return record, source


# -- What the card is about: the results ----------------------------------------------------------------------------


def _counted(entry: dict[str, Any] | None, count: float | None, name: str) -> dict[str, Any] | None:
    """`entry` with the number of examples the results count (`eval_samples`, `train_samples`), which must agree with
    the record's."""
    if count is None:
        return entry
    if count < 0 or count != int(count):
        raise ValueError(f"results: {name} must be a whole number of examples, at least 0, got {count}")
    if entry is None:
        return None
    if entry.get("examples") is not None and entry["examples"] != int(count):
        raise ValueError(
            f"results: {name} = {int(count)} contradicts the run record, which records {entry['examples']} examples "
            f"({describe_data(entry, markdown=False)}): the results are not of the recorded run"
        )
    return {**entry, "examples": int(count)}


@dataclass(frozen=True)
class _CardResults:
    """The run's metrics as the card reports them, and the record's data, completed with the results' counts."""

    eval_metrics: list[_Metric]  # eval and test
    train_metrics: list[_Metric]
    indexed: list[_Metric]  # those the `model-index` claims: measured on a whole Hub split
    record: dict[str, Any] | None
    source: str | None  # the results file, for the card's text


def _card_results(
    results: Mapping[str, Any] | str | os.PathLike | None, record: dict[str, Any] | None
) -> _CardResults:
    """Read `results`, sort its metrics, and check its counts of examples against `record`."""
    numbers = load_results(results)
    metrics = _classify_metrics(numbers)
    evaluated = _counted((record or {}).get("eval"), numbers.get("eval_samples"), "eval_samples")
    if record is not None:
        train = train_entries(record)
        if len(train) == 1:
            train = [_counted(train[0], numbers.get("train_samples"), "train_samples")]
        record = {**record, "train": train or None, "eval": evaluated}
    eval_metrics = [metric for metric in metrics if metric.split in ("eval", "test")]
    on_whole_split = {split: whole_hub_split((record or {}).get(split)) for split in ("eval", "test")}
    return _CardResults(
        eval_metrics=eval_metrics,
        train_metrics=[metric for metric in metrics if metric.split == "train"],
        indexed=[metric for metric in eval_metrics if on_whole_split[metric.split]],
        record=record,
        source=f"`{Path(results).name}`" if isinstance(results, (str, os.PathLike)) else None,
    )


# -- The card's metadata --------------------------------------------------------------------------------------------


def _model_index(facts: _ModelFacts, card_results: _CardResults) -> list[EvalResult] | None:
    """The `model-index` entries: a metric only where the record says it was measured on a whole Hub split."""
    if not card_results.indexed:
        return None
    record = card_results.record
    return [
        EvalResult(
            task_type=facts.head.pipeline_tag,
            dataset_type=record[metric.split]["dataset"],
            dataset_name=record[metric.split]["dataset"],
            dataset_config=record[metric.split].get("config"),
            dataset_split=record[metric.split]["split"],
            metric_type=metric.name,
            metric_name=_metric_display_name(metric.name),
            metric_value=metric.value,
        )
        for metric in card_results.indexed
    ]


def _card_metadata(
    facts: _ModelFacts,
    card_results: _CardResults,
    *,
    model_name: str,
    base_model: str | None,
    license: str | None,
    language: str | list[str] | None,
    tags: list[str] | None,
) -> ModelCardData:
    """The card's YAML metadata: library, pipeline tag, tags, data sets (the Hub ones of the record), base model,
    license, and the `model-index` of [`_model_index`]."""
    all_tags = [*MOGE_TAGS, facts.host.card.tag, "custom_code"]
    all_tags += [tag for tag in dict.fromkeys(tags or []) if tag not in all_tags]
    record = card_results.record or {}
    tested = any(metric.split == "test" for metric in card_results.eval_metrics)
    entries = [*train_entries(record), record.get("eval"), record.get("test") if tested else None]
    datasets = list(dict.fromkeys(entry["dataset"] for entry in entries if entry and entry.get("dataset")))
    eval_results = _model_index(facts, card_results)
    return ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag=facts.head.pipeline_tag,
        tags=all_tags,
        datasets=datasets or None,
        base_model=base_model,
        metrics=sorted({metric.name for metric in card_results.indexed}) if eval_results else None,
        model_name=model_name if eval_results else None,  # `model-index` needs a name; the card needs no other
        eval_results=eval_results,
    )


# -- The card's text ------------------------------------------------------------------------------------------------


def _run_variables(card_results: _CardResults, record_source: str | None) -> dict[str, Any]:
    """The `run` variable of the template: what the run trained and evaluated on, in words, and where that is
    recorded (`source`: the record's file; `None` with `recorded` true: stated by the data arguments)."""
    record = card_results.record or {}
    train = [describe_data(entry) for entry in train_entries(record)]
    if train:
        missing = None
    elif not record:
        missing = "was not recorded when this card was written"
    elif record_source:
        missing = f"was not recorded: the run that wrote {record_source} did not train"
    else:
        missing = "was not given when this card was written"
    return {
        "recorded": bool(record),
        "train": train,
        "train_missing": missing,
        "eval": describe_data(record["eval"]) if record.get("eval") else None,
        "test": describe_data(record["test"]) if record.get("test") else None,
        "source": record_source,
        "script": record.get("script"),
        "hyperparameter_rows": _rows([(str(k), v) for k, v in (record.get("hyperparameters") or {}).items()]),
    }


def _results_variables(card_results: _CardResults) -> dict[str, Any]:
    """The `results` variable of the template: the metrics' rows, what they were measured on, and which the
    `model-index` holds."""
    record = card_results.record or {}
    labels = {
        "eval": record["eval"]["split"] if whole_hub_split(record.get("eval")) else "evaluation",
        "test": record["test"]["split"] if whole_hub_split(record.get("test")) else "test",
    }
    splits = list(dict.fromkeys(metric.split for metric in card_results.eval_metrics))
    measured_on = []
    for split in splits:
        entry = record.get(split)
        what = f"on {describe_data(entry)}" if entry else "on data that the run did not record"
        measured_on.append(what if split == "eval" else f"the test results {what}")
    unindexed = [split for split in splits if not whole_hub_split(record.get(split))]
    note = None
    if unindexed:
        names = " and ".join("evaluation" if split == "eval" else "test" for split in unindexed)
        note = (
            f"The {names} results are not in the card's `model-index` metadata: they were not measured on a whole "
            "split of a Hub dataset"
        )
        if any(record.get(split) is None for split in unindexed):
            note += " (the data they were measured on was not recorded)"
    return {
        "eval_rows": [
            {"split": labels[m.split], "name": _metric_display_name(m.name), "value": _format_number(m.value)}
            for m in card_results.eval_metrics
        ],
        "train_rows": _rows(
            [(_train_metric_name(m.name), _format_number(m.value)) for m in card_results.train_metrics]
        ),
        "measured_on": "; ".join(measured_on),
        "model_index": bool(card_results.indexed),
        "unindexed_note": note,
        "source": card_results.source,
    }


def _card_variables(
    facts: _ModelFacts,
    card_results: _CardResults,
    record_source: str | None,
    *,
    model_name: str,
    repo_id: str | None,
    base_model: str | None,
) -> dict[str, Any]:
    """The variables of the card template: the host's records (`host`, `head`, and `card`: the host's
    [`HostCard`], its text fields rendered with the other variables), the config (`config`), the facts of the model
    (`model`), the MoGE settings (`moge`), the run record (`run`), the results (`results`) and the package
    (`package`)."""
    config = facts.config
    labels, num_labels = _labels(config)
    variables = {
        "host": facts.host,
        "head": facts.head,
        "config": config,
        "model": {
            "name": model_name,
            "repo_id": repo_id or "your-username/your-moge-model",
            "auto_class": facts.auto_class,
            "architecture": facts.architecture,
            "code_files": facts.code_files,
            "has_processor": facts.has_processor,
            "base_model": base_model,
            "labels": labels,
            "num_labels": num_labels,
            "labels_truncated": num_labels > len(labels),
        },
        "moge": {
            "rows": _moge_rows(config, facts.host),
            "layers_text": _layers_text(config["moe_layers"]),
            "baseline": not config.get("moge_loss_coef"),
        },
        "run": _run_variables(card_results, record_source),
        "results": _results_variables(card_results),
        "package": {
            "version": _moge_hf_version(),
            "transformers_requirement": _transformers_requirement(),
            "tested_transformers": list(TESTED_TRANSFORMERS),
        },
    }
    variables["card"] = _host_card_variables(facts, variables)
    return variables


def _host_card_variables(facts: _ModelFacts, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The host's [`HostCard`] as the template sees it: its tag, the rows of the card's architecture table (the class,
    the host's rows, the parameter count), and its text fields (jinja fragments) rendered with the other variables."""
    card: HostCard = facts.host.card
    rows = [("class", f"`{facts.architecture}`"), *card.rows(facts.config)]
    if facts.num_parameters is not None:
        rows.append(("parameters (all experts)", f"{facts.num_parameters:,}"))
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    rendered = {"tag": card.tag, "rows": _rows(rows)}
    for name in ("intro", "tokens", "snippet", "preprocessing", "limitations"):
        fragment = textwrap.dedent(getattr(card, name)).strip("\n")
        try:
            rendered[name] = environment.from_string(fragment).render(**variables).strip()
        except jinja2.TemplateError as error:
            raise ValueError(f"the `{name}` of the HostCard of {variables['host'].display_name}: {error}") from error
    return rendered


def _render_card(
    template_path: str | os.PathLike, card_data: ModelCardData, variables: Mapping[str, Any]
) -> ModelCard:
    """Render the card template (jinja; a variable it uses that does not exist is an error) with `card_data` as its
    YAML header."""
    template = Path(template_path)
    if not template.is_file():
        raise FileNotFoundError(
            f"model card template {str(template)!r} not found (the template ships in the package's `model_cards/` "
            "folder; pass `template_path=`)"
        )
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    try:
        text = environment.from_string(template.read_text(encoding="utf-8")).render(
            card_data=card_data.to_yaml(), **variables
        )
    except jinja2.TemplateError as error:
        raise ValueError(
            f"model card template {str(template)!r}: {error} (a template may use card_data, "
            f"{', '.join(variables)}; see `moge_hf.hub.render_model_card`)"
        ) from error
    # Collapse the blank lines that the template's jinja blocks leave behind.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", text).strip() + "\n")


def render_model_card(
    model_dir_or_model: str | os.PathLike | PreTrainedModel,
    *,
    repo_id: str | None = None,
    results: Mapping[str, Any] | str | os.PathLike | None = None,
    run_record: Mapping[str, Any] | str | os.PathLike | None = None,
    base_model: str | None = None,
    license: str | None = "apache-2.0",
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    model_name: str | None = None,
    has_processor: bool | None = None,
    template_path: str | os.PathLike | None = None,
    **data_arguments,
) -> ModelCard:
    r"""Render the model card of a MoGE model from its config, the record of the run that produced it, and the
    metrics that run measured.

    The card (`moge_hf/model_cards/model_card.md`, one template for every host family, whose family-specific parts
    come from the family's [`HostCard`] record) holds Hub metadata (`library_name: transformers`, the `pipeline_tag`
    of the model's head, the tags `moge`, `mixture-of-experts`, the family's tag and `custom_code`, `datasets`,
    `base_model`, `license`, and a `model-index`), then how MoGE differs from MoE, the MoGE settings read from the
    config, how to load the model with `trust_remote_code=True`, the training data, the results and the limitations.

    What the model was trained and evaluated on comes from the run record (`run_record.json`, written by the
    training scripts: see `moge_hf.run_record`): its data sets, splits, parts and numbers of examples. The card lists
    the record's Hub data sets as `datasets`, and puts a metric in `model-index` only when the record says it was
    measured on a whole split of a Hub data set. No number comes from anywhere but the config, the weights (parameter
    count), the record and `results`: without results the card says that results were not measured; without a record
    it says that the data were not recorded.

    Args:
        model_dir_or_model (`str`, `os.PathLike` or `PreTrainedModel`):
            A saved MoGE model folder (checked with [`check_moge_model_dir`]) or a MoGE model instance.
        repo_id (`str`, *optional*):
            The Hub repo id the card's loading code uses; a placeholder if not given.
        results (`Mapping`, `str` or `os.PathLike`, *optional*):
            The run's metrics, or the path of a JSON file holding them, such as `Trainer`'s `all_results.json` or
            `eval_results.json` (see [`find_results_file`]). Keys `eval_<name>` (and `perplexity`) are results on the
            record's evaluation data, `test_<name>` on its test data; `train_<name>` and `epoch` are listed as
            training metrics. Runtimes, throughputs and sample counts are left out; `eval_samples` and
            `train_samples` must agree with the record's numbers of examples.
        run_record (`Mapping`, `str` or `os.PathLike`, *optional*):
            The run record, or the path of its JSON file; defaults to the `run_record.json` of the model folder.
        base_model (`str`, *optional*):
            Hub id of the model this one was initialized from (e.g. the dense model it was upcycled from, or the
            MoGE model it was fine-tuned from). Never guessed: the card has a `base_model` only when this is given.
        license (`str`, *optional*, defaults to `"apache-2.0"`):
            License id of the weights; `None` leaves it out.
        language (`str` or `list[str]`, *optional*):
            Language code(s) of the training text.
        tags (`list[str]`, *optional*):
            Tags added to the MoGE ones.
        model_name (`str`, *optional*):
            Title of the card and name of `model-index`; defaults to the repo name, the folder name, or the class.
        has_processor (`bool`, *optional*):
            Whether the repo holds the tokenizer / image processor; found from the folder when one is given.
            `False` adds a note on how to preprocess inputs.
        template_path (`str` or `os.PathLike`, *optional*):
            Another jinja template to render, with the same variables: `host`, `head` (the host and head records),
            `card` (the host's [`HostCard`], its text fields rendered), `config` (the config as a dict), `model`,
            `moge`, `run` (the run record, in words), `results` and `package`.
        data_arguments:
            What a run record holds, for a run that recorded none: `dataset` (Hub id(s) of the training data),
            `dataset_config`, `eval_split` (the split of the first data set that the evaluation used whole; not
            given: no Hub split is claimed), `eval_data` (what the evaluation used, in words) and
            `training_hyperparameters` (see `moge_hf.run_record.run_record_from_arguments`). With a run record they
            must agree with it (`training_hyperparameters` replace the record's).

    Returns:
        `huggingface_hub.ModelCard`: the card; `card.save(path)` writes it (`README.md` on the Hub).

    Raises:
        `ValueError`: `model_dir_or_model` is not a MoGE model (folder), `results` is not a mapping of metrics, the
            run record is not of the documented form, or a data argument or a count of `results` contradicts it
            (the message names both values).
        `TypeError`: an unknown keyword argument.

    Example:

    ```python
    >>> from moge_hf.hub import render_model_card
    >>> card = render_model_card("out/gpt2-moge", repo_id="me/gpt2-moge", results="out/gpt2-moge/all_results.json")
    >>> card.save("out/gpt2-moge/README.md")  # data sets and splits from out/gpt2-moge/run_record.json
    ```
    """
    facts = _model_facts(model_dir_or_model, has_processor)
    record, record_source = _run_record_for_card(run_record, facts, data_arguments)
    card_results = _card_results(results, record)
    if model_name is None:
        folder_name = facts.folder.resolve().name if facts.folder is not None else None
        model_name = repo_id.split("/")[-1] if repo_id else folder_name or facts.architecture
    card_data = _card_metadata(
        facts,
        card_results,
        model_name=model_name,
        base_model=base_model,
        license=license,
        language=language,
        tags=tags,
    )
    variables = _card_variables(
        facts, card_results, record_source, model_name=model_name, repo_id=repo_id, base_model=base_model
    )
    return _render_card(template_path or MODEL_CARD_TEMPLATE, card_data, variables)


# ------------------------------------------------------------------------------------------------------------------
# Upload folders and pushes
# ------------------------------------------------------------------------------------------------------------------


def prepare_upload_folder(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    results: Mapping[str, Any] | str | os.PathLike | None = None,
    **card_kwargs,
) -> list[str]:
    r"""Write into `out_dir` exactly what a Hub repo of the MoGE model in `model_dir` needs, and nothing else.

    That is: the safetensors weights (single file, or index and shards), `config.json` (with its `auto_map`) and
    `generation_config.json` if present, the code files (those `auto_map` names and every file they import relatively,
    e.g. `modeling_moge.py`, `moge_layer.py`, `configuration_moge.py`, `losses.py`, `triton_experts.py`,
    `upcycling.py`), the tokenizer / image processor files if present, the run record the card was rendered from
    (`run_record.json`) if any, and `README.md`: the MoGE card of [`render_model_card`] (replacing any README in
    `model_dir`). Checkpoints, optimizer states, `training_args.bin` (a pickle) and logs are left out.

    Args:
        model_dir (`str` or `os.PathLike`):
            The saved MoGE model (checked with [`check_moge_model_dir`]).
        out_dir (`str` or `os.PathLike`):
            The folder to write; it must not exist or be empty, and must not be `model_dir`.
        repo_id (`str`, *optional*):
            The Hub repo id, for the card's loading code.
        results (`Mapping`, `str` or `os.PathLike`, *optional*):
            The run's metrics for the card (see [`render_model_card`]); `None`: the card reports no results.
        card_kwargs:
            Other arguments of [`render_model_card`] (`run_record`, `base_model`, `license`, ...).

    Returns:
        `list[str]`: the paths written, relative to `out_dir`, sorted.

    Raises:
        `ValueError`: `model_dir` is not a MoGE model folder, its code files are not the installed moge_hf's (saved
            by another release: `python -m moge_hf.upgrade_code` refreshes them), its model does not load (bad
            config, weights that do not match it, NaN or Inf weights), `out_dir` is not empty, `repo_id` is
            invalid, or the card cannot be rendered (e.g. a data argument contradicts the run record).
    """
    folder = inspect_model_dir(model_dir)
    _check_model_loads(folder)  # nothing goes to the Hub that would not load
    if repo_id is not None:
        validate_repo_id(repo_id)
    out = Path(out_dir)
    if out.exists() and out.resolve() == folder.path.resolve():
        raise ValueError("the output folder must not be the model folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"the output folder {str(out)!r} must not exist or be empty")
    card = render_model_card(folder.path, repo_id=repo_id, results=results, **card_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in [*folder.weight_files, *folder.config_files, *folder.code_files, *folder.processor_files]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder.path / name, out / name)
        written.append(name)
    for name in folder.processor_dirs:
        shutil.copytree(folder.path / name, out / name)
        written += [str(p.relative_to(out)) for p in (out / name).rglob("*") if p.is_file()]
    if (folder.path / "README.md").is_file():
        logger.info(f"prepare_upload_folder: the MoGE card replaces {folder.path / 'README.md'}")
    card.save(out / "README.md")
    written.append("README.md")
    record = load_run_record(card_kwargs.get("run_record") or find_run_record(folder.path))
    if record is not None:
        write_run_record(out, record)
        written.append(RUN_RECORD_NAME)
    return sorted(written)


def _require_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise HubTokenError(
            "No Hugging Face token found, so nothing was uploaded. Log in with `hf auth login` (it saves a token), or "
            "set the HF_TOKEN environment variable to a token with write access "
            "(https://huggingface.co/settings/tokens)."
        )
    return token


def push_model_dir(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload MoGE model",
    revision: str | None = None,
    results: Mapping[str, Any] | str | os.PathLike | None = None,
    **card_kwargs,
):
    r"""Upload a saved MoGE model to the Hub repo `repo_id` (created if needed), with its code and a MoGE card.

    The folder of [`prepare_upload_folder`] is written to a temporary directory and uploaded in one commit with
    `HfApi().create_repo` and `HfApi().upload_folder`. Weight files of an earlier push that the new ones do not
    replace (`model*.safetensors`, the shard index) are deleted in the same commit, so a stale shard index cannot
    shadow the new weights. The folder is checked, and a token is looked up, before anything touches the network.

    Args:
        model_dir (`str` or `os.PathLike`): The saved MoGE model.
        repo_id (`str`): The Hub repo, `"user/name"` or `"org/name"`.
        private (`bool`, *optional*): Make a new repo private (`None`: the Hub's default). No effect on existing repos.
        token (`str`, *optional*): A token with write access; defaults to `HF_TOKEN` or the `hf auth login` one.
        commit_message (`str`, *optional*, defaults to `"Upload MoGE model"`): The commit message.
        revision (`str`, *optional*): The branch to commit to (default `main`).
        results (`Mapping`, `str` or `os.PathLike`, *optional*): The run's metrics for the card.
        card_kwargs: Other arguments of [`render_model_card`] (`run_record`, `base_model`, `license`, ...).

    Returns:
        `huggingface_hub.CommitInfo`: the commit (its `commit_url`, `oid`, ...).

    Raises:
        `ValueError`: `model_dir` is not a MoGE model folder, or `repo_id` is not a valid repo id.
        [`HubTokenError`]: no token was found (before any network call).
    """
    inspect_model_dir(model_dir)
    validate_repo_id(repo_id)  # a `ValueError` naming what is wrong with the id
    token = _require_token(token)
    with tempfile.TemporaryDirectory(prefix="moge_hub_") as tmp:
        folder = Path(tmp) / "upload"
        prepare_upload_folder(model_dir, folder, repo_id=repo_id, results=results, **card_kwargs)
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            revision=revision,
            repo_type="model",
            delete_patterns=STALE_WEIGHT_PATTERNS,
        )


# ------------------------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------------------------


def _metrics_from_log_history(log_history: list[dict]) -> dict[str, float]:
    """The latest evaluation metrics and the training summary (`train_loss`, `epoch`) of `Trainer`'s log history."""
    latest_eval, train_summary = {}, {}
    for entry in log_history:
        if any(key.startswith("eval_") and key != "eval_runtime" for key in entry):
            latest_eval = entry
        if "train_loss" in entry:
            train_summary = entry
    metrics = {key: value for key, value in latest_eval.items() if key.startswith("eval_")}
    metrics.update({key: value for key, value in train_summary.items() if key.startswith("train_") or key == "epoch"})
    return load_results(metrics)


class MoGEHubCallback(TrainerCallback):
    r"""Make `Trainer`'s pushes to the Hub carry the MoGE code and a MoGE model card. Attach it with
    [`add_moge_hub_callback`].

    `Trainer` pushes `args.output_dir` in two ways. `trainer.push_to_hub()` (which `trainer.save_model()` also calls
    when `args.push_to_hub` is set; `train()` does not push at its end) saves the model there (`save_pretrained`
    writes the code and the `auto_map`), then writes its own card with `create_model_card`, then uploads;
    [`add_moge_hub_callback`] makes that `create_model_card` write the MoGE card instead. The pushes at checkpoints
    (`hub_strategy` `"every_save"`, `"checkpoint"`, `"all_checkpoints"`) copy only the config and weights from the
    checkpoint into `output_dir`: at their `on_push_begin` this callback writes the code files and the MoGE card
    there, so that every pushed revision loads with `trust_remote_code=True`.

    The card's metrics: `results` if given; otherwise the latest evaluation metrics and the training loss in
    `state.log_history` (measured by this trainer), updated with `all_results.json` / `eval_results.json` from
    `output_dir` when `Trainer.save_metrics` wrote them after this callback was made (older files, from an earlier
    run, are ignored). The card's data: `run_record` if given, else the `run_record.json` in `output_dir` (which the
    training scripts write there), else what the data arguments (`dataset`, `eval_split`, ...) state.

    Args:
        card_kwargs:
            Arguments of [`render_model_card`] (`run_record`, `base_model`, `license`, `language`, `tags`,
            `results`, ...). `repo_id` defaults to the trainer's Hub repo.
    """

    def __init__(self, **card_kwargs):
        self.card_kwargs = card_kwargs
        self.created_at = time.time()
        self.trainer_ref = None  # set by `add_moge_hub_callback`
        self._warned_unattached = False

    @property
    def trainer(self) -> Trainer | None:
        return self.trainer_ref() if self.trainer_ref is not None else None

    def collect_results(self, output_dir: str | os.PathLike, state: TrainerState) -> dict[str, float]:
        """The metrics for the card (see the class docstring)."""
        if self.card_kwargs.get("results") is not None:
            return load_results(self.card_kwargs["results"])
        metrics = _metrics_from_log_history(state.log_history)
        for name in reversed(RESULTS_FILES):  # all_results.json last, so that it wins
            path = Path(output_dir) / name
            if path.is_file() and path.stat().st_mtime >= self.created_at - 1:
                metrics.update(load_results(path))
        return metrics

    def write_card(
        self,
        output_dir: str | os.PathLike,
        model: nn.Module,
        state: TrainerState,
        has_processor: bool | None = None,
        **overrides,
    ) -> ModelCard:
        """Render the MoGE card of `model` and write it to `output_dir/README.md`."""
        kwargs = {**self.card_kwargs, **{k: v for k, v in overrides.items() if v is not None}}
        trainer = self.trainer
        if kwargs.get("repo_id") is None and trainer is not None:
            kwargs["repo_id"] = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id
        if kwargs.get("training_hyperparameters") is None and trainer is not None:
            kwargs["training_hyperparameters"] = trainer_hyperparameters(trainer)
        if kwargs.get("run_record") is None:
            kwargs["run_record"] = find_run_record(output_dir)
        kwargs["results"] = self.collect_results(output_dir, state)
        card = render_model_card(model, has_processor=has_processor, **kwargs)
        os.makedirs(output_dir, exist_ok=True)
        card.save(Path(output_dir) / "README.md")
        return card

    def on_push_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        model = kwargs.get("model")
        if model is None:
            return
        model = unwrap_moge_model(model)
        if self.trainer_ref is None and not self._warned_unattached:
            self._warned_unattached = True
            logger.warning(
                "MoGEHubCallback was not attached with `moge_hf.hub.add_moge_hub_callback(trainer)`: checkpoint "
                "pushes get the MoGE card, but `trainer.push_to_hub()` will replace it with Trainer's generic card."
            )
        os.makedirs(args.output_dir, exist_ok=True)
        # The code files, which a checkpoint push does not copy (a full push writes them again when saving).
        custom_object_save(model, args.output_dir)
        if getattr(model.config, "_auto_class", None) is not None:
            custom_object_save(model.config, args.output_dir)
        self.write_card(args.output_dir, model, state, has_processor=kwargs.get("processing_class") is not None)


def add_moge_hub_callback(trainer: Trainer, callback: MoGEHubCallback | None = None, **card_kwargs) -> MoGEHubCallback:
    r"""Make `trainer`'s pushes to the Hub (`push_to_hub=True`, `trainer.push_to_hub()`) carry the MoGE code and card.

    Adds a [`MoGEHubCallback`] (which writes the code and the card at every checkpoint push) and replaces this
    trainer's `create_model_card` (which `Trainer.push_to_hub` calls after saving the model and before uploading) by
    one that writes the MoGE card instead of `Trainer`'s generic one. Its arguments (`license`, `tags`, `dataset`,
    `finetuned_from`, `language`, `model_name`, as `trainer.push_to_hub(**kwargs)` passes them) fill the card:
    `finetuned_from` becomes `base_model`; a `dataset` must agree with the run record. Calling this again replaces
    the callback.

    Args:
        trainer (`Trainer`): A trainer of a MoGE model.
        callback (`MoGEHubCallback`, *optional*): The callback to attach; by default a new one built with
            `card_kwargs`.
        card_kwargs: Arguments of [`render_model_card`] for the cards (`run_record`, `base_model`, `license`, ...);
            without a `run_record`, the `run_record.json` in the trainer's `output_dir`, if any.

    Returns:
        `MoGEHubCallback`: the attached callback.

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> from moge_hf.hub import add_moge_hub_callback
    >>> from moge_hf.run_record import hub_data, make_run_record
    >>> args = TrainingArguments("out/vit-moge", push_to_hub=True, hub_model_id="me/vit-moge", eval_strategy="epoch")
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=processor)
    >>> record = make_run_record(
    ...     train=hub_data("uoft-cs/cifar10", split="train", examples=len(train)),
    ...     eval=hub_data("uoft-cs/cifar10", split="test", examples=len(test)),
    ... )
    >>> add_moge_hub_callback(trainer, run_record=record, license="apache-2.0")
    >>> trainer.train()
    >>> trainer.push_to_hub()  # weights, config with auto_map, code, processor and the MoGE card
    ```
    """
    if callback is None:
        callback = MoGEHubCallback(**card_kwargs)
    elif card_kwargs:
        raise TypeError("add_moge_hub_callback: pass either `callback` or the arguments of a new one, not both")
    try:
        model = unwrap_moge_model(trainer.model)
    except ValueError:
        model = trainer.model
    if getattr(getattr(model, "config", None), "model_type", None) not in HOSTS:
        raise ValueError(
            f"add_moge_hub_callback needs a trainer of a MoGE model ({', '.join(HOSTS)}), got {type(model).__name__}"
        )
    for existing in [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MoGEHubCallback)]:
        trainer.callback_handler.remove_callback(existing)
    trainer.add_callback(callback)
    callback.trainer_ref = weakref.ref(trainer)
    trainer_ref = weakref.ref(trainer)

    def create_model_card(
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the MoGE model card to `args.output_dir/README.md` (replaces `Trainer.create_model_card`)."""
        trainer = trainer_ref()
        if trainer is None or not trainer.is_world_process_zero():
            return
        output_dir = trainer.args.output_dir
        has_processor = trainer.processing_class is not None or bool(
            [name for name in PROCESSOR_FILES if (Path(output_dir) / name).is_file()]
        )
        callback.write_card(
            output_dir,
            trainer.model,
            trainer.state,
            has_processor=has_processor,
            language=language,
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
            model_name=model_name,
            base_model=finetuned_from,
            dataset=dataset,
        )

    trainer.create_model_card = create_model_card
    return callback
