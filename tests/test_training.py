"""Training with `transformers.Trainer`: plain Trainer, gradient accumulation, the sigma schedule, MoGE metrics."""

import copy
import json
import logging
import shutil
import threading
import types

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import CASES, case_names, gpt2_config, input_ids, training_args
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
from transformers.integrations import integration_utils
from transformers.integrations.integration_utils import TensorBoardCallback
from transformers.modeling_outputs import CausalLMOutput

from moge_hf import GPT2MoGELMHeadModel, add_moge_regularizer
from moge_hf.moge_layer import moge_regularizers
from moge_hf.routing import routing_recorder
from moge_hf.training import (
    MoGERoutingMetrics,
    MoGESigmaCallback,
    MoGESigmaSchedule,
    add_moge_callback,
    annealed_sigma,
    resolve_checkpoint,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine each parallel region can wait ~0.1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm_batch(seed: int = 0, batch: int = 8, seq: int = 7, padded: bool = True) -> dict[str, torch.Tensor]:
    """An LM batch; with `padded`, a few rows are right-padded (mask 0, label -100)."""
    ids = input_ids(seed, batch=batch, seq=seq)
    mask = torch.ones_like(ids)
    if padded:
        mask[: batch // 2, -2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def as_dataset(batch: dict[str, torch.Tensor]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({name: value.tolist() for name, value in batch.items()})


def tiny_lm(**overrides) -> GPT2MoGELMHeadModel:
    torch.manual_seed(0)
    return GPT2MoGELMHeadModel(gpt2_config(**overrides))


def fake_state(global_step: int = 0, max_steps: int = 8) -> TrainerState:
    state = TrainerState()
    state.global_step, state.max_steps = global_step, max_steps
    return state


# ---- every model of the shared table -------------------------------------------------------------------------------

MOGE = dict(moge_loss_coef=0.1, moge_map_shape=[2, 4], moge_window=2, moge_sigma_schedule=[4.0, 1.0, 1.0])


@pytest.mark.compat
@pytest.mark.parametrize("case", case_names(head=True))
def test_every_model_trains_under_trainer_with_the_callback(case, tmp_path):
    """Each head model of the table (moge_hf's, and transformers' MoE models given `add_moge_regularizer`) under plain
    `Trainer` with `add_moge_callback`: sigma annealed, per-layer load and entropy logged, the routers trained,
    evaluate and predict."""
    spec = CASES[case]
    model = spec.build(**MOGE) if spec.moge_hf else add_moge_regularizer(spec.build(), **MOGE)
    batch = spec.batch(seed=4)
    data = datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()}).with_format("torch")
    taps = routing_recorder(model).taps
    routers_before = [tap.module.weight.detach().clone() for tap in taps]
    args = training_args(tmp_path, max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    add_moge_callback(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6
    sigmas = [entry["moge/sigma"] for entry in logs]
    assert sigmas[0] == 4.0 and sigmas == sorted(sigmas, reverse=True)
    assert model.config.moge_sigma == 1.0 and all(reg.sigma == 1.0 for reg in moge_regularizers(model))
    for entry in logs:
        assert entry["moge/moge_loss"] > 0
        if not spec.moge_hf:
            assert "moge/aux_loss" not in entry  # no router logits asked: transformers computes no aux loss
        for tap in taps:
            loads = [entry[f"moge/{tap.name}/load_e{e:02d}"] for e in range(8)]
            assert sum(loads) == pytest.approx(1.0)
            assert 0 < entry[f"moge/{tap.name}/entropy"] <= np.log(8) + 1e-6
    for before, tap in zip(routers_before, taps):
        assert not torch.equal(before, tap.module.weight)
    assert np.isfinite(trainer.evaluate()["eval_loss"])
    # predict gives the logits alone: the per-batch routing losses are left out, like the cache.
    predictions = trainer.predict(data).predictions
    assert isinstance(predictions, np.ndarray) and predictions.shape[0] == len(data)


# ---- annealed_sigma -------------------------------------------------------------------------------------------------


def test_annealed_sigma_follows_the_formula_and_clamps_progress():
    schedule = [10.0, 1.0, 0.2]
    assert annealed_sigma(0.0, schedule) == 10.0
    assert annealed_sigma(1.0, schedule) == pytest.approx(1.0)
    assert annealed_sigma(0.5, schedule) == pytest.approx(10.0 - 9.0 * 0.5**0.2)
    assert annealed_sigma(0.25, [4.0, 2.0, 1.0]) == pytest.approx(3.5)
    assert annealed_sigma(-3.0, schedule) == 10.0  # clamped to [0, 1]
    assert annealed_sigma(7.0, schedule) == pytest.approx(1.0)
    assert annealed_sigma(0.5, (2.0, 4.0, 1.0)) == pytest.approx(3.0)  # annealing up works too; tuples are fine
    values = [annealed_sigma(p / 10, schedule) for p in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    for bad in ([10.0, 1.0], None):
        with pytest.raises(ValueError, match="init, final, power"):
            annealed_sigma(0.5, bad)
    with pytest.raises(ValueError, match="finite"):
        annealed_sigma(float("nan"), schedule)


# ---- the callback without Trainer -------------------------------------------------------------------------------


def test_callback_sets_sigma_from_the_schedule_and_progress(tmp_path):
    model = tiny_lm(moge_sigma_schedule=[4.0, 0.5, 0.5])
    callback, args, control = MoGESigmaCallback(), training_args(tmp_path), TrainerControl()
    block = model.moge_blocks()[0]

    callback.on_train_begin(args, fake_state(0, 8), control, model=model)
    assert block.regularizer.sigma == model.config.moge_sigma == 4.0
    torch.testing.assert_close(block.regularizer.window_matrix, block.regularizer.build_window_matrix(4.0))
    callback.on_step_begin(args, fake_state(2, 8), control, model=model)
    assert block.regularizer.sigma == model.config.moge_sigma == pytest.approx(4.0 - 3.5 * 0.25**0.5)
    torch.testing.assert_close(
        block.regularizer.window_matrix, block.regularizer.build_window_matrix(block.regularizer.sigma)
    )
    callback.on_train_end(args, fake_state(8, 8), control, model=model)
    assert block.regularizer.sigma == model.config.moge_sigma == 0.5  # the schedule's end once training completes


def test_callback_leaves_sigma_alone_without_a_schedule(tmp_path):
    model = tiny_lm(moge_sigma=1.7)
    callback, args, control = MoGESigmaCallback(), training_args(tmp_path), TrainerControl()
    for event, step in (("on_train_begin", 0), ("on_step_begin", 3), ("on_train_end", 8)):
        getattr(callback, event)(args, fake_state(step, 8), control, model=model)
        assert model.config.moge_sigma == 1.7
        assert all(block.regularizer.sigma == 1.7 for block in model.moge_blocks())


def test_callback_unwraps_wrapped_models_and_rejects_others(tmp_path):
    model = tiny_lm(moge_sigma_schedule=[4.0, 0.5, 0.5])
    wrapped = torch.nn.DataParallel(model)  # on CPU it just holds the model in `.module`, as DDP does
    callback, args, control = MoGESigmaCallback(), training_args(tmp_path), TrainerControl()
    callback.on_train_begin(args, fake_state(4, 8), control, model=wrapped)
    assert model.config.moge_sigma == pytest.approx(4.0 - 3.5 * 0.5**0.5)
    wrapped.train()
    wrapped(**lm_batch())  # the hooks sit on the MoGE model, so a forward through the wrapper counts
    metrics = callback.metrics()
    assert metrics["moge/sigma"] == model.config.moge_sigma
    assert "moge/moge_loss" in metrics and "moge/layer1/entropy" in metrics
    callback.on_train_end(args, fake_state(8, 8), control, model=wrapped)

    with pytest.raises(ValueError, match="needs a MoGE model"):
        MoGESigmaCallback().on_train_begin(args, fake_state(), control, model=torch.nn.Linear(2, 2))


def expected_routing_metrics(outputs, batches, layers, num_experts, top_k):
    """Load and entropy computed the obvious way from the returned router logits, over the non-padding tokens."""
    expected = {}
    for i, layer in enumerate(layers):
        probs = torch.cat([out.router_logits[i].float().softmax(-1) for out in outputs])  # (T, E)
        keep = torch.cat([batch["attention_mask"].reshape(-1) for batch in batches]).bool()
        probs = probs[keep]
        entropy = -(probs * probs.log()).sum(-1)
        expected[f"moge/layer{layer}/entropy"] = entropy.mean().item()
        chosen = probs.topk(top_k, dim=-1).indices.reshape(-1)
        for expert in range(num_experts):
            expected[f"moge/layer{layer}/load_e{expert:02d}"] = (chosen == expert).sum().item() / chosen.numel()
    return expected


def test_metrics_average_training_forwards_and_leave_out_padding_and_evaluation(tmp_path):
    model = tiny_lm(n_layer=4, moe_layers=[1, 3], moge_sigma=2.5)
    callback, args, control = MoGESigmaCallback(), training_args(tmp_path), TrainerControl()
    state = fake_state()
    callback.on_train_begin(args, state, control, model=model)

    model.train()
    batches = [lm_batch(seed=1), lm_batch(seed=2)]
    outputs = [model(**batch, output_router_logits=True) for batch in batches]
    model.eval()
    model(**lm_batch(seed=3))  # evaluation forwards are not counted
    model.train()

    logs = {"loss": 1.0, "learning_rate": 1e-3}
    callback.on_log(args, state, control, logs=logs)
    expected = expected_routing_metrics(outputs, batches, [1, 3], num_experts=8, top_k=2)
    for name in ("aux_loss", "moge_loss", "z_loss"):
        expected[f"moge/{name}"] = sum(getattr(out, name).item() for out in outputs) / len(outputs)
    expected["moge/sigma"] = 2.5
    assert set(logs) == {"loss", "learning_rate", *expected}
    for key, value in expected.items():
        assert logs[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for layer in (1, 3):
        assert sum(logs[f"moge/layer{layer}/load_e{e:02d}"] for e in range(8)) == pytest.approx(1.0)

    # The window restarts after each training log; evaluation and end-of-training logs are left alone.
    model(**batches[0])
    logs = {"loss": 2.0}
    callback.on_log(args, state, control, logs=logs)
    assert logs["moge/moge_loss"] == pytest.approx(outputs[0].moge_loss.item(), rel=1e-5)
    eval_logs, summary = {"eval_loss": 1.0}, {"train_loss": 1.0}
    callback.on_log(args, state, control, logs=eval_logs)
    callback.on_log(args, state, control, logs=summary)
    assert eval_logs == {"eval_loss": 1.0} and summary == {"train_loss": 1.0}

    # At the end of training every hook is removed, and the callback no longer listens to the routing recorder (which
    # stays: the model's own losses read it).
    callback.on_train_end(args, state, control, model=model)
    assert not model._forward_hooks and not model._forward_pre_hooks
    recorder = routing_recorder(model)
    assert not recorder.listeners and recorder.keep_inputs == 0
    assert all(not block.router._forward_hooks for block in model.moge_blocks())


def test_metrics_count_every_forward_of_data_parallel_replicas():
    """`nn.DataParallel` replicas share the model's recorder and the callback and run in threads: every forward's
    losses and tokens are counted once."""

    def replicate(module):  # what `torch.nn.parallel.replicate` does, without devices
        replica = module._replicate_for_data_parallel()
        replica._parameters = dict(module._parameters)
        for name, child in module._modules.items():
            replica._modules[name] = None if child is None else replicate(child)
        return replica

    model = tiny_lm(moe_layers=[0, 1], router_jitter_noise=0.0).train()
    callback = MoGESigmaCallback()
    callback.on_train_begin(training_args("unused"), fake_state(), TrainerControl(), model=model)
    batch, forwards = lm_batch(seed=3), 20

    def work(replica):
        for _ in range(forwards):
            with torch.no_grad():
                replica(**batch)

    threads = [threading.Thread(target=work, args=(replicate(model),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert callback._int_sums[:3].tolist() == [2 * forwards] * 3  # the three losses of every forward
    real_tokens = int(batch["attention_mask"].sum()) * 2 * forwards
    assert callback._int_sums[-2:].tolist() == [real_tokens, real_tokens]  # each layer's tokens, padding left out


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputation_is_not_counted(tmp_path, use_reentrant):
    # Reentrant checkpointing is refused while a routing loss trains the router (its gradient would be lost); with
    # every coefficient 0 the routing losses are only reported and it runs.
    zero = dict(router_aux_loss_coef=0.0, router_z_loss_coef=0.0, moge_loss_coef=0.0) if use_reentrant else {}
    model = tiny_lm(**zero)
    checkpoint_kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23; the older name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    callback, args, control = MoGESigmaCallback(), training_args(tmp_path), TrainerControl()
    callback.on_train_begin(args, fake_state(), control, model=model)
    router_calls = []
    model.moge_blocks()[0].router.register_forward_hook(lambda *_: router_calls.append(1))

    model.train()
    batch = lm_batch()
    model(**batch).loss.backward()
    assert len(router_calls) == 2  # the router ran again when backward recomputed the layer...
    tokens = int(batch["attention_mask"].sum())
    # ... but its routing counts once: the token count (last int sum) and the routed slots (top-2 per token).
    # The int sums: one forward count per routing loss, the routed slots per (layer, expert), the tokens per layer.
    assert int(callback._int_sums[-1]) == tokens
    assert int(callback._int_sums[3:-1].sum()) == 2 * tokens
    assert callback._int_sums[:3].tolist() == [1, 1, 1]
    callback.on_train_end(args, fake_state(), control, model=model)


def test_metrics_all_reduce_in_distributed_training(tmp_path, monkeypatch):
    """With a process group, the sums are all-reduced: here a fake second process contributes the same sums."""
    model = tiny_lm()
    callback, args, control = MoGESigmaCallback(), training_args(tmp_path), TrainerControl()
    callback.on_train_begin(args, fake_state(), control, model=model)
    model.train()
    model(**lm_batch())
    single = copy.deepcopy(callback).metrics()

    reduced = []

    def all_reduce(tensor):
        reduced.append(tensor.dtype)
        tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert callback.metrics() == pytest.approx(single)
    assert reduced == [torch.float32, torch.long]
    # A process that saw no forward since the last log still joins the all-reduce.
    fresh = MoGESigmaCallback()
    fresh.on_train_begin(args, fake_state(), control, model=model)
    assert set(fresh.metrics()) == {"moge/sigma"} and len(reduced) == 4
    callback.on_train_end(args, fake_state(), control, model=model)
    fresh.on_train_end(args, fake_state(), control, model=model)


# ---- plain Trainer ------------------------------------------------------------------------------------------------


def test_plain_trainer_logs_the_models_loss_and_lowers_it(tmp_path):
    model = tiny_lm()
    batch = lm_batch(seed=5)  # one batch of 8: Trainer's first step sees exactly these rows
    model.train()
    with torch.no_grad():
        out = model(**batch)
    expected = out.loss.item()
    # The model's loss is the LM loss plus the weighted routing losses (coefficients of `tiny.gpt2_config`).
    lm_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    routing = 0.01 * out.aux_loss + 0.001 * out.z_loss + 0.1 * out.moge_loss
    assert expected == pytest.approx((lm_loss + routing).item(), rel=1e-6) and out.moge_loss > 0

    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=12), train_dataset=as_dataset(batch))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[-1] < 0.8 * losses[0]
    assert not any(key.startswith("moge/") for entry in trainer.state.log_history for key in entry)


def test_trainer_predict_and_evaluate_leave_out_the_cache_and_routing_fields(tmp_path):
    # With `use_cache=True` GPT-2 returns its KV cache in evaluation: Trainer must leave it out of the predictions by
    # the name the installed transformers gives it, or it fails to pad a `Cache` across batches.
    model = tiny_lm()
    data = as_dataset(lm_batch(seed=2, batch=6))
    args = training_args(tmp_path, per_device_eval_batch_size=4, use_cache=True)
    trainer = Trainer(model=model, args=args, eval_dataset=data)
    assert model.config.use_cache
    result = trainer.predict(data)
    assert isinstance(result.predictions, np.ndarray)  # the logits alone: no cache, no per-batch routing losses
    assert result.predictions.shape == (6, 7, model.config.vocab_size)
    assert np.array_equal(result.label_ids, np.array(data["labels"]))
    model.eval()
    with torch.no_grad():
        expected = model(**{name: torch.tensor(data[name]) for name in data.column_names}).logits
    np.testing.assert_allclose(result.predictions, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert np.isfinite(trainer.evaluate()["eval_loss"])


def unpadded(batch: dict) -> dict:
    """`batch` with every token real: each micro-batch then holds the same share of routed and of label tokens."""
    if "attention_mask" not in batch:
        return batch
    batch = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}
    if batch["labels"].shape == batch["input_ids"].shape:  # token labels: -100 on the padding
        batch["labels"] = batch["input_ids"]
    return batch


@pytest.mark.parametrize("case", case_names(moge_hf=True, head=True))
def test_gradient_accumulation_matches_the_full_batch(tmp_path, case):
    # router_aux_loss_coef=0: the load-balancing loss is a product of two batch means, not a sum over tokens, so no
    # weighting of micro-batches reproduces it (with its weight 0.01, 28-token micro-batches change the routers'
    # update by up to ~100% and the other weights' by ~1-2%). The z-loss and the MoGE loss are token means.
    base = CASES[case].build(router_aux_loss_coef=0.0, router_z_loss_coef=0.01)
    dataset = as_dataset(unpadded(CASES[case].batch(7, size=8)))
    before = {name: param.detach().clone() for name, param in base.named_parameters()}
    updates = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = copy.deepcopy(base)
        args = training_args(
            tmp_path / f"bs{batch_size}",
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",  # updates proportional to the gradients (Adam's first step is about sign(grad))
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            weight_decay=0.0,
        )
        Trainer(model=model, args=args, train_dataset=dataset).train()
        updates.append({name: param.detach() - before[name] for name, param in model.named_parameters()})
    full, accumulated = updates
    for name in full:
        torch.testing.assert_close(
            accumulated[name], full[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    # The routers and the experts moved, by far more than the tolerance of the comparison.
    assert any(full[name].abs().max() > 1e-4 for name in full if "router" in name)
    assert any(full[name].abs().max() > 1e-4 for name in full if "experts" in name)


# ---- Trainer with the callback -----------------------------------------------------------------------------------


def record_sigma(model, records):
    """Record the sigma of the first MoGE layer at each training forward."""

    def hook(module, args):
        if module.training:
            records.append(module.regularizer.sigma)

    return model.moge_blocks()[0].register_forward_pre_hook(hook)


def test_sigma_schedule_resumes_exactly_from_a_checkpoint(tmp_path):
    schedule = [4.0, 0.5, 0.5]
    base = tiny_lm(moge_sigma_schedule=schedule)
    dataset = as_dataset(lm_batch(seed=9))
    args = dict(
        max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2
    )

    model, uninterrupted = copy.deepcopy(base), []
    record_sigma(model, uninterrupted)
    trainer = Trainer(model=model, args=training_args(tmp_path / "full", **args), train_dataset=dataset)
    add_moge_callback(trainer)
    trainer.train()
    # Each optimizer step (two micro-batches) runs at sigma(global_step / max_steps).
    assert uninterrupted == pytest.approx([annealed_sigma(step / 4, schedule) for step in range(4) for _ in range(2)])
    logged = [entry["moge/sigma"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([annealed_sigma(step / 4, schedule) for step in range(4)])
    assert model.config.moge_sigma == 0.5  # the schedule's end after training; saved with the model

    resumed_model, resumed = copy.deepcopy(base), []  # starts at the config's sigma (1.0), not the schedule's
    record_sigma(resumed_model, resumed)
    args["save_strategy"] = "no"
    trainer = Trainer(model=resumed_model, args=training_args(tmp_path / "resumed", **args), train_dataset=dataset)
    add_moge_callback(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed == uninterrupted[4:]
    for name, param in resumed_model.named_parameters():
        torch.testing.assert_close(param, model.get_parameter(name), msg=name)


def test_the_sigma_schedule_alone_sets_sigma_at_each_step_and_logs_nothing_else(tmp_path):
    """`MoGESigmaSchedule` on its own under `Trainer`: each optimizer step runs at the annealed sigma, and it puts no
    hook on the model and adds nothing to the logs."""
    schedule = [4.0, 0.5, 0.5]
    model, records = tiny_lm(moge_sigma_schedule=schedule), []  # the config's sigma is 1.0, not the schedule's
    record_sigma(model, records)
    args = training_args(tmp_path, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2)

    def hooks(model):
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    hooks_before, seen = hooks(model), []

    class Watch(TrainerCallback):  # runs after the schedule: the model as the step's forwards will see it
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append((hooks(model), len(routing_recorder(model).listeners)))

    schedule_callback = MoGESigmaSchedule()
    trainer = Trainer(
        model=model, args=args, train_dataset=as_dataset(lm_batch(seed=9)), callbacks=[schedule_callback, Watch()]
    )
    trainer.train()
    # Each optimizer step (two micro-batches) runs at sigma(global_step / max_steps); after training, the end value.
    assert records == pytest.approx([annealed_sigma(step / 4, schedule) for step in range(4) for _ in range(2)])
    assert model.config.moge_sigma == 0.5 and all(reg.sigma == 0.5 for reg in moge_regularizers(model))
    assert seen == [(hooks_before, 0)] * 4  # no hook of its own, no routing listener
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    assert not any(key.startswith("moge/") for entry in trainer.state.log_history for key in entry)
    assert not isinstance(schedule_callback, MoGERoutingMetrics)


def test_the_metrics_listener_alone_leaves_sigma_alone_and_add_moge_callback_replaces_the_parts(tmp_path):
    model = tiny_lm(moge_sigma_schedule=[4.0, 0.5, 0.5])
    listener, args, control = MoGERoutingMetrics(), training_args(tmp_path), TrainerControl()
    for event, step in (("on_train_begin", 0), ("on_step_begin", 3), ("on_train_end", 8)):
        getattr(listener, event)(args, fake_state(step, 8), control, model=model)
        assert model.config.moge_sigma == 1.0 and all(reg.sigma == 1.0 for reg in moge_regularizers(model))
    assert isinstance(MoGESigmaCallback(), MoGESigmaSchedule) and isinstance(MoGESigmaCallback(), MoGERoutingMetrics)

    # A schedule or a listener of its own would set sigma twice or take the hooks off: add_moge_callback removes them.
    parts = [MoGESigmaSchedule(), MoGERoutingMetrics()]
    trainer = Trainer(model=model, args=args, train_dataset=as_dataset(lm_batch()), callbacks=parts)
    callback = add_moge_callback(trainer)
    moge_types = (MoGESigmaSchedule, MoGERoutingMetrics)
    moge_callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, moge_types)]
    assert type(callback) is MoGESigmaCallback and moge_callbacks == [callback]
    assert trainer.callback_handler.callbacks[0] is callback


class FakeWriter:
    """Stands in for TensorBoard's `SummaryWriter` (tensorboard is not a dependency)."""

    instances: list["FakeWriter"] = []

    def __init__(self, log_dir=None):
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def add_text(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class FakeTensorBoardCallback(TensorBoardCallback):
    """transformers' `TensorBoardCallback` (its own `on_log`) writing to a `FakeWriter`."""

    def __init__(self):
        self._SummaryWriter = FakeWriter
        self.tb_writer = None
        self.logging_dir = None


@pytest.mark.parametrize("attach", ["add_moge_callback", "callbacks"])
def test_reporting_callbacks_receive_the_moge_metrics(tmp_path, monkeypatch, caplog, attach):
    """`report_to="tensorboard"` puts the reporter before user callbacks; `add_moge_callback` runs ahead of it."""
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", FakeTensorBoardCallback)
    monkeypatch.setattr(FakeWriter, "instances", [])
    model = tiny_lm(moge_sigma_schedule=[4.0, 1.0, 1.0])
    args = training_args(tmp_path, max_steps=2, report_to="tensorboard", per_device_train_batch_size=4)
    callbacks = [MoGESigmaCallback()] if attach == "callbacks" else None
    trainer = Trainer(model=model, args=args, train_dataset=as_dataset(lm_batch()), callbacks=callbacks)
    assert any(isinstance(cb, FakeTensorBoardCallback) for cb in trainer.callback_handler.callbacks)
    if attach == "add_moge_callback":
        callback = add_moge_callback(trainer)
        assert trainer.callback_handler.callbacks[0] is callback
        assert add_moge_callback(trainer) is callback  # idempotent: no second callback
        assert sum(isinstance(cb, MoGESigmaCallback) for cb in trainer.callback_handler.callbacks) == 1
    with caplog.at_level(logging.WARNING, logger="moge_hf.training"):
        trainer.train()

    keys = ["moge/sigma", "moge/moge_loss", "moge/aux_loss", "moge/z_loss", "moge/layer1/entropy"]
    keys += [f"moge/layer1/load_e{expert:02d}" for expert in range(8)]
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 2 and all(key in entry for entry in history for key in keys)
    assert [entry["moge/sigma"] for entry in history] == pytest.approx([4.0, 2.5])
    (writer,) = FakeWriter.instances
    if attach == "add_moge_callback":
        assert not caplog.records
        for key in keys:
            steps_values = writer.scalars[f"train/{key}"]
            assert steps_values == [(entry["step"], entry[key]) for entry in history]
    else:
        # Added after the reporter, the callback writes `log_history` but the reporter has already run, and a
        # warning says so.
        assert not any(tag.startswith("train/moge/") for tag in writer.scalars)
        assert "add_moge_callback" in caplog.text
    assert "train/loss" in writer.scalars


# ---- resuming: the newest complete checkpoint ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 3-step run that saved a full checkpoint (weights, optimizer, scheduler, RNG, state) after every step."""
    out = tmp_path_factory.mktemp("checkpoints") / "run"
    args = training_args(out, max_steps=3, save_strategy="steps", save_steps=1, logging_steps=1)
    Trainer(model=tiny_lm(), args=args, train_dataset=as_dataset(lm_batch(seed=8))).train()
    return out


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
        (
            lambda c: (c / "trainer_state.json").write_text('{"global_st'),
            "trainer_state.json is missing or unreadable",
        ),
        (lambda c: truncate(c / "model.safetensors"), "model.safetensors is truncated"),
        (lambda c: truncate(c / "model.safetensors", 0.001), "model.safetensors has no valid safetensors header"),
        (lambda c: (c / "model.safetensors").unlink(), "no safetensors weights"),
        (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
        (lambda c: truncate(c / "rng_state.pth", 0.9), "rng_state.pth is truncated"),
    ],
)
def test_resume_last_skips_checkpoints_a_kill_left_partial(checkpoints, tmp_path, caplog, damage, reason):
    run = tmp_path / "run"
    shutil.copytree(checkpoints, run)
    assert resolve_checkpoint(resume_args("last"), str(run), main_arm=True) == str(run / "checkpoint-3")
    damage(run / "checkpoint-3")
    with caplog.at_level(logging.WARNING, logger="moge_hf.training"):
        chosen = resolve_checkpoint(resume_args("last"), str(run), main_arm=True)
    assert chosen == str(run / "checkpoint-2")
    assert f"Skipping {run / 'checkpoint-3'}: {reason}" in caplog.text
    with pytest.raises(ValueError, match=f"cannot be resumed from: {reason}"):  # named explicitly: refused
        resolve_checkpoint(resume_args(str(run / "checkpoint-3")), str(run), main_arm=True)
    # The chosen one really resumes: Trainer reads all of it and trains the last step.
    trainer = Trainer(
        model=tiny_lm(), args=training_args(run, max_steps=3), train_dataset=as_dataset(lm_batch(seed=8))
    )
    trainer.train(resume_from_checkpoint=chosen)
    assert trainer.state.global_step == 3


def test_resume_last_with_no_complete_checkpoint_says_so(checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoints, run)
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}" / "trainer_state.json").unlink()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(resume_args("last"), str(run), main_arm=True)
    assert resolve_checkpoint(resume_args("last"), str(run), main_arm=False) is None  # a baseline arm starts over


def resume_args(value: str):
    return types.SimpleNamespace(resume_from_checkpoint=value)


# ---- batches without label tokens ---------------------------------------------------------------------------------


def unlabeled_batch(seed: int = 9, batch: int = 8) -> dict[str, torch.Tensor]:
    """A prompt-only batch: every label is -100."""
    data = lm_batch(seed=seed, batch=batch, padded=False)
    return {**data, "labels": torch.full_like(data["labels"], -100)}


def test_a_micro_batch_without_label_tokens_weighs_nothing():
    # Under Trainer's `num_items_in_batch` (the label tokens of the whole accumulated batch, held by other
    # micro-batches), the routing losses of a micro-batch with no label tokens weigh 0, as its token loss does.
    # (A whole batch without label tokens: the Trainer test below.)
    model = tiny_lm()
    model.train()
    for num_items in (torch.tensor(5.0), 5):
        model.zero_grad()
        out = model(**unlabeled_batch(), num_items_in_batch=num_items)
        assert out.loss.item() == 0.0 and out.moge_loss > 0  # reported, weighted 0
        out.loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_on_prompt_only_batches_leaves_the_weights_alone(tmp_path, accumulation):
    model = tiny_lm()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    args = training_args(
        tmp_path, max_steps=2, per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation
    )
    trainer = Trainer(model=model, args=args, train_dataset=as_dataset(unlabeled_batch()))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [(entry["loss"], entry["grad_norm"]) for entry in logs] == [(0.0, 0.0), (0.0, 0.0)]
    for name, param in model.named_parameters():  # zero gradients: AdamW (no weight decay) moves nothing
        assert torch.equal(param, before[name]), name


def test_an_epoch_based_run_with_more_epochs_is_not_taken_for_finished(tmp_path):
    from moge_hf.training import finished_run_metrics

    (tmp_path / "trainer_state.json").write_text(
        json.dumps({"global_step": 4, "max_steps": 4, "num_train_epochs": 2, "train_batch_size": 8, "log_history": []})
    )
    (tmp_path / "all_results.json").write_text(json.dumps({"eval_loss": 1.0, "train_loss": 2.0}))
    same = training_args(tmp_path, num_train_epochs=2, per_device_train_batch_size=8, do_eval=True)
    assert finished_run_metrics(same)["eval_loss"] == 1.0
    assert finished_run_metrics(training_args(tmp_path, num_train_epochs=3, per_device_train_batch_size=8)) is None
    assert finished_run_metrics(training_args(tmp_path, num_train_epochs=2, per_device_train_batch_size=4)) is None
    assert finished_run_metrics(training_args(tmp_path, max_steps=6)) is None


# ---- training setups that would drop the routing losses ------------------------------------------------------------


def regularized_qwen3_moe():
    return add_moge_regularizer(CASES["qwen3_moe"].build(), moge_loss_coef=5.0, moge_map_shape=[2, 4], moge_window=2)


LOSS_DROPPING_MODELS = {"gpt2-lm": lambda: tiny_lm(moge_loss_coef=5.0), "qwen3_moe": regularized_qwen3_moe}


def router_weights(model) -> list[torch.Tensor]:
    return [tap.module.weight.detach().clone() for tap in routing_recorder(model).taps]


def refused_before_any_step(trainer, model, error: type[Exception], match: str) -> list[torch.Tensor]:
    """Train, expecting `error`; check that no step changed the routers; return their weights."""
    before = router_weights(model)
    with pytest.raises(error, match=match):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, router_weights(model)))
    return before


@pytest.mark.parametrize("case", sorted(LOSS_DROPPING_MODELS))
def test_label_smoothing_is_refused_before_training(case, tmp_path):
    # Trainer pops `labels` under label smoothing and smooths the logits' loss itself: the model's routing losses
    # would be logged and never trained (router weights bit-identical at lambda 5 and 0).
    model = LOSS_DROPPING_MODELS[case]()
    data = as_dataset(lm_batch(seed=1))
    args = training_args(tmp_path, max_steps=2, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match=r"--label_smoothing_factor 0\.1: .*routing losses"):
        add_moge_callback(Trainer(model=model, args=args, train_dataset=data))
    # Attached another way, the callback refuses at the start of training, before any step.
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MoGESigmaCallback()])
    refused_before_any_step(trainer, model, ValueError, r"--label_smoothing_factor")


def test_compute_loss_func_is_refused(tmp_path):
    model = tiny_lm(moge_loss_coef=5.0)

    def loss_of_logits(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].flatten(0, 1)
        return F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)

    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=as_dataset(lm_batch(seed=1)),
        compute_loss_func=loss_of_logits,
    )
    with pytest.raises(ValueError, match=r"compute_loss_func.*routing losses"):
        add_moge_callback(trainer)
    # Added as a plain callback, the first training forward (no `labels`, weighted routing losses) stops the run.
    trainer.add_callback(MoGESigmaCallback())
    refused_before_any_step(
        trainer, model, RuntimeError, r"called in training without `labels`.*\(aux_loss, moge_loss, z_loss\)"
    )


class LogitsLossTrainer(Trainer):
    """A trainer that computes its loss from the logits, as preference-optimization trainers do."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1].flatten(0, 1)
        loss = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("case", sorted(LOSS_DROPPING_MODELS))
def test_a_trainer_computing_its_own_loss_without_the_routing_losses_is_stopped(case, tmp_path):
    model = LOSS_DROPPING_MODELS[case]()
    trainer = LogitsLossTrainer(
        model=model, args=training_args(tmp_path, max_steps=2), train_dataset=as_dataset(lm_batch())
    )
    add_moge_callback(trainer)
    before = refused_before_any_step(trainer, model, RuntimeError, r"called in training without `labels`.*moge_loss")

    # Where the user's loss adds the routing losses, the check can be turned off, and the run trains.
    class WithRoutingLosses(LogitsLossTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            loss = loss + model.config.moge_loss_coef * outputs.moge_loss
            return (loss, outputs) if return_outputs else loss

    trainer = WithRoutingLosses(
        model=model, args=training_args(tmp_path, max_steps=2), train_dataset=as_dataset(lm_batch())
    )
    add_moge_callback(trainer, check_loss=False)
    trainer.train()
    assert not all(torch.equal(a, b) for a, b in zip(before, router_weights(model)))


def test_evaluation_and_no_grad_forwards_without_labels_are_left_alone(tmp_path):
    model = tiny_lm(moge_loss_coef=5.0)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=as_dataset(lm_batch()))
    callback = add_moge_callback(trainer)

    class Sample(TrainerCallback):  # a callback that runs the model without labels during training
        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                model(input_ids(seed=2, batch=2, seq=4))

    trainer.add_callback(Sample())
    trainer.train()
    assert callback._model is not None


def with_a_fused_head(model):
    """What TRL 1.x's trainers (SFT, DPO, GRPO, RLOO) do to a causal LM ("fused LM head"): the instance's forward is
    replaced by one that runs the backbone, scores the labels from the hidden states itself and returns its own output,
    so the head model's forward, where the routing losses join the loss, never runs."""

    def forward(input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    model.forward = forward
    return model


def test_routing_losses_that_no_gradient_reaches_stop_the_run_before_the_optimizer_step(tmp_path):
    model = with_a_fused_head(tiny_lm(moge_loss_coef=5.0))
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=as_dataset(lm_batch()))
    add_moge_callback(trainer)
    before = refused_before_any_step(
        trainer, model, RuntimeError, r"\(aux_loss, moge_loss, z_loss\) of this step's training forwards got no"
    )
    # The same trainer, the model's own forward back: it trains, with gradient accumulation too.
    del model.forward
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4),
        train_dataset=as_dataset(lm_batch()),
    )
    add_moge_callback(trainer)
    trainer.train()
    assert not all(torch.equal(a, b) for a, b in zip(before, router_weights(model)))


def test_hooks_a_dead_run_left_on_the_model_go_with_the_next_run(tmp_path):
    # A run that dies of something else (here a callback raising) never reaches `on_train_end`: its callback's hooks
    # stay on the model, and used to refuse the next, legitimate run ("called in training without `labels`").
    model = tiny_lm(moge_loss_coef=5.0)

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise KeyError("boom")

    data = as_dataset(lm_batch())
    first = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=data, callbacks=[Boom()])
    add_moge_callback(first)
    with pytest.raises(KeyError, match="boom"):
        first.train()
    assert model._forward_hooks  # left behind
    second = LogitsLossTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=data)
    add_moge_callback(second, check_loss=False)  # its own loss, from the logits: no check asked for
    second.train()
    assert not model._forward_hooks and not model.transformer._forward_hooks
    assert not routing_recorder(model).listeners


class DirectForwardTuner(torch.nn.Module):
    """A wrapper whose `forward` calls the wrapped model's `forward` directly, past its hooks (PEFT's tuners call the
    model itself, so its hooks run: checked by hand with peft 0.21.2 and LoRA on a regularized Qwen3-MoE)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_base_model(self):
        return self.model

    def forward(self, *args, **kwargs):
        return self.model.forward(*args, **kwargs)


def test_a_wrapper_that_skips_the_regularizers_hook_is_stopped_before_the_optimizer_step(tmp_path):
    model = regularized_qwen3_moe()
    wrapper = DirectForwardTuner(model)
    args = training_args(tmp_path, max_steps=2, remove_unused_columns=False)
    trainer = Trainer(model=wrapper, args=args, train_dataset=as_dataset(lm_batch()))
    add_moge_callback(trainer)
    before = refused_before_any_step(
        trainer, model, RuntimeError, r"No training forward of this step returned .*\(moge_loss\).*its hooks"
    )
    # Called through its hooks, the same model trains.
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=as_dataset(lm_batch()))
    add_moge_callback(trainer)
    trainer.train()
    assert not all(torch.equal(a, b) for a, b in zip(before, router_weights(model)))
