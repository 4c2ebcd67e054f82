"""Tests of `moge_hf.losses` against references written independently, the obvious (slow) way.

The group-sparsity reference never uses `group_window_matrix`: it loops over tokens and windows, and reads each
window's cells off the expert map directly (expert `e` at row `e // cols`, column `e % cols`).
"""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moge_hf.losses import (
    default_map_shape,
    gaussian_window,
    group_sparsity_loss,
    group_window_matrix,
    load_balancing_loss,
    resolve_map_shape,
    router_z_loss,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: intra-op threads only add overhead (the file runs about twice as fast)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The losses compute in float32 from float64 inputs: compare at float32 precision.
RTOL = 2e-5
ATOL = 1e-7


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def reference_gaussian(window, sigma):
    """Normalized Gaussian weights, as nested Python lists of floats."""
    centre = window // 2
    raw = [
        [math.exp(-((i - centre) ** 2 + (j - centre) ** 2) / (2.0 * sigma**2)) for j in range(window)]
        for i in range(window)
    ]
    total = sum(sum(row) for row in raw)
    return [[value / total for value in row] for row in raw]


def reference_group_sparsity(probs, rows, cols, window, sigma, padding, reduction, mask=None):
    """Loop over tokens and windows; each window's norm is sqrt(sum_ij w_ij p_ij^2 + 1e-8)."""
    flat = probs.reshape(-1, rows * cols)
    keep = [True] * flat.shape[0] if mask is None else [bool(m) for m in mask.reshape(-1).tolist()]
    weights = torch.tensor(reference_gaussian(window, sigma), dtype=probs.dtype)
    if padding == "valid":
        corners = [(a, b) for a in range(rows - window + 1) for b in range(cols - window + 1)]
    else:
        corners = [(a, b) for a in range(rows) for b in range(cols)]
    # For every window, the expert index of each of its cells (modulo the map: a cell can repeat on a small torus).
    cells = torch.tensor(
        [
            [[((a + i) % rows) * cols + (b + j) % cols for j in range(window)] for i in range(window)]
            for a, b in corners
        ]
    )  # (num_windows, window, window)
    total = probs.new_zeros(())
    kept = 0
    for t in range(flat.shape[0]):
        if not keep[t]:
            continue
        kept += 1
        patches = flat[t][cells]  # (num_windows, window, window): the probs of each window's cells
        total = total + torch.sqrt((weights * patches * patches).sum(dim=(1, 2)) + 1e-8).sum()
    if reduction == "mean":
        return total / (kept * len(corners)) if kept else total
    return total / (window * window * len(corners))


def reference_load_balancing(probs, top_k_index, mask=None):
    """E * sum over slots k and experts e of (fraction of kept tokens whose slot k picks e) * (mean prob of e)."""
    num_experts = probs.shape[-1]
    flat_probs = probs.reshape(-1, num_experts)
    flat_index = top_k_index.reshape(flat_probs.shape[0], -1).tolist()
    keep = [True] * flat_probs.shape[0] if mask is None else [bool(m) for m in mask.reshape(-1).tolist()]
    kept = [t for t in range(flat_probs.shape[0]) if keep[t]]
    top_k = len(flat_index[0])
    loss = probs.new_zeros(())
    for e in range(num_experts):
        mean_prob = sum(flat_probs[t, e] for t in kept) / len(kept)
        for k in range(top_k):
            fraction = sum(1 for t in kept if flat_index[t][k] == e) / len(kept)
            loss = loss + fraction * mean_prob
    return num_experts * loss


def reference_z_loss(logits, mask=None):
    flat = logits.reshape(-1, logits.shape[-1])
    keep = [True] * flat.shape[0] if mask is None else [bool(m) for m in mask.reshape(-1).tolist()]
    terms = []
    for t in range(flat.shape[0]):
        if keep[t]:
            log_z = torch.log(torch.exp(flat[t]).sum())
            terms.append(log_z * log_z)
    return sum(terms) / len(terms) if terms else logits.new_zeros(())


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def make_probs(num_tokens, num_experts, seed=0):
    """Softmax probs in float64, plus two sparse tokens (exact zeros) so that the 1e-8 of the group norm matters."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64) * 2.0, dim=-1)
    probs[0] = 0.0
    probs[0, num_experts // 2] = 1.0
    if num_tokens > 2 and num_experts > 1:
        probs[2] = 0.0
        probs[2, 0] = 0.7
        probs[2, num_experts - 1] = 0.3
    return probs


def two_expert_token(num_experts, first, second):
    probs = torch.zeros(1, num_experts, dtype=torch.float64)
    probs[0, first] = 0.5
    probs[0, second] = 0.5
    return probs


# Six tokens, laid out as (T, E) or (B, S, E) = (2, 3, E); the masks hide tokens 1 and 4 (not the sparse ones).
SOME_MASK = torch.tensor([True, False, True, True, False, True])
INPUT_CASES = {
    "flat": ((6,), None),
    "flat-mask": ((6,), SOME_MASK),
    "batch": ((2, 3), None),
    "batch-mask-all": ((2, 3), torch.ones(6, dtype=torch.bool)),
    "batch-mask": ((2, 3), SOME_MASK),
}


def make_case(case, num_experts, seed=0):
    token_shape, mask = INPUT_CASES[case]
    probs = make_probs(6, num_experts, seed).reshape(*token_shape, num_experts).requires_grad_(True)
    return probs, None if mask is None else mask.reshape(token_shape)


# ----------------------------------------------------------------------------------------------------------------
# group_sparsity_loss against the reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "paper"])
@pytest.mark.parametrize("padding", ["valid", "circular"])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 10.0])
@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("map_shape", [(1, 4), (2, 2), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_group_sparsity_matches_reference(map_shape, window, sigma, padding, reduction):
    rows, cols = map_shape
    if padding == "valid" and window > min(rows, cols):
        pytest.skip("window does not fit the map with padding='valid'")
    # Every input layout and mask, in one test (one test per case would spend most of the time in pytest itself).
    for case in INPUT_CASES:
        probs, mask = make_case(case, rows * cols)

        actual = group_sparsity_loss(probs, map_shape, window, sigma, padding=padding, reduction=reduction, mask=mask)
        expected = reference_group_sparsity(probs, rows, cols, window, sigma, padding, reduction, mask)

        assert actual.dtype == torch.float32, case
        assert actual.dim() == 0, case
        torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL, msg=lambda m, c=case: f"{c}: {m}")

        (grad_actual,) = torch.autograd.grad(actual, probs)
        (grad_expected,) = torch.autograd.grad(expected, probs)
        assert torch.isfinite(grad_actual).all(), case
        torch.testing.assert_close(grad_actual, grad_expected, rtol=RTOL, atol=ATOL, msg=lambda m, c=case: f"{c}: {m}")
        if mask is not None:
            assert (grad_actual[~mask] == 0).all(), case


@pytest.mark.parametrize("reduction", ["mean", "paper"])
def test_group_sparsity_masked_tokens_are_ignored(reduction):
    probs = make_probs(6, 16, seed=3)
    mask = SOME_MASK
    full = group_sparsity_loss(probs, (4, 4), 3, 1.0, padding="circular", reduction=reduction, mask=mask)
    garbage = probs.clone()
    garbage[~mask] = 123.0
    with_garbage = group_sparsity_loss(garbage, (4, 4), 3, 1.0, padding="circular", reduction=reduction, mask=mask)
    kept_only = group_sparsity_loss(probs[mask], (4, 4), 3, 1.0, padding="circular", reduction=reduction)
    torch.testing.assert_close(with_garbage, full, rtol=0, atol=0)
    torch.testing.assert_close(full, kept_only, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reduction", ["mean", "paper"])
def test_group_sparsity_all_masked_is_zero_with_zero_grad(reduction):
    probs = make_probs(4, 16).requires_grad_(True)
    loss = group_sparsity_loss(probs, (4, 4), 2, 1.0, reduction=reduction, mask=torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, probs)
    assert torch.isfinite(grad).all()
    assert (grad == 0).all()


def test_group_sparsity_eps_on_empty_windows():
    # A one-hot token on a 4x8 map with window 1: 31 windows hold nothing, each has norm sqrt(1e-8) = 1e-4.
    probs = torch.zeros(1, 32, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        probs[0, 5] = 1.0
    loss = group_sparsity_loss(probs, (4, 8), 1, 1.0)
    expected = (math.sqrt(1.0 + 1e-8) + 31 * 1e-4) / 32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, probs)
    assert torch.isfinite(grad).all()
    assert (grad[0, torch.arange(32) != 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "paper"])
def test_group_sparsity_is_float32_under_autocast(dtype, reduction):
    # A confident router: in fp16 the far windows' squared probabilities and the 1e-8 underflow to 0 (the gradient
    # of sqrt(0) is infinite), and the paper reduction's sum over many tokens overflows.
    logits = torch.zeros(4096, 16)
    logits[:, 0] = 12.0
    grads = []
    for autocast in (False, True):
        z = logits.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = group_sparsity_loss(z.softmax(-1), (4, 4), window=2, sigma=1.0, reduction=reduction)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        grads.append(z.grad)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0])


def test_group_sparsity_is_row_major():
    # On a (2, 4) map, row-major: expert 4 sits at (1, 0), just below expert 0, while expert 2 sits at (0, 2), two
    # columns away. A 2x2 "valid" window holds experts 0 and 4 together, never experts 0 and 2.
    same_column = two_expert_token(8, 0, 4)
    two_columns_apart = two_expert_token(8, 0, 2)
    loss_same_column = group_sparsity_loss(same_column, (2, 4), 2, 1e6)
    loss_apart = group_sparsity_loss(two_columns_apart, (2, 4), 2, 1e6)
    # Uniform weights 1/4: sqrt(2 * 0.25 / 4) in one window vs sqrt(0.25 / 4) in three; the empty ones give 1e-4.
    assert loss_same_column.item() == pytest.approx((math.sqrt(0.125 + 1e-8) + 2e-4) / 3, rel=1e-5)
    assert loss_apart.item() == pytest.approx(3 * math.sqrt(0.0625 + 1e-8) / 3, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Map shapes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_experts, shape",
    [(1, (1, 1)), (7, (1, 7)), (12, (3, 4)), (13, (1, 13)), (16, (4, 4)), (32, (4, 8)), (36, (6, 6)), (64, (8, 8))],
)
def test_default_map_shape(num_experts, shape):
    assert default_map_shape(num_experts) == shape
    assert resolve_map_shape(num_experts, None) == shape
    assert resolve_map_shape(num_experts, shape) == shape


@pytest.mark.parametrize("num_experts, shape", [(16, (4, 4)), (32, (4, 8)), (12, (3, 4)), (7, (1, 7))])
def test_group_sparsity_none_map_shape_uses_default(num_experts, shape):
    probs = make_probs(5, num_experts, seed=1)
    actual = group_sparsity_loss(probs, None, 2, 1.0, padding="circular")
    expected = reference_group_sparsity(probs, *shape, 2, 1.0, "circular", "mean")
    torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL)
    if 1 < shape[0] < shape[1]:  # (a 1-row torus and its transpose give the same loss: the kernel is symmetric)
        transposed = reference_group_sparsity(probs, shape[1], shape[0], 2, 1.0, "circular", "mean")
        assert not torch.allclose(actual.double(), transposed, rtol=1e-3, atol=0)


def test_default_map_shape_rejects_zero():
    with pytest.raises(ValueError, match="num_experts"):
        default_map_shape(0)


# ----------------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.0, 10.0])
@pytest.mark.parametrize("reduction", ["mean", "paper"])
def test_neighbours_cost_less_than_far_apart_on_torus(sigma, reduction):
    # Group norms are sub-additive (sqrt(a + b) <= sqrt(a) + sqrt(b)): mass that shares windows is penalized less
    # than the same mass split across disjoint windows. On a torus every expert is in the same number of windows.
    near = two_expert_token(16, 0, 1)  # (0, 0) and (0, 1)
    far = two_expert_token(16, 0, 15)  # (0, 0) and (3, 3): opposite corners
    loss_near = group_sparsity_loss(near, (4, 4), 2, sigma, padding="circular", reduction=reduction)
    loss_far = group_sparsity_loss(far, (4, 4), 2, sigma, padding="circular", reduction=reduction)
    assert loss_near < loss_far


@pytest.mark.parametrize("sigma", [0.5, 1.0, 10.0])
def test_neighbours_cost_less_than_far_apart_valid_interior(sigma):
    # With padding="valid", border experts sit in fewer windows; compare experts in the interior of a 6x6 map, where
    # each of them sits in 4 windows of side 2.
    near = two_expert_token(36, 1 * 6 + 1, 1 * 6 + 2)  # (1, 1) and (1, 2)
    far = two_expert_token(36, 1 * 6 + 1, 4 * 6 + 4)  # (1, 1) and (4, 4)
    assert group_sparsity_loss(near, (6, 6), 2, sigma) < group_sparsity_loss(far, (6, 6), 2, sigma)


def test_neighbours_cost_less_than_corners_valid_small_sigma():
    # 4x4 map, window 2, padding="valid": neighbours (0, 0)-(0, 1) against opposite corners (0, 0)-(3, 3). This holds
    # for sigma <= 1 only: with a large sigma the corners, each in a single window, are cheaper (edge effect).
    near = two_expert_token(16, 0, 1)
    far = two_expert_token(16, 0, 15)
    assert group_sparsity_loss(near, (4, 4), 2, 1.0) < group_sparsity_loss(far, (4, 4), 2, 1.0)


@pytest.mark.parametrize("map_shape", [(2, 4), (4, 8), (8, 16)])
def test_on_a_torus_uniform_routing_is_the_regularizer_minimum(map_shape):
    # The loss is convex in the probabilities (a sum of square roots of positive quadratic forms) and, with
    # padding="circular", unchanged by the torus's translations, which reach every expert; so averaging any routing
    # over the translations gives the uniform routing, at no more cost. Over the probability simplex the
    # regularizer therefore pulls a router towards uniform, never towards one expert or one window.
    experts = map_shape[0] * map_shape[1]

    def loss(probs):
        return float(group_sparsity_loss(probs[None], map_shape, 3, 1.0, padding="circular"))

    uniform = loss(torch.full((experts,), 1.0 / experts))
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.1, 1.0, 10.0):
        for logits in torch.randn(32, experts, generator=generator) / temperature:
            assert loss(logits.softmax(-1)) > uniform
    assert loss(torch.eye(experts)[0]) > 2 * uniform  # a token on one expert costs more than twice a uniform one


def test_with_valid_padding_the_border_costs_less_than_uniform_routing():
    # The edge effect: a corner expert sits in one window, so routing all of a token there beats spreading it.
    corner, uniform = torch.eye(128)[:1], torch.full((1, 128), 1 / 128)
    assert group_sparsity_loss(corner, (8, 16), 3, 10.0) < group_sparsity_loss(uniform, (8, 16), 3, 10.0)


def test_group_sparsity_window_one_is_mean_abs():
    # A 1x1 window holds one expert: the loss is mean over tokens and experts of sqrt(p^2 + 1e-8).
    probs = make_probs(4, 12, seed=5)
    loss = group_sparsity_loss(probs, (3, 4), 1, 0.7)
    torch.testing.assert_close(loss.double(), torch.sqrt(probs**2 + 1e-8).mean(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("window", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_gaussian_window_sums_to_one_and_symmetric(window, sigma):
    weights = gaussian_window(window, sigma, dtype=torch.float64)
    assert weights.shape == (window, window)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor(reference_gaussian(window, sigma), dtype=torch.float64))
    torch.testing.assert_close(weights, weights.T)
    centre = window // 2
    assert weights[centre, centre] == weights.max()
    assert (weights > 0).all()
    if window % 2 == 1:
        torch.testing.assert_close(weights, weights.flip(0))
        torch.testing.assert_close(weights, weights.flip(1))


@pytest.mark.parametrize("window", [1, 2, 3, 4])
def test_gaussian_window_large_sigma_is_uniform(window):
    weights = gaussian_window(window, 1e6, dtype=torch.float64)
    torch.testing.assert_close(weights, torch.full((window, window), 1.0 / window**2, dtype=torch.float64))


def test_gaussian_window_small_sigma_is_a_point():
    weights = gaussian_window(3, 0.05, dtype=torch.float64)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[1, 1] = 1.0
    torch.testing.assert_close(weights, expected)


def test_gaussian_window_default_dtype():
    assert gaussian_window(3, 1.0).dtype == torch.float32


def test_group_window_matrix_circular_counts_cells_twice():
    # A 3x3 window on a 2x2 torus covers 9 cells of a 4-cell map: with a uniform kernel, each window weighs expert
    # (a, b) by 4/9, (a+1, b) and (a, b+1) by 2/9, (a+1, b+1) by 1/9; every column sums to 1.
    matrix = group_window_matrix((2, 2), 3, 1e6, padding="circular", dtype=torch.float64)
    assert matrix.shape == (4, 4)
    torch.testing.assert_close(matrix.sum(0), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(
        matrix[:, 0], torch.tensor([4.0, 2.0, 2.0, 1.0], dtype=torch.float64) / 9, rtol=1e-9, atol=1e-9
    )


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_error_map_shape_does_not_match_experts():
    probs = make_probs(3, 16)
    with pytest.raises(ValueError, match="experts"):
        group_sparsity_loss(probs, (3, 5), 2, 1.0)
    with pytest.raises(ValueError, match="experts"):
        resolve_map_shape(16, (2, 4))


@pytest.mark.parametrize("map_shape", [(4,), (4, 4, 1), (0, 16), (4.0, 4), (True, 16), (-4, -4)])
def test_error_map_shape_malformed(map_shape):
    with pytest.raises(ValueError, match="map_shape"):
        resolve_map_shape(16, map_shape)


def test_error_window_too_large_for_valid_but_fine_for_circular():
    probs = make_probs(3, 8)
    with pytest.raises(ValueError, match="does not fit"):
        group_sparsity_loss(probs, (2, 4), 3, 1.0, padding="valid")
    with pytest.raises(ValueError, match="does not fit"):
        group_window_matrix((4, 4), 5, 1.0)
    loss = group_sparsity_loss(probs, (2, 4), 3, 1.0, padding="circular")
    assert torch.isfinite(loss)
    expected = reference_group_sparsity(probs, 2, 4, 3, 1.0, "circular", "mean")
    torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("window", [0, -1, 2.0, True, None])
def test_error_window_not_positive_int(window):
    with pytest.raises(ValueError, match="window"):
        group_sparsity_loss(make_probs(2, 16), (4, 4), window, 1.0)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), "1.0", None])
def test_error_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        group_sparsity_loss(make_probs(2, 16), (4, 4), 2, sigma)


def test_error_unknown_padding():
    with pytest.raises(ValueError, match="padding"):
        group_sparsity_loss(make_probs(2, 16), (4, 4), 2, 1.0, padding="same")


def test_error_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        group_sparsity_loss(make_probs(2, 16), (4, 4), 2, 1.0, reduction="sum")


@pytest.mark.parametrize(
    "probs_shape, mask_shape",
    [((6, 16), (5,)), ((6, 16), (6, 1)), ((2, 3, 16), (6,)), ((2, 3, 16), (3, 2)), ((2, 3, 16), (2, 3, 16))],
)
def test_error_mask_shape_mismatch(probs_shape, mask_shape):
    probs = torch.softmax(torch.randn(probs_shape), dim=-1)
    mask = torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask"):
        group_sparsity_loss(probs, (4, 4), 2, 1.0, mask=mask)
    top_k_index = probs.topk(2, dim=-1).indices
    with pytest.raises(ValueError, match="mask"):
        load_balancing_loss(probs, top_k_index, mask=mask)
    with pytest.raises(ValueError, match="mask"):
        router_z_loss(probs, mask=mask)


@pytest.mark.parametrize("shape", [(16,), ()])
def test_error_probs_need_two_dims(shape):
    with pytest.raises(ValueError, match="shape"):
        group_sparsity_loss(torch.full(shape, 1.0 / 16), (4, 4), 2, 1.0)


def test_error_top_k_index_shape_mismatch():
    probs = torch.softmax(torch.randn(6, 8), dim=-1)
    with pytest.raises(ValueError, match="top_k_index"):
        load_balancing_loss(probs, torch.zeros(5, 2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# load_balancing_loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_load_balancing_matches_reference(case, top_k):
    torch.manual_seed(top_k)
    token_shape, mask = INPUT_CASES[case]
    mask = None if mask is None else mask.reshape(token_shape)
    probs = torch.softmax(torch.randn(*token_shape, 8, dtype=torch.float64), dim=-1).requires_grad_(True)
    top_k_index = probs.detach().topk(top_k, dim=-1).indices

    actual = load_balancing_loss(probs, top_k_index, mask=mask)
    expected = reference_load_balancing(probs, top_k_index, mask)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL)

    (grad_actual,) = torch.autograd.grad(actual, probs)
    (grad_expected,) = torch.autograd.grad(expected, probs)
    torch.testing.assert_close(grad_actual, grad_expected, rtol=RTOL, atol=ATOL)


def test_load_balancing_sums_over_slots():
    # Swapping the k slots of every token leaves the loss unchanged; sending one slot to another expert changes it.
    gen = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(5, 6, generator=gen, dtype=torch.float64), dim=-1)
    index = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 2], [1, 3]])
    base = load_balancing_loss(probs, index)
    torch.testing.assert_close(base.double(), reference_load_balancing(probs, index), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(load_balancing_loss(probs, index.flip(-1)), base)
    moved = index.clone()
    moved[0, 1] = 5
    changed = load_balancing_loss(probs, moved)
    torch.testing.assert_close(changed.double(), reference_load_balancing(probs, moved), rtol=RTOL, atol=ATOL)
    assert abs(changed.item() - base.item()) > 1e-3


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_load_balancing_uniform_is_k(top_k):
    num_experts = 8
    probs = torch.full((2 * num_experts, num_experts), 1.0 / num_experts)
    tokens = torch.arange(2 * num_experts)
    top_k_index = torch.stack([(tokens + slot) % num_experts for slot in range(top_k)], dim=-1)
    loss = load_balancing_loss(probs, top_k_index)
    assert loss.item() == pytest.approx(top_k, rel=1e-6)


def test_load_balancing_collapsed_routing_is_large():
    # Every token on expert 0 with all its probability: E * 1 * 1 = E, the worst case for k = 1.
    probs = torch.zeros(4, 8)
    probs[:, 0] = 1.0
    loss = load_balancing_loss(probs, torch.zeros(4, 1, dtype=torch.long))
    assert loss.item() == pytest.approx(8.0)


def test_load_balancing_masked_tokens_excluded():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 5, 8), dim=-1).requires_grad_(True)
    top_k_index = probs.detach().topk(2, dim=-1).indices
    mask = torch.tensor([[True, True, False, True, False], [True, False, True, True, True]])
    masked = load_balancing_loss(probs, top_k_index, mask=mask)
    kept_only = load_balancing_loss(probs[mask], top_k_index[mask])
    torch.testing.assert_close(masked, kept_only, rtol=1e-6, atol=1e-7)
    # Changing what the padding tokens hold does not change anything.
    other_index = top_k_index.clone()
    other_index[~mask] = 0
    other_probs = probs.detach().clone()
    other_probs[~mask] = 1.0 / 8
    torch.testing.assert_close(load_balancing_loss(other_probs, other_index, mask=mask), masked.detach())
    (grad,) = torch.autograd.grad(masked, probs)
    assert (grad[~mask] == 0).all()
    assert (grad[mask] != 0).any()


def test_load_balancing_all_masked_is_zero():
    probs = torch.softmax(torch.randn(3, 8), dim=-1)
    loss = load_balancing_loss(probs, probs.topk(2, dim=-1).indices, mask=torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("with_mask", [False, True])
def test_load_balancing_matches_transformers(num_layers, top_k, with_mask):
    torch.manual_seed(10 * num_layers + top_k)
    batch, seq, num_experts = 2, 5, 8
    logits = [torch.randn(batch * seq, num_experts, requires_grad=True) for _ in range(num_layers)]
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]) if with_mask else None

    expected = load_balancing_loss_func(
        tuple(logits), num_experts=num_experts, top_k=top_k, attention_mask=attention_mask
    )
    probs = torch.softmax(torch.cat(logits, dim=0), dim=-1)
    top_k_index = probs.detach().topk(top_k, dim=-1).indices
    mask = None if attention_mask is None else attention_mask.reshape(-1).bool().repeat(num_layers)
    actual = load_balancing_loss(probs, top_k_index, mask=mask)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)

    grads_actual = torch.autograd.grad(actual, logits)
    grads_expected = torch.autograd.grad(expected, logits)
    for grad_actual, grad_expected in zip(grads_actual, grads_expected):
        torch.testing.assert_close(grad_actual, grad_expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# router_z_loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_router_z_loss_matches_reference(case):
    torch.manual_seed(1)
    token_shape, mask = INPUT_CASES[case]
    mask = None if mask is None else mask.reshape(token_shape)
    logits = (3.0 * torch.randn(*token_shape, 8, dtype=torch.float64)).requires_grad_(True)
    actual = router_z_loss(logits, mask=mask)
    expected = reference_z_loss(logits, mask)
    assert actual.dtype == torch.float32
    assert actual.dim() == 0
    torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL)
    (grad_actual,) = torch.autograd.grad(actual, logits)
    (grad_expected,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad_actual, grad_expected, rtol=RTOL, atol=ATOL)
    if mask is not None:
        assert (grad_actual[~mask] == 0).all()


def test_router_z_loss_known_value_and_large_logits():
    # logsumexp of E equal logits c is c + log(E).
    logits = torch.full((3, 4), 2.0)
    assert router_z_loss(logits).item() == pytest.approx((2.0 + math.log(4)) ** 2)
    # No overflow for large logits (a naive exp would give inf).
    big = torch.full((2, 4), 1000.0)
    assert router_z_loss(big).item() == pytest.approx((1000.0 + math.log(4)) ** 2, rel=1e-6)


def test_router_z_loss_masked_tokens_excluded():
    logits = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, False, True, True], [False, False, True, True]])
    torch.testing.assert_close(router_z_loss(logits, mask=mask), router_z_loss(logits[mask]))
    assert router_z_loss(logits, mask=torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def test_tiny_sigma_gives_a_single_point_window():
    """A sigma whose square underflows to 0 still gives the limit (all weight on the centre), not NaN."""
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[1, 1] = 1.0
    torch.testing.assert_close(gaussian_window(3, 1e-200, dtype=torch.float64), expected)
    probs = torch.softmax(torch.randn(5, 16), dim=-1)
    assert torch.isfinite(group_sparsity_loss(probs, (4, 4), 3, 1e-200))


def test_dispatch_counts_and_given_dispatch_fraction():
    """`dispatch_counts` summed over shards, divided, gives the fractions of the whole batch; passing them as
    `dispatch_fraction` to each shard's loss makes the mean of the shards' losses the whole batch's loss."""
    from moge_hf.losses import dispatch_counts

    generator = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(12, 6, generator=generator, dtype=torch.float64), dim=-1)
    top_k = probs.topk(2, dim=-1).indices
    mask = torch.ones(12, dtype=torch.bool)
    mask[[3, 9]] = False
    counts, tokens = dispatch_counts(top_k, 6, mask)
    assert tokens == 10 and counts.shape == (2, 6) and counts.sum() == 20
    whole = load_balancing_loss(probs, top_k, mask)
    torch.testing.assert_close(load_balancing_loss(probs, top_k, mask, counts / tokens), whole.float())
    # Two shards of 6 tokens with the same number of real tokens each: global fractions reproduce the whole batch.
    shards = [slice(0, 6), slice(6, 12)]
    total_counts = sum(dispatch_counts(top_k[s], 6, mask[s])[0] for s in shards)
    fraction = total_counts / mask.sum()
    shard_losses = [load_balancing_loss(probs[s], top_k[s], mask[s], fraction) for s in shards]
    torch.testing.assert_close(sum(shard_losses) / 2, whole.float())
    with pytest.raises(ValueError, match="dispatch_fraction"):
        load_balancing_loss(probs, top_k, mask, torch.ones(1, 6))


@pytest.mark.parametrize("masked", [False, True], ids=["no-tokens", "all-masked"])
def test_every_loss_is_zero_over_no_tokens(masked):
    # One documented behaviour for an empty batch and for a batch of padding only: 0, with a (zero) gradient.
    tokens = 5 if masked else 0
    logits = torch.randn(tokens, 8, requires_grad=True)
    mask = torch.zeros(tokens, dtype=torch.bool) if masked else None
    for reduction in ("mean", "paper"):
        probs = logits.softmax(-1)
        index = probs.topk(2, dim=-1).indices
        losses = [
            group_sparsity_loss(probs, (2, 4), 2, 1.0, reduction=reduction, mask=mask),
            load_balancing_loss(probs, index, mask),
            router_z_loss(logits, mask),
        ]
        for loss in losses:
            assert loss.shape == () and loss.item() == 0.0
        (grad,) = torch.autograd.grad(sum(losses), logits)
        assert not grad.any()
