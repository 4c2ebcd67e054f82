"""The README's quick start is `scripts/quickstart.py`, and it runs; `.ci/run` runs the README's test command; the
transformers version policy is stated once and kept: setup.cfg's range, the floor CI pins, the README and
docs/RELEASES.md, whose compatibility table lists every release `noxfile.py` tests."""

import ast
import configparser
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version


ROOT = Path(__file__).resolve().parent.parent
RELEASES = ROOT / "docs" / "RELEASES.md"  # the supported releases: the policy and the compatibility matrix's last run


def test_readme_quick_start_is_the_script_and_runs():
    readme = (ROOT / "README.md").read_text()
    script = (ROOT / "scripts" / "quickstart.py").read_text()
    assert f"```python\n{script}```" in readme
    assert len(script.strip().splitlines()) < 20
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "quickstart.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"loss \d+\.\d+\s+aux_loss \d+\.\d+\s+moge_loss \d+\.\d+", result.stdout)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def declared_transformers_range() -> SpecifierSet:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirement = next(
        line.strip()
        for line in setup["options"]["install_requires"].splitlines()
        if line.strip().startswith("transformers")
    )
    return SpecifierSet(requirement.removeprefix("transformers"))


def test_transformers_policy_is_one_range_kept_everywhere():
    supported = declared_transformers_range()
    floor = next(spec.version for spec in supported if spec.operator == ">=")
    cap = next(spec.version for spec in supported if spec.operator == "<")
    # The policy: the floor is the oldest release supported, the cap the next major (minors are admitted as they come,
    # the compatibility matrix of noxfile.py covers each), as sentence-transformers caps transformers.
    assert Version(cap) == Version(str(Version(floor).major + 1))
    # CI's second venv pins the floor of the range, from one constraints file.
    pins = [
        line for line in (ROOT / ".ci" / "transformers-floor.txt").read_text().splitlines() if line and line[0] != "#"
    ]
    assert pins == [f"transformers=={floor}.0"]
    assert "-c .ci/transformers-floor.txt" in (ROOT / ".ci" / "run").read_text()
    # The README and the releases page state the same range and policy.
    for page in (ROOT / "README.md", RELEASES):
        assert f"transformers>={floor},<{cap}" in page.read_text(), page.name
    # This run tests a release inside the range (a fresh install resolves the newest one it admits).
    assert version("transformers") in supported


def test_releases_page_matrix_lists_every_release_the_noxfile_tests():
    # The compatibility matrix (noxfile.py) covers every minor release from the range's floor; the table of
    # docs/RELEASES.md is its last run: one row per release, none missing, none left over.
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    releases = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and [target.id for target in node.targets] == ["TRANSFORMERS"]
    )
    floor = next(spec.version for spec in declared_transformers_range() if spec.operator == ">=")
    minors = [Version(release).release[:2] for release in releases]
    assert minors[0] == Version(floor).release[:2] and minors == sorted(set(minors))
    assert all(later[1] == earlier[1] + 1 for earlier, later in zip(minors, minors[1:]))  # no minor skipped
    rows = re.findall(r"^\| transformers (\d+\.\d+\.\d+) \|", RELEASES.read_text(), flags=re.MULTILINE)
    assert rows == releases
