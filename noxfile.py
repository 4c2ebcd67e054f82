"""The compatibility matrix: the compat subset of the tests (`pytest -m compat`) under every minor release of the
supported transformers range, and under the oldest and newest torch the range admits.

    pip install nox
    nox -s compat                       # every transformers release below, torch 2.13.0 (CPU wheel)
    nox -s "compat(transformers='5.25.0')"
    nox -s compat_torch                 # the newest transformers under torch's floor and newest (large downloads)
    nox --report matrix.json -s compat  # one JSON record per session

`.ci/run` does not run the matrix: it runs the whole suite on both ends of the range. The README's "Supported
releases" table is this matrix's last run. When transformers publishes a minor release, add it to TRANSFORMERS.
"""

import os

import nox


# The newest patch of every minor release from the floor of setup.cfg's range to the newest published.
TRANSFORMERS = ["5.17.0", "5.18.0", "5.19.0", "5.20.2", "5.21.1", "5.22.2", "5.23.0", "5.24.0", "5.25.0"]
# The torch CI pins (a CPU wheel where the package index serves one) and the ends of setup.cfg's `torch>=` range.
TORCH = "2.13.0"
TORCH_ENDS = ["2.6.0", "2.15.0"]

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["compat"]


def _run_compat_subset(session: nox.Session) -> None:
    versions = "import torch, transformers; print(torch.__version__, transformers.__version__)"
    session.run("python", "-c", versions)
    session.run("python", "-m", "pytest", "-q", "-m", "compat", "-p", "no:cacheprovider", "tests", *session.posargs)


@nox.session
@nox.parametrize("transformers", TRANSFORMERS)
def compat(session: nox.Session, transformers: str) -> None:
    """The compat subset under one transformers release."""
    session.install(f"torch=={TORCH}", f"transformers=={transformers}", "-e", ".[test]")
    _run_compat_subset(session)


@nox.session
@nox.parametrize("torch", TORCH_ENDS)
def compat_torch(session: nox.Session, torch: str) -> None:
    """The compat subset under one end of the torch range, with the newest transformers a fresh install resolves.

    The public package index serves CUDA builds of torch for Linux; they run on a CPU-only machine."""
    # An empty constraints file replaces any machine-wide pip constraint (pip.conf) that caps torch below the release.
    session.install(f"torch=={torch}", "-e", ".[test]", env={"PIP_CONSTRAINT": os.devnull})
    _run_compat_subset(session)
