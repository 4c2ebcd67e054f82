"""Forwards that do not run on every rank, or that run inside another forward of the same model.

* `router_aux_loss_global=True` all-reduces the load-balancing statistics only in forwards whose loss can reach a
  gradient (training mode, grad enabled): every rank runs those by construction. A `no_grad` forward of a
  training-mode model on one rank (a callback printing samples, `generate`) computes its own statistic and returns.
* A forward of the model run inside one of its own forwards (a hook on a layer that calls the model) records its own
  routing; the outer forward's record resumes after it. Both give what they give alone.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny import CASES, case_names, first_case

import moge_hf
import moge_hf.moge_model
from moge_hf.losses import dispatch_counts, load_balancing_loss
from moge_hf.routing import routing_recorder


TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TWO_RANK_TIMEOUT_S = 180  # both processes, imports included (a hang fails the test after this)
ALONE_SEED = 10  # rank 0's batch for the forward it runs alone
REGULARIZER = dict(moge_loss_coef=0.1, moge_map_shape=[2, 4], moge_window=2)
# `router_aux_loss_global` is the mixin's, the same on every host: checked on the table's first moge_hf head model.
GLOBAL_AUX_CASE = first_case(moge_hf=True, head=True)


# ------------------------------------------------------------------------------------------------------------------
# router_aux_loss_global: collectives only where every rank takes part
# ------------------------------------------------------------------------------------------------------------------


def _global_aux_model():
    return CASES[GLOBAL_AUX_CASE].build(router_aux_loss_global=True, router_aux_loss_coef=0.01).train()


def test_global_load_balancing_all_reduces_only_in_forwards_that_train(monkeypatch):
    """A 2-rank world seen from one process: the training step all-reduces once; a `no_grad` forward of the
    training-mode model and an evaluation forward all-reduce nothing and give the local statistic."""
    calls = []
    monkeypatch.setattr(moge_hf.moge_model, "_data_parallel_world_size", lambda: 2)
    # An all-reduce that records its call and leaves the counts as they are (the global fractions = the local ones).
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *args, **kwargs: calls.append(tensor.shape))
    model, batch = _global_aux_model(), CASES[GLOBAL_AUX_CASE].batch()
    local = CASES[GLOBAL_AUX_CASE].build(router_aux_loss_coef=0.01).train()
    with torch.no_grad():
        want = local(**batch).aux_loss
        got = model(**batch).aux_loss
    assert calls == []
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    model.eval()
    model(**batch)
    assert calls == []
    model.train()
    model(**batch).loss.backward()
    assert len(calls) == 1


def _two_rank_worker(rank: int, store: str, out: str) -> None:
    """One of the 2 processes of `test_a_rank_alone_runs_a_no_grad_forward_while_training_steps_all_reduce`."""
    import datetime

    out = Path(out)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    model, results = _global_aux_model(), {}
    recorder, routings = routing_recorder(model), []
    recorder.listeners.append(
        lambda forward: routings.append(
            [(r.output.probs.detach(), r.output.top_k_index, forward.token_mask) for r in forward.records]
        )
    )
    if rank == 0:  # alone: rank 1 waits for it without any collective
        try:
            with torch.no_grad():
                results["alone"] = model(**CASES[GLOBAL_AUX_CASE].batch(seed=ALONE_SEED)).aux_loss
        except BaseException:
            (out / "alone-failed").touch()
            raise
        results["alone_routing"] = routings.pop()
        (out / "alone-done").touch()
    else:
        deadline = time.monotonic() + 90
        while not (out / "alone-done").exists():
            if (out / "alone-failed").exists() or time.monotonic() > deadline:
                raise SystemExit("rank 0's no_grad forward did not return")
            time.sleep(0.1)
    outputs = model(**CASES[GLOBAL_AUX_CASE].batch(seed=rank))  # the training step, on every rank: all-reduces
    outputs.loss.backward()
    results["step"] = outputs.aux_loss.detach()
    results["step_routing"] = routings.pop()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _aux(routing, fractions=None) -> torch.Tensor:
    """The load-balancing loss (the mean over the layers) of a recorded routing, with the given dispatch fractions."""
    fractions = fractions or [None] * len(routing)
    return torch.stack(
        [load_balancing_loss(probs, index, mask, f) for (probs, index, mask), f in zip(routing, fractions)]
    ).mean()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no torch.distributed with gloo")
def test_a_rank_alone_runs_a_no_grad_forward_while_training_steps_all_reduce(tmp_path):
    from test_distributed import child_env

    env = child_env()  # no inherited distributed settings, the repository on the path, one thread
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env["PYTHONPATH"]])
    processes = []
    for rank in range(2):
        code = (
            f"import test_reentrancy as t; t._two_rank_worker({rank}, {str(tmp_path / 'store')!r}, {str(tmp_path)!r})"
        )
        log = open(tmp_path / f"rank{rank}.log", "w")
        processes.append(
            (subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=log), log)
        )
    start, failures = time.monotonic(), []
    for rank, (process, log) in enumerate(processes):
        try:
            returncode = process.wait(timeout=max(1.0, TWO_RANK_TIMEOUT_S - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = f"a timeout ({TWO_RANK_TIMEOUT_S} s): a hang"
        log.close()
        if returncode != 0:
            failures.append(
                f"rank {rank} exited with {returncode}:\n{(tmp_path / f'rank{rank}.log').read_text()[-3000:]}"
            )
    for process, _ in processes:  # a rank left waiting for the other
        if process.poll() is None:
            process.kill()
            process.wait()
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # Rank 0 alone: its own dispatch fractions.
    torch.testing.assert_close(ranks[0]["alone"], _aux(ranks[0]["alone_routing"]), rtol=0, atol=1e-6)
    # The training step: the fractions of the global batch (counts summed over the ranks), each rank's own probs.
    layers = len(ranks[0]["step_routing"])
    fractions = []
    for layer in range(layers):
        counts = [dispatch_counts(index, 8, mask) for _, index, mask in (r["step_routing"][layer] for r in ranks)]
        fractions.append(sum(c for c, _ in counts) / sum(n for _, n in counts))
    for result in ranks:
        torch.testing.assert_close(result["step"], _aux(result["step_routing"], fractions), rtol=0, atol=1e-6)
    assert any(not torch.allclose(r["step"], _aux(r["step_routing"]), rtol=0, atol=1e-5) for r in ranks)


# ------------------------------------------------------------------------------------------------------------------
# A forward inside a forward of the same model
# ------------------------------------------------------------------------------------------------------------------


def _losses(case: str) -> tuple[str, ...]:
    """The losses the model returns: a moge_hf model its router z-loss too."""
    return ("loss", "aux_loss", "moge_loss", "z_loss") if CASES[case].moge_hf else ("loss", "aux_loss", "moge_loss")


def _model(case: str):
    spec = CASES[case]
    model = spec.build(**({"moe_layers": [0, 1]} if spec.moge_hf else {}))  # 2 MoE layers: the hook is on the first
    if not spec.moge_hf:
        model = moge_hf.add_moge_regularizer(model, **REGULARIZER)
        model.config.output_router_logits = True  # its own aux loss too
    return model


def _first_moe_layer(model) -> torch.nn.Module:
    if isinstance(model, moge_hf.moge_model.MoGEModelMixin):
        return model.moge_blocks()[0]
    return model.model.layers[0].mlp


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case", case_names(head=True, per_family=True))  # moge_hf hosts and transformers' MoE
def test_a_forward_run_inside_a_forward_of_the_same_model_records_its_own_routing(case, grad):
    model = _model(case).train()
    outer_batch, inner_batch = CASES[case].batch(seed=1), CASES[case].batch(seed=2)
    with torch.set_grad_enabled(grad):
        want_outer, want_inner = model(**outer_batch), model(**inner_batch)
    recorder, heard = routing_recorder(model), []
    recorder.listeners.append(lambda forward: heard.append(len(forward.records)))
    inner = []

    def call_the_model(module, args, output):  # a hook on a layer that runs the whole model, once
        if not inner:
            inner.append(None)
            inner[0] = model(**inner_batch)

    handle = _first_moe_layer(model).register_forward_hook(call_the_model)
    with torch.set_grad_enabled(grad):
        got_outer = model(**outer_batch)
    handle.remove()
    got_inner = inner[0]
    layers = len(recorder.taps)
    assert heard == [layers, layers]  # the inner forward, then the outer one: each its own layers
    assert not recorder.recording
    for name in _losses(case):
        torch.testing.assert_close(getattr(got_outer, name), getattr(want_outer, name), rtol=0, atol=1e-6)
        torch.testing.assert_close(getattr(got_inner, name), getattr(want_inner, name), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_outer.logits, want_outer.logits, rtol=0, atol=1e-6)
    if grad:  # the same gradients as well
        params = [p for p in model.parameters() if p.requires_grad]
        for got, want in ((got_outer, want_outer), (got_inner, want_inner)):
            got_grads = torch.autograd.grad(got.loss, params, allow_unused=True)
            want_grads = torch.autograd.grad(want.loss, params, allow_unused=True)
            for got_grad, want_grad in zip(got_grads, want_grads):
                if want_grad is None:
                    assert got_grad is None
                else:
                    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-6)
    # The model works as before afterwards.
    with torch.set_grad_enabled(grad):
        again = model(**outer_batch)
    torch.testing.assert_close(again.loss, want_outer.loss, rtol=0, atol=1e-6)
