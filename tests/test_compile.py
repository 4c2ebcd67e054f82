"""`torch.compile`: the MoGE models trace into one graph in training, match eager, and train under Trainer.

The `aot_eager` backend traces forward and backward exactly as inductor does (graph breaks, recompiles) without
generating code, which keeps these tests fast; inductor itself is exercised by scripts/bench_moge.py.
"""

import math

import datasets
import pytest
import torch
import torch._dynamo
from tiny import ALIGNED, CASES, UNALIGNED, case_names, training_args
from transformers import Trainer

from moge_hf.training import add_moge_callback


# One head model per host family (the table, tests/tiny.py): compiling is slow, and another head of the same family
# compiles the same layers. The checks of the compiled machinery itself run on the first of them.
COMPILE_CASES = case_names(moge_hf=True, head=True, per_family=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# (experts_implementation, expert sizes): the default ("eager") hands a compiled graph to transformers' grouped GEMMs
# for sizes that are multiples of 8 and to its batched GEMMs for others; "grouped_mm" is transformers' own path.
PATHS = {
    "eager-aligned": ("eager", ALIGNED),
    "eager-unaligned": ("eager", UNALIGNED),
    "grouped_mm": ("grouped_mm", ALIGNED),
}


def build(case: str, path: str):
    """A tiny MoGE model in training mode with every routing loss on, and a labelled batch of 4 for it."""
    implementation, sizes = PATHS[path]
    losses = dict(moge_loss_coef=0.1, router_z_loss_coef=1e-3, router_jitter_noise=0.1)
    model = CASES[case].build(**sizes, **losses)
    model.set_experts_implementation(implementation)
    return model.train(), CASES[case].batch(0, size=4)


def loss_and_grads(model, batch, seed: int = 0):
    torch.manual_seed(seed)  # the same router jitter in both runs
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", COMPILE_CASES)
def test_training_forward_has_no_graph_break(case, path):
    model, batch = build(case, path)
    explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_break_count == 0, [str(reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


# transformers' fp32 grouped GEMM fallback has a traceable backward only from the version that made it a custom op
# (5.17 lacks it: compiling fp32 training through `grouped_mm` fails there in transformers' own code).
TRACEABLE_FP32_GROUPED_MM = hasattr(torch.ops.transformers, "grouped_mm_fallback_backward")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", COMPILE_CASES)
def test_fullgraph_compile_matches_eager_in_training(case, path):
    if PATHS[path][1] is ALIGNED and not TRACEABLE_FP32_GROUPED_MM:
        pytest.skip("this transformers' fp32 grouped_mm fallback has no traceable backward")
    model, batch = build(case, path)
    loss, grads = loss_and_grads(model, batch)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_fullgraph_compile_under_bf16_autocast_matches_eager(case):
    """Trainer(bf16=True) runs fp32 weights under bf16 autocast; the compiled experts then run bf16 grouped GEMMs."""
    model, batch = build(case, "eager-aligned")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
    assert relative_error(compiled_loss, loss) < 1e-2
    for got, want in zip(compiled_grads, grads):
        assert relative_error(got, want) < 5e-2


def test_new_sigma_needs_no_recompile_and_changes_the_compiled_loss():
    model, batch = build(COMPILE_CASES[0], "eager-unaligned")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    first = compiled(**batch).moge_loss
    model.set_moge_sigma(0.3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = compiled(**batch).moge_loss
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, model(**batch).moge_loss)


def test_trainer_with_torch_compile_trains_with_the_sigma_schedule(tmp_path):
    case = CASES[COMPILE_CASES[0]]
    model = case.build(**ALIGNED, moge_loss_coef=0.1, moge_sigma_schedule=[4.0, 1.0, 1.0])
    dataset = datasets.Dataset.from_dict({key: value.tolist() for key, value in case.batch(0, size=8).items()})
    args = training_args(tmp_path, max_steps=4, torch_compile=True, torch_compile_backend="aot_eager")
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    add_moge_callback(trainer)
    torch._dynamo.utils.counters.clear()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert model.config.moge_sigma == pytest.approx(1.0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the training forward was compiled
    # The callback's hooks (metrics, the loss check) trace into the graph: no break of theirs (a tensor hook registered
    # in the forward would break it, "Unsafe side effect"; older transformers break elsewhere, in their own code).
    breaks = torch._dynamo.utils.counters["graph_break"]
    ours = [reason for reason in breaks if "side effect" in reason.lower() or "hook" in reason.lower()]
    assert not ours, dict(breaks)
    # The routing recorder feeds the callback from inside the compiled forward: every layer's load and entropy.
    for log in (log for log in trainer.state.log_history if "loss" in log):
        for layer in model.config.moe_layers:
            assert sum(log[f"moge/layer{layer}/load_e{e:02d}"] for e in range(8)) == pytest.approx(1.0)
            assert 0 < log[f"moge/layer{layer}/entropy"] <= math.log(8) + 1e-6


def test_a_block_dynamo_runs_eagerly_inside_a_compiled_model_is_still_recorded():
    """The forward begins in the compiled graph, the block reports from eager code (a frame dynamo skips, as after a
    recompile limit): the routing losses are those of the eager model."""
    model, batch = build(COMPILE_CASES[0], "eager-unaligned")
    model.eval()
    with torch.no_grad():
        want = model(**batch)
    block = model.moge_blocks()[0]
    block.forward = torch._dynamo.disable(block.forward)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for _ in range(2):
            got = compiled(**batch)
            for name in ("aux_loss", "moge_loss", "z_loss"):
                torch.testing.assert_close(getattr(got, name), getattr(want, name))
