import os


# Tests never touch the network: every model is built here, tiny and random.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Without a GPU, moge_hf's Triton kernels run (slowly, for correctness) in Triton's interpreter. Triton reads the
# variable when the kernels are defined, at the first `import moge_hf`: it must be set before any test imports it.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


import logging  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


class _DeprecationNotices(logging.Handler):
    """Collects the deprecation notices transformers logs while our code runs: moge_hf itself, a saved folder's copy
    of it (loaded as `transformers_modules.*`) or our scripts."""

    def __init__(self, our_dirs: tuple[str, ...]):
        super().__init__(logging.WARNING)
        self.our_dirs = our_dirs
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "deprecated" in message.lower() and self._our_code_is_running():
            self.messages.append(f"{record.name}: {message}")

    def _our_code_is_running(self) -> bool:
        frame = sys._getframe()
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(self.our_dirs) or "transformers_modules" in filename:
                return True
            frame = frame.f_back
        return False


@pytest.fixture(autouse=True)
def no_transformers_deprecation_notice():
    """Fail a test in which transformers logs that something our code uses is deprecated (it logs some deprecations,
    e.g. the `past_key_values` -> `cache` rename of 5.24, instead of warning). FutureWarnings are errors already
    (pyproject.toml)."""
    from transformers.utils import logging as hf_logging

    import moge_hf

    repo = os.path.dirname(os.path.dirname(os.path.abspath(moge_hf.__file__)))
    handler = _DeprecationNotices((os.path.join(repo, "moge_hf") + os.sep, os.path.join(repo, "scripts") + os.sep))
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    hf_logging.warning_once.cache_clear()  # it logs a message once per process: forget those of earlier tests
    try:
        yield
    finally:
        root.removeHandler(handler)
    assert not handler.messages, "transformers logged a deprecation notice: " + "; ".join(handler.messages)
