"""Training MoGE models with `transformers.Trainer`: the sigma schedule and the MoGE metrics in Trainer's logs.

`Trainer` trains the MoGE models as they are: their `loss` already holds the task loss plus the weighted routing
losses. [`MoGESigmaCallback`] adds what `Trainer` cannot know about: it anneals the Gaussian sigma of the
group-sparsity regularizer along `config.moge_sigma_schedule`, and logs sigma, the unscaled routing losses, and each
MoGE layer's expert load and routing entropy through Trainer's own logging (so `report_to` TensorBoard, W&B, ... and
`state.log_history` all get them). Attach it with [`add_moge_callback`], which puts it ahead of the reporting
callbacks: `Trainer` calls callbacks in the order they were added, and its own (reporters, progress printer) come
first otherwise. Its two jobs are also callbacks of their own: [`MoGESigmaSchedule`] (sigma only) and
[`MoGERoutingMetrics`] (the metrics and the check that the routing losses train, sigma left alone).
"""

import argparse
import ast
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import threading
import weakref
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from accelerate.utils import extract_model_from_parallel
from safetensors import safe_open
from torch import nn
from transformers import (
    HfArgumentParser,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint, sort_checkpoints
from transformers.utils import logging

from .configuration_moge import MOGE_FIELDS, ROUTING_OUTPUTS, SHAPE_FREE_MOGE_FIELDS
from .moge_layer import moge_regularizers, set_moge_sigma
from .moge_model import MoGEHost, host_for
from .routing import RecordedForward, RoutingRecorder, routing_recorder
from .run_record import write_run_record


logger = logging.get_logger(__name__)

__all__ = [
    "EngineArguments",
    "shard_with_engine",
    "MoGEArguments",
    "MoGESigmaCallback",
    "MoGESigmaSchedule",
    "MoGERoutingMetrics",
    "add_moge_callback",
    "annealed_sigma",
    "check_routing_losses_kept",
    "baseline_training_args",
    "check_local_source",
    "check_same_moge_settings",
    "dropout_fields",
    "parse_config_overrides",
    "scratch_config",
    "script_host",
    "parse_script_arguments",
    "script_parser",
    "finished_run_metrics",
    "main_arm_name",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "resolve_checkpoint",
    "train_and_evaluate",
    "unwrap_moge_model",
]

LOSS_NAMES = ROUTING_OUTPUTS[1:]  # the unscaled routing losses of the outputs: aux_loss, moge_loss, z_loss
# The config coefficient that weighs each routing loss into the model's `loss`.
LOSS_COEFFICIENTS = {"aux_loss": "router_aux_loss_coef", "moge_loss": "moge_loss_coef", "z_loss": "router_z_loss_coef"}


# ---- what keeps the routing losses in the loss Trainer trains ------------------------------------------------------

# The MoGE models (and a model given `add_moge_regularizer`) add their weighted routing losses to `loss` only when they
# get `labels`. Trainer takes `labels` away from the model and computes the loss from the logits itself under these
# options; the routing losses would then be computed, logged, and never trained.
_LOSS_REPLACING_OPTIONS = (("label_smoothing_factor", "--label_smoothing_factor", "label smoothing"),)


def check_routing_losses_kept(training_args: TrainingArguments, trainer: Trainer | None = None) -> None:
    """Raise before training where `Trainer` would compute the loss without the model's routing losses.

    `Trainer` hands the model its `labels` and trains the model's own `loss` (task loss plus the weighted routing
    losses) unless `label_smoothing_factor` is set or a `compute_loss_func` is given: then it pops `labels`, and
    the MoGE, load-balancing and z-losses would not train. Both are refused, naming the option.

    Raises:
        `ValueError`: naming the option that would drop the routing losses.
    """
    for name, flag, what in _LOSS_REPLACING_OPTIONS:
        value = getattr(training_args, name, None)
        if value:
            raise ValueError(
                f"{flag} {value}: with {what} Trainer takes `labels` away from the model and computes the loss from "
                "the logits itself, so the routing losses (MoGE, load balancing, z-loss) would not train. Leave "
                f"`{name}` at its default with a MoGE model or a model given add_moge_regularizer."
            )
    if trainer is not None and getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError(
            "Trainer(compute_loss_func=...): Trainer then takes `labels` away from the model and calls the function "
            "on the outputs, so the routing losses (MoGE, load balancing, z-loss) would not train. Let the model "
            "compute its loss (pass `labels`), or add `outputs.moge_loss` and the other routing losses, weighted, "
            "in your function and attach the callback with `MoGESigmaCallback(check_loss=False)`."
        )


def _mark_reached(entry: list, grad: torch.Tensor) -> None:
    entry[1] = True


# The callback whose hooks are on a model: a run that died without `on_train_end` (an exception, an interrupt) leaves
# its callback's hooks on the model, and the next callback that trains the model removes them.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, MoGERoutingMetrics]" = weakref.WeakKeyDictionary()


def _expected_routing_losses(model: nn.Module) -> set[str]:
    """The weighted routing losses a training forward of `model` returns: `moge_loss` with a coefficient; a MoGE
    model's `aux_loss` and `z_loss`, and a transformers MoE model's `aux_loss` with `output_router_logits`."""
    config = model.config
    moge_model = callable(getattr(type(model), "set_moge_sigma", None))
    expected = {"moge_loss"} if getattr(config, "moge_loss_coef", 0) else set()
    if getattr(config, "router_aux_loss_coef", 0) and (moge_model or getattr(config, "output_router_logits", False)):
        expected.add("aux_loss")
    if moge_model and getattr(config, "router_z_loss_coef", 0):
        expected.add("z_loss")
    return expected


def _compiled(wrapped: nn.Module, model: nn.Module, args: TrainingArguments) -> bool:
    return bool(
        getattr(args, "torch_compile", False)
        or isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule)
        or getattr(model, "_compiled_call_impl", None) is not None
    )


def _routing_losses_left_out(model: nn.Module, output) -> list[str]:
    """The weighted routing losses of a training forward's `output` (they carry a gradient) that are not in its `loss`
    because the model got no `labels`: what a Trainer that computes the loss itself would silently not train."""
    if not (model.training and torch.is_grad_enabled()) or not isinstance(output, dict):
        return []
    if output.get("loss") is not None:
        return []
    config = getattr(model, "config", None)
    left_out = []
    for name, coefficient in LOSS_COEFFICIENTS.items():
        loss = output.get(name)
        if isinstance(loss, torch.Tensor) and loss.requires_grad and getattr(config, coefficient, 0):
            left_out.append(name)
    return left_out


def _argument(name: str):
    """The command-line argument of the MoGE config field `name`: its help is the field's, its default `None` (keep
    the config's default, or a loaded model's value)."""
    spec = MOGE_FIELDS[name]
    default = "" if spec.default is None else f" (config default: {spec.default})"
    return field(default=None, metadata={"help": spec.metadata["help"] + default})


@dataclass
class MoGEArguments:
    """The MoGE config fields as command-line arguments (for `HfArgumentParser`), shared by the training scripts.

    Every field defaults to `None`, which keeps the config's default (or a loaded model's value); the help texts are
    the config fields' own (`moge_hf.configuration_moge.MoGEConfigMixin`).
    """

    num_experts: int | None = _argument("num_experts")
    num_experts_per_tok: int | None = _argument("num_experts_per_tok")
    moe_layers: list[int] | None = _argument("moe_layers")
    expert_intermediate_size: int | None = _argument("expert_intermediate_size")
    router_aux_loss_coef: float | None = _argument("router_aux_loss_coef")
    router_aux_loss_global: bool | None = _argument("router_aux_loss_global")
    router_z_loss_coef: float | None = _argument("router_z_loss_coef")
    router_jitter_noise: float | None = _argument("router_jitter_noise")
    norm_topk_prob: bool | None = _argument("norm_topk_prob")
    moge_loss_coef: float | None = _argument("moge_loss_coef")
    moge_map_shape: list[int] | None = _argument("moge_map_shape")
    moge_window: int | None = _argument("moge_window")
    moge_sigma: float | None = _argument("moge_sigma")
    moge_sigma_schedule: list[float] | None = _argument("moge_sigma_schedule")
    moge_padding: str | None = _argument("moge_padding")
    moge_reduction: str | None = _argument("moge_reduction")

    def moge_overrides(self) -> dict:
        """The MoGE config fields given (those not left at `None`)."""
        names = (f.name for f in fields(MoGEArguments))
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def shape_changing_overrides(self) -> list[str]:
        """The given MoGE fields that would change weight shapes (not allowed on a saved MoGE model)."""
        return [name for name in self.moge_overrides() if name not in SHAPE_FREE_MOGE_FIELDS]


@dataclass
class EngineArguments:
    """Sharding by transformers' distributed engine (`DistributedConfig`), for the training scripts: launch them with
    one process per device (`torchrun --nproc_per_node N`). See the README, "Several GPUs"."""

    ep_size: int | None = field(
        default=None,
        metadata={
            "help": "Expert parallelism: the experts of every MoGE layer split over this many processes, the tokens "
            "sent to them by all-to-all (transformers' DistributedConfig ep_size, transformers >= 5.19). It must "
            "divide fsdp_size (default: all processes) and the number of experts."
        },
    )
    fsdp_size: int | None = field(
        default=None,
        metadata={
            "help": "FSDP2 over this many processes, by the model config's plan (DistributedConfig fsdp_size; "
            "default with --ep_size: all processes)."
        },
    )

    def check(self, training_args: TrainingArguments):
        """Raise a `ValueError` naming the problem if the run cannot be sharded as asked; return the
        `DistributedConfig` (None: no sharding by the engine). The scripts call it before reading any data."""
        if self.ep_size is None and self.fsdp_size is None:
            return None
        if training_args.world_size < 2:
            raise ValueError(
                "--ep_size / --fsdp_size shard the model over several processes: launch the script with "
                "`torchrun --nproc_per_node N` (one process per device)"
            )
        if training_args.save_strategy != "no" and not training_args.save_only_model:
            # transformers cannot checkpoint the optimizer of a model its engine sharded (Trainer refuses).
            raise ValueError(
                "a model sharded by the distributed engine (--ep_size / --fsdp_size) cannot checkpoint its "
                "optimizer state, so its run cannot resume: pass --save_only_model true (checkpoints hold the "
                "weights) or --save_strategy no"
            )
        if training_args.load_best_model_at_end:
            # Trainer loads the best checkpoint's full weights into a model whose weights the engine sharded as
            # DTensors, and fails after the last step ("mixed torch.Tensor and DTensor"), leaving no final model.
            raise ValueError(
                "--load_best_model_at_end cannot load a checkpoint into a model sharded by the distributed engine "
                "(--ep_size / --fsdp_size): leave it out, and pick the best checkpoint from the saved ones afterwards"
            )
        resume = training_args.resume_from_checkpoint
        if resume is not None and str(resume).lower() not in (
            "false",
            "no",
            "none",
        ):  # as `resolve_checkpoint` reads it
            raise ValueError("a run sharded by the distributed engine (--ep_size / --fsdp_size) cannot resume")
        return self.distributed_config(training_args.world_size)

    def check_experts(self, num_experts: int) -> None:
        """Raise a `ValueError` if `--ep_size` does not divide `num_experts` (the scripts call it as soon as the
        model's number of experts is known, before reading any data)."""
        if self.ep_size is not None and num_experts % self.ep_size:
            raise ValueError(f"--ep_size {self.ep_size} does not divide the {num_experts} experts of each MoE layer")

    def distributed_config(self, world_size: int):
        """The `DistributedConfig` asked for, or None (no sharding by the engine)."""
        if self.ep_size is None and self.fsdp_size is None:
            return None
        from transformers.distributed import DistributedConfig

        if self.ep_size is not None and "ep_size" not in DistributedConfig.__dataclass_fields__:
            import transformers

            raise ValueError(
                f"--ep_size needs transformers >= 5.19 (expert parallelism in DistributedConfig); this is "
                f"{transformers.__version__}"
            )
        sizes = {"ep_size": self.ep_size} if self.ep_size is not None else {}
        return DistributedConfig(fsdp_size=self.fsdp_size or world_size, **sizes)


def shard_with_engine(
    model: PreTrainedModel, engine_args: EngineArguments, training_args: TrainingArguments, log=None
) -> PreTrainedModel:
    """`model` as transformers' distributed engine shards it, or `model` itself when `engine_args` ask for nothing.

    The engine shards at `from_pretrained`: the first process of each machine saves the model (with untied
    embeddings, which the engine's FSDP2 needs; the head starts as a copy of the embeddings) to
    `<output_dir>/_engine-initial-model`, every process loads it with the `DistributedConfig`, and the folder is
    removed. A transformers MoE model gets its MoGE regularizer back from the saved config. What each process holds is
    logged to `log` (default: this module's logger).
    """
    distributed_config = engine_args.check(training_args)
    if distributed_config is None:
        return model
    for regularizer in moge_regularizers(model):  # before anything is written
        engine_args.check_experts(regularizer.num_experts)
    # Beside the run's files, with a `_` name that Trainer's Hub pushes skip; removed once every process loaded it.
    folder = os.path.join(training_args.output_dir, "_engine-initial-model")
    with training_args.main_process_first(desc="saving the model for the distributed engine"):
        if training_args.local_process_index == 0:
            untie = getattr(model, "untie_word_embeddings", None)
            if untie is not None:
                untie()
            elif getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
                raise ValueError(
                    f"{type(model).__name__} ties its output to its input embeddings, which the distributed "
                    "engine's FSDP2 does not keep tied: train it with DDP (no --ep_size / --fsdp_size)"
                )
            model.save_pretrained(folder)
    implementation = getattr(model.config, "_experts_implementation", None)
    regularized = not callable(getattr(type(model), "set_moge_sigma", None))  # a transformers MoE model
    kwargs = {"experts_implementation": implementation} if implementation else {}
    name_or_path = model.config._name_or_path
    sharded = type(model).from_pretrained(folder, distributed_config=distributed_config, **kwargs)
    sharded.config._name_or_path = sharded.name_or_path = name_or_path  # not the folder removed below
    torch.distributed.barrier()  # every process has read the folder
    if training_args.local_process_index == 0:
        shutil.rmtree(folder, ignore_errors=True)
    if regularized:
        from .transformers_moe import add_moge_regularizer

        add_moge_regularizer(sharded)
    taps = routing_recorder(sharded).taps
    local = [getattr(tap.experts, "num_experts", None) for tap in taps]
    (log or logger).info(
        f"transformers' distributed engine: {distributed_config}; each process runs {local[0]} of the "
        f"{moge_regularizers(sharded)[0].num_experts} experts of each of the {len(taps)} MoE layers"
    )
    return sharded


def annealed_sigma(progress: float, schedule: Sequence[float]) -> float:
    """Sigma of the group-sparsity regularizer at a point of training: `init - (init - final) * progress**power`.

    Args:
        progress (`float`):
            Fraction of training done, e.g. `global_step / max_steps`; clamped to `[0, 1]`.
        schedule (`Sequence[float]`):
            `[init, final, power]`, as in `config.moge_sigma_schedule` (the paper uses `[10.0, 1.0, 0.2]`).

    Returns:
        `float`: sigma, `init` at progress 0 and `final` at progress 1.

    Example:

    ```python
    >>> from moge_hf.training import annealed_sigma
    >>> annealed_sigma(0.0, [10.0, 1.0, 0.2]), annealed_sigma(1.0, [10.0, 1.0, 0.2])
    (10.0, 1.0)
    >>> round(annealed_sigma(0.5, [10.0, 2.0, 1.0]), 6)
    6.0
    ```
    """
    if schedule is None or len(schedule) != 3:
        raise ValueError(f"schedule must be [init, final, power], got {schedule!r}")
    init, final, power = (float(value) for value in schedule)
    progress = float(progress)
    if not math.isfinite(progress):
        raise ValueError(f"progress must be a finite number, got {progress!r}")
    progress = min(max(progress, 0.0), 1.0)
    return init - (init - final) * progress**power


def unwrap_moge_model(model: nn.Module) -> nn.Module:
    """The MoGE model inside `model`, through the wrappers training puts around it: DDP / DataParallel / DeepSpeed and
    `torch.compile` (accelerate's `extract_model_from_parallel`), and PEFT (`get_base_model`).

    A MoGE model is a moge_hf model, or a transformers model given a regularizer by `add_moge_regularizer`.

    Raises:
        `ValueError`: there is no MoGE model inside `model`.
    """
    current = model
    for _ in range(8):
        current = extract_model_from_parallel(current)
        # Look on the class: wrappers such as PEFT forward unknown attributes to the wrapped model.
        if callable(getattr(type(current), "set_moge_sigma", None)):
            return current
        if isinstance(current, PreTrainedModel) and moge_regularizers(current):
            return current
        if not callable(getattr(type(current), "get_base_model", None)):
            break
        current = current.get_base_model()
    raise ValueError(
        f"This needs a MoGE model (a moge_hf model such as GPT2MoGELMHeadModel, or a transformers MoE model given "
        f"`moge_hf.add_moge_regularizer`), got {type(model).__name__}"
    )


class MoGESigmaSchedule(TrainerCallback):
    """Anneal the MoGE sigma along `config.moge_sigma_schedule`: the sigma schedule alone, no hook and no log.

    At the start of training and before every optimizer step (`on_step_begin`, i.e. before the forward passes of the
    step's micro-batches) it sets `model.set_moge_sigma(annealed_sigma(global_step / max_steps,
    config.moge_sigma_schedule))`, and at the end of training the value at the final progress (`final` for a run that
    completes). Sigma is a function of `state.global_step` only, so `trainer.train(resume_from_checkpoint=...)`
    continues the schedule exactly. With `moge_sigma_schedule=None` sigma is left alone. [`MoGESigmaCallback`] adds
    the metrics and checks of [`MoGERoutingMetrics`] (`moge/sigma` among them) to it.

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> from moge_hf.training import MoGESigmaSchedule
    >>> trainer = Trainer(model=model, args=TrainingArguments("out", max_steps=100), train_dataset=train_dataset,
    ...                   callbacks=[MoGESigmaSchedule()])
    >>> trainer.train()
    ```
    """

    _model: nn.Module | None = None  # the MoGE model, found at `on_train_begin`

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)  # in `MoGESigmaCallback`, the checks come first
        self._model = unwrap_moge_model(kwargs["model"])
        self._set_sigma(state)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        if self._model is not None:
            self._set_sigma(state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._model is not None:
            self._set_sigma(state)  # the value at the progress reached: `final` when training ran to `max_steps`
        super().on_train_end(args, state, control, **kwargs)

    def _set_sigma(self, state: TrainerState) -> None:
        model = self._model
        schedule = model.config.moge_sigma_schedule
        if schedule is None:
            return
        progress = state.global_step / state.max_steps if state.max_steps and state.max_steps > 0 else 0.0
        sigma = annealed_sigma(progress, schedule)
        if any(reg.sigma != sigma for reg in moge_regularizers(model)) or model.config.moge_sigma != sigma:
            set_moge_sigma(model, sigma)


class MoGERoutingMetrics(TrainerCallback):
    """Log MoGE metrics through `Trainer`'s logging, and refuse a training setup that would not train the routing
    losses. It leaves sigma alone: [`MoGESigmaSchedule`] anneals it, [`MoGESigmaCallback`] does both.

    **Metrics.** Added to every training log (the logs that hold Trainer's `loss`), averaged over the logging window
    (the optimizer steps since the previous log):

    - `moge/sigma`: sigma of the last step;
    - `moge/aux_loss`, `moge/moge_loss`, `moge/z_loss`: the *unscaled* routing losses of the model outputs (means
      over the MoGE layers), averaged over the training forward passes (micro-batches);
    - `moge/layer{i}/load_e{j}`: the fraction of layer `i`'s routed token-slots (tokens x top-k) that went to expert
      `j` (they sum to 1 per layer; uniform is `1 / num_experts`);
    - `moge/layer{i}/entropy`: the mean over tokens of the entropy (in nats) of the routing probabilities.

    They are collected by two forward hooks on the model (its inputs' attention mask, its outputs' losses) and a
    listener on the model's routing recorder (`moge_hf.routing`: load, entropy), registered at `on_train_begin` and
    removed at `on_train_end`. Only training forwards count
    (`model.training`), padding tokens (`attention_mask == 0`, passed as a keyword 2-D mask) are left out of the load
    and entropy, and the values are accumulated detached on the model's device and read once per log (collecting them
    needs no device sync per step). Router calls outside the model's own forward, such as the recomputation of
    gradient checkpointing during backward, are not counted. In distributed training the sums are all-reduced at each
    training log (which every process reaches, as for Trainer's `loss`), so the metrics cover the global batch.

    `Trainer` calls callbacks in the order they were added, its own (reporting integrations, the progress printer)
    first, and passes each the same `logs`: attach the MoGE callback with [`add_moge_callback`] so that it runs first
    and the reporters see the MoGE keys. Added any other way (`callbacks=[...]`, `trainer.add_callback`), it still
    writes the metrics into `state.log_history`, but the reporters that ran before it miss them.

    Args:
        log_metrics (`bool`, *optional*, defaults to `True`):
            Whether to log the metrics; `False` logs none (and, with `check_loss`, only checks the loss).
        log_expert_load (`bool`, *optional*, defaults to `True`):
            Whether to log the per-expert load (`num_experts` keys per MoGE layer); the entropies are logged anyway.
        check_loss (`bool`, *optional*, defaults to `True`):
            Refuse a training setup that would not train the routing losses: `label_smoothing_factor` at the start of
            training; a training forward whose output has weighted routing losses but no `loss` (the model got no
            `labels`: a `compute_loss_func`, a `compute_loss` of your own); and, before each optimizer step, weighted
            routing losses of the step's training forwards that no gradient reached (a loss computed from the logits
            or log-probabilities, a model whose forward a trainer replaced). Set it `False` only where your own loss
            adds the routing losses.
    """

    def __init__(self, log_metrics: bool = True, log_expert_load: bool = True, check_loss: bool = True):
        self.log_metrics = log_metrics
        self.log_expert_load = log_expert_load
        self.check_loss = check_loss
        self._watch = True  # the gradient watch (off under torch.compile)
        self._watched: list[list] = []  # [loss name, reached by a gradient] of the step's training forwards
        self.placed_first = False  # set by `add_moge_callback`
        self._model: nn.Module | None = None
        self._hooks: list = []
        self._recorder: RoutingRecorder | None = None
        self._layer_names: list[str] = []
        self._num_experts = 0
        self._lock = threading.Lock()
        # Running sums since the last log, on the model's device. `_float_sums`: the three losses, then the entropy
        # sum of each layer; `_int_sums`: the number of forwards, the routed slots per (layer, expert), then the
        # tokens of each layer (integers, so that counts stay exact however long the logging window).
        self._float_sums: torch.Tensor | None = None
        self._int_sums: torch.Tensor | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._remove_hooks()
        self._model = unwrap_moge_model(kwargs["model"])
        previous = _ATTACHED.get(self._model)
        if previous is not None and previous is not self:  # a run that died left its hooks: they go
            previous._remove_hooks()
        _ATTACHED[self._model] = self
        if self.check_loss:
            check_routing_losses_kept(args)
            self._watched = []
            # Under torch.compile the gradient watch would break the graph (a tensor hook per forward): the options
            # are still checked, and a forward without labels still refused.
            self._watch = not _compiled(kwargs["model"], self._model, args)
            for module in dict.fromkeys([self._model, getattr(self._model, "base_model", self._model)]):
                self._hooks.append(module.register_forward_hook(self._check_loss_hook))
        if self.log_metrics:
            self._register_hooks()
            if not self.placed_first and args.report_to:
                logger.warning(
                    f"{type(self).__name__} was not attached with `moge_hf.training.add_moge_callback(trainer)`: the "
                    f"MoGE metrics go to `state.log_history`, but the reporting callbacks ({args.report_to}) run "
                    "before it and will not see them."
                )
        super().on_train_begin(args, state, control, **kwargs)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._remove_hooks()
        super().on_train_end(args, state, control, **kwargs)

    # ---- metrics --------------------------------------------------------------------------------------------------

    def _register_hooks(self) -> None:
        model = self._model
        recorder = routing_recorder(model)
        regularizers = moge_regularizers(model)
        self._layer_names = [router.name for router in recorder.taps]
        self._num_experts = regularizers[0].num_experts if regularizers else 0
        self._float_sums = None
        self._int_sums = None
        self._hooks.append(model.register_forward_hook(self._model_hook))
        self._recorder = recorder
        recorder.listeners.append(self._on_routing)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._model is not None and _ATTACHED.get(self._model) is self:
            del _ATTACHED[self._model]
        if self._recorder is not None and self._on_routing in self._recorder.listeners:
            self._recorder.listeners.remove(self._on_routing)
        self._recorder = None

    def _sums(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The running sums, allocated (zeros) on `device` at first use; later additions are moved to them."""
        num_layers = len(self._layer_names)
        if self._float_sums is None:
            self._float_sums = torch.zeros(len(LOSS_NAMES) + num_layers, device=device)
            self._int_sums = torch.zeros(
                len(LOSS_NAMES) + num_layers * (self._num_experts + 1), dtype=torch.long, device=device
            )
        return self._float_sums, self._int_sums  # they stay where they were made: additions come to them

    def _check_loss_hook(self, module: nn.Module, args: tuple, output) -> None:
        """On the model (and its base model, which computes a MoGE model's routing losses): a training forward without
        `labels` is refused at once; every weighted routing loss of a training forward is watched, so that
        `on_pre_optimizer_step` can tell whether it reached the backward pass."""
        if not (module.training and torch.is_grad_enabled()) or not isinstance(output, dict):
            return
        head = module is self._model or (getattr(module, "_is_replica", False) and type(module) is type(self._model))
        left_out = _routing_losses_left_out(module, output) if head else []
        if left_out:
            self._remove_hooks()  # the run ends here: leave no hook of this callback on the model
            raise RuntimeError(
                f"{type(module).__name__} was called in training without `labels`, so its `loss` does not hold its "
                f"weighted routing losses ({', '.join(left_out)}) and the loss being trained leaves them out. Trainer "
                "does this under `label_smoothing_factor`, a `compute_loss_func` or a `compute_loss` of its own "
                "(e.g. preference-optimization trainers that compute the loss from the logits). Pass `labels` so that "
                "the model computes its loss, or add the routing losses in your loss and build the callback with "
                f"`{type(self).__name__}(check_loss=False)`. (Raised at the first such forward, before its optimizer "
                "step.)"
            )
        if not self._watch or torch.compiler.is_compiling():
            return
        config = getattr(module, "config", None)
        for name, coefficient in LOSS_COEFFICIENTS.items():
            loss = output.get(name)
            if isinstance(loss, torch.Tensor) and loss.requires_grad and getattr(config, coefficient, 0):
                entry = [name, False]  # set when a gradient reaches this loss
                loss.register_hook(functools.partial(_mark_reached, entry))
                with self._accumulating():
                    self._watched.append(entry)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not (self.check_loss and self._watch) or self._model is None:
            return
        with self._accumulating():
            watched, self._watched = self._watched, []
        absent = sorted(_expected_routing_losses(self._model) - {name for name, _ in watched})
        if absent:
            self._remove_hooks()
            raise RuntimeError(
                f"No training forward of this step returned the model's weighted routing losses ({', '.join(absent)}):"
                " the model's forward ran without the code that adds them, so they would not train. A wrapper that "
                "calls the model's `forward` directly, past its hooks, does this to a model given "
                "`add_moge_regularizer` (its regularizer is a forward hook; call the model itself, `model(...)`); so "
                "does a trainer that replaces the model's forward. Build the callback with "
                f"`{type(self).__name__}(check_loss=False)` only where your own "
                "loss adds them. (Raised before the optimizer step.)"
            )
        missed = sorted({name for name, reached in watched if not reached})
        if missed:
            self._remove_hooks()
            raise RuntimeError(
                f"The weighted routing losses ({', '.join(missed)}) of this step's training forwards got no gradient: "
                "the loss being trained does not hold them. A trainer that computes its loss from the model's logits "
                "or log-probabilities (preference-optimization trainers such as TRL's DPO, GRPO and RLOO, whose fused "
                "LM head replaces the model's forward) or a `compute_loss` of your own does this. Train with a loss "
                "that adds them (the model's own `loss`), or, where your loss adds them in another way, build the "
                f"callback with `{type(self).__name__}(check_loss=False)`. (Raised before the optimizer step.)"
            )

    def _model_hook(self, module: nn.Module, args: tuple, output) -> None:
        if not module.training:  # only training forwards count
            return
        # The losses the output has (a transformers MoE model has `aux_loss` only with `output_router_logits`, and no
        # z-loss); none from tuple outputs.
        present = [(i, getattr(output, name, None)) for i, name in enumerate(LOSS_NAMES)]
        present = [(i, loss) for i, loss in present if isinstance(loss, torch.Tensor)]
        if not present:
            return
        with torch.no_grad(), self._accumulating():
            index = torch.tensor([i for i, _ in present], device=present[0][1].device)
            losses = torch.stack([loss.detach().float().reshape(()) for _, loss in present])
            float_sums, int_sums = self._sums(losses.device)
            float_sums.index_add_(0, index.to(float_sums.device), losses.to(float_sums.device))
            int_sums.index_add_(0, index.to(int_sums.device), torch.ones_like(index).to(int_sums.device))

    def _on_routing(self, forward: RecordedForward) -> None:
        """The routing of a forward (from the model's routing recorder): load and entropy of each layer."""
        if not forward.training:  # only training forwards count, not evaluation
            return
        with torch.no_grad(), self._accumulating():
            for layer, output, _ in forward.records:
                probs, index = self._recorder.taps[layer].routing(output)  # (T, E), (T, k)
                float_sums, int_sums = self._sums(probs.device)
                probs, index = probs.detach().to(float_sums.device), index.to(float_sums.device)
                num_experts, num_layers = self._num_experts, len(self._layer_names)
                entropy = torch.special.entr(probs.float()).sum(-1)  # (T,)
                mask = forward.token_mask
                if mask is not None and mask.numel() == probs.shape[0]:
                    weights = mask.to(device=probs.device, dtype=torch.long)  # (T,)
                    entropy = entropy * weights
                    tokens = weights.sum()
                    slot_weights = weights[:, None].expand_as(index).reshape(-1)
                else:
                    tokens = probs.shape[0]
                    slot_weights = torch.ones(index.numel(), dtype=torch.long, device=probs.device)
                float_sums[len(LOSS_NAMES) + layer] += entropy.sum()
                start = len(LOSS_NAMES) + layer * num_experts
                int_sums[start : start + num_experts].index_add_(0, index.reshape(-1), slot_weights)
                int_sums[len(LOSS_NAMES) + num_layers * num_experts + layer] += tokens

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}  # a lock does not copy

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _accumulating(self):
        """A lock around the running sums (`nn.DataParallel` replicas add to them from their threads); none in a
        compiled graph, which cannot take one (and runs in one thread)."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self._lock

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                sums = sums.clone()
                torch.distributed.all_reduce(sums)
        return sums

    def metrics(self) -> dict[str, float]:
        """The MoGE metrics of the training forwards since the last call (or the start of training), then reset.

        `on_log` calls it for every training log; it is public for custom training loops. In distributed training
        every process must call it (it all-reduces the sums).
        """
        model = self._model
        if model is None:
            return {}
        regularizers = moge_regularizers(model)
        metrics = {"moge/sigma": float(regularizers[0].sigma if regularizers else model.config.moge_sigma)}
        if self._float_sums is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                return metrics
            self._sums(next(model.parameters()).device)  # this process saw no forward: it still joins the reduce
        float_sums = self._reduce(self._float_sums).tolist()
        int_sums = self._reduce(self._int_sums).tolist()
        self._float_sums.zero_()
        self._int_sums.zero_()
        for i, name in enumerate(LOSS_NAMES):
            if int_sums[i]:  # the number of forwards whose output had this loss
                metrics[f"moge/{name}"] = float_sums[i] / int_sums[i]
        num_experts, num_layers = self._num_experts, len(self._layer_names)
        width = max(2, len(str(num_experts - 1)))
        for layer, layer_name in enumerate(self._layer_names):
            tokens = int_sums[len(LOSS_NAMES) + num_layers * num_experts + layer]
            if not tokens:
                continue
            metrics[f"moge/{layer_name}/entropy"] = float_sums[len(LOSS_NAMES) + layer] / tokens
            if self.log_expert_load:
                start = len(LOSS_NAMES) + layer * num_experts
                counts = int_sums[start : start + num_experts]
                slots = sum(counts)
                for expert, count in enumerate(counts):
                    metrics[f"moge/{layer_name}/load_e{expert:0{width}d}"] = count / slots
        return metrics

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        # Trainer's training logs hold `loss`; evaluation logs hold `eval_loss`, the end-of-training summary
        # `train_loss`. Trainer reaches every training log on every process, so the all-reduce in `metrics` is safe.
        if not self.log_metrics or self._model is None or logs is None or "loss" not in logs:
            return
        metrics = self.metrics()
        # `Trainer.log` appended a copy of `logs` (plus `step`) to `log_history` before calling the callbacks.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last is not logs and "loss" in last and last.get("step") == state.global_step:
            last.update(metrics)
        logs.update(metrics)


class MoGESigmaCallback(MoGESigmaSchedule, MoGERoutingMetrics):
    """Anneal the MoGE sigma along `config.moge_sigma_schedule` and log MoGE metrics through `Trainer`'s logging.

    The callback that [`add_moge_callback`] attaches: [`MoGESigmaSchedule`] (sigma set at the start of training,
    before every optimizer step and at the end) and [`MoGERoutingMetrics`] (the `moge/*` metrics in every training
    log, and the check that the routing losses train) in one, with the same arguments as [`MoGERoutingMetrics`]. At
    the start of training the listener's hooks and checks come first, then sigma is set; at the end sigma is set, then
    the hooks are removed.

    Args:
        log_metrics (`bool`, *optional*, defaults to `True`):
            Whether to log the metrics; `False` only schedules sigma (and, with `check_loss`, checks the loss).
        log_expert_load (`bool`, *optional*, defaults to `True`):
            Whether to log the per-expert load (`num_experts` keys per MoGE layer); the entropies are logged anyway.
        check_loss (`bool`, *optional*, defaults to `True`):
            Refuse a training setup that would not train the routing losses (see [`MoGERoutingMetrics`]). Set it
            `False` only where your own loss adds the routing losses.

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> from moge_hf import GPT2MoGEConfig, GPT2MoGELMHeadModel
    >>> from moge_hf.training import add_moge_callback
    >>> model = GPT2MoGELMHeadModel(GPT2MoGEConfig(n_layer=2, n_embd=64, n_head=4, num_experts=4, moge_window=2,
    ...                                            moge_loss_coef=1e-2, moge_sigma_schedule=[10.0, 1.0, 0.2]))
    >>> trainer = Trainer(model=model, args=TrainingArguments("out", max_steps=100, report_to="tensorboard"),
    ...                   train_dataset=train_dataset)
    >>> add_moge_callback(trainer)
    >>> trainer.train()
    ```
    """


def add_moge_callback(trainer: Trainer, callback: MoGESigmaCallback | None = None, **kwargs) -> MoGESigmaCallback:
    """Attach a [`MoGESigmaCallback`] to `trainer` ahead of every other callback, so that reporters see its metrics.

    `Trainer` runs callbacks in the order they were added, and adds its own (reporting integrations such as
    TensorBoard and W&B, the progress printer) before the user's; `on_log` hands every callback the same `logs`. The
    MoGE callback adds its metrics to `logs`, so it must run first: this puts it at the head of
    `trainer.callback_handler.callbacks`. Any other `MoGESigmaCallback` the trainer holds is removed (with no
    `callback` and no `kwargs`, an existing one is moved to the head instead), and so is a [`MoGESigmaSchedule`] or
    [`MoGERoutingMetrics`] of its own: it would set sigma a second time, or take the attached callback's hooks off
    the model.

    Args:
        trainer (`Trainer`):
            The trainer, built with a MoGE model (or a wrapper of one).
        callback (`MoGESigmaCallback`, *optional*):
            The callback to attach; by default a new one built with `kwargs`.
        kwargs:
            Arguments of [`MoGESigmaCallback`] (`log_metrics`, `log_expert_load`) when `callback` is not given.

    Returns:
        `MoGESigmaCallback`: the attached callback.

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> from moge_hf.training import add_moge_callback
    >>> trainer = Trainer(model=model, args=TrainingArguments("out", report_to="tensorboard"), train_dataset=data)
    >>> callback = add_moge_callback(trainer)
    >>> trainer.train()  # logs `moge/sigma`, `moge/moge_loss`, `moge/layer1/load_e00`, ... to TensorBoard
    ```
    """
    callbacks = trainer.callback_handler.callbacks
    existing = [cb for cb in callbacks if isinstance(cb, (MoGESigmaSchedule, MoGERoutingMetrics))]
    if callback is None:
        reusable = [cb for cb in existing if isinstance(cb, MoGESigmaCallback)]
        callback = reusable[0] if reusable and not kwargs else MoGESigmaCallback(**kwargs)
    elif kwargs:
        raise TypeError("add_moge_callback: pass either `callback` or the arguments of a new one, not both")
    if callback.check_loss:
        check_routing_losses_kept(trainer.args, trainer)
    for cb in existing:
        if cb is not callback:
            logger.warning(f"add_moge_callback: removing another {type(cb).__name__} from the trainer ({cb!r})")
            if isinstance(cb, MoGERoutingMetrics):
                cb._remove_hooks()
        callbacks.remove(cb)
    callbacks.insert(0, callback)
    callback.placed_first = True
    return callback


# ---- the example scripts' command line ------------------------------------------------------------------------------


def _given_flags(tokens: list[str]) -> dict[str, object]:
    """The `--flag [value]` pairs of a command line, by field name (`--do-eval` as `do_eval`); a flag with no value
    (the next token is a flag, or none) counts as `True`."""
    given = {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            name, _, value = token[2:].partition("=")
            if not value:
                value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else True
            given[name.replace("-", "_")] = value
    return given


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes", "y")


class ScriptHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` of the training scripts: the script's docstring as it is written, and one default per flag (none where
    the default is `None`, the flag's help saying what happens then, or where the help states it already)."""

    def _get_help_string(self, action) -> str:
        help_text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in help_text.lower():
            return help_text
        return super()._get_help_string(action)


def script_parser(dataclass_types: tuple, description: str | None) -> HfArgumentParser:
    """The `HfArgumentParser` of a training script: its dataclasses' flags, `description` (the script's docstring)
    atop `--help`, one default per flag."""
    return HfArgumentParser(dataclass_types, description=description, formatter_class=ScriptHelpFormatter)


def parse_script_arguments(parser, args: list[str] | None = None) -> tuple:
    """Parse a training script's arguments (`args`, default the command line, or one `.json` file of them) with
    `parser` (an `HfArgumentParser` whose dataclasses include `TrainingArguments`), then settle what to run.

    - Neither `--do_train` nor `--do_eval` given: train and evaluate; `--do_eval` alone: evaluate only; `--do_eval
      false` alone: train only. (`TrainingArguments` turns `do_eval` on by itself for any `--eval_strategy` but `no`,
      so the flags are read from what was given, not from their values.)
    - `--eval_strategy steps|epoch` (evaluation during training) without training is refused, naming both flags.
    - Options under which Trainer would not train the routing losses are refused ([`check_routing_losses_kept`]).

    Returns the parsed dataclasses, in the parser's order.
    """
    if args is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        path = os.path.abspath(sys.argv[1])
        with open(path) as f:
            given = json.load(f)
        parsed = parser.parse_json_file(json_file=path)
    else:
        given = _given_flags(sys.argv[1:] if args is None else list(args))
        parsed = parser.parse_args_into_dataclasses(args=args)
    training_args = next(value for value in parsed if isinstance(value, TrainingArguments))
    if not ({"do_train", "do_eval"} & set(given)):  # neither asked for: do both
        training_args.do_train = training_args.do_eval = True
    elif "do_train" not in given:  # `--do_eval` alone: evaluate only; `--do_eval false`: train only
        training_args.do_train = not _truthy(given["do_eval"])
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError("--do_train false and --do_eval false: nothing to run")
    if not training_args.do_train and IntervalStrategy(training_args.eval_strategy) != IntervalStrategy.NO:
        strategy = IntervalStrategy(training_args.eval_strategy).value
        raise ValueError(
            f"--eval_strategy {strategy} evaluates during training, but --do_train was not given: add --do_train to "
            "train (and evaluate along the way), or leave --eval_strategy out for an evaluation-only run (--do_eval)"
        )
    check_routing_losses_kept(training_args)
    return parsed


def check_same_format(train_file: str | None, validation_file: str | None, loaders: Mapping[str, str]) -> None:
    """Raise if `validation_file` is not read by the same `datasets` loader as `train_file` (`loaders`: extension ->
    loader): a script loads both splits with one loader."""
    if train_file is None or validation_file is None:
        return
    train, validation = (loaders.get(os.path.splitext(path)[1].lower()) for path in (train_file, validation_file))
    if train != validation:
        raise ValueError(
            f"--validation_file {validation_file!r} is not of the kind of --train_file {train_file!r} ({validation} "
            f"and {train} data): pass both in one format."
        )


def check_run_arguments(model_args, data_args, training_args: TrainingArguments) -> None:
    """What both training scripts check of the run before anything is loaded, raising a `ValueError` that names the
    flag: an evaluation-only run evaluates a model it loads (one built from scratch has random weights); a training
    run has steps to take; batch sizes, sample limits and `--dropout` are in range; no flag is given that the run
    would ignore (`--expert_noise_std` without upcycling, `--dataset_config_name` without a Hub data set)."""
    loads_a_model = bool(model_args.model_name_or_path or model_args.dense_model_name_or_path)
    if not training_args.do_train and not loads_a_model:
        raise ValueError(
            "--do_eval without --do_train evaluates a model it loads: pass --model_name_or_path (a saved model) or "
            "--dense_model_name_or_path; a model built from scratch would be evaluated with random weights."
        )
    if training_args.do_train and training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        raise ValueError(
            f"--num_train_epochs {training_args.num_train_epochs} (and no --max_steps) trains nothing: pass a "
            "positive --num_train_epochs or --max_steps, or --do_eval alone to evaluate only."
        )
    checked = [("per_device_train_batch_size", training_args.do_train)]
    checked += [("per_device_eval_batch_size", training_args.do_eval), ("gradient_accumulation_steps", True)]
    for name, used in checked:
        if used and getattr(training_args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(training_args, name)}.")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1 (or left out for all), got {value}.")
    dropout = model_args.dropout
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"--dropout must be a rate in [0, 1), got {dropout}.")
    if model_args.expert_noise_std and not model_args.dense_model_name_or_path:
        raise ValueError(
            f"--expert_noise_std {model_args.expert_noise_std} applies to upcycling (--dense_model_name_or_path) "
            "only: the experts of a saved or new model are not copies of one MLP."
        )
    if data_args.dataset_config_name is not None and data_args.dataset_name is None:
        raise ValueError("--dataset_config_name goes with --dataset_name (local files have no configurations).")


# ---- training and evaluating one run (the example scripts' shared ending) ------------------------------------------


def checkpoint_problem(folder: str) -> str | None:
    """Why `folder` (a `checkpoint-*` written by `Trainer`) cannot be resumed from, or None if it is complete.

    A run killed while saving leaves the newest checkpoint partial (written in the order model, optimizer and
    scheduler, RNG state, `trainer_state.json`): every file `Trainer` reads on resume is checked to be there and
    whole (JSON parses, safetensors headers and sizes agree, `torch.save` archives have their central directory)."""
    state_path = os.path.join(folder, "trainer_state.json")
    try:
        with open(state_path, encoding="utf-8") as handle:
            json.load(handle)["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"trainer_state.json is missing or unreadable ({type(error).__name__})"
    weights = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not weights:
        return "no safetensors weights"
    for name in weights:
        problem = _safetensors_problem(os.path.join(folder, name))
        if problem:
            return f"{name} {problem}"
    if not any(name.startswith(("optimizer", "scheduler", "rng_state", "global_step")) for name in os.listdir(folder)):
        return (
            "it holds a model but no optimizer, scheduler or RNG state (a saved model, or a checkpoint saved with "
            "--save_only_model, which Trainer cannot resume); to train the model further, pass it as "
            "--model_name_or_path"
        )
    for name in os.listdir(folder):
        if name.endswith((".pt", ".pth", ".bin")):
            try:
                with zipfile.ZipFile(os.path.join(folder, name)):
                    pass
            except (OSError, zipfile.BadZipFile):
                return f"{name} is truncated or not a torch archive"
    return None


def _safetensors_problem(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if os.path.getsize(path) != 8 + header_size + max(ends, default=0):
            return "is truncated"
    except (OSError, ValueError, KeyError, TypeError, MemoryError, OverflowError):
        return "has no valid safetensors header"
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-*` in `output_dir` that [`checkpoint_problem`] finds complete, logging each newer one it
    skips and why; None if there is none."""
    if not os.path.isdir(output_dir):
        return None
    for folder in reversed(sort_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning(f"Skipping {folder}: {problem} (a run killed while saving it?).")
    return None


def resolve_checkpoint(training_args: TrainingArguments, output_dir: str, main_arm: bool) -> str | None:
    """The checkpoint to resume from: a path, or `last`/`true` for the newest complete `checkpoint-*` in `output_dir`
    (newer ones that a kill left partial are skipped, with a warning that names them).

    `main_arm=False` (a baseline trained beside the main run) resumes from its own latest checkpoint if it has one.
    """
    value = training_args.resume_from_checkpoint
    if value is None or value.lower() in ("false", "no", "none"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is not None:
            logger.warning(
                f"{output_dir} already holds {last}; training starts over (pass --resume_from_checkpoint last to "
                "resume)."
            )
        return None
    if value.lower() in ("last", "true", "yes") or not main_arm:
        last = last_complete_checkpoint(output_dir)
        if last is None and main_arm:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in {output_dir}."
            )
        return last
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r} is not a checkpoint folder.")
    problem = checkpoint_problem(value)
    if problem is not None:
        raise ValueError(f"--resume_from_checkpoint {value!r} cannot be resumed from: {problem}.")
    return value


@functools.cache  # a script asks while checking its arguments and again while building: the config is read once
def _saved_model_type(name_or_path: str) -> str | None:
    return PreTrainedConfig.get_config_dict(name_or_path)[0].get("model_type")


def script_host(auto_class: str, default_model_type: str, model_args) -> MoGEHost:
    """The MoGE family a training script builds (its record, `MoGEHost`): that of the saved MoGE model
    (`model_args.model_name_or_path`) or of the dense model's type (`model_args.dense_model_name_or_path`) when one is
    given, else `model_args.model_type` (default `default_model_type`). A `model_type` that contradicts the model
    given is refused, naming both."""
    host, model_type = None, model_args.model_type
    for flag in ("model_name_or_path", "dense_model_name_or_path"):
        path = getattr(model_args, flag)
        local = path is not None and os.path.isdir(path)
        if local and not (os.path.isfile(os.path.join(path, "config.json")) and _saved_model_type(path)):
            raise ValueError(f"--{flag} {path!r} holds no model: no config.json naming its model_type.")
    if model_args.model_name_or_path is not None:
        host = host_for(auto_class, model_type=_saved_model_type(model_args.model_name_or_path))
    elif model_args.dense_model_name_or_path is not None:
        host = host_for(auto_class, dense_model_type=_saved_model_type(model_args.dense_model_name_or_path))
    if host is not None and model_type not in (None, host.model_type):
        raise ValueError(f"--model_type {model_type} contradicts the model given, a {host.model_type} model")
    return host or host_for(auto_class, model_type=model_type or default_model_type)


def dropout_fields(host: MoGEHost, dropout: float | None) -> dict:
    """`--dropout` as the family's dropout rates (its record's `dropout_fields`); none when `dropout` is None (a
    loaded or upcycled model keeps its own)."""
    return {} if dropout is None else dict.fromkeys(host.dropout_fields, dropout)


def parse_config_overrides(text: str | None) -> dict:
    """`--config_overrides`: `name=value` pairs separated by commas outside brackets, the values Python literals (a
    bare word is a string), e.g. `embed_dim=48,depths=[2,2,2],hidden_act=gelu`."""
    pairs, depth, start = [], 0, 0
    text = text or ""
    for index, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            pairs.append(text[start:index])
            start = index + 1
    fields = {}
    for pair in (part.strip() for part in [*pairs, text[start:]] if part.strip()):
        name, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not name.isidentifier():
            raise ValueError(f"--config_overrides: {pair!r} is not `name=value`")
        try:
            fields[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[name] = value
    return fields


def scratch_config(host: MoGEHost, architecture: dict, config_overrides: str | None, *, dropout: float, **fields):
    """The config of a model a training script builds from scratch: the family's small architecture (its record's
    `small_config`), then the `architecture` fields given by their own arguments, then `--config_overrides`, plus
    `--dropout` and the other `fields` (MoGE settings, labels, ...). An architecture field the family's config does
    not have is refused, naming it; the config checks the values."""
    overrides = parse_config_overrides(config_overrides)
    known = {field.name for field in dataclasses.fields(host.config_class)}
    unknown = [name for name in (*architecture, *overrides) if name not in known]
    if unknown:
        raise ValueError(
            f"{host.config_class.__name__} ({host.model_type}) has no config field {unknown[0]!r}; give the "
            f"architecture with the fields it has, e.g. --config_overrides (its small default: {host.small_config})"
        )
    taken = sorted((overrides.keys() & fields.keys()) | (overrides.keys() & architecture.keys()))
    if taken:
        raise ValueError(
            f"--config_overrides sets {taken[0]!r}, which an argument of its own sets too (--{taken[0]}, or the "
            "script from the data); give it once"
        )
    # `--config_overrides` last among the architecture: it may set a dropout rate `--dropout` would set otherwise.
    architecture = {**host.small_config, **architecture, **dropout_fields(host, dropout), **overrides}
    config = host.config_class(**architecture, **fields)
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if isinstance(heads, int) and isinstance(width, int) and heads > 0 and width % heads:
        # ViT's attention would silently drop the remainder (each head takes hidden_size // num_attention_heads).
        raise ValueError(
            f"{host.config_class.__name__}: hidden_size {width} is not a multiple of num_attention_heads {heads}"
        )
    return config


def check_local_source(flag: str, value: str | None) -> None:
    """Raise `FileNotFoundError` when `value` (a model, tokenizer or processor to load) is written as a local path
    (absolute, `./`, `../`, `~`, or with more than one `/`) and no such folder exists, instead of the Hub's error
    about repo ids. A plain `name` or `org/name` may be a Hub id and is left to `from_pretrained`."""
    if value is None or os.path.exists(os.path.expanduser(value)):
        return
    if value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value:
        raise FileNotFoundError(f"{flag} {value!r} does not exist (a local folder was meant, by its path).")
    if huggingface_hub.constants.is_offline_mode():  # offline, a name is a local folder or nothing
        raise FileNotFoundError(f"{flag} {value!r} does not exist as a local folder (and the Hub is offline).")


def baseline_training_args(training_args: TrainingArguments) -> TrainingArguments:
    """The `TrainingArguments` of a script's MoE baseline arm: `<output_dir>/moe_baseline`, and with `--push_to_hub`
    its own Hub repo, `<hub_model_id>-moe-baseline`, so that it never overwrites the MoGE model's repo."""
    changes = {"output_dir": os.path.join(training_args.output_dir, "moe_baseline")}
    if training_args.push_to_hub:
        repo = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
        changes["hub_model_id"] = f"{repo}-moe-baseline"
    return replace(training_args, **changes)


def main_arm_name(moge_loss_coef: float) -> str:
    """The label of a training script's main arm in its comparison table: what it trained, MoGE or plain MoE."""
    return "MoGE" if moge_loss_coef else "MoE (lambda = 0)"


def finished_run_metrics(training_args: TrainingArguments) -> dict | None:
    """The saved metrics of a run that already trained to its last step in `output_dir` and, if `do_eval`, was
    evaluated (`trainer_state.json` at `max_steps`, `all_results.json`); None for a run still to train or evaluate."""
    try:
        with open(os.path.join(training_args.output_dir, "trainer_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        with open(os.path.join(training_args.output_dir, "all_results.json"), encoding="utf-8") as handle:
            results = json.load(handle)
    except (OSError, ValueError):
        return None
    steps, last = state.get("global_step", 0), state.get("max_steps", 0)
    if not last or steps < last or not _same_schedule(state, training_args):
        return None
    if training_args.do_eval and not any(key.startswith("eval_") for key in results):
        return None
    last = _last_logged_moge_loss(state.get("log_history", []))
    if last is not None:
        results.setdefault("train_moge_loss_last_log", last)
    return results


def _last_logged_moge_loss(log_history: list[dict]) -> float | None:
    """The unscaled regularizer in the last training log that has it (the MoGE callback's `moge/moge_loss`)."""
    return next((entry["moge/moge_loss"] for entry in reversed(log_history) if "moge/moge_loss" in entry), None)


def _same_schedule(state: dict, training_args: TrainingArguments) -> bool:
    """Whether a saved run's training schedule (a `trainer_state.json` as a dict) is the one `training_args` asks for:
    the same `max_steps`, or for epoch-based training the same epochs and batch size (more epochs: train on)."""
    if training_args.max_steps > 0:
        return state.get("max_steps") == training_args.max_steps
    return (
        state.get("num_train_epochs") == math.ceil(training_args.num_train_epochs)
        and state.get("train_batch_size") == training_args.train_batch_size
    )


def check_same_moge_settings(folder: str, model: nn.Module) -> None:
    """Raise if the model saved in `folder` (its `config.json`) was trained with other MoGE or routing-loss settings
    than `model` has: resuming it, or taking its results, would report one run's numbers under another's settings;
    or if its weights have other shapes (another architecture: loading them would fail inside torch).

    Raises:
        `ValueError`: naming each field that differs, with both values (or the first tensors whose shapes differ).
    """
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return  # no saved config to compare with (a checkpoint's completeness is checked elsewhere)
    if not isinstance(saved, dict):
        return
    config = unwrap_moge_model(model).config
    # `moge_sigma` under a schedule is the schedule's state, not a setting; `output_router_logits` says what a forward
    # returns, not how it trains.
    skip = {"output_router_logits"} | ({"moge_sigma"} if getattr(config, "moge_sigma_schedule", None) else set())
    names = [name for name in MOGE_FIELDS if name not in skip]
    differ = []
    for name in names:
        if name in saved and hasattr(config, name):
            ours = getattr(config, name)
            ours = list(ours) if isinstance(ours, tuple) else ours
            if saved[name] != ours:
                differ.append(f"{name} {saved[name]!r} there, {ours!r} now")
    if differ:
        raise ValueError(
            f"{folder} holds a run trained with other settings ({'; '.join(differ)}): resuming it would report its "
            "results under this run's settings. Use another --output_dir, or the same settings to resume it."
        )
    shapes = {name: tuple(tensor.shape) for name, tensor in unwrap_moge_model(model).state_dict().items()}
    differ = [
        f"{name} {saved_shape} there, {shapes[name]} now"
        for name, saved_shape in _saved_shapes(folder).items()
        if name in shapes and shapes[name] != saved_shape
    ]
    if differ:
        raise ValueError(
            f"{folder} holds a model of another architecture ({'; '.join(differ[:3])}"
            f"{f'; {len(differ) - 3} more' if len(differ) > 3 else ''}): resume with the architecture it was trained "
            "with, or use another --output_dir."
        )


def _saved_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the safetensors files of `folder` (read from their headers, no tensor loaded)."""
    shapes = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as weights:
                shapes.update({key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()})
    return shapes


def check_same_tokenizer(folder: str, tokenizer) -> None:
    """Raise if the tokenizer saved in `folder` (a checkpoint's `tokenizer.json`) maps text to other ids than
    `tokenizer`: a resumed run would go on training the weights on another vocabulary (a tokenizer trained anew on
    other data)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path) or not hasattr(tokenizer, "get_vocab"):
        return
    saved = PreTrainedTokenizerFast(tokenizer_file=path).get_vocab()
    if saved != tokenizer.get_vocab():
        other = f"{len(saved)} tokens there, {len(tokenizer)} now" if len(saved) != len(tokenizer) else "other tokens"
        raise ValueError(
            f"{folder} was trained with another tokenizer than this run's ({other}; one trained anew on other data?). "
            "Resume with the data and --tokenizer_name it was trained with, or pass the checkpoint as "
            "--model_name_or_path to train it on new data."
        )


def _final_checkpoint_state(checkpoint: str | None, training_args: TrainingArguments) -> TrainerState | None:
    """The `TrainerState` of `checkpoint` if it was saved at the last step of this run's training, else None."""
    if checkpoint is None:
        return None
    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    if not state.max_steps or state.global_step < state.max_steps:
        return None
    if not _same_schedule(dataclasses.asdict(state), training_args):
        return None
    return state


def train_and_evaluate(
    trainer: Trainer,
    name: str,
    train_samples: int,
    eval_samples: int,
    log=None,
    main_arm: bool = True,
    run_record: Mapping[str, Any] | None = None,
) -> dict:
    """`do_train` (resuming as `resolve_checkpoint` says, saving model, metrics and state) then `do_eval`, then with
    `push_to_hub` one last push (so that the Hub's card and files hold the evaluation), the way transformers' example
    scripts do; returns the metrics, with the last logged unscaled MoGE loss. `log` (a script's logger; default this
    module's) reports a resumed checkpoint.

    `run_record` (`moge_hf.run_record`) goes into `output_dir` as it comes true: once the trained model is saved
    (without its evaluation), then whole once the evaluation is saved. Before that the folder keeps the record it had,
    so a run killed on the way, or an arm found finished already, leaves the record of what the folder holds.

    Resuming (`--resume_from_checkpoint`), an arm that already trained to its last step and was evaluated in its
    `output_dir` is not trained again (Trainer would take a step past `max_steps` and overwrite its weights and
    results): its saved metrics are returned. `main_arm=False` (a baseline beside the main run) resumes from its own
    newest complete checkpoint, whatever checkpoint the main arm was told to resume from."""
    training_args = trainer.args
    log = log or logger
    resuming = str(training_args.resume_from_checkpoint).lower() not in ("none", "false", "no")
    saved = finished_run_metrics(training_args) if resuming and training_args.do_train else None
    if saved is not None:
        check_same_moge_settings(training_args.output_dir, trainer.model)
        log.info(f"[{name}] already trained and evaluated in {training_args.output_dir}: keeping its results")
        return saved
    metrics = {}
    if training_args.do_train:
        checkpoint = resolve_checkpoint(training_args, training_args.output_dir, main_arm=main_arm)
        if checkpoint is not None:
            check_same_moge_settings(checkpoint, trainer.model)
            check_same_tokenizer(checkpoint, trainer.processing_class)
        final = _final_checkpoint_state(checkpoint, training_args)
        if final is not None:
            # The checkpoint is the run's last step (killed after saving it): Trainer.train would take a step past
            # max_steps. Load it as Trainer's own resume does, and go on to saving and evaluation.
            log.info(f"[{name}] {checkpoint} is the last step of training: loading it, not training further")
            best = final.best_model_checkpoint if training_args.load_best_model_at_end else None
            trainer._load_from_checkpoint(best if best and os.path.isdir(best) else checkpoint)  # as `train` ends
            trainer.state = final
            model = unwrap_moge_model(trainer.model)
            schedule = model.config.moge_sigma_schedule
            if schedule is not None:  # sigma where the schedule ends, as the callback's `on_train_end` sets it
                set_moge_sigma(model, annealed_sigma(final.global_step / final.max_steps, schedule))
            train_metrics = {"train_samples": train_samples}
        else:
            if checkpoint is not None:
                log.info(f"[{name}] Resuming training from {checkpoint}")
            train_result = trainer.train(resume_from_checkpoint=checkpoint)
            train_metrics = dict(train_result.metrics, train_samples=train_samples)
        trainer.save_model()
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        if run_record is not None and training_args.should_save:
            write_run_record(training_args.output_dir, {**run_record, "eval": None})
        metrics.update(train_metrics)
        last = _last_logged_moge_loss(trainer.state.log_history)
        if last is not None:
            metrics["train_moge_loss_last_log"] = last
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = eval_samples
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
        if run_record is not None and training_args.should_save:
            write_run_record(training_args.output_dir, run_record)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"{name}: end of training")
    return metrics
