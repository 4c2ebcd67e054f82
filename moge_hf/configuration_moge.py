"""Configurations of the MoGE models: each host's dense config plus the same set of MoGE fields."""

import math
import textwrap
from dataclasses import dataclass, field, fields

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import GPT2Config, SwinConfig, ViTConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from .losses import MAX_SIGMA, PADDINGS, REDUCTIONS, resolve_map_shape
from .moge_layer import ROUTING_LOSSES


__all__ = ["GPT2MoGEConfig", "MoGEConfigMixin", "SwinMoGEConfig", "ViTMoGEConfig"]

# The routing fields of every MoGE output, in order, after the fields of the dense parent's output.
ROUTING_OUTPUTS = ("router_logits", *ROUTING_LOSSES)


def _cache_name() -> str:
    """The name of the KV cache in the installed transformers' outputs and forward arguments: the field of its causal
    LM output that holds a `Cache` (`past_key_values` up to 5.23, `cache` since 5.24)."""
    for output_field in fields(CausalLMOutputWithCrossAttentions):
        if "Cache" in str(output_field.type) or Cache in getattr(output_field.type, "__args__", ()):
            return output_field.name
    raise ImportError("transformers' CausalLMOutputWithCrossAttentions has no Cache field; moge_hf cannot run with it")


CACHE_NAME = _cache_name()


# ------------------------------------------------------------------------------------------------------------------
# The MoGE fields, each declared once: default, help, check, and whether it changes weight shapes. The config
# docstring, the checks on assignment, the training scripts' arguments (`moge_hf.training.MoGEArguments`) and the
# model card's rows derive from these declarations; tests check the README's table against them.
# ------------------------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_error(config_name: str, name: str, requirement: str, value) -> str:
    return f"{config_name}: `{name}` {requirement}, got {value!r}"


def _is_sigma(value) -> bool:
    return _is_number(value) and 0 < value <= MAX_SIGMA


def _is_sigma_schedule(value) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and len(value) == 3 and all(map(_is_sigma, value)))


def _is_layer_list(value) -> bool:
    return value is None or (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v >= 0 for v in value)
    )


def _is_map_shape(value) -> bool:
    return value is None or (
        isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value)
    )


def moge_field(default, kind: str, help: str, check=None, requirement: str = "", changes_shapes: bool = False):
    """A MoGE config field: `kind` is its type as the docs write it; `check(value)` (with the `requirement` its error
    states) is applied on assignment and by `validate_moge_fields`; fields that `changes_shapes` cannot change on a
    saved model."""
    metadata = {"kind": kind, "help": help, "changes_shapes": changes_shapes}
    if check is not None:
        metadata["check"] = (check, requirement)
    return field(default=default, metadata=metadata)


@dataclass(repr=False)
class MoGEConfigMixin:
    """The MoGE fields and their checks, mixed into a dense model's config (see `MOGE_CONFIG_DOCSTRING`)."""

    num_experts: int = moge_field(
        16,
        "int",
        "Number of expert MLPs in each MoGE layer.",
        lambda v: _is_int(v) and v >= 1,
        "must be an integer >= 1",
        changes_shapes=True,
    )
    num_experts_per_tok: int = moge_field(
        2,
        "int",
        "Number of experts each token is routed to (top-k).",
        lambda v: _is_int(v) and v >= 1,
        "must be an integer >= 1",
    )
    moe_layers: list[int] | tuple[int, ...] | None = moge_field(
        None,
        "list[int]",
        "Indices of the layers whose MLP is a MoGE layer. Defaults to every other layer starting at 1 (`[0]` in a "
        "one-layer model).",
        _is_layer_list,
        "must be a non-empty list of layer indices (integers >= 0), or None",
        changes_shapes=True,
    )
    expert_intermediate_size: int | None = moge_field(
        None,
        "int",
        "Hidden size of each expert MLP. Defaults to the dense MLP's (`n_inner` or `4 * n_embd` for GPT-2, "
        "`intermediate_size` for ViT).",
        lambda v: v is None or (_is_int(v) and v >= 1),
        "must be a positive integer or None",
        changes_shapes=True,
    )
    router_aux_loss_coef: float | int = moge_field(
        0.01,
        "float",
        "Weight of the Switch load-balancing loss in `loss`.",
        lambda v: _is_number(v) and v >= 0,
        "must be a finite number >= 0",
    )
    router_aux_loss_global: bool = moge_field(
        False,
        "bool",
        "In distributed training, compute the load-balancing loss with the expert dispatch fractions of the global "
        "batch (one all-reduce of `num_layers x k x num_experts` counts per step) instead of each rank's own, so that "
        "N processes x batch B train exactly like 1 process x batch N*B (with unpadded batches: the mean routing "
        "probabilities stay each rank's own, averaged over its tokens). Every rank must then run the same "
        "forward passes that train (grad enabled, as under DDP/FSDP); forwards under `no_grad` and in evaluation "
        "use each rank's own counts, so one rank may run them alone (e.g. a sample-printing `generate`).",
        lambda v: isinstance(v, bool),
        "must be a bool",
    )
    router_z_loss_coef: float | int = moge_field(
        0.0,
        "float",
        "Weight of the ST-MoE router z-loss in `loss`.",
        lambda v: _is_number(v) and v >= 0,
        "must be a finite number >= 0",
    )
    router_jitter_noise: float | int = moge_field(
        0.0,
        "float",
        "Multiplicative jitter `eps` on the router input in training: the input is multiplied by U(1 - eps, 1 + eps).",
        lambda v: _is_number(v) and 0 <= v < 1,
        "must be a number in [0, 1)",
    )
    norm_topk_prob: bool | None = moge_field(
        None,
        "bool",
        "Whether to renormalize the top-k gate weights to sum to 1. Defaults to `True` when "
        "`num_experts_per_tok > 1` and `False` for top-1 (as in the Switch Transformer: with top-1, renormalizing "
        "makes every gate weight 1, and the router never sees the task's gradient).",
        lambda v: v in (None, True, False),
        "must be True, False or None",
    )
    moge_loss_coef: float | int = moge_field(
        0.0,
        "float",
        "Lambda, the weight of the group-sparsity regularizer in `loss`. `0.0` is the plain MoE baseline.",
        lambda v: _is_number(v) and v >= 0,
        "must be a finite number >= 0",
    )
    moge_map_shape: list[int] | tuple[int, ...] | None = moge_field(
        None,
        "list[int]",
        "`[rows, cols]` of the expert map, `rows * cols == num_experts`. Defaults to the most square factorization.",
        _is_map_shape,
        "must be [rows, cols], two integers >= 1, or None",
    )
    moge_window: int = moge_field(
        3,
        "int",
        "Side of the square Gaussian windows (groups) on the expert map.",
        lambda v: _is_int(v) and v >= 1,
        "must be a positive integer",
    )
    moge_sigma: float | int = moge_field(
        1.0,
        "float",
        "Current standard deviation of the Gaussian window weights. `model.set_moge_sigma` updates it.",
        _is_sigma,
        f"must be a number in (0, {MAX_SIGMA:g}]",
    )
    moge_sigma_schedule: list[float | int] | tuple[float | int, ...] | None = moge_field(
        None,
        "list[float]",
        "`[init, final, power]` for annealing sigma during training: `init - (init - final) * progress**power` (the "
        "paper uses `[10.0, 1.0, 0.2]`). `None` keeps `moge_sigma` fixed.",
        _is_sigma_schedule,
        f"must be [init, final, power], three numbers in (0, {MAX_SIGMA:g}], or None",
    )
    moge_padding: str = moge_field(
        "valid",
        "str",
        '`"valid"` (windows inside the map, as in the paper) or `"circular"` (the map is a torus).',
        lambda v: v in PADDINGS,
        f"must be one of {PADDINGS}",
    )
    moge_reduction: str = moge_field(
        "mean",
        "str",
        '`"mean"` (mean over tokens and windows) or `"paper"` (the authors\' sum over tokens and windows divided by '
        "`window**2 * num_windows`, so that their `moge_loss_coef` values carry over).",
        lambda v: v in REDUCTIONS,
        f"must be one of {REDUCTIONS}",
    )
    output_router_logits: bool = moge_field(
        False,
        "bool",
        "Whether the models return the router logits of every MoGE layer. The routing losses are computed and added "
        "to `loss` whether or not this is set. The outputs always carry the three unscaled routing losses; those "
        "whose coefficient is 0 are computed without autograd (reported, not trained on: no backward cost).",
        lambda v: isinstance(v, bool),
        "must be a bool",
    )

    def validate_moge_fields(self) -> None:
        """Raise a `ValueError` naming the first invalid MoGE field and its value. Fills the default `moe_layers`.

        A class validator of `@strict`: it runs when the config is built, by `config.validate()`, before
        `save_pretrained` writes the config, and when a model is built from it (fields set one by one afterwards, e.g.
        `from_pretrained(path, moge_window=5)`, are checked on their own at once, and together here).
        """
        num_layers = self.moge_num_layers

        def bad(name, requirement):
            raise ValueError(_field_error(type(self).__name__, name, requirement, getattr(self, name)))

        for name, (is_valid, requirement) in FIELD_RULES.items():
            if not is_valid(getattr(self, name)):
                bad(name, requirement)
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            bad("num_experts_per_tok", f"must be an integer between 1 and num_experts={self.num_experts}")
        if self.moe_layers is None:
            self.moe_layers = list(range(1, num_layers, 2)) or [0]
        if isinstance(self.moe_layers, tuple):
            self.moe_layers = list(self.moe_layers)
        if not self.moe_layers:
            bad("moe_layers", f"must name at least one of the {num_layers} layers (e.g. [0] for a 1-layer model)")
        if any(not _is_int(i) or not 0 <= i < num_layers for i in self.moe_layers):
            bad("moe_layers", f"must hold layer indices in [0, {num_layers})")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            bad("moe_layers", "must not repeat a layer")
        if isinstance(self.moge_map_shape, tuple):
            self.moge_map_shape = list(self.moge_map_shape)
        try:
            map_shape = resolve_map_shape(self.num_experts, self.moge_map_shape)
        except ValueError as error:
            bad("moge_map_shape", f"must be [rows, cols] with rows * cols == num_experts ({error})")
        if self.moge_padding == "valid" and self.moge_window > min(map_shape):
            bad(
                "moge_window",
                f"must fit in the {map_shape[0]}x{map_shape[1]} expert map with moge_padding='valid' "
                f"(use moge_window <= {min(map_shape)} or moge_padding='circular')",
            )
        if isinstance(self.moge_sigma_schedule, tuple):
            self.moge_sigma_schedule = list(self.moge_sigma_schedule)

    @property
    def moge_num_layers(self) -> int:
        """The number of layers `moe_layers` indexes: those with an MLP, counted through the whole model."""
        return self.num_hidden_layers

    @property
    def moge_resolved_map_shape(self) -> tuple[int, int]:
        """`(rows, cols)` of the expert map: `moge_map_shape`, or the most square factorization of `num_experts`."""
        return resolve_map_shape(self.num_experts, self.moge_map_shape)

    @property
    def moge_norm_topk_prob(self) -> bool:
        """`norm_topk_prob`, with its default resolved: renormalize for top-k with k > 1 only."""
        return self.num_experts_per_tok > 1 if self.norm_topk_prob is None else self.norm_topk_prob


# What derives from the declarations above.
MOGE_FIELDS = {spec.name: spec for spec in fields(MoGEConfigMixin)}
# The checks of single fields: on assignment (`config.moge_loss_coef = -1` raises at once) and in
# `validate_moge_fields`, which adds the checks that involve several fields.
FIELD_RULES = {name: spec.metadata["check"] for name, spec in MOGE_FIELDS.items() if "check" in spec.metadata}
# The fields that change no weight shape: the only ones a training script may change on a saved MoGE model.
SHAPE_FREE_MOGE_FIELDS = tuple(name for name, spec in MOGE_FIELDS.items() if not spec.metadata["changes_shapes"])


def _field_doc(name: str) -> str:
    spec = MOGE_FIELDS[name]
    default = spec.default
    if default is not None:
        default = f", defaults to `{default!r}`" if isinstance(default, (str, bool)) else f", defaults to {default}"
    indent = " " * 8
    help_text = textwrap.fill(
        spec.metadata["help"], 118, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
    )
    return f"    {name} (`{spec.metadata['kind']}`, *optional*{default or ''}):\n{help_text}\n"


MOGE_CONFIG_DOCSTRING = "\n    MoGE fields (shared by every MoGE config):\n\n" + "".join(map(_field_doc, MOGE_FIELDS))


def _checked_assignment(cls):
    """Make the type checks of `@strict` raise `ValueError` (naming the field and value), and check each MoGE field's
    value on assignment too (`FIELD_RULES`), so a bad value set after the config was built fails where it is set."""
    strict_setattr = cls.__setattr__

    def __setattr__(self, name, value):
        rule = FIELD_RULES.get(name)
        if rule is not None and not rule[0](value):
            raise ValueError(_field_error(cls.__name__, name, rule[1], value))
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as error:
            raise ValueError(f"{cls.__name__}: {error}") from error

    cls.__setattr__ = __setattr__

    strict_validate = cls.validate

    def validate(self):
        """`@strict`'s class validators; their errors raised as the `ValueError` that names the field."""
        try:
            strict_validate(self)
        except StrictDataclassClassValidationError as error:
            if isinstance(error.__cause__, ValueError):
                raise ValueError(str(error.__cause__)) from error
            raise

    validate.__is_defined_by_strict_decorator__ = True  # lets a `@strict` subclass define its own again
    cls.validate = validate
    return cls


@_checked_assignment
@strict
class GPT2MoGEConfig(GPT2Config, MoGEConfigMixin):
    __doc__ = (  # an assignment: a parenthesized expression would not be the class docstring
        r"""Configuration of a GPT-2 whose MLPs in `moe_layers` are MoGE layers. Takes every [`GPT2Config`] argument.
    """
        + MOGE_CONFIG_DOCSTRING
        + r"""
    Example:

    ```python
    >>> from moge_hf import GPT2MoGEConfig, GPT2MoGELMHeadModel
    >>> config = GPT2MoGEConfig(n_layer=4, n_embd=64, n_head=4, num_experts=16, moge_loss_coef=1e-2)
    >>> model = GPT2MoGELMHeadModel(config)
    ```"""
    )

    model_type = "gpt2_moge"
    # Plans of transformers' distributed engine (`from_pretrained(..., distributed_config=DistributedConfig(...))`):
    # FSDP2 per block, and expert parallelism for the MoGE layers (`base_model_ep_plan`, set from the host record's
    # MLP by `register_host`). No tensor-parallel plan: transformers' GPT-2 has none (its attention packs q, k, v in
    # one Conv1D).
    base_model_fsdp_plan = {
        "wpe": "free_full_weight",
        "h.*": "free_full_weight",
        "ln_f": "keep_full_weight",
    }
    # Output fields `Trainer.evaluate`/`predict` leave out of the predictions: the KV cache, and the routing fields
    # (per batch, not per example).
    keys_to_ignore_at_inference = [CACHE_NAME, *ROUTING_OUTPUTS]

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_moge_fields()

    @property
    def dense_intermediate_size(self) -> int:
        """Hidden size of the dense GPT-2 MLP, the default size of each expert."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@_checked_assignment
@strict
class ViTMoGEConfig(ViTConfig, MoGEConfigMixin):
    __doc__ = (  # an assignment: a parenthesized expression would not be the class docstring
        r"""Configuration of a ViT whose MLPs in `moe_layers` are MoGE layers. Takes every [`ViTConfig`] argument.
    """
        + MOGE_CONFIG_DOCSTRING
        + r"""
    Example:

    ```python
    >>> from moge_hf import ViTMoGEConfig, ViTMoGEForImageClassification
    >>> config = ViTMoGEConfig(image_size=32, patch_size=4, num_hidden_layers=6, hidden_size=192,
    ...                        num_attention_heads=3, intermediate_size=768, num_experts=32, num_experts_per_tok=1,
    ...                        moge_map_shape=[4, 8], moe_layers=[4, 5], moge_loss_coef=3e-3, moge_reduction="paper")
    >>> model = ViTMoGEForImageClassification(config)
    ```"""
    )

    model_type = "vit_moge"
    # Plans of transformers' distributed engine: FSDP2 per layer, and expert parallelism for the MoGE layers (set by
    # `register_host`). ViT has no tensor-parallel plan in transformers.
    base_model_fsdp_plan = {
        "embeddings": "free_full_weight",
        "layers.*": "free_full_weight",
        "layernorm": "keep_full_weight",
    }
    keys_to_ignore_at_inference = list(ROUTING_OUTPUTS)  # per batch, not per example

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_moge_fields()

    @property
    def dense_intermediate_size(self) -> int:
        """Hidden size of the dense ViT MLP, the default size of each expert."""
        return self.intermediate_size


@_checked_assignment
@strict
class SwinMoGEConfig(SwinConfig, MoGEConfigMixin):
    __doc__ = (  # an assignment: a parenthesized expression would not be the class docstring
        r"""Configuration of a Swin Transformer whose MLPs in `moe_layers` are MoGE layers. Takes every [`SwinConfig`]
    argument. `moe_layers` counts the blocks of all stages in order (`sum(depths)` of them); each MoGE layer's experts
    have the size of the MLP they replace, which doubles from stage to stage (or all `expert_intermediate_size`).
    """
        + MOGE_CONFIG_DOCSTRING
        + r"""
    Example:

    ```python
    >>> from moge_hf import SwinMoGEConfig, SwinMoGEForImageClassification
    >>> config = SwinMoGEConfig(image_size=32, patch_size=2, embed_dim=48, depths=[2, 2, 2], num_heads=[3, 6, 12],
    ...                         window_size=4, num_experts=16, moe_layers=[1, 3, 5], moge_loss_coef=3e-3)
    >>> model = SwinMoGEForImageClassification(config)
    ```"""
    )

    model_type = "swin_moge"
    # FSDP2 per stage (expert parallelism for the MoGE layers is set by `register_host`); no tensor-parallel plan.
    base_model_fsdp_plan = {
        "embeddings": "free_full_weight",
        "encoder.layers.*": "free_full_weight",
        "layernorm": "keep_full_weight",
    }
    keys_to_ignore_at_inference = list(ROUTING_OUTPUTS)  # per batch, not per example

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_moge_fields()

    @property
    def moge_num_layers(self) -> int:
        """The blocks of all stages: what `moe_layers` indexes."""
        return sum(self.depths)

    @property
    def dense_intermediate_size(self) -> int:
        """Hidden size of the first stage's dense MLP (each later stage's is twice the one before)."""
        return int(self.mlp_ratio * self.embed_dim)
