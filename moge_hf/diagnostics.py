"""Diagnostics of MoGE / MoE routing: load, entropy, redundancy, specialization, invariance, and their pictures.

Everything here works on any MoGE model of this package (GPT-2 or ViT, any `moge_loss_coef`, so the plain MoE
baseline too) and on any iterable of batches (a `DataLoader`, a list of dicts); no `Trainer` is needed. The pieces:

- **Pure functions** on routing decisions and expert weights (numpy or torch in, numpy arrays or floats out):
  [`expert_load`], [`mean_routing_probs`], [`routing_entropy`], [`normalized_entropy`], [`grid_distance_matrix`],
  [`within_window`], [`weight_cosine_similarity`], [`output_cosine_similarity`], [`mean_by_distance`],
  [`mutual_information`], [`miller_madow_bias`], [`shuffled_mutual_information`], [`frequent_token_buckets`],
  [`routing_agreement`], and the patch bookkeeping of image transformations ([`shift_correspondence`],
  [`flip_correspondence`], [`shift_images`], [`flip_images`]).
- **A collector**, [`RoutingCollector`] / [`collect_routing`]: forward hooks on the MoGE routers that record, for
  every token of every batch, each MoGE layer's routing probabilities and chosen experts (and optionally the hidden
  states that enter the layer).
- **Summaries** that return plain JSON-serializable dicts of floats and lists: [`routing_diagnostics`] (load,
  entropy, redundancy, specialization per layer), [`image_routing_invariance`] (shift by one patch, horizontal
  flip) and [`text_routing_invariance`] (one earlier context token replaced).
- **Pictures** (PNG, matplotlib imported only when called): [`plot_expert_maps`], [`plot_learning_curves`],
  [`plot_diagnostics`].

Conventions: expert `e` sits at row `e // cols`, column `e % cols` of the `rows x cols` map (as in
`moge_hf.losses.group_window_matrix`). "Chosen expert" means the top-1 expert (the largest routing probability)
unless said otherwise; with top-k routing, `routing_agreement` also compares the whole top-k sets. Entropies of
routing probabilities are in nats (as in the training callback); mutual informations are in bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .moge_layer import moge_regularizers
from .routing import RecordedForward, moge_routers, routing_recorder


__all__ = [
    "RoutingCollector",
    "RoutingData",
    "collect_routing",
    "expert_load",
    "flip_correspondence",
    "flip_images",
    "frequent_token_buckets",
    "grid_distance_matrix",
    "image_routing_invariance",
    "mean_by_distance",
    "mean_routing_probs",
    "miller_madow_bias",
    "mutual_information",
    "normalized_entropy",
    "output_cosine_similarity",
    "plot_diagnostics",
    "plot_expert_maps",
    "plot_learning_curves",
    "routing_agreement",
    "routing_diagnostics",
    "routing_entropy",
    "shift_correspondence",
    "shift_images",
    "shuffled_mutual_information",
    "text_routing_invariance",
    "to_jsonable",
    "weight_cosine_similarity",
    "within_window",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence


def _np(values: ArrayLike, dtype=None) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype == torch.bfloat16:
            values = values.float()
        values = values.numpy()
    return np.asarray(values, dtype=dtype)


def _mask(mask: ArrayLike | None, num_tokens: int) -> np.ndarray | None:
    if mask is None:
        return None
    mask = _np(mask).reshape(-1).astype(bool)
    if mask.shape[0] != num_tokens:
        raise ValueError(f"mask has {mask.shape[0]} entries, but there are {num_tokens} tokens")
    return mask


def to_jsonable(value: Any) -> Any:
    """`value` with numpy / torch arrays and scalars turned into lists, floats and ints (for `json.dump`)."""
    if isinstance(value, torch.Tensor):
        value = _np(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    return value


# ------------------------------------------------------------------------------------------------------------------
# Load and entropy
# ------------------------------------------------------------------------------------------------------------------


def _as_slots(index: np.ndarray) -> np.ndarray:
    """Expert indices as `(num_tokens, k)`: a `(num_tokens,)` array is top-1, a scalar one token (also with 0 tokens,
    where `reshape(0, -1)` cannot infer k)."""
    if index.ndim == 0:
        return index.reshape(1, 1)
    return index.reshape(index.shape[0], index.shape[1] if index.ndim > 1 else 1)


def expert_load(top_k_index: ArrayLike, num_experts: int, mask: ArrayLike | None = None) -> np.ndarray:
    """Fraction of the routed token-slots (tokens x k) that went to each expert.

    Args:
        top_k_index (array of shape `(num_tokens, k)` or `(num_tokens,)`): the chosen experts of each token.
        num_experts (`int`): number of experts `E`.
        mask (array of shape `(num_tokens,)`, *optional*): `False` for tokens to leave out (padding).

    Returns:
        `np.ndarray` of shape `(E,)`, summing to 1 (all zeros when no token is kept). Uniform load is `1 / E`.
    """
    index = _as_slots(_np(top_k_index).astype(np.int64))
    keep = _mask(mask, index.shape[0])
    if keep is not None:
        index = index[keep]
    counts = np.bincount(index.reshape(-1), minlength=num_experts).astype(np.float64)
    total = counts.sum()
    return counts / total if total else counts


def mean_routing_probs(probs: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """Mean routing probability of each expert over the (kept) tokens: `(num_tokens, E)` -> `(E,)`."""
    probs = _np(probs, np.float64)
    probs = probs.reshape(-1, probs.shape[-1])
    keep = _mask(mask, probs.shape[0])
    if keep is not None:
        probs = probs[keep]
    return probs.mean(0) if probs.shape[0] else np.zeros(probs.shape[-1])


def routing_entropy(probs: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean over tokens of the entropy (nats) of each token's routing distribution; `log(E)` is uniform routing."""
    probs = _np(probs, np.float64)
    probs = probs.reshape(-1, probs.shape[-1])
    keep = _mask(mask, probs.shape[0])
    if keep is not None:
        probs = probs[keep]
    if not probs.shape[0]:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, -probs * np.log(probs), 0.0)
    return float(terms.sum(-1).mean())


def normalized_entropy(distribution: ArrayLike) -> float:
    """Entropy of one distribution (e.g. the expert load) divided by `log(len)`: 1 is uniform, 0 is one-hot."""
    p = _np(distribution, np.float64).reshape(-1)
    total = p.sum()
    if p.shape[0] < 2 or total <= 0:
        return 0.0
    p = p / total
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / math.log(p.shape[0]))


# ------------------------------------------------------------------------------------------------------------------
# The expert map
# ------------------------------------------------------------------------------------------------------------------


def grid_distance_matrix(map_shape: Sequence[int], circular: bool = False) -> np.ndarray:
    """Chebyshev distances between the experts on the `rows x cols` map: `D[a, b] = max(|dr|, |dc|)`.

    With `circular=True` the map is a torus (as with `moge_padding="circular"`): a row offset `dr` counts as
    `min(dr, rows - dr)`, and likewise for columns.

    Returns:
        `np.ndarray` of shape `(E, E)` of ints.
    """
    rows, cols = (int(n) for n in map_shape)
    coords = np.stack(np.divmod(np.arange(rows * cols), cols), axis=1)  # (E, 2): (row, col)
    delta = np.abs(coords[:, None, :] - coords[None, :, :])  # (E, E, 2)
    if circular:
        delta = np.minimum(delta, np.array([rows, cols]) - delta)
    return delta.max(-1)


def within_window(
    experts_a: ArrayLike, experts_b: ArrayLike, map_shape: Sequence[int], window: int, circular: bool = False
) -> np.ndarray:
    """Whether expert `experts_a[i]` and `experts_b[i]` fall in one window of the map, for each `i`.

    Two experts are "within one window" when their Chebyshev distance on the map (torus-aware when `circular`) is
    at most `window // 2`, i.e. a `window x window` window centred on one holds the other. The same expert is
    within its own window.

    Returns:
        `np.ndarray` of bools, of the shape of the inputs.
    """
    distances = grid_distance_matrix(map_shape, circular)
    a, b = _np(experts_a).astype(np.int64), _np(experts_b).astype(np.int64)
    return distances[a, b] <= int(window) // 2


def mean_by_distance(matrix: ArrayLike, map_shape: Sequence[int], circular: bool = False) -> dict[int, float]:
    """Mean of an `(E, E)` pairwise matrix over the pairs of distinct experts at each Chebyshev distance on the map.

    Used to see whether neighbouring experts are more alike (topographic order) than distant ones.

    Returns:
        `dict` mapping each distance `>= 1` that occurs to the mean of `matrix[a, b]` over the pairs `a != b` at
        that distance.
    """
    values = _np(matrix, np.float64)
    distances = grid_distance_matrix(map_shape, circular)
    off_diagonal = ~np.eye(distances.shape[0], dtype=bool)
    result = {}
    for distance in sorted(set(distances[off_diagonal].tolist())):
        pairs = (distances == distance) & off_diagonal
        result[int(distance)] = float(values[pairs].mean())
    return result


# ------------------------------------------------------------------------------------------------------------------
# Redundancy
# ------------------------------------------------------------------------------------------------------------------


def _expert_weights(experts: nn.Module) -> list[torch.Tensor]:
    """The experts' own weights, each `(E, ...)`: transformers' 3-D layout (`up_proj`, `gate_up_proj`, `down_proj`, and
    biases `(E, n)`), whichever the model has."""
    params = list(experts.parameters(recurse=False))
    num_experts = max(param.shape[0] for param in params if param.dim() == 3)
    return [param for param in params if param.dim() >= 2 and param.shape[0] == num_experts]


def _expert_weight_vectors(experts: nn.Module) -> torch.Tensor:
    parts = _expert_weights(experts)
    return torch.cat([part.detach().float().reshape(part.shape[0], -1) for part in parts], dim=1)  # (E, P)


def _cosine_matrix(vectors: torch.Tensor) -> np.ndarray:
    normalized = F.normalize(vectors.double(), dim=-1)
    return (normalized @ normalized.T).cpu().numpy()


def weight_cosine_similarity(experts: nn.Module) -> np.ndarray:
    """Pairwise cosine similarity of the experts' flattened weights (up, down projections and biases).

    Note that an MLP's function does not change when its hidden units are permuted, but this measure does: it
    compares hidden unit `i` of one expert with hidden unit `i` of another. It is telling for experts that share an
    origin (sparse upcycling: near 1 at the start), and near 0 for independently initialized experts whatever they
    compute; [`output_cosine_similarity`] compares what the experts compute.

    Args:
        experts (`MoGEExperts`): a MoGE layer's experts (`block.experts`), with 3-D `up_proj (E, f, d)`,
            `down_proj (E, d, f)` and their biases.

    Returns:
        `np.ndarray` of shape `(E, E)` (ones on the diagonal).
    """
    return _cosine_matrix(_expert_weight_vectors(experts))


@torch.no_grad()
def all_expert_outputs(experts: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Every expert's output (gate weight 1) on the same `(T, d)` tokens: `(E, T, d)` float32.

    Runs the experts' own forward (`forward(hidden, top_k_index, top_k_weights)`, the interface of transformers'
    experts and of `MoGEExperts`) once per expert with every token routed to it."""
    param = _expert_weights(experts)[0]
    hidden = hidden_states.to(device=param.device, dtype=param.dtype)
    ones = torch.ones(hidden.shape[0], 1, device=param.device, dtype=param.dtype)
    outputs = []
    for expert in range(param.shape[0]):
        index = torch.full((hidden.shape[0], 1), expert, device=param.device, dtype=torch.long)
        outputs.append(experts(hidden, index, ones))
    return torch.stack(outputs).float()


@torch.no_grad()
def output_cosine_similarity(experts: nn.Module, hidden_states: ArrayLike) -> np.ndarray:
    """Pairwise similarity of what the experts compute: per token, the cosine of two experts' outputs, averaged.

    Every expert is run on the same tokens (the hidden states that enter the MoGE layer, e.g. from
    [`collect_routing`] with `hidden_tokens_per_batch > 0`), whichever experts the router chose for them.

    Args:
        experts (`MoGEExperts`): a MoGE layer's experts.
        hidden_states (array of shape `(T, d)`): tokens entering the layer.

    Returns:
        `np.ndarray` of shape `(E, E)` (ones on the diagonal): 1 for experts that compute the same direction.
    """
    hidden = torch.as_tensor(_np(hidden_states, np.float32))
    if hidden.shape[0] == 0:
        raise ValueError("output_cosine_similarity needs at least one token")
    outputs = F.normalize(all_expert_outputs(experts, hidden).double(), dim=-1)  # (E, T, d)
    return torch.einsum("atd,btd->ab", outputs, outputs).div(hidden.shape[0]).cpu().numpy()


# ------------------------------------------------------------------------------------------------------------------
# Specialization: mutual information
# ------------------------------------------------------------------------------------------------------------------


def _joint_counts(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    _, x_codes = np.unique(x, return_inverse=True)
    _, y_codes = np.unique(y, return_inverse=True)
    counts = np.zeros((x_codes.max() + 1, y_codes.max() + 1), dtype=np.float64)
    np.add.at(counts, (x_codes.reshape(-1), y_codes.reshape(-1)), 1.0)
    return counts


def mutual_information(x: ArrayLike, y: ArrayLike) -> float:
    """Plug-in estimate of the mutual information `I(X; Y)` in bits, from paired samples of two discrete variables.

    `sum p(x, y) log2(p(x, y) / (p(x) p(y)))` with the empirical frequencies. E.g. `x` the class of each token's
    image and `y` its chosen expert: `log2(C)` when the classes (equally frequent) map one-to-one to experts, 0 when
    the expert does not depend on the class.

    The plug-in estimator is biased upwards: for independent variables its expectation is about
    `(R - 1)(C - 1) / (2 N ln 2)` bits (Miller-Madow; see [`miller_madow_bias`]), with `R`, `C` the numbers of
    observed values and `N` the samples, and more when the samples are not independent (the tokens of one image
    share its class). Compare with [`shuffled_mutual_information`], the same estimator on data with the pairing
    broken, before reading a small value as specialization.
    """
    x, y = _np(x).reshape(-1), _np(y).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must be paired samples, got {x.shape[0]} and {y.shape[0]} values")
    if x.shape[0] == 0:
        return 0.0
    joint = _joint_counts(x, y)
    joint /= joint.sum()
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nonzero = joint > 0
    return float(max((joint[nonzero] * np.log2(joint[nonzero] / (px @ py)[nonzero])).sum(), 0.0))


def miller_madow_bias(x: ArrayLike, y: ArrayLike) -> float:
    """First-order bias of the plug-in MI for independent samples: `(R - 1)(C - 1) / (2 N ln 2)` bits.

    `R` and `C` are the numbers of distinct observed values of `x` and `y`, `N` the number of samples. It assumes
    independent samples; tokens that share a label (one image) make the real bias larger.
    """
    x, y = _np(x).reshape(-1), _np(y).reshape(-1)
    n = x.shape[0]
    if n == 0:
        return 0.0
    return float((len(np.unique(x)) - 1) * (len(np.unique(y)) - 1) / (2.0 * n * math.log(2.0)))


def shuffled_mutual_information(
    x: ArrayLike, y: ArrayLike, groups: ArrayLike | None = None, num_shuffles: int = 5, seed: int = 0
) -> float:
    """The plug-in MI of [`mutual_information`] after shuffling `x` (mean over shuffles): an empirical null.

    With `groups` (e.g. the image each token belongs to, when `x` is the image's class), whole groups are shuffled:
    every token of a group gets the `x` of the same other group, which keeps the dependence between the tokens of
    one image and so gives the estimator's bias on data like the real one.
    """
    x, y = _np(x).reshape(-1), _np(y).reshape(-1)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_shuffles):
        if groups is None:
            shuffled = x[rng.permutation(x.shape[0])]
        else:
            group_ids = _np(groups).reshape(-1)
            unique_groups, codes = np.unique(group_ids, return_inverse=True)
            group_x = np.empty(len(unique_groups), dtype=x.dtype)
            group_x[codes] = x  # one x per group (the last one seen)
            shuffled = group_x[rng.permutation(len(unique_groups))][codes]
        values.append(mutual_information(shuffled, y))
    return float(np.mean(values)) if values else 0.0


def frequent_token_buckets(token_ids: ArrayLike, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id buckets for MI estimates: the `num_buckets - 1` most frequent ids get a bucket each, the rest one.

    A vocabulary of thousands of ids over a few hundred thousand tokens would leave the plug-in MI dominated by its
    bias; buckets keep `R` small.

    Returns:
        `(buckets, frequent_ids)`: the bucket of each token (`0 .. num_buckets - 2` by decreasing frequency,
        `num_buckets - 1` for the rest) and the ids that got their own bucket.
    """
    ids = _np(token_ids).reshape(-1).astype(np.int64)
    if num_buckets < 2:
        raise ValueError(f"num_buckets must be >= 2, got {num_buckets}")
    values, counts = np.unique(ids, return_counts=True)
    order = np.lexsort((values, -counts))  # by decreasing count, then id
    frequent = values[order[: num_buckets - 1]]
    lookup = {int(token): bucket for bucket, token in enumerate(frequent.tolist())}
    buckets = np.array([lookup.get(int(token), num_buckets - 1) for token in ids], dtype=np.int64)
    return buckets, frequent


# ------------------------------------------------------------------------------------------------------------------
# Invariance: agreement of two routings of corresponding tokens
# ------------------------------------------------------------------------------------------------------------------


def routing_agreement(
    top_k_a: ArrayLike,
    top_k_b: ArrayLike,
    map_shape: Sequence[int],
    window: int,
    circular: bool = False,
    chance_seed: int | None = 0,
) -> dict[str, float]:
    """How alike the routings of corresponding tokens are (token `i` of `a` corresponds to token `i` of `b`).

    Args:
        top_k_a, top_k_b (arrays of shape `(T, k)` or `(T,)`): chosen experts, top-1 first (as `torch.topk` gives).
        map_shape (`Sequence[int]`): `(rows, cols)` of the expert map.
        window (`int`): the window side `h`; "within window" is Chebyshev distance `<= h // 2` (see [`within_window`]).
        circular (`bool`): whether the map is a torus (the model's `moge_padding == "circular"`).
        chance_seed (`int`, *optional*): seed of the random pairing for the chance levels; `None` skips them.

    Returns:
        `dict` with `num_tokens` and the fractions of tokens whose
        - `same_top1`: top-1 experts are the same;
        - `same_set`: top-k sets are the same (equal to `same_top1` for top-1);
        - `within_window`: top-1 experts lie within one window of the map;
        plus `jaccard`, the mean Jaccard overlap of the top-k sets, and `chance_*`: the same quantities with the
        tokens of `b` randomly re-paired with those of `a` (what load alone gives: concentrated load raises them).
    """
    a, b = _as_slots(_np(top_k_a).astype(np.int64)), _as_slots(_np(top_k_b).astype(np.int64))
    if a.shape != b.shape:
        raise ValueError(f"the two routings must have the same shape, got {a.shape} and {b.shape}")

    def fractions(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
        if not first.shape[0]:
            return {"same_top1": 0.0, "same_set": 0.0, "within_window": 0.0, "jaccard": 0.0}
        sorted_a, sorted_b = np.sort(first, 1), np.sort(second, 1)
        overlap = (first[:, :, None] == second[:, None, :]).any(-1).sum(-1)
        k = first.shape[1]
        return {
            "same_top1": float((first[:, 0] == second[:, 0]).mean()),
            "same_set": float((sorted_a == sorted_b).all(1).mean()),
            "within_window": float(within_window(first[:, 0], second[:, 0], map_shape, window, circular).mean()),
            "jaccard": float((overlap / (2 * k - overlap)).mean()),
        }

    result: dict[str, float] = {"num_tokens": int(a.shape[0]), **fractions(a, b)}
    if chance_seed is not None:
        permutation = np.random.default_rng(chance_seed).permutation(a.shape[0])
        result.update({f"chance_{name}": value for name, value in fractions(a, b[permutation]).items()})
    return result


def shift_correspondence(
    grid_shape: Sequence[int], shift: Sequence[int], num_prefix_tokens: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Token positions that see the same image content before and after rolling an image by whole patches.

    Rolling an image by `shift = (dy, dx)` patches (`torch.roll` by `dy * patch_size` pixels down and `dx *
    patch_size` right, see [`shift_images`]) moves the patch at grid position `(i, j)` to `(i + dy, j + dx)`. Patches
    that wrap around the border are left out.

    Args:
        grid_shape (`Sequence[int]`): `(grid_rows, grid_cols)` of patches (`image_size // patch_size` each for ViT).
        shift (`Sequence[int]`): `(dy, dx)` in patches.
        num_prefix_tokens (`int`, defaults to 1): tokens before the patches in the sequence (ViT's [CLS]).

    Returns:
        `(source, target)`: int arrays of sequence positions; token `source[n]` of the original image and token
        `target[n]` of the shifted one cover the same content.
    """
    rows, cols = (int(n) for n in grid_shape)
    dy, dx = (int(n) for n in shift)
    i, j = np.divmod(np.arange(rows * cols), cols)
    keep = (i + dy >= 0) & (i + dy < rows) & (j + dx >= 0) & (j + dx < cols)
    source = i[keep] * cols + j[keep]
    target = (i[keep] + dy) * cols + (j[keep] + dx)
    return source + num_prefix_tokens, target + num_prefix_tokens


def flip_correspondence(grid_shape: Sequence[int], num_prefix_tokens: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token positions of mirrored patches under a horizontal flip: `(i, j)` <-> `(i, cols - 1 - j)`.

    The content of a patch is mirrored too, so corresponding tokens see mirror images of the same content.

    Returns:
        `(source, target)`: int arrays of sequence positions (see [`shift_correspondence`]).
    """
    rows, cols = (int(n) for n in grid_shape)
    i, j = np.divmod(np.arange(rows * cols), cols)
    return i * cols + j + num_prefix_tokens, i * cols + (cols - 1 - j) + num_prefix_tokens


def shift_images(pixel_values: torch.Tensor, patch_size: int, shift: Sequence[int]) -> torch.Tensor:
    """Roll `(B, C, H, W)` images by `shift = (dy, dx)` whole patches (down, right), wrapping around the border."""
    dy, dx = (int(n) for n in shift)
    return torch.roll(pixel_values, shifts=(dy * patch_size, dx * patch_size), dims=(-2, -1))


def flip_images(pixel_values: torch.Tensor) -> torch.Tensor:
    """Mirror `(B, C, H, W)` images left-right."""
    return torch.flip(pixel_values, dims=(-1,))


# ------------------------------------------------------------------------------------------------------------------
# Collecting the routing of a model over batches
# ------------------------------------------------------------------------------------------------------------------


def _moge_model(model: nn.Module) -> nn.Module:
    from .training import unwrap_moge_model

    return unwrap_moge_model(model)


@dataclass
class RoutingData:
    """The routing of every MoGE layer over a set of batches (see [`collect_routing`]).

    Attributes:
        layers: indices of the MoGE layers (`config.moe_layers`, sorted), one entry per block.
        probs: per layer, `(T, E)` float32 routing probabilities of all `T` tokens, in batch order (token `t` of a
            batch of shape `(B, S)` is `b * S + s`).
        top_k_index: per layer, `(T, k)` chosen experts, top-1 first.
        hidden: per layer, `(H, d)` float32 hidden states that entered the layer (a random subset of tokens; empty
            unless asked for).
        token_mask: `(T,)` bools, `False` for padding tokens, or None when every token counts.
        example_index: `(T,)` index of the example each token belongs to (0-based over all batches).
        position: `(T,)` position of each token in its sequence.
        labels: `(num_examples,)` the batches' labels, or None.
        input_ids: `(T,)` token ids (text models), or None.
        map_shape, window, padding, num_experts, top_k: the model's MoGE settings.
    """

    layers: list[int]
    probs: list[np.ndarray]
    top_k_index: list[np.ndarray]
    hidden: list[np.ndarray]
    token_mask: np.ndarray | None
    example_index: np.ndarray
    position: np.ndarray
    labels: np.ndarray | None
    input_ids: np.ndarray | None
    map_shape: tuple[int, int]
    window: int
    padding: str
    num_experts: int
    top_k: int
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.example_index.shape[0])

    def token_labels(self) -> np.ndarray | None:
        """The label of each token's example, `(T,)`, or None without labels."""
        return None if self.labels is None else self.labels[self.example_index]

    def layer_tokens(self, layer: int) -> tuple[np.ndarray | None, np.ndarray]:
        """`(token_mask, example_index)` of the tokens the `layer`-th MoGE layer routed. A hierarchical model (Swin)
        routes fewer tokens in a later stage, whose patches merge: those are each example's in order, the same number
        per example (images of one size, no padding)."""
        rows = self.probs[layer].shape[0]
        if rows == self.num_tokens:
            return self.token_mask, self.example_index
        num_examples = int(self.example_index.max()) + 1 if self.num_tokens else 0
        if self.token_mask is not None or num_examples == 0 or rows % num_examples:
            raise ValueError(
                f"MoGE layer {self.layers[layer]} routed {rows} tokens for {num_examples} examples of "
                f"{self.num_tokens} tokens in the first layer: the tokens of each example cannot be told apart"
            )
        return None, np.repeat(np.arange(num_examples), rows // num_examples)


class RoutingCollector:
    """Records each MoGE layer's routing (and optionally its input tokens) for every forward of the model.

    Use as a context manager around forward passes of the model; read `records` afterwards. It listens to the model's
    routing recorder (`moge_hf.routing`), which sees the routers' outputs as they are (training or evaluation mode
    alike); they are kept detached, on the CPU.

    Args:
        model (`nn.Module`): a MoGE model (or a wrapper: DDP, `torch.compile`, PEFT), or a transformers MoE model.
        hidden_tokens_per_batch (`int`, defaults to 0): how many tokens of each forward to keep the layer input of
            (a random subset, the same positions for every layer), for [`output_cosine_similarity`].
        seed (`int`, defaults to 0): seed of that random subset.

    Example:

    ```python
    >>> with RoutingCollector(model) as collector:
    ...     model(pixel_values)
    >>> probs, top_k_index, hidden = collector.records[0][0]  # layer 0, forward 0
    ```
    """

    def __init__(self, model: nn.Module, hidden_tokens_per_batch: int = 0, seed: int = 0):
        self.model = _moge_model(model)
        self.recorder = routing_recorder(self.model)
        if self.recorder is None:
            raise ValueError(f"{type(self.model).__name__} has no MoGE layers")
        self.routers = self.recorder.taps
        self.hidden_tokens_per_batch = int(hidden_tokens_per_batch)
        self.generator = torch.Generator().manual_seed(seed)
        self.records: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in self.routers]
        # `(num_tokens,)` bool of the current batch's real (unpadded) tokens, set by `collect_routing`; None: all.
        self.token_mask: torch.Tensor | None = None

    def __enter__(self) -> RoutingCollector:
        self.recorder.listeners.append(self._on_routing)
        self.recorder.keep_inputs += self.hidden_tokens_per_batch > 0
        return self

    def __exit__(self, *exc_info) -> None:
        if self._on_routing in self.recorder.listeners:
            self.recorder.listeners.remove(self._on_routing)
            self.recorder.keep_inputs -= self.hidden_tokens_per_batch > 0

    def _hidden_subset(self, hidden: torch.Tensor) -> torch.Tensor:
        """A random subset of the real tokens of a forward (the same positions for every layer)."""
        candidates = torch.arange(hidden.shape[0])
        if self.token_mask is not None and self.token_mask.numel() == hidden.shape[0]:
            candidates = candidates[self.token_mask]
        count = min(self.hidden_tokens_per_batch, candidates.numel())
        draw = torch.randperm(candidates.numel(), generator=self.generator)[:count]
        return candidates[draw].sort().values

    def _on_routing(self, forward: RecordedForward) -> None:
        subset = None
        for layer, output, hidden in forward.records:
            if self.hidden_tokens_per_batch > 0 and hidden is not None:
                hidden = hidden.detach()
                if subset is None or (subset.numel() and int(subset.max()) >= hidden.shape[0]):
                    subset = self._hidden_subset(hidden)  # padding takes no part in any diagnostic
                kept = hidden[subset.to(hidden.device)].float().cpu().numpy()
            else:  # none kept: an empty array as wide as this layer's tokens (a hierarchical model widens them)
                weight = getattr(self.routers[layer].module, "weight", None)
                width = hidden.shape[-1] if hidden is not None else None
                width = width or (weight.shape[-1] if weight is not None else self.model.config.hidden_size)
                kept = np.zeros((0, width), dtype=np.float32)
            probs, top_k_index = self.routers[layer].routing(output)
            self.records[layer].append(
                (probs.detach().float().cpu().numpy(), top_k_index.detach().cpu().numpy().astype(np.int64), kept)
            )


def _model_inputs(batch: Mapping[str, Any], label_key: str, device: torch.device) -> dict[str, Any]:
    inputs = {}
    for key, value in batch.items():
        if key in (label_key, "labels"):
            continue
        inputs[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    return inputs


def _forward_batches(model: nn.Module, batches: Iterable[Mapping[str, Any]], max_batches: int | None, label_key: str):
    """Yield `(batch, run)` where `run(inputs)` calls the model in eval mode, without gradients."""
    device = next(model.parameters()).device
    for number, batch in enumerate(batches):
        if max_batches is not None and number >= max_batches:
            break
        yield batch, _model_inputs(batch, label_key, device)


def _joined_mask(masks: list[np.ndarray | None], token_counts: list[int]) -> np.ndarray | None:
    """The batches' token masks as one; a batch without an attention mask keeps all its tokens (None: no batch had
    a mask)."""
    if all(mask is None for mask in masks):
        return None
    return np.concatenate(
        [np.ones(count, dtype=bool) if mask is None else mask for mask, count in zip(masks, token_counts)]
    )


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    max_batches: int | None = None,
    hidden_tokens_per_batch: int = 0,
    label_key: str = "labels",
    seed: int = 0,
) -> RoutingData:
    """Run `model` (in eval mode, no gradients) over `batches` and record every MoGE layer's routing.

    Args:
        model (`nn.Module`): a MoGE model; its mode is restored afterwards.
        batches (iterable of dicts): model inputs (`pixel_values` or `input_ids`, optional `attention_mask`), plus
            optionally `label_key`: one label per example (kept for [`mutual_information`], not passed to the
            model). A `DataLoader` works.
        max_batches (`int`, *optional*): stop after this many batches.
        hidden_tokens_per_batch (`int`, defaults to 0): tokens per batch whose layer inputs are kept.
        label_key (`str`, defaults to `"labels"`): the key of the labels. For language models the `labels` (shifted
            inputs) are dropped rather than kept as labels when they have the shape of `input_ids`.
        seed (`int`, defaults to 0): seed of the hidden-state subset.

    Returns:
        [`RoutingData`].
    """
    moge_model = _moge_model(model)
    was_training = model.training
    model.eval()
    labels, input_ids, masks, token_counts, example_index, positions = [], [], [], [], [], []
    num_examples = 0
    try:
        with RoutingCollector(model, hidden_tokens_per_batch, seed) as collector:
            for batch, inputs in _forward_batches(model, batches, max_batches, label_key):
                main = inputs.get("input_ids", inputs.get("pixel_values", inputs.get("inputs_embeds")))
                if main is None:
                    raise ValueError("each batch needs `pixel_values`, `input_ids` or `inputs_embeds`")
                mask = inputs.get("attention_mask")
                mask = _np(mask).reshape(-1) != 0 if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                collector.token_mask = None if mask is None else torch.from_numpy(mask)
                before = len(collector.records[0])
                model(**inputs)
                if len(collector.records[0]) != before + 1:
                    raise RuntimeError("expected one routing record per MoGE layer and forward")
                num_batch_tokens = collector.records[0][-1][0].shape[0]
                batch_size = main.shape[0]
                seq = num_batch_tokens // batch_size
                example_index.append(np.repeat(np.arange(batch_size) + num_examples, seq))
                positions.append(np.tile(np.arange(seq), batch_size))
                if "input_ids" in inputs:
                    input_ids.append(_np(inputs["input_ids"]).reshape(-1))
                masks.append(mask)
                token_counts.append(num_batch_tokens)
                label = batch.get(label_key)
                if label is not None:
                    label = _np(label)
                    if label.ndim == 1 and label.shape[0] == batch_size:
                        labels.append(label)
                num_examples += batch_size
    finally:
        model.train(was_training)
    if not example_index:
        raise ValueError("collect_routing got no batches")
    if labels and len(labels) != len(example_index):
        labels = []
    regularizer = moge_regularizers(moge_model)[0]
    return RoutingData(
        layers=[int(router.name.removeprefix("layer")) for router in collector.routers],
        probs=[np.concatenate([r[0] for r in records]) for records in collector.records],
        top_k_index=[np.concatenate([r[1] for r in records]) for records in collector.records],
        hidden=[np.concatenate([r[2] for r in records]) for records in collector.records],
        token_mask=_joined_mask(masks, token_counts),
        example_index=np.concatenate(example_index),
        position=np.concatenate(positions),
        labels=np.concatenate(labels) if labels else None,
        input_ids=np.concatenate(input_ids) if input_ids else None,
        map_shape=tuple(regularizer.map_shape),
        window=int(regularizer.window),
        padding=str(regularizer.padding),
        num_experts=int(regularizer.num_experts),
        top_k=int(collector.routers[0].top_k),
    )


def _summary_of_pairs(matrix: np.ndarray, map_shape, circular: bool, prefix: str) -> dict[str, Any]:
    off_diagonal = ~np.eye(matrix.shape[0], dtype=bool)
    by_distance = mean_by_distance(matrix, map_shape, circular)
    near = by_distance.get(1)
    far = [value for distance, value in by_distance.items() if distance >= 2]
    distances = grid_distance_matrix(map_shape, circular)
    far_mean = float(matrix[(distances >= 2) & off_diagonal].mean()) if far else None
    return {
        f"{prefix}_mean": float(matrix[off_diagonal].mean()) if off_diagonal.any() else 0.0,
        f"{prefix}_max": float(matrix[off_diagonal].max()) if off_diagonal.any() else 0.0,
        f"{prefix}_neighbors": near,
        f"{prefix}_far": far_mean,
        f"{prefix}_by_distance": {str(k): v for k, v in by_distance.items()},
    }


def routing_diagnostics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | RoutingData,
    max_batches: int | None = None,
    label_key: str = "labels",
    num_token_buckets: int = 64,
    hidden_tokens_per_batch: int = 64,
    num_shuffles: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Load, entropy, redundancy and specialization of every MoGE layer of `model` on `batches`.

    Per layer (a list in layer order, under `"layers"`):

    - `load`: fraction of routed slots per expert (`E` floats, row-major on the map), `mean_prob`: mean routing
      probability per expert; `load_entropy` (normalized: 1 is uniform load), `active_experts` (experts with any
      load), `load_max` (largest load, in units of uniform `1/E`); `routing_entropy` (mean per-token entropy of the
      routing probabilities, nats; `log E` is uniform) and `top1_prob` (mean largest probability).
    - redundancy: `weight_cosine_*` ([`weight_cosine_similarity`]) and, when hidden states were kept,
      `output_cosine_*` ([`output_cosine_similarity`]): mean and max over expert pairs, mean over map neighbours
      (Chebyshev distance 1) and over pairs at distance >= 2, and by distance; `prob_correlation_*`: the same for
      the correlation over tokens of two experts' routing probabilities (co-activation; topographic order shows as
      higher values for neighbours).
    - specialization, with the chosen (top-1) expert: `mi_label_bits` (class -> expert, when the batches carry one
      label per example) and `mi_token_bits` (token-id bucket -> expert, for text: [`frequent_token_buckets`] with
      `num_token_buckets`), each with `*_shuffled_bits` (the null of [`shuffled_mutual_information`]; for labels,
      shuffled between examples), `*_bias_bits` ([`miller_madow_bias`]) and `*_normalized` (MI / H(label)).

    Args:
        model (`nn.Module`): a MoGE model.
        batches (iterable of dicts, or [`RoutingData`]): see [`collect_routing`]; or routing already collected.
        max_batches, label_key, hidden_tokens_per_batch, seed: see [`collect_routing`].
        num_token_buckets (`int`, defaults to 64): buckets of token ids for `mi_token_bits`.
        num_shuffles (`int`, defaults to 5): shuffles for the MI nulls.

    Returns:
        `dict`: `{"map_shape", "window", "padding", "num_experts", "top_k", "num_tokens", "layers": [...]}`, plain
        floats, ints and lists.
    """
    moge_model = _moge_model(model)
    if isinstance(batches, RoutingData):
        data = batches
    else:
        data = collect_routing(model, batches, max_batches, hidden_tokens_per_batch, label_key, seed)
    circular = data.padding == "circular"
    experts_of_layer = [router.experts for router in moge_routers(moge_model)]
    mask = data.token_mask
    token_buckets = None
    if data.input_ids is not None:
        ids = data.input_ids if mask is None else data.input_ids[mask]
        token_buckets, _ = frequent_token_buckets(ids, num_token_buckets)

    per_layer = []
    for layer, (experts, probs, top_k) in enumerate(zip(experts_of_layer, data.probs, data.top_k_index)):
        mask, example_index = data.layer_tokens(layer)
        kept_probs = probs if mask is None else probs[mask]
        kept_top_k = top_k if mask is None else top_k[mask]
        load = expert_load(kept_top_k, data.num_experts)
        entry: dict[str, Any] = {
            "layer": data.layers[layer],
            "load": load.tolist(),
            "mean_prob": mean_routing_probs(kept_probs).tolist(),
            "load_entropy": normalized_entropy(load),
            "active_experts": int((load > 0).sum()),
            "load_max": float(load.max() * data.num_experts),
            "routing_entropy": routing_entropy(kept_probs),
            "top1_prob": float(kept_probs.max(-1).mean()) if kept_probs.shape[0] else 0.0,
        }
        entry.update(_summary_of_pairs(weight_cosine_similarity(experts), data.map_shape, circular, "weight_cosine"))
        if data.hidden[layer].shape[0]:
            similarity = output_cosine_similarity(experts, data.hidden[layer])
            entry.update(_summary_of_pairs(similarity, data.map_shape, circular, "output_cosine"))
        with np.errstate(invalid="ignore", divide="ignore"):
            correlation = np.corrcoef(kept_probs.T.astype(np.float64)) if kept_probs.shape[0] > 1 else None
        if correlation is not None:
            entry.update(_summary_of_pairs(np.nan_to_num(correlation), data.map_shape, circular, "prob_correlation"))
        top1 = kept_top_k[:, 0]
        if data.labels is not None:
            groups = example_index if mask is None else example_index[mask]
            entry.update(_mi_entry("mi_label", data.labels[groups], top1, groups, num_shuffles, seed))
        if token_buckets is not None:
            entry.update(_mi_entry("mi_token", token_buckets, top1, None, num_shuffles, seed))
        per_layer.append(entry)
    return {
        "map_shape": list(data.map_shape),
        "window": data.window,
        "padding": data.padding,
        "num_experts": data.num_experts,
        "top_k": data.top_k,
        "num_tokens": int(data.num_tokens if mask is None else mask.sum()),
        "layers": per_layer,
    }


def _mi_entry(prefix: str, x: np.ndarray, y: np.ndarray, groups, num_shuffles: int, seed: int) -> dict[str, float]:
    mi = mutual_information(x, y)
    _, counts = np.unique(x, return_counts=True)
    p = counts / counts.sum()
    label_entropy = float(-(p * np.log2(p)).sum())
    return {
        f"{prefix}_bits": mi,
        f"{prefix}_shuffled_bits": shuffled_mutual_information(x, y, groups, num_shuffles, seed),
        f"{prefix}_bias_bits": miller_madow_bias(x, y),
        f"{prefix}_normalized": mi / label_entropy if label_entropy > 0 else 0.0,
    }


# ------------------------------------------------------------------------------------------------------------------
# Invariance of the routing under small transformations of the input
# ------------------------------------------------------------------------------------------------------------------


def _routing_of(model: nn.Module, inputs: dict[str, Any]) -> list[np.ndarray]:
    with RoutingCollector(model) as collector:
        model(**inputs)
    return [records[0][1] for records in collector.records]


def _merge_agreements(parts: list[dict[str, float]]) -> dict[str, float]:
    total = sum(part["num_tokens"] for part in parts)
    merged: dict[str, float] = {"num_tokens": int(total)}
    for key in parts[0]:
        if key != "num_tokens":
            merged[key] = float(sum(part[key] * part["num_tokens"] for part in parts) / total) if total else 0.0
    return merged


IMAGE_SHIFTS = {"shift_right": (0, 1), "shift_left": (0, -1), "shift_down": (1, 0), "shift_up": (-1, 0)}


def _token_layout(num_tokens: int, grid: tuple[int, int], layer: int) -> tuple[int, tuple[int, int], int]:
    """Where a MoGE layer's `num_tokens` tokens of one image lie on the image's `grid` of patches: `(step, cells,
    prefix)`: the patches per side of one token (1 for ViT; 2, 4, ... in a hierarchical model's later stages, which
    merge 2 x 2 tokens), the grid of tokens, and how many tokens come before it (ViT's [CLS])."""
    step = 1
    while (grid[0] // step) * (grid[1] // step) > num_tokens and step < min(grid):
        step *= 2
    cells = (grid[0] // step, grid[1] // step)
    prefix = num_tokens - cells[0] * cells[1]
    if grid[0] % step or grid[1] % step or not 0 <= prefix < cells[1]:
        raise ValueError(
            f"MoGE layer {layer} routes {num_tokens} tokens per image, which do not lie on the {grid[0]} x {grid[1]} "
            "patch grid of `config.image_size` / `config.patch_size` (nor on a grid of merged patches), with at most "
            "a few tokens before it; image_routing_invariance needs images of `config.image_size`"
        )
    return step, cells, prefix


@torch.no_grad()
def image_routing_invariance(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    transforms: Sequence[str] = ("shift_right", "shift_down", "flip"),
    max_batches: int | None = None,
    window: int | None = None,
    circular: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """How often an image MoGE model (ViT, Swin) routes a token the same way when the image is shifted by one token
    or flipped.

    For each transformation, the images of `batches["pixel_values"]` and their transformed copies go through the
    model (eval mode, no gradients), and the chosen experts of corresponding tokens are compared with
    [`routing_agreement`]. Each MoGE layer's tokens are laid out on its own grid: ViT's patches (its [CLS] left out),
    or a hierarchical model's merged patches, 2 x 2 per token in Swin's second stage, 4 x 4 in its third. A shift
    moves the image by one token of the layer's grid (`torch.roll` by that many pixels: one patch for ViT, two in
    Swin's second stage) and compares each token with the one that sees the same content one grid step further,
    leaving out the tokens that wrapped around; a horizontal flip compares token `(i, j)` with `(i, cols - 1 - j)`
    (whose content is the mirror image). Position embeddings (and Swin's windows) differ between corresponding
    tokens, so a perfectly invariant routing is not expected; the numbers compare models.

    Args:
        model (`nn.Module`): an image MoGE model (`config.image_size`, `config.patch_size`) given images of
            `config.image_size`.
        batches (iterable of dicts with `pixel_values`): other keys are ignored.
        transforms (`Sequence[str]`): any of `"shift_right"`, `"shift_left"`, `"shift_down"`, `"shift_up"`, `"flip"`.
        max_batches (`int`, *optional*): stop after this many batches.
        window (`int`, *optional*): window side for `within_window`; defaults to `config.moge_window`.
        circular (`bool`, *optional*): torus distances; defaults to `config.moge_padding == "circular"`.
        seed (`int`, defaults to 0): seed of the chance pairing.

    Returns:
        `{transform: {"layers": [agreement dict per MoGE layer]}}` (see [`routing_agreement`]).
    """
    unknown = [name for name in transforms if name not in (*IMAGE_SHIFTS, "flip")]
    if unknown:
        raise ValueError(f"unknown transform(s) {unknown}; use {sorted([*IMAGE_SHIFTS, 'flip'])}")
    moge_model = _moge_model(model)
    config = moge_model.config
    window = int(config.moge_window if window is None else window)
    circular = (config.moge_padding == "circular") if circular is None else bool(circular)
    map_shape = moge_regularizers(_moge_model(model))[0].map_shape
    patch = int(config.patch_size)
    image_size = config.image_size
    image_size = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    grid = (int(image_size[0]) // patch, int(image_size[1]) // patch)
    parts: dict[str, list[list[dict]]] = {name: [] for name in transforms}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for number, batch in enumerate(batches):
            if max_batches is not None and number >= max_batches:
                break
            pixels = batch["pixel_values"].to(device)
            original = _routing_of(model, {"pixel_values": pixels})
            batch_size = pixels.shape[0]
            layouts = [_token_layout(routing.shape[0] // batch_size, grid, i) for i, routing in enumerate(original)]
            for name in parts:
                transformed = {}  # the routing of the transformed images, per token step (one for a flip)
                layer_parts = []
                for layer, (before, (step, cells, prefix)) in enumerate(zip(original, layouts)):
                    if name == "flip":
                        key, (source, target) = 0, flip_correspondence(cells, prefix)
                    else:
                        key, (source, target) = step, shift_correspondence(cells, IMAGE_SHIFTS[name], prefix)
                    if key not in transformed:
                        moved = (
                            flip_images(pixels)
                            if name == "flip"
                            else shift_images(pixels, patch * step, IMAGE_SHIFTS[name])
                        )
                        transformed[key] = _routing_of(model, {"pixel_values": moved})
                    after = transformed[key][layer]
                    seq = before.shape[0] // batch_size
                    before, after = before.reshape(batch_size, seq, -1), after.reshape(batch_size, seq, -1)
                    first = before[:, source].reshape(-1, before.shape[-1])
                    second = after[:, target].reshape(-1, after.shape[-1])
                    layer_parts.append(routing_agreement(first, second, map_shape, window, circular, seed + number))
                parts[name].append(layer_parts)
    finally:
        model.train(was_training)
    return {
        name: {"layers": [_merge_agreements([batch_parts[i] for batch_parts in runs]) for i in range(len(runs[0]))]}
        for name, runs in parts.items()
        if runs
    }


@torch.no_grad()
def text_routing_invariance(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    replacement_ids: Sequence[int],
    max_batches: int | None = None,
    window: int | None = None,
    circular: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """How often a GPT-2 MoGE model routes the following tokens the same way after one earlier token is replaced.

    The perturbation: in each sequence, one position `p` (uniform in `[0, S - 2]`) gets another token drawn from
    `replacement_ids` (e.g. the 64 most frequent ids of the training text, never the original one), and the routing
    of the tokens after `p` is compared with that of the unperturbed sequence. Why this one: with causal attention
    and absolute position embeddings, the tokens after `p` keep their own ids and positions, so the only change they
    see is a small change of their context, the text analogue of a small transformation of an image; tokens before
    `p` cannot change at all (causality) and are left out, and so is `p` itself (its own id changed). Prepending a
    token, the other obvious choice, would also move every token to a new position embedding, mixing a change of
    position with the change of context. Frequent replacement tokens keep the perturbed text in-distribution.

    Args:
        model (`nn.Module`): a GPT-2 MoGE model.
        batches (iterable of dicts with `input_ids` `(B, S)`): every token counts (no padding).
        replacement_ids (`Sequence[int]`): the tokens to draw replacements from (at least 2).
        max_batches, window, circular, seed: as in [`image_routing_invariance`]; `seed` also draws `p` and the
            replacements.

    Returns:
        `{"context_replacement": {"layers": [...]}, "next_token": {"layers": [...]}}`: agreement dicts (see
        [`routing_agreement`]) over all tokens after `p`, and over the token right after `p` alone (the most exposed).
    """
    moge_model = _moge_model(model)
    config = moge_model.config
    window = int(config.moge_window if window is None else window)
    circular = (config.moge_padding == "circular") if circular is None else bool(circular)
    map_shape = moge_regularizers(_moge_model(model))[0].map_shape
    replacements = np.unique(np.asarray(list(replacement_ids), dtype=np.int64))
    if replacements.shape[0] < 2:
        raise ValueError("replacement_ids must hold at least 2 distinct token ids")
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    all_parts: list[list[dict]] = []
    next_parts: list[list[dict]] = []
    was_training = model.training
    model.eval()
    try:
        for number, batch in enumerate(batches):
            if max_batches is not None and number >= max_batches:
                break
            ids = batch["input_ids"].to(device)
            batch_size, seq = ids.shape
            if seq < 2:
                raise ValueError("text_routing_invariance needs sequences of at least 2 tokens")
            positions = rng.integers(0, seq - 1, size=batch_size)
            perturbed = ids.clone()
            for row, position in enumerate(positions.tolist()):
                original = int(ids[row, position])
                choices = replacements[replacements != original]
                perturbed[row, position] = int(rng.choice(choices))
            before_layers = _routing_of(model, {"input_ids": ids})
            after_layers = _routing_of(model, {"input_ids": perturbed})
            after_p = np.arange(seq)[None, :] > positions[:, None]  # (B, S)
            next_one = np.arange(seq)[None, :] == positions[:, None] + 1
            layer_all, layer_next = [], []
            for before, after in zip(before_layers, after_layers):
                before = before.reshape(batch_size, seq, -1)
                after = after.reshape(batch_size, seq, -1)
                layer_all.append(
                    routing_agreement(before[after_p], after[after_p], map_shape, window, circular, seed + number)
                )
                layer_next.append(
                    routing_agreement(before[next_one], after[next_one], map_shape, window, circular, seed + number)
                )
            all_parts.append(layer_all)
            next_parts.append(layer_next)
    finally:
        model.train(was_training)
    if not all_parts:
        return {}
    num_layers = len(all_parts[0])
    return {
        "context_replacement": {"layers": [_merge_agreements([p[i] for p in all_parts]) for i in range(num_layers)]},
        "next_token": {"layers": [_merge_agreements([p[i] for p in next_parts]) for i in range(num_layers)]},
    }


# ------------------------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the moge_hf.diagnostics plots need matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_expert_maps(
    maps: Mapping[str, Sequence[Mapping[str, Any]]],
    map_shape: Sequence[int],
    path: str,
    keys: Sequence[str] = ("mean_prob", "load"),
    title: str | None = None,
) -> str:
    """Per arm and MoGE layer, the experts' mean routing probability and load drawn on the `rows x cols` map (PNG).

    Args:
        maps (`Mapping[str, Sequence[Mapping]]`): for each arm (a row block of the figure), the per-layer entries of
            [`routing_diagnostics`] (`"layers"`), each with the `keys` as `E` floats in row-major map order.
        map_shape (`Sequence[int]`): `(rows, cols)`.
        path (`str`): the PNG to write.
        keys (`Sequence[str]`): which per-expert values to draw, one panel each.
        title (`str`, *optional*): figure title.

    Returns:
        `str`: `path`. Values are shown in units of uniform (`E x value`, 1 = uniform), one color scale per key.
    """
    plt = _pyplot()
    rows, cols = (int(n) for n in map_shape)
    num_experts = rows * cols
    arms = list(maps)
    num_layers = max(len(maps[arm]) for arm in arms)
    panels = [(layer, key) for key in keys for layer in range(num_layers)]  # key-major: one colorbar per key
    # One color scale per key (shared by the arms and layers), so that small differences of mean probability show.
    scales = {}
    for key in keys:
        values = [
            np.asarray(maps[arm][layer][key], dtype=np.float64) * num_experts
            for arm in arms
            for layer in range(len(maps[arm]))
        ]
        low = min(float(value.min()) for value in values) if values else 0.0
        high = max(float(value.max()) for value in values) if values else 2.0
        low, high = (0.0, max(high, 2.0)) if key == "load" else (min(low, 1.0), max(high, 1.0))
        scales[key] = (low, high if high > low else low + 1e-6, ".1f" if high - low >= 0.5 else ".3f")
    figure, axes = plt.subplots(
        len(arms),
        len(panels),
        figsize=(1.5 + 0.5 * cols * len(panels), 0.8 + 0.6 * rows * len(arms)),
        squeeze=False,
        layout="constrained",
    )
    images = {}
    for a, arm in enumerate(arms):
        for p, (layer, key) in enumerate(panels):
            axis = axes[a][p]
            axis.set_xticks([])
            axis.set_yticks([])
            if layer >= len(maps[arm]):
                axis.axis("off")
                continue
            entry = maps[arm][layer]
            grid = np.asarray(entry[key], dtype=np.float64).reshape(rows, cols) * num_experts
            low, high, number_format = scales[key]
            images[key] = axis.imshow(grid, cmap="viridis", vmin=low, vmax=high)
            if rows * cols <= 64:
                for i in range(rows):
                    for j in range(cols):
                        text = format(grid[i, j], number_format)
                        axis.text(j, i, text, ha="center", va="center", fontsize=5, color="w")
            axis.set_title(f"{arm}\nlayer {entry.get('layer', layer)} {key}", fontsize=7)
    for key, image in images.items():
        columns = [p for p, (_, panel_key) in enumerate(panels) if panel_key == key]
        figure.colorbar(
            image, ax=[axes[a][p] for a in range(len(arms)) for p in columns], shrink=0.8, label=f"E x {key}"
        )
    if title:
        figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_learning_curves(
    curves: Mapping[str, Sequence[Mapping[str, Sequence[float]]]],
    path: str,
    metric_name: str = "eval metric",
    title: str | None = None,
) -> str:
    """Training loss and evaluation metric against steps, per arm (mean over seeds, band = min..max), as a PNG.

    Args:
        curves (`Mapping[str, Sequence[Mapping]]`): for each arm, one dict per seed with `train_steps`,
            `train_loss`, `eval_steps`, `eval_metric` (lists of equal lengths within a seed).
        path (`str`): the PNG to write.
        metric_name (`str`): label of the evaluation metric.
        title (`str`, *optional*): figure title.

    Returns:
        `str`: `path`.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, runs in curves.items():
        for axis, (steps_key, values_key) in zip(axes, (("train_steps", "train_loss"), ("eval_steps", "eval_metric"))):
            runs_with = [run for run in runs if run.get(values_key)]
            if not runs_with:
                continue
            length = min(len(run[values_key]) for run in runs_with)
            steps = np.asarray(runs_with[0][steps_key][:length], dtype=np.float64)
            stacked = np.asarray([run[values_key][:length] for run in runs_with], dtype=np.float64)
            (line,) = axis.plot(steps, stacked.mean(0), label=f"{arm} (n={len(runs_with)})")
            if len(runs_with) > 1:
                axis.fill_between(steps, stacked.min(0), stacked.max(0), color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss (task + weighted routing losses)")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(metric_name)
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_diagnostics(
    values: Mapping[str, Mapping[str, Sequence[float]]],
    metrics: Sequence[str],
    path: str,
    title: str | None = None,
) -> str:
    """Diagnostics side by side: a panel per metric, a bar per arm (mean over seeds, error bar = std, dots = seeds).

    Args:
        values (`Mapping[str, Mapping[str, Sequence[float]]]`): `values[arm][metric]` = one value per seed.
        metrics (`Sequence[str]`): the metrics to draw (missing ones are skipped).
        path (`str`): the PNG to write.
        title (`str`, *optional*): figure title.

    Returns:
        `str`: `path`.
    """
    plt = _pyplot()
    arms = list(values)
    metrics = [m for m in metrics if any(values[arm].get(m) for arm in arms)]
    columns = min(4, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, metric in enumerate(metrics):
        axis = axes[index // columns][index % columns]
        for a, arm in enumerate(arms):
            seeds = [v for v in values[arm].get(metric, []) if v is not None]
            if not seeds:
                continue
            color = colors[a % len(colors)]
            axis.bar(
                a,
                float(np.mean(seeds)),
                yerr=float(np.std(seeds, ddof=1)) if len(seeds) > 1 else None,
                color=color,
                alpha=0.7,
                capsize=3,
            )
            axis.scatter([a] * len(seeds), seeds, color="k", s=8, zorder=3)
        axis.set_xticks(range(len(arms)))
        axis.set_xticklabels(arms, rotation=30, ha="right", fontsize=7)
        axis.set_title(metric, fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    for index in range(len(metrics), rows * columns):
        axes[index // columns][index % columns].axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
