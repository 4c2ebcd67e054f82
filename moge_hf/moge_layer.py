"""The MoGE layer, host-agnostic, in the order of a token's path: the router, the experts, the group-sparsity
regularizer of the routing, and the block that replaces a Transformer MLP with them.

A host model (`modeling_gpt2_moge.py`, `modeling_vit_moge.py`) swaps its MLPs for `MoGESparseMoeBlock`s and turns
their routing into losses with `routing_losses`; `GroupSparsityRegularizer` alone regularizes the routers of
transformers' own MoE models (`moge_hf.add_moge_regularizer`).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation

from .losses import (
    MAX_SIGMA,
    PADDINGS,
    REDUCTIONS,
    _group_sparsity_from_matrix,
    load_balancing_loss,
    resolve_map_shape,
    router_z_loss,
    window_layout,
    window_matrix_from_layout,
)


__all__ = [
    "GroupSparsityRegularizer",
    "MoGEExperts",
    "MoGERouter",
    "MoGERouting",
    "MoGESparseMoeBlock",
    "ROUTING_LOSSES",
    "moge_regularizers",
    "routing_losses",
    "set_moge_sigma",
    "trains_up_to",
]


class MoGERouting(NamedTuple):
    """What a MoGE layer's router decided for a batch of `T` tokens."""

    logits: torch.Tensor  # (T, E) routing logits, after jitter noise if any
    clean_logits: torch.Tensor  # (T, E) logits before noise: the input of the group-sparsity regularizer
    probs: torch.Tensor  # (T, E) float32 softmax of `logits`
    top_k_weights: torch.Tensor  # (T, k) float32 gate weights
    top_k_index: torch.Tensor  # (T, k) chosen experts


class MoGERouter(nn.Module):
    """Linear router without bias: hidden states -> one logit per expert, softmax in float32, top-k."""

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.moge_norm_topk_prob
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> MoGERouting:
        clean_logits = F.linear(hidden_states, self.weight)  # (T, E)
        logits = clean_logits
        if self.training and self.jitter_noise > 0:
            # Switch-style multiplicative jitter on the router input; the regularizer keeps the clean logits.
            jitter = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            logits = F.linear(hidden_states * jitter, self.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (T, E)
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # (T, k)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return MoGERouting(logits, clean_logits, probs, top_k_weights, top_k_index)


@use_experts_implementation(has_gate=False, has_bias=True)
class MoGEExperts(nn.Module):
    """`num_experts` non-gated MLPs (up projection, activation, down projection, with biases) as 3-D weights.

    The layout `(num_experts, out, in)` is transformers' own, so `experts_implementation="eager" | "grouped_mm" |
    "batched_mm"` all run these weights, and so does moge_hf's fused Triton kernel, `"moge_triton"` (GPU). This
    `forward`, `"eager"`, is the default. It sorts the `(token, slot)` pairs by expert once and gathers the hidden
    states once; then on CPU every expert that got tokens runs on its contiguous slice (`sliced_forward`), and on a
    GPU (and in CPU training with 32 experts or more) two grouped GEMMs run all experts at once with no host sync
    (`grouped_forward`, sizes that are multiples of 8). The k slots of a token are summed in fp32, deterministically.
    A compiled graph takes transformers' grouped (or batched) GEMM path instead.
    """

    # Each weight, from the dense MLP it replaces: (projection, "weight" or "bias"); the projections are the
    # host record's `up_proj` and `down_proj` (`MoGEMLP`). Initialization, sparse upcycling and the expert-parallel
    # plan read this table.
    DENSE_WEIGHTS = {
        "up_proj": ("up_proj", "weight"),
        "up_proj_bias": ("up_proj", "bias"),
        "down_proj": ("down_proj", "weight"),
        "down_proj_bias": ("down_proj", "bias"),
    }
    # The kernels (`experts_implementation`) that run these weights: transformers' built-in ones that take non-gated
    # experts with biases, and moge_hf's fused Triton kernel. transformers' others (sonicmoe, deepgemm, ...) need
    # gated experts.
    IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "moge_triton")

    def __init__(self, config, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, intermediate_size, hidden_size))
        self.up_proj_bias = nn.Parameter(torch.empty(self.num_experts, intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden_size, intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, hidden_size))
        self.activation = activation  # the ACT2FN name, for kernels that fuse the activation
        # GPT-2's "gelu_new" is the tanh approximation of GELU written out in Python (eight kernels forward, more
        # backward); PyTorch's fused one computes the same function up to float rounding.
        self.act_fn = ACT2FN["gelu_pytorch_tanh" if activation == "gelu_new" else activation]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        aligned = self.hidden_dim % 8 == 0 and self.intermediate_dim % 8 == 0
        if torch.compiler.is_compiling():
            # The sliced path has data-dependent sizes (a graph break). A compiled graph runs the grouped GEMMs:
            # ours where they compute in bf16 (autocast or bf16 weights: PyTorch's grouped GEMM traces only in bf16),
            # else transformers' grouped path (its own traceable fallback for other dtypes), or its batched one
            # where grouped GEMMs cannot run (they need 16-byte aligned strides).
            if aligned and self._compute_dtype(hidden_states) == torch.bfloat16:
                return self.grouped_forward(hidden_states, top_k_index, top_k_weights)
            path = ALL_EXPERTS_FUNCTIONS["grouped_mm" if aligned else "batched_mm"]
            return path(self, hidden_states, top_k_index, top_k_weights)
        if aligned and (hidden_states.is_cuda or (self.num_experts >= 32 and self._needs_grad(hidden_states))):
            # On CPU, slices win the forward; with many experts, the grouped GEMMs' backward (weight gradients written
            # in place) wins training (docs/PERFORMANCE.md).
            return self.grouped_forward(hidden_states, top_k_index, top_k_weights)
        return self.sliced_forward(hidden_states, top_k_index, top_k_weights)

    def _compute_dtype(self, hidden_states: torch.Tensor) -> torch.dtype:
        """The dtype of the expert GEMMs: autocast's where it is on (as for `F.linear`), else the weights'."""
        device_type = hidden_states.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.up_proj.dtype

    def _needs_grad(self, hidden_states: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (hidden_states.requires_grad or self.up_proj.requires_grad)

    def _sort_by_expert(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor):
        """Sort the `(token, slot)` pairs by expert once: the order, the sorted expert ids, the gathered rows."""
        expert_ids = top_k_index.reshape(-1)  # (S,) with S = T * k, one entry per (token, slot) pair
        sorted_ids, order = torch.sort(expert_ids, stable=True)  # (S,) pairs grouped by expert
        return order, sorted_ids, hidden_states[order // top_k_index.shape[1]]  # rows (S, d), gathered once

    @staticmethod
    def _combine(rows: torch.Tensor, order: torch.Tensor, top_k_weights: torch.Tensor, dtype: torch.dtype):
        """Scale the expert-sorted rows `(S, d)` by their gate weights and sum each token's k slots, in fp32."""
        num_tokens, top_k = top_k_weights.shape
        weighted = rows.float() * top_k_weights.reshape(-1)[order, None]  # (S, d)
        combined = torch.empty_like(weighted).index_copy_(0, order, weighted)  # back to (token, slot) order
        return combined.view(num_tokens, top_k, rows.shape[-1]).sum(dim=1).to(dtype)

    def sliced_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """CPU path: every expert that got tokens runs on its contiguous slice of the sorted rows (one host sync)."""
        order, sorted_ids, grouped = self._sort_by_expert(hidden_states, top_k_index)
        counts = torch.bincount(sorted_ids, minlength=self.num_experts).tolist()
        # Unbound once: the backward stacks each weight's gradient once, where indexing `self.up_proj[expert]` would
        # fill and add a whole (E, f, d) gradient per expert.
        weights = (self.up_proj, self.up_proj_bias, self.down_proj, self.down_proj_bias)
        outputs = []
        for rows, up, up_bias, down, down_bias in zip(grouped.split(counts), *(w.unbind(0) for w in weights)):
            if rows.shape[0] > 0:
                outputs.append(F.linear(self.act_fn(F.linear(rows, up, up_bias)), down, down_bias))
        rows = torch.cat(outputs) if outputs else grouped  # no tokens at all: (0, d), still in the autograd graph
        return self._combine(rows, order, top_k_weights, hidden_states.dtype)

    def grouped_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """GPU path: two grouped GEMMs over the sorted rows, no host sync. Needs sizes that are multiples of 8.

        Under autocast the GEMMs run in the autocast dtype, as `F.linear` would (grouped GEMMs are not autocast
        ops: run on fp32 weights they would take PyTorch's slow fp32 fallback).
        """
        device_type = hidden_states.device.type
        dtype = self._compute_dtype(hidden_states)
        order, sorted_ids, grouped = self._sort_by_expert(hidden_states, top_k_index)
        counts = torch.histc(
            sorted_ids.float() if device_type == "cpu" else sorted_ids.int(), self.num_experts, 0, self.num_experts - 1
        )
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # (E,) end of each expert's rows
        up = _grouped_mm(grouped.to(dtype), self.up_proj.to(dtype).transpose(1, 2), offsets)  # (S, f)
        hidden = self.act_fn(up + self.up_proj_bias.to(dtype)[sorted_ids])
        down = _grouped_mm(hidden, self.down_proj.to(dtype).transpose(1, 2), offsets)  # (S, d)
        rows = down + self.down_proj_bias.to(dtype)[sorted_ids]
        return self._combine(rows, order, top_k_weights, hidden_states.dtype)


# PyTorch's grouped GEMM: public as `F.grouped_mm` in newer releases, `torch._grouped_mm` before.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`rows (S, K) @ weights[e] (K, N)` for the rows of each expert `e`, delimited by `offsets`."""
    return _GROUPED_MM(rows, weights, offs=offsets)


class GroupSparsityRegularizer(nn.Module):
    """MoGE's group-sparsity regularizer of one MoE layer's routing (Kang et al., arXiv 2504.09265, eq. 5-6).

    The `E` experts lie on an `r x c` map. For each token, the squared routing probabilities are summed in every
    `h x h` window of the map, weighted by a normalized Gaussian of standard deviation `sigma` around the window's
    centre; the loss is the mean (or, with `reduction="paper"`, the authors' normalized sum) of the square roots of
    those sums. Small when each token's probability mass sits in few neighbouring experts.

    The module owns the map, the window, the padding, the reduction, sigma and the buffers built from them (no
    parameters, no persistent buffers: checkpoints do not change). The buffers are rebuilt from those settings
    whenever the module's tensors get new memory (`to_empty` after a build on the meta device, `.to(...)`), and at
    the first forward if they are still on the meta device. `forward(probs, token_mask)` takes the `(T, E)`
    routing probabilities before any noise and an optional `(T,)` mask of the tokens to count.
    """

    def __init__(
        self,
        num_experts: int,
        map_shape: tuple[int, int] | list[int] | None = None,
        window: int = 3,
        sigma: float = 1.0,
        padding: str = "valid",
        reduction: str = "mean",
    ):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.map_shape = resolve_map_shape(num_experts, map_shape)
        self.num_experts = num_experts
        self.window = window
        self.padding = padding
        self.reduction = reduction
        self.sigma = float(sigma)
        # Where the windows fall on the map (sigma-free, integer buffers so that `.to(dtype)` leaves them exact), and
        # the (E, G) Gaussian window weights built from them; buffers follow the model's device, and a new sigma is
        # applied in place on that device, with no host round trip.
        window_experts, squared_distance = window_layout(self.map_shape, window, padding)
        self.register_buffer("window_experts", window_experts, persistent=False)
        self.register_buffer("window_squared_distance", squared_distance.round().long(), persistent=False)
        self.register_buffer("window_matrix", self.build_window_matrix(self.sigma), persistent=False)

    @classmethod
    def from_config(cls, config, num_experts: int) -> "GroupSparsityRegularizer":
        """The regularizer a config's MoGE fields (`moge_map_shape`, `moge_window`, ...) describe."""
        return cls(
            num_experts,
            config.moge_map_shape,
            config.moge_window,
            config.moge_sigma,
            config.moge_padding,
            config.moge_reduction,
        )

    def extra_repr(self) -> str:
        rows, cols = self.map_shape
        return (
            f"map={rows}x{cols}, window={self.window}, sigma={self.sigma:g}, padding={self.padding!r}, "
            f"reduction={self.reduction!r}"
        )

    def build_window_matrix(self, sigma: float) -> torch.Tensor:
        distance = self.window_squared_distance.to(torch.float32)
        return window_matrix_from_layout(self.window_experts, distance, sigma, self.num_experts)

    def _built_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers' exact contents, derived from the settings alone (map, window, padding, sigma), on the CPU."""
        with torch.device("cpu"):  # whatever device context is active (`with torch.device("meta"):` included)
            window_experts, squared_distance = window_layout(self.map_shape, self.window, self.padding)
            squared_distance = squared_distance.round().long()
            matrix = window_matrix_from_layout(window_experts, squared_distance.float(), self.sigma, self.num_experts)
        return {"window_experts": window_experts, "window_squared_distance": squared_distance, "window_matrix": matrix}

    def reset_buffers(self) -> None:
        """Rebuild the buffers (`from_pretrained` leaves non-persistent buffers uninitialized)."""
        for name, value in self._built_buffers().items():
            init.copy_(getattr(self, name), value)

    @torch.no_grad()
    def rebuild_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuild the buffers from the settings, on `device` (default: where they are). In place where the buffer
        already has the right dtype, on a real device, and can be written (compiled graphs and shared memory keep
        it); else replaced: a buffer on the meta device, or rounded to another dtype (the window weights stay float32,
        rebuilt exactly from the integer layout)."""
        for name, value in self._built_buffers().items():
            current = getattr(self, name)
            target = torch.device(device) if device is not None else current.device
            writable = not current.is_inference() or torch.is_inference_mode_enabled()
            same = current.device == target and current.dtype == value.dtype and current.shape == value.shape
            if same and not current.is_meta and writable:
                current.copy_(value)
            else:
                setattr(self, name, value.to(target))

    def _materialized(self) -> bool:
        """Whether the buffers hold real memory (plain tensors off the meta device), which may be uninitialized."""
        buffers = (self.window_experts, self.window_squared_distance, self.window_matrix)
        return all(type(buffer) is torch.Tensor and not buffer.is_meta for buffer in buffers)

    def _apply(self, fn, recurse=True):
        # The buffers derive from the settings alone, and nothing else restores them: non-persistent, they are in no
        # checkpoint. So whenever the module's tensors get new memory, they are rebuilt: `to_empty` (models built on
        # the meta device, accelerate's `init_empty_weights`, FSDP's meta init) leaves them uninitialized, and
        # `model.to(torch.bfloat16)` would round the window weights (their sums drift off 1; they stay float32, as
        # `from_pretrained(dtype=...)` keeps them). Left alone on the meta device and under fake or subclassed
        # tensors (tracing, sharding), where there is nothing to write.
        super()._apply(fn, recurse)
        if self._materialized():
            self.rebuild_buffers()
        elif self.window_matrix.dtype != torch.float32:
            self.window_matrix = self.build_window_matrix(self.sigma)
        return self

    @torch.no_grad()
    def set_sigma(self, sigma: float) -> None:
        """Set the Gaussian sigma (in place, so compiled graphs stay valid)."""
        self.window_matrix.copy_(self.build_window_matrix(sigma))
        self.sigma = float(sigma)

    def forward(self, probs: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of `(T, E)` routing probabilities; `token_mask` `(T,)` (bool or 0/1) leaves tokens out."""
        if self.window_matrix.is_meta and not probs.is_meta:
            # Built on the meta device and given real memory without `to_empty` or `init_weights` (e.g.
            # `load_state_dict(..., assign=True)`, which leaves non-persistent buffers on the meta device).
            self.rebuild_buffers(probs.device)
        mask = None if token_mask is None else token_mask.reshape(-1).to(torch.float32)
        return _group_sparsity_from_matrix(probs, self.window_matrix, self.window, self.reduction, mask)


def moge_regularizers(model: nn.Module) -> list[GroupSparsityRegularizer]:
    """The group-sparsity regularizers of `model` (a MoGE model, or a transformers MoE model given one by
    `add_moge_regularizer`), in module order."""
    return [module for module in model.modules() if isinstance(module, GroupSparsityRegularizer)]


def set_moge_sigma(model: nn.Module, sigma: float) -> None:
    """Set sigma in every group-sparsity regularizer of `model` and in `model.config.moge_sigma`."""
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 < sigma <= MAX_SIGMA:
        raise ValueError(f"sigma must be a number in (0, {MAX_SIGMA:g}], got {sigma!r}")
    model.config.moge_sigma = float(sigma)  # the check above leaves nothing that can fail below
    for regularizer in moge_regularizers(model):
        regularizer.set_sigma(float(sigma))


def trains_up_to(model: nn.Module, module: nn.Module) -> bool:
    """Whether a parameter of `module`, or one registered before it in `model` (what its output depends on:
    embeddings, earlier layers), is trainable."""
    last = list(module.parameters())[-1:]
    for param in model.parameters():
        if param.requires_grad:
            return True
        if last and param is last[0]:
            return False
    return False


class MoGESparseMoeBlock(nn.Module):
    """A MoGE layer in place of a Transformer MLP: router, experts, and the group-sparsity regularizer of its routing.

    It maps `(batch, seq, hidden)` to `(batch, seq, hidden)` like the dense MLP it replaces. It reports the routing it
    used to `routing_observer` (the model's routing recorder, `moge_hf.routing`, sets it); the model turns that into
    the routing losses with [`routing_losses`].
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        dropout: float,
        experts_class: type[nn.Module] | None = None,
    ):
        super().__init__()
        self.router = MoGERouter(config, hidden_size)
        self.experts = (experts_class or MoGEExperts)(config, hidden_size, intermediate_size, activation)
        self.dropout = nn.Dropout(dropout)
        self.regularizer = GroupSparsityRegularizer.from_config(config, config.num_experts)
        self.routing_observer = None  # called as `observer(router, (hidden_states,), routing)` after each routing

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, batch_shape[-1])  # (T, d)
        routing = self.router(hidden_states)
        if self.routing_observer is not None:
            self.routing_observer(self.router, (hidden_states,), routing)
        output = self.experts(hidden_states, routing.top_k_index, routing.top_k_weights)
        return self.dropout(output.view(batch_shape))


ROUTING_LOSSES = ("aux_loss", "moge_loss", "z_loss")


def routing_losses(
    routing: MoGERouting,
    regularizer: GroupSparsityRegularizer,
    token_mask: torch.Tensor | None,
    dispatch_fraction: torch.Tensor | None = None,
    differentiable: frozenset[str] = frozenset(ROUTING_LOSSES),
) -> dict[str, torch.Tensor]:
    """Unscaled `aux_loss`, `moge_loss` and `z_loss` of one MoGE layer's routing in one forward pass.

    `token_mask` is `(T,)` floats or None; `dispatch_fraction` optionally replaces the batch's own expert dispatch
    fractions in the load-balancing loss (those of the global batch, see `router_aux_loss_global`). Losses not named
    in `differentiable` are computed without autograd (their coefficient is 0: they are reported, not trained on, and
    cost no backward).
    """
    mask = _as_bool(token_mask)
    losses = {}
    with torch.set_grad_enabled(torch.is_grad_enabled() and "aux_loss" in differentiable):
        losses["aux_loss"] = load_balancing_loss(routing.probs, routing.top_k_index, mask, dispatch_fraction)
    with torch.set_grad_enabled(torch.is_grad_enabled() and "moge_loss" in differentiable):
        clean_probs = routing.probs
        if routing.clean_logits is not routing.logits:
            clean_probs = routing.clean_logits.float().softmax(-1)
        losses["moge_loss"] = regularizer(clean_probs, token_mask)
    with torch.set_grad_enabled(torch.is_grad_enabled() and "z_loss" in differentiable):
        losses["z_loss"] = router_z_loss(routing.logits, mask)
    return losses


def _as_bool(token_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if token_mask is None else token_mask.bool()
