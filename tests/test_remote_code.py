"""A folder written by `save_pretrained` loads with `trust_remote_code=True` where moge_hf cannot be imported."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import gpt2_config, input_ids, pixel_values, vit_config

from moge_hf import GPT2MoGEForSequenceClassification, GPT2MoGELMHeadModel, ViTMoGEForImageClassification


# The child process blocks `import moge_hf`, loads the folder through an Auto class, and saves what it computed.
CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["moge_hf"] = None  # any `import moge_hf` now raises ImportError
    import torch
    import transformers

    folder, auto_name = sys.argv[1], sys.argv[2]
    model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    inputs = torch.load(f"{folder}/inputs.pt")
    with torch.no_grad():
        outputs = model(**inputs)
    tensors = {k: v for k, v in outputs.items() if isinstance(v, torch.Tensor)}
    torch.save({"class": type(model).__name__, "outputs": tensors}, f"{folder}/child_outputs.pt")
    """
)

CASES = [
    (GPT2MoGELMHeadModel, gpt2_config, "AutoModelForCausalLM", "GPT2MoGELMHeadModel", "ids"),
    (GPT2MoGELMHeadModel, gpt2_config, "AutoModel", "GPT2MoGEModel", "ids"),
    (
        GPT2MoGEForSequenceClassification,
        lambda: gpt2_config(num_labels=3),
        "AutoModelForSequenceClassification",
        "GPT2MoGEForSequenceClassification",
        "ids",
    ),
    (
        ViTMoGEForImageClassification,
        vit_config,
        "AutoModelForImageClassification",
        "ViTMoGEForImageClassification",
        "pixels",
    ),
]


def run_child(folder, auto_name, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), auto_name], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(folder / "child_outputs.pt")


@pytest.mark.parametrize("model_class,make_config,auto_name,loaded_class,kind", CASES)
def test_remote_code_load_in_a_process_without_moge_hf(
    model_class, make_config, auto_name, loaded_class, kind, tmp_path
):
    torch.manual_seed(0)
    model = model_class(make_config()).eval()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    inputs = {"input_ids": input_ids()} if kind == "ids" else {"pixel_values": pixel_values()}
    torch.save(inputs, folder / "inputs.pt")

    child = run_child(folder, auto_name, tmp_path)
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
