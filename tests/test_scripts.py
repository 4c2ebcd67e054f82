"""End-to-end tests of `scripts/run_clm.py` and `scripts/run_image_classification.py` on tiny data made here.

The training runs go through `sys.executable` subprocesses, as a user would run the scripts; the bad-input checks,
which fail before any training, call the scripts' `main(args)` in this process (importing torch and transformers
once instead of once per case). Everything runs on the CPU with no network (see `conftest.py`).
"""

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import datasets
import numpy as np
import pandas
import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_hub import FakeHub
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)
from transformers.distributed import DistributedConfig

from moge_hf import GPT2MoGELMHeadModel, ViTMoGEConfig, ViTMoGEForImageClassification, check_moge_model_dir
from moge_hf.moge_model import HOSTS, hosts_with
from moge_hf.training import parse_config_overrides, scratch_config


ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PIL = pytest.importorskip("PIL.Image", reason="the image tests need Pillow")

# The repository's main job (the README's command); `test_main_job_command_parses_and_runs_on_a_slice` checks the
# README's copy when there is one.
MAIN_JOB = (
    "OMP_NUM_THREADS=1 python scripts/run_clm.py --train_file data/tinyshakespeare/input.txt "
    "--output_dir runs/clm_tinyshakespeare --moge_loss_coef 0.1 --moge_sigma_schedule 10 1 0.2 "
    "--max_steps 200 --per_device_train_batch_size 16 --learning_rate 2e-3 --warmup_steps 20 "
    "--logging_steps 50 --save_steps 100 --compare_moe_baseline"
)

COMMON = [
    "--report_to",
    "none",
    "--use_cpu",
    "--seed",
    "0",
    "--disable_tqdm",
    "true",
    "--save_steps",
    "2",
    "--logging_steps",
    "1",
]
TINY_GPT2 = [
    "--n_layer", "2", "--n_embd", "32", "--n_head", "2",
    "--num_experts", "4", "--num_experts_per_tok", "2", "--moge_map_shape", "2", "2", "--moge_window", "2",
    "--moe_layers", "1", "--vocab_size", "300", "--block_size", "16", "--experts_implementation", "eager",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
]  # fmt: skip
TINY_VIT = [
    "--image_size", "16", "--patch_size", "4", "--num_hidden_layers", "2", "--hidden_size", "32",
    "--num_attention_heads", "2", "--intermediate_size", "64",
    "--num_experts", "4", "--num_experts_per_tok", "1", "--moge_map_shape", "2", "2", "--moge_window", "2",
    "--moe_layers", "1", "--experts_implementation", "eager",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
]  # fmt: skip

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine each parallel region can wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(name: str):
    """The script `scripts/<name>.py` as a module (its `main(args)` runs it in this process)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_clm():
    return load_script("run_clm")


@pytest.fixture(scope="module")
def run_image_classification():
    return load_script("run_image_classification")


def run(script: str, args: list[str], cache: Path, processes: int = 1) -> subprocess.CompletedProcess:
    """Run `scripts/<script>.py args` with this Python, one thread, offline; fail with its output if it fails. With
    `processes=2`: on 2 CPU processes (gloo), launched as the README says (`torchrun`)."""
    inherited = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items() if key not in inherited}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(
        [*launcher, str(SCRIPTS / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300 * processes,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def read_json(path: Path):
    return json.loads(path.read_text())


# ---- data -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(TEXT * 30)
    return path


def random_image(rng: np.random.Generator, size: int = 12):
    return PIL.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An imagefolder: train/{cat,dog}/*.png and validation/{cat,dog}/*.png (12x12, resized to 16 by the script)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("validation", 2)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                random_image(rng).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory) -> tuple[Path, Path]:
    """CIFAR-10-like Parquet files: an `img` Image column and a `label` ClassLabel column, written with datasets."""
    root = tmp_path_factory.mktemp("parquet")
    rng = np.random.default_rng(1)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    paths = []
    for split, count in (("train", 12), ("test", 6)):
        data = {"img": [random_image(rng) for _ in range(count)], "label": [i % 3 for i in range(count)]}
        path = root / f"{split}.parquet"
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
        paths.append(path)
    return tuple(paths)


# ---- run_clm.py -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clm_run(text_file, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One from-scratch run of both arms (MoGE and the MoE baseline), 3 steps, checkpoints every 2."""
    out = tmp_path_factory.mktemp("clm") / "out"
    args = ["--train_file", str(text_file), "--output_dir", str(out), "--max_steps", "3", *TINY_GPT2, *COMMON]
    args += ["--moge_loss_coef", "0.01", "--moge_sigma_schedule", "10", "1", "0.2", "--compare_moe_baseline"]
    result = run("run_clm", args, tmp_path_factory.mktemp("cache"))
    return out, result


def test_clm_trains_both_arms_and_saves_what_loads(clm_run):
    out, result = clm_run
    for folder, coef in ((out, 0.01), (out / "moe_baseline", 0.0)):
        for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), f"{folder / name} is missing"
        assert (folder / "checkpoint-2").is_dir()
        metrics = read_json(folder / "eval_results.json")
        assert {"eval_loss", "eval_lm_loss", "eval_perplexity"} <= metrics.keys()
        assert metrics["eval_perplexity"] == pytest.approx(np.exp(metrics["eval_lm_loss"]), rel=1e-6)
        assert read_json(folder / "config.json")["moge_loss_coef"] == coef
        history = read_json(folder / "trainer_state.json")["log_history"]
        assert any("moge/sigma" in entry for entry in history)  # the MoGE callback ran
    table = read_json(out / "comparison.json")
    assert [(row["arm"], row["moge_loss_coef"]) for row in table] == [("MoGE", 0.01), ("MoE baseline", 0.0)]
    assert re.search(r"\| MoGE \| 0\.01 \| \d+\.\d{4} \| \d+\.\d\d \|", result.stdout)
    assert re.search(r"\| MoE baseline \| 0 \| \d+\.\d{4} \| \d+\.\d\d \|", result.stdout)

    # The saved model and tokenizer load with the Auto classes and generate.
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, GPT2MoGELMHeadModel)
    assert model.config.num_experts == 4 and model.config.moge_sigma_schedule == [10.0, 1.0, 0.2]
    assert len(tokenizer) == model.config.vocab_size <= 300
    ids = tokenizer("First Citizen: hear me", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "First Citizen: hear me"  # byte-level BPE round trip
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape == (1, ids.shape[1] + 3)
    # A pad token (the end-of-text token, as GPT-2's), so batches of different lengths pad: collators, pipelines.
    assert tokenizer.pad_token == "<|endoftext|>" and model.config.pad_token_id == tokenizer.pad_token_id
    padded = DataCollatorWithPadding(tokenizer)([tokenizer("First Citizen"), tokenizer("All: Speak, speak.")])
    assert padded["input_ids"].shape[0] == 2 and (padded["attention_mask"] == 0).any()
    tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    texts = generator(["First", "All: Speak, speak"], batch_size=2, max_new_tokens=2, do_sample=False)
    assert [len(text) for text in texts] == [1, 1]


def mark_checkpoint(checkpoint: Path) -> float:
    """Give the checkpoint's first logged loss a value no run produces; a run that resumes from it keeps it."""
    state_file = checkpoint / "trainer_state.json"
    state = read_json(state_file)
    sentinel = 1234.5
    next(entry for entry in state["log_history"] if "loss" in entry)["loss"] = sentinel
    state_file.write_text(json.dumps(state))
    return sentinel


def test_clm_resumes_from_a_checkpoint(clm_run, text_file, tmp_path):
    out, _ = clm_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    sentinel = mark_checkpoint(resumed / "checkpoint-2")
    args = ["--train_file", str(text_file), "--output_dir", str(resumed), "--max_steps", "4", *TINY_GPT2, *COMMON]
    args += ["--moge_loss_coef", "0.01", "--moge_sigma_schedule", "10", "1", "0.2", "--resume_from_checkpoint", "last"]
    result = run("run_clm", args, tmp_path / "cache")
    assert f"Resuming training from {resumed / 'checkpoint-2'}" in result.stdout
    state = read_json(resumed / "trainer_state.json")
    assert state["global_step"] == 4
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[0] == sentinel and len(losses) == 4  # steps 1-2 from the checkpoint, 3-4 run here


def test_clm_resume_refuses_what_it_cannot_resume(run_clm, clm_run, text_file, tmp_path):
    """Named errors, before a step: a saved model (no optimizer, scheduler or RNG state) given as the checkpoint;
    a checkpoint of another architecture; a checkpoint trained on a tokenizer other than the one this run builds."""
    out, _ = clm_run
    args = ["--max_steps", "4", *TINY_GPT2, *COMMON, "--moge_loss_coef", "0.01", "--moge_sigma_schedule", "10", "1"]
    args += ["0.2", "--train_file", str(text_file)]
    with pytest.raises(ValueError, match=r"no optimizer, scheduler or RNG state .* pass it as --model_name_or_path"):
        run_clm.main([*args, "--output_dir", str(tmp_path / "a"), "--resume_from_checkpoint", str(out)])
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    args += ["--output_dir", str(resumed), "--resume_from_checkpoint", "last"]
    with pytest.raises(ValueError, match=r"another architecture \(.*weight \(32, 96\) there, \(48, 144\) now"):
        run_clm.main([*args, "--n_embd", "48"])
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text().upper())
    with pytest.raises(ValueError, match=r"checkpoint-2 was trained with another tokenizer than this run's"):
        run_clm.main([*args, "--train_file", str(other)])
    assert not (resumed / "checkpoint-3").exists()


def test_clm_resume_keeps_finished_arms_and_finishes_the_rest(clm_run, text_file, tmp_path):
    # Both arms of `clm_run` finished (3 steps, checkpoints 2 and 3 each). Kill the baseline after its last checkpoint:
    # its final files are gone. Resuming must keep the finished MoGE arm as it is, and finish the baseline from
    # checkpoint-3 without training a step past max_steps.
    out, _ = clm_run
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    baseline = run_dir / "moe_baseline"
    for name in ("model.safetensors", "trainer_state.json", "all_results.json", "eval_results.json"):
        (baseline / name).unlink()
    moge_files = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    args = ["--train_file", str(text_file), "--output_dir", str(run_dir), "--max_steps", "3", *TINY_GPT2, *COMMON]
    args += ["--moge_loss_coef", "0.01", "--moge_sigma_schedule", "10", "1", "0.2", "--compare_moe_baseline"]
    result = run("run_clm", [*args, "--resume_from_checkpoint", "last"], tmp_path / "cache")
    assert "[MoGE] already trained and evaluated" in result.stdout
    assert f"[MoE baseline] {baseline / 'checkpoint-3'} is the last step of training: loading it" in result.stdout
    assert not (baseline / "checkpoint-4").exists()
    for name, data in moge_files.items():  # weights, metrics and state of the finished arm: untouched
        if name != "comparison.json":
            assert (run_dir / name).read_bytes() == data, name
    assert read_json(baseline / "trainer_state.json")["global_step"] == 3
    assert (
        read_json(baseline / "config.json")["moge_sigma"]
        == read_json(out / "moe_baseline" / "config.json")["moge_sigma"]
    )
    rows = {row["arm"]: row for row in read_json(run_dir / "comparison.json")}
    assert rows["MoGE"]["eval_loss"] == read_json(out / "eval_results.json")["eval_loss"]
    assert rows["MoE baseline"]["eval_loss"] == pytest.approx(
        read_json(out / "moe_baseline" / "eval_results.json")["eval_loss"]
    )


@pytest.mark.parametrize("checkpoint_only", [False, True], ids=["finished", "checkpoint"])
def test_clm_resume_with_other_moge_settings_is_refused(clm_run, run_clm, text_file, tmp_path, checkpoint_only):
    # A finished run (or its last checkpoint) trained with lambda 0.01, resumed with another lambda: its results would
    # be reported under the new label (a lambda 0.5 run printed as "MoE (lambda = 0)"), or training would go on under
    # other settings.
    out, _ = clm_run
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    if checkpoint_only:
        for name in ("model.safetensors", "trainer_state.json", "all_results.json", "eval_results.json"):
            (run_dir / name).unlink()
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    args = ["--train_file", str(text_file), "--output_dir", str(run_dir), "--max_steps", "3", *TINY_GPT2, *COMMON]
    args += ["--moge_sigma_schedule", "10", "1", "0.2", "--resume_from_checkpoint", "last"]
    with pytest.raises(ValueError, match=r"moge_loss_coef 0\.01 there, 0\.0 now.*Use another --output_dir"):
        run_clm.main([*args, "--moge_loss_coef", "0"])
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before


def test_clm_labels_a_lambda_zero_main_arm_moe(run_clm, text_file, tmp_path):
    results = run_clm.main(clm_args(text_file, tmp_path / "out", "--moge_loss_coef", "0"))
    assert list(results) == ["MoE (lambda = 0)"]
    assert [row["arm"] for row in read_json(tmp_path / "out" / "comparison.json")] == ["MoE (lambda = 0)"]


def test_clm_upcycles_a_dense_gpt2(clm_run, text_file, tmp_path):
    out, _ = clm_run
    dense_dir = tmp_path / "dense"
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    dense.save_pretrained(dense_dir)
    AutoTokenizer.from_pretrained(out).save_pretrained(dense_dir)  # the dense model's tokenizer
    upcycled = tmp_path / "upcycled"
    args = [
        "--train_file",
        str(text_file),
        "--output_dir",
        str(upcycled),
        "--dense_model_name_or_path",
        str(dense_dir),
    ]
    args += ["--num_experts", "4", "--moge_window", "2", "--moe_layers", "0", "1", "--block_size", "16"]
    args += ["--max_steps", "1", "--moge_loss_coef", "0.01", *COMMON]
    run("run_clm", args, tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(upcycled)
    assert isinstance(model, GPT2MoGELMHeadModel) and model.config.moe_layers == [0, 1]
    assert "eval_perplexity" in read_json(upcycled / "eval_results.json")


def test_clm_fine_tunes_a_transformers_moe_model_with_moge(clm_run, text_file, tmp_path, run_clm):
    # A saved Qwen3-MoE (8 experts) with the tokenizer of the from-scratch run: fine-tuned with the regularizer, both
    # arms, and saved as a native Qwen3-MoE checkpoint with the MoGE settings in its config.
    out, _ = clm_run
    qwen_dir = tmp_path / "qwen3_moe"
    config = Qwen3MoeConfig(
        vocab_size=300, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(qwen_dir)
    AutoTokenizer.from_pretrained(out).save_pretrained(qwen_dir)
    tuned = tmp_path / "tuned"
    args = ["--model_name_or_path", str(qwen_dir), "--train_file", str(text_file), "--output_dir", str(tuned)]
    args += ["--moge_loss_coef", "0.05", "--moge_map_shape", "2", "4", "--moge_window", "2"]
    args += ["--moge_sigma_schedule", "4", "1", "1", "--max_steps", "2", "--block_size", "16", *COMMON]
    args += ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--compare_moe_baseline"]
    args += ["--router_aux_loss_coef", "0.02"]  # the family's own load-balancing loss, its coefficient set here
    run("run_clm", args, tmp_path / "cache")
    for folder, coef in ((tuned, 0.05), (tuned / "moe_baseline", 0.0)):
        saved = read_json(folder / "config.json")
        assert saved["architectures"] == ["Qwen3MoeForCausalLM"] and "auto_map" not in saved
        # Saved with output_router_logits=False, the model would train no load balancing: both arms train it.
        assert saved["output_router_logits"] is True and saved["router_aux_loss_coef"] == 0.02
        assert saved["moge_loss_coef"] == coef and saved["moge_map_shape"] == [2, 4] and saved["moge_sigma"] == 1.0
        history = read_json(folder / "trainer_state.json")["log_history"]
        assert [entry["moge/sigma"] for entry in history if "loss" in entry] == [4.0, 2.5]
        assert all(entry["moge/moge_loss"] > 0 for entry in history if "loss" in entry)
        assert all(entry["moge/aux_loss"] > 0 for entry in history if "loss" in entry)  # in the outputs, so in `loss`
        assert "eval_perplexity" in read_json(folder / "eval_results.json")
    assert type(AutoModelForCausalLM.from_pretrained(tuned)) is Qwen3MoeForCausalLM
    assert [row["arm"] for row in read_json(tuned / "comparison.json")] == ["MoGE", "MoE baseline"]

    # Fields of moge_hf's own models, and GPT-2's dropout, do not apply to it: refused before training.
    base = ["--model_name_or_path", str(qwen_dir), "--train_file", str(text_file), "--output_dir", str(tmp_path / "x")]
    for extra, message in (
        (["--num_experts", "4"], "--num_experts is a field of moge_hf's own"),
        (["--dropout", "0.1"], "--dropout"),
    ):
        with pytest.raises(ValueError, match=message):
            run_clm.main([*base, *extra, *COMMON])
    with pytest.raises(ValueError, match=r"moge_map_shape.*8 experts"):
        run_clm.main([*base, "--moge_map_shape", "3", "3", *COMMON])


def test_clm_upcycles_a_dense_llama_into_mixtral_and_trains_it_with_moge(clm_run, text_file, tmp_path, run_clm):
    # A saved dense Llama with the from-scratch run's tokenizer: upcycled into Mixtral (8 experts top-2) in both arms,
    # trained with the regularizer and Mixtral's own load-balancing loss, saved as native Mixtral checkpoints.
    out, _ = clm_run
    llama_dir = tmp_path / "llama"
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(llama_dir)
    AutoTokenizer.from_pretrained(out).save_pretrained(llama_dir)
    tuned = tmp_path / "tuned"
    args = ["--dense_model_name_or_path", str(llama_dir), "--train_file", str(text_file), "--output_dir", str(tuned)]
    args += ["--num_experts", "8", "--num_experts_per_tok", "2", "--moge_loss_coef", "0.05", "--max_steps", "2"]
    args += ["--block_size", "16", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4"]
    args += ["--compare_moe_baseline", "--router_aux_loss_coef", "0.02", *COMMON]
    run("run_clm", args, tmp_path / "cache")
    for folder, coef in ((tuned, 0.05), (tuned / "moe_baseline", 0.0)):
        saved = read_json(folder / "config.json")
        assert saved["architectures"] == ["MixtralForCausalLM"] and "auto_map" not in saved
        assert saved["num_local_experts"] == 8 and saved["moge_loss_coef"] == coef
        assert saved["output_router_logits"] is True and saved["router_aux_loss_coef"] == 0.02
        history = read_json(folder / "trainer_state.json")["log_history"]
        assert all(entry["moge/moge_loss"] > 0 and entry["moge/aux_loss"] > 0 for entry in history if "loss" in entry)
        assert "eval_perplexity" in read_json(folder / "eval_results.json")
    assert type(AutoModelForCausalLM.from_pretrained(tuned)) is MixtralForCausalLM
    assert [row["arm"] for row in read_json(tuned / "comparison.json")] == ["MoGE", "MoE baseline"]
    base = ["--dense_model_name_or_path", str(llama_dir), "--train_file", str(text_file)]
    base += ["--output_dir", str(tmp_path / "x"), *COMMON]
    with pytest.raises(ValueError, match="--moe_layers is a field of moge_hf's own"):
        run_clm.main([*base, "--moe_layers", "0"])


def test_clm_refuses_a_model_folder_without_a_tokenizer(run_clm, text_file, tmp_path):
    # transformers builds an empty tokenizer for such a folder: every text would be 0 tokens.
    dense_dir = tmp_path / "dense"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        dense_dir
    )
    args = ["--train_file", str(text_file), "--output_dir", str(tmp_path / "out"), "--dense_model_name_or_path"]
    args += [str(dense_dir), "--num_experts", "4", "--moge_window", "2", "--moe_layers", "0", *COMMON]
    with pytest.raises(ValueError, match=r"empty vocabulary \(it holds no tokenizer files\); pass --tokenizer_name"):
        run_clm.main(args)


def clm_args(text_file: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_file", str(text_file), "--output_dir", str(out), "--max_steps", "1", *TINY_GPT2, *COMMON, *extra]


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"--train_file": "missing.txt"}, FileNotFoundError, r"--train_file 'missing\.txt' does not exist"),
        ({"--experts_implementation": "fancy_mm"}, ValueError, r"Unknown --experts_implementation 'fancy_mm'"),
        ({"--moge_window": "3"}, ValueError, r"moge_window"),  # a 3x3 window does not fit the 2x2 map
        ({"--moge_loss_coef": "-1"}, ValueError, r"moge_loss_coef"),
        ({"--block_size": "100000"}, ValueError, r"fewer than --block_size 100000"),
        ({"--vocab_size": "100"}, ValueError, r"--vocab_size must be at least 257"),
        ({"--train_file": "EMPTY"}, ValueError, r"--train_file '.*empty\.txt' is empty"),
    ],
    ids=[
        "missing-file", "experts-implementation", "moge-window", "moge-loss-coef", "text-too-short", "vocab-size",
        "empty-file",
    ],
)  # fmt: skip
def test_clm_rejects_bad_input_before_training(run_clm, text_file, tmp_path, change, error, message):
    (tmp_path / "empty.txt").write_text("")
    change = {flag: str(tmp_path / "empty.txt") if value == "EMPTY" else value for flag, value in change.items()}
    args = clm_args(text_file, tmp_path / "out")
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    with pytest.raises(error, match=message):
        run_clm.main(args)
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_clm_rejects_a_text_too_short_to_split_for_validation(run_clm, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("one line\nanother line\na third line\n")
    with pytest.raises(ValueError, match="too few lines .* to split 10% off for validation"):
        run_clm.main(clm_args(text, tmp_path / "out"))


def test_clm_rejects_an_unreachable_hub_dataset_at_once(run_clm, tmp_path):
    with pytest.raises(ConnectionError, match=r"Hugging Face Hub cannot be reached.*--train_file"):
        run_clm.main(["--dataset_name", "wikitext", "--output_dir", str(tmp_path), "--report_to", "none"])


def main_job_command() -> str:
    """The `python scripts/run_clm.py ...` part of the README's main-job command if it has one, else of `MAIN_JOB`."""
    readme = (ROOT / "README.md").read_text()
    for block in [*re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL), MAIN_JOB]:
        found = re.search(r"python3? scripts/run_clm\.py[^&;|\n]*", block.replace("\\\n", " "))
        if found:
            return found.group(0).strip()
    raise AssertionError("no main-job command")


def test_main_job_command_parses_and_runs_on_a_slice(run_clm, tmp_path):
    argv = shlex.split(main_job_command())
    assert argv[0] in ("python", "python3") and argv[1] == "scripts/run_clm.py"
    args = argv[2:]
    assert (ROOT / args[args.index("--train_file") + 1]).is_file()  # the repository ships the text
    args[args.index("--train_file") + 1] = str(ROOT / args[args.index("--train_file") + 1])
    # A dry version: the real text and tokenizer, one step of both arms on a few blocks, a smaller model.
    args += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--max_train_samples", "4"]
    args += ["--max_eval_samples", "4", "--n_embd", "32", "--n_head", "2", "--n_layer", "2", "--block_size", "32"]
    args += ["--vocab_size", "512", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
    results = run_clm.main(args)
    assert set(results) == {"MoGE", "MoE baseline"}
    assert all(np.isfinite(metrics["eval_perplexity"]) for metrics in results.values())


# ---- run_image_classification.py ------------------------------------------------------------------------------------


def test_image_classification_on_an_imagefolder_trains_resumes_and_loads(
    run_image_classification, image_folder, tmp_path, caplog
):
    out = tmp_path / "out"
    args = ["--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation")]
    args += ["--output_dir", str(out), *TINY_VIT, *COMMON, "--moge_loss_coef", "0.01"]
    run("run_image_classification", [*args, "--max_steps", "2"], tmp_path / "cache")
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (out / name).is_file(), f"{out / name} is missing"
    assert "eval_accuracy" in read_json(out / "eval_results.json")

    # Resume (in this process, to save a start-up) from the run's checkpoint at step 2.
    sentinel = mark_checkpoint(out / "checkpoint-2")
    with caplog.at_level("INFO"):
        run_image_classification.main([*args, "--max_steps", "3", "--resume_from_checkpoint", "last"])
    assert f"Resuming training from {out / 'checkpoint-2'}" in caplog.text
    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 3
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[0] == sentinel and len(losses) == 3

    model = AutoModelForImageClassification.from_pretrained(out)
    try:
        processor = AutoImageProcessor.from_pretrained(out)
    except ImportError:  # transformers 5.17's AutoImageProcessor needs torchvision; its ViTImageProcessor does not
        processor = ViTImageProcessor.from_pretrained(out)
    assert isinstance(model, ViTMoGEForImageClassification)
    assert model.config.id2label == {0: "cat", 1: "dog"}
    rng = np.random.default_rng(3)
    pixel_values = processor([random_image(rng), random_image(rng)], return_tensors="pt").pixel_values
    assert pixel_values.shape == (2, 3, 16, 16)
    assert model(pixel_values).logits.shape == (2, 2)


def test_image_classification_resumes_exactly(run_image_classification, image_folder, tmp_path):
    # 5 + 5 steps equal 10 (12 images, batch 4: three epochs): the crops and flips are drawn from (seed, epoch,
    # example index), so the resumed run augments every example as the uninterrupted one did.
    base = ["--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation")]
    base += [*TINY_VIT, *COMMON, "--moge_loss_coef", "0.01", "--max_steps", "10", "--save_steps", "5"]
    base += ["--learning_rate", "1e-2", "--do_eval", "false"]
    run_image_classification.main([*base, "--output_dir", str(tmp_path / "full")])
    shutil.copytree(tmp_path / "full" / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")
    run_image_classification.main(
        [*base, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "last"]
    )
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


@pytest.mark.parametrize("model_type", sorted(hosts_with("AutoModelForImageClassification")))
def test_image_classification_trains_every_image_family_from_its_small_config(
    run_image_classification, image_folder, tmp_path, model_type
):
    # `--model_type` alone: the family's small architecture from its record, MoGE settings from the flags.
    out = tmp_path / "out"
    args = ["--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation")]
    args += ["--model_type", model_type, "--output_dir", str(out), *COMMON, "--max_steps", "2"]
    args += ["--num_experts", "4", "--moge_map_shape", "2", "2", "--moge_window", "2", "--moge_loss_coef", "0.01"]
    results = run_image_classification.main([*args, "--per_device_train_batch_size", "4"])
    assert 0 <= results["MoGE"]["eval_accuracy"] <= 1
    model = AutoModelForImageClassification.from_pretrained(out)
    host = HOSTS[model_type]
    assert type(model) is host.heads["AutoModelForImageClassification"].model_class
    assert {name: getattr(model.config, name) for name in host.small_config} == dict(host.small_config)
    assert model.config.num_labels == 2 and model.moge_blocks()


def test_augmentation_draws_depend_on_seed_epoch_and_index_alone(run_image_classification):
    draws = run_image_classification.augmentation_draws
    assert draws(0, 1, 7, 2) == draws(0, 1, 7, 2)
    variants = {draws(seed, epoch, index, 2) for seed in (0, 1) for epoch in (0, 1) for index in range(8)}
    assert len(variants) > 8  # they change with the seed, the epoch and the index


class _EpochProbe(torch.utils.data.Dataset):
    def __init__(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return self.epoch.epoch


def test_augmentation_epoch_reaches_persistent_dataloader_workers(run_image_classification):
    epoch = run_image_classification.AugmentationEpoch()
    loader = torch.utils.data.DataLoader(_EpochProbe(epoch), batch_size=2, num_workers=1, persistent_workers=True)
    seen = []
    for value in (0, 1, 2):
        epoch.on_epoch_begin(None, types.SimpleNamespace(epoch=float(value)), None)
        seen += [int(x) for batch in loader for x in batch]
    assert seen == [0, 0, 1, 1, 2, 2]


def test_image_classification_on_parquet_files_with_baseline(parquet_files, tmp_path):
    train, test = parquet_files
    out = tmp_path / "out"
    args = ["--train_file", str(train), "--validation_file", str(test), "--output_dir", str(out), *TINY_VIT]
    args += [*COMMON, "--max_steps", "2", "--moge_loss_coef", "0.01", "--compare_moe_baseline"]
    result = run("run_image_classification", args, tmp_path / "cache")
    for folder in (out, out / "moe_baseline"):
        metrics = read_json(folder / "eval_results.json")
        assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_samples"] == 6
        assert (folder / "preprocessor_config.json").is_file()
    assert "computing accuracy directly" in result.stdout + result.stderr  # evaluate.load needs the Hub
    assert re.search(r"\| MoE baseline \| 0 \| \d\.\d{4} \|", result.stdout)
    assert AutoModelForImageClassification.from_pretrained(out).config.num_labels == 3


def test_image_classification_upcycles_a_dense_vit(run_image_classification, parquet_files, tmp_path):
    train, test = parquet_files
    dense_dir = tmp_path / "dense"
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=4, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64
    )
    ViTForImageClassification(config).save_pretrained(dense_dir)
    out = tmp_path / "out"
    args = ["--train_file", str(train), "--validation_file", str(test), "--output_dir", str(out)]
    args += ["--dense_model_name_or_path", str(dense_dir), "--num_experts", "4", "--moge_window", "2"]
    args += ["--num_experts_per_tok", "2", "--moe_layers", "1", "--max_steps", "1", "--moge_loss_coef", "0.01"]
    args += ["--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--per_device_train_batch_size", "4"]
    results = run_image_classification.main(args)
    assert 0 <= results["MoGE"]["eval_accuracy"] <= 1
    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, ViTMoGEForImageClassification) and model.config.num_labels == 3


def test_image_classification_rejects_bad_input_before_training(run_image_classification, image_folder, tmp_path):
    main = run_image_classification.main
    base = ["--output_dir", str(tmp_path / "out"), *TINY_VIT, *COMMON, "--max_steps", "1"]
    with pytest.raises(FileNotFoundError, match=r"--train_dir '.*nowhere' does not exist"):
        main(["--train_dir", str(tmp_path / "nowhere"), *base])
    with pytest.raises(FileNotFoundError, match=r"--train_file '.*missing\.parquet' does not exist"):
        main(["--train_file", str(tmp_path / "missing.parquet"), *base])
    with pytest.raises(ValueError, match=r"Unknown --experts_implementation 'fancy_mm'"):
        main(["--train_dir", str(image_folder / "train"), *base, "--experts_implementation", "fancy_mm"])
    with pytest.raises(ValueError, match=r"moge_map_shape"):
        main(["--train_dir", str(image_folder / "train"), *base, "--moge_map_shape", "3", "3"])
    # Images in one folder: an imagefolder without labels.
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(2)
    for i in range(4):
        random_image(rng).save(flat / f"{i}.png")
    with pytest.raises(ValueError, match=r"The image data set has no labels.*sub-folder named after the class"):
        main(["--train_dir", str(flat), *base])
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_the_scripts_pick_the_family_from_the_host_records(
    run_image_classification, run_clm, image_folder, text_file, tmp_path
):
    """`--model_type` names a family of the records that has the script's head; a dense model decides the family by
    its type, and a `--model_type` that contradicts it, another script's family, or an architecture field the
    family's config lacks is refused before training, named."""
    base = ["--train_dir", str(image_folder / "train"), "--output_dir", str(tmp_path / "out"), *COMMON]
    with pytest.raises(ValueError, match=r"No MoGE family with an AutoModelForImageClassification has the model type"):
        run_image_classification.main([*base, *TINY_VIT, "--model_type", "gpt2_moge"])
    with pytest.raises(ValueError, match=r"No MoGE family with an AutoModelForCausalLM has the model type 'vit_moge'"):
        run_clm.main(["--train_file", str(text_file), "--output_dir", str(tmp_path), "--model_type", "vit_moge"])
    with pytest.raises(ValueError, match=r"ViTMoGEConfig \(vit_moge\) has no config field 'n_embd'"):
        run_image_classification.main([*base, *TINY_VIT, "--config_overrides", "n_embd=8"])
    dense = tmp_path / "dense-vit"
    shape = dict(image_size=16, patch_size=4, num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    ViTForImageClassification(ViTConfig(**shape, intermediate_size=64)).save_pretrained(dense)
    args = [*base, "--dense_model_name_or_path", str(dense), "--num_experts", "4", "--moge_map_shape", "2", "2"]
    given = run_image_classification.ModelArguments(dense_model_name_or_path=str(dense))
    assert run_image_classification.model_host(given).model_type == "vit_moge"
    with pytest.raises(ValueError, match=r"--model_type swin_moge contradicts the model given, a vit_moge model"):
        run_image_classification.main([*args, "--model_type", "swin_moge"])
    assert not (tmp_path / "out" / "checkpoint-1").exists()


@pytest.mark.parametrize("script", ["run_clm", "run_image_classification"])
def test_script_help_has_its_description_and_one_default_per_flag(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(["--help"])
    assert exit_info.value.code == 0
    head, _, flags = capsys.readouterr().out.partition("\noptions:\n")
    assert "Train and evaluate a MoGE" in head and "--model_type" in head  # the script's docstring, as written
    assert "\\\n" in head or script != "run_clm"  # its example command keeps its line continuations
    helps = [" ".join(text.split()) for text in re.split(r"\n  (?=-)", flags)]
    assert len(helps) > 50 and not any("(default: None)" in text for text in helps)
    assert all(len(re.findall(r"\((?:config )?default:", text)) <= 1 for text in helps)
    assert any("(default: 5e-05)" in text for text in helps if text.startswith("--learning_rate"))
    assert any("(config default: 16)" in text for text in helps if text.startswith("--num_experts "))


def test_config_overrides_are_name_value_pairs_of_python_literals():
    assert parse_config_overrides("embed_dim=48, depths=[2, 2, 2],hidden_act=gelu,qkv_bias=False") == {
        "embed_dim": 48,
        "depths": [2, 2, 2],
        "hidden_act": "gelu",
        "qkv_bias": False,
    }
    assert parse_config_overrides(None) == {}
    with pytest.raises(ValueError, match=r"--config_overrides: 'depths' is not `name=value`"):
        parse_config_overrides("embed_dim=48,depths")


def test_scratch_config_takes_each_field_once():
    host = HOSTS["vit_moge"]
    # An override may set a dropout rate `--dropout` would set; it wins over it, and over the small architecture.
    config = scratch_config(host, {}, "hidden_dropout_prob=0.1,hidden_size=96", dropout=0.0, num_experts=16)
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.1, 0.0)
    assert config.hidden_size == 96 and config.num_experts == 16
    # A field an argument of its own sets too is refused, named, rather than given twice.
    with pytest.raises(ValueError, match=r"--config_overrides sets 'num_experts'"):
        scratch_config(host, {}, "num_experts=8", dropout=0.0, num_experts=16)
    with pytest.raises(ValueError, match=r"--config_overrides sets 'patch_size'"):
        scratch_config(host, {"patch_size": 4}, "patch_size=2", dropout=0.0)
    # Heads that do not divide the width: ViT's attention would drop the remainder silently.
    with pytest.raises(ValueError, match=r"hidden_size 15 is not a multiple of num_attention_heads 2"):
        scratch_config(host, {"hidden_size": 15, "num_attention_heads": 2}, None, dropout=0.0)


@pytest.mark.parametrize("flag, value", [("--num_experts", "4"), ("--expert_intermediate_size", "8")])
def test_clm_refuses_shape_changes_on_a_saved_model(clm_run, run_clm, text_file, tmp_path, flag, value):
    # A real saved MoGE model: the script reads its config to tell a moge_hf model from a transformers MoE model.
    args = ["--model_name_or_path", str(clm_run[0]), "--train_file", str(text_file)]
    args += ["--output_dir", str(tmp_path / "out"), *COMMON, flag, *value.split()]
    with pytest.raises(ValueError, match=rf"--{flag[2:]} changes weight shapes"):
        run_clm.main(args)
    # Fields that leave the weights' shapes alone are allowed: the same check passes for them.
    assert run_clm.ModelArguments(moge_loss_coef=0.5, moge_window=1).shape_changing_overrides() == []
    assert run_clm.ModelArguments(num_experts_per_tok=1, moge_map_shape=[1, 4]).shape_changing_overrides() == []


def test_clm_checks_override_values_on_a_saved_model_before_training(run_clm, text_file, tmp_path):
    saved = tmp_path / "saved"
    run_clm.main(clm_args(text_file, saved, "--save_strategy", "no", "--do_train"))
    base = ["--model_name_or_path", str(saved), "--train_file", str(text_file), "--output_dir", str(tmp_path / "out")]
    base += ["--max_steps", "1", *COMMON]
    for flag, value in [("--moge_padding", "same"), ("--moge_loss_coef", "nan"), ("--moge_window", "9")]:
        with pytest.raises(ValueError, match=flag[2:]):
            run_clm.main([*base, flag, value])
    assert not (tmp_path / "out").exists()


def test_clm_applies_dropout_to_a_loaded_model_and_checks_local_paths(run_clm, text_file, tmp_path):
    saved = tmp_path / "saved"
    run_clm.main(clm_args(text_file, saved, "--save_strategy", "no", "--do_train", "--dropout", "0.0"))
    model = run_clm.build_model(run_clm.ModelArguments(model_name_or_path=str(saved), dropout=0.3), None, {})
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.3, 0.3, 0.3)
    kept = run_clm.build_model(run_clm.ModelArguments(model_name_or_path=str(saved)), None, {})
    assert kept.config.resid_pdrop == 0.0  # not given: the saved model's own
    for flag in ("--model_name_or_path", "--tokenizer_name"):
        args = [flag, str(tmp_path / "nowhere"), "--train_file", str(text_file), "--output_dir", str(tmp_path / "o")]
        with pytest.raises(FileNotFoundError, match=rf"{flag} .*nowhere' does not exist"):
            run_clm.main([*args, *COMMON])
    # An `org/name`-shaped folder that is not there: offline (the tests are), it can only have meant a local folder.
    args = [
        "--model_name_or_path",
        "runs/missing",
        "--train_file",
        str(text_file),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(FileNotFoundError, match="'runs/missing' does not exist as a local folder"):
        run_clm.main([*args, *COMMON])
    args = ["--dataset_name", "wikitext", "--validation_file", str(text_file), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="--validation_file goes with --train_file"):
        run_clm.main([*args, *COMMON])


def test_clm_pushes_each_arm_to_its_own_repo_after_evaluation(run_clm, text_file, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    args = clm_args(text_file, tmp_path / "out", "--moge_loss_coef", "0.1", "--compare_moe_baseline")
    run_clm.main([*args, "--save_strategy", "no", "--push_to_hub", "--hub_model_id", "me/gpt2-moge"])
    last = {upload["repo_id"]: upload for upload in hub.uploads}  # the last push to each repo
    assert set(last) == {"me/gpt2-moge", "me/gpt2-moge-moe-baseline"}
    for repo_id, coef in [("me/gpt2-moge", 0.1), ("me/gpt2-moge-moe-baseline", 0.0)]:
        folder = last[repo_id]["folder"]
        assert json.loads((folder / "config.json").read_text())["moge_loss_coef"] == coef
        assert "eval_perplexity" in read_json(folder / "eval_results.json")
        perplexity = read_json(folder / "eval_results.json")["eval_perplexity"]
        card = " ".join((folder / "README.md").read_text().split())
        assert f"| evaluation | perplexity | {perplexity:.4f} |" in card  # on the card, with what was evaluated:
        evaluated = read_json(folder / "run_record.json")["eval"]  # the run record, pushed with the card
        assert evaluated["examples"] == read_json(folder / "eval_results.json")["eval_samples"]
        blocks = f"{evaluated['examples']} blocks of 16 tokens"
        assert f"on {blocks} from the last 10% of the lines of the local file `train.txt`:" in card
        assert "validation" not in card and "model-index" not in card.split(" --- ")[0]  # no Hub split is claimed


def test_image_script_records_what_it_evaluates(run_image_classification, image_folder):
    # What the run record (and so the model card) says the run trained and evaluated on: never a Hub split it was not.
    data_args = run_image_classification.DataArguments(
        train_dir=str(image_folder / "train"), train_val_split=0.5, max_eval_samples=3
    )
    raw = run_image_classification.load_image_datasets(data_args, seed=0)
    assert len(raw["validation"]) == 3
    assert data_args.recorded_data == (
        {
            "local": "train/",
            "part": "the 50% of the images not held out for evaluation (seed 0)",
            "examples": 6,
            "unit": "images",
        },
        {
            "local": "train/",
            "part": "the first 3 images of a random 50% of the images (seed 0), held out",
            "examples": 3,
            "unit": "images",
        },
    )
    data_args = run_image_classification.DataArguments(
        train_dir=str(image_folder / "train"), validation_dir=str(image_folder / "validation")
    )
    run_image_classification.load_image_datasets(data_args, seed=0)
    assert data_args.recorded_data == (
        {"local": "train/", "examples": 12, "unit": "images"},
        {"local": "validation/", "examples": 4, "unit": "images"},
    )


# ---- transformers' distributed engine: --ep_size / --fsdp_size -----------------------------------------------------

ENGINE = "ep_size" in getattr(DistributedConfig, "__dataclass_fields__", {})


@pytest.mark.slow
@pytest.mark.skipif(
    not ENGINE, reason="this transformers' DistributedConfig has no expert parallelism (ep_size, 5.19+)"
)
@pytest.mark.parametrize("script", ["run_clm", "run_image_classification"])
def test_scripts_train_with_expert_parallelism_on_two_processes(script, text_file, image_folder, tmp_path):
    out = tmp_path / "out"
    if script == "run_clm":
        data, tiny, model_class = ["--train_file", str(text_file)], TINY_GPT2, GPT2MoGELMHeadModel
    else:
        data = ["--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation")]
        tiny, model_class = TINY_VIT, ViTMoGEForImageClassification
    engine = ["--ep_size", "2", "--fsdp_size", "2", "--save_only_model", "true"]
    args = [*data, "--output_dir", str(out), "--max_steps", "3", *tiny, *COMMON, *engine]
    result = run(script, args, tmp_path / "cache", processes=2)
    # Each rank trained the model as the engine sharded it: 2 of the 4 experts of each MoGE layer per rank.
    output = result.stdout + result.stderr
    assert f"FSDP{model_class.__name__}" in output
    assert "each process runs 2 of the 4 experts of each of the 1 MoE layers" in output
    assert not (out / "_engine-initial-model").exists()  # the model the engine loaded from: removed
    assert {"eval_loss"} <= read_json(out / "eval_results.json").keys()
    # What it saved is a whole, ordinary MoGE folder: its own code (not torch's FSDP files), untied embeddings.
    config = check_moge_model_dir(out)
    assert config["architectures"] == [model_class.__name__]
    assert {value.split(".")[0] for value in config["auto_map"].values()} <= {
        "configuration_moge",
        "modeling_gpt2_moge",
        "modeling_vit_moge",
    }
    assert not list(out.glob("_fsdp*.py"))
    loaded = model_class.from_pretrained(out)
    assert loaded.moge_blocks()[0].experts.up_proj.shape[0] == 4  # every expert, gathered
    assert config.get("tie_word_embeddings") is False or model_class is ViTMoGEForImageClassification


def test_engine_arguments_refuse_what_cannot_run(run_clm, text_file, tmp_path):
    from moge_hf.training import EngineArguments

    base = ["--train_file", str(text_file), "--output_dir", str(tmp_path / "out"), *TINY_GPT2, *COMMON]
    with pytest.raises(ValueError, match="launch the script with `torchrun"):
        run_clm.main([*base, "--max_steps", "1", "--ep_size", "2"])
    two = types.SimpleNamespace(
        world_size=2, save_strategy="steps", save_only_model=False, resume_from_checkpoint=None,
        load_best_model_at_end=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="--save_only_model true"):
        EngineArguments(ep_size=2).check(two)
    with pytest.raises(ValueError, match="cannot resume"):
        resuming = types.SimpleNamespace(**{**vars(two), "save_strategy": "no", "resume_from_checkpoint": "last"})
        EngineArguments(fsdp_size=2).check(resuming)
    with pytest.raises(ValueError, match="--load_best_model_at_end cannot load a checkpoint into a model sharded"):
        best = types.SimpleNamespace(**{**vars(two), "save_only_model": True, "load_best_model_at_end": True})
        EngineArguments(ep_size=2).check(best)
    assert EngineArguments().check(two) is None  # nothing asked: no sharding
    if ENGINE:  # "false" is no resume, as the scripts read it: the run goes ahead
        not_resuming = types.SimpleNamespace(**{**vars(two), "save_strategy": "no", "resume_from_checkpoint": "false"})
        assert isinstance(EngineArguments(ep_size=2).check(not_resuming), DistributedConfig)


@pytest.mark.skipif(
    not ENGINE, reason="this transformers' DistributedConfig has no expert parallelism (ep_size, 5.19+)"
)
def test_an_ep_size_that_does_not_divide_the_experts_is_refused_before_anything_is_written(tmp_path):
    from moge_hf.training import EngineArguments, shard_with_engine

    args = types.SimpleNamespace(
        world_size=3, save_strategy="no", save_only_model=False, resume_from_checkpoint=None,
        load_best_model_at_end=False, output_dir=str(tmp_path),
    )  # fmt: skip
    from tiny import gpt2_config

    model = GPT2MoGELMHeadModel(gpt2_config(num_experts=4, moge_map_shape=[2, 2], moge_window=2))
    with pytest.raises(ValueError, match=r"--ep_size 3 does not divide the 4 experts"):
        shard_with_engine(model, EngineArguments(ep_size=3), args)
    assert not list(tmp_path.iterdir())
    # The scripts ask the same as soon as the number of experts is known, before reading any data.
    with pytest.raises(ValueError, match=r"--ep_size 3 does not divide the 4 experts"):
        EngineArguments(ep_size=3).check_experts(4)
    EngineArguments(ep_size=2).check_experts(4)


# ---- what the scripts run: --do_train / --do_eval / --eval_strategy, and options that drop the routing losses ----


def test_clm_with_an_eval_strategy_and_no_do_flags_trains_and_evaluates(run_clm, text_file, tmp_path):
    # transformers turns `do_eval` on for any --eval_strategy but "no": the scripts read which flags were given, so
    # "neither --do_train nor --do_eval" still means both (it used to evaluate an untrained model and exit 0).
    out = tmp_path / "out"
    results = run_clm.main(
        clm_args(text_file, out, "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1")
    )
    metrics = results["MoGE"] if "MoGE" in results else next(iter(results.values()))
    assert "train_loss" in metrics and "eval_loss" in metrics
    assert (out / "model.safetensors").is_file() and (out / "train_results.json").is_file()
    evaluations = [entry for entry in json.loads((out / "trainer_state.json").read_text())["log_history"]
                   if "eval_loss" in entry]  # fmt: skip
    assert len(evaluations) >= 2  # during training (each step), as --eval_strategy asked


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--do_eval", "--eval_strategy", "steps"],
            r"--eval_strategy steps evaluates during training, but --do_train",
        ),
        (["--do_train", "false", "--eval_strategy", "epoch"], r"--eval_strategy epoch evaluates during training"),
        (["--do_train", "false", "--do_eval", "false"], r"nothing to run"),
        (["--label_smoothing_factor", "0.1"], r"--label_smoothing_factor 0\.1: .*routing losses .* would not train"),
    ],
)
def test_scripts_refuse_runs_that_would_not_do_what_was_asked(run_clm, run_image_classification, text_file, tmp_path,
                                                              extra, message):  # fmt: skip
    with pytest.raises(ValueError, match=message):
        run_clm.main(clm_args(text_file, tmp_path / "clm", *extra))
    with pytest.raises(ValueError, match=message):
        run_image_classification.main(["--train_dir", "unused", "--output_dir", str(tmp_path / "vit"), *extra])
    assert not (tmp_path / "clm").exists() and not (tmp_path / "vit").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--do_eval"], r"--do_eval without --do_train evaluates a model it loads"),
        (["--num_train_epochs", "0", "--max_steps", "-1"], r"--num_train_epochs 0\.0 \(and no --max_steps\) trains"),
        (["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size must be at least 1, got 0"),
        (["--max_train_samples", "0"], r"--max_train_samples must be at least 1 \(or left out for all\), got 0"),
        (["--max_eval_samples", "-3"], r"--max_eval_samples must be at least 1 \(or left out for all\), got -3"),
        (["--dropout", "1.5"], r"--dropout must be a rate in \[0, 1\), got 1\.5"),
        (["--dropout", "nan"], r"--dropout must be a rate in \[0, 1\), got nan"),
        (["--expert_noise_std", "0.1"], r"--expert_noise_std 0\.1 applies to upcycling"),
        (["--dataset_config_name", "plain"], r"--dataset_config_name goes with --dataset_name"),
    ],
    ids=[
        "eval-from-scratch",
        "no-epochs",
        "batch-size",
        "train-samples",
        "eval-samples",
        "dropout",
        "dropout-nan",
        "noise-without-upcycling",
        "config-without-dataset",
    ],  # fmt: skip
)
def test_scripts_refuse_runs_with_nothing_to_run_or_values_out_of_range(
    run_clm, run_image_classification, text_file, image_folder, tmp_path, extra, message
):
    with pytest.raises(ValueError, match=message):
        run_clm.main(clm_args(text_file, tmp_path / "clm", *extra))
    args = ["--train_dir", str(image_folder / "train"), "--output_dir", str(tmp_path / "vit"), *TINY_VIT, *COMMON]
    with pytest.raises(ValueError, match=message):
        run_image_classification.main([*args, "--max_steps", "1", *extra])
    assert not (tmp_path / "clm").exists() and not (tmp_path / "vit").exists()  # refused before anything was written


def test_clm_reads_text_columns_and_refuses_data_that_is_not_text(run_clm, text_file, tmp_path):
    """A CSV without a `text` column: its first column of strings is the text; a column of numbers named as the
    text, a validation file of another kind, or one with other columns, is refused naming it."""
    lines = [line for line in text_file.read_text().splitlines() if line.strip() and "," not in line]
    table = tmp_path / "table.csv"
    table.write_text("id,body\n" + "".join(f"{i},{line}\n" for i, line in enumerate(lines)))
    run_clm.main([*clm_args(table, tmp_path / "csv"), "--save_strategy", "no"])
    assert read_json(tmp_path / "csv" / "train_results.json")["train_samples"] > 0
    with pytest.raises(ValueError, match=r"The text column 'id' of the train data holds Value\('int64'\), not text"):
        run_clm.main(clm_args(table, tmp_path / "id", "--text_column_name", "id"))
    with pytest.raises(ValueError, match=r"--validation_file '.*table\.csv' is not of the kind of --train_file"):
        run_clm.main(clm_args(text_file, tmp_path / "mixed", "--validation_file", str(table)))
    other = tmp_path / "other.csv"
    other.write_text("id,title\n" + "".join(f"{i},{line}\n" for i, line in enumerate(lines)))
    with pytest.raises(ValueError, match=r"do not read as one data set \(the same columns of the same types\)"):
        run_clm.main(clm_args(table, tmp_path / "columns", "--validation_file", str(other)))


def test_image_script_decodes_image_bytes_and_refuses_missing_labels_or_images(
    run_image_classification, image_folder, tmp_path
):
    """Parquet written by pandas (images as `{bytes, path}` records, string labels) trains, and the record gives the
    shares of the images as split (whole images); a label missing in a row, or an image column of numbers, is refused
    naming the column."""
    paths = sorted((image_folder / "train").glob("*/*.png"))
    images = [{"bytes": path.read_bytes(), "path": None} for path in paths]
    labels = [path.parent.name for path in paths]
    args = [*TINY_VIT, *COMMON, "--max_steps", "1", "--save_strategy", "no", "--train_val_split", "0.2"]
    for name, frame in (
        ("pandas", {"image": images, "label": labels}),
        ("unlabelled", {"image": images, "label": [None, *labels[1:]]}),
        ("numbers", {"image": list(range(len(paths))), "label": labels}),
    ):
        pandas.DataFrame(frame).to_parquet(tmp_path / f"{name}.parquet")
        run = ["--train_file", str(tmp_path / f"{name}.parquet"), "--output_dir", str(tmp_path / name), *args]
        if name == "pandas":
            run_image_classification.main(run)
            assert read_json(tmp_path / name / "train_results.json")["train_samples"] == 9
            record = read_json(tmp_path / name / "run_record.json")  # 20% of 12 images: 3 held out, 25%
            assert record["train"]["part"] == "the 75% of the images not held out for evaluation (seed 0)"
            assert record["eval"]["part"] == "a random 25% of the images (seed 0), held out"
        else:
            message = r"has no label in row \d+" if name == "unlabelled" else r"The image column 'image' of the"
            with pytest.raises(ValueError, match=message):
                run_image_classification.main(run)


def test_scripts_name_a_model_folder_of_the_wrong_kind(run_clm, run_image_classification, text_file, tmp_path):
    """A MoGE image classifier given to the language-model script, or a folder without a model config given to the
    image script: refused before any data is read, naming the folder and what it holds."""
    vit = tmp_path / "vit"
    ViTMoGEForImageClassification(ViTMoGEConfig(hidden_size=32, num_hidden_layers=2)).save_pretrained(vit)
    args = ["--train_file", str(text_file), "--output_dir", str(tmp_path / "out"), *COMMON]
    with pytest.raises(ValueError, match=r"'.*vit' is a vit_moge model, which has no causal language model"):
        run_clm.main([*args, "--model_name_or_path", str(vit)])
    (tmp_path / "empty").mkdir()
    args = ["--train_dir", str(tmp_path / "unused"), "--output_dir", str(tmp_path / "out"), *COMMON]
    with pytest.raises(ValueError, match=r"--model_name_or_path '.*empty' holds no model: no config\.json"):
        run_image_classification.main([*args, "--model_name_or_path", str(tmp_path / "empty")])


def test_image_script_names_an_image_file_it_cannot_decode(run_image_classification, image_folder, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(image_folder / "train", folder)
    broken = sorted(folder.glob("*/*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:60])  # cut off in the middle of its pixels
    args = ["--train_dir", str(folder), "--output_dir", str(tmp_path / "out"), *TINY_VIT, *COMMON, "--max_steps", "3"]
    with pytest.raises(ValueError, match=rf"The image {re.escape(str(broken))} cannot be read: "):
        run_image_classification.main([*args, "--per_device_train_batch_size", "12", "--train_val_split", "0.01"])


def test_scripts_do_eval_alone_evaluates_and_do_eval_false_alone_trains(run_clm, text_file, tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    from moge_hf.training import parse_script_arguments

    # `--do_eval false` with an --eval_strategy (which turns `do_eval` on in TrainingArguments): train only.
    extra = ["--do_eval", "false", "--eval_strategy", "steps", "--output_dir", str(tmp_path / "x")]
    parsed = parse_script_arguments(HfArgumentParser(TrainingArguments), extra)
    assert parsed[0].do_train
    run_clm.main(clm_args(text_file, tmp_path / "trained", "--do_eval", "false"))
    assert (tmp_path / "trained" / "train_results.json").is_file()
    assert not (tmp_path / "trained" / "eval_results.json").exists()
    evaluate = ["--train_file", str(text_file), "--output_dir", str(tmp_path / "evaluated"), "--do_eval"]
    evaluate += ["--model_name_or_path", str(tmp_path / "trained"), "--block_size", "16", *COMMON]
    run_clm.main(evaluate)
    assert (tmp_path / "evaluated" / "eval_results.json").is_file()
    assert not (tmp_path / "evaluated" / "train_results.json").exists()


def test_upcycle_noise_study_pairs_the_two_layouts(text_file, tmp_path):
    # Without noise the two layouts are the same model: the paired study must then find no difference at all, and
    # both arms must start where the dense model ends (the upcycling is exact).
    study = load_script("upcycle_noise_study")
    tiny = ["--hidden", "32", "--layers", "2", "--heads", "4", "--intermediate", "32", "--seq", "16", "--batch", "4"]
    tiny += ["--dense_steps", "3", "--steps", "2", "--num_experts", "8", "--seeds", "0", "1"]
    result = study.main(["--train_file", str(text_file), "--output_dir", str(tmp_path), *tiny, "--noise", "0"])
    assert [run["seed"] for run in result["runs"]] == [0, 1]
    for run in result["runs"]:
        assert run["difference"] == 0.0
        for layout in ("independent", "map"):
            assert abs(run[layout]["validation_loss_at_start"] - result["dense_validation_loss"]) < 1e-4
            assert run[layout]["validation_loss"] < run[layout]["validation_loss_at_start"]
    assert read_json(tmp_path / "results.json")["interval_95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="--seeds"):
        study.main(["--train_file", str(text_file), "--output_dir", str(tmp_path), "--seeds", "0"])


def test_upcycle_noise_study_map_noise_starts_neighbours_alike():
    study = load_script("upcycle_noise_study")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    dense = LlamaForCausalLM(config)
    mlp = dense.model.layers[0].mlp
    dense_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    args = argparse.Namespace(num_experts=16, top_k=2, noise=0.1, router_aux_loss_coef=0.01)
    spread = {}
    for layout in ("independent", "map"):
        torch.manual_seed(1)
        moe = study.upcycle(dense, args, layout)
        noise = moe.model.layers[0].mlp.experts.gate_up_proj.detach() - dense_weight  # (16, 2I, d), 4x4 map
        assert 0.07 < noise.std() / dense_weight.std() < 0.13  # the same size either way
        neighbour, far = (noise[0] - noise[1]).norm(), (noise[0] - noise[10]).norm()  # 1 and 2+2 cells apart
        spread[layout] = neighbour / far
    assert 0.9 < spread["independent"] < 1.1 and spread["map"] < 0.8


# ---- the run record: what each run trained and evaluated on, in its output folder ----------------------------------


def test_clm_writes_the_run_record_of_each_arm_and_the_card_follows_it(clm_run, tmp_path):
    out, _ = clm_run
    for folder in (out, out / "moe_baseline"):
        record = read_json(folder / "run_record.json")
        assert record["script"] == "run_clm.py" and record["hyperparameters"]["seed"] == 0
        trained, evaluated = record["train"], record["eval"]
        for entry, part, count in (
            (trained, "the first 90% of the lines", read_json(folder / "train_results.json")["train_samples"]),
            (evaluated, "the last 10% of the lines", read_json(folder / "eval_results.json")["eval_samples"]),
        ):
            assert entry == {"local": "train.txt", "part": part, "examples": count, "unit": "blocks of 16 tokens"}
    # push_to_hub.py renders the card from it: no Hub data set or split is claimed; the dataset flag is refused.
    script = load_script("push_to_hub")
    argv = ["--model-dir", str(out), "--repo-id", "me/gpt2-moge", "--dry-run", str(tmp_path / "upload")]
    assert script.main(argv) == 0
    card = " ".join((tmp_path / "upload" / "README.md").read_text().split())
    assert f"- {trained['examples']} blocks of 16 tokens from the first 90% of the lines of the local file" in card
    assert f"on {evaluated['examples']} blocks of 16 tokens from the last 10% of the lines of the local" in card
    assert "validation" not in card and "model-index" not in card.split(" --- ")[0] and "not recorded" not in card
    assert script.main([*argv[:-1], str(tmp_path / "other"), "--dataset", "karpathy/tiny_shakespeare"]) == 1


def test_clm_records_the_training_text_as_described_and_the_blocks_it_kept(run_clm, text_file, tmp_path):
    description = "the first scene of Coriolanus, repeated"
    args = clm_args(text_file, tmp_path / "out", "--train_data_description", description, "--max_eval_samples", "2")
    run_clm.main([*args, "--save_strategy", "no"])
    record = read_json(tmp_path / "out" / "run_record.json")
    assert record["train"]["description"] == record["eval"]["description"] == description
    assert record["eval"]["part"] == "the first 2 blocks of the last 10% of the lines"
    assert record["eval"]["examples"] == 2
    assert record["train"]["part"] == "the first 90% of the lines"


def test_the_run_record_describes_what_the_folder_holds(run_clm, clm_run, text_file, tmp_path, monkeypatch):
    """The record is written as it comes true: an evaluation-only run records the training the model's own record
    gives (not its own unused training arguments), in place or in another folder; a run that dies before saving, or
    an arm found finished, leaves the folder's record as it was."""
    out, _ = clm_run
    saved = tmp_path / "saved"
    shutil.copytree(out, saved, ignore=shutil.ignore_patterns("checkpoint-*", "moe_baseline"))
    trained = read_json(saved / "run_record.json")
    for folder in (saved, tmp_path / "evaluated"):
        args = ["--model_name_or_path", str(saved), "--train_file", str(text_file), "--output_dir", str(folder)]
        run_clm.main(
            [
                *args,
                *COMMON,
                "--block_size",
                "16",
                "--do_eval",
                "--max_eval_samples",
                "2",
                "--per_device_train_batch_size",
                "32",
            ]
        )
        record = read_json(folder / "run_record.json")
        assert record["train"] == trained["train"] and record["hyperparameters"] == trained["hyperparameters"]
        assert record["eval"]["examples"] == 2 == read_json(folder / "eval_results.json")["eval_samples"]
    before = (saved / "run_record.json").read_bytes()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Trainer, "train", killed)
    args = ["--model_name_or_path", str(saved), "--train_file", str(text_file), "--output_dir", str(saved)]
    with pytest.raises(KeyboardInterrupt):
        run_clm.main([*args, *COMMON, "--block_size", "16", "--max_steps", "1", "--train_data_description", "x"])
    assert (saved / "run_record.json").read_bytes() == before
    monkeypatch.undo()

    finished = tmp_path / "finished"
    shutil.copytree(out, finished, ignore=shutil.ignore_patterns("moe_baseline"))
    before = (finished / "run_record.json").read_bytes()
    args = ["--train_file", str(text_file), "--output_dir", str(finished), "--max_steps", "3", *TINY_GPT2, *COMMON]
    args += ["--moge_loss_coef", "0.01", "--moge_sigma_schedule", "10", "1", "0.2", "--resume_from_checkpoint", "last"]
    run_clm.main([*args, "--train_data_description", "another text"])
    assert (finished / "run_record.json").read_bytes() == before


def test_image_script_keeps_a_saved_classifiers_classes(run_image_classification, image_folder, tmp_path):
    """Evaluating a saved classifier: images that name its classes in another order get its ids (the same images
    score the same either way); images of other classes are refused, naming both lists."""
    saved, folders = tmp_path / "saved", ["--train_dir", str(image_folder / "train")]
    folders += ["--validation_dir", str(image_folder / "validation")]
    run_image_classification.main([*folders, "--output_dir", str(saved), *TINY_VIT, *COMMON, "--max_steps", "2"])
    assert read_json(saved / "config.json")["id2label"] == {"0": "cat", "1": "dog"}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dog", "cat"])})
    files = {}
    for split in ("train", "validation"):
        paths = sorted((image_folder / split).glob("*/*.png"))
        data = {"image": [str(path) for path in paths], "label": [int(path.parent.name == "cat") for path in paths]}
        files[split] = tmp_path / f"{split}.parquet"
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(files[split]))
    parquet = ["--train_file", str(files["train"]), "--validation_file", str(files["validation"])]
    evaluate = ["--model_name_or_path", str(saved), *COMMON, "--do_eval", "--per_device_eval_batch_size", "4"]
    losses = []
    for name, data in (("folders", folders), ("parquet", parquet)):
        run_image_classification.main([*data, *evaluate, "--output_dir", str(tmp_path / name)])
        losses.append(read_json(tmp_path / name / "eval_results.json")["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)

    other = tmp_path / "other"
    for split in ("train", "validation"):
        shutil.copytree(image_folder / split / "dog", other / split / "dog")
        shutil.copytree(image_folder / split / "cat", other / split / "eel")
    data = ["--train_dir", str(other / "train"), "--validation_dir", str(other / "validation")]
    with pytest.raises(ValueError, match=r"classifies into 2 classes \(cat, dog\), the images have 2 \(dog, eel\)"):
        run_image_classification.main([*data, *evaluate, "--output_dir", str(tmp_path / "refused")])


def test_image_script_writes_the_run_record(run_image_classification, image_folder, tmp_path):
    out = tmp_path / "out"
    args = ["--train_dir", str(image_folder / "train"), "--train_val_split", "0.5", "--output_dir", str(out)]
    args += [*TINY_VIT, *COMMON, "--max_steps", "1", "--save_strategy", "no", "--train_data_description", "noise"]
    run_image_classification.main(args)
    record = read_json(out / "run_record.json")
    assert record["script"] == "run_image_classification.py"
    assert record["train"] == {
        "local": "train/",
        "description": "noise",
        "part": "the 50% of the images not held out for evaluation (seed 0)",
        "examples": read_json(out / "train_results.json")["train_samples"],
        "unit": "images",
    }
    assert record["eval"] == {
        "local": "train/",
        "description": "noise",
        "part": "a random 50% of the images (seed 0), held out",
        "examples": read_json(out / "eval_results.json")["eval_samples"],
        "unit": "images",
    }
