"""Checks that need a CUDA GPU: every experts path in bf16 against fp32, inductor, the asynchronous NaN check.

Skipped without a GPU. Run on one with `python -m pytest -q -m gpu tests`.
"""

import pytest
import torch
from tiny import gpt2_config, input_ids

from moge_hf import GPT2MoGELMHeadModel


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm", "moge_triton"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


def gpu_model(**overrides) -> GPT2MoGELMHeadModel:
    torch.manual_seed(0)
    config = gpt2_config(n_embd=128, n_head=4, n_inner=256, num_experts=16, moge_map_shape=[4, 4], **overrides)
    return GPT2MoGELMHeadModel(config).cuda().train()


def loss_and_grads(model, batch, forward=None):
    """The loss of `forward` (default: `model`, else e.g. its compiled version) and `model`'s gradients by name."""
    model.zero_grad()
    loss = (model if forward is None else forward)(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def float64_reference(experts, hidden_states, top_k_index, top_k_weights):
    """sum_j w_tj * MLP_{e_tj}(x_t) in float64, one expert at a time."""
    x = hidden_states.double()
    out = torch.zeros_like(x)
    for expert in range(experts.num_experts):
        token, slot = torch.where(top_k_index == expert)
        if token.numel():
            up = x[token] @ experts.up_proj[expert].double().T + experts.up_proj_bias[expert].double()
            down = experts.act_fn(up) @ experts.down_proj[expert].double().T + experts.down_proj_bias[expert].double()
            out.index_add_(0, token, down * top_k_weights[token, slot, None].double())
    return out


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bf16_experts_paths_match_a_float64_reference(implementation):
    """Each path under bf16 autocast, with the routing fixed (so that no top-k choice can flip), against float64:
    the output and the gradients of the input, the gate weights and every weight."""
    model = gpu_model()
    model.set_experts_implementation(implementation)
    experts = model.moge_blocks()[0].experts
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden_states = torch.randn(2048, 128, device="cuda", generator=generator).requires_grad_(True)
    scores = torch.randn(2048, 16, device="cuda", generator=generator)
    scores[:, :3] = -1e9  # three experts get no token
    top_k_weights, top_k_index = scores.softmax(-1).topk(2, dim=-1)
    top_k_weights = top_k_weights.detach().requires_grad_(True)
    inputs = [hidden_states, top_k_weights, *experts.parameters()]
    grad_out = torch.randn(2048, 128, device="cuda", generator=generator)

    want = float64_reference(experts, hidden_states, top_k_index, top_k_weights)
    want_grads = torch.autograd.grad(want, inputs, grad_out.double())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = experts(hidden_states, top_k_index, top_k_weights)
    grads = torch.autograd.grad(got, inputs, grad_out.to(got.dtype), allow_unused=True)
    assert relative_error(got, want) < 1e-2
    for name, grad, want_grad in zip(["input", "gate weights", *dict(experts.named_parameters())], grads, want_grads):
        grad = torch.zeros_like(want_grad) if grad is None else grad
        assert relative_error(grad, want_grad) < 2e-2, name
        if name in ("up_proj", "down_proj"):
            assert grad[:3].abs().max() == 0, name  # idle experts get exactly zero gradient


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bf16_models_agree_across_experts_paths(implementation):
    """The whole model under bf16 autocast: every path against the default one (the routing is the same, since the
    router runs before the experts) and the loss against fp32 (robust to the odd top-k choice that bf16 flips)."""
    ids = input_ids(0, batch=8, seq=32).cuda()
    batch = dict(input_ids=ids, labels=ids)
    model = gpu_model(moge_loss_coef=0.1)
    fp32_loss, _ = loss_and_grads(model, batch)
    model.set_experts_implementation("eager")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_loss, want_grads = loss_and_grads(model, batch)
    model.set_experts_implementation(implementation)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch)
    assert relative_error(want_loss, fp32_loss) < 1e-2
    assert relative_error(loss, want_loss) < 1e-2
    for name, grad in grads.items():
        assert relative_error(grad, want_grads[name]) < 2e-2, name


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_inductor_fullgraph_matches_eager(implementation):
    torch._dynamo.reset()
    ids = input_ids(0, batch=8, seq=32).cuda()
    batch = dict(input_ids=ids, labels=ids)
    # Every token to all 16 experts: no top-k choice that the compiled graph's rounding could flip.
    model = gpu_model(moge_loss_coef=0.1, num_experts_per_tok=16, experts_implementation=implementation)
    model = model.to(torch.bfloat16)
    want_loss, want_grads = loss_and_grads(model, batch)
    loss, grads = loss_and_grads(model, batch, torch.compile(model, fullgraph=True))
    assert relative_error(loss, want_loss) < 1e-2
    for name, grad in grads.items():
        assert relative_error(grad, want_grads[name]) < 5e-2, name


def test_nan_reaching_a_router_is_reported_by_a_later_forward():
    model = gpu_model()
    ids = input_ids(0, batch=2, seq=8).cuda()
    with torch.no_grad():
        model.transformer.wte.weight[ids[0, 0]] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        for _ in range(3):
            model(input_ids=ids)
            torch.cuda.synchronize()


def test_sigma_on_the_gpu_matches_the_cpu_window_matrix():
    model = gpu_model()
    reference = GPT2MoGELMHeadModel(model.config)
    model.set_moge_sigma(0.7)
    reference.set_moge_sigma(0.7)
    for block, want in zip(model.moge_blocks(), reference.moge_blocks()):
        torch.testing.assert_close(block.regularizer.window_matrix.cpu(), want.regularizer.window_matrix)
