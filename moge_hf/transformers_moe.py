"""MoGE on transformers' own MoE models (Qwen3-MoE, OLMoE, Mixtral, ...), left unmodified.

[`add_moge_regularizer`] finds the model's routers the way transformers itself does (the `router_logits` entry of the
model's `_can_record_outputs`), reads their logits through the model's routing recorder (`moge_hf.routing`), and adds
MoGE's group-sparsity regularizer of those logits to the model's own loss:

    loss = <the model's own loss> + moge_loss_coef * moge_loss

`moge_loss` (unscaled, the mean over the MoE layers, padding tokens left out) becomes a field of the output, appended
after the model's own fields (and left out of `Trainer.predict`'s predictions through the config's
`keys_to_ignore_at_inference`). No weight, module of the checkpoint or forward of the model changes: the settings go
into the config (`moge_loss_coef`, `moge_map_shape`, ...), so `save_pretrained` / `push_to_hub` keep them and the
folder stays a native checkpoint that loads anywhere without moge_hf; `add_moge_regularizer(model)` re-applies them.
The config of a regularized model checks those fields on assignment, so that what it saves is what trains.
"""

import dataclasses
import inspect

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_moge import CACHE_NAME, FIELD_RULES, ROUTING_OUTPUTS, MoGEConfigMixin, _field_error
from .losses import resolve_map_shape
from .moge_layer import GroupSparsityRegularizer, MoGERouter, trains_up_to
from .routing import (
    _RECORDER_ATTRIBUTE,
    NUM_EXPERTS_NAMES,
    SCORING_FUNCTIONS,
    RouterTap,
    RoutingRecorder,
    _recorded_routers,
    config_value,
    moge_routers,
    routing_recorder,
)


logger = logging.get_logger(__name__)

# `moge_routers` and `RouterTap` live in `moge_hf.routing` now; importing them from here keeps working.
__all__ = ["MOGE_REGULARIZER_FIELDS", "RouterTap", "add_moge_regularizer", "describe_routing", "moge_routers"]

# The config fields of the regularizer, with the defaults of the MoGE models' configs.
MOGE_REGULARIZER_FIELDS = (
    "moge_loss_coef",
    "moge_map_shape",
    "moge_window",
    "moge_sigma",
    "moge_sigma_schedule",
    "moge_padding",
    "moge_reduction",
    "moge_scoring",
)
SCORINGS = ("auto", *SCORING_FUNCTIONS)
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(MoGEConfigMixin)} | {"moge_scoring": "auto"}
_RULES = FIELD_RULES | {"moge_scoring": (lambda value: value in SCORINGS, f"must be one of {list(SCORINGS)}")}


def _num_experts(config) -> int | None:
    return config_value(config, NUM_EXPERTS_NAMES)


def _resolved_fields(config, overrides: dict) -> dict:
    """The regularizer's fields: `overrides`, else the config's saved ones, else the defaults; each checked."""
    unknown = sorted(set(overrides) - set(MOGE_REGULARIZER_FIELDS))
    if unknown:
        raise TypeError(f"add_moge_regularizer got unknown fields {unknown}; it takes {list(MOGE_REGULARIZER_FIELDS)}")
    fields = {}
    for name in MOGE_REGULARIZER_FIELDS:
        value = overrides[name] if name in overrides else getattr(config, name, _DEFAULTS[name])
        if isinstance(value, tuple):
            value = list(value)
        rule = _RULES.get(name)
        if rule is not None and not rule[0](value):
            raise ValueError(f"add_moge_regularizer: `{name}` {rule[1]}, got {value!r}")
        fields[name] = value
    return fields


# The fields the regularizer is built from: set on the config of a regularized model afterwards, they would change
# what `save_pretrained` writes, not what trains, so the config refuses them (`add_moge_regularizer` rebuilds it).
# The others are read live: `moge_loss_coef` at every forward, `moge_sigma` applied at the next forward (or at once by
# `set_moge_sigma`), `moge_sigma_schedule` by `add_moge_callback` at every step.
_BUILT_FIELDS = ("moge_map_shape", "moge_window", "moge_padding", "moge_reduction", "moge_scoring")


def _built_value(config, name: str, value):
    """What the regularizer makes of a built field's value: the resolved map shape, lists as tuples."""
    if name == "moge_map_shape":
        try:
            return resolve_map_shape(_num_experts(config), value)
        except (TypeError, ValueError):
            return ("unresolvable", tuple(value) if isinstance(value, (list, tuple)) else value)
    return tuple(value) if isinstance(value, list) else value


_UNSET = object()


def _check_assignment(config, name: str, value) -> None:
    """The check a regularized model's config applies to `config.<name> = value`: a valid value, and no built field
    changed behind the regularizer's back."""
    if name not in MOGE_REGULARIZER_FIELDS:
        return
    config_name = _plain_config_class(config).__name__
    is_valid, requirement = _RULES[name]
    if not is_valid(value):
        raise ValueError(_field_error(config_name, name, requirement, value))
    current = config.__dict__.get(name, _UNSET)
    if name in _BUILT_FIELDS and current is not _UNSET:
        if _built_value(config, name, value) != _built_value(config, name, current):
            raise ValueError(_built_field_error(name, value, current))


def _built_field_error(name: str, value, used) -> str:
    return (
        f"config.{name} was set to {value!r} after add_moge_regularizer built the model's regularizer with "
        f"{used!r}: the model would keep {used!r} and save {value!r}; call add_moge_regularizer(model, "
        f"{name}={value!r}) to rebuild the regularizer with it"
    )


_GUARDED_CONFIGS: dict[type, type] = {}


def _guarded_config_class(base: type) -> type:
    """`base` (a transformers config class) whose `__setattr__` checks the regularizer's fields (`_check_assignment`):
    the class `add_moge_regularizer` gives the config instance of the model it regularizes (and only that instance;
    made once per class). It bears `base`'s name, which transformers' Auto classes look configs up by
    (`AutoModelForCausalLM.from_config(model.config)` keeps working), and writes, pickles and copies as `base` does:
    `save_pretrained` writes the same config.json (the folder loads with plain transformers); a pickle or copy keeps
    the checks (unpickled where moge_hf is installed)."""
    if getattr(base, "_moge_regularized_config", False):
        return base
    if base not in _GUARDED_CONFIGS:

        def __setattr__(self, attribute, value):
            if attribute in MOGE_REGULARIZER_FIELDS and isinstance(value, tuple):
                value = list(value)  # as add_moge_regularizer sets them (and JSON writes them)
            _check_assignment(self, attribute, value)
            base.__setattr__(self, attribute, value)

        def __eq__(self, other):  # as `base` compares: a regularized config equals the same plain one
            if not isinstance(other, base):
                return NotImplemented
            return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(base))

        def __reduce_ex__(self, protocol):  # the class is made again where it is unpickled (it is in no module)
            return _regularized_config, (base,), dict(self.__dict__)

        namespace = {
            "__module__": __name__,
            "__qualname__": base.__qualname__,
            "__doc__": f"`{base.__name__}` of a model given `add_moge_regularizer`: its MoGE fields are checked.",
            "__setattr__": __setattr__,
            "__eq__": __eq__,
            "__hash__": base.__hash__,
            "__reduce_ex__": __reduce_ex__,
            "_moge_regularized_config": True,
        }
        _GUARDED_CONFIGS[base] = type(base.__name__, (base,), namespace)
    return _GUARDED_CONFIGS[base]


def _regularized_config(base: type):
    """An empty instance of `base`'s regularized config class (unpickling and copying fill in its `__dict__`)."""
    cls = _guarded_config_class(base)
    return cls.__new__(cls)


def _plain_config_class(config) -> type:
    cls = type(config)
    return cls.__mro__[1] if getattr(cls, "_moge_regularized_config", False) else cls


def _check_moge_config(model, args):
    """Forward pre-hook of a regularized model: a regularizer field changed on the config without its checks (its
    `__dict__` written, the config replaced) raises before the model runs, as on assignment; a new `moge_sigma` is
    applied; regularizer buffers still on the meta device (a model built there and given its weights with
    `load_state_dict(..., assign=True)`) are built where the routers are. Not traced by `torch.compile`."""
    if torch.compiler.is_compiling():  # as the MoGE models' check: set_moge_sigma changes sigma in a compiled model
        return None
    config, regularizer = model.config, model.moge_regularizer
    config_name = _plain_config_class(config).__name__
    for name in ("moge_loss_coef", "moge_sigma", "moge_sigma_schedule"):
        value = getattr(config, name, None)
        is_valid, requirement = FIELD_RULES[name]
        if not is_valid(value):
            raise ValueError(_field_error(config_name, name, requirement, value))
    used = {
        "moge_map_shape": tuple(regularizer.map_shape),
        "moge_window": regularizer.window,
        "moge_padding": regularizer.padding,
        "moge_reduction": regularizer.reduction,
        "moge_scoring": regularizer.moge_scoring,
    }
    for name, value in used.items():
        configured = getattr(config, name, None)
        if _built_value(config, name, configured) != value:
            raise ValueError(_built_field_error(name, configured, list(value) if isinstance(value, tuple) else value))
    if float(config.moge_sigma) != regularizer.sigma:
        regularizer.set_sigma(float(config.moge_sigma))
    if regularizer.window_matrix.is_meta:
        device = next((p.device for p in _recorded_routers(model)[-1].module.parameters() if not p.is_meta), None)
        if device is not None:
            regularizer.rebuild_buffers(device)
    if regularizer.routing is None:  # built on the meta device: read the routing once the weights are there
        regularizer.routing = _resolve_routing(model, routing_recorder(model).taps, regularizer.moge_scoring)
    return None


@dataclasses.dataclass(frozen=True)
class RoutingDescription:
    """How a transformers MoE model routes, as `add_moge_regularizer` reads it from the model (see `describe_routing`).

    `scoring` is the function its experts' weights come from (a key of `moge_hf.routing.SCORING_FUNCTIONS`), or None
    where that could not be read (the model's experts do not take `(hidden_states, top_k_index, top_k_weights)`, or
    no function reproduces their weights); `logits_per_token` is the router's output width: `num_experts` plus any
    extra logits (zero-computation, skip or shared experts), which MoGE leaves out."""

    num_experts: int
    top_k: int
    logits_per_token: int | None
    scoring: str | None
    selection_bias: bool  # a correction bias added to the scores for the top-k choice only (not trained by gradient)
    expert_groups: int | None  # the experts are chosen within the best groups (DeepSeek-V3's `n_group`)


def _router_block(model: nn.Module, tap: RouterTap) -> nn.Module:
    """The module to run to see one routing decision: the MoE block that holds the router and the experts, else the
    router itself."""
    if tap.experts is None:
        return tap.module
    for module in model.modules():
        if any(child is tap.module for child in module.children()) and getattr(module, "experts", None) is tap.experts:
            return module
    return tap.module


def _probe_routing(model: nn.Module, tap: RouterTap) -> tuple[torch.Tensor, tuple | None] | None:
    """Run `tap`'s MoE block on random hidden states (no gradient, eval mode): the router's `(T, W)` logits and the
    `(top_k_index, top_k_weights)` its experts received (None if they take other arguments); None if the block does
    not run on hidden states alone or its weights are not materialized. The input is scaled so that the logits spread
    (standard deviation about 2), which tells the scoring functions apart."""
    block = _router_block(model, tap)
    parameter = next(tap.module.parameters(), None)
    parameter = next(block.parameters(), None) if parameter is None else parameter
    hidden_size = config_value(model.config, ("hidden_size", "d_model"))
    if parameter is None or parameter.is_meta or hidden_size is None:
        return None
    seen: dict = {}

    def router_hook(module, args, output):
        logits = seen.setdefault("logits", tap.logits(output).detach())
        # A router that hands the experts dense `(T, E)` weights, zero off its top-k (Llama4), returns them itself.
        for value in output if isinstance(output, tuple) else ():
            if torch.is_tensor(value) and value.is_floating_point() and value.numel() == logits.numel():
                dense = value.detach().reshape(logits.shape)
                chosen = dense != 0
                if not torch.equal(dense, logits) and (chosen.sum(-1) == tap.top_k).all():
                    index = chosen.float().topk(tap.top_k, dim=-1).indices
                    seen.setdefault("router_weights", (index, dense.gather(-1, index)))

    def experts_hook(module, args, kwargs):
        arguments = [*args[1:3]]
        if len(arguments) < 2:
            return
        if all(torch.is_tensor(argument) for argument in arguments):
            seen.setdefault("experts", tuple(argument.detach() for argument in arguments))

    handles = [tap.module.register_forward_hook(router_hook)]
    if tap.experts is not None:
        handles.append(tap.experts.register_forward_pre_hook(experts_hook, with_kwargs=True))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 64, hidden_size, generator=generator).to(parameter.device, parameter.dtype)
    # A router initialized to zero (a model built to train from scratch) gives equal logits, which every scoring
    # function turns into equal weights: its 2-D weights are drawn at random for the probe, then put back.
    weights = [weight for weight in tap.module.parameters() if weight.dim() == 2]
    saved = [weight.detach().clone() for weight in weights]
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            if all(weight.count_nonzero() == 0 for weight in weights):
                for weight in weights:
                    weight.copy_(torch.randn(weight.shape, generator=generator).to(weight) / weight.shape[-1] ** 0.5)
            for _ in range(2):
                seen.clear()
                block(hidden)
                spread = seen["logits"].float().std()
                if not torch.isfinite(spread) or spread == 0:
                    return None
                hidden = hidden * (2.0 / spread)
    except Exception:  # a block that needs more than hidden states (masks, positions): nothing to read
        return None
    finally:
        block.train(was_training)
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for weight, value in zip(weights, saved):
                weight.copy_(value)
    return seen["logits"], seen.get("experts", seen.get("router_weights"))


def _scoring_from_weights(logits: torch.Tensor, experts_inputs, num_experts: int) -> str | None:
    """The scoring function whose scores of the chosen experts, renormalized, are the weights the experts got (top-k
    renormalization and a scaling factor change no ratio); with top-1, whose score is the weight. None if no function,
    or more than one, reproduces them."""
    index, weights = experts_inputs
    logits = logits.double()
    index = index.reshape(logits.shape[0], -1).long()
    weights = weights.reshape(logits.shape[0], -1).double()
    if weights.shape[-1] == logits.shape[-1] != index.shape[-1]:  # dense `(T, W)` weights: those of the chosen
        weights = weights.gather(-1, index)
    if weights.shape != index.shape:
        return None
    keep = (index < num_experts).all(-1) & (weights > 0).all(-1)  # a skip / zero expert chosen: its weight is masked
    if keep.sum() < 4:
        return None
    index, weights, logits = index[keep], weights[keep], logits[keep]
    tolerance = 1e-3 if experts_inputs[1].dtype in (torch.float32, torch.float64) else 3e-2
    matches = []
    for name, function in SCORING_FUNCTIONS.items():
        chosen = function(logits).gather(-1, index)
        if index.shape[-1] > 1:
            chosen, target = chosen / chosen.sum(-1, keepdim=True), weights / weights.sum(-1, keepdim=True)
        else:
            target = weights
        if (chosen - target).abs().max() < tolerance:
            matches.append(name)
    return matches[0] if len(matches) == 1 else None


def _linear_width(router: nn.Module) -> int | None:
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    linear = next((module for module in router.modules() if isinstance(module, nn.Linear)), None)
    return None if linear is None else linear.out_features


def describe_routing(model: PreTrainedModel) -> RoutingDescription:
    """How the transformers MoE `model` routes its tokens, read from the model: its experts and top-k (from the config,
    under any of the names transformers' families use), the width of its routers' logits and the function its
    experts' weights come from (one MoE block run on random hidden states, no gradient), a selection bias and expert
    groups. `add_moge_regularizer` regularizes what this describes (see its docstring).

    Raises:
        `ValueError`: the model records no router logits, or its config gives no number of experts.
    """
    taps = _recorded_routers(model)
    if not taps:
        raise ValueError(
            f"{type(model).__name__} records no router logits (no `router_logits` in the `_can_record_outputs` of the "
            "model or of its inner model, or no such module in it): add_moge_regularizer works on transformers' MoE "
            "models such as Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V3"
        )
    num_experts = _num_experts(model.config)
    if num_experts is None:
        raise ValueError(
            f"{type(model.config).__name__} gives no number of experts (none of {list(NUM_EXPERTS_NAMES)}, in it or "
            "in its nested configs)"
        )
    probe = _probe_routing(model, taps[0])
    width = probe[0].shape[-1] if probe is not None else _linear_width(taps[0].module)
    scoring = None
    if probe is not None and probe[1] is not None:
        scoring = _scoring_from_weights(probe[0], probe[1], num_experts)
    router = taps[0].module
    bias = any(
        "bias" in name and name != "bias" and buffer.dim() == 1 and buffer.shape[0] >= num_experts
        for name, buffer in [*router.named_buffers(recurse=False), *router.named_parameters(recurse=False)]
    )
    groups = config_value(model.config, ("n_group", "num_expert_group"))
    return RoutingDescription(
        num_experts=num_experts,
        top_k=taps[0].top_k,
        logits_per_token=width,
        scoring=scoring,
        selection_bias=bias,
        expert_groups=groups if groups and groups > 1 else None,
    )


def _resolve_routing(model: nn.Module, taps: list[RouterTap], requested: str) -> RoutingDescription | None:
    """What the regularizer acts on: the routed experts, with the scoring `requested` (`moge_scoring`) or, for "auto",
    the one `describe_routing` reads (the paper's softmax, with a warning, where it reads none); set on the `taps`.
    None while the weights are on the meta device (the first forward resolves it then).

    Raises:
        `ValueError`: the router gives fewer logits than there are experts (no distribution over the experts).
    """
    if next(taps[0].module.parameters(), torch.empty(0)).is_meta:
        return None
    description = describe_routing(model)
    width, num_experts = description.logits_per_token, description.num_experts
    hidden_size = config_value(model.config, ("hidden_size", "d_model"))
    if width is not None and width > num_experts and width == hidden_size:
        raise ValueError(
            f"{type(model).__name__} records the output of its MoE block ({width} values per token, the hidden size) "
            f"as its router logits, not one logit per expert ({num_experts}): this release of transformers records "
            "no router logits for it"
        )
    if width is not None and width < num_experts:
        raise ValueError(
            f"{type(model).__name__}'s router gives {width} logits per token for {num_experts} experts, not one per "
            "expert (product-key routing, as Doge's): there is no distribution over the experts for MoGE to "
            "regularize"
        )
    scoring = requested
    if requested == "auto":
        scoring = description.scoring
        if scoring is None:
            scoring = "softmax"
            logger.warning(
                f"add_moge_regularizer: could not read how {type(model).__name__} scores its experts (its experts do "
                "not take `(hidden_states, top_k_index, top_k_weights)`, or no scoring function reproduces their "
                "weights); regularizing the softmax of the router logits (the paper's form). Set moge_scoring to "
                f"one of {list(SCORING_FUNCTIONS)} to say which."
            )
    for tap in taps:
        tap.scoring = scoring
        tap.num_experts = num_experts if width is not None and width > num_experts else None
    return dataclasses.replace(description, scoring=scoring)


_OUTPUT_CLASSES: dict[type, type] = {}


def _with_moge_loss(output_class: type[ModelOutput]) -> type[ModelOutput]:
    """`output_class` with a `moge_loss` field appended (made once per class, importable from this module)."""
    if output_class not in _OUTPUT_CLASSES:
        name = f"{output_class.__name__}WithMoGE"
        cls = dataclasses.make_dataclass(
            name,
            [("moge_loss", torch.Tensor | None, dataclasses.field(default=None))],
            bases=(output_class,),
            namespace={"__module__": __name__, "__doc__": f"`{output_class.__name__}` plus `moge_loss`."},
        )
        globals()[name] = cls  # so that outputs pickle
        _OUTPUT_CLASSES[output_class] = cls
    return _OUTPUT_CLASSES[output_class]


def add_moge_regularizer(model: PreTrainedModel, **moge_fields) -> PreTrainedModel:
    r"""Add MoGE's group-sparsity regularizer to a transformers MoE model, in place; return the model.

    Works on any transformers model whose class records `router_logits` (its `_can_record_outputs`) and whose config
    gives the number of experts: Qwen3-MoE, OLMoE and Mixtral are tested; Qwen2-MoE, GPT-OSS and GraniteMoE declare
    the same (untested here). The model keeps its own forward, loss, aux loss and weights.

    Args:
        model (`PreTrainedModel`):
            The MoE model, e.g. `Qwen3MoeForCausalLM` or its base model.
        moge_fields:
            `moge_loss_coef` (lambda, default 0.0: the loss stays exactly the model's own), `moge_map_shape`
            (`[rows, cols]`, rows * cols = the number of experts; default the most square), `moge_window` (3, or
            the map's smaller side where 3 does not fit it with `"valid"` padding, e.g. 2 for 8 experts on 2 x 4),
            `moge_sigma` (1.0), `moge_sigma_schedule` (`[init, final, power]` or None, applied by
            `moge_hf.add_moge_callback`), `moge_padding` (`"valid"` or `"circular"`), `moge_reduction` (`"mean"` or
            `"paper"`). Fields not given keep the values saved in `model.config` (so `add_moge_regularizer(model)`
            re-applies a saved model's settings), else these defaults.

    With `labels`, `loss` becomes the model's own loss plus `moge_loss_coef * moge_loss` (read live from
    `model.config.moge_loss_coef`); under `Trainer` with `num_items_in_batch` (causal LMs), the regularizer of a
    micro-batch is weighted by its share of the batch's label tokens, as the LM loss is. The output gains
    `moge_loss`; with `return_dict=False` it is appended to the tuple. Padding tokens (a 2-D `attention_mask`) are left
    out. The regularizer reads the router logits as the model computes them (after input jitter, where a model
    applies one in training: Mixtral's `router_jitter_noise`, 0 by default).

    Afterwards `model.config` checks the fields on assignment (that config instance only: its class becomes a
    subclass of its own, which saves, copies and pickles as it did). `moge_loss_coef`, `moge_sigma` (applied at the
    next eager forward; `moge_hf.set_moge_sigma` applies it at once, also to a compiled model) and
    `moge_sigma_schedule` may change, and an invalid value raises. The regularizer is built from `moge_map_shape`,
    `moge_window`, `moge_padding` and `moge_reduction`: setting one of them to another value raises (the model would
    save it but not train with it); call `add_moge_regularizer(model, moge_window=...)` instead. A value written
    around these checks is refused at the next eager forward.

    The regularizer's buffers are derived from its settings (they are in no checkpoint): a model built on the meta
    device (`with torch.device("meta")`, accelerate's `init_empty_weights`, FSDP's meta init) gets them rebuilt by
    `to_empty`, or at its first forward.

    Raises:
        `ValueError`: the model records no router logits, a field is invalid, or the map does not fit the experts;
            later, on the config's assignments and at a forward, as described above.
        `TypeError`: an unknown field.

    Example:

    ```python
    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> from moge_hf import add_moge_regularizer
    >>> model = Qwen3MoeForCausalLM(Qwen3MoeConfig(num_hidden_layers=2, hidden_size=64, num_experts=16))
    >>> model = add_moge_regularizer(model, moge_loss_coef=0.01, moge_map_shape=[4, 4], moge_window=3)
    >>> out = model(ids, labels=ids)
    >>> out.loss, out.moge_loss
    ```
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"add_moge_regularizer takes a transformers model (PreTrainedModel), got {type(model).__name__}"
        )
    if any(isinstance(module, MoGERouter) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} is a moge_hf model: its MoGE layers carry the regularizer already")
    routers = _recorded_routers(model)
    num_experts = _num_experts(model.config)
    if not routers or num_experts is None:
        describe_routing(model)  # raises the reason
    fields = _resolved_fields(model.config, moge_fields)
    recorder = routing_recorder(model)  # hooks on the routers and on the model, made once per model
    if _RECORDER_ATTRIBUTE not in vars(model):  # found on a submodule, whose forward it records, not this model's
        owner = next(name for name, part in model.named_modules() if vars(part).get(_RECORDER_ATTRIBUTE) is recorder)
        raise ValueError(
            f"add_moge_regularizer: the submodule {owner!r} of this {type(model).__name__} records the routing "
            "already (it was given the regularizer, or diagnostics, on its own): give the regularizer to the whole "
            "model only, on a fresh copy of it"
        )
    routing = _resolve_routing(model, recorder.taps, fields["moge_scoring"])
    try:
        map_shape = resolve_map_shape(num_experts, fields["moge_map_shape"])
    except ValueError as error:
        raise ValueError(
            f"add_moge_regularizer: `moge_map_shape` {fields['moge_map_shape']!r} does not fit the model's "
            f"{num_experts} experts ({error})"
        ) from error
    window_set = "moge_window" in moge_fields or getattr(model.config, "moge_window", None) is not None
    if not window_set and fields["moge_padding"] == "valid" and fields["moge_window"] > min(map_shape):
        if min(map_shape) < 2:
            raise ValueError(
                f"add_moge_regularizer: the model's {num_experts} experts lie on a {map_shape[0]}x{map_shape[1]} map, "
                "where the only window that fits with moge_padding='valid' (1x1) makes the MoGE loss a constant "
                "(1 / num_experts) that trains nothing: pass moge_padding='circular' (windows wrap around the map)"
            )
        # The default window (3) does not fit a map with a side of 2 (8 experts: 2 x 4): take the map's smaller side.
        fields["moge_window"] = min(map_shape)
    if fields["moge_window"] == 1 and num_experts > 1:
        logger.warning(
            "add_moge_regularizer: moge_window=1 makes the MoGE loss a constant (1 / num_experts): it trains nothing"
        )
    if fields["moge_padding"] == "valid" and fields["moge_window"] > min(map_shape):
        raise ValueError(
            f"add_moge_regularizer: `moge_window` {fields['moge_window']} does not fit the "
            f"{map_shape[0]}x{map_shape[1]} expert map with moge_padding='valid' (use moge_window <= "
            f"{min(map_shape)} or moge_padding='circular')"
        )

    _remove_moge_regularizer(model)
    config = model.config
    config.__class__ = _plain_config_class(config)  # the new settings are set unchecked, then checked again
    for name, value in fields.items():
        setattr(config, name, value)
    config.__class__ = _guarded_config_class(type(config))
    # `Trainer.evaluate`/`predict` leave these output fields out of the predictions: the config class's own list, or
    # Trainer's default (the KV cache, by the installed transformers' name), plus the per-batch `moge_loss`.
    ignored = getattr(type(model.config), "keys_to_ignore_at_inference", None) or [CACHE_NAME]
    # Per-batch routing fields are no predictions (as for the MoGE models): Trainer leaves them out of `predict`.
    model.config.keys_to_ignore_at_inference = [*ignored, *(name for name in ROUTING_OUTPUTS if name not in ignored)]
    device = next(model.buffers(), next(model.parameters(), torch.empty(0))).device
    model.moge_regularizer = GroupSparsityRegularizer(
        num_experts,
        map_shape,
        fields["moge_window"],
        fields["moge_sigma"],
        fields["moge_padding"],
        fields["moge_reduction"],
    ).to(device)
    model.moge_regularizer.moge_scoring, model.moge_regularizer.routing = fields["moge_scoring"], routing
    # First among the model's hooks, so that others (the Trainer callback's) see the output with `moge_loss`; it reads
    # the forward's routing, and the recorder's own hook on the model, right after it, ends the recording.
    loss = _MoGELoss(recorder, routers[-1].module, inspect.signature(model.forward))
    model.register_forward_hook(loss.hook, with_kwargs=True, always_call=True, prepend=True)
    model.register_forward_pre_hook(_check_moge_config, prepend=True)  # before the recorder begins recording
    return model


def _remove_moge_regularizer(model: nn.Module) -> None:
    """Remove the hook a previous `add_moge_regularizer` put on `model` (found in the model's own hook dict, so that
    this works on a deep copy too)."""
    for key, hook in list(model._forward_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), _MoGELoss):
            del model._forward_hooks[key]
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _check_moge_config:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)


def _token_mask(attention_mask, num_tokens: int) -> torch.Tensor | None:
    """`(T,)` of the tokens routed in this forward from a 2-D `attention_mask` (which covers cached tokens too)."""
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2 or num_tokens % attention_mask.shape[0]:
        return None
    new_tokens = num_tokens // attention_mask.shape[0]
    if new_tokens > attention_mask.shape[1]:
        return None
    return (attention_mask[:, -new_tokens:] != 0).reshape(-1)


class _MoGELoss:
    """The forward hook `add_moge_regularizer` puts on a model: the regularizer of the routing of the forward, added to
    the output. A bound method, so that a deep copy of the model gets its own (with its own recorder and router)."""

    def __init__(self, recorder: RoutingRecorder, last_router: nn.Module, signature: inspect.Signature):
        self.recorder = recorder
        self.last_router = last_router
        self.signature = signature

    def hook(self, model, args, kwargs, output):
        recorder, last_router, signature = self.recorder, self.last_router, self.signature
        try:  # the forward's arguments by name, positional ones included
            kwargs = dict(signature.bind_partial(*args, **kwargs).arguments, **kwargs)
        except TypeError:
            pass
        if output is None:  # the forward raised (the hook is always called): the recorder's own hook drops it
            return None
        # The routing of this forward: this hook runs before the recorder's own one on the model, which ends the
        # recording (see above); a forward of the model run inside this one has ended already.
        records = recorder.records()
        logits = [recorder.taps[record.layer].logits(record.output) for record in records]
        if not logits:
            raise RuntimeError(f"{type(model).__name__}: no router ran in this forward, so there is no MoGE loss")
        coef = model.config.moge_loss_coef
        # Eager: no graph for a coefficient of 0. Compiled: no branch on the coefficient, which the compiler may trace
        # as a symbol once it has changed (a 0 then adds a zero with its graph).
        compiling = torch.compiler.is_compiling()
        trains = torch.is_grad_enabled() and (compiling or bool(coef))
        if trains and model.training and not any(layer.requires_grad for layer in logits):
            if trains_up_to(model, last_router):  # the router or weights before it (LoRA adapters) train
                raise RuntimeError(
                    "The router logits carry no gradient in training, so the MoGE regularizer would train nothing. "
                    "Reentrant activation checkpointing does this: use gradient_checkpointing_kwargs="
                    "{'use_reentrant': False} (transformers' default)."
                )
        device = model.moge_regularizer.window_matrix.device  # layers may sit on several devices (device_map)
        mask = _token_mask(kwargs.get("attention_mask"), logits[0].shape[0])
        mask = None if mask is None else mask.to(device)
        with torch.set_grad_enabled(trains):
            # The distribution over the routed experts that each router's scoring gives its logits (describe_routing).
            probs = [recorder.taps[record.layer].scores(record.output).to(device) for record in records]
            per_layer = [model.moge_regularizer(layer, mask) for layer in probs]
            moge_loss = torch.stack(per_layer).mean()
        # Added to whatever loss the head returns (labels, or a question-answering head's positions); weighted by the
        # micro-batch's share of the label tokens under Trainer's `num_items_in_batch`.
        labels = kwargs.get("labels")
        weighted = None
        if compiling or coef:
            share = 1.0 if labels is None else _share_of_label_tokens(model, labels, kwargs)
            weighted = coef * moge_loss * (share.to(moge_loss.device) if torch.is_tensor(share) else share)
        if isinstance(output, ModelOutput):
            values = {field.name: getattr(output, field.name) for field in dataclasses.fields(output)}
            if weighted is not None and values.get("loss") is not None:
                values["loss"] = values["loss"] + weighted.to(values["loss"].device)
            return _with_moge_loss(type(output))(**values, moge_loss=moge_loss)
        output = tuple(output)
        if weighted is not None and output and torch.is_tensor(output[0]) and output[0].dim() == 0:  # a loss first
            output = (output[0] + weighted.to(output[0].device), *output[1:])
        return (*output, moge_loss)


def _share_of_label_tokens(model, labels: torch.Tensor, kwargs: dict) -> torch.Tensor | float:
    """Under Trainer's `num_items_in_batch` (a causal LM's loss summed over the accumulated batch's label tokens), the
    micro-batch's share of those tokens; else 1. A batch without label tokens weighs 0."""
    num_items = kwargs.get("num_items_in_batch")
    if num_items is None or not model.can_generate():
        return 1.0
    shift_labels = kwargs.get("shift_labels")
    shift_labels = labels[..., 1:] if shift_labels is None else shift_labels
    count = (shift_labels != -100).sum()
    num_items = torch.as_tensor(num_items, device=count.device)
    return torch.where(num_items > 0, count / num_items.clamp(min=1), 0.0)
