"""Multi-process training on CPU (gloo): plain `transformers.Trainer` with DDP on 2 processes, FSDP2 sharding, and the
accelerate config files in scripts/.

One `torch.distributed.run` launch of tests/distributed_worker.py (2 processes) and one single-process launch, side by
side, train every variant once (module fixture); the tests compare what they saved. The model is top-1 over 8
experts, so experts get no token on a rank; the data order is fixed (sequential sampler, fixed seeds). Optimizer: SGD
with momentum (see the worker for why not Adam).

What has to match, and why. With `average_tokens_across_devices` (Trainer's default) `num_items_in_batch` is the
label-token count of the whole global batch, gathered over the ranks; each rank's LM loss is its token sum divided by
it, Trainer multiplies the loss by the number of processes and DDP averages the gradients, so the gradient is that of
the global-batch mean. The LM head weights the routing losses of a micro-batch by its share of `num_items_in_batch`:
the z-loss and the group-sparsity (MoGE) loss are means over tokens, so equal shares make them global-batch means too.
The Switch load-balancing loss is not a mean over tokens (`E * sum_e f_e P_e`, a product of two means): every
micro-batch has its own, as under gradient accumulation and in transformers' other MoE models. Hence:

* 2 processes x batch B == 1 process x batch B x 2 accumulation steps, with every routing loss on;
* 2 processes x batch B == 1 process x batch 2B when `router_aux_loss_coef=0`;
* with the load-balancing loss on, they differ by exactly `coef * (mean of the per-rank aux losses - aux of the
  global batch)` at the first step, and the other routing losses do not differ;
* with `router_aux_loss_global=True` (dispatch fractions all-reduced over the ranks) they match again, load-balancing
  loss on.

Trainer logs the mean over ranks of `loss * num_processes`, i.e. the loss of the global batch: the sum over ranks
and micro-batches of the `loss` the model returned.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
import torch.distributed as dist
import transformers
from tiny import vit_config
from transformers import default_data_collator
from transformers.distributed import DistributedConfig

from moge_hf import ViTMoGEForImageClassification


WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
REPO = WORKER.parent.parent
SCRIPTS = REPO / "scripts"
BATCH = 2  # per process
STEPS = 4
AUX = 0.01  # router_aux_loss_coef when the load-balancing loss is on
IMPLEMENTATIONS = ["eager", "grouped_mm"]
LOSS_RTOL = 1e-6  # per-step losses (float32 sums in a different order: measured ~6e-8)
WEIGHT_RTOL = 1e-5  # max |difference| / max |weight| of every tensor (measured ~5e-7)
TIMEOUT_S = 300

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)


def run(name, implementation, aux_coef, batch, grad_accum, mode="trainer", aux_global=False):
    return {
        "name": name,
        "mode": mode,
        "experts_implementation": implementation,
        "router_aux_loss_coef": aux_coef,
        "router_aux_loss_global": aux_global,
        "per_device_batch": batch,
        "grad_accum": grad_accum,
        "steps": STEPS,
    }


TWO_PROCESS_RUNS = [
    *(run(f"ddp-{impl}-aux", impl, AUX, BATCH, 1) for impl in IMPLEMENTATIONS),
    *(run(f"ddp-{impl}-noaux", impl, 0.0, BATCH, 1) for impl in IMPLEMENTATIONS),
    run("fsdp2-eager-aux", "eager", AUX, BATCH, 1, mode="fsdp2"),
    run("ddp-eager-aux-global", "eager", AUX, BATCH, 1, aux_global=True),
    {**run("ddp-eager-unlabeled", "eager", AUX, BATCH, 1), "unlabeled": True},
]
ONE_PROCESS_RUNS = [
    *(run(f"one-{impl}-aux-accum2", impl, AUX, BATCH, 2) for impl in IMPLEMENTATIONS),
    *(run(f"one-{impl}-noaux-batch2B", impl, 0.0, 2 * BATCH, 1) for impl in IMPLEMENTATIONS),
    run("one-eager-aux-batch2B", "eager", AUX, 2 * BATCH, 1),
]

# transformers' distributed engine: `from_pretrained(path, distributed_config=DistributedConfig(ep_size=2,
# fsdp_size=2))` shards the model by the MoGE configs' plans (experts split over the ranks, FSDP2 for the rest), and
# plain Trainer trains it. Expert parallelism in `DistributedConfig` (`ep_size`) came with transformers 5.19; CI tests
# it on the newest release of the supported range. Untied embeddings: the engine's FSDP2 does not keep tied ones tied
# (refused, see `test_tied_embeddings_are_refused_under_the_engines_fsdp`).
ENGINE = "ep_size" in getattr(DistributedConfig, "__dataclass_fields__", {})
EP = {"ep_size": 2, "fsdp_size": 2}
IMAGE_FAMILIES = ["vit", "swin"]  # image classifiers sharded by the engine (Swin: a nested encoder, per-stage sizes)


def engine_run(spec: dict, **extra) -> dict:
    return {**spec, "distributed": EP, "tie_word_embeddings": False, **extra}


ENGINE_TWO_PROCESS_RUNS = [
    *(engine_run(run(f"ep-{impl}-aux", impl, AUX, BATCH, 1)) for impl in IMPLEMENTATIONS),
    engine_run(run("ep-eager-aux-global", "eager", AUX, BATCH, 1, aux_global=True)),
    *({"name": f"ep-{name}", "mode": "image-forward", "family": name, "distributed": EP} for name in IMAGE_FAMILIES),
    {**run("ep-tied-refused", "eager", AUX, BATCH, 1), "mode": "refused", "distributed": EP},
]
ENGINE_ONE_PROCESS_RUNS = [
    *(
        {**run(f"one-{impl}-aux-accum2-untied", impl, AUX, BATCH, 2), "tie_word_embeddings": False}
        for impl in IMPLEMENTATIONS
    ),
    {**run("one-eager-aux-batch2B-untied", "eager", AUX, 2 * BATCH, 1), "tie_word_embeddings": False},
]
if ENGINE:
    TWO_PROCESS_RUNS += ENGINE_TWO_PROCESS_RUNS
    ONE_PROCESS_RUNS += ENGINE_ONE_PROCESS_RUNS
needs_engine = pytest.mark.skipif(
    not ENGINE,
    reason=f"transformers {transformers.__version__}'s DistributedConfig has no expert parallelism (ep_size, 5.19+)",
)


def child_env() -> dict[str, str]:
    """The environment of the launched processes: no inherited distributed or accelerate settings."""
    inherited = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in inherited and not key.startswith(("TORCHELASTIC_", "ACCELERATE_", "FSDP_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Launch the 2-process and the 1-process trainings side by side; `{run name: [result of rank 0, rank 1, ...]}`."""
    out = tmp_path_factory.mktemp("distributed")
    launches = {
        # --standalone: a rendezvous on localhost with a free port chosen by torch.distributed.run.
        "2 processes": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        "1 process": [sys.executable],
    }
    runs = {"2 processes": TWO_PROCESS_RUNS, "1 process": ONE_PROCESS_RUNS}
    processes = {}
    start = time.perf_counter()
    for label, launcher in launches.items():
        log = open(out / f"{label}.log", "w")
        command = [*launcher, str(WORKER), "--out", str(out), "--runs", json.dumps(runs[label])]
        processes[label] = (subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=log, stderr=log), log)
    failures = []
    for label, (process, log) in processes.items():
        try:
            returncode = process.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            # SIGTERM first: torch.distributed.run then stops the workers it started (each in a session of its own).
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            returncode = f"a timeout ({TIMEOUT_S} s)"
        log.close()
        if returncode != 0:
            failures.append(f"{label} exited with {returncode}:\n{(out / f'{label}.log').read_text()[-5000:]}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
    loaded = {}
    for spec in TWO_PROCESS_RUNS + ONE_PROCESS_RUNS:
        loaded[spec["name"]] = [torch.load(path) for path in sorted((out / spec["name"]).glob("rank*.pt"))]
    return loaded


def step_losses(ranks: list[dict], grad_accum: int = 1) -> list[float]:
    """Loss of every optimizer step over the global batch: the sum of the micro-batch losses of all ranks."""
    return [
        math.fsum(sum(rank["micro_losses"][step * grad_accum : (step + 1) * grad_accum]) for rank in ranks)
        for step in range(STEPS)
    ]


def max_relative_difference(weights: dict, reference: dict) -> tuple[float, str]:
    """The largest `max |w - ref| / max |ref|` over the tensors, and that tensor's name."""
    assert weights.keys() == reference.keys()
    worst = max(
        ((weights[name] - reference[name]).abs().max() / reference[name].abs().max(), name) for name in reference
    )
    return float(worst[0]), worst[1]


def assert_same_training(ranks, ranks_grad_accum, reference, reference_grad_accum):
    losses, reference_losses = step_losses(ranks, ranks_grad_accum), step_losses(reference, reference_grad_accum)
    assert losses == pytest.approx(reference_losses, rel=LOSS_RTOL, abs=0)
    difference, name = max_relative_difference(ranks[0]["final"], reference[0]["final"])
    assert difference <= WEIGHT_RTOL, f"{name} differs by {difference:.2e} (relative to its largest entry)"


# ----------------------------------------------------------------------------------------------------------------
# DDP with plain Trainer
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("aux", ["aux", "noaux"])
def test_ddp_trains_and_ranks_agree(results, implementation, aux):
    ranks = results[f"ddp-{implementation}-{aux}"]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU"
        assert rank["wrapped_model"] == "DistributedDataParallel"
        assert len(rank["micro_losses"]) == STEPS
    assert ranks[0]["micro_losses"] != ranks[1]["micro_losses"], "the ranks should see different data"

    logged = ranks[0]["logged_losses"]
    assert len(logged) == STEPS and all(math.isfinite(loss) for loss in logged)
    assert ranks[1]["logged_losses"] == logged
    # Steps 3 and 4 see the batches of steps 1 and 2 again.
    assert logged[2] < logged[0] - 0.05 and logged[3] < logged[1] - 0.05, logged
    # Trainer logs the global-batch loss (mean over ranks of loss * num_processes): the sum of the ranks' losses.
    assert logged == pytest.approx(step_losses(ranks), rel=LOSS_RTOL, abs=0)

    first, second = ranks[0]["final"], ranks[1]["final"]
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"the ranks ended with different weights: {different}"
    unchanged = [name for name in ranks[0]["param_names"] if torch.equal(first[name], ranks[0]["initial"][name])]
    assert not unchanged, f"not trained: {unchanged}"


@pytest.mark.slow
@needs_gloo
def test_ddp_prompt_only_batches_leave_the_weights_alone(results):
    # Every label -100 on both ranks: the routing losses weigh the (zero) share of label tokens, like the token loss,
    # so no step changes a weight and none turns NaN. (The returned loss itself is transformers' token loss over 0
    # label tokens, 0/0 = NaN, as for plain GPT-2; its gradient is 0, and Trainer filters it from the logs.)
    ranks = results["ddp-eager-unlabeled"]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    for rank in ranks:
        assert len(rank["micro_losses"]) == STEPS
        for name, value in rank["final"].items():
            assert torch.equal(value, rank["initial"][name]), name


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ddp_some_experts_get_no_token_on_a_rank(results, implementation):
    """The case DDP must survive with `find_unused_parameters=False`: an expert idle on one rank (its slice of the
    3-D expert weights gets a zero gradient there) while the whole weight is still one used parameter."""
    ranks = results[f"ddp-{implementation}-aux"]
    # 2 MoGE layers x STEPS forward passes per rank
    assert all(len(rank["empty_experts"]) == 2 * STEPS for rank in ranks)
    assert any(count > 0 for rank in ranks for count in rank["empty_experts"])


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ddp_matches_one_process_with_gradient_accumulation(results, implementation):
    """2 processes x batch B == 1 process x batch B x 2 accumulation steps, every routing loss on (each micro-batch
    has its own load-balancing loss either way)."""
    assert_same_training(results[f"ddp-{implementation}-aux"], 1, results[f"one-{implementation}-aux-accum2"], 2)
    ranks, reference = results[f"ddp-{implementation}-aux"], results[f"one-{implementation}-aux-accum2"]
    assert ranks[0]["logged_losses"] == pytest.approx(reference[0]["logged_losses"], rel=LOSS_RTOL, abs=0)


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ddp_matches_one_process_with_the_same_global_batch(results, implementation):
    """2 processes x batch B == 1 process x batch 2B: the LM, z- and group-sparsity losses average over the global
    batch, whatever rank a token is on."""
    ranks, reference = results[f"ddp-{implementation}-noaux"], results[f"one-{implementation}-noaux-batch2B"]
    assert reference[0]["world_size"] == 1
    assert_same_training(ranks, 1, reference, 1)
    assert ranks[0]["logged_losses"] == pytest.approx(reference[0]["logged_losses"], rel=LOSS_RTOL, abs=0)


@pytest.mark.slow
@needs_gloo
def test_load_balancing_loss_is_the_only_term_that_depends_on_the_split(results):
    """With the load-balancing loss on, 2 x B differs from 1 x 2B. At the first step (same weights) the z- and MoGE
    losses of the global batch are the means of the two ranks' ones, the aux loss is not, and the total losses differ
    by `coef * (mean of the ranks' aux losses - aux loss of the global batch)`."""
    ddp, one = results["ddp-eager-aux"], results["one-eager-aux-batch2B"]
    for name in ("z_loss", "moge_loss"):
        assert (ddp[0][name][0] + ddp[1][name][0]) / 2 == pytest.approx(one[0][name][0], rel=1e-6, abs=0)
    aux_shift = (ddp[0]["aux_loss"][0] + ddp[1]["aux_loss"][0]) / 2 - one[0]["aux_loss"][0]
    assert abs(aux_shift) > 1e-3
    # The losses are float32 values around 4.7 (spacing 5e-7): compare to 1e-6.
    assert step_losses(ddp)[0] - step_losses(one)[0] == pytest.approx(AUX * aux_shift, abs=1e-6)
    difference, _ = max_relative_difference(ddp[0]["final"], one[0]["final"])
    assert difference > 100 * WEIGHT_RTOL  # a real difference, not rounding


@pytest.mark.slow
@needs_gloo
def test_global_load_balancing_matches_one_process_with_the_same_global_batch(results):
    """`router_aux_loss_global=True`: each rank's load-balancing loss uses the dispatch fractions of the global batch,
    so the mean over ranks is the global batch's loss and 2 x B trains exactly like 1 x 2B, every routing loss on."""
    ranks, reference = results["ddp-eager-aux-global"], results["one-eager-aux-batch2B"]
    first_step_aux = (ranks[0]["aux_loss"][0] + ranks[1]["aux_loss"][0]) / 2
    assert first_step_aux == pytest.approx(reference[0]["aux_loss"][0], rel=1e-6, abs=0)
    assert_same_training(ranks, 1, reference, 1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_idle_expert_gets_a_zero_gradient_not_none(implementation):
    """On one rank's micro-batch an expert with no token still has its share of the (3-D) expert weights' gradient:
    zeros. So no parameter is unused, and DDP with `find_unused_parameters=False` all-reduces every gradient."""
    model, records = worker.build_model({"router_aux_loss_coef": AUX, "experts_implementation": implementation})
    batch = default_data_collator(worker.dataset(BATCH))
    routed = []
    hooks = [block.router.register_forward_hook(lambda m, a, r: routed.append(r)) for block in model.moge_blocks()]
    model(**batch).loss.backward()
    for hook in hooks:
        hook.remove()
    idle_seen = 0
    for block, routing in zip(model.moge_blocks(), routed):
        counts = torch.bincount(routing.top_k_index.flatten(), minlength=block.experts.num_experts)
        for name in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"):
            grad = getattr(block.experts, name).grad
            assert grad is not None
            assert torch.all(grad[counts == 0] == 0)
            assert torch.all(grad[counts > 0].flatten(1).abs().amax(1) > 0)
        idle_seen += int((counts == 0).sum())
    assert idle_seen > 0, "the test batch should leave some expert without a token"


# ----------------------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_gloo
def test_fsdp2_sharded_training_matches(results):
    """The model sharded per GPT2Block (the unit of scripts/accelerate_fsdp.yaml) with FSDP2 `fully_shard`, on 2
    processes: experts' 3-D weights become DTensors sharded over the expert dimension. Trained with Trainer's loss
    normalization, it matches DDP and 1 process x 2 accumulation steps. (Trainer itself cannot use FSDP on CPU:
    accelerate turns a CPU run into MULTI_CPU DDP and drops the FSDP plugin.)"""
    ranks = results["fsdp2-eager-aux"]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    assert ranks[0]["sharded_parameter"] == "DTensor"
    first, second = ranks[0]["final"], ranks[1]["final"]
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert_same_training(ranks, 1, results["one-eager-aux-accum2"], 2)
    assert_same_training(ranks, 1, results["ddp-eager-aux"], 1)


# ----------------------------------------------------------------------------------------------------------------
# accelerate config files
# ----------------------------------------------------------------------------------------------------------------


def launch_env(config_file: Path) -> tuple[argparse.Namespace, set[str], dict[str, str]]:
    """What `accelerate launch --config_file <file> --num_processes 2 train.py` resolves: its args and the
    environment it gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    known = set(vars(parser.parse_args(["train.py"])))
    args = parser.parse_args(["--config_file", str(config_file), "--num_processes", "2", "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args, known, prepare_multi_gpu_env(args)


def test_accelerate_ddp_config():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = SCRIPTS / "accelerate_ddp.yaml"
    config = load_config_from_file(str(path))  # raises on keys accelerate does not know
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_machines == 1 and config.num_processes >= 2 and not config.use_cpu
    assert config.fsdp_config == {} and config.deepspeed_config == {}
    args, _, env = launch_env(path)
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert "ACCELERATE_USE_FSDP" not in env
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_accelerate_fsdp_config(monkeypatch):
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    path = SCRIPTS / "accelerate_fsdp.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.FSDP
    assert config.num_machines == 1 and config.num_processes >= 2 and not config.use_cpu
    args, known, env = launch_env(path)
    # The loader does not check the keys under fsdp_config: each must be an `accelerate launch` argument.
    assert set(config.fsdp_config) <= known, set(config.fsdp_config) - known
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"

    # The plugin the training processes build from that environment.
    for key in [key for key in os.environ if key.startswith(("FSDP_", "ACCELERATE_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["GPT2Block"]

    # What it wraps: every transformer block of a GPT-2 MoGE model, MoGE layers included, and nothing else.
    model, _ = worker.build_model({"router_aux_loss_coef": AUX, "experts_implementation": "eager"})
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [module for module in model.modules() if policy(module)] == list(model.transformer.h)
    assert all(any(block.mlp is moge for block in model.transformer.h) for moge in model.moge_blocks())

    # The switch the file documents for ViT MoGE models.
    assert "fsdp_transformer_layer_cls_to_wrap: ViTLayer" in path.read_text()
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "ViTLayer")
    vit = ViTMoGEForImageClassification(vit_config())
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), vit)
    layers = [module for module in vit.modules() if type(module).__name__ == "ViTLayer"]
    assert len(layers) == vit.config.num_hidden_layers
    assert [module for module in vit.modules() if policy(module)] == layers


# ----------------------------------------------------------------------------------------------------------------
# transformers' distributed engine: expert parallelism and FSDP2 from the configs' plans
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_gloo
@needs_engine
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_expert_parallelism_gives_each_rank_half_of_the_experts(results, implementation):
    ranks = results[f"ep-{implementation}-aux"]
    unsharded = results[f"one-{implementation}-aux-accum2-untied"][0]["initial"]  # the same seed, one process
    assert [rank["rank"] for rank in ranks] == [0, 1]
    for rank in ranks:
        shards = dict(rank["expert_shards"])
        # Each MoGE layer's experts run on this rank's 4 experts (FSDP2 alone would keep 8 and gather them).
        assert shards.pop("num_experts") == [4, 4]
        assert set(shards) == {name for name in rank["param_names"] if ".experts." in name}
        lo, hi = 4 * rank["rank"], 4 * rank["rank"] + 4  # 8 experts over 2 ranks, in order
        for name, shard in shards.items():
            assert torch.equal(shard, unsharded[name][lo:hi]), name


@pytest.mark.slow
@needs_gloo
@needs_engine
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_expert_parallel_training_matches_one_process(results, implementation):
    """Experts split over 2 ranks (all-to-all dispatch), FSDP2 for the rest, plain Trainer, every routing loss on:
    the same per-step losses and final weights as 1 process x batch B x 2 accumulation steps."""
    ranks, reference = results[f"ep-{implementation}-aux"], results[f"one-{implementation}-aux-accum2-untied"]
    assert_same_training(ranks, 1, reference, 2)
    assert ranks[0]["logged_losses"] == pytest.approx(reference[0]["logged_losses"], rel=LOSS_RTOL, abs=0)
    assert ranks[0]["logged_losses"][2] < ranks[0]["logged_losses"][0] - 0.05  # it learns
    unchanged = [
        name for name in ranks[0]["param_names"] if torch.equal(ranks[0]["final"][name], ranks[0]["initial"][name])
    ]
    assert not unchanged, f"not trained: {unchanged}"


@pytest.mark.slow
@needs_gloo
@needs_engine
def test_expert_parallel_global_load_balancing_matches_one_process_with_the_same_global_batch(results):
    ranks, reference = results["ep-eager-aux-global"], results["one-eager-aux-batch2B-untied"]
    assert_same_training(ranks, 1, reference, 1)


@pytest.mark.slow
@needs_gloo
@needs_engine
def test_a_model_saved_after_expert_parallel_training_loads_in_one_process(results):
    from moge_hf import GPT2MoGELMHeadModel, check_moge_model_dir

    ranks = results["ep-eager-aux"]
    # A whole folder, with the model's own code (the sharded model's class is one FSDP2 made, in torch's module).
    config = check_moge_model_dir(ranks[0]["trained_dir"])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt2_moge.GPT2MoGELMHeadModel"
    loaded = GPT2MoGELMHeadModel.from_pretrained(ranks[0]["trained_dir"]).eval()
    state = loaded.state_dict()
    assert state.keys() == ranks[0]["final"].keys()
    for name, value in ranks[0]["final"].items():
        assert torch.equal(state[name], value), name
    ids = torch.arange(1, 9).reshape(1, 8)
    assert torch.isfinite(loaded(ids, labels=ids).loss)


@pytest.mark.slow
@needs_gloo
@needs_engine
@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_expert_parallel_image_classifier_matches_one_process(results, family):
    """A MoGE image classifier, experts split over the ranks, each rank half of the batch: the logits, the mean of the
    ranks' losses (every routing loss, load balancing over the global batch) and every gradient are those of one
    process on the whole batch."""
    ranks = results[f"ep-{family}"]
    model = worker.image_model(family).train()
    images, labels = worker.image_batch()
    outputs = model(pixel_values=images, labels=labels)
    outputs.loss.backward()
    torch.testing.assert_close(torch.cat([rank["logits"] for rank in ranks]), outputs.logits, rtol=1e-5, atol=1e-6)
    for name in ("loss", "aux_loss", "moge_loss", "z_loss"):
        mean = sum(rank["losses"][name] for rank in ranks) / len(ranks)
        assert mean == pytest.approx(float(getattr(outputs, name).detach()), rel=1e-5), name
    for name, param in model.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
    unsharded = model.state_dict()
    for rank in ranks:
        shards = dict(rank["expert_shards"])
        assert shards.pop("num_experts") == [4] * len(model.config.moe_layers)
        lo, hi = 4 * rank["rank"], 4 * rank["rank"] + 4
        assert shards.keys() == {name for name in unsharded if ".experts." in name}
        for name, shard in shards.items():
            assert torch.equal(shard, unsharded[name][lo:hi]), name


@pytest.mark.slow
@needs_gloo
@needs_engine
def test_tied_embeddings_are_refused_under_the_engines_fsdp(results):
    for rank in results["ep-tied-refused"]:
        assert rank["error"] is not None and "stale copy of the embeddings" in rank["error"]
        assert "tie_word_embeddings=False" in rank["error"]
