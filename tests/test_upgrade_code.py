"""`python -m moge_hf.upgrade_code`: interrupted and concurrent upgrades, odd paths, read-only folders, a user's file
that shares a name with moge_hf's code, a config.json that is not an object."""

import ast
import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_remote_code import OLD_FOLDER, file_bytes, run_worker

import moge_hf
from moge_hf.upgrade_code import main, upgrade_model_code


PACKAGE = Path(moge_hf.__file__).parent
# The files an upgrade may leave in the folder while it runs, none of which stays after it.
WORK_FILES = (".moge_hf-upgrade.json", ".moge_hf-upgrade.lock", ".moge_hf-upgrade-staging")


def code_bytes(folder: Path) -> dict[str, bytes]:
    return {name: data for name, data in file_bytes(folder).items() if name.endswith(".py")}


def new_code(old: dict[str, bytes]) -> dict[str, bytes]:
    """The code files a finished upgrade of a folder whose code is `old` holds: the installed moge_hf's."""
    plan = upgrade_model_code(OLD_FOLDER, dry_run=True)
    return {name: (PACKAGE / name).read_bytes() for name in [*old, *plan.added]}


def copy_old(tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    shutil.copytree(OLD_FOLDER, folder)
    return folder


class Killed(BaseException):
    """What the process gets at the simulated kill: nothing in the upgrade catches it (as nothing survives a kill)."""


def test_an_interrupted_upgrade_leaves_old_or_guarded_code_and_a_rerun_finishes(tmp_path, monkeypatch):
    before = file_bytes(OLD_FOLDER)
    old = code_bytes(OLD_FOLDER)
    new = new_code(old)
    real_replace, kills, guarded_folder = os.replace, 0, None
    for kill_at in range(1, 100):
        folder = copy_old(tmp_path / str(kill_at))
        calls = 0

        def replace(src, dst, *args, kill_at=kill_at, **kwargs):
            nonlocal calls
            calls += 1
            if calls == kill_at:
                raise Killed
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        try:
            upgrade_model_code(folder)
        except Killed:
            pass
        else:
            break  # every interior point was tried
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        kills += 1

        # (a) The code is the old, or guarded: the module `auto_map` names for AutoConfig (loaded first, and imported
        # by every other module `auto_map` names) is a placeholder that refuses to load, saying how to finish; never
        # a mix of old and new files that loads.
        code = code_bytes(folder)
        if code != old:
            config_module = code["configuration_moge.py"].decode()
            assert "raise ImportError" in config_module and "upgrade_code" in config_module, kill_at
            assert (folder / ".moge_hf-upgrade.json").is_file(), kill_at
            if guarded_folder is None:  # kept as the kill left it, for the load below
                guarded_folder = shutil.copytree(folder, tmp_path / "guarded" / "model")
        for name, data in before.items():  # weights and config untouched at every point
            if not name.endswith(".py"):
                assert file_bytes(folder)[name] == data, (kill_at, name)

        # (b) A rerun finishes (or rolls back and redoes) it: the new code, the old code in one backup, nothing left.
        result = upgrade_model_code(folder)
        assert code_bytes(folder) == new, kill_at
        assert {name: data for name, data in file_bytes(folder).items() if not name.endswith(".py")} == {
            name: data for name, data in before.items() if not name.endswith(".py")
        }
        assert not any((folder / name).exists() for name in WORK_FILES), kill_at
        backups = list(folder.parent.glob("model.code-backup-*"))
        assert len(backups) == 1, (kill_at, backups)
        assert file_bytes(backups[0]) == {name: data for name, data in old.items() if new[name] != data}, kill_at
        assert result.summary()
        assert upgrade_model_code(folder).up_to_date
    assert kills >= 9  # at least one kill before, between and after each of the 9 file writes

    # A guarded folder, loaded with `trust_remote_code` where moge_hf is not installed, says what to do.
    assert guarded_folder is not None
    load = run_worker(
        sys.executable, "load", "AutoModelForCausalLM", guarded_folder, tmp_path / "x.pt", cwd=tmp_path, check=False
    )
    assert load.returncode != 0 and "moge_hf.upgrade_code" in load.stderr and "interrupted" in load.stderr


def test_a_killed_upgrade_process_is_finished_by_the_next_run(tmp_path):
    """A real kill (the process exits on the spot, no `finally` runs) in the middle of the renames."""
    import subprocess

    folder = copy_old(tmp_path)
    old = code_bytes(folder)
    script = (
        "import os, sys\n"
        "from moge_hf.upgrade_code import upgrade_model_code\n"
        "real, calls = os.replace, [0]\n"
        "def replace(*args):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 6:\n"
        "        os._exit(9)\n"
        "    return real(*args)\n"
        "os.replace = replace\n"
        "upgrade_model_code(sys.argv[1])\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=600)
    assert killed.returncode == 9, killed.stderr[-4000:]
    assert code_bytes(folder) != old and (folder / ".moge_hf-upgrade.json").is_file()
    result = upgrade_model_code(folder)
    assert code_bytes(folder) == new_code(old)
    assert "finished an interrupted upgrade" in result.summary()
    assert not any((folder / name).exists() for name in WORK_FILES)


def test_upgrade_code_of_dot_and_dotdot_puts_the_backup_beside_the_folder(tmp_path, monkeypatch, capsys):
    for argument, cwd in ((".", "model"), ("..", "model/sub")):
        root = tmp_path / argument.replace(".", "d")
        folder = copy_old(root)
        (root / cwd).mkdir(exist_ok=True)
        monkeypatch.chdir(root / cwd)
        assert main([argument]) == 0, capsys.readouterr().err
        assert code_bytes(folder) == new_code(code_bytes(OLD_FOLDER))
        backups = list(root.glob("model.code-backup-*"))
        assert len(backups) == 1 and str(backups[0]) in capsys.readouterr().out
        assert not list(folder.rglob("*code-backup*"))


@pytest.fixture
def read_only(monkeypatch):
    """Makes a folder read-only: with `chmod` where that binds (not for root), else by refusing writes there."""

    def make(folder: Path):
        if os.geteuid() != 0:
            folder.chmod(0o555)
            return
        inside = str(folder) + os.sep

        def refuse(path):
            if os.path.abspath(os.fspath(path)).startswith(inside):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

        def wrap(function, argument=0, writes=lambda *args, **kwargs: True):
            def wrapped(*args, **kwargs):
                if writes(*args, **kwargs):
                    refuse(args[argument])
                return function(*args, **kwargs)

            return wrapped

        monkeypatch.setattr(builtins, "open", wrap(open, writes=lambda f, mode="r", *a, **k: set(mode) & set("wax+")))
        monkeypatch.setattr(
            os, "open", wrap(os.open, writes=lambda f, flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR))
        )
        for name in ("mkdir", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, wrap(getattr(os, name)))
        for name in ("replace", "rename"):
            monkeypatch.setattr(os, name, wrap(getattr(os, name), argument=1))

    yield make


def test_upgrade_code_refuses_a_read_only_folder_clearly_and_leaves_nothing(tmp_path, read_only):
    folder = copy_old(tmp_path)
    before = file_bytes(folder)
    read_only(folder)
    try:
        with pytest.raises(ValueError, match=rf"{folder} is not writable.*nothing was changed"):
            upgrade_model_code(folder)
    finally:
        folder.chmod(0o755)
    assert file_bytes(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_upgrade_code_refuses_a_backup_place_it_cannot_write_and_leaves_nothing(tmp_path, read_only):
    folder = copy_old(tmp_path)
    before = file_bytes(folder)
    (tmp_path / "locked").mkdir()
    read_only(tmp_path / "locked")
    try:
        with pytest.raises(ValueError, match=r"cannot create the backup folder .*locked/backup.*nothing was changed"):
            upgrade_model_code(folder, backup_dir=tmp_path / "locked" / "backup")
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert file_bytes(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "model"] and not list(
        (tmp_path / "locked").iterdir()
    )


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "null"])
def test_a_config_json_that_is_not_an_object_is_refused_clearly(tmp_path, content):
    from moge_hf import prepare_upload_folder

    folder = copy_old(tmp_path)
    (folder / "config.json").write_text(content)
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'} holds a JSON .*, not an object"):
        upgrade_model_code(folder)
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'} holds a JSON .*, not an object"):
        prepare_upload_folder(folder, tmp_path / "out")
    assert main([str(folder)]) == 1


def test_backups_made_in_the_same_second_get_distinct_names(tmp_path, monkeypatch):
    fixed = time.gmtime()
    monkeypatch.setattr(time, "gmtime", lambda *args: fixed)
    stamp = time.strftime("%Y%m%d-%H%M%S", fixed)
    taken = tmp_path / f"model.code-backup-{stamp}"
    taken.mkdir()
    (taken / "mine.txt").write_text("someone else's")
    folder = copy_old(tmp_path)
    result = upgrade_model_code(folder)
    assert result.backup is not None and result.backup != taken and result.backup.parent == tmp_path
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    assert (result.backup / "modeling_moge.py").read_bytes() == (OLD_FOLDER / "modeling_moge.py").read_bytes()


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl")
def test_a_second_upgrade_of_a_folder_being_upgraded_is_refused(tmp_path):
    import fcntl

    folder = copy_old(tmp_path)
    before = file_bytes(folder)
    with open(folder / ".moge_hf-upgrade.lock", "w") as lock:  # what a running upgrade holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match=rf"{folder} is being upgraded by another process"):
            upgrade_model_code(folder)
        assert main([str(folder)]) == 1
        assert code_bytes(folder) == code_bytes(OLD_FOLDER) and not list(tmp_path.glob("*.code-backup-*"))
    (folder / ".moge_hf-upgrade.lock").unlink()
    assert file_bytes(folder) == before
    upgrade_model_code(folder)  # once the other run is over
    assert not (folder / ".moge_hf-upgrade.lock").exists()


def test_a_file_of_the_folder_that_the_new_code_would_overwrite_is_kept_and_the_upgrade_refused(tmp_path, capsys):
    folder = copy_old(tmp_path)
    (folder / "routing.py").write_text("# the user's own routing experiments\nRULES = {}\n")
    before = file_bytes(folder)
    for dry_run in (True, False):
        with pytest.raises(ValueError, match=r"routing\.py.*not code of the model.*move or rename it"):
            upgrade_model_code(folder, dry_run=dry_run)
    assert main([str(folder)]) == 1 and "routing.py" in capsys.readouterr().err
    assert file_bytes(folder) == before and not list(tmp_path.glob("*.code-backup-*"))

    # A file of that name with moge_hf's own code (an earlier upgrade wrote it) is no obstacle.
    shutil.copy(PACKAGE / "routing.py", folder / "routing.py")
    result = upgrade_model_code(folder)
    assert "routing.py" in result.unchanged and code_bytes(folder) == new_code(code_bytes(OLD_FOLDER))


def test_a_dry_run_of_an_interrupted_upgrade_says_to_finish_it(tmp_path):
    folder = copy_old(tmp_path)
    (folder / ".moge_hf-upgrade.json").write_text(json.dumps({"state": "applying"}))
    with pytest.raises(ValueError, match="interrupted.*run it again without --dry_run"):
        upgrade_model_code(folder, dry_run=True)


def test_an_error_while_replacing_files_is_reported_and_the_next_run_finishes(tmp_path, monkeypatch):
    folder = copy_old(tmp_path)
    real_replace, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 6:  # the journal twice (no backup yet, then the backup), then 3 files
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ValueError, match=r"replacing the code files .* failed .*run the upgrade again"):
        upgrade_model_code(folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert "raise ImportError" in (folder / "configuration_moge.py").read_text()
    result = upgrade_model_code(folder)
    assert code_bytes(folder) == new_code(code_bytes(OLD_FOLDER)) and result.resumed
    assert not any((folder / name).exists() for name in WORK_FILES)
    assert len(list(tmp_path.glob("model.code-backup-*"))) == 1


@pytest.mark.parametrize(
    "steps", [[["new/../../evil.py", "../evil.py"]], [["new/x.py", "/tmp/x.py"]], [["new/config.json", "config.json"]]]
)
def test_a_journal_that_names_anything_but_plain_code_files_is_refused(tmp_path, steps):
    """A folder may come from elsewhere (downloaded): its journal must not make the upgrade write outside it."""
    folder = copy_old(tmp_path)
    journal = {"state": "applying", "backup": None, "backed_up": [], "steps": steps}
    (folder / ".moge_hf-upgrade.json").write_text(json.dumps(journal))
    before = file_bytes(folder)
    with pytest.raises(ValueError, match="journal of an interrupted upgrade, cannot be read"):
        upgrade_model_code(folder)
    assert file_bytes(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_folder_an_earlier_upgrade_left_with_code_files_missing_is_finished(tmp_path):
    # The upgrade of the release before this one replaced files one by one, with no journal: killed after writing
    # today's configuration_moge.py, it left a folder whose code imports a moge_layer.py that is not there, and a
    # rerun refused it ("code files ... are missing"). The upgrade writes what is missing.
    folder = copy_old(tmp_path)
    package = Path(moge_hf.__file__).parent
    shutil.copy(package / "configuration_moge.py", folder / "configuration_moge.py")
    assert not (folder / "moge_layer.py").exists()
    result = upgrade_model_code(folder)
    assert "moge_layer.py" in result.added
    assert (folder / "moge_layer.py").read_bytes() == (package / "moge_layer.py").read_bytes()
    assert upgrade_model_code(folder).up_to_date


def test_only_code_of_0_1_0_is_said_to_be_0_1_0s_and_the_installed_release_is_named(tmp_path, capsys):
    # An upgrade leaves config.json as it was, so the upgraded folder's `auto_map` still names 0.1.0's `modeling_moge`;
    # its code is the installed moge_hf's. A later release upgrading it again must not call that code 0.1.0's.
    folder = copy_old(tmp_path)
    assert main([str(folder), "--dry_run"]) == 0
    output = capsys.readouterr().out
    assert f"installed: moge_hf {moge_hf.__version__}," in output and "code of moge_hf 0.1.0" in output
    assert upgrade_model_code(folder).saved_by == "0.1.0"
    (folder / "moge_layer.py").write_text((folder / "moge_layer.py").read_text() + "# a later release\n")
    plan = upgrade_model_code(folder, dry_run=True)
    assert plan.changed == ["moge_layer.py"] and plan.saved_by is None
    assert main([str(folder), "--dry_run"]) == 0
    output = capsys.readouterr().out
    assert f"installed: moge_hf {moge_hf.__version__}," in output and "0.1.0" not in output


def test_upgrade_code_runs_as_a_module_that_the_package_does_not_import():
    # `import moge_hf` (which imports moge_hf.hub) must not import moge_hf.upgrade_code, which `python -m` runs as
    # `__main__` (runpy would warn, and run a second copy of it); the Hub code and the upgrade share `model_folder.py`
    # and do not import each other at import time.
    code = "import sys, moge_hf; assert 'moge_hf.upgrade_code' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    for module in ("hub", "upgrade_code"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert not imported & {"hub", "upgrade_code"}, (module, imported)
    command = [sys.executable, "-W", "error::RuntimeWarning", "-m", "moge_hf.upgrade_code", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "usage: python -m moge_hf.upgrade_code" in result.stdout, result.stderr
