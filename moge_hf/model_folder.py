"""What a saved MoGE model folder holds, checked: its config, the code files its `auto_map` needs, its weights, and
the tokenizer / processor files beside them.

`save_pretrained` of a moge_hf model writes such a folder. The Hub code (`hub.py`: cards, upload folders) and the
code upgrade (`upgrade_code.py`) both read folders through [`inspect_model_dir`].
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.dynamic_module_utils import get_relative_imports

from .moge_model import HOSTS


def read_json(path: Path, what: str) -> Any:
    """The JSON value in the file `path`; `what` names the file in the `ValueError` raised for invalid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON: {error}") from error


__all__ = ["ModelFolder", "auto_map_modules", "inspect_model_dir"]

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


def auto_map_modules(auto_map: Mapping[str, Any], where: str) -> set[str]:
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
        weight_map = read_json(index, str(index))
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ValueError(f"{index} has no `weight_map` of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise ValueError(f"{folder}: the weight shards {missing} named in {SAFE_WEIGHTS_INDEX_NAME} are missing")
        return [SAFE_WEIGHTS_INDEX_NAME, *shards]
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (it has {others}: load the model and save it again with `save_pretrained`)" if others else ""
    raise ValueError(f"{folder}: no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}){hint}")


@dataclass
class ModelFolder:
    path: Path
    config: dict
    code_files: list[str]
    weight_files: list[str]
    config_files: list[str]
    processor_files: list[str]
    processor_dirs: list[str]


def inspect_model_dir(model_dir: str | os.PathLike, missing_code_ok: bool = False) -> ModelFolder:
    """The checked contents of a saved MoGE model folder. `missing_code_ok`: code files may be missing (an upgrade of
    the code writes them)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder; pass the folder a MoGE model was saved to")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json, so it is not a saved model (save one with `save_pretrained`)")
    config = read_json(config_path, str(config_path))
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
    modules = auto_map_modules(auto_map, str(config_path))
    for name in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            extra = read_json(path, str(path))
            extra = (extra.get("auto_map") if isinstance(extra, dict) else None) or {}
            modules |= auto_map_modules(extra, str(path))
    return ModelFolder(
        path=folder,
        config=config,
        code_files=_code_files(folder, modules, missing_ok=missing_code_ok),
        weight_files=_weight_files(folder),
        config_files=[name for name in CONFIG_FILES if (folder / name).is_file()],
        processor_files=[name for name in PROCESSOR_FILES if (folder / name).is_file()],
        processor_dirs=[name for name in PROCESSOR_DIRS if (folder / name).is_dir()],
    )
