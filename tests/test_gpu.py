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


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bf16_experts_paths_match_fp32_eager(implementation):
    ids = input_ids(0, batch=8, seq=32).cuda()
    batch = dict(input_ids=ids, labels=ids)
    model = gpu_model(moge_loss_coef=0.1)
    model.set_experts_implementation("eager")
    want_loss, want_grads = loss_and_grads(model, batch)
    model.set_experts_implementation(implementation)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch)
    assert relative_error(loss, want_loss) < 1e-2
    for name, grad in grads.items():
        assert relative_error(grad, want_grads[name]) < 5e-2, name


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_inductor_fullgraph_matches_eager(implementation):
    torch._dynamo.reset()
    ids = input_ids(0, batch=8, seq=32).cuda()
    batch = dict(input_ids=ids, labels=ids)
    model = gpu_model(moge_loss_coef=0.1, experts_implementation=implementation).to(torch.bfloat16)
    want_loss, want_grads = loss_and_grads(model, batch)
    loss, grads = loss_and_grads(torch.compile(model, fullgraph=True), batch)
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
        torch.testing.assert_close(block.window_matrix.cpu(), want.window_matrix)
