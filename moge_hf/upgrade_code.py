"""Refresh the code files of a saved MoGE model folder with the installed moge_hf's, leaving weights and config alone.

A folder written by `save_pretrained` carries its own copy of moge_hf's code (the family's modeling file, e.g.
`modeling_gpt2_moge.py`, and the files it imports), and `trust_remote_code=True` runs that copy under whatever
transformers the loading user has. A folder saved by an older moge_hf can therefore stop loading when transformers
changes (moge_hf 0.1.0's code fails under transformers 5.24, which renamed the KV cache). This writes the installed
moge_hf's code files into the folder, the same files `save_pretrained` would write today (and, for a folder whose
`auto_map` names 0.1.0's `modeling_moge`, that module, now a shim that imports the new files), and nothing else: the
weights, `config.json` and every other file stay byte for byte as they were. The replaced files are moved to a backup
folder beside the model folder, and a summary of the change is printed.

    python -m moge_hf.upgrade_code path/to/saved_model [more folders ...] [--dry_run] [--show_diff]

A Hub repo: download it, upgrade the local copy, upload the code files only:

    hf download user/model --local-dir model
    python -m moge_hf.upgrade_code model
    hf upload user/model model --include "*.py"
"""

import argparse
import difflib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files

from .hub import _auto_map_modules, _inspect_model_dir
from .moge_model import HOSTS


# Modules that an older release's `auto_map` names and today's code keeps as import shims, with that release: moge_hf
# 0.1.0 saved `modeling_moge.GPT2MoGELMHeadModel`, ... (the models now live in one modeling file per family).
LEGACY_MODULES = {"modeling_moge": "0.1.0"}


__all__ = ["CodeUpgrade", "upgrade_model_code"]


@dataclass
class CodeUpgrade:
    """What [`upgrade_model_code`] did (or, with `dry_run`, would do) to one folder."""

    folder: Path
    changed: list[str] = field(default_factory=list)  # code files replaced by the installed moge_hf's
    added: list[str] = field(default_factory=list)  # code files the folder lacked
    unchanged: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)  # old code files today's code no longer imports (kept)
    backup: Path | None = None  # where the replaced files went
    diffs: dict[str, str] = field(default_factory=dict)  # unified diff per changed file
    dry_run: bool = False
    saved_by: str | None = None  # the older release that saved the folder, where its `auto_map` tells (e.g. "0.1.0")

    @property
    def up_to_date(self) -> bool:
        return not (self.changed or self.added)

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.folder}: code already that of the installed moge_hf; nothing written"
        header = f"{self.folder}:"
        if self.saved_by:
            header += f" code of moge_hf {self.saved_by} (its auto_map names that release's modules)"
        lines = [header + (" (dry run: nothing written)" if self.dry_run else "")]
        for name in self.changed:
            added = sum(line.startswith("+") and not line.startswith("+++") for line in self.diffs[name].splitlines())
            removed = sum(
                line.startswith("-") and not line.startswith("---") for line in self.diffs[name].splitlines()
            )
            lines.append(f"  updated {name} (+{added} -{removed} lines)")
        lines += [f"  added   {name}" for name in self.added]
        lines += [f"  kept    {name} (no longer imported by the new code)" for name in self.left_alone]
        if self.backup is not None:
            lines.append(f"  the replaced files are in {self.backup}")
        lines.append("  weights, config.json and all other files untouched")
        return "\n".join(lines)


def _fresh_code(model_type: str, into: Path, mapped_modules: set[str] = frozenset()) -> list[str]:
    """Write the code files `save_pretrained` writes today for `model_type` into `into`, plus the import shims of the
    legacy modules among `mapped_modules` (what the folder's `auto_map` names); return their names."""
    if model_type not in HOSTS:
        raise ValueError(f"model_type {model_type!r} is not a moge_hf model family ({sorted(HOSTS)})")
    classes = [*HOSTS[model_type].auto_classes.values(), HOSTS[model_type].config_class]
    names = set()
    for cls in classes:  # transformers' own copy: the module file and every file it imports relatively
        names |= {Path(path).name for path in custom_object_save(cls, into)}
    for module in sorted(set(mapped_modules) & set(LEGACY_MODULES)):
        source = Path(__file__).with_name(f"{module}.py")
        for path in [source, *map(Path, get_relative_import_files(str(source)))]:
            shutil.copy(path, into / path.name)
            names.add(path.name)
    return sorted(names)


def upgrade_model_code(
    model_dir: str | os.PathLike, *, backup_dir: str | os.PathLike | None = None, dry_run: bool = False
) -> CodeUpgrade:
    """Replace the code files of the saved MoGE model in `model_dir` by the installed moge_hf's.

    Only `.py` files are written: those `save_pretrained` writes today (the modules `config.json`'s `auto_map` names
    and the files they import relatively). Weights, `config.json`, tokenizer and every other file are not opened for
    writing. Old code files that the new code no longer imports are left in place and reported.

    Args:
        model_dir (`str` or `os.PathLike`):
            A folder written by `save_pretrained` of a moge_hf model (any release).
        backup_dir (`str` or `os.PathLike`, *optional*):
            Where the replaced files go; it must not exist. Defaults to
            `<model_dir>.code-backup-<UTC time>` beside the model folder.
        dry_run (`bool`, *optional*, defaults to `False`):
            Only report what would change.

    Returns:
        [`CodeUpgrade`]: the files changed, added and unchanged, the diffs and the backup folder.

    Raises:
        `ValueError`: `model_dir` is not a saved moge_hf model, its `auto_map` names a module the installed moge_hf
        does not write, or `backup_dir` exists.
    """
    folder = _inspect_model_dir(model_dir)
    result = CodeUpgrade(folder=folder.path, dry_run=dry_run)
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        mapped_modules = _auto_map_modules(folder.config.get("auto_map") or {}, "config.json")
        result.saved_by = next((LEGACY_MODULES[m] for m in sorted(mapped_modules) if m in LEGACY_MODULES), None)
        fresh = _fresh_code(folder.config["model_type"], staging, mapped_modules)
        mapped = {f"{module}.py" for module in mapped_modules}
        if not mapped <= set(fresh):
            raise ValueError(
                f"{folder.path}/config.json maps the Auto classes to {sorted(mapped)}, but the installed moge_hf "
                f"writes {fresh}: this moge_hf cannot upgrade the folder without changing its config"
            )
        for name in fresh:
            old_path, new_text = folder.path / name, (staging / name).read_text(encoding="utf-8")
            if not old_path.is_file():
                result.added.append(name)
                continue
            old_text = old_path.read_text(encoding="utf-8")
            if old_text == new_text:
                result.unchanged.append(name)
                continue
            result.changed.append(name)
            diff = difflib.unified_diff(
                old_text.splitlines(keepends=True), new_text.splitlines(keepends=True), f"old/{name}", f"new/{name}"
            )
            result.diffs[name] = "".join(diff)
        result.left_alone = sorted(set(folder.code_files) - set(fresh))
        if dry_run or result.up_to_date:
            return result

        if result.changed:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            backup = (
                Path(backup_dir)
                if backup_dir is not None
                else folder.path.with_name(f"{folder.path.name}.code-backup-{stamp}")
            )
            if backup.exists():
                raise ValueError(f"the backup folder {backup} exists already; pass another `backup_dir`")
            backup.mkdir(parents=True)
            for name in result.changed:
                shutil.copy2(folder.path / name, backup / name)
            result.backup = backup
        # Each file is written beside its target and renamed over it, so a kill leaves every file whole.
        for name in result.changed + result.added:
            partial = folder.path / f".{name}.upgrading"
            shutil.copyfile(staging / name, partial)
            os.replace(partial, folder.path / name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moge_hf.upgrade_code",
        description="Refresh the code files of saved MoGE model folders with the installed moge_hf's code "
        "(weights and config untouched; the replaced files are kept in a backup folder).",
    )
    parser.add_argument("model_dirs", nargs="+", help="folders written by save_pretrained")
    parser.add_argument("--dry_run", action="store_true", help="only show what would change")
    parser.add_argument("--show_diff", action="store_true", help="print the unified diff of every changed file")
    parser.add_argument("--backup_dir", help="where the replaced files go (one folder only; default: beside it)")
    args = parser.parse_args(argv)
    if args.backup_dir is not None and len(args.model_dirs) > 1:
        parser.error("--backup_dir takes one model folder")
    from . import __version__

    print(f"installed: moge_hf {__version__}, transformers {transformers.__version__}")
    failed = False
    for model_dir in args.model_dirs:
        try:
            result = upgrade_model_code(model_dir, backup_dir=args.backup_dir, dry_run=args.dry_run)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            failed = True
            continue
        print(result.summary())
        if args.show_diff:
            print("".join(result.diffs.values()), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
