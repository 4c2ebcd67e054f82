"""PyTorch MoGE models: GPT-2 and ViT whose MLPs in `config.moe_layers` are Mixture-of-Group-Experts layers.

A MoGE layer is a sparse MoE layer (router + experts, every token to its top-k experts, no token dropped) whose
routing probabilities are regularized to be group-sparse on a 2-D map of the experts (Kang et al.,
"Mixture of Group Experts for Learning Invariant Representations", arXiv 2504.09265).

Reading order: the router, the experts, the MoGE block, the shared model machinery (routing losses, outputs), then
the GPT-2 models and the ViT models. The models subclass transformers' GPT-2 and ViT classes and swap only the MLP of
the layers in `config.moe_layers`; everything else (attention implementations, caches, gradient checkpointing,
weight init, embedding resizing) is transformers'.
"""

import dataclasses
import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPooling,
    CausalLMOutputWithCrossAttentions,
    ImageClassifierOutput,
    SequenceClassifierOutputWithPast,
)
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
)
from transformers.models.vit.modeling_vit import ViTForImageClassification, ViTModel, ViTPreTrainedModel
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .configuration_moge import MOGE_FIELDS, ROUTING_OUTPUTS, GPT2MoGEConfig, ViTMoGEConfig
from .losses import (
    dispatch_counts,
)
from .moge_layer import (
    GroupSparsityRegularizer,
    MoGEExperts,
    MoGERouter,
    MoGERouting,
    MoGESparseMoeBlock,
    _as_bool,
    set_moge_sigma,
    trains_up_to,
)
from .triton_experts import SUPPORTED_ACTIVATIONS as TRITON_ACTIVATIONS
from .triton_experts import is_available as triton_experts_available
from .triton_experts import triton_experts_forward
from .upcycling import upcycle_from_dense


logger = logging.get_logger(__name__)

# moge_hf's fused Triton experts, chosen with `experts_implementation="moge_triton"` (GPU, eager mode).
ALL_EXPERTS_FUNCTIONS.register("moge_triton", triton_experts_forward)
# What MoGE experts (non-gated, with biases) can run among the built-in kernels: transformers' others (sonicmoe,
# deepgemm, ...) need gated experts and are refused. Kernels a user registers in `ExpertsInterface` are let through.
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "moge_triton")

__all__ = [
    "GPT2MoGEForSequenceClassification",
    "GPT2MoGELMHeadModel",
    "GPT2MoGEModel",
    "GPT2MoGEPreTrainedModel",
    "MoGEExperts",
    "MoGERouter",
    "MoGESparseMoeBlock",
    "ViTMoGEForImageClassification",
    "ViTMoGEModel",
    "ViTMoGEPreTrainedModel",
]


def _data_parallel_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


# ------------------------------------------------------------------------------------------------------------------
# Shared model machinery
# ------------------------------------------------------------------------------------------------------------------

ROUTING_LOSS_NAMES = ROUTING_OUTPUTS[1:]  # ("aux_loss", "moge_loss", "z_loss")


class MoGEModelMixin:
    """What every MoGE model has on top of its dense parent: its MoGE blocks, sigma, routing losses."""

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # Our experts carry `@use_experts_implementation`. transformers caches its source-text check on the class,
        # and a dense parent class (e.g. GPT2Model) may hold a cached `False` that we would otherwise inherit.
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # The default is moge_hf's own experts forward ("eager"), which picks the fastest correct path per device
        # (see `MoGEExperts.forward`); transformers would default to `grouped_mm`, slower on CPU.
        if requested_experts is None:
            return "eager"
        built_in = requested_experts in ALL_EXPERTS_FUNCTIONS and ALL_EXPERTS_FUNCTIONS[
            requested_experts
        ].__module__.startswith("transformers.")
        if built_in and requested_experts not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation={requested_experts!r} cannot run MoGE experts (non-gated MLPs with biases); "
                f"choose one of {EXPERTS_IMPLEMENTATIONS}"
            )
        activation = getattr(self.config, "activation_function", None) or getattr(self.config, "hidden_act", None)
        if requested_experts == "moge_triton" and activation not in TRITON_ACTIVATIONS:
            raise ValueError(
                f'experts_implementation="moge_triton" fuses only the activations {sorted(TRITON_ACTIVATIONS)}, and '
                f'this model uses {activation!r}; use "eager" or "grouped_mm"'
            )
        if requested_experts == "moge_triton" and not triton_experts_available():
            raise ValueError(
                'experts_implementation="moge_triton" needs triton and a CUDA GPU; use "grouped_mm" or "eager"'
            )
        implementation = super().get_correct_experts_implementation(requested_experts)
        # `grouped_mm` needs 16-byte aligned strides: expert sizes that are multiples of 8 elements (bf16) suffice.
        sizes = (self.config.hidden_size, self.config.expert_intermediate_size or self.config.dense_intermediate_size)
        if implementation == "grouped_mm" and any(size % 8 for size in sizes):
            raise ValueError(
                f'experts_implementation="grouped_mm" needs hidden and expert sizes that are multiples of 8, got '
                f'{sizes}; use experts_implementation="eager" or "batched_mm"'
            )
        return implementation

    def moge_blocks(self) -> list[MoGESparseMoeBlock]:
        """The MoGE blocks of the model, in layer order."""
        return [module for module in self.modules() if isinstance(module, MoGESparseMoeBlock)]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; the saved `auto_map` names every Auto class of the model family, so
        that the folder loads with `trust_remote_code=True` through any of them (e.g. `AutoModel` on an LM)."""
        self._check_config_matches_modules()
        module = type(self).__module__.rsplit(".", 1)[-1]
        family = {name: f"{module}.{cls.__name__}" for name, cls in AUTO_MODEL_CLASSES[self.config.model_type].items()}
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **family}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_dense(cls, dense_model_or_path, *, expert_noise_std: float = 0.0, **config_overrides):
        """Sparse upcycling: a MoGE model whose experts all start as copies of the dense model's MLP of their layer.

        Args:
            dense_model_or_path (`PreTrainedModel` or `str`):
                A dense transformers model of the matching architecture (e.g. `GPT2LMHeadModel` for
                `GPT2MoGELMHeadModel`, `ViTForImageClassification` for `ViTMoGEForImageClassification`), or a local
                folder or Hub id holding one.
            expert_noise_std (`float`, *optional*, defaults to 0.0):
                Standard deviation of Gaussian noise added to each expert copy, relative to the weights' std.
            config_overrides:
                MoGE config fields (`num_experts`, `moe_layers`, `moge_loss_coef`, ...) for the new model.

        With `expert_noise_std=0` and renormalized top-k gate weights, the upcycled model computes what the dense one
        does.
        """
        return upcycle_from_dense(cls, dense_model_or_path, expert_noise_std=expert_noise_std, **config_overrides)

    def set_moge_sigma(self, sigma: float) -> None:
        """Set the Gaussian sigma of every MoGE layer and `config.moge_sigma` (what a sigma schedule calls)."""
        set_moge_sigma(self, sigma)

    def _init_moge_weights(self, module: nn.Module, down_proj_std: float) -> None:
        std = self.config.initializer_range
        if isinstance(module, MoGEExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.normal_(module.down_proj, mean=0.0, std=down_proj_std)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, MoGERouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, GroupSparsityRegularizer):
            module.reset_buffers()  # not in the checkpoint: from_pretrained leaves the buffers empty

    def _swap_mlps(self, layers: nn.ModuleList, mlp_name: str, activation: str, dropout: float) -> None:
        """Replace the dense MLP `layers[i].<mlp_name>` of every layer in `config.moe_layers` by a MoGE block."""
        config = self.config
        config.validate_moge_fields()  # fields set one by one since the config was built are checked together here
        intermediate_size = config.expert_intermediate_size or config.dense_intermediate_size
        for index in config.moe_layers:
            block = MoGESparseMoeBlock(config, config.hidden_size, intermediate_size, activation, dropout)
            block.layer_index = index
            setattr(layers[index], mlp_name, block)

    def _check_config_matches_modules(self, blocks: list[MoGESparseMoeBlock] | None = None) -> None:
        """Raise if a MoGE field of `config` changed after the model was built: the MoGE layers read their settings
        when they are built, so they would keep the old value while `save_pretrained` wrote the new one (the reloaded
        model would be another model). The loss weights (`moge_loss_coef`, `router_aux_loss_coef`, ...) and
        `output_router_logits` are read at every forward and may change at any time."""
        blocks = self.moge_blocks() if blocks is None else blocks
        if not blocks:
            return
        config, router, regularizer = self.config, blocks[0].router, blocks[0].regularizer
        try:
            map_shape = config.moge_resolved_map_shape
        except ValueError:
            map_shape = config.moge_map_shape
        built = {  # field: (what the modules use, what the config says)
            "moe_layers": ([block.layer_index for block in blocks], sorted(config.moe_layers)),
            "num_experts": (router.num_experts, config.num_experts),
            "num_experts_per_tok": (router.top_k, config.num_experts_per_tok),
            "norm_topk_prob": (router.norm_topk_prob, config.moge_norm_topk_prob),
            "router_jitter_noise": (router.jitter_noise, config.router_jitter_noise),
            "expert_intermediate_size": (
                blocks[0].experts.intermediate_dim,
                config.expert_intermediate_size or config.dense_intermediate_size,
            ),
            "moge_map_shape": (tuple(regularizer.map_shape), tuple(map_shape or ())),
            "moge_window": (regularizer.window, config.moge_window),
            "moge_padding": (regularizer.padding, config.moge_padding),
            "moge_reduction": (regularizer.reduction, config.moge_reduction),
            "moge_sigma": (regularizer.sigma, config.moge_sigma),
        }
        for name, (used, configured) in built.items():
            if used != configured:
                if name == "moge_sigma":
                    fix = "use model.set_moge_sigma(value)"
                elif MOGE_FIELDS[name].metadata["changes_shapes"]:
                    fix = f"it changes weight shapes: set it back to {used!r}, or build a new model with the new value"
                else:
                    fix = f"build the model with it instead, e.g. from_pretrained(path, {name}=...)"
                raise ValueError(
                    f"config.{name} was set to {getattr(config, name)!r} after the model was built with {used!r}: "
                    f"the model would keep {used!r} and save {getattr(config, name)!r}; {fix}"
                )

    def _forward_with_routing(self, forward, token_mask: torch.Tensor | None, output_router_logits: bool | None):
        """Run `forward()` while recording every MoGE block's routing; return its output and the routing fields."""
        blocks = self.moge_blocks()
        if not torch.compiler.is_compiling():
            self._check_config_matches_modules(blocks)
        records: list[MoGERouting] = []
        for block in blocks:
            block.routing_sink = records
        try:
            outputs = forward()
        finally:
            for block in blocks:
                block.routing_sink = None
        if len(records) != len(blocks):
            raise RuntimeError(f"expected routing from {len(blocks)} MoGE layers, got {len(records)}")
        if not torch.compiler.is_compiling():
            self._check_router_logits_finite(records)
        if token_mask is not None:
            token_mask = token_mask.reshape(-1).to(torch.float32)
        fractions = [None] * len(records)
        if self.config.router_aux_loss_global and self.training and _data_parallel_world_size() > 1:
            fractions = self._global_dispatch_fractions(records, token_mask)
        coefs = {
            "aux_loss": self.config.router_aux_loss_coef,
            "moge_loss": self.config.moge_loss_coef,
            "z_loss": self.config.router_z_loss_coef,
        }
        differentiable = frozenset(name for name in ROUTING_LOSS_NAMES if coefs[name])
        if differentiable and torch.is_grad_enabled() and self.training:
            self._check_routing_has_graph(blocks, records)
        per_layer = [
            block.routing_losses(routing, token_mask, fraction, differentiable)
            for block, routing, fraction in zip(blocks, records, fractions)
        ]
        fields = {name: torch.stack([losses[name] for losses in per_layer]).mean() for name in ROUTING_LOSS_NAMES}
        if output_router_logits if output_router_logits is not None else self.config.output_router_logits:
            fields["router_logits"] = tuple(routing.logits for routing in records)
        return outputs, fields

    def _check_routing_has_graph(self, blocks: list[MoGESparseMoeBlock], records: list[MoGERouting]) -> None:
        """Raise if a router's probabilities carry no autograd graph although something they depend on trains (the
        router itself, or any trainable weight before it, e.g. LoRA adapters of a frozen model): the routing losses
        would then train nothing, silently. Reentrant activation checkpointing does that (the layer's first forward
        runs under `no_grad`, and the routing reaches the model by a side channel, not as an output of the
        checkpointed layer)."""
        for block, routing in zip(blocks, records):
            if not routing.probs.requires_grad and trains_up_to(self, block.router):
                raise RuntimeError(
                    "The routing of a MoGE layer carries no gradient in training, so the routing losses (load "
                    "balancing, z-loss, MoGE) would train neither the router nor the trainable weights before it. "
                    "Reentrant activation checkpointing does this: use gradient_checkpointing_kwargs="
                    "{'use_reentrant': False} (transformers' default)."
                )

    def _global_dispatch_fractions(self, records: list[MoGERouting], token_mask: torch.Tensor | None):
        """Per MoGE layer, the `(k, E)` dispatch fractions of the global batch: one all-reduce over all ranks."""
        mask = _as_bool(token_mask)
        per_layer = [dispatch_counts(routing.top_k_index, self.config.num_experts, mask) for routing in records]
        counts = torch.stack([layer_counts for layer_counts, _ in per_layer])  # (L, k, E)
        totals = torch.cat([counts.flatten(), per_layer[0][1].reshape(1)])
        torch.distributed.all_reduce(totals)
        return list((totals[:-1].view_as(counts) / totals[-1].clamp(min=1.0)).unbind(0))

    def _check_router_logits_finite(self, records: list[MoGERouting]) -> None:
        """Raise if a router saw NaN/Inf. On CPU at once; on a GPU without stalling the stream for it: the flags go
        to the host asynchronously and are read by a later forward pass, once the copy is done."""
        finite = torch.stack([torch.isfinite(routing.logits).all() for routing in records])
        if finite.device.type != "cuda":
            self._raise_if_not_finite(finite)
            return
        pending = self.__dict__.setdefault("_pending_finite_checks", [])
        while pending and pending[0][1].query():
            self._raise_if_not_finite(pending.pop(0)[0])
        host = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        pending.append((host, event))

    def _raise_if_not_finite(self, finite: torch.Tensor) -> None:
        if not bool(finite.all()):
            bad = [self.config.moe_layers[i] for i in (~finite).nonzero().flatten().tolist()]
            raise ValueError(
                f"The router of MoGE layer(s) {bad} produced NaN or Inf logits: the hidden states reaching the router "
                "are not finite (check the inputs, the learning rate, or use a wider dtype such as bfloat16/float32)."
            )

    def _weighted_routing_loss(self, outputs) -> torch.Tensor | int:
        """`router_aux_loss_coef * aux + router_z_loss_coef * z + moge_loss_coef * moge`, skipping zero weights."""
        config = self.config
        total = 0
        for coef, loss in (
            (config.router_aux_loss_coef, outputs.aux_loss),
            (config.router_z_loss_coef, outputs.z_loss),
            (config.moge_loss_coef, outputs.moge_loss),
        ):
            if coef:
                total = total + coef * loss
        return total


# The outputs are transformers' own output classes (those of the dense parents) plus the routing fields, appended after
# theirs: transformers' fields, with whatever names the installed release gives them (the KV cache is
# `past_key_values` up to 5.23 and `cache` since 5.24), come from transformers, and `return_dict=False` tuples keep
# the parent's layout followed by the routing fields.
ROUTING_FIELD_DOCS = """
    router_logits (`tuple[torch.Tensor]`, *optional*, returned when `output_router_logits=True`):
        Routing logits `(batch * seq, num_experts)` of every MoGE layer, in layer order.
    aux_loss (`torch.Tensor`): Unscaled load-balancing loss, averaged over the MoGE layers.
    moge_loss (`torch.Tensor`): Unscaled group-sparsity (MoGE) regularizer, averaged over the MoGE layers.
    z_loss (`torch.Tensor`): Unscaled router z-loss, averaged over the MoGE layers.
"""
ROUTING_FIELD_TYPES = {
    "router_logits": tuple[torch.Tensor, ...] | None,
    "aux_loss": torch.Tensor | None,
    "moge_loss": torch.Tensor | None,
    "z_loss": torch.Tensor | None,
}
assert tuple(ROUTING_FIELD_TYPES) == ROUTING_OUTPUTS


def _with_routing_fields(name: str, parent: type[ModelOutput], doc: str) -> type[ModelOutput]:
    """A dataclass `name`: transformers' output class `parent` with the routing fields appended."""
    routing_fields = [(field, kind, dataclasses.field(default=None)) for field, kind in ROUTING_FIELD_TYPES.items()]
    return dataclasses.make_dataclass(
        name, routing_fields, bases=(parent,), namespace={"__module__": __name__, "__doc__": doc + ROUTING_FIELD_DOCS}
    )


MoGEModelOutputWithPast = _with_routing_fields(
    "MoGEModelOutputWithPast",
    BaseModelOutputWithPastAndCrossAttentions,
    "Outputs of [`GPT2MoGEModel`]: those of `GPT2Model`, plus the routing fields.",
)
MoGECausalLMOutputWithPast = _with_routing_fields(
    "MoGECausalLMOutputWithPast",
    CausalLMOutputWithCrossAttentions,
    "Outputs of [`GPT2MoGELMHeadModel`]: those of `GPT2LMHeadModel`, plus the routing fields. `loss` (when `labels` "
    "are given) is the language-modeling loss plus the weighted routing losses.",
)
MoGESequenceClassifierOutputWithPast = _with_routing_fields(
    "MoGESequenceClassifierOutputWithPast",
    SequenceClassifierOutputWithPast,
    "Outputs of [`GPT2MoGEForSequenceClassification`]: those of `GPT2ForSequenceClassification`, plus the routing "
    "fields. `loss` (when `labels` are given) is the classification loss plus the weighted routing losses.",
)
ViTMoGEModelOutput = _with_routing_fields(
    "ViTMoGEModelOutput",
    BaseModelOutputWithPooling,
    "Outputs of [`ViTMoGEModel`]: those of `ViTModel`, plus the routing fields.",
)
ViTMoGEImageClassifierOutput = _with_routing_fields(
    "ViTMoGEImageClassifierOutput",
    ImageClassifierOutput,
    "Outputs of [`ViTMoGEForImageClassification`]: those of `ViTForImageClassification`, plus the routing fields. "
    "`loss` (when `labels` are given) is the classification loss plus the weighted routing losses.",
)


def _passed_through(outputs: ModelOutput, output_class: type[ModelOutput]) -> dict:
    """Every field of `outputs` that `output_class` has too, by name: whatever transformers calls them."""
    shared = (name for name in type(outputs).__dataclass_fields__ if name in output_class.__dataclass_fields__)
    return {name: getattr(outputs, name) for name in shared}


# ------------------------------------------------------------------------------------------------------------------
# GPT-2
# ------------------------------------------------------------------------------------------------------------------


class GPT2MoGEPreTrainedModel(MoGEModelMixin, GPT2PreTrainedModel):
    config_class = GPT2MoGEConfig
    config: GPT2MoGEConfig

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # GPT-2's scaled init of the residual projections (1 / sqrt(2 * n_layer)) applies to the experts too.
        self._init_moge_weights(module, self.config.initializer_range / math.sqrt(2 * self.config.n_layer))


class GPT2MoGEModel(GPT2MoGEPreTrainedModel, GPT2Model):
    """`GPT2Model` whose MLPs in `config.moe_layers` are MoGE layers; returns the routing losses too."""

    def __init__(self, config: GPT2MoGEConfig):
        GPT2Model.__init__(self, config)
        self._swap_mlps(self.h, "mlp", config.activation_function, config.resid_pdrop)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoGEModelOutputWithPast:
        r"""Arguments of `GPT2Model.forward`, plus `output_router_logits` (defaults to `config.output_router_logits`).

        The KV cache, `use_cache` and the other arguments go to `GPT2Model.forward` as given: the cache under the name
        the installed transformers uses (`CACHE_NAME`: `cache` since 5.24, `past_key_values` before). Padding tokens
        (`attention_mask == 0`, given as a 2-D mask) take no part in the routing losses.
        """
        inputs = input_ids if input_ids is not None else inputs_embeds
        if inputs is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        seq_length = inputs.shape[1] if inputs.dim() > 1 else inputs.shape[0]
        # The KV cache, whatever its argument's name (a user may still pass one under a deprecated name).
        cache = next((value for value in kwargs.values() if isinstance(value, Cache)), None)
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_positions(seq_length, past_length, position_ids)
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            expected = (inputs.shape[0] if inputs.dim() > 1 else 1, past_length + seq_length)
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, but the input is {expected[0]} "
                    f"sequence(s) of {seq_length} new token(s) after {past_length} cached: it must be {expected} "
                    "(batch, cached + new tokens)"
                )
            token_mask = attention_mask[:, -seq_length:] != 0  # (B, S): the mask covers cached tokens too

        def run():
            return GPT2Model.forward(
                self,
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                return_dict=True,
                **kwargs,
            )

        outputs, routing = self._forward_with_routing(run, token_mask, output_router_logits)
        return MoGEModelOutputWithPast(**_passed_through(outputs, MoGEModelOutputWithPast), **routing)

    def _check_positions(self, seq_length: int, past_length: int, position_ids: torch.Tensor | None):
        max_positions = self.config.n_positions
        if position_ids is not None:
            if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= max_positions:
                raise ValueError(
                    f"position_ids reach {int(position_ids.max())}, but the model has n_positions={max_positions} "
                    "position embeddings"
                )
            return
        if past_length + seq_length > max_positions:
            raise ValueError(
                f"The sequence is {past_length + seq_length} tokens long ({seq_length} new + {past_length} cached), "
                f"longer than the model's n_positions={max_positions}; truncate the input"
            )


class GPT2MoGELMHeadModel(GPT2MoGEPreTrainedModel, GPT2LMHeadModel):
    """GPT-2 MoGE with a language-modeling head tied to the input embeddings; `generate` works as for GPT-2.

    Example:

    ```python
    >>> import torch
    >>> from moge_hf import GPT2MoGEConfig, GPT2MoGELMHeadModel
    >>> model = GPT2MoGELMHeadModel(GPT2MoGEConfig(n_layer=2, n_embd=64, n_head=4, num_experts=4, moge_window=2))
    >>> ids = torch.randint(0, 100, (2, 16))
    >>> out = model(ids, labels=ids)
    >>> out.loss, out.aux_loss, out.moge_loss
    ```
    """

    def __init__(self, config: GPT2MoGEConfig):
        GPT2PreTrainedModel.__init__(self, config)  # not GPT2LMHeadModel.__init__: it builds a dense GPT2Model
        self.transformer = GPT2MoGEModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoGECausalLMOutputWithPast:
        r"""Arguments of `GPT2LMHeadModel.forward` (the KV cache under `CACHE_NAME`), plus `output_router_logits`.

        With `labels`, `loss` is the shifted language-modeling loss plus `router_aux_loss_coef * aux_loss +
        router_z_loss_coef * z_loss + moge_loss_coef * moge_loss`, in training and in evaluation alike.
        """
        outputs: MoGEModelOutputWithPast = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
            routing_loss = self._weighted_routing_loss(outputs)
            num_items_in_batch = kwargs.get("num_items_in_batch")
            if num_items_in_batch is not None:
                # Trainer divides the LM loss by the label tokens of the whole accumulated (and gathered) batch
                # rather than by gradient-accumulation steps; weighting the per-batch routing losses by this
                # micro-batch's share of those tokens makes them average over the whole batch too. A batch without
                # label tokens (prompt-only examples) weighs 0, as its token loss does: it trains nothing.
                shift_labels = kwargs.get("shift_labels")
                shift_labels = labels[..., 1:] if shift_labels is None else shift_labels
                count = (shift_labels != -100).sum()
                num_items = torch.as_tensor(num_items_in_batch, device=count.device)
                routing_loss = routing_loss * torch.where(num_items > 0, count / num_items.clamp(min=1), 0.0)
            loss = loss + routing_loss

        return MoGECausalLMOutputWithPast(
            loss=loss, logits=logits, **_passed_through(outputs, MoGECausalLMOutputWithPast)
        )


class GPT2MoGEForSequenceClassification(GPT2MoGEPreTrainedModel, GPT2ForSequenceClassification):
    """GPT-2 MoGE with a linear head on the last non-padding token, like `GPT2ForSequenceClassification`."""

    # The classification loss is a mean over the batch, not a sum over `num_items_in_batch`: let Trainer divide it
    # (and the routing losses) by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: GPT2MoGEConfig):
        GPT2PreTrainedModel.__init__(self, config)  # not the parent's __init__: it builds a dense GPT2Model
        self.num_labels = config.num_labels
        self.transformer = GPT2MoGEModel(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoGESequenceClassifierOutputWithPast:
        r"""Arguments of `GPT2ForSequenceClassification.forward`, plus `output_router_logits`.

        With `labels`, `loss` is the classification loss (by `config.problem_type`) plus the weighted routing losses.
        """
        outputs: MoGEModelOutputWithPast = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # (B, S, num_labels)
        batch_size = logits.shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (set config.pad_token_id).")
        if self.config.pad_token_id is None or input_ids is None:
            last_token = -1
        else:
            # The rightmost token that is not padding, for left and right padding alike.
            non_pad = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_token = (positions * non_pad).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]  # (B, num_labels)

        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=pooled_logits, config=self.config)
            loss = loss + self._weighted_routing_loss(outputs)

        return MoGESequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_logits, **_passed_through(outputs, MoGESequenceClassifierOutputWithPast)
        )


# ------------------------------------------------------------------------------------------------------------------
# ViT
# ------------------------------------------------------------------------------------------------------------------


class ViTMoGEPreTrainedModel(MoGEModelMixin, ViTPreTrainedModel):
    config_class = ViTMoGEConfig
    config: ViTMoGEConfig

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        self._init_moge_weights(module, self.config.initializer_range)


class ViTMoGEModel(ViTMoGEPreTrainedModel, ViTModel):
    """`ViTModel` whose MLPs in `config.moe_layers` are MoGE layers; returns the routing losses too."""

    def __init__(self, config: ViTMoGEConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        ViTModel.__init__(self, config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
        # ViTLayer applies the dropout after its MLP, so the MoGE block has none of its own.
        self._swap_mlps(self.layers, "mlp", config.hidden_act, dropout=0.0)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ViTMoGEModelOutput:
        r"""Arguments of `ViTModel.forward`, plus `output_router_logits` (default: `config.output_router_logits`)."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        token_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None

        def run():
            return ViTModel.forward(
                self,
                pixel_values,
                bool_masked_pos=bool_masked_pos,
                interpolate_pos_encoding=interpolate_pos_encoding,
                attention_mask=attention_mask,
                return_dict=True,
                **kwargs,
            )

        outputs, routing = self._forward_with_routing(run, token_mask, output_router_logits)
        return ViTMoGEModelOutput(**_passed_through(outputs, ViTMoGEModelOutput), **routing)


class ViTMoGEForImageClassification(ViTMoGEPreTrainedModel, ViTForImageClassification):
    """ViT MoGE with a linear classifier on the [CLS] token, like `ViTForImageClassification`.

    Example:

    ```python
    >>> import torch
    >>> from moge_hf import ViTMoGEConfig, ViTMoGEForImageClassification
    >>> config = ViTMoGEConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64,
    ...                        num_attention_heads=4, intermediate_size=128, num_experts=4, moge_window=2,
    ...                        num_labels=10)
    >>> model = ViTMoGEForImageClassification(config)
    >>> out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 7]))
    ```
    """

    # The classification loss is a mean over the batch: let Trainer divide it by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: ViTMoGEConfig):
        ViTPreTrainedModel.__init__(self, config)  # not the parent's __init__: it builds a dense ViTModel
        self.num_labels = config.num_labels
        self.vit = ViTMoGEModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ViTMoGEImageClassifierOutput:
        r"""Arguments of `ViTForImageClassification.forward`, plus `output_router_logits`.

        With `labels`, `loss` is the classification loss (by `config.problem_type`) plus the weighted routing losses.
        """
        outputs: ViTMoGEModelOutput = self.vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
            loss = loss + self._weighted_routing_loss(outputs)

        return ViTMoGEImageClassifierOutput(
            loss=loss, logits=logits, **_passed_through(outputs, ViTMoGEImageClassifierOutput)
        )


# The Auto classes each model family registers with (see `moge_hf/__init__.py`) and lists in a saved `auto_map`.
AUTO_MODEL_CLASSES = {
    GPT2MoGEConfig.model_type: {
        "AutoModel": GPT2MoGEModel,
        "AutoModelForCausalLM": GPT2MoGELMHeadModel,
        "AutoModelForSequenceClassification": GPT2MoGEForSequenceClassification,
    },
    ViTMoGEConfig.model_type: {
        "AutoModel": ViTMoGEModel,
        "AutoModelForImageClassification": ViTMoGEForImageClassification,
    },
}
