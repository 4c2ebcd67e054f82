"""Sharing on the Hub: the upload folder loads where moge_hf cannot be imported (models and pipelines), the card holds
only what the run measured, pushes need a token before any network call, and Trainer's pushes carry code and card.

Nothing here touches the network: `HfApi.create_repo` / `upload_folder` are replaced by fakes that copy the folder
they would upload.
"""

import ast
import configparser
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from PIL import Image
from tiny import CASES, case_names, gpt2_config, input_ids, pixel_values, vit_config
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments, ViTImageProcessor, pipeline

from moge_hf import (
    GPT2MoGEForSequenceClassification,
    GPT2MoGELMHeadModel,
    ViTMoGEForImageClassification,
    ViTMoGEModel,
)
from moge_hf.hub import (
    TESTED_TRANSFORMERS,
    HubTokenError,
    MoGEHubCallback,
    add_moge_hub_callback,
    check_moge_model_dir,
    prepare_upload_folder,
    push_model_dir,
    render_model_card,
)
from moge_hf.run_record import RUN_RECORD_NAME, hub_data, local_data, make_run_record


ROOT = Path(__file__).resolve().parent.parent
# The code a family's folder carries: its modeling file (added per family below) and the files it imports.
SHARED_CODE_FILES = {
    "moge_model.py",
    "moge_layer.py",
    "routing.py",
    "configuration_moge.py",
    "losses.py",
    "triton_experts.py",
    "upcycling.py",
}
EOS = "<|endoftext|>"
PROMPT = "To be or not"
GPT2_RESULTS = {
    "epoch": 1.0,
    "eval_loss": 3.5,
    "perplexity": 33.11,
    "eval_runtime": 0.5,
    "eval_samples": 10,
    "eval_samples_per_second": 20.0,
    "train_loss": 3.9,
    "train_runtime": 2.0,
    "total_flos": 1234.0,
}
VIT_RESULTS = {"eval_accuracy": 0.25, "eval_loss": 1.6, "test_accuracy": 0.2, "eval_runtime": 0.1}
MOGE_TAGS = {"moge", "mixture-of-experts", "custom_code"}


def load_script():
    spec = importlib.util.spec_from_file_location("push_to_hub_script", ROOT / "scripts" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def releases_stated_as_tested(card: ModelCard) -> list[str]:
    """The transformers releases a card says this code was tested on."""
    text = " ".join(card.text.split())
    return list(re.search(r"The releases this code was tested on are transformers (\S+) and (\S+) \(", text).groups())


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's kind) trained offline on a few lines."""
    bpe = ByteLevelBPETokenizer()
    lines = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"]
    bpe.train_from_iterator(lines, vocab_size=300, min_frequency=1, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def add_run_leftovers(folder: Path) -> None:
    """What a Trainer output folder holds besides the model: none of it belongs on the Hub."""
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "README.md").write_text("---\nlicense: mit\n---\nThis model is a fine-tuned version of ...\n")
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "config.json").write_text("{}")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out").write_text("tensorboard")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = gpt2_config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2-moge"
    GPT2MoGELMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps(GPT2_RESULTS))
    add_run_leftovers(folder)
    return folder


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    labels = ["cat", "dog", "frog", "ship", "truck"]
    config = vit_config(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    folder = tmp_path_factory.mktemp("vit") / "vit-moge"
    ViTMoGEForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_upload(gpt2_dir) -> Path:
    """The dry run of the script (results found in the model folder)."""
    out = gpt2_dir.parent / "dry-run"
    argv = ["--model-dir", str(gpt2_dir), "--repo-id", "me/gpt2-moge", "--dry-run", str(out)]
    # No run record in the folder: the data flags state the data (the evaluation split too: none is claimed unasked).
    argv += ["--dataset", "karpathy/tiny_shakespeare", "--eval-split", "validation"]
    assert load_script().main([*argv, "--base-model", "openai-community/gpt2"]) == 0
    return out


@pytest.fixture(scope="module")
def vit_upload(vit_dir) -> Path:
    out = vit_dir.parent / "upload"
    prepare_upload_folder(
        vit_dir, out, repo_id="me/vit-moge", results=VIT_RESULTS, dataset="uoft-cs/cifar10", eval_split="validation"
    )
    return out


# ------------------------------------------------------------------------------------------------------------------
# Fake Hub
# ------------------------------------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for `HfApi.create_repo` / `upload_folder`: copies each uploaded folder to `root/<n>`."""

    def __init__(self, root: Path):
        self.root = root
        self.repos: list[dict] = []
        self.uploads: list[dict] = []

    def install(self, monkeypatch) -> None:
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append({"repo_id": repo_id, "token": api.token, **kwargs})
            name = repo_id if "/" in repo_id else f"me/{repo_id}"
            return SimpleNamespace(repo_id=name, url=f"https://huggingface.co/{name}")

        def upload_folder(api, *, repo_id, folder_path, run_as_future=False, **kwargs):
            folder_path = Path(folder_path)
            files = sorted(str(p.relative_to(folder_path)) for p in folder_path.rglob("*") if p.is_file())
            files = list(
                filter_repo_objects(
                    files, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=kwargs.get("ignore_patterns")
                )
            )
            copy = hub.root / str(len(hub.uploads))
            for name in files:
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder_path / name, copy / name)
            hub.uploads.append({"repo_id": repo_id, "folder": copy, "files": files, "token": api.token, **kwargs})
            result = SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")
            if run_as_future:
                future = Future()
                future.set_result(result)
                return future
            return result

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def forbid_network(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the Hub was called")

    for name in ("create_repo", "upload_folder", "create_commit", "upload_file", "whoami", "repo_info", "model_info"):
        monkeypatch.setattr(HfApi, name, fail)


# ------------------------------------------------------------------------------------------------------------------
# Loading without moge_hf: one child process for every folder
# ------------------------------------------------------------------------------------------------------------------

# The child blocks `import moge_hf`, loads each folder through an Auto class and a pipeline with
# `trust_remote_code=True`, and saves what it computed. It takes the dry-run folders at once and the trainer's pushed
# folders when `more_jobs.json` appears, so that it imports and loads while the trainer fixture trains.
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    sys.modules["moge_hf"] = None  # any `import moge_hf` now raises ImportError
    import torch
    import transformers
    from transformers import pipeline

    work = sys.argv[1]

    def run(job):
        model = getattr(transformers, job["auto_class"]).from_pretrained(job["folder"], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        inputs = torch.load(job["inputs"])
        with torch.no_grad():
            logits = model(**inputs).logits
        result = {"class": type(model).__name__, "logits": logits}
        if job["task"] == "text-generation":
            generator = pipeline("text-generation", model=job["folder"], trust_remote_code=True)
            assert type(generator.model).__module__.startswith("transformers_modules.")
            kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
            result["pipeline"] = generator(job["prompt"], **kwargs)[0]["generated_text"]
            result["token_ids"] = generator(job["prompt"], return_tensors=True, **kwargs)[0]["generated_token_ids"]
        elif job["task"] == "image-classification":
            classifier = pipeline("image-classification", model=job["folder"], trust_remote_code=True)
            assert type(classifier.model).__module__.startswith("transformers_modules.")
            result["pipeline"] = classifier(job["image"], top_k=5)
        return result

    results = {job["name"]: run(job) for job in json.load(open(f"{work}/jobs.json"))}
    deadline = time.time() + 600
    while not os.path.exists(f"{work}/more_jobs.json") and time.time() < deadline:
        time.sleep(0.05)
    results.update({job["name"]: run(job) for job in json.load(open(f"{work}/more_jobs.json"))})
    torch.save(results, f"{work}/results.pt")
    """
)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("image") / "image.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (24, 20, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def child(tmp_path_factory, gpt2_upload, vit_upload, image_path):
    """The child process, started on the dry-run folders (see `CHILD`); killed at the end if still running."""
    work = tmp_path_factory.mktemp("child")
    torch.save({"input_ids": input_ids()}, work / "ids.pt")
    torch.save({"pixel_values": pixel_values()}, work / "pixels.pt")
    jobs = [
        dict(name="gpt2", folder=str(gpt2_upload), auto_class="AutoModelForCausalLM", inputs=str(work / "ids.pt")),
        dict(name="vit", folder=str(vit_upload), auto_class="AutoModelForImageClassification"),
    ]
    jobs[0].update(task="text-generation", prompt=PROMPT)
    jobs[1].update(task="image-classification", image=image_path, inputs=str(work / "pixels.pt"))
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(work / "modules")}
    with open(work / "child.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-c", CHILD, str(work)], cwd=work, env=env, stdout=log, stderr=log)
    yield SimpleNamespace(process=process, work=work)
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def child_results(child, trainer_pushes):
    """What the child computed; `child` comes first, so that it runs while `trainer_pushes` trains."""
    work = child.work
    jobs = [
        dict(name="trainer", folder=str(trainer_pushes.hub.uploads[-1]["folder"])),
        dict(name="checkpoint", folder=str(trainer_pushes.hub.uploads[0]["folder"])),
    ]
    for job in jobs:
        job.update(task=None, auto_class="AutoModelForCausalLM", inputs=str(work / "ids.pt"))
    (work / "more_jobs.tmp").write_text(json.dumps(jobs))
    os.replace(work / "more_jobs.tmp", work / "more_jobs.json")
    returncode = child.process.wait(timeout=600)
    assert returncode == 0, (work / "child.log").read_text()[-4000:]
    return torch.load(work / "results.pt")


def test_dry_run_folder_is_exactly_what_loading_needs(gpt2_upload, vit_upload):
    model_files = {"model.safetensors", "config.json", "README.md", *SHARED_CODE_FILES}
    assert {p.name for p in gpt2_upload.iterdir()} == model_files | {
        "modeling_gpt2_moge.py",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert {p.name for p in vit_upload.iterdir()} == model_files | {"modeling_vit_moge.py", "preprocessor_config.json"}
    assert "fine-tuned version" not in (gpt2_upload / "README.md").read_text()  # the old Trainer card is replaced


def test_dry_run_folders_load_without_moge_hf_with_identical_outputs(gpt2_dir, vit_dir, child_results):
    gpt2 = GPT2MoGELMHeadModel.from_pretrained(gpt2_dir).eval()
    vit = ViTMoGEForImageClassification.from_pretrained(vit_dir).eval()
    with torch.no_grad():
        assert torch.equal(child_results["gpt2"]["logits"], gpt2(input_ids()).logits)
        assert torch.equal(child_results["vit"]["logits"], vit(pixel_values()).logits)
    assert child_results["gpt2"]["class"] == "GPT2MoGELMHeadModel"
    assert child_results["vit"]["class"] == "ViTMoGEForImageClassification"


def test_trainer_pushed_folders_load_without_moge_hf(trainer_pushes, child_results):
    # The final push holds the trained model; the first checkpoint push an earlier state with the same code.
    assert torch.equal(child_results["trainer"]["logits"], trainer_pushes.logits)
    assert child_results["checkpoint"]["logits"].shape == trainer_pushes.logits.shape


def test_pipelines_on_saved_models(gpt2_dir, vit_dir, image_path, child_results):
    generator = pipeline("text-generation", model=str(gpt2_dir), trust_remote_code=True)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    text = generator(PROMPT, **kwargs)[0]["generated_text"]
    token_ids = list(generator(PROMPT, return_tensors=True, **kwargs)[0]["generated_token_ids"])
    prompt_ids = generator.tokenizer(PROMPT)["input_ids"]
    assert len(token_ids) == len(prompt_ids) + 5 and token_ids[: len(prompt_ids)] == prompt_ids
    assert text.startswith(PROMPT) and text == generator.tokenizer.decode(token_ids, skip_special_tokens=True)
    # The same generation without moge_hf.
    assert child_results["gpt2"]["pipeline"] == text
    assert list(child_results["gpt2"]["token_ids"]) == token_ids

    classifier = pipeline("image-classification", model=str(vit_dir), trust_remote_code=True)
    predictions = classifier(image_path, top_k=5)
    assert {p["label"] for p in predictions} == {"cat", "dog", "frog", "ship", "truck"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    child = child_results["vit"]["pipeline"]
    assert [p["label"] for p in child] == [p["label"] for p in predictions]
    assert [p["score"] for p in child] == pytest.approx([p["score"] for p in predictions], abs=1e-6)
    assert classifier(Image.open(image_path))[0]["label"] == predictions[0]["label"]  # a PIL image too


# ------------------------------------------------------------------------------------------------------------------
# Trainer's own push
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_pushes(tmp_path_factory):
    """A tiny GPT-2 MoGE trained by a plain `Trainer` with `push_to_hub=True`, pushing at every save and at the end."""
    root = tmp_path_factory.mktemp("trainer")
    output_dir = root / "out"
    output_dir.mkdir()
    # An `all_results.json` left by an earlier run in the same folder: its numbers were not measured by this run.
    stale = output_dir / "all_results.json"
    stale.write_text(json.dumps({"eval_accuracy": 0.987654}))
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    hub = FakeHub(root / "hub")
    torch.manual_seed(0)
    ids = input_ids(batch=8)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub.install(monkeypatch)
        args = TrainingArguments(
            str(output_dir),
            push_to_hub=True,
            hub_model_id="gpt2-moge-trainer",
            hub_strategy="every_save",
            save_strategy="steps",
            save_steps=2,
            eval_strategy="steps",
            eval_steps=2,
            max_steps=4,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,
            report_to=[],
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        trainer = Trainer(model=GPT2MoGELMHeadModel(gpt2_config()), args=args, train_dataset=data, eval_dataset=data)
        # The run record of a run evaluated on a whole Hub split (what the cards' `model-index` entries need).
        record = make_run_record(
            train=hub_data("karpathy/tiny_shakespeare", split="train", examples=8),
            eval=hub_data("karpathy/tiny_shakespeare", split="validation", examples=8),
        )
        add_moge_hub_callback(trainer, run_record=record)
        trainer.train()
        trainer.push_to_hub(license="mit")
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids()).logits
    return SimpleNamespace(hub=hub, trainer=trainer, logits=logits)


def test_trainer_push_to_hub_carries_code_config_and_moge_card(trainer_pushes):
    hub = trainer_pushes.hub
    assert [repo["repo_id"] for repo in hub.repos] == ["gpt2-moge-trainer"]
    # Two checkpoint pushes (steps 2 and 4), then `trainer.push_to_hub()`.
    assert len(hub.uploads) == 3
    for upload in hub.uploads:
        assert upload["repo_id"] == "me/gpt2-moge-trainer"
        assert SHARED_CODE_FILES | {"modeling_gpt2_moge.py", "config.json", "model.safetensors", "README.md"} <= set(
            upload["files"]
        )
        assert not any(name.startswith("checkpoint-") for name in upload["files"])
        config = json.loads((upload["folder"] / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt2_moge.GPT2MoGELMHeadModel"
        card = ModelCard.load(upload["folder"] / "README.md")
        assert MOGE_TAGS | {"gpt2"} <= set(card.data.tags)
        assert card.data.pipeline_tag == "text-generation"
        assert card.data.library_name == "transformers"
        assert "How MoGE differs from a plain MoE" in card.text
        assert 'repo_id = "me/gpt2-moge-trainer"' in card.text
        assert "0.987654" not in str(card) and "accuracy" not in str(card)  # the stale results were ignored

    final = ModelCard.load(hub.uploads[-1]["folder"] / "README.md")
    assert final.data.license == "mit"  # `trainer.push_to_hub(license=...)` reaches the card
    assert final.data.datasets == ["karpathy/tiny_shakespeare"]
    eval_losses = [entry["eval_loss"] for entry in trainer_pushes.trainer.state.log_history if "eval_loss" in entry]
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in final.data.eval_results] == [
        ("loss", eval_losses[-1], "validation")
    ]
    assert "| learning_rate | 5e-05 |" in final.text  # the trainer's hyperparameters
    first = ModelCard.load(hub.uploads[0]["folder"] / "README.md")
    assert [r.metric_value for r in first.data.eval_results] == [eval_losses[0]]


def test_add_moge_hub_callback_checks_its_arguments(tmp_path):
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(str(tmp_path), report_to=[]))
    with pytest.raises(ValueError, match="needs a trainer of a MoGE model"):
        add_moge_hub_callback(trainer)
    callback = MoGEHubCallback(dataset="x/y")
    with pytest.raises(TypeError, match="either"):
        add_moge_hub_callback(trainer, callback, dataset="x/y")


# ------------------------------------------------------------------------------------------------------------------
# Model cards
# ------------------------------------------------------------------------------------------------------------------


def test_card_metadata_and_model_index_hold_only_the_measured_metrics(gpt2_upload, vit_upload):
    card = ModelCard.load(gpt2_upload / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert MOGE_TAGS | {"gpt2"} <= set(data.tags)
    assert data.datasets == ["karpathy/tiny_shakespeare"]
    assert data.base_model == "openai-community/gpt2"
    assert data.license == "apache-2.0"
    measured = {(r.metric_type, r.metric_value, r.dataset_split, r.task_type) for r in data.eval_results}
    assert measured == {
        ("loss", 3.5, "validation", "text-generation"),
        ("perplexity", 33.11, "validation", "text-generation"),
    }
    assert {r.dataset_type for r in data.eval_results} == {"karpathy/tiny_shakespeare"}
    assert "| loss (task + weighted routing losses) | 3.9 |" in card.text  # the training loss, from the same file
    for bookkeeping in ("runtime", "samples_per_second", "flos", "1234"):
        assert bookkeeping not in str(card)
    assert "AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)" in card.text
    assert 'repo_id = "me/gpt2-moge"' in card.text

    card = ModelCard.load(vit_upload / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert MOGE_TAGS | {"vit"} <= set(card.data.tags)
    assert card.data.base_model is None
    measured = {(r.metric_type, r.metric_value, r.dataset_split) for r in card.data.eval_results}
    assert measured == {("accuracy", 0.25, "validation"), ("loss", 1.6, "validation"), ("accuracy", 0.2, "test")}
    assert 'pipeline("image-classification", model=repo_id, trust_remote_code=True)' in card.text
    assert "`cat`, `dog`, `frog`, `ship`, `truck`" in card.text


def test_card_settings_come_from_the_config():
    config = gpt2_config(
        num_experts=6,
        num_experts_per_tok=1,
        moge_map_shape=[2, 3],
        moge_window=3,
        moge_padding="circular",
        moge_reduction="paper",
        moge_sigma_schedule=[10.0, 1.0, 0.2],
        moge_loss_coef=3e-5,
        router_aux_loss_coef=0.02,
        router_aux_loss_global=True,
        moe_layers=[0, 1],
        num_labels=3,
    )
    card = render_model_card(GPT2MoGEForSequenceClassification(config), repo_id="me/cls")
    assert card.data.pipeline_tag == "text-classification"
    for row in (
        "| `num_experts` | 6 |",
        "| `num_experts_per_tok` | 1 |",
        "| `moge_map_shape` | 2 x 3 |",
        "| `moge_window` | 3 |",
        "| `moge_sigma_schedule` | [10.0, 1.0, 0.2] |",
        "| `moge_padding` | `circular` |",
        "| `moge_reduction` | `paper` |",
        "| `moge_loss_coef` | 3e-05 |",
        "| `router_aux_loss_coef` | 0.02 |",
        "| `moe_layers` | [0, 1] of 2 |",
        "| `router_aux_loss_global` | yes |",
    ):
        assert row in card.text, row
    assert "plain MoE baseline" not in card.text
    assert 'pipeline("text-classification"' in card.text
    # The transformers range the installed moge_hf declares (setup.cfg), and the releases tested in it.
    declared = next(r for r in importlib.metadata.requires("moge_hf") if r.startswith("transformers"))
    stated = re.search(r"a transformers release in\s+`(transformers[^`]*)`, the range moge_hf", card.text).group(1)
    assert SpecifierSet(stated.removeprefix("transformers")) == Requirement(declared).specifier
    assert releases_stated_as_tested(card) == list(TESTED_TRANSFORMERS)

    baseline = render_model_card(ViTMoGEModel(vit_config(moge_loss_coef=0.0)))
    assert baseline.data.pipeline_tag == "image-feature-extraction"
    assert "the plain\nmixture-of-experts baseline" in baseline.text
    assert "| `moge_loss_coef` | 0.0 (plain MoE baseline) |" in baseline.text


def test_card_without_results_says_so_and_has_no_model_index(gpt2_dir):
    card = render_model_card(gpt2_dir, repo_id="me/gpt2-moge", dataset="karpathy/tiny_shakespeare")
    assert card.data.eval_results is None
    assert "model-index" not in card.data.to_yaml() and "metrics" not in card.data.to_yaml()
    assert "Results were not measured" in card.text
    assert "3.5" not in card.text and "33.11" not in card.text  # the results file is only read when passed

    # Results without a dataset: listed in the text, but no `model-index` (it needs a dataset).
    card = render_model_card(gpt2_dir, results={"eval_loss": 2.75})
    assert card.data.eval_results is None and "model-index" not in card.data.to_yaml()
    assert "not in the card's `model-index` metadata: they were not measured on a whole split" in card.text
    assert "(the data they were measured on was not recorded)" in card.text
    assert "| evaluation | loss (task + weighted routing losses) | 2.75 |" in card.text  # no split is claimed
    assert "The training data was not recorded when this card was written." in card.text
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['datset'\]"):
        render_model_card(gpt2_dir, datset="karpathy/tiny_shakespeare")
    assert "your-username/your-moge-model" in card.text


# ------------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------------


def broken_copy(gpt2_dir: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(gpt2_dir, folder)
    damage(folder)
    return folder


def set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key, value in changes.items():
        if value is None:
            del config[key]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (lambda f: set_config(f, model_type="gpt2"), "model of type 'gpt2', not a moge_hf model"),
        (lambda f: set_config(f, auto_map=None), "no `auto_map`"),
        (lambda f: set_config(f, architectures=["GPT2MoGEForTokenClassification"]), "not in its `auto_map`"),
        (lambda f: (f / "modeling_gpt2_moge.py").unlink(), r"code files \['modeling_gpt2_moge.py'\]"),
        (lambda f: (f / "routing.py").unlink(), r"code files \['routing.py'\]"),  # imported by moge_model.py
        (lambda f: (f / "losses.py").unlink(), r"code files \['losses.py'\]"),  # imported by the other code files
        (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), "no safetensors weights.*bin"),
    ],
)
def test_not_a_moge_model_dir_errors(gpt2_dir, tmp_path, damage, message):
    folder = broken_copy(gpt2_dir, tmp_path, damage)
    with pytest.raises(ValueError, match=message):
        check_moge_model_dir(folder)
    with pytest.raises(ValueError, match=message):
        prepare_upload_folder(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_script_reports_errors_without_a_traceback(gpt2_dir, tmp_path, capsys):
    script = load_script()
    argv = ["--repo-id", "me/x", "--dry-run", str(tmp_path / "out")]
    assert script.main(["--model-dir", str(tmp_path / "missing"), *argv]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert script.main(["--model-dir", str(gpt2_dir), *argv[:2], "--dry-run", str(gpt2_dir)]) == 1
    assert "must not be the model folder" in capsys.readouterr().err
    assert script.main(["--model-dir", str(gpt2_dir), "--repo-id", "me/bad id", "--dry-run", str(tmp_path / "o")]) == 1
    assert "Repo id must use alphanumeric chars" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_script_results_options(gpt2_dir, tmp_path):
    script = load_script()
    argv = ["--model-dir", str(gpt2_dir), "--repo-id", "me/x", "--dataset", "karpathy/tiny_shakespeare"]
    argv += ["--eval-split", "validation"]
    assert script.main([*argv, "--no-results", "--dry-run", str(tmp_path / "none")]) == 0
    card = ModelCard.load(tmp_path / "none" / "README.md")
    assert card.data.eval_results is None and "Results were not measured" in card.text
    (tmp_path / "eval.json").write_text(json.dumps({"eval_loss": 2.5, "eval_runtime": 9.0}))
    assert script.main([*argv, "--results", str(tmp_path / "eval.json"), "--dry-run", str(tmp_path / "file")]) == 0
    card = ModelCard.load(tmp_path / "file" / "README.md")
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("loss", 2.5)]
    assert "(`eval.json`)" in card.text


# ------------------------------------------------------------------------------------------------------------------
# Pushes
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "tokens"))
    assert huggingface_hub.get_token() is None


def test_push_without_a_token_fails_before_any_network_call(gpt2_dir, no_token, monkeypatch, capsys):
    forbid_network(monkeypatch)
    with pytest.raises(HubTokenError, match="hf auth login.*HF_TOKEN"):
        push_model_dir(gpt2_dir, "me/gpt2-moge")
    with pytest.raises(ValueError, match="Repo id must"):  # a bad id is reported first, also before the network
        push_model_dir(gpt2_dir, "me/bad id")
    assert load_script().main(["--model-dir", str(gpt2_dir), "--repo-id", "me/gpt2-moge", "--private"]) == 1
    error = capsys.readouterr().err
    assert "hf auth login" in error and "HF_TOKEN" in error and "nothing was uploaded" in error


def test_push_reports_an_unreachable_hub_and_broken_folder_files(gpt2_dir, no_token, monkeypatch, tmp_path, capsys):
    """An `error:` line naming the cause, not a traceback: the Hub unreachable (offline here) with a token; a shard
    index without its `weight_map`; a tokenizer config that is not JSON."""
    assert huggingface_hub.constants.is_offline_mode()  # the tests never reach the network
    monkeypatch.setenv("HF_TOKEN", "hf_token")
    script = load_script()
    assert script.main(["--model-dir", str(gpt2_dir), "--repo-id", "me/gpt2-moge"]) == 1
    assert re.search(r"^error: .*offline", capsys.readouterr().err, flags=re.MULTILINE | re.IGNORECASE)
    for broken, message in (
        ("index", r"model\.safetensors\.index\.json has no `weight_map`"),
        ("tokenizer", r"tokenizer_config\.json is not valid JSON"),
    ):
        folder = tmp_path / broken
        shutil.copytree(gpt2_dir, folder)
        if broken == "index":
            (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
            (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
        else:
            (folder / "tokenizer_config.json").write_text("{not json")
        argv = ["--model-dir", str(folder), "--repo-id", "me/x", "--dry-run", str(tmp_path / f"{broken}-upload")]
        assert script.main(argv) == 1
        assert re.search(rf"^error: .*{message}", capsys.readouterr().err, flags=re.MULTILINE)


def test_push_uploads_the_dry_run_folder(gpt2_dir, gpt2_upload, no_token, monkeypatch, tmp_path):
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    commit = load_script().main(
        ["--model-dir", str(gpt2_dir), "--repo-id", "me/gpt2-moge", "--private", "--eval-split", "validation"]
        + ["--dataset", "karpathy/tiny_shakespeare", "--base-model", "openai-community/gpt2"]
    )
    assert commit == 0
    assert hub.repos == [
        {"repo_id": "me/gpt2-moge", "token": "hf_from_env", "private": True, "exist_ok": True, "repo_type": "model"}
    ]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/gpt2-moge" and upload["token"] == "hf_from_env"
    assert upload["delete_patterns"] == ["model*.safetensors", "model.safetensors.index.json"]  # stale weights
    assert sorted(upload["files"]) == sorted(p.name for p in gpt2_upload.iterdir())
    for name in upload["files"]:
        assert (upload["folder"] / name).read_bytes() == (gpt2_upload / name).read_bytes(), name

    push_model_dir(gpt2_dir, "me/other", token="hf_explicit")
    assert hub.repos[-1]["token"] == "hf_explicit" and hub.repos[-1]["private"] is None
    assert "Results were not measured" in (hub.uploads[-1]["folder"] / "README.md").read_text()


def _break_config(folder: Path) -> str:
    text = (folder / "config.json").read_text().replace('"moge_window": 2', '"moge_window": 5')
    (folder / "config.json").write_text(text)
    return "moge_window"


def _break_shapes(folder: Path) -> str:
    text = (folder / "config.json").read_text().replace('"n_inner": 37', '"n_inner": 41')
    (folder / "config.json").write_text(text)
    return "up_proj|size mismatch|shape"


def _poison_weights(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    name = next(key for key in state if key.endswith("router.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return r"NaN or Inf values: \[.*router\.weight"


@pytest.mark.parametrize("damage", [_break_config, _break_shapes, _poison_weights], ids=["config", "shapes", "nan"])
def test_upload_folders_are_refused_when_the_model_would_not_load(gpt2_dir, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(gpt2_dir, folder)
    reason = damage(folder)
    with pytest.raises(ValueError, match=reason):
        prepare_upload_folder(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written, nothing uploaded


def saved_with_preprocessor(case: str, folder: Path) -> Path:
    """The case's tiny model saved with the preprocessor its inputs need: a tokenizer for `input_ids`, an image
    processor of the model's image size for `pixel_values`."""
    model = CASES[case].build()
    if "input_ids" in CASES[case].inputs():
        tiny_tokenizer().save_pretrained(folder)
    else:
        size = model.config.image_size
        ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", case_names(moge_hf=True, per_family=True))
def test_the_cards_preprocessor_call_loads_cleanly_without_moge_hf(case, tmp_path):
    # The card's own line for the tokenizer / image processor, run where moge_hf cannot be imported, on the oldest and
    # newest transformers: the repo's config.json maps AutoConfig to remote code, so AutoTokenizer needs
    # `trust_remote_code=True` (else transformers asks or warns); 5.17's AutoImageProcessor needs torchvision.
    upload = tmp_path / "upload"
    prepare_upload_folder(saved_with_preprocessor(case, tmp_path / "model"), upload, repo_id=f"me/{case}")
    card = (upload / "README.md").read_text()
    line = next(line for line in card.splitlines() if re.match(r"(tokenizer|processor) = \w+\.from_pretrained", line))
    auto_class = re.search(r"= (\w+)\.", line).group(1)
    code = "import sys\nsys.modules['moge_hf'] = None\n"
    code += f"from transformers import {auto_class}\nrepo_id = {str(upload)!r}\n{line}\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "You are using a model of type" not in result.stderr and "trust_remote_code" not in result.stderr


@pytest.mark.parametrize(
    "load",
    [
        "AutoTokenizer.from_pretrained(path, trust_remote_code=False)",
        "PreTrainedTokenizerFast.from_pretrained(path)",
    ],
)
def test_the_saved_tokenizer_loads_without_moge_hf_and_without_remote_code(gpt2_dir, load, tmp_path):
    # docs/HUB.md's two ways to load the tokenizer alone where moge_hf is not installed: no code of the folder runs
    # (HF_MODULES_CACHE stays empty), no question is asked (stdin closed), the same token ids.
    code = "import sys\nsys.modules['moge_hf'] = None\n"
    code += f"from transformers import AutoTokenizer, PreTrainedTokenizerFast\npath = {str(gpt2_dir)!r}\n"
    code += f"tokenizer = {load}\nprint(tokenizer('To be, or not to be')['input_ids'])\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(tiny_tokenizer()("To be, or not to be")["input_ids"])
    assert not list((tmp_path / "modules").rglob("*.py"))


@pytest.mark.parametrize("case", case_names(moge_hf=True, per_family=True))
def test_the_card_gives_the_layers_and_expert_sizes_the_model_has(case, tmp_path):
    model = CASES[case].build(expert_intermediate_size=None)
    model.save_pretrained(tmp_path)
    card = " ".join(render_model_card(tmp_path).text.split())
    sizes = [block.experts.intermediate_dim for block in model.moge_blocks()]
    size_text = str(sizes[0]) if len(set(sizes)) == 1 else " / ".join(map(str, sizes)) + " (per MoGE layer)"
    assert f"| expert hidden size | `expert_intermediate_size` | {size_text} |" in card
    assert f"{sorted(model.config.moe_layers)} of {model.config.moge_num_layers} |" in card


def test_card_states_that_grouped_mm_refuses_unaligned_sizes(gpt2_upload):
    card = " ".join((gpt2_upload / "README.md").read_text().split())
    assert "multiples of 8 (otherwise asking for it raises an error" in card and "fall back" not in card


def test_card_says_what_was_evaluated_and_claims_a_hub_split_only_when_it_was_one(gpt2_dir):
    results = {"eval_loss": 2.75, "eval_samples": 64}
    # A held-out part of the training split: no model-index (it would claim the dataset's validation split).
    held_out = "the last 5% of the train split of `karpathy/tiny_shakespeare`, held out"
    card = render_model_card(
        gpt2_dir, results=results, dataset="karpathy/tiny_shakespeare", eval_split=None, eval_data=held_out
    )
    assert card.data.eval_results is None and "model-index" not in card.data.to_yaml()
    assert f"on 64 examples from {held_out}:" in " ".join(card.text.split())
    assert "| evaluation | loss (task + weighted routing losses) | 2.75 |" in card.text
    # A whole Hub split: model-index with that split, and the text says which and how many examples.
    card = render_model_card(gpt2_dir, results=results, dataset="karpathy/tiny_shakespeare", eval_split="validation")
    assert [result.dataset_split for result in card.data.eval_results] == ["validation"]
    link = "[karpathy/tiny_shakespeare](https://huggingface.co/datasets/karpathy/tiny_shakespeare)"
    hub_split = f"the `validation` split of {link}"
    assert f"on 64 examples from {hub_split}:" in " ".join(card.text.split())


# ------------------------------------------------------------------------------------------------------------------
# Cards rendered from the run record
# ------------------------------------------------------------------------------------------------------------------

# What run_clm.py records for a run on a local file whose last 10% of lines it holds out (`run_record.json`) ...
LOCAL_RUN = make_run_record(
    train=local_data(
        "data/tinyshakespeare/input.txt",
        description="the plays of Shakespeare",
        part="the first 90% of the lines",
        examples=1234,
        unit="blocks of 32 tokens",
    ),
    eval=local_data(
        "data/tinyshakespeare/input.txt",
        description="the plays of Shakespeare",
        part="the last 10% of the lines",
        examples=137,
        unit="blocks of 32 tokens",
    ),
    script="run_clm.py",
    hyperparameters={"learning_rate": 0.002, "seed": 42},
)
# ... and for a run on a Hub data set with a validation split, evaluated on all of it.
HUB_RUN = make_run_record(
    train=hub_data("karpathy/tiny_shakespeare", split="train", examples=1003, unit="blocks of 32 tokens"),
    eval=hub_data("karpathy/tiny_shakespeare", split="validation", examples=55, unit="blocks of 32 tokens"),
    script="run_clm.py",
)


def results_of(record: dict) -> dict:
    """What `Trainer.save_metrics` writes for the recorded run (`all_results.json`)."""
    train = record["train"]
    return {
        "epoch": 1.0,
        "eval_loss": 3.25,
        "perplexity": 25.8,
        "eval_samples": record["eval"]["examples"],
        "train_loss": 3.7,
        "train_samples": train["examples"],
    }


def run_folder(gpt2_dir: Path, folder: Path, record: dict) -> Path:
    """A model folder as the training scripts leave it: the model, its results and its run record."""
    shutil.copytree(gpt2_dir, folder)
    (folder / "all_results.json").write_text(json.dumps(results_of(record)))
    (folder / RUN_RECORD_NAME).write_text(json.dumps(record))
    return folder


def section(card: ModelCard, title: str) -> str:
    """The text of the card's `## title` section, its whitespace collapsed."""
    return " ".join(card.text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].split())


def assert_card_follows_the_record(card: ModelCard, record: dict, results: dict) -> None:
    """Every data claim of `card` is its run record's: what was trained and evaluated on, which split and part, how
    many examples; the results are the run's; the tested releases are those CI tests."""
    for title, entry in (("Training data", record["train"]), ("Evaluation results", record["eval"])):
        text = section(card, title)
        if "local" in entry:
            assert f"the local file `{entry['local']}` ({entry['description']})" in text
        else:
            link = f"[{entry['dataset']}](https://huggingface.co/datasets/{entry['dataset']})"
            assert f"the `{entry['split']}` split of {link}" in text
        assert f"{entry['examples']:,} {entry['unit']} from {entry.get('part') or 'the'}" in text
    training = section(card, "Training data")
    assert f"Recorded by the run that produced this model (`{record['script']}`), in `{RUN_RECORD_NAME}`" in training
    for name, value in (record.get("hyperparameters") or {}).items():
        assert f"| {name} | {value} |" in training
    assert "not recorded" not in card.text and "not given" not in card.text
    evaluation = section(card, "Evaluation results")
    assert f"| loss (task + weighted routing losses) | {results['eval_loss']} |" in evaluation
    assert f"| perplexity | {results['perplexity']} |" in evaluation
    assert f"| loss (task + weighted routing losses) | {results['train_loss']} |" in evaluation  # training loss
    assert releases_stated_as_tested(card) == list(TESTED_TRANSFORMERS)


def test_card_of_a_run_evaluated_on_a_local_file_claims_no_hub_split(gpt2_dir, tmp_path):
    folder = run_folder(gpt2_dir, tmp_path / "model", LOCAL_RUN)
    out = tmp_path / "upload"
    assert load_script().main(["--model-dir", str(folder), "--repo-id", "me/gpt2-moge", "--dry-run", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert_card_follows_the_record(card, LOCAL_RUN, results_of(LOCAL_RUN))
    # No Hub data set, no split: no `datasets`, no `model-index`, and nothing called a validation split.
    assert card.data.datasets is None and card.data.eval_results is None and card.data.metrics is None
    assert "model-index" not in card.data.to_yaml()
    assert "validation" not in str(card)
    assert "| evaluation | loss (task + weighted routing losses) | 3.25 |" in card.text
    assert "not in the card's `model-index` metadata: they were not measured on a whole split" in card.text
    assert json.loads((out / RUN_RECORD_NAME).read_text()) == LOCAL_RUN  # the record goes with the card


def test_card_of_a_run_evaluated_on_a_hub_split_claims_that_split_alone(gpt2_dir, tmp_path):
    folder = run_folder(gpt2_dir, tmp_path / "model", HUB_RUN)
    out = tmp_path / "upload"
    assert load_script().main(["--model-dir", str(folder), "--repo-id", "me/gpt2-moge", "--dry-run", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    results = results_of(HUB_RUN)
    assert_card_follows_the_record(card, HUB_RUN, results)
    evaluated = HUB_RUN["eval"]
    assert card.data.datasets == [evaluated["dataset"]]
    index = {
        (r.task_type, r.dataset_type, r.dataset_name, r.dataset_config, r.dataset_split, r.metric_type, r.metric_value)
        for r in card.data.eval_results
    }
    assert index == {
        (
            "text-generation",
            evaluated["dataset"],
            evaluated["dataset"],
            None,
            "validation",
            "loss",
            results["eval_loss"],
        ),
        ("text-generation", *[evaluated["dataset"]] * 2, None, "validation", "perplexity", results["perplexity"]),
    }
    assert card.data.model_name == "gpt2-moge" and "not in the card's `model-index`" not in card.text
    assert "| validation | perplexity | 25.8 |" in card.text

    # The same split, of which the run evaluated only the first blocks: no `model-index` claims the split.
    partial = {**HUB_RUN, "eval": {**evaluated, "part": "the first 55 blocks"}}
    card = render_model_card(folder, run_record=partial, results=results)
    assert card.data.eval_results is None and card.data.datasets == [evaluated["dataset"]]
    assert "on 55 blocks of 32 tokens from the first 55 blocks of the `validation` split" in section(
        card, "Evaluation results"
    )
    assert "| evaluation | perplexity | 25.8 |" in card.text


def test_data_flags_that_contradict_the_run_record_are_refused_naming_both(gpt2_dir, tmp_path, capsys):
    local = run_folder(gpt2_dir, tmp_path / "local", LOCAL_RUN)
    hub = run_folder(gpt2_dir, tmp_path / "hub", HUB_RUN)
    out = tmp_path / "upload"
    script = load_script()
    cases = [
        (local, ["--dataset", "karpathy/tiny_shakespeare"], ["--dataset 'karpathy/tiny_shakespeare'", "`input.txt`"]),
        (local, ["--eval-split", "validation"], ["--eval-split 'validation'", "the last 10% of the lines"]),
        (hub, ["--eval-split", "test"], ["--eval-split 'test'", "whole 'validation' split of 'karpathy/tiny_"]),
        (hub, ["--eval-split", "none"], ["--eval-split 'none'", "whole 'validation' split of 'karpathy/tiny_"]),
        (hub, ["--dataset", "wikitext"], ["--dataset 'wikitext'", "['karpathy/tiny_shakespeare']"]),
        (hub, ["--dataset-config", "tiny"], ["--dataset-config 'tiny'", "config None of 'karpathy/tiny_shakespeare'"]),
        (hub, ["--eval-data", "some text"], ["--eval-data 'some text'", "the `validation` split of `karpathy/tiny_"]),
    ]
    for folder, flags, named in cases:
        argv = ["--model-dir", str(folder), "--repo-id", "me/gpt2-moge", "--dry-run", str(out), *flags]
        assert script.main(argv) == 1, flags
        error = capsys.readouterr().err
        assert all(value in error for value in named), (flags, error)
        assert not out.exists()
    # The library refuses them alike; flags that agree with the record are taken.
    with pytest.raises(ValueError, match=r"dataset 'karpathy/tiny_shakespeare' contradicts .*the local file `input"):
        render_model_card(local, dataset="karpathy/tiny_shakespeare")
    agreeing = ["--dataset", "karpathy/tiny_shakespeare", "--eval-split", "validation"]
    assert script.main(["--model-dir", str(hub), "--repo-id", "me/gpt2-moge", "--dry-run", str(out), *agreeing]) == 0
    assert (
        script.main(["--model-dir", str(local), "--repo-id", "me/x", "--dry-run", str(tmp_path / "o"), *agreeing[2:]])
        == 1
    )


def test_results_of_another_run_than_the_recorded_one_are_refused(gpt2_dir, tmp_path):
    # gpt2_dir's all_results.json counts 10 evaluation examples; the record, 137.
    with pytest.raises(ValueError, match=r"eval_samples = 10 contradicts the run record, which records 137 examples"):
        render_model_card(gpt2_dir, run_record=LOCAL_RUN, results=gpt2_dir / "all_results.json")
    with pytest.raises(ValueError, match=r"train has unknown keys \['splits'\]"):
        render_model_card(gpt2_dir, run_record={"train": {"dataset": "x/y", "splits": "train"}, "eval": None})


def test_the_tested_releases_are_those_ci_runs_the_whole_suite_on():
    # .ci/run runs the suite in a venv pinned to the floor of setup.cfg's range (.ci/transformers-floor.txt) and in one
    # that resolves the newest release in it: the last of noxfile.py's list of published releases.
    floor_pins = [
        line for line in (ROOT / ".ci" / "transformers-floor.txt").read_text().splitlines() if line and line[0] != "#"
    ]
    assert floor_pins == [f"transformers=={TESTED_TRANSFORMERS[0]}"]
    assert "-c .ci/transformers-floor.txt" in (ROOT / ".ci" / "run").read_text()
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    releases = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and [target.id for target in node.targets] == ["TRANSFORMERS"]
    )
    assert TESTED_TRANSFORMERS == (releases[0], releases[-1])
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirement = next(
        Requirement(line.strip())
        for line in setup["options"]["install_requires"].splitlines()
        if line.strip().startswith("transformers")
    )
    floor = next(spec.version for spec in requirement.specifier if spec.operator == ">=")
    assert Version(TESTED_TRANSFORMERS[0]) == Version(floor)
    assert all(Version(release) in requirement.specifier for release in TESTED_TRANSFORMERS)


@pytest.mark.parametrize("case", case_names(moge_hf=True))
def test_every_model_class_gets_an_upload_folder_and_a_card_from_its_host_record(case, tmp_path):
    """The Hub code reads the host records (`MoGEHost`): every moge_hf class of the table, base models included, gets a
    checked upload folder whose card names its class, Auto class, pipeline tag and family tag."""
    from moge_hf.moge_model import head_of, host_of

    spec = CASES[case]
    model = spec.build()
    model.save_pretrained(tmp_path / "model")
    assert check_moge_model_dir(tmp_path / "model")["architectures"] == [spec.model_class.__name__]
    out = tmp_path / "upload"
    prepare_upload_folder(tmp_path / "model", out, repo_id=f"me/{case}")
    card = ModelCard.load(out / "README.md")
    host, head = host_of(spec.model_class), head_of(spec.model_class)
    assert head.model_class is spec.model_class and host.auto_classes[spec.auto_class] is spec.model_class
    assert card.data.pipeline_tag == head.pipeline_tag
    assert {*MOGE_TAGS, host.card.tag, "custom_code"} <= set(card.data.tags)
    assert f"`{spec.model_class.__name__}`" in card.text and spec.auto_class in card.text
    # Rendered from the model itself: the same metadata.
    from_model = render_model_card(model, repo_id=f"me/{case}")
    assert from_model.data.pipeline_tag == head.pipeline_tag and host.card.tag in from_model.data.tags


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_diverged_run_gets_no_card_that_hides_it(gpt2_dir, tmp_path, value):
    # NaN metrics used to be dropped as "not numbers": the card then said "Results were not measured".
    folder = tmp_path / "diverged"
    shutil.copytree(gpt2_dir, folder)
    (folder / "all_results.json").write_text(json.dumps({**GPT2_RESULTS, "eval_loss": value}))
    out = tmp_path / "upload"
    argv = ["--model-dir", str(folder), "--repo-id", "me/gpt2-moge", "--dry-run", str(out)]
    assert load_script().main(argv) == 1
    assert not out.exists()
    with pytest.raises(ValueError, match=rf"all_results\.json': metrics that are not finite \(eval_loss = {value}\)"):
        render_model_card(folder, results=folder / "all_results.json")
    with pytest.raises(ValueError, match=r"not finite .*the run diverged"):
        render_model_card(folder, results={"eval_loss": value})
    assert load_script().main([*argv, "--no-results"]) == 0  # a card without results, asked for: allowed


def test_results_that_are_a_folder_or_a_negative_count_are_named(gpt2_dir, tmp_path):
    with pytest.raises(ValueError, match=r"is a folder; pass the JSON file"):
        render_model_card(gpt2_dir, results=gpt2_dir)
    with pytest.raises(ValueError, match=r"eval_samples must be a whole number of examples, at least 0, got -5"):
        render_model_card(gpt2_dir, results={"eval_loss": 2.0, "eval_samples": -5})
