"""The README's quick start is `scripts/quickstart.py`, and it runs; `.ci/run` runs the README's test command."""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


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
