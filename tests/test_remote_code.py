"""A folder written by `save_pretrained` loads with `trust_remote_code=True` where moge_hf cannot be imported."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from tiny import CASES as TABLE
from tiny import case_names, gpt2_config

import moge_hf
from moge_hf import GPT2MoGELMHeadModel
from moge_hf.upgrade_code import upgrade_model_code


# Every moge_hf head model (the shared table, tests/tiny.py) through its Auto class, and one head model's folder per
# host family loaded as the base model (`AutoModel`): each family's base class, from a saved head model's code.
FAMILY_CASES = case_names(moge_hf=True, head=True, per_family=True)
CASES = [(name, TABLE[name].auto_class) for name in case_names(moge_hf=True, head=True)]
CASES += [(name, "AutoModel") for name in FAMILY_CASES]


WORKER = Path(__file__).with_name("remote_code_worker.py")
# A Python whose transformers is another release (and has moge_hf installed from this checkout): `.ci/run` sets it to
# the venv pinned to the floor of the supported range when testing the newest release, and the other way round.
OTHER_PYTHON = os.environ.get("MOGE_OTHER_TRANSFORMERS_PYTHON")
FIXTURES = Path(__file__).with_name("fixtures")


def run_worker(python: str, *args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / f"modules-{abs(hash(python))}")}
    result = subprocess.run(
        [python, str(WORKER), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_child(folder, auto_name, tmp_path):
    run_worker(sys.executable, "load", auto_name, folder, tmp_path / "child.pt", cwd=tmp_path)
    return torch.load(tmp_path / "child.pt")


@pytest.mark.compat
@pytest.mark.parametrize("case,auto_name", CASES)
def test_remote_code_load_in_a_process_without_moge_hf(case, auto_name, tmp_path):
    model = TABLE[case].build().eval()
    folder = tmp_path / case
    model.save_pretrained(folder)
    inputs = TABLE[case].inputs()
    torch.save(inputs, folder / "inputs.pt")

    child = run_child(folder, auto_name, tmp_path)
    loaded_class = type(model).__name__ if auto_name == TABLE[case].auto_class else type(model.base_model).__name__
    assert child["class"] == loaded_class
    if loaded_class == type(model).__name__:
        with torch.no_grad():
            expected = model(**inputs)
    else:  # the base model of a saved head model
        with torch.no_grad():
            expected = model.base_model(**inputs)
    for name in ("logits", "last_hidden_state", "aux_loss", "moge_loss", "z_loss"):
        if name in child["outputs"]:
            assert torch.equal(child["outputs"][name], expected[name]), name
    assert {"aux_loss", "moge_loss"} <= child["outputs"].keys()


def test_remote_code_child_really_cannot_import_moge_hf(tmp_path):
    script = 'import sys; sys.modules["moge_hf"] = None\ntry:\n import moge_hf\nexcept ImportError:\n print("blocked")'
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.stdout.strip() == "blocked"


# ---- across transformers releases ----------------------------------------------------------------------------------


def assert_same_results(loaded: dict, saved: dict) -> None:
    assert loaded["class"] == saved["class"]
    assert loaded["outputs"].keys() == saved["outputs"].keys()
    for name, value in saved["outputs"].items():
        torch.testing.assert_close(loaded["outputs"][name], value, rtol=1e-6, atol=1e-6, msg=name)
    if "generated" in saved:
        assert torch.equal(loaded["generated"], saved["generated"])


@pytest.mark.skipif(OTHER_PYTHON is None, reason="set MOGE_OTHER_TRANSFORMERS_PYTHON to another release's Python")
@pytest.mark.parametrize("case", FAMILY_CASES)  # one head model per host family: two subprocesses each
@pytest.mark.parametrize("saved_here", [True, False], ids=["saved-here", "saved-there"])
def test_a_folder_saved_under_one_release_loads_under_the_other(case, saved_here, tmp_path):
    """Saved under this transformers, loaded with `trust_remote_code` where moge_hf cannot be imported under the other
    release (`.ci/run`: the newest allowed and the floor), and the reverse: the same outputs and, for a generative
    model, greedy generation. The folder is the case's own: its class is the one saved and the one loaded."""
    saver, loader = (sys.executable, OTHER_PYTHON) if saved_here else (OTHER_PYTHON, sys.executable)
    folder = tmp_path / case
    run_worker(saver, "save", case, folder, tmp_path / "saved.pt", cwd=tmp_path)
    assert json.loads((folder / "config.json").read_text())["architectures"] == [TABLE[case].model_class.__name__]
    run_worker(loader, "load", TABLE[case].auto_class, folder, tmp_path / "loaded.pt", cwd=tmp_path)
    saved, loaded = torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "loaded.pt")
    assert saved["transformers"] != loaded["transformers"], "the other Python has the same transformers release"
    assert saved["module"].startswith("moge_hf.") and loaded["module"].startswith("transformers_modules.")
    assert saved["class"] == TABLE[case].model_class.__name__
    assert ("generated" in saved) == TABLE[case].generative
    assert_same_results(loaded, saved)


# ---- folders saved by moge_hf 0.1.0 ---------------------------------------------------------------------------------

# `gpt2_moge_0.1.0/` is a folder written by `save_pretrained` of moge_hf 0.1.0 (commit 79bda86) under transformers
# 5.17: its code files are that release's, verbatim. `_reference.pt` holds what that release computed from it.
OLD_FOLDER = FIXTURES / "gpt2_moge_0.1.0"
OLD_REFERENCE = FIXTURES / "gpt2_moge_0.1.0_reference.pt"


def old_release_results() -> dict:
    reference = torch.load(OLD_REFERENCE)
    return {"class": "GPT2MoGELMHeadModel", "outputs": reference["outputs"], "generated": reference["generated"]}


@pytest.mark.compat
def test_a_0_1_0_folder_loads_with_moge_hf_installed():
    from transformers import AutoModelForCausalLM

    reference = torch.load(OLD_REFERENCE)
    model = AutoModelForCausalLM.from_pretrained(OLD_FOLDER).eval()
    assert type(model) is GPT2MoGELMHeadModel  # the installed code, not the folder's copy
    ids = reference["input_ids"]
    with torch.no_grad():
        outputs = model(ids)
        for name, value in reference["outputs"].items():
            torch.testing.assert_close(outputs[name], value, rtol=1e-6, atol=1e-6, msg=name)
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    assert torch.equal(generated, reference["generated"])


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.mark.compat
def test_upgrade_code_refreshes_only_the_code_of_a_0_1_0_folder(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(OLD_FOLDER, folder)
    torch.save({"input_ids": torch.load(OLD_REFERENCE)["input_ids"]}, folder / "inputs.pt")
    before = file_bytes(folder)

    # The folder's own 0.1.0 code under this transformers, which passes the KV cache as `past_key_values`: that works
    # up to 5.23; 5.24 renamed it `cache` and fails; 5.25 accepts the old name again with a notice until 5.40.
    old = run_worker(
        sys.executable, "load", "AutoModelForCausalLM", folder, tmp_path / "old.pt", cwd=tmp_path, check=False
    )
    release = Version(Version(transformers.__version__).base_version)
    if release < Version("5.24") or Version("5.25") <= release < Version("5.40"):
        assert old.returncode == 0, old.stderr[-4000:]
        assert_same_results(torch.load(tmp_path / "old.pt"), old_release_results())
        if release >= Version("5.25"):
            assert "`past_key_values` is deprecated and will be removed in version 5.40" in old.stderr
    else:  # 5.24: the parent passes `cache` to 0.1.0's forward; from 5.40: 0.1.0 passes `past_key_values` to it
        name = "cache" if release < Version("5.25") else "past_key_values"
        assert old.returncode != 0 and f"unexpected keyword argument '{name}'" in old.stderr

    # The documented command.
    command = [sys.executable, "-m", "moge_hf.upgrade_code", str(folder)]
    upgrade = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "updated modeling_moge.py" in upgrade.stdout and "untouched" in upgrade.stdout
    assert f"installed: moge_hf {moge_hf.__version__}," in upgrade.stdout
    assert f"{folder}: code of moge_hf 0.1.0 (its auto_map names" in upgrade.stdout
    backups = list(tmp_path.glob("model.code-backup-*"))
    assert len(backups) == 1 and str(backups[0]) in upgrade.stdout

    after = file_bytes(folder)
    package = Path(moge_hf.__file__).parent
    # Every file of 0.1.0 stays; today's code may add a module (0.1.0 had no moge_layer.py).
    added = sorted(after.keys() - before.keys())
    assert set(before) <= set(after) and all(name.endswith(".py") for name in added)
    for name in added:
        assert f"added   {name}" in upgrade.stdout and after[name] == (package / name).read_bytes()
    code = {name for name in before if name.endswith(".py")}
    for name in before:
        if name in code:  # each code file is now the installed package's, the old one in the backup if it changed
            assert after[name] == (package / name).read_bytes(), name
            if before[name] != after[name]:
                assert (backups[0] / name).read_bytes() == before[name]
        else:  # weights, config.json, generation_config.json: byte for byte as they were
            assert after[name] == before[name], name
    assert {path.name for path in backups[0].iterdir()} == {n for n in code if before[n] != after[n]}

    run_worker(sys.executable, "load", "AutoModelForCausalLM", folder, tmp_path / "new.pt", cwd=tmp_path)
    assert_same_results(torch.load(tmp_path / "new.pt"), old_release_results())

    again = upgrade_model_code(folder)  # a second run has nothing to do, and makes no second backup
    assert again.up_to_date and again.backup is None and sorted(again.unchanged) == sorted(code | set(added))
    assert len(list(tmp_path.glob("model.code-backup-*"))) == 1


def test_upgrade_code_dry_run_writes_nothing_and_refuses_bad_folders(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(OLD_FOLDER, folder)
    before = file_bytes(folder)
    plan = upgrade_model_code(folder, dry_run=True)
    assert "modeling_moge.py" in plan.changed and plan.backup is None
    assert "+class" in plan.diffs["modeling_moge.py"] or "+" in plan.diffs["modeling_moge.py"]
    assert file_bytes(folder) == before and not list(tmp_path.glob("*.code-backup-*"))

    with pytest.raises(ValueError, match="not a folder"):
        upgrade_model_code(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        upgrade_model_code(tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(ValueError, match="exists already"):
        upgrade_model_code(folder, backup_dir=taken)
    assert file_bytes(folder) == before  # a refused upgrade writes nothing
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"gpt2_moge"', '"gpt2"'))
    with pytest.raises(ValueError, match="not a moge_hf model"):
        upgrade_model_code(folder)


def test_only_a_0_1_0_folder_is_said_to_be_saved_by_0_1_0(tmp_path):
    from moge_hf import GPT2MoGELMHeadModel

    GPT2MoGELMHeadModel(gpt2_config()).save_pretrained(tmp_path / "today")  # the 0.1.0 folder is GPT-2's
    code = tmp_path / "today" / "modeling_gpt2_moge.py"
    code.write_text(code.read_text() + "# edited\n")  # an older copy of today's code, as a later release will find it
    plan = upgrade_model_code(tmp_path / "today", dry_run=True)
    assert plan.changed == ["modeling_gpt2_moge.py"] and plan.saved_by is None and "0.1.0" not in plan.summary()
    shutil.copytree(OLD_FOLDER, tmp_path / "old")
    plan = upgrade_model_code(tmp_path / "old", dry_run=True)
    assert plan.saved_by == "0.1.0" and "code of moge_hf 0.1.0" in plan.summary()


def test_a_0_1_0_folder_is_not_uploaded_with_its_old_code_until_upgraded(tmp_path):
    from moge_hf import prepare_upload_folder

    folder = tmp_path / "model"
    shutil.copytree(OLD_FOLDER, folder)
    with pytest.raises(ValueError, match=r"modeling_moge\.py.*differ from the installed moge_hf.*upgrade_code"):
        prepare_upload_folder(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    upgrade_model_code(folder)
    written = prepare_upload_folder(folder, tmp_path / "out")
    assert "modeling_moge.py" in written and "moge_layer.py" in written
