"""Routing losses of a MoGE layer, as plain functions.

- `group_sparsity_loss`: the topographic group-sparsity regularizer of MoGE (Kang et al., "Mixture of Group Experts
  for Learning Invariant Representations", arXiv 2504.09265).
- `load_balancing_loss`: the Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4-6).
- `router_z_loss`: the ST-MoE router z-loss (Zoph et al. 2022, eq. 5).

Every function takes an optional boolean `mask` over tokens; `False` marks a padding token, which then takes no
part in the loss. Over no tokens (an empty batch, or every token masked) each loss is 0, still in the autograd graph.
All losses are returned unscaled; the models multiply them by their config coefficients.
"""

import math

import torch
import torch.nn.functional as F


__all__ = [
    "default_map_shape",
    "dispatch_counts",
    "gaussian_window",
    "group_sparsity_loss",
    "group_window_matrix",
    "load_balancing_loss",
    "resolve_map_shape",
    "router_z_loss",
]

GROUP_NORM_EPS = 1e-8
PADDINGS = ("valid", "circular")
REDUCTIONS = ("mean", "paper")
MAX_SIGMA = 1e150  # sigma enters the window weights squared: above ~1.3e154 its square overflows a float


def default_map_shape(num_experts: int) -> tuple[int, int]:
    """The most square factorization `(rows, cols)` of `num_experts`, with `rows <= cols` (16 -> 4x4, 32 -> 4x8)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    rows = math.isqrt(num_experts)
    while num_experts % rows:
        rows -= 1
    return rows, num_experts // rows


def resolve_map_shape(num_experts: int, map_shape=None) -> tuple[int, int]:
    """`map_shape` checked against `num_experts`, or the default near-square map when it is `None`."""
    if map_shape is None:
        return default_map_shape(num_experts)
    if len(map_shape) != 2 or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in map_shape):
        raise ValueError(f"map_shape must be two positive integers (rows, cols), got {map_shape!r}")
    rows, cols = map_shape
    if rows * cols != num_experts:
        raise ValueError(f"map_shape {rows}x{cols} holds {rows * cols} experts, but there are {num_experts} experts")
    return rows, cols


def _check_window(map_shape: tuple[int, int], window: int, sigma: float, padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if padding == "valid" and window > min(map_shape):
        raise ValueError(
            f"window={window} does not fit in the {map_shape[0]}x{map_shape[1]} expert map with padding='valid'; "
            f"use window <= {min(map_shape)} or padding='circular'"
        )
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def gaussian_window(window: int, sigma: float, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `(window, window)` Gaussian weights `exp(-((i - h//2)^2 + (j - h//2)^2) / (2 sigma^2))`, summing to 1."""
    offsets = torch.arange(window, device=device, dtype=torch.float64) - window // 2
    squared_distance = offsets[:, None] ** 2 + offsets[None, :] ** 2
    # The centre has exponent 0 whatever sigma is (also when sigma**2 underflows to 0).
    exponent = torch.where(squared_distance > 0, -squared_distance / (2.0 * float(sigma) ** 2), 0.0)
    weights = torch.exp(exponent)
    return (weights / weights.sum()).to(dtype)


def group_window_matrix(
    map_shape: tuple[int, int],
    window: int,
    sigma: float,
    padding: str = "valid",
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The windows of the expert map as one linear map: `M[e, g]` is the Gaussian weight of expert `e` in window `g`.

    Expert `e` sits at row `e // cols`, column `e % cols` of the map. Windows are `window x window`, stride 1, in
    row-major order of their top-left corner: `(rows - window + 1) * (cols - window + 1)` of them with
    `padding="valid"`, `rows * cols` with `padding="circular"` (the map is a torus). Then
    `(probs ** 2) @ M` is the Gaussian-weighted sum of squared routing probabilities of every window.

    Returns:
        `torch.Tensor` of shape `(num_experts, num_windows)`.
    """
    _check_window(map_shape, window, sigma, padding)
    experts, squared_distance = window_layout(map_shape, window, padding)
    return window_matrix_from_layout(experts, squared_distance, sigma, map_shape[0] * map_shape[1]).to(
        device=device, dtype=dtype
    )


def window_layout(
    map_shape: tuple[int, int], window: int, padding: str = "valid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the windows of the expert map fall, independent of sigma.

    Returns `experts` `(G, window * window)` int64, the expert under each cell of each window, and `squared_distance`
    `(G, window * window)` float64, the cell's squared distance to the window's centre cell `(h // 2, h // 2)`.
    Windows are in row-major order of their top-left corner, cells in row-major order within a window.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    rows, cols = map_shape
    if padding == "valid":
        corners = torch.cartesian_prod(torch.arange(rows - window + 1), torch.arange(cols - window + 1))
    else:
        corners = torch.cartesian_prod(torch.arange(rows), torch.arange(cols))
    cells = torch.cartesian_prod(torch.arange(window), torch.arange(window))  # (h*h, 2)
    positions = corners.reshape(-1, 1, 2) + cells  # (G, h*h, 2)
    experts = (positions[..., 0] % rows) * cols + positions[..., 1] % cols
    squared_distance = ((cells - window // 2) ** 2).sum(-1).to(torch.float64).expand(experts.shape[0], -1)
    return experts, squared_distance.contiguous()


def window_matrix_from_layout(
    experts: torch.Tensor, squared_distance: torch.Tensor, sigma: float, num_experts: int
) -> torch.Tensor:
    """`group_window_matrix` from a `window_layout`, on the layout's device with no host round trip: `(E, G)`."""
    # The centre has exponent 0 whatever sigma is (also when sigma**2 underflows to 0).
    exponent = torch.where(squared_distance > 0, -squared_distance / (2.0 * float(sigma) ** 2), 0.0)
    weights = torch.exp(exponent)
    weights = weights / weights.sum(-1, keepdim=True)  # (G, h*h), each row the normalized Gaussian
    num_windows = experts.shape[0]
    window_index = torch.arange(num_windows, device=experts.device).unsqueeze(-1).expand_as(experts)
    matrix = weights.new_zeros(num_experts, num_windows)
    # accumulate: on a torus smaller than the window, one expert can fall in a window twice.
    return matrix.index_put_((experts.reshape(-1), window_index.reshape(-1)), weights.reshape(-1), accumulate=True)


def _token_mask(mask: torch.Tensor | None, leading_shape: torch.Size, name: str) -> torch.Tensor | None:
    """`mask` flattened to `(T,)` floats, after checking that it matches the tokens of `name`."""
    if mask is None:
        return None
    if mask.shape != leading_shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, but {name} has tokens of shape {tuple(leading_shape)}")
    return mask.reshape(-1).to(torch.float32)


def _mean_over_tokens(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token `values` `(T, ...)` over the tokens the float mask `(T,)` keeps: 0 over no tokens (none
    given, or none kept), still in the autograd graph."""
    if mask is None:
        return values.mean(0) if values.shape[0] else values.sum(0)
    mask = mask.view(-1, *([1] * (values.dim() - 1)))
    return (values * mask).sum(0) / mask.sum().clamp(min=1.0)


def _group_sparsity_from_matrix(
    router_probs: torch.Tensor,
    window_matrix: torch.Tensor,
    window: int,
    reduction: str,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """`group_sparsity_loss` with the window matrix already built; `router_probs` is `(T, E)`, `mask` `(T,)` floats."""
    probs = router_probs.float()
    # In float32 under autocast too: in fp16 the squares of small probabilities and the 1e-8 underflow to 0, and the
    # gradient of sqrt(0) is infinite; bf16 would round the window sums.
    with torch.autocast(probs.device.type, enabled=False):
        norms = torch.sqrt((probs * probs) @ window_matrix.float() + GROUP_NORM_EPS)  # (T, G)
    if reduction == "mean":
        return _mean_over_tokens(norms, mask).mean()
    # "paper": the authors' sum over tokens and windows, divided by h*h and the number of windows.
    per_token = norms.sum(-1) if mask is None else norms.sum(-1) * mask  # (T,)
    return per_token.sum() / (window * window * window_matrix.shape[1])


def group_sparsity_loss(
    router_probs: torch.Tensor,
    map_shape: tuple[int, int] | None,
    window: int,
    sigma: float,
    padding: str = "valid",
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoGE topographic group-sparsity regularizer, unscaled.

    Each token's routing probabilities are laid out on the `rows x cols` expert map and squared; every
    `window x window` window (stride 1) sums them with normalized Gaussian weights, and the square root of that sum
    (plus 1e-8) is the window's group norm; the loss averages them. Among routings that spread a token's mass over
    the same number of experts, it is lowest when those experts sit together on the map (they share windows). Like
    any sum of L2 norms under a fixed L1 budget, it also falls as the mass spreads over more experts: uniform routing
    scores lowest of all.

    Args:
        router_probs (`torch.Tensor` of shape `(..., num_experts)`):
            Routing probabilities `softmax(router_logits)` (before any routing noise), one row per token.
        map_shape (`tuple[int, int]`, *optional*):
            `(rows, cols)` of the expert map with `rows * cols == num_experts`; `None` takes the most square one.
        window (`int`):
            Side `h` of the square windows.
        sigma (`float`):
            Standard deviation of the Gaussian window weights, in map cells.
        padding (`str`, *optional*, defaults to `"valid"`):
            `"valid"`: windows lie inside the map, as in the paper. `"circular"`: the map wraps around (a torus), so
            every expert sits in the same number of windows.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: mean of the group norms over tokens and windows. `"paper"`: the authors' sum over tokens and
            windows divided by `window**2 * num_windows`, so that their coefficients carry over.
        mask (`torch.BoolTensor` of shape `router_probs.shape[:-1]`, *optional*):
            `False` for padding tokens, which are left out.

    Returns:
        `torch.Tensor`: a float32 scalar.

    Example:

    ```python
    >>> import torch
    >>> from moge_hf import group_sparsity_loss
    >>> probs = torch.softmax(torch.randn(10, 16), dim=-1)
    >>> loss = group_sparsity_loss(probs, map_shape=(4, 4), window=3, sigma=1.0)
    ```
    """
    if router_probs.dim() < 2:
        raise ValueError(f"router_probs must have shape (..., num_experts), got {tuple(router_probs.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    num_experts = router_probs.shape[-1]
    map_shape = resolve_map_shape(num_experts, map_shape)
    token_mask = _token_mask(mask, router_probs.shape[:-1], "router_probs")
    matrix = group_window_matrix(map_shape, window, sigma, padding, device=router_probs.device)
    return _group_sparsity_from_matrix(router_probs.reshape(-1, num_experts), matrix, window, reduction, token_mask)


def dispatch_counts(
    top_k_index: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many (unmasked) tokens each top-k slot sends to each expert, and how many tokens there are.

    Returns:
        `(counts, num_tokens)`: float32 tensors of shapes `(k, num_experts)` and `()`. Summed over data-parallel
        ranks and divided, they give the dispatch fractions of the global batch (`load_balancing_loss`'s
        `dispatch_fraction`).
    """
    token_mask = _token_mask(mask, top_k_index.shape[:-1], "top_k_index")
    dispatch = F.one_hot(top_k_index.reshape(-1, top_k_index.shape[-1]), num_experts).float()  # (T, k, E)
    if token_mask is None:
        return dispatch.sum(0), torch.tensor(float(dispatch.shape[0]), device=dispatch.device)
    return (dispatch * token_mask[:, None, None]).sum(0), token_mask.sum()


def load_balancing_loss(
    router_probs: torch.Tensor,
    top_k_index: torch.Tensor,
    mask: torch.Tensor | None = None,
    dispatch_fraction: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), generalized to top-k as in transformers.

    `num_experts * sum_e f_e * P_e`, where `f_e` is the fraction of tokens whose top-k choices include expert `e`
    (summed over the k slots) and `P_e` the mean routing probability of `e`. It is `k` for perfectly uniform routing.

    Args:
        router_probs (`torch.Tensor` of shape `(..., num_experts)`): routing probabilities.
        top_k_index (`torch.LongTensor` of shape `(..., k)`): the experts each token is sent to.
        mask (`torch.BoolTensor` of shape `router_probs.shape[:-1]`, *optional*): `False` for padding tokens.
        dispatch_fraction (`torch.Tensor` of shape `(k, num_experts)`, *optional*):
            The fractions `f` to use instead of this batch's own, e.g. those of the global batch over data-parallel
            ranks (see `dispatch_counts`). `f` carries no gradient in either case.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    if top_k_index.shape[:-1] != router_probs.shape[:-1]:
        raise ValueError(
            f"top_k_index has shape {tuple(top_k_index.shape)}, router_probs {tuple(router_probs.shape)}: "
            "they must agree on the token dimensions"
        )
    num_experts = router_probs.shape[-1]
    token_mask = _token_mask(mask, router_probs.shape[:-1], "router_probs")
    probs = router_probs.reshape(-1, num_experts).float()
    if dispatch_fraction is None:
        dispatch = F.one_hot(top_k_index.reshape(-1, top_k_index.shape[-1]), num_experts).float()  # (T, k, E)
        dispatch_fraction = _mean_over_tokens(dispatch, token_mask)  # (k, E)
    elif dispatch_fraction.shape != (top_k_index.shape[-1], num_experts):
        raise ValueError(
            f"dispatch_fraction has shape {tuple(dispatch_fraction.shape)}, expected "
            f"(k, num_experts) = {(top_k_index.shape[-1], num_experts)}"
        )
    prob_per_expert = _mean_over_tokens(probs, token_mask)  # (E,)
    return num_experts * (dispatch_fraction * prob_per_expert).sum()


def router_z_loss(router_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of `logsumexp(router_logits) ** 2`.

    Args:
        router_logits (`torch.Tensor` of shape `(..., num_experts)`): router logits.
        mask (`torch.BoolTensor` of shape `router_logits.shape[:-1]`, *optional*): `False` for padding tokens.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    token_mask = _token_mask(mask, router_logits.shape[:-1], "router_logits")
    log_z = torch.logsumexp(router_logits.reshape(-1, router_logits.shape[-1]).float(), dim=-1)  # (T,)
    return _mean_over_tokens(log_z * log_z, token_mask)
