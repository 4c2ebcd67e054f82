"""The fused Triton experts against a float64 per-token reference: outputs and all six gradients.

Without CUDA the kernels run under the Triton interpreter on CPU tensors. `TRITON_INTERPRET=1` must be set before
triton is first imported: tests/conftest.py does it, and so does this module for a run without that conftest.
"""

import os

import pytest
import torch


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from tiny import gpt2_config, input_ids  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import moge_hf.triton_experts as triton_experts  # noqa: E402
from moge_hf import GPT2MoGELMHeadModel  # noqa: E402
from moge_hf.moge_layer import MoGEExperts  # noqa: E402


if not torch.cuda.is_available() and not (
    triton_experts._INTERPRET and isinstance(triton.language.sum, InterpretedFunction)
):
    pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter truncates fp32 -> bf16 casts (no round-to-nearest), which about triples the bf16 errors there.
BF16_TOLERANCE = 2e-2 if triton_experts._INTERPRET else 1e-2
GRAD_NAMES = ("hidden_states", "up_proj", "up_proj_bias", "down_proj", "down_proj_bias", "top_k_weights")


def make_experts(num_experts: int, hidden: int, inter: int, activation: str, dtype=torch.float32, seed: int = 0):
    config = gpt2_config(
        num_experts=num_experts, num_experts_per_tok=1, moge_map_shape=[1, num_experts], moge_window=1
    )
    experts = MoGEExperts(config, hidden, inter, activation)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return experts.to(device=DEVICE, dtype=dtype)


def make_inputs(num_tokens: int, top_k: int, num_experts: int, hidden: int, dtype=torch.float32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(num_tokens, hidden, generator=generator).to(device=DEVICE, dtype=dtype)
    top_k_index = torch.randint(0, num_experts, (num_tokens, top_k), generator=generator).to(DEVICE)
    top_k_weights = torch.rand(num_tokens, top_k, generator=generator).to(DEVICE)
    return hidden_states, top_k_index, top_k_weights


def per_token_reference(experts: MoGEExperts, hidden_states, top_k_index, top_k_weights, grad_output):
    """Float64 loop over tokens and slots; returns the output and the gradients named in GRAD_NAMES."""
    leaves = [hidden_states, experts.up_proj, experts.up_proj_bias, experts.down_proj, experts.down_proj_bias]
    leaves = [tensor.detach().double().requires_grad_() for tensor in (*leaves, top_k_weights)]
    x, up, up_bias, down, down_bias, weights = leaves
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for j, expert in enumerate(top_k_index[t].tolist()):
            inner = experts.act_fn(x[t] @ up[expert].T + up_bias[expert])
            row = row + weights[t, j] * (inner @ down[expert].T + down_bias[expert])
        rows.append(row)
    out = torch.stack(rows)
    out.backward(grad_output.double())
    return out.detach(), [leaf.grad for leaf in leaves]


def per_expert_reference(experts: MoGEExperts, hidden_states, top_k_index, top_k_weights, grad_output):
    """Float32 loop over experts (for the large GPU shapes); same returns as `per_token_reference`."""
    leaves = [hidden_states, experts.up_proj, experts.up_proj_bias, experts.down_proj, experts.down_proj_bias]
    leaves = [tensor.detach().float().requires_grad_() for tensor in (*leaves, top_k_weights)]
    x, up, up_bias, down, down_bias, weights = leaves
    out = torch.zeros_like(x)
    for expert in range(up.shape[0]):
        token, slot = torch.where(top_k_index == expert)
        inner = experts.act_fn(torch.nn.functional.linear(x[token], up[expert], up_bias[expert]))
        rows = torch.nn.functional.linear(inner, down[expert], down_bias[expert]) * weights[token, slot, None]
        out = out.index_add(0, token, rows)
    out.backward(grad_output.float())
    return out.detach(), [leaf.grad for leaf in leaves]


def run_triton(experts: MoGEExperts, hidden_states, top_k_index, top_k_weights, grad_output):
    """Output and the gradients named in GRAD_NAMES from `triton_experts_forward`."""
    experts.zero_grad(set_to_none=True)
    x = hidden_states.detach().requires_grad_()
    weights = top_k_weights.detach().requires_grad_()
    out = triton_experts.triton_experts_forward(experts, x, top_k_index, weights)
    out.backward(grad_output)
    grads = [x.grad, experts.up_proj.grad, experts.up_proj_bias.grad, experts.down_proj.grad]
    return out.detach(), [*grads, experts.down_proj_bias.grad, weights.grad]


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def check_against_reference(experts, hidden_states, top_k_index, top_k_weights, tolerance, reference=None):
    grad_output = torch.randn(hidden_states.shape, generator=torch.Generator().manual_seed(2))
    grad_output = grad_output.to(device=DEVICE, dtype=hidden_states.dtype)
    out, grads = run_triton(experts, hidden_states, top_k_index, top_k_weights, grad_output)
    ref_out, ref_grads = (reference or per_token_reference)(
        experts, hidden_states, top_k_index, top_k_weights, grad_output
    )
    assert out.shape == hidden_states.shape and out.dtype == hidden_states.dtype
    errors = {"output": rel_error(out, ref_out)}
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert grad.shape == ref_grad.shape, name
        errors[name] = rel_error(grad, ref_grad)
    assert all(error < tolerance for error in errors.values()), errors
    return grads


# (T, k, E, (d, f), activation): a spread over the shapes, k, E and the fused activations.
CASES = [
    (1, 1, 1, (16, 32), "gelu_new"),
    (1, 3, 8, (24, 40), "relu"),
    (7, 2, 4, (24, 40), "gelu"),
    (7, 3, 1, (32, 64), "silu"),
    (33, 1, 8, (16, 32), "gelu_pytorch_tanh"),
    (33, 2, 1, (24, 40), "gelu_new"),
    (33, 3, 8, (32, 64), "relu"),
    (100, 1, 4, (32, 64), "gelu"),
    (100, 2, 8, (24, 40), "gelu_new"),
    (100, 3, 4, (16, 32), "gelu"),
]


@pytest.mark.parametrize("num_tokens,top_k,num_experts,sizes,activation", CASES)
def test_matches_reference_fp32(num_tokens, top_k, num_experts, sizes, activation):
    experts = make_experts(num_experts, *sizes, activation)
    inputs = make_inputs(num_tokens, top_k, num_experts, sizes[0])
    check_against_reference(experts, *inputs, tolerance=1e-4)


@pytest.mark.parametrize("experts_used", [(0, 1), (5,)], ids=["experts-0-1-of-8", "one-expert-all-tokens"])
def test_idle_experts_get_zero_gradients(experts_used):
    num_tokens, top_k, hidden, inter = 50, 2, 24, 40
    experts = make_experts(8, hidden, inter, "gelu_new")
    hidden_states, _, top_k_weights = make_inputs(num_tokens, top_k, 8, hidden)
    choices = torch.tensor(experts_used, device=DEVICE)
    top_k_index = choices[torch.arange(num_tokens * top_k, device=DEVICE).view(num_tokens, top_k) % len(choices)]
    grads = check_against_reference(experts, hidden_states, top_k_index, top_k_weights, tolerance=1e-4)
    idle = [expert for expert in range(8) if expert not in experts_used]
    for grad in grads[1:5]:
        assert torch.all(grad[idle] == 0)
        assert torch.all(grad[list(experts_used)].abs().sum(dim=tuple(range(1, grad.dim()))) > 0)


@pytest.mark.parametrize(
    "dtype,num_tokens,top_k,num_experts,sizes,activation",
    [
        (torch.bfloat16, 33, 2, 4, (24, 40), "gelu_new"),
        (torch.bfloat16, 100, 3, 8, (32, 64), "gelu"),
        (torch.float16, 33, 2, 4, (32, 64), "silu"),
    ],
)
def test_matches_reference_half(dtype, num_tokens, top_k, num_experts, sizes, activation):
    experts = make_experts(num_experts, *sizes, activation, dtype=dtype)
    inputs = make_inputs(num_tokens, top_k, num_experts, sizes[0], dtype=dtype)
    check_against_reference(experts, *inputs, tolerance=BF16_TOLERANCE if dtype == torch.bfloat16 else 1e-2)


def test_deterministic_and_inference_path():
    experts = make_experts(4, 24, 40, "gelu_new")
    hidden_states, top_k_index, top_k_weights = make_inputs(33, 3, 4, 24)
    first = triton_experts.triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    with torch.no_grad():  # nothing needs a gradient: the pre-activation is not stored
        second = triton_experts.triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    assert first.requires_grad and not second.requires_grad
    assert torch.equal(first.detach(), second)


def test_frozen_inputs_only_get_requested_gradients():
    experts = make_experts(4, 16, 32, "relu")
    experts.up_proj.requires_grad_(False)
    experts.down_proj_bias.requires_grad_(False)
    hidden_states, top_k_index, top_k_weights = make_inputs(33, 2, 4, 16)
    grad_output = torch.randn(hidden_states.shape, device=DEVICE)
    out = triton_experts.triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    out.backward(grad_output)
    _, ref_grads = per_token_reference(experts, hidden_states, top_k_index, top_k_weights, grad_output)
    assert experts.up_proj.grad is None and experts.down_proj_bias.grad is None
    assert rel_error(experts.up_proj_bias.grad, ref_grads[2]) < 1e-4
    assert rel_error(experts.down_proj.grad, ref_grads[3]) < 1e-4


def test_autocast_runs_in_the_autocast_dtype():
    experts = make_experts(4, 24, 40, "gelu")
    hidden_states, top_k_index, top_k_weights = make_inputs(33, 2, 4, 24)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = triton_experts.triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    assert out.dtype == torch.float32
    ref_out, _ = per_token_reference(experts, hidden_states, top_k_index, top_k_weights, torch.ones_like(out))
    assert 1e-5 < rel_error(out, ref_out) < 1e-2  # bf16 products: close, but not fp32-exact


def test_unsupported_activation_raises():
    experts = make_experts(4, 16, 32, "tanh")
    inputs = make_inputs(7, 2, 4, 16)
    with pytest.raises(ValueError, match="'tanh'.*gelu_new"):
        triton_experts.triton_experts_forward(experts, *inputs)


def test_model_with_moge_triton_experts_matches_eager():
    torch.manual_seed(0)
    model = GPT2MoGELMHeadModel(gpt2_config()).to(DEVICE).train()
    ids = input_ids(0).to(DEVICE)
    results = {}
    for implementation in ("eager", "moge_triton"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[implementation] = loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}
    (want_loss, want_grads), (loss, grads) = results["eager"], results["moge_triton"]
    assert rel_error(loss, want_loss) < 1e-5
    for name, grad in grads.items():
        assert rel_error(grad, want_grads[name]) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpu_bf16_gpt2_sizes(activation):
    num_tokens, top_k, num_experts, hidden, inter = 4096, 2, 16, 768, 3072
    experts = make_experts(num_experts, hidden, inter, activation, dtype=torch.bfloat16)
    hidden_states, _, _ = make_inputs(num_tokens, top_k, num_experts, hidden, dtype=torch.bfloat16)
    # Router-like routing: distinct experts per token, softmax weights.
    logits = torch.randn(num_tokens, num_experts, device=DEVICE)
    top_k_weights, top_k_index = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)
    check_against_reference(
        experts, hidden_states, top_k_index, top_k_weights, tolerance=1e-2, reference=per_expert_reference
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp32_ieee_products():
    experts = make_experts(8, 256, 1024, "gelu_new")
    inputs = make_inputs(1000, 2, 8, 256)
    check_against_reference(experts, *inputs, tolerance=1e-4, reference=per_expert_reference)
