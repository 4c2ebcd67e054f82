"""The MoGE layer's parts: router, experts (every experts implementation) and block, against obvious references."""

import pytest
import torch
import torch.nn.functional as F
from tiny import CASES, case_names, dense_mlp_weights, gpt2_config, moge_blocks_by_path

from moge_hf import MoGEExperts, MoGERouter, MoGESparseMoeBlock
from moge_hf.losses import group_sparsity_loss, load_balancing_loss, router_z_loss
from moge_hf.moge_layer import routing_losses
from moge_hf.routing import RoutingRecorder, moge_routers


IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]
# moge_hf's eager forward runs `sliced_forward` on CPU and `grouped_forward` on a GPU: test both here.
PATHS = [*IMPLEMENTATIONS, "eager-grouped"]


def run_experts(experts, path, *inputs):
    return experts.grouped_forward(*inputs) if path == "eager-grouped" else experts(*inputs)


def make_experts(implementation, num_experts=6, hidden=16, intermediate=24, activation="gelu_new", seed=0):
    config = gpt2_config(
        num_experts=num_experts, num_experts_per_tok=1, moge_map_shape=None, moge_window=1, moge_padding="circular"
    )
    config._experts_implementation = implementation
    experts = MoGEExperts(config, hidden, intermediate, activation)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return experts


def per_token_reference(experts, hidden_states, top_k_index, top_k_weights):
    """sum_j w_tj * MLP_{e_tj}(x_t), one token and one slot at a time."""
    rows = []
    for t in range(hidden_states.shape[0]):
        out = torch.zeros_like(hidden_states[t])
        for slot in range(top_k_index.shape[1]):
            e = int(top_k_index[t, slot])
            hidden = experts.act_fn(experts.up_proj[e] @ hidden_states[t] + experts.up_proj_bias[e])
            out = out + top_k_weights[t, slot] * (experts.down_proj[e] @ hidden + experts.down_proj_bias[e])
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,starve",
    # 32 experts: in training on CPU, the default takes the grouped GEMMs
    [(1, 4, 1, False), (17, 6, 2, False), (17, 6, 2, True), (40, 8, 3, True), (9, 1, 1, False), (50, 32, 2, True)],
)
def test_experts_match_per_token_loop(path, num_tokens, num_experts, top_k, starve):
    experts = make_experts(path.split("-")[0], num_experts=num_experts)
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(num_tokens, 16, generator=generator, requires_grad=True)
    scores = torch.randn(num_tokens, num_experts, generator=generator)
    if starve:  # half of the experts get no token at all
        scores[:, : num_experts // 2] = -1e9
    weights, index = scores.softmax(-1).topk(top_k, dim=-1)
    weights = weights.detach().requires_grad_(True)

    out = run_experts(experts, path, hidden_states, index, weights)
    ref = per_token_reference(experts, hidden_states, index, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(out)
    inputs = [hidden_states, weights, *experts.parameters()]
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        got = torch.zeros_like(want) if got is None else got
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_experts_on_no_tokens_give_an_empty_output_in_the_graph(path):
    experts = make_experts(path.split("-")[0], num_experts=32)
    hidden_states = torch.randn(0, 16, requires_grad=True)
    weights = torch.rand(0, 2, requires_grad=True)
    index = torch.zeros(0, 2, dtype=torch.long)
    out = run_experts(experts, path, hidden_states, index, weights)
    assert out.shape == (0, 16) and out.requires_grad
    out.sum().backward()
    assert hidden_states.grad.shape == (0, 16)


@pytest.mark.parametrize("path", ["eager", "eager-grouped"])
def test_experts_under_bf16_autocast_keep_fp32_weights_and_output(path):
    experts = make_experts("eager", num_experts=6)
    generator = torch.Generator().manual_seed(2)
    hidden_states = torch.randn(33, 16, generator=generator)
    weights, index = torch.randn(33, 6, generator=generator).softmax(-1).topk(2, dim=-1)
    ref = per_token_reference(experts, hidden_states, index, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_experts(experts, path, hidden_states, index, weights)
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    out.sum().backward()
    assert all(param.grad is not None and param.grad.dtype == torch.float32 for param in experts.parameters())


def test_router_topk_and_gate_weights():
    config = gpt2_config(num_experts=8, num_experts_per_tok=2)
    router = MoGERouter(config, 32)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(11, 32)
    routing = router(x)
    probs = F.softmax(x @ router.weight.T, dim=-1)
    torch.testing.assert_close(routing.probs, probs)
    assert routing.probs.dtype == torch.float32
    top_w, top_i = probs.topk(2, dim=-1)
    assert torch.equal(routing.top_k_index, top_i)
    torch.testing.assert_close(routing.top_k_weights, top_w / top_w.sum(-1, keepdim=True))  # k > 1: renormalized


def test_router_top1_keeps_switch_gate_weights():
    """With k = 1 the gate weight is the router probability (not 1), so the router gets the task's gradient."""
    config = gpt2_config(num_experts=8, num_experts_per_tok=1)
    router = MoGERouter(config, 32)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(11, 32)
    routing = router(x)
    torch.testing.assert_close(routing.top_k_weights[:, 0], routing.probs.max(-1).values)
    assert (routing.top_k_weights < 1).all()
    routing.top_k_weights.sum().backward()
    assert router.weight.grad.abs().sum() > 0

    renorm = MoGERouter(gpt2_config(num_experts=8, num_experts_per_tok=1, norm_topk_prob=True), 32)
    renorm.load_state_dict(router.state_dict())
    torch.testing.assert_close(renorm(x).top_k_weights, torch.ones(11, 1))


def test_router_jitter_only_in_training_and_regularizer_sees_clean_logits():
    config = gpt2_config(router_jitter_noise=0.5)
    router = MoGERouter(config, 32)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(11, 32)
    router.train()
    routing = router(x)
    torch.testing.assert_close(routing.clean_logits, x @ router.weight.T)
    assert not torch.allclose(routing.logits, routing.clean_logits)
    router.eval()
    routing = router(x)
    assert routing.logits is routing.clean_logits


def test_block_losses_match_the_loss_functions():
    config = gpt2_config(moge_sigma=0.7, moge_padding="circular", moge_reduction="paper")
    block = MoGESparseMoeBlock(config, 32, 37, "gelu_new", dropout=0.0)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.2)
    x = torch.randn(3, 5, 32)
    mask = torch.rand(3, 5) > 0.3
    recorder = RoutingRecorder(moge_routers(block))
    recorder.begin()
    block(x)
    ((_, routing, _),) = recorder.end()
    losses = routing_losses(routing, block.regularizer, mask.reshape(-1).float())
    flat_mask = mask.reshape(-1)
    torch.testing.assert_close(
        losses["moge_loss"],
        group_sparsity_loss(routing.probs, (2, 4), 2, 0.7, padding="circular", reduction="paper", mask=flat_mask),
    )
    torch.testing.assert_close(losses["aux_loss"], load_balancing_loss(routing.probs, routing.top_k_index, flat_mask))
    torch.testing.assert_close(losses["z_loss"], router_z_loss(routing.logits, flat_mask))


def test_block_set_sigma_rebuilds_window_weights():
    config = gpt2_config(moge_sigma=1.0)
    block = MoGESparseMoeBlock(config, 32, 37, "gelu_new", dropout=0.0)
    probs = torch.softmax(torch.randn(10, 8), -1)
    block.regularizer.set_sigma(5.0)
    assert block.regularizer.sigma == 5.0
    routing = block.router(torch.randn(10, 32))._replace(probs=probs)
    got = routing_losses(routing, block.regularizer, None)["moge_loss"]
    torch.testing.assert_close(got, group_sparsity_loss(probs, (2, 4), 2, 5.0))


@pytest.mark.parametrize("case", case_names(moge_hf=True))
def test_one_expert_top1_equals_dense(case):
    """A MoGE model with one expert per layer, top-1, and the dense weights copied (each block where the dense MLP it
    replaced sat) is the dense model."""
    spec = CASES[case]
    moge = spec.build(moe_layers=[0, 1], num_experts=1, num_experts_per_tok=1, moge_map_shape=None, moge_window=1)
    moge.eval()
    dense = spec.build_dense()
    state = dense.state_dict()
    moge_state = {name: state[name] for name in moge.state_dict() if name in state}
    prefix = "" if moge.base_model is moge else moge.base_model_prefix + "."
    for path, block in moge_blocks_by_path(moge).items():
        weights = dense_mlp_weights(dense.base_model.get_submodule(path))
        for name, weight in zip(("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"), weights):
            moge_state[f"{prefix}{path}.experts.{name}"] = weight[None]  # the experts' (E, out, in) layout
        moge_state[f"{prefix}{path}.router.weight"] = block.router.weight
    moge.load_state_dict(moge_state, strict=True)
    inputs = spec.inputs()
    with torch.no_grad():
        got, want = moge(**inputs), dense(**inputs)
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
