"""Refresh the code files of a saved MoGE model folder with the installed moge_hf's, leaving weights and config alone.

A folder written by `save_pretrained` carries its own copy of moge_hf's code (the family's modeling file, e.g.
`modeling_gpt2_moge.py`, and the files it imports), and `trust_remote_code=True` runs that copy under whatever
transformers the loading user has. A folder saved by an older moge_hf can therefore stop loading when transformers
changes (moge_hf 0.1.0's code fails under transformers 5.24, which renamed the KV cache). This writes the installed
moge_hf's code files into the folder, the same files `save_pretrained` would write today (and, for a folder whose
`auto_map` names 0.1.0's `modeling_moge`, that module, now a shim that imports the new files), and nothing else: the
weights, `config.json` and every other file stay byte for byte as they were. The replaced files are moved to a backup
folder beside the model folder, and a summary of the change is printed. The new files are staged in the folder and
renamed into place by a journal: an interrupted upgrade leaves the old code or a folder that refuses to load (saying to
run the upgrade again, which finishes it), never a mix of two releases; a second upgrade of a folder being upgraded is
refused.

    python -m moge_hf.upgrade_code path/to/saved_model [more folders ...] [--dry_run] [--show_diff]

A Hub repo: download it, upgrade the local copy, upload the code files only:

    hf download user/model --local-dir model
    python -m moge_hf.upgrade_code model
    hf upload user/model model --include "*.py"
"""

import argparse
import contextlib
import difflib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files

from .model_folder import auto_map_modules, inspect_model_dir
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
    saved_by: str | None = None  # the older release whose code the folder holds, where that shows (e.g. "0.1.0")
    resumed: list[str] = field(default_factory=list)  # code files an interrupted upgrade had left to write, written
    resumed_backup: Path | None = None  # where that upgrade put the files it replaced
    entry_modules: list[str] = field(
        default_factory=list, repr=False
    )  # the files `auto_map` names, AutoConfig's first

    @property
    def up_to_date(self) -> bool:
        return not (self.changed or self.added)

    def summary(self) -> str:
        resumed = ""
        if self.resumed:
            resumed = f"  finished an interrupted upgrade: wrote {', '.join(self.resumed)}"
            if self.resumed_backup is not None:
                resumed += f" (the files it replaced are in {self.resumed_backup})"
        if self.up_to_date:
            if resumed:
                return f"{self.folder}:\n{resumed}\n  code now that of the installed moge_hf"
            return f"{self.folder}: code already that of the installed moge_hf; nothing written"
        header = f"{self.folder}:"
        if self.saved_by:
            header += f" code of moge_hf {self.saved_by} (its auto_map names that release's modules)"
        lines = [header + (" (dry run: nothing written)" if self.dry_run else "")] + [resumed] * bool(resumed)
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


# The files an upgrade keeps in the model folder while it runs (none stays after it): the lock a running upgrade holds,
# the journal of an upgrade under way and the new files it stages (`new/`) with the placeholders (`stub/`).
LOCK_NAME = ".moge_hf-upgrade.lock"
JOURNAL_NAME = ".moge_hf-upgrade.json"
STAGING_NAME = ".moge_hf-upgrade-staging"


# What the modules `auto_map` names hold while an upgrade replaces the code files: a folder whose upgrade is
# interrupted (killed) refuses to load, saying how to finish, rather than loading a mix of two releases.
def _placeholder(folder: Path) -> bytes:
    message = (
        f"An upgrade of the code files of the model folder {folder} by `python -m moge_hf.upgrade_code` was "
        f"interrupted: run `python -m moge_hf.upgrade_code {folder}` again, which finishes it."
    )
    header = '"""Written by `python -m moge_hf.upgrade_code` while it replaces the code files of this folder."""'
    return f"{header}\n\nraise ImportError(\n    {message!r}\n)\n".encode()


def _not_writable(folder: Path, error: OSError) -> ValueError:
    return ValueError(
        f"{folder} is not writable ({error.strerror or error}): the upgrade writes its code files there; make the "
        "folder writable (or upgrade a writable copy of it); nothing was changed"
    )


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Hold `folder`'s upgrade lock (an advisory lock on a file in it, released by the system if the process dies)."""
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _not_writable(folder, error) from error
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            raise ValueError(
                f"{folder} is being upgraded by another process (it holds {path}); wait for it to finish, then run "
                "again"
            ) from error
        try:  # the lock file of a run that has just finished (and removed it) does not count: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _write_journal(folder: Path, journal: dict) -> None:
    """Write the journal whole or not at all (a rename over the old one)."""
    partial = folder / f"{JOURNAL_NAME}.partial"
    _write_durably(partial, json.dumps(journal, indent=1).encode())
    os.replace(partial, folder / JOURNAL_NAME)


def _read_journal(folder: Path) -> dict | None:
    """The journal of an interrupted upgrade of `folder`, checked to name only plain code files (the folder may come
    from elsewhere: its journal must not make the next run write outside the folder)."""
    path = folder / JOURNAL_NAME
    if not path.is_file():
        return None

    def plain(name) -> bool:
        return isinstance(name, str) and name.endswith(".py") and name == Path(name).name and not name.startswith(".")

    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        steps, backed_up = journal["steps"], journal["backed_up"]
        if not (
            journal["state"] in ("preparing", "applying")
            and isinstance(journal["backup"], (str, type(None)))
            and all(plain(name) for name in backed_up)
            and all(
                isinstance(step, list)
                and len(step) == 2
                and plain(step[1])
                and step[0] in (f"new/{step[1]}", f"stub/{step[1]}")
                for step in steps
            )
        ):
            raise ValueError("unexpected content")
        return journal
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path}, the journal of an interrupted upgrade, cannot be read ({error}); restore the replaced code "
            "files from the newest backup folder beside the model folder, then remove the journal and the folder "
            f"{folder / STAGING_NAME}"
        ) from error


def _remove_own_backup(folder: Path, journal: dict) -> None:
    """Remove the backup folder of an upgrade that is undone: the copies in it of the folder's code files (whole, or
    cut short by a kill), then the backup folder if that leaves it empty."""
    if journal.get("backup") is None or not Path(journal["backup"]).is_dir():
        return
    backup = Path(journal["backup"])
    for name in journal["backed_up"]:
        copy, original = backup / name, folder / name
        if copy.is_file() and original.is_file() and original.read_bytes().startswith(copy.read_bytes()):
            os.unlink(copy)
    with contextlib.suppress(OSError):
        backup.rmdir()


def _finish_interrupted(folder: Path) -> tuple[list[str], Path | None] | None:
    """Finish the interrupted upgrade whose journal `folder` holds: undo one that had not started replacing files, or
    replace the remaining files. Returns the files it wrote and the backup folder, or `None` if it wrote none."""
    journal = _read_journal(folder)
    staging = folder / STAGING_NAME
    with contextlib.suppress(FileNotFoundError):  # a journal half written
        os.unlink(folder / f"{JOURNAL_NAME}.partial")
    if journal is None:  # an upgrade killed before it wrote its journal, or after it removed it
        if staging.exists():
            shutil.rmtree(staging)
        return None
    if journal["state"] == "preparing":  # killed before replacing any file: the old code is whole
        _remove_own_backup(folder, journal)
        if staging.exists():
            shutil.rmtree(staging)
        os.unlink(folder / JOURNAL_NAME)
        return None
    written = []
    for source, name in journal["steps"]:  # the steps in order: where the first one still staged was, go on
        if (staging / source).is_file():
            os.replace(staging / source, folder / name)
            if source.startswith("new/"):
                written.append(name)
    os.unlink(folder / JOURNAL_NAME)
    shutil.rmtree(staging, ignore_errors=True)
    return sorted(set(written)), Path(journal["backup"]) if journal.get("backup") else None


def _backup_folder(folder: Path, backup_dir: str | os.PathLike | None) -> Path:
    """The backup folder to create: `backup_dir`, or the first of `<folder>.code-backup-<UTC time>[-n]` beside
    `folder` that does not exist."""
    if backup_dir is not None:
        backup = Path(os.path.abspath(backup_dir))
        if backup.exists():
            raise ValueError(f"the backup folder {backup_dir} exists already; pass another `backup_dir`")
        return backup
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    attempt = 1
    while (backup := folder.with_name(f"{folder.name}.code-backup-{stamp}" + f"-{attempt}" * (attempt > 1))).exists():
        attempt += 1
    return backup


def upgrade_model_code(
    model_dir: str | os.PathLike, *, backup_dir: str | os.PathLike | None = None, dry_run: bool = False
) -> CodeUpgrade:
    """Replace the code files of the saved MoGE model in `model_dir` by the installed moge_hf's.

    Only `.py` files are written: those `save_pretrained` writes today (the modules `config.json`'s `auto_map` names
    and the files they import relatively). Weights, `config.json`, tokenizer and every other file are not opened for
    writing. Old code files that the new code no longer imports are left in place and reported.

    The new files are staged in the folder first and then renamed over the old ones, following a journal: the modules
    `auto_map` names are first replaced by placeholders that refuse to load, and last by their new versions. An
    upgrade that is interrupted (the process killed) leaves the old code, or the placeholders (the folder refuses to
    load, saying to run the upgrade again), never a mix of two releases; the next run finishes it. Two upgrades of
    one folder do not run at once: the second is refused.

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
        does not write, it holds a file that is not the model's code where the installed moge_hf writes one, it or
        the backup place is not writable, another upgrade of it is running, or `backup_dir` exists.
    """
    where = Path(os.path.abspath(model_dir))  # `.` and `..` have no name to put the backup beside
    interrupted = where.is_dir() and (where / JOURNAL_NAME).exists()
    if dry_run:
        if interrupted:
            raise ValueError(
                f"an upgrade of {model_dir} is under way or was interrupted (it holds {JOURNAL_NAME}); once no "
                "upgrade of it runs, run it again without --dry_run (`dry_run=False`), which finishes it"
            )
        return _plan(model_dir, where, dry_run=True)[0]
    if not interrupted:  # refuse what is not a model folder before writing the lock into it
        inspect_model_dir(model_dir, missing_code_ok=True)
    with _folder_lock(where):
        try:
            resumed = _finish_interrupted(where)
        except OSError as error:
            raise ValueError(
                f"finishing the interrupted upgrade of {model_dir} failed ({error}); fix the cause and run again"
            ) from error
        result, staged = _plan(model_dir, where, dry_run=False)
        try:
            if resumed is not None:
                result.resumed, result.resumed_backup = resumed
            if not result.up_to_date:
                _apply(result, where, staged, backup_dir)
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)
    return result


def _plan(model_dir: str | os.PathLike, where: Path, *, dry_run: bool) -> tuple[CodeUpgrade, Path]:
    """What an upgrade of the folder does, and the folder (a temporary one) that holds the new code files."""
    folder = inspect_model_dir(model_dir, missing_code_ok=True)
    result = CodeUpgrade(folder=folder.path, dry_run=dry_run)
    staged = Path(tempfile.mkdtemp(prefix="moge_hf-upgrade-")) / "new"
    staged.mkdir()
    try:
        mapped_modules = auto_map_modules(folder.config.get("auto_map") or {}, "config.json")
        result.saved_by = _legacy_release(folder.path, folder.config["model_type"], mapped_modules)
        fresh = _fresh_code(folder.config["model_type"], staged, mapped_modules)
        mapped = {f"{module}.py" for module in mapped_modules}
        if not mapped <= set(fresh):
            raise ValueError(
                f"{folder.path}/config.json maps the Auto classes to {sorted(mapped)}, but the installed moge_hf "
                f"writes {fresh}: this moge_hf cannot upgrade the folder without changing its config"
            )
        result.entry_modules = sorted(mapped, key=lambda name: (name != _config_module(folder.config), name))
        for name in fresh:
            old_path, new_text = folder.path / name, (staged / name).read_text(encoding="utf-8")
            if not old_path.exists():
                result.added.append(name)
                continue
            old_text = old_path.read_text(encoding="utf-8") if old_path.is_file() else None
            if old_text == new_text:
                result.unchanged.append(name)
                continue
            if name not in folder.code_files:  # the user's file, which only shares the name of one of ours
                raise ValueError(
                    f"{folder.path / name} is not code of the model (nothing that `auto_map` names imports it), and "
                    f"the installed moge_hf writes a code file of that name: move or rename it, then run again; "
                    "nothing was changed"
                )
            result.changed.append(name)
            diff = difflib.unified_diff(
                old_text.splitlines(keepends=True), new_text.splitlines(keepends=True), f"old/{name}", f"new/{name}"
            )
            result.diffs[name] = "".join(diff)
        result.left_alone = sorted(set(folder.code_files) - set(fresh))
    except BaseException:
        shutil.rmtree(staged.parent, ignore_errors=True)
        raise
    if dry_run:
        shutil.rmtree(staged.parent, ignore_errors=True)
    return result, staged


def _legacy_release(folder: Path, model_type: str, mapped_modules: set[str]) -> str | None:
    """The older release whose code `folder` holds, where that shows: a module of `LEGACY_MODULES` that its `auto_map`
    names and whose file still defines the family's models. An upgrade replaces that file by today's import shim and
    leaves `config.json` (so its `auto_map`) as it was: such a folder holds the code of the moge_hf that upgraded it,
    not the legacy release's."""
    model_classes = [cls.__name__ for cls in HOSTS[model_type].auto_classes.values()]
    for module in sorted(set(mapped_modules) & set(LEGACY_MODULES)):
        path = folder / f"{module}.py"
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        if any(re.search(rf"^class {name}\b", text, re.MULTILINE) for name in model_classes):
            return LEGACY_MODULES[module]
    return None


def _config_module(config: dict) -> str:
    reference = (config.get("auto_map") or {}).get("AutoConfig")
    reference = reference[0] if isinstance(reference, (list, tuple)) else reference
    return f"{str(reference).rsplit('.', 1)[0]}.py"


def _apply(result: CodeUpgrade, where: Path, staged: Path, backup_dir: str | os.PathLike | None) -> None:
    """Back up the files to replace, stage the new ones in the folder, then rename them into place by the journal."""
    entries = result.entry_modules  # the AutoConfig module first: every load starts there
    others = [name for name in result.changed + result.added if name not in entries]
    steps = (
        [[f"stub/{name}", name] for name in entries]
        + [[f"new/{name}", name] for name in others]
        + [[f"new/{name}", name] for name in reversed(entries)]  # the AutoConfig module last
    )
    staging = where / STAGING_NAME
    backup = _backup_folder(where, backup_dir) if result.changed else None
    journal = {
        "state": "preparing",
        "backup": None if backup is None else str(backup),
        "backed_up": sorted(result.changed),
        "steps": steps,
    }
    try:
        # Preparing: nothing in the folder's code is touched, and an error (or the next run, after a kill) undoes it.
        _write_journal(where, journal)
        if staging.exists():
            shutil.rmtree(staging)
        (staging / "new").mkdir(parents=True)
        (staging / "stub").mkdir()
        placeholder = _placeholder(where)
        for source, _ in steps:
            data = placeholder if source.startswith("stub/") else (staged / Path(source).name).read_bytes()
            _write_durably(staging / source, data)
        if result.changed:
            try:
                backup.mkdir(parents=True)
            except OSError as error:
                journal["backup"] = None  # not ours to remove
                raise ValueError(
                    f"cannot create the backup folder {backup} ({error.strerror or error}): pass a `backup_dir` "
                    "that can be created; nothing was changed"
                ) from error
            result.backup = backup
            try:
                for name in result.changed:
                    shutil.copy2(where / name, backup / name)
            except OSError as error:
                raise ValueError(f"cannot write the backup folder {backup} ({error}); nothing was changed") from error
        journal["state"] = "applying"
        _write_journal(where, journal)
    except Exception as error:
        _remove_own_backup(where, journal)
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(where / f"{JOURNAL_NAME}.partial")
        with contextlib.suppress(OSError):
            os.unlink(where / JOURNAL_NAME)
        if isinstance(error, OSError):
            raise _not_writable(where, error) from error
        raise
    # Applying: from here on, the next run finishes what a kill or an error leaves.
    try:
        for source, name in steps:
            os.replace(staging / source, where / name)
        os.unlink(where / JOURNAL_NAME)
    except OSError as error:
        raise ValueError(
            f"replacing the code files of {result.folder} failed ({error}): the folder may refuse to load until the "
            "upgrade is finished; fix the cause and run the upgrade again, which finishes it"
        ) from error
    shutil.rmtree(staging, ignore_errors=True)  # what is left, the next run removes


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
