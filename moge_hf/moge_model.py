"""What every MoGE host model shares: the model mixin (MoGE blocks in place of MLPs, routing losses, sigma, saving,
upcycling), the output classes' routing fields, and the host record (`MoGEHost`) that registration, upcycling and the
Hub code loop over.

A host is a transformers model family whose MLPs become MoGE layers: `modeling_gpt2_moge.py` and
`modeling_vit_moge.py`, each ending with its `MoGEHost` record. The MoGE layer itself is in `moge_layer.py`; the
routing reaches the losses through the model's routing recorder (`routing.py`).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.dynamic_module_utils import custom_object_save
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_moge import MOGE_FIELDS, ROUTING_OUTPUTS
from .losses import dispatch_counts
from .moge_layer import (
    ROUTING_LOSSES,
    GroupSparsityRegularizer,
    MoGEExperts,
    MoGERouter,
    MoGERouting,
    MoGESparseMoeBlock,
    _as_bool,
    routing_losses,
    set_moge_sigma,
    trains_up_to,
)
from .routing import attach_routing_recorder, routing_recorder
from .triton_experts import SUPPORTED_ACTIVATIONS as TRITON_ACTIVATIONS
from .triton_experts import is_available as triton_experts_available
from .triton_experts import triton_experts_forward
from .upcycling import upcycle_from_dense


logger = logging.get_logger(__name__)

# moge_hf's fused Triton experts, chosen with `experts_implementation="moge_triton"` (GPU, eager mode).
ALL_EXPERTS_FUNCTIONS.register("moge_triton", triton_experts_forward)
# What MoGE experts can run among the built-in kernels (kernels a user registers in `ExpertsInterface` are let
# through): those of the experts variant every host uses today.
EXPERTS_IMPLEMENTATIONS = MoGEExperts.IMPLEMENTATIONS

__all__ = [
    "EXPERTS_IMPLEMENTATIONS",
    "HOSTS",
    "HostCard",
    "IMAGE_CARD_PREPROCESSING",
    "IMAGE_CARD_SNIPPET",
    "MoGEHead",
    "MoGEHost",
    "MoGEMLP",
    "MoGEModelMixin",
    "host_for",
    "host_of",
    "hosts_with",
    "register_host",
]


def _data_parallel_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


# ------------------------------------------------------------------------------------------------------------------
# Shared model machinery
# ------------------------------------------------------------------------------------------------------------------


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
        mlp = host_of(type(self)).mlp
        allowed = mlp.experts_class.IMPLEMENTATIONS
        built_in = requested_experts in ALL_EXPERTS_FUNCTIONS and ALL_EXPERTS_FUNCTIONS[
            requested_experts
        ].__module__.startswith("transformers.")
        if built_in and requested_experts not in allowed:
            raise ValueError(
                f"experts_implementation={requested_experts!r} cannot run MoGE experts of this model "
                f"({mlp.experts_class.__name__}); choose one of {allowed}"
            )
        activation = getattr(self.config, mlp.activation)
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
        if implementation == "grouped_mm":
            self._check_grouped_mm_sizes()
        return implementation

    def _check_grouped_mm_sizes(self) -> None:
        """`grouped_mm` needs 16-byte aligned strides: expert sizes that are multiples of 8 elements (bf16) suffice.
        Checked on the built MoGE blocks, each with its own sizes (a hierarchical model's widen from stage to stage).
        A head model's `__init__` asks before its base model exists: the base model's `_build` checks its blocks."""
        experts = [block.experts for block in self.moge_blocks()]
        sizes = sorted({size for module in experts for size in (module.hidden_dim, module.intermediate_dim)})
        if any(size % 8 for size in sizes):
            raise ValueError(
                f'experts_implementation="grouped_mm" needs hidden and expert sizes that are multiples of 8, got '
                f'{sizes}; use experts_implementation="eager" or "batched_mm"'
            )

    def moge_blocks(self) -> list[MoGESparseMoeBlock]:
        """The MoGE blocks of the model, in layer order."""
        return [module for module in self.modules() if isinstance(module, MoGESparseMoeBlock)]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; the saved `auto_map` names every Auto class of the model family, so
        that the folder loads with `trust_remote_code=True` through any of them (e.g. `AutoModel` on an LM)."""
        self._check_config_matches_modules()
        # The class whose file holds the model's code: FSDP2 (transformers' distributed engine) turns the model into an
        # instance of a subclass it makes at run time, in torch's module; its code is still the MoGE class's.
        code_class = next(klass for klass in type(self).__mro__ if not klass.__module__.startswith("torch."))
        module = code_class.__module__.rsplit(".", 1)[-1]
        family = {name: f"{module}.{head.model_class.__name__}" for name, head in host_of(code_class).heads.items()}
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **family}
        if code_class is type(self):
            return super().save_pretrained(save_directory, *args, **kwargs)
        # transformers would copy the wrapper's module (torch's FSDP files) and map the Auto class to the wrapper: save
        # without that step (`is_remote_code` answers for it), then write the MoGE class's code files (each process
        # writes the same bytes).
        self.is_remote_code = lambda: False
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del self.is_remote_code
        if code_class.is_remote_code():
            custom_object_save(code_class, save_directory)
        return result

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; with `distributed_config=DistributedConfig(...)`, transformers'
        distributed engine shards the model by the config's plans (`base_model_ep_plan`, `base_model_fsdp_plan`): see
        the README, "Several GPUs". A layout it would train wrongly is refused."""
        loaded = super().from_pretrained(*args, **kwargs)  # the model, or (model, loading info)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._check_distributed_layout(cls.__name__)
        return loaded

    def _check_distributed_layout(self, name: str) -> None:
        distributed = getattr(self.config, "distributed_config", None)
        data_parallel = getattr(distributed, "dp_size", None) or getattr(distributed, "fsdp_size", None) or 1
        tied = getattr(self.config, "tie_word_embeddings", False) and getattr(self, "_tied_weights_keys", None)
        if data_parallel > 1 and tied:
            import transformers

            raise ValueError(
                f"{name} ties its output to its input embeddings, and FSDP2 sharding by transformers' "
                f"distributed engine (fsdp_size={data_parallel}, which expert parallelism needs too) does not keep "
                f"them tied in transformers {transformers.__version__}: from the second optimizer step the head "
                "computes with a stale copy of the embeddings (a tied Qwen3-MoE shows the same). Train a model with "
                "untied embeddings: `model.untie_word_embeddings()` before saving the model to shard (the head "
                "starts as a copy of the embeddings), or `tie_word_embeddings=False` when building it; or use DDP."
            )

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

    def untie_word_embeddings(self):
        """Give the output embeddings (the LM head) their own copy of the input embeddings' weights, in place, and set
        `config.tie_word_embeddings = False`; return the model. The model computes what it computed; from here on the
        two train apart, and `save_pretrained` writes both. A no-op when they are not tied.

        FSDP2 sharding by transformers' distributed engine (`DistributedConfig(fsdp_size=...)`, which expert
        parallelism needs too) needs it: it does not keep tied weights tied (see `from_pretrained`)."""
        output, embeddings = self.get_output_embeddings(), self.get_input_embeddings()
        if output is None or output.weight is not embeddings.weight:
            return self
        weight = embeddings.weight
        output.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.config.tie_word_embeddings = False
        return self

    def set_moge_sigma(self, sigma: float) -> None:
        """Set the Gaussian sigma of every MoGE layer and `config.moge_sigma` (what a sigma schedule calls)."""
        set_moge_sigma(self, sigma)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The dense parent's init, then the MoGE modules': expert weights as the dense MLP's projections (normal,
        std `initializer_range`; the down projection with the record's `residual_std`), biases zero, the router
        normal, the regularizer's buffers rebuilt."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoGEExperts):
            mlp = host_of(type(self)).mlp
            down_std = std if mlp.residual_std is None else mlp.residual_std(self.config)
            for name, (projection, part) in module.DENSE_WEIGHTS.items():
                if part == "bias":
                    init.zeros_(getattr(module, name))
                else:
                    init.normal_(getattr(module, name), mean=0.0, std=down_std if projection == "down_proj" else std)
        elif isinstance(module, MoGERouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, GroupSparsityRegularizer):
            module.reset_buffers()  # not in the checkpoint: from_pretrained leaves the buffers empty

    def _build(self, dense_class: type[PreTrainedModel], config, **kwargs) -> None:
        """What a host's base model does in `__init__`: build the dense model (`dense_class.__init__(self, config,
        **kwargs)`), put MoGE blocks in place of its MLPs (`_swap_mlps`), and `post_init`. The experts implementation
        the config asks for is checked once the MoGE blocks exist: a model nested in the dense one (Swin's encoder,
        itself a `PreTrainedModel`) would refuse it in its own `__init__`, having no experts of its own."""
        requested = config._experts_implementation_internal
        config._experts_implementation_internal = None
        try:
            dense_class.__init__(self, config, **kwargs)
        finally:
            config._experts_implementation_internal = requested
        self._swap_mlps()
        config._experts_implementation_internal = self._check_and_adjust_experts_implementation(requested)
        self.post_init()

    def _swap_mlps(self) -> None:
        """Replace the dense MLP of every layer in `config.moe_layers` by a MoGE block, where the host record's
        `MoGEMLP` says it sits; each block's experts have the size of the MLP they replace (or
        `expert_intermediate_size`), where the host record's `MoGEMLP` says they sit (see `_build`)."""
        config = self.config
        config.validate_moge_fields()  # fields set one by one since the config was built are checked together here
        mlp = host_of(type(self)).mlp
        layers = mlp.layer_modules(self)
        if max(config.moe_layers) >= len(layers):
            raise ValueError(f"moe_layers={config.moe_layers} names a layer past the model's {len(layers)} layers")
        activation = getattr(config, mlp.activation)
        dropout = getattr(config, mlp.dropout) if mlp.dropout else 0.0
        for index in config.moe_layers:
            where = f"layer {index}'s MLP ({mlp.layers.replace('*', '<i>')}.{mlp.module})"
            intermediate, hidden = mlp.dense_weights(getattr(layers[index], mlp.module), where)["up_proj"].shape
            block = MoGESparseMoeBlock(
                config,
                hidden,
                config.expert_intermediate_size or intermediate,
                activation,
                dropout,
                experts_class=mlp.experts_class,
            )
            block.layer_index = index
            block.dense_intermediate_size = intermediate
            setattr(layers[index], mlp.module, block)
        # A model nested in this one (Swin's encoder is a `SwinPreTrainedModel`): transformers initializes it with its
        # own `_init_weights`, which does not know the MoGE modules (it gets this model's), and its `post_init` took
        # the config's base-model plans for itself, which this model's `post_init` would add again under its prefix
        # (rules that match nothing): the plans are this model's alone.
        for module in self.modules():
            if (
                module is not self
                and isinstance(module, PreTrainedModel)
                and any(isinstance(child, MoGESparseMoeBlock) for child in module.modules())
            ):
                module._init_weights = self._init_weights
                for plan in ("_tp_plan", "_ep_plan", "_pp_plan", "_fsdp_plan"):
                    if getattr(module, plan, None):
                        setattr(module, plan, {})
        attach_routing_recorder(self)

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
                [block.experts.intermediate_dim for block in blocks],
                [config.expert_intermediate_size or block.dense_intermediate_size for block in blocks],
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

    def _moge_forward(
        self,
        dense_forward: Callable,
        output_class: type[ModelOutput],
        *args,
        attention_mask: torch.Tensor | None = None,
        new_tokens: tuple[int, int] | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ModelOutput:
        """The forward of a host's base model: `dense_forward` (the dense base model's `forward`, e.g.
        `GPT2Model.forward`) run on `self` with the other arguments while the routing is recorded; its outputs plus
        the routing fields, as `output_class`. Tokens that a 2-D `attention_mask` marks as padding take no part in
        the routing losses; `new_tokens=(batch, seq)` says the input's size where the mask may cover cached tokens
        too (a decoder with a KV cache)."""
        token_mask = self._routing_token_mask(attention_mask, kwargs, new_tokens)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask

        def run():
            return dense_forward(self, *args, return_dict=True, **kwargs)

        outputs, routing = self._forward_with_routing(run, token_mask, output_router_logits)
        return output_class(**_passed_through(outputs, output_class), **routing)

    @staticmethod
    def _cached_length(kwargs: Mapping[str, Any]) -> int:
        """The number of tokens in the KV cache among the forward's arguments, whatever its argument's name
        (`cache` since transformers 5.24, `past_key_values` before; a user may still pass a deprecated name)."""
        cache = next((value for value in kwargs.values() if isinstance(value, Cache)), None)
        return cache.get_seq_length() if cache is not None else 0

    def _routing_token_mask(
        self, attention_mask: torch.Tensor | None, kwargs: Mapping[str, Any], new_tokens: tuple[int, int] | None
    ) -> torch.Tensor | None:
        """The `(batch, tokens)` bool mask of the tokens the routing losses count, from a 2-D attention mask (0:
        padding); None without one. With `new_tokens=(batch, seq)`, the mask covers the cached tokens too: its shape
        is checked and its last `seq` columns are the input's."""
        if attention_mask is None or attention_mask.dim() != 2:
            return None
        if new_tokens is None:
            return attention_mask != 0
        batch, seq = new_tokens
        past = self._cached_length(kwargs)
        if tuple(attention_mask.shape) != (batch, past + seq):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, but the input is {batch} sequence(s) of "
                f"{seq} new token(s) after {past} cached: it must be {(batch, past + seq)} (batch, cached + new "
                "tokens)"
            )
        return attention_mask[:, -seq:] != 0

    def _forward_with_routing(self, forward, token_mask: torch.Tensor | None, output_router_logits: bool | None):
        """Run `forward()` while the model's routing recorder records every MoGE layer's routing; return its output and
        the routing fields (the routing losses, and the router logits if asked for)."""
        blocks = self.moge_blocks()
        if not torch.compiler.is_compiling():
            self._check_config_matches_modules(blocks)
        recorder = routing_recorder(self)  # the base model's own: found without a walk over the modules
        token_mask = None if token_mask is None else token_mask.reshape(-1)
        # A forward of the model run inside this one (a hook that calls the model) records apart: its own `begin`.
        recorded = recorder.begin(self.training, None if token_mask is None else token_mask.bool())
        try:
            outputs = forward()
        except BaseException:
            recorder.abort(recorded)
            raise
        records = [record.output for record in recorder.end(recorded)]
        if len(records) != len(blocks):
            raise RuntimeError(f"expected routing from {len(blocks)} MoGE layers, got {len(records)}")
        if not torch.compiler.is_compiling():
            self._check_router_logits_finite(records)
        if token_mask is not None:
            token_mask = token_mask.to(torch.float32)
        fractions = [None] * len(records)
        # The global batch's statistics only where the loss can reach a gradient (a training step, run by every rank):
        # a `no_grad` or evaluation forward (one rank printing samples, `generate`) must not wait for the others.
        if (
            self.config.router_aux_loss_global
            and self.training
            and torch.is_grad_enabled()
            and _data_parallel_world_size() > 1
        ):
            fractions = self._global_dispatch_fractions(records, token_mask)
        coefs = {
            "aux_loss": self.config.router_aux_loss_coef,
            "moge_loss": self.config.moge_loss_coef,
            "z_loss": self.config.router_z_loss_coef,
        }
        differentiable = frozenset(name for name in ROUTING_LOSSES if coefs[name])
        if differentiable and torch.is_grad_enabled() and self.training:
            self._check_routing_has_graph(blocks, records)
        per_layer = [
            routing_losses(routing, block.regularizer, token_mask, fraction, differentiable)
            for block, routing, fraction in zip(blocks, records, fractions)
        ]
        fields = {name: torch.stack([losses[name] for losses in per_layer]).mean() for name in ROUTING_LOSSES}
        if output_router_logits if output_router_logits is not None else self.config.output_router_logits:
            fields["router_logits"] = tuple(routing.logits for routing in records)
        return outputs, fields

    def _check_routing_has_graph(self, blocks: list[MoGESparseMoeBlock], records: list[MoGERouting]) -> None:
        """Raise if a router's probabilities carry no autograd graph although something they depend on trains (the
        router itself, or any trainable weight before it, e.g. LoRA adapters of a frozen model): the routing losses
        would then train nothing, silently. Reentrant activation checkpointing does that (the layer's first forward
        runs under `no_grad`, and the routing reaches the model through the recorder, not as an output of the
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
        """Per MoGE layer, the `(k, E)` dispatch fractions of the global batch: one all-reduce over all ranks. Each
        layer's own token count (a hierarchical model's later stages route fewer tokens than its first)."""
        mask = _as_bool(token_mask)
        per_layer = [dispatch_counts(routing.top_k_index, self.config.num_experts, mask) for routing in records]
        counts = torch.stack([layer_counts for layer_counts, _ in per_layer])  # (L, k, E)
        tokens = torch.stack([layer_tokens for _, layer_tokens in per_layer])  # (L,)
        totals = torch.cat([counts.flatten(), tokens])
        torch.distributed.all_reduce(totals)
        counts, tokens = totals[: counts.numel()].view_as(counts), totals[counts.numel() :]
        return list((counts / tokens.clamp(min=1.0)[:, None, None]).unbind(0))

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
            bad = [sorted(self.config.moe_layers)[i] for i in (~finite).nonzero().flatten().tolist()]
            raise ValueError(
                f"The router of MoGE layer(s) {bad} produced NaN or Inf logits: the hidden states reaching the router "
                "are not finite (check the inputs, the learning rate, or use a wider dtype such as bfloat16/float32)."
            )

    def _add_routing_losses(self, loss: torch.Tensor, outputs, labels: torch.Tensor, kwargs: Mapping[str, Any]):
        """`loss` (the head's task loss) plus the weighted routing losses of `outputs`.

        With `num_items_in_batch` (Trainer passes it to a model that accepts loss kwargs, a causal LM, and divides the
        token loss by the label tokens of the whole accumulated and gathered batch rather than by the accumulation
        steps), the routing losses are weighted by this micro-batch's share of those label tokens, so that they too
        average over the whole batch. A batch without label tokens (prompt-only examples) weighs 0, as its token
        loss does."""
        routing_loss = self._weighted_routing_loss(outputs)
        num_items_in_batch = kwargs.get("num_items_in_batch")
        if num_items_in_batch is not None:
            counted = kwargs.get("shift_labels")
            if counted is None:
                counted = labels[..., 1:] if head_of(type(self)).kind == "causal-lm" else labels
            count = (counted != -100).sum()
            num_items = torch.as_tensor(num_items_in_batch, device=count.device)
            routing_loss = routing_loss * torch.where(num_items > 0, count / num_items.clamp(min=1), 0.0)
        return loss + routing_loss

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


def _with_routing_fields(name: str, parent: type[ModelOutput], doc: str, module: str) -> type[ModelOutput]:
    """A dataclass `name`: transformers' output class `parent` with the routing fields appended, defined in `module`
    (the host's modeling file: where pickle looks for it)."""
    routing_fields = [(field, kind, dataclasses.field(default=None)) for field, kind in ROUTING_FIELD_TYPES.items()]
    return dataclasses.make_dataclass(
        name, routing_fields, bases=(parent,), namespace={"__module__": module, "__doc__": doc + ROUTING_FIELD_DOCS}
    )


def _passed_through(outputs: ModelOutput, output_class: type[ModelOutput]) -> dict:
    """Every field of `outputs` that `output_class` has too, by name: whatever transformers calls them."""
    shared = (name for name in type(outputs).__dataclass_fields__ if name in output_class.__dataclass_fields__)
    return {name: getattr(outputs, name) for name in shared}


# ------------------------------------------------------------------------------------------------------------------
# Host records
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostCard:
    """What the model card of a host family says of that family: the parts of the one card template
    (`moge_hf/model_cards/model_card.md`) that differ from family to family.

    The text fields are jinja fragments (they may be indented: they are dedented first), rendered with the variables
    of the card itself: `host` (the [`MoGEHost`]), `head` (the model's [`MoGEHead`]), `config` (the model's config as
    a dict), `model` (the facts of the saved model: `model.repo_id`, `model.auto_class`, `model.has_processor`, ...),
    `moge` (its MoGE settings), `run` (what the run trained and evaluated on), `results` and `package`. A variable
    that does not exist is an error. See `moge_hf.hub.render_model_card`.
    """

    tag: str  # the family's Hub tag, e.g. "gpt2"
    rows: Callable[[Mapping[str, Any]], list[tuple[str, Any]]]  # config dict -> the architecture rows (name, value)
    intro: str  # how the card's first sentence names the architecture, e.g. "Vision Transformer (ViT)"
    tokens: str  # what a token routed to the experts is, e.g. "each image patch and the [CLS] token"
    snippet: str  # the Python code of "How to use", per head (`head.kind`), loading `model.repo_id`
    preprocessing: str  # what to do when the repo holds no tokenizer / image processor (`model.has_processor` false)
    limitations: str  # the family's items (markdown list items) of the card's limitations


# The card parts of the image hosts whose images a `ViTImageProcessor` prepares (ViT, Swin): the usage code per head,
# and what to do when the repo holds no processor file.
IMAGE_CARD_SNIPPET = """
                from PIL import Image
                from transformers import {{ model.auto_class }}, ViTImageProcessor
                {%- if head.kind != "base" %}, pipeline{% endif %}

                repo_id = "{{ model.repo_id }}"
                image = Image.open("image.png").convert("RGB")

                {% if head.kind == "image-classification" -%}
                classifier = pipeline("image-classification", model=repo_id, trust_remote_code=True)
                print(classifier(image))

                # or step by step
                processor = ViTImageProcessor.from_pretrained(repo_id)  # a standard processor: no remote code
                model = {{ model.auto_class }}.from_pretrained(repo_id, trust_remote_code=True)
                logits = model(**processor(image, return_tensors="pt")).logits
                print(model.config.id2label[logits.argmax(-1).item()])
                {% else -%}
                processor = ViTImageProcessor.from_pretrained(repo_id)  # a standard processor: no remote code
                model = {{ model.auto_class }}.from_pretrained(repo_id, trust_remote_code=True)
                hidden_states = model(**processor(image, return_tensors="pt")).last_hidden_state
                {% endif -%}
                """
IMAGE_CARD_PREPROCESSING = """
                This repository holds no image processor file: resize images to {{ config.image_size }} x
                {{ config.image_size }} and normalize them as in training (for example with a `ViTImageProcessor` of
                that size).
                """


@dataclasses.dataclass(frozen=True)
class MoGEHead:
    """One model class of a host family: the MoGE class, the dense class it subclasses, and what the Hub says of it."""

    model_class: type[PreTrainedModel]  # e.g. GPT2MoGELMHeadModel
    dense_class: type[PreTrainedModel]  # e.g. GPT2LMHeadModel: what `from_dense` upcycles
    pipeline_tag: str  # e.g. "text-generation"
    kind: str  # "causal-lm", "sequence-classification", "image-classification" or "base"
    description: str  # e.g. "causal language model", for the model card


@dataclasses.dataclass(frozen=True)
class MoGEMLP:
    """The dense MLP that a MoGE layer replaces, as the host's dense model builds it: where it sits, its projections,
    its activation. The experts that take its place, their weights' shapes and initialization, sparse upcycling, the
    expert-parallel plan and the kernels that may run them all follow from it."""

    layers: str  # path of the layers in the base model, `*` for each index: "h.*", "encoder.layers.*.blocks.*"
    module: str  # attribute of a layer holding its MLP, which the MoGE block replaces: "mlp"
    up_proj: str  # attribute of the MLP holding its first projection: "c_fc"
    down_proj: str  # attribute of the MLP holding its second projection: "c_proj"
    activation: str  # the config field naming the activation (an `ACT2FN` name): "activation_function"
    dropout: str | None = None  # the config field of the dropout the MLP applies to its output; None: none
    bias: bool = True  # the projections have biases
    gated: bool = False  # a gate projection beside the up projection (SwiGLU MLPs)
    conv1d: bool = False  # weights stored as (in, out), the transpose of `nn.Linear`'s (GPT-2's `Conv1D`)
    # The init std of the down projection (config -> std), where the dense model scales it; None: initializer_range.
    residual_std: Callable[[Any], float] | None = None

    @property
    def experts_class(self) -> type[MoGEExperts]:
        """The experts variant for this MLP."""
        if self.gated or not self.bias:
            raise NotImplementedError(
                f"MoGE experts exist for non-gated MLPs with biases; this MLP is {'gated' if self.gated else ''}"
                f"{' and ' if self.gated and not self.bias else ''}{'without biases' if not self.bias else ''} "
                "(gated transformers models get MoE through their own MoE siblings: `moge_hf.upcycle_to_moe`)"
            )
        return MoGEExperts

    def layer_modules(self, base_model: nn.Module) -> list[nn.Module]:
        """The layers of `base_model` in order: the modules `moe_layers` indexes."""
        modules = [base_model]
        for part in self.layers.split("."):
            modules = (
                [child for module in modules for child in module]
                if part == "*"
                else [getattr(module, part) for module in modules]
            )
        return modules

    def dense_weights(self, mlp: nn.Module, where: str) -> dict[str, torch.Tensor]:
        """The dense MLP's weights under the experts' names, in their `(out, in)` layout (what one expert holds)."""
        weights = {}
        for name, (projection, part) in self.experts_class.DENSE_WEIGHTS.items():
            attribute = getattr(self, projection)
            tensor = getattr(getattr(mlp, attribute, None), part, None)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"{where} is not the dense MLP the host record describes: it has no `{attribute}.{part}` "
                    f"({type(mlp).__name__})"
                )
            weights[name] = tensor.T if self.conv1d and part == "weight" else tensor
        return weights

    def expert_parallel_plan(self) -> dict[str, str]:
        """The expert-parallel plan of transformers' distributed engine (`DistributedConfig(ep_size=...)`): each rank
        holds whole experts (every expert weight split along the expert dimension) and the tokens reach them through
        the engine's dispatch (all-to-all). The router is not in the plan: every rank keeps all of it, so every token
        has its full `(E,)` probabilities for the routing losses."""
        experts = f"{self.layers}.{self.module}.experts"
        weights = self.experts_class.DENSE_WEIGHTS
        return {experts: "ep_dispatch_experts", **{f"{experts}.{name}": "grouped_gemm" for name in weights}}


@dataclasses.dataclass(frozen=True)
class MoGEHost:
    """The facts about one host family that registration, upcycling and the Hub code loop over.

    Each host's modeling file ends with its record, passed to [`register_host`]. The first head must be the base model
    (`AutoModel`).
    """

    config_class: type  # e.g. GPT2MoGEConfig (its `model_type` names the family)
    display_name: str  # e.g. "GPT-2"
    heads: dict[str, MoGEHead]  # Auto class name -> model class, in the order `auto_map` lists them
    dense_model_type: str  # the dense config's `model_type`, e.g. "gpt2"
    mlp: MoGEMLP  # the dense MLP that MoGE layers replace
    # The training scripts: the architecture they build from scratch unless told otherwise (a small model, for
    # 32 x 32 images or short texts), and the config fields their `--dropout` sets.
    small_config: Mapping[str, Any]
    dropout_fields: tuple[str, ...]
    # Optional parts of the base model: `__init__` flag -> the attribute it adds (kept iff the dense model has them).
    optional_base_parts: dict[str, str]
    # The Hub: what the family's model card says of it (its tag, architecture rows and text parts).
    card: HostCard

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def base_class(self) -> type[PreTrainedModel]:
        """The dense base model class (`model.base_model` of every dense head)."""
        return next(iter(self.heads.values())).dense_class

    @property
    def auto_classes(self) -> dict[str, type[PreTrainedModel]]:
        return {name: head.model_class for name, head in self.heads.items()}


# model_type -> record, filled by the modeling files as they are imported.
HOSTS: dict[str, MoGEHost] = {}


def register_host(host: MoGEHost) -> MoGEHost:
    """Add a host's record to `HOSTS` (what `import moge_hf` registers with the Auto classes) and hand it to its
    classes: each MoGE class (and its subclasses) finds it as `moge_host` and its head as `moge_head`, and the config
    class gets the expert-parallel plan of the record's MLP. Return the record."""
    if next(iter(host.heads)) != "AutoModel":
        raise ValueError(f"{host.display_name}: the first head of a MoGEHost must be the base model (AutoModel)")
    for head in host.heads.values():
        head.model_class.moge_host = host
        head.model_class.moge_head = head
    host.config_class.base_model_ep_plan = host.mlp.expert_parallel_plan()
    HOSTS[host.model_type] = host
    return host


def hosts_with(auto_class: str) -> dict[str, MoGEHost]:
    """The hosts that have a model for `auto_class` (e.g. "AutoModelForCausalLM"), by model type."""
    return {model_type: host for model_type, host in HOSTS.items() if auto_class in host.heads}


def host_for(auto_class: str, *, model_type: str | None = None, dense_model_type: str | None = None) -> MoGEHost:
    """The host with a model for `auto_class` whose MoGE `model_type` (e.g. "swin_moge") or dense model type (e.g.
    "swin", what it upcycles from) is the one given; raise a `ValueError` listing the hosts there are."""
    hosts = hosts_with(auto_class)
    for host in hosts.values():
        if model_type is not None and host.model_type == model_type:
            return host
        if dense_model_type is not None and host.dense_model_type == dense_model_type:
            return host
    known = ", ".join(f"{host.model_type} (from {host.dense_model_type})" for host in hosts.values())
    given = f"model type {model_type!r}" if model_type is not None else f"dense model type {dense_model_type!r}"
    raise ValueError(f"No MoGE family with an {auto_class} has the {given}; the families are: {known}")


def host_of(model_class: type) -> MoGEHost:
    """The record of the host family `model_class` (a MoGE model class, or a subclass of one) belongs to."""
    head_of(model_class)  # raises for a class outside the hosts
    return model_class.moge_host


def head_of(model_class: type) -> MoGEHead:
    """The head record of `model_class` (or of the MoGE class it subclasses)."""
    head = getattr(model_class, "moge_head", None)
    if not isinstance(head, MoGEHead):
        raise TypeError(
            f"{getattr(model_class, '__name__', model_class)!r} is not a MoGE model class (one of "
            f"{sorted(head.model_class.__name__ for host in HOSTS.values() for head in host.heads.values())})"
        )
    return head
