"""Sharing MoGE models on the Hugging Face Hub: model cards, upload folders, pushes, and `Trainer`'s own pushes.

A folder written by `save_pretrained` holds everything a Hub repo needs for loading without moge_hf: the weights,
`config.json` with an `auto_map`, and the code (`modeling_moge.py` and the files it imports). This module adds:

- [`render_model_card`]: a MoGE model card (a `huggingface_hub.ModelCard`) rendered from the templates in
  `moge_hf/model_cards/` with the model's real config and only the metrics the caller's results hold;
- [`check_moge_model_dir`], [`prepare_upload_folder`], [`push_model_dir`]: the checked folder that goes to the Hub
  (what `scripts/push_to_hub.py` uploads, or writes with `--dry-run`), and the upload itself;
- [`add_moge_hub_callback`]: makes `Trainer(push_to_hub=True)` push the code and a MoGE card too.
"""

import importlib.metadata
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import validate_repo_id
from packaging.requirements import Requirement
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files, get_relative_imports
from transformers.utils import logging

from .losses import resolve_map_shape
from .moge_model import HOSTS, MoGEHead, MoGEHost
from .training import unwrap_moge_model


logger = logging.get_logger(__name__)

__all__ = [
    "MODEL_CARD_TEMPLATES",  # noqa: F822 (module __getattr__: read from the host records)
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

# The card templates (jinja, rendered by `ModelCard.from_template`), one per model family (named by its `MoGEHost`),
# ship inside the package (`moge_hf/model_cards/`, package data), so an editable install and a wheel find them alike.
MODEL_CARD_TEMPLATES_DIR = Path(__file__).resolve().parent / "model_cards"
MOGE_TAGS = ("moge", "mixture-of-experts")


def __getattr__(name: str):
    # `MODEL_CARD_TEMPLATES` (model type -> template path) is read from the host records, which the modeling files
    # register after this module is imported: a new dict at each access (a new family adds a `MoGEHost`).
    if name == "MODEL_CARD_TEMPLATES":
        return {model_type: MODEL_CARD_TEMPLATES_DIR / host.card_template for model_type, host in HOSTS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Results files written by `Trainer.save_metrics`, most complete first.
RESULTS_FILES = ("all_results.json", "eval_results.json")

# Tokenizer, image processor and processor files that a model folder may hold next to the model.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "image_processor_config.json",
    "processor_config.json",
)
PROCESSOR_DIRS = ("additional_chat_templates",)
CONFIG_FILES = ("config.json", "generation_config.json")
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
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
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"results file {str(path)!r} is not valid JSON: {error}") from error
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


def _auto_map_modules(auto_map: Mapping[str, Any], where: str) -> set[str]:
    """Module names (`modeling_moge`, ...) that an `auto_map` refers to."""
    modules = set()
    for value in auto_map.values():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if reference is None:
                continue
            if not isinstance(reference, str) or "." not in reference:
                raise ValueError(f"{where}: `auto_map` entry {reference!r} is not of the form 'module.ClassName'")
            if "--" in reference:
                raise ValueError(
                    f"{where}: `auto_map` entry {reference!r} points to code in another Hub repository; save the "
                    "model with `save_pretrained` so that its code is in the folder"
                )
            modules.add(reference.rsplit(".", 1)[0])
    return modules


def _code_files(folder: Path, modules: set[str], missing_ok: bool = False) -> list[str]:
    """The `.py` files of `modules` in `folder` and every file they import relatively (followed as transformers'
    `get_relative_imports` reads them), checked to exist (with `missing_ok`, the ones there)."""
    files, missing = set(), set()
    todo = [f"{module.replace('.', '/')}.py" for module in sorted(modules)]
    while todo:
        name = todo.pop()
        if name in files or name in missing:
            continue
        path = folder / name
        if not path.is_file():
            missing.add(path.name)
            continue
        files.add(name)
        here = path.parent.relative_to(folder)
        todo += [str(here / f"{module.replace('.', '/')}.py") for module in get_relative_imports(path)]
    if missing and not missing_ok:
        raise ValueError(
            f"{folder}: the code files {sorted(missing)} that `auto_map` and the code need are missing; save the "
            "model with `save_pretrained` (with moge_hf imported), which writes them"
        )
    return sorted(files)


def _weight_files(folder: Path) -> list[str]:
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [SAFE_WEIGHTS_NAME]
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise ValueError(f"{folder}: the weight shards {missing} named in {SAFE_WEIGHTS_INDEX_NAME} are missing")
        return [SAFE_WEIGHTS_INDEX_NAME, *shards]
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (it has {others}: load the model and save it again with `save_pretrained`)" if others else ""
    raise ValueError(f"{folder}: no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}){hint}")


@dataclass
class _ModelFolder:
    path: Path
    config: dict
    code_files: list[str]
    weight_files: list[str]
    config_files: list[str]
    processor_files: list[str]
    processor_dirs: list[str]


def _inspect_model_dir(model_dir: str | os.PathLike, missing_code_ok: bool = False) -> _ModelFolder:
    """The checked contents of a saved MoGE model folder. `missing_code_ok`: code files may be missing (an upgrade of
    the code writes them)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder; pass the folder a MoGE model was saved to")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json, so it is not a saved model (save one with `save_pretrained`)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        json_type = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(config), "number")
        raise ValueError(
            f"{config_path} holds a JSON {json_type}, not an object: it is not the config of a saved model (save one "
            "with `save_pretrained`)"
        )
    model_type = config.get("model_type")
    if model_type not in HOSTS:
        raise ValueError(
            f"{folder} holds a model of type {model_type!r}, not a moge_hf model (model_type "
            f"{' or '.join(map(repr, HOSTS))})"
        )
    auto_map = config.get("auto_map") or {}
    if "AutoConfig" not in auto_map:
        raise ValueError(
            f"{config_path} has no `auto_map` for AutoConfig, so the folder cannot load with `trust_remote_code`; "
            "save the model with `save_pretrained` (with moge_hf imported), which writes it"
        )
    architectures = config.get("architectures") or []
    mapped_classes = {str(ref).rsplit(".", 1)[-1] for ref in auto_map.values() if isinstance(ref, str)}
    for architecture in architectures:
        if architecture not in mapped_classes:
            raise ValueError(
                f"{config_path}: the architecture {architecture!r} is not in its `auto_map` "
                f"({sorted(mapped_classes)}); save the model with `save_pretrained` so that every Auto class of the "
                "family is mapped"
            )
    modules = _auto_map_modules(auto_map, str(config_path))
    for name in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            extra = json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}
            modules |= _auto_map_modules(extra, str(path))
    return _ModelFolder(
        path=folder,
        config=config,
        code_files=_code_files(folder, modules, missing_ok=missing_code_ok),
        weight_files=_weight_files(folder),
        config_files=[name for name in CONFIG_FILES if (folder / name).is_file()],
        processor_files=[name for name in PROCESSOR_FILES if (folder / name).is_file()],
        processor_dirs=[name for name in PROCESSOR_DIRS if (folder / name).is_dir()],
    )


def _check_model_loads(folder: "_ModelFolder") -> None:
    """Load the folder's model as `from_pretrained` would (with the installed moge_hf) and raise a `ValueError` with
    the reason if it does not load, its weights do not match its config, or a weight is NaN or Inf."""
    from .upgrade_code import upgrade_model_code  # (it imports this module)

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
    return _inspect_model_dir(model_dir).config


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


def _architecture_rows(config: Mapping[str, Any], host: MoGEHost, architecture: str, num_parameters) -> list:
    pairs = [("class", f"`{architecture}`"), *host.card_rows(config)]
    if num_parameters is not None:
        pairs.append(("parameters (all experts)", f"{num_parameters:,}"))
    return _rows(pairs)


def _moge_rows(config: Mapping[str, Any], host: MoGEHost) -> list[dict[str, Any]]:
    shape = host.config_class.from_dict(dict(config))  # the family's names for the layer count and the MLP size
    num_layers, dense_size = shape.num_hidden_layers, shape.dense_intermediate_size
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
        row("expert hidden size", "expert_intermediate_size", config.get("expert_intermediate_size") or dense_size),
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


def _dataset_entries(dataset, dataset_config) -> list[dict[str, Any]]:
    if dataset is None:
        return []
    ids = [dataset] if isinstance(dataset, str) else list(dataset)
    return [{"id": name, "name": name, "config": dataset_config if i == 0 else None} for i, name in enumerate(ids)]


def render_model_card(
    model_dir_or_model: str | os.PathLike | PreTrainedModel,
    *,
    repo_id: str | None = None,
    results: Mapping[str, Any] | str | os.PathLike | None = None,
    dataset: str | list[str] | None = None,
    dataset_config: str | None = None,
    eval_split: str | None = "validation",
    eval_data: str | None = None,
    base_model: str | None = None,
    license: str | None = "apache-2.0",
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    model_name: str | None = None,
    training_hyperparameters: Mapping[str, Any] | None = None,
    has_processor: bool | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    r"""Render the model card of a MoGE model from its config and the metrics its run measured.

    The card (the family's template in `model_cards/`, e.g. `gpt2_moge.md`, rendered by
    `huggingface_hub.ModelCard.from_template`) holds Hub metadata (`library_name: transformers`, the `pipeline_tag` of
    the model's head, the tags `moge`, `mixture-of-experts`, `gpt2`/`vit` and `custom_code`, `datasets`, `base_model`,
    `license`, and a `model-index` built from `results`), then how MoGE differs from MoE, the MoGE settings read
    from the config, how to load the model with `trust_remote_code=True`, the training data, the results and the
    limitations. No number comes from anywhere but the config, the weights (parameter count) and `results`: without
    results the card says that results were not measured and has no `model-index`.

    Args:
        model_dir_or_model (`str`, `os.PathLike` or `PreTrainedModel`):
            A saved MoGE model folder (checked with [`check_moge_model_dir`]) or a MoGE model instance.
        repo_id (`str`, *optional*):
            The Hub repo id the card's loading code uses; a placeholder if not given.
        results (`Mapping`, `str` or `os.PathLike`, *optional*):
            The run's metrics, or the path of a JSON file holding them, such as `Trainer`'s `all_results.json` or
            `eval_results.json` (see [`find_results_file`]). Keys `eval_<name>` (and `perplexity`) are results on
            `eval_split`, `test_<name>` on `"test"`; they go into `model-index` when `dataset` is given. `train_<name>`
            and `epoch` are listed as training metrics. Runtimes, throughputs and sample counts are left out.
        dataset (`str` or `list[str]`, *optional*):
            Hub id(s) of the training / evaluation dataset (the first one is the evaluation dataset of `model-index`).
        dataset_config (`str`, *optional*):
            Config name of the first dataset.
        eval_split (`str`, *optional*, defaults to `"validation"`):
            The split of `dataset` that the `eval_*` metrics were measured on, whole. `None` when they were measured
            on anything else (a held-out part of the training split, local files, a subset of a split): the card
            then has no `model-index`, whose entries would claim a Hub split.
        eval_data (`str`, *optional*):
            What the `eval_*` metrics were measured on, in words, for the card's text (e.g. "the last 5% of the
            lines of input.txt, held out"); defaults to the split of `dataset`. With `eval_samples` in `results`, the
            card also gives the number of examples.
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
        training_hyperparameters (`Mapping`, *optional*):
            Hyperparameters of the run (learning rate, batch size, ...) to list in the card.
        has_processor (`bool`, *optional*):
            Whether the repo holds the tokenizer / image processor; found from the folder when one is given.
            `False` adds a note on how to preprocess inputs.
        template_path (`str` or `os.PathLike`, *optional*):
            Another jinja template to render (it gets the same variables as the `model_cards/` ones).

    Returns:
        `huggingface_hub.ModelCard`: the card; `card.save(path)` writes it (`README.md` on the Hub).

    Raises:
        `ValueError`: `model_dir_or_model` is not a MoGE model (folder), or `results` is not a mapping of metrics.

    Example:

    ```python
    >>> from moge_hf.hub import render_model_card
    >>> card = render_model_card("out/gpt2-moge", repo_id="me/gpt2-moge", results="out/gpt2-moge/all_results.json",
    ...                          dataset="karpathy/tiny_shakespeare")
    >>> card.save("out/gpt2-moge/README.md")
    ```
    """
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
            code_files += sorted(Path(path).name for path in get_relative_import_files(code_module.__file__))
        folder_name = None
    else:
        folder = _inspect_model_dir(model_dir_or_model)
        config = folder.config
        mro_names = ()
        architecture = (config.get("architectures") or [None])[0]
        num_parameters = _count_parameters(folder.path, folder.weight_files)
        code_files = folder.code_files
        if has_processor is None:
            has_processor = bool(folder.processor_files)
        folder_name = folder.path.resolve().name
    host = HOSTS[config["model_type"]]
    auto_class, head = _head_of(host, architecture, config.get("auto_map") or {}, mro_names)
    architecture = architecture or head.model_class.__name__
    if model_name is None:
        model_name = repo_id.split("/")[-1] if repo_id else folder_name or architecture

    numbers = load_results(results)
    metrics = _classify_metrics(numbers)
    eval_metrics = [metric for metric in metrics if metric.split in ("eval", "test")]
    train_metrics = [metric for metric in metrics if metric.split == "train"]
    datasets = _dataset_entries(dataset, dataset_config)
    if eval_data is None and eval_split is not None and datasets:
        eval_data = f"the `{eval_split}` split of `{datasets[0]['id']}`"
    eval_samples = numbers.get("eval_samples")
    if eval_samples is not None and (eval_samples < 0 or eval_samples != int(eval_samples)):
        raise ValueError(f"results: eval_samples must be a whole number of examples, at least 0, got {eval_samples}")
    eval_results = None
    if any(metric.split == "eval" for metric in eval_metrics) and eval_split is None:
        eval_metrics_for_index = [metric for metric in eval_metrics if metric.split == "test"]
    else:
        eval_metrics_for_index = eval_metrics
    if eval_metrics_for_index and datasets:
        eval_results = [
            EvalResult(
                task_type=head.pipeline_tag,
                dataset_type=datasets[0]["id"],
                dataset_name=datasets[0]["name"],
                dataset_config=datasets[0]["config"],
                dataset_split=eval_split if metric.split == "eval" else "test",
                metric_type=metric.name,
                metric_name=_metric_display_name(metric.name),
                metric_value=metric.value,
            )
            for metric in eval_metrics_for_index
        ]
    elif eval_metrics and not datasets:
        logger.warning(
            "render_model_card: results were given but no `dataset`, so the card lists them without a `model-index`"
        )

    all_tags = [*MOGE_TAGS, host.hub_tag, "custom_code"]
    for tag in tags or []:
        if tag not in all_tags:
            all_tags.append(tag)
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag=head.pipeline_tag,
        tags=all_tags,
        datasets=[entry["id"] for entry in datasets] or None,
        base_model=base_model,
        metrics=sorted({metric.name for metric in eval_metrics}) if eval_results else None,
        model_name=model_name if eval_results else None,  # `model-index` needs a name; the card needs no other
        eval_results=eval_results,
    )
    labels, num_labels = _labels(config)
    top_k = config["num_experts_per_tok"]
    variables = {
        "model_name": model_name,
        "repo_id": repo_id or "your-username/your-moge-model",
        "head": head.kind,
        "head_description": head.description,
        "auto_class": auto_class,
        "pipeline_tag": head.pipeline_tag,
        "architecture": architecture,
        "moe_layers_text": _layers_text(config["moe_layers"]),
        "lambda_is_zero": not config.get("moge_loss_coef"),
        "base_model": base_model,
        "architecture_rows": _architecture_rows(config, host, architecture, num_parameters),
        "moge_rows": _moge_rows(config, host),
        "code_files": code_files,
        "has_processor": has_processor,
        "datasets": datasets,
        "hyperparameter_rows": _rows([(str(k), v) for k, v in (training_hyperparameters or {}).items()]),
        "eval_rows": [
            {
                "split": (eval_split or "evaluation") if metric.split == "eval" else "test",
                "name": _metric_display_name(metric.name),
                "value": _format_number(metric.value),
            }
            for metric in eval_metrics
        ],
        "train_rows": _rows([(_train_metric_name(m.name), _format_number(m.value)) for m in train_metrics]),
        "model_index": eval_results is not None,
        "eval_data": eval_data,
        "eval_samples": int(eval_samples) if eval_samples is not None else None,
        "results_source": f"`{Path(results).name}`" if isinstance(results, (str, os.PathLike)) else None,
        "labels": labels,
        "num_labels": num_labels,
        "labels_truncated": num_labels > len(labels),
        "num_experts": config["num_experts"],
        "top_k": top_k,
        "vocab_size": config.get("vocab_size"),
        "n_positions": config.get("n_positions"),
        "image_size": config.get("image_size"),
        "patch_size": config.get("patch_size"),
        "num_channels": config.get("num_channels"),
        "example_text": "Once upon a time",
        "moge_hf_version": _moge_hf_version(),
        "transformers_requirement": _transformers_requirement(),
    }
    template = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATES_DIR / host.card_template
    if not template.is_file():
        raise FileNotFoundError(
            f"model card template {str(template)!r} not found (the templates ship in the package's `model_cards/` "
            "folder; pass `template_path=`)"
        )
    card = ModelCard.from_template(card_data, template_path=str(template), **variables)
    # Collapse the blank lines that the template's jinja blocks leave behind.
    card.text = re.sub(r"\n{3,}", "\n\n", card.text).strip() + "\n"
    return card


def _layers_text(layers: list[int]) -> str:
    layers = sorted(layers)
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return "layers " + ", ".join(str(i) for i in layers[:-1]) + f" and {layers[-1]}"


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
    `upcycling.py`), the tokenizer / image processor files if present, and `README.md`: the MoGE card of
    [`render_model_card`] (replacing any README in `model_dir`).
    Checkpoints, optimizer states, `training_args.bin` (a pickle) and logs are left out.

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
            Other arguments of [`render_model_card`] (`dataset`, `base_model`, `license`, ...).

    Returns:
        `list[str]`: the paths written, relative to `out_dir`, sorted.

    Raises:
        `ValueError`: `model_dir` is not a MoGE model folder, its code files are not the installed moge_hf's (saved
            by another release: `python -m moge_hf.upgrade_code` refreshes them), its model does not load (bad
            config, weights that do not match it, NaN or Inf weights), `out_dir` is not empty, or `repo_id` is
            invalid.
    """
    folder = _inspect_model_dir(model_dir)
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
        card_kwargs: Other arguments of [`render_model_card`] (`dataset`, `base_model`, `license`, ...).

    Returns:
        `huggingface_hub.CommitInfo`: the commit (its `commit_url`, `oid`, ...).

    Raises:
        `ValueError`: `model_dir` is not a MoGE model folder, or `repo_id` is not a valid repo id.
        [`HubTokenError`]: no token was found (before any network call).
    """
    _inspect_model_dir(model_dir)
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
    run, are ignored).

    Args:
        card_kwargs:
            Arguments of [`render_model_card`] (`dataset`, `dataset_config`, `base_model`, `license`, `language`,
            `tags`, `results`, ...). `repo_id` defaults to the trainer's Hub repo.
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
            kwargs["training_hyperparameters"] = _trainer_hyperparameters(trainer)
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


def _trainer_hyperparameters(trainer: Trainer) -> dict[str, Any]:
    try:
        from transformers.modelcard import extract_hyperparameters_from_trainer

        return dict(extract_hyperparameters_from_trainer(trainer))
    except Exception as error:  # an internal helper of transformers: never let it break a push
        logger.warning(f"Could not read the trainer's hyperparameters for the model card: {error}")
        return {}


def add_moge_hub_callback(trainer: Trainer, callback: MoGEHubCallback | None = None, **card_kwargs) -> MoGEHubCallback:
    r"""Make `trainer`'s pushes to the Hub (`push_to_hub=True`, `trainer.push_to_hub()`) carry the MoGE code and card.

    Adds a [`MoGEHubCallback`] (which writes the code and the card at every checkpoint push) and replaces this
    trainer's `create_model_card` (which `Trainer.push_to_hub` calls after saving the model and before uploading) by
    one that writes the MoGE card instead of `Trainer`'s generic one. Its arguments (`license`, `tags`, `dataset`,
    `finetuned_from`, `language`, `model_name`, as `trainer.push_to_hub(**kwargs)` passes them) fill the card:
    `finetuned_from` becomes `base_model`. Calling this again replaces the callback.

    Args:
        trainer (`Trainer`): A trainer of a MoGE model.
        callback (`MoGEHubCallback`, *optional*): The callback to attach; by default a new one built with
            `card_kwargs`.
        card_kwargs: Arguments of [`render_model_card`] for the cards (`dataset`, `base_model`, `license`, ...).

    Returns:
        `MoGEHubCallback`: the attached callback.

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> from moge_hf.hub import add_moge_hub_callback
    >>> args = TrainingArguments("out/vit-moge", push_to_hub=True, hub_model_id="me/vit-moge", eval_strategy="epoch")
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=processor)
    >>> add_moge_hub_callback(trainer, dataset="uoft-cs/cifar10", license="apache-2.0")
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
