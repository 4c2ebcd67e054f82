"""The moge_hf models (every class of the table, tests/tiny.py): losses, outputs, training, generation, checkpointing,
save/load, bad inputs. A check about every model parametrizes over the table; one about a host's own feature (GPT-2's
positions, ViT's image size) builds that host's class by name."""

import copy
import importlib
import inspect
import pickle
import re
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny import (
    ALIGNED,
    CASES,
    UNALIGNED,
    VOCAB,
    case_names,
    gpt2_config,
    input_ids,
    lm_batch,
    pixel_values,
    swin_config,
    vit_config,
)
from transformers import AutoConfig
from transformers.modeling_layers import GradientCheckpointingLayer

import moge_hf
from moge_hf import (
    GPT2MoGELMHeadModel,
    SwinMoGEForImageClassification,
    SwinMoGEModel,
    ViTMoGEForImageClassification,
    group_sparsity_loss,
    load_balancing_loss,
    moge_model,
    router_z_loss,
)
from moge_hf.configuration_moge import CACHE_NAME
from moge_hf.moge_layer import MoGESparseMoeBlock
from moge_hf.moge_model import HOSTS, host_of
from moge_hf.routing import routing_recorder


# Every moge_hf model class (the shared table, tests/tiny.py), so every shared check runs on all of them.
MODEL_CASES = case_names(moge_hf=True)
HEAD_CASES = case_names(moge_hf=True, head=True)
# One head model per host family: checks of the shared machinery (the config, save/load, experts kernels), where the
# family's other classes add nothing.
FAMILY_CASES = case_names(moge_hf=True, head=True, per_family=True)
CAUSAL_LM_CASES = case_names(moge_hf=True, task="causal-lm")
GENERATIVE_CASES = case_names(moge_hf=True, generative=True)
# Text models whose batches carry an attention mask (padding).
MASKED_CASES = [name for name in MODEL_CASES if "attention_mask" in CASES[name].batch(size=1)]


def build(case, seed=0, **overrides):
    return CASES[case].build(seed, **overrides), CASES[case].batch()


def gpt2_lm(**overrides):
    """GPT-2's own LM class, for the checks of GPT-2's own features (positions, its modules' names)."""
    torch.manual_seed(0)
    return GPT2MoGELMHeadModel(gpt2_config(**overrides)), lm_batch()


def token_mask(batch):
    """The tokens the routing losses count: those the attention mask keeps (all of them without a mask)."""
    mask = batch.get("attention_mask")
    return None if mask is None else mask.reshape(-1).bool()


def task_loss(case, model, outputs, batch):
    """The task loss alone, computed by hand."""
    task = CASES[case].task
    if task == "causal-lm":
        logits, labels = outputs.logits[:, :-1], batch["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    if task in ("sequence-classification", "image-classification"):
        return F.cross_entropy(outputs.logits, batch["labels"])
    raise AssertionError(f"{case}: no task loss for task {task!r}")


def test_the_table_has_every_moge_hf_class():
    """Every class the library registers has its row in tests/tiny.py (else no shared check would run on it)."""
    registered = {head.model_class for host in HOSTS.values() for head in host.heads.values()}
    assert registered == {CASES[name].model_class for name in MODEL_CASES}


@pytest.mark.compat
@pytest.mark.parametrize("case", MODEL_CASES)
def test_outputs_have_routing_losses(case):
    model, batch = build(case)
    model.eval()
    outputs = model(**batch)
    for name in ("aux_loss", "moge_loss", "z_loss"):
        value = getattr(outputs, name)
        assert value.dim() == 0 and torch.isfinite(value), name
    assert outputs.router_logits is None
    outputs = model(**batch, output_router_logits=True)
    assert len(outputs.router_logits) == len(model.config.moe_layers)
    num_tokens = CASES[case].routed_tokens(batch, len(model.config.moe_layers))
    assert [tuple(logits.shape) for logits in outputs.router_logits] == [(n, 8) for n in num_tokens]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_outputs_pickle(case):
    model, batch = build(case)
    with torch.no_grad():
        outputs = model.eval()(**batch, output_router_logits=True)
    again = pickle.loads(pickle.dumps(outputs))
    assert type(again) is type(outputs) and again.keys() == outputs.keys()
    torch.testing.assert_close(again.moge_loss, outputs.moge_loss)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_routing_losses_with_a_zero_coefficient_are_reported_without_autograd(case):
    model, batch = build(case, moge_loss_coef=0.0, router_z_loss_coef=0.0, router_aux_loss_coef=0.01)
    outputs = model(**batch)
    assert outputs.aux_loss.requires_grad  # trained on
    assert not outputs.moge_loss.requires_grad and not outputs.z_loss.requires_grad  # only reported
    assert outputs.moge_loss > 0 and outputs.z_loss > 0
    model.config.moge_loss_coef = 0.1  # read at every forward
    assert model(**batch).moge_loss.requires_grad


@pytest.mark.parametrize("case", HEAD_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_loss_is_task_plus_weighted_routing_losses(case, training):
    model, batch = build(case, router_aux_loss_coef=0.02, router_z_loss_coef=0.003, moge_loss_coef=0.5)
    model.train(training)
    outputs = model(**batch)
    expected = task_loss(case, model, outputs, batch) + 0.02 * outputs.aux_loss
    expected = expected + 0.003 * outputs.z_loss + 0.5 * outputs.moge_loss
    torch.testing.assert_close(outputs.loss, expected)


@pytest.mark.parametrize("case", HEAD_CASES)
def test_moge_coef_zero_is_plain_moe(case):
    """lambda = 0 changes nothing but the regularizer: same outputs, same other losses, gradients without it."""
    model, batch = build(case, moge_loss_coef=0.0)
    moge_model = copy.deepcopy(model)
    moge_model.config.moge_loss_coef = 0.3
    out, moge_out = model(**batch), moge_model(**batch)
    torch.testing.assert_close(out.logits, moge_out.logits, rtol=0, atol=0)
    for name in ("aux_loss", "z_loss", "moge_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(moge_out, name), rtol=0, atol=0)
    torch.testing.assert_close(moge_out.loss, out.loss + 0.3 * out.moge_loss)

    baseline = task_loss(case, model, out, batch) + model.config.router_aux_loss_coef * out.aux_loss
    baseline = baseline + model.config.router_z_loss_coef * out.z_loss
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    ref_grads = torch.autograd.grad(baseline, params, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want)

    # With lambda > 0 the regularizer reaches the routers.
    moge_grads = torch.autograd.grad(moge_out.loss, list(moge_model.parameters()), allow_unused=True)
    routers = [i for i, name in enumerate(names) if "router" in name]
    assert routers
    for i in routers:
        assert not torch.allclose(grads[i], moge_grads[i]), names[i]


@pytest.mark.parametrize("case", CAUSAL_LM_CASES)
def test_routing_losses_follow_trainer_token_normalization(case):
    """With Trainer's `num_items_in_batch`, the routing losses are weighted by the micro-batch's share of tokens."""
    model, batch = build(case)
    model.eval()
    plain = model(**batch)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    half = model(**batch, num_items_in_batch=2 * tokens)  # this micro-batch holds half of the batch's tokens
    torch.testing.assert_close(half.loss, 0.5 * plain.loss)  # both the LM loss and the routing losses halve
    whole = model(**batch, num_items_in_batch=tokens)
    torch.testing.assert_close(whole.loss, plain.loss)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_global_load_balancing_over_ranks_with_the_same_batch_is_the_local_one(case, monkeypatch):
    """`router_aux_loss_global=True` on two data-parallel ranks that hold the same batch (the all-reduce doubles every
    count): each MoGE layer's dispatch fractions, hence the load-balancing loss and its gradients, are the local ones;
    also where the layers route different numbers of tokens (a hierarchical model's stages)."""
    model, batch = build(case, router_aux_loss_coef=0.05)
    model.train()
    local = model(**batch)
    model.config.router_aux_loss_global = True
    monkeypatch.setattr(moge_model, "_data_parallel_world_size", lambda: 2)
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *_, **__: reduced.append(tensor.mul_(2)))
    two_ranks = model(**batch)
    assert len(reduced) == 1  # one all-reduce for every layer
    torch.testing.assert_close(two_ranks.aux_loss, local.aux_loss)
    torch.testing.assert_close(two_ranks.loss, local.loss)


@pytest.mark.parametrize("case", MASKED_CASES)
def test_routing_losses_ignore_padding_tokens(case):
    model, _ = build(case)
    model.eval()
    ids = input_ids(seed=3, batch=1, seq=5)
    padded = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    plain = model(ids)
    with_pad = model(padded, attention_mask=mask, output_router_logits=True)
    for name in ("aux_loss", "moge_loss", "z_loss"):
        torch.testing.assert_close(getattr(with_pad, name), getattr(plain, name))
    # ... and they are the loss functions applied to the real tokens only.
    keep = mask.reshape(-1).bool()
    config = model.config
    moge, aux, z = [], [], []
    for logits in with_pad.router_logits:
        probs = logits[keep].float().softmax(-1)
        moge.append(group_sparsity_loss(probs, config.moge_map_shape, config.moge_window, config.moge_sigma))
        aux.append(load_balancing_loss(probs, probs.topk(config.num_experts_per_tok, -1).indices))
        z.append(router_z_loss(logits[keep]))
    for name, per_layer in (("moge_loss", moge), ("aux_loss", aux), ("z_loss", z)):
        torch.testing.assert_close(getattr(with_pad, name), torch.stack(per_layer).mean())


@pytest.mark.parametrize("case", HEAD_CASES)
def test_a_few_steps_lower_the_loss(case):
    model, batch = build(case)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("case", HEAD_CASES)
def test_gradient_checkpointing_matches(case):
    model, batch = build(case, router_jitter_noise=0.0)
    checkpointed = copy.deepcopy(model)
    model.train()
    checkpointed.train()
    # transformers 5.23 renamed gradient checkpointing to activation checkpointing; 5.17 has only the old name.
    getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)()
    layers = [m for m in checkpointed.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    out, ckpt_out = model(**batch), checkpointed(**batch)
    torch.testing.assert_close(ckpt_out.loss, out.loss)
    torch.testing.assert_close(ckpt_out.moge_loss, out.moge_loss)
    out.loss.backward()
    ckpt_out.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), checkpointed.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=name)


def enable_checkpointing(model, use_reentrant: bool) -> None:
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    kwargs_name = next(n for n in inspect.signature(enable).parameters if n.endswith("checkpointing_kwargs"))
    enable(**{kwargs_name: {"use_reentrant": use_reentrant}})


def test_reentrant_checkpointing_refused_with_frozen_routers_and_trainable_weights_before_them():
    # LoRA-style: the routers (and most of the model) frozen, a trainable attention projection in layer 0. The routing
    # losses reach it through the hidden states; reentrant checkpointing would drop that gradient silently. (GPT-2's
    # own module names: the check is the mixin's, the same for every host.)
    model, batch = gpt2_lm(router_jitter_noise=0.0)
    model.train()
    for param in model.parameters():
        param.requires_grad_(False)
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(True)
    enable_checkpointing(model, use_reentrant=True)
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(**batch)
    # Nothing trainable before the routers (only the final layer norm): the routing has nothing to train, no error.
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    model.transformer.ln_f.weight.requires_grad_(True)
    model(**batch).loss.backward()
    # Non-reentrant (transformers' default): the routing losses' gradient reaches the adapter.
    model, batch = gpt2_lm(router_jitter_noise=0.0)
    model.train()
    for param in model.parameters():
        param.requires_grad_(False)
    adapter = model.transformer.h[0].attn.c_attn.weight.requires_grad_(True)
    enable_checkpointing(model, use_reentrant=False)
    out = model(**batch)
    (grad,) = torch.autograd.grad(out.moge_loss, adapter)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("case", HEAD_CASES)
def test_reentrant_checkpointing_refused_since_routing_losses_would_train_nothing(case):
    model, batch = build(case, router_jitter_noise=0.0)
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    kwargs_name = next(n for n in inspect.signature(enable).parameters if n.endswith("checkpointing_kwargs"))
    enable(**{kwargs_name: {"use_reentrant": True}})
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(**batch)
    with torch.no_grad():  # evaluation needs no routing gradient
        assert torch.isfinite(model(**batch).loss)


@pytest.mark.compat
@pytest.mark.parametrize("case", GENERATIVE_CASES)
def test_generate_with_cache_matches_without(case):
    model, _ = build(case)
    model.eval()
    prompt = CASES[case].inputs(seed=5, size=2)["input_ids"][:, :4]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=model.config.pad_token_id)
    kwargs["attention_mask"] = torch.ones_like(prompt)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_generative_classes_list_generation_mixin_among_their_direct_bases(case):
    # transformers' convention, asserted by its common test `test_inherits_generation_mixin`: a class that can
    # generate names `GenerationMixin` among its own bases (inheriting it from the dense parent is not enough). The
    # table says which classes generate (tests/tiny.py checks it against `can_generate`).
    cls = CASES[case].model_class
    assert (transformers.GenerationMixin in cls.__bases__) == CASES[case].generative, cls.__name__


def test_hidden_states_attentions_and_resized_embeddings():
    model, batch = gpt2_lm(n_inner=64)  # GPT-2's own layer count and embedding names
    model.set_attn_implementation("eager")
    model.eval()
    outputs = model(**batch, output_hidden_states=True, output_attentions=True)
    assert len(outputs.hidden_states) == model.config.n_layer + 1
    assert len(outputs.attentions) == model.config.n_layer
    model.resize_token_embeddings(VOCAB + 5)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model(input_ids(batch=2, seq=3) + 5).logits.shape == (2, 3, VOCAB + 5)


@pytest.mark.parametrize("case", HEAD_CASES)
def test_return_dict_false_gives_tuples(case):
    model, batch = build(case)
    model.eval()
    as_tuple = model(**batch, return_dict=False)
    as_dict = model(**batch)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)


# The tuple layout, the same under every transformers release: the dense parent's fields (for GPT-2, the KV cache
# third, whatever transformers calls it), then the routing fields. `None` fields are left out, as in transformers.
@pytest.mark.parametrize("case", MODEL_CASES)
def test_tuple_layout_is_the_parents_then_the_routing_fields(case):
    model, batch = build(case)
    model.eval()
    dense = CASES[case].build_dense()  # the dense parent, the same shape, on the same batch
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        dense_outputs = dense(**batch)
    layout = (*dense_outputs.keys(), "aux_loss", "moge_loss", "z_loss")
    assert tuple(as_dict.keys()) == layout
    if CACHE_NAME in inspect.signature(CASES[case].dense_class.forward).parameters:
        assert CACHE_NAME in layout  # the cache is returned, in the parent's place
    assert len(as_tuple) == len(layout)
    for name, value in zip(layout, as_tuple):
        expected = as_dict[name]
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, expected)
        else:
            assert type(value) is type(expected)
    # Transformers' own output class is the parent: code written for the dense model's outputs works unchanged.
    assert isinstance(as_dict, type(dense_outputs)) and type(as_dict) is not type(dense_outputs)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_moge_layers_start_like_the_dense_mlp_they_replace(case):
    """A model built from its config: each MoGE layer's experts have the init scale transformers gives the dense MLP
    they replace (GPT-2 scales its down projection by the depth), zero biases where it has them, and the block drops
    out its output as that MLP does, with the same config field's rate. Every dropout field of the config gets its
    own rate, so a host record naming another field (or none) fails here."""
    dense_config = CASES[case].make_dense_config()
    fields = sorted(k for k, v in dense_config.to_dict().items() if "drop" in k and type(v) is float)
    rates = {name: round(0.11 + 0.01 * i, 2) for i, name in enumerate(fields)}
    model, _ = build(case, **rates)
    dense = CASES[case].build_dense(**rates)
    mlp = host_of(type(model)).mlp
    layers, dense_layers = mlp.layer_modules(model.base_model), mlp.layer_modules(dense.base_model)
    for index in model.config.moe_layers:
        block, dense_mlp = getattr(layers[index], mlp.module), getattr(dense_layers[index], mlp.module)
        dense_weights = mlp.dense_weights(dense_mlp, f"layer {index}")
        for name, (_, part) in block.experts.DENSE_WEIGHTS.items():
            got, want = getattr(block.experts, name).detach(), dense_weights[name].detach()
            if part == "bias":
                assert not want.any() and not got.any(), (index, name)
            else:
                assert 0.8 < got.std() / want.std() < 1.25, (index, name, got.std().item(), want.std().item())

        def rates_of(module):
            return sorted(m.p for m in module.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0)

        assert rates_of(block) == rates_of(dense_mlp), (index, rates)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_set_moge_sigma(case):
    model, batch = build(case, moge_sigma=1.0)
    model.eval()
    before = model(**batch).moge_loss
    model.set_moge_sigma(4.0)
    assert model.config.moge_sigma == 4.0
    assert all(block.regularizer.sigma == 4.0 for block in model.moge_blocks())
    router_logits = model(**batch, output_router_logits=True).router_logits
    shape, mask = model.config.moge_map_shape, token_mask(batch)
    expected = torch.stack(
        [group_sparsity_loss(lg.softmax(-1), shape, 2, 4.0, mask=mask) for lg in router_logits]
    ).mean()
    after = model(**batch).moge_loss
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(before, after)
    for bad in (0.0, -1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="sigma"):
            model.set_moge_sigma(bad)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("case", HEAD_CASES)
def test_experts_implementations_agree_in_the_model(case, implementation):
    model, batch = build(case, **ALIGNED)
    model.eval()
    reference = model(**batch).logits
    model.set_experts_implementation(implementation)
    assert model.config._experts_implementation == implementation
    torch.testing.assert_close(model(**batch).logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sonicmoe", "deepgemm"])
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_experts_implementations_that_cannot_run_moge_experts_are_refused(case, implementation):
    model, _ = build(case)
    with pytest.raises(ValueError, match=rf"{implementation}.*cannot run MoGE experts"):
        model.set_experts_implementation(implementation)
    with pytest.raises(ValueError, match="fancy_mm"):  # unknown: transformers' own error
        model.set_experts_implementation("fancy_mm")


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_a_user_registered_experts_kernel_is_accepted(case, monkeypatch):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    calls = []

    def my_kernel(experts, hidden_states, top_k_index, top_k_weights):
        calls.append(hidden_states.shape[0])
        return ALL_EXPERTS_FUNCTIONS["batched_mm"](experts, hidden_states, top_k_index, top_k_weights)

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "my_kernel", my_kernel)
    model, batch = build(case)
    model.set_experts_implementation("my_kernel")
    model(**batch)
    assert calls


def test_moge_triton_refused_for_an_activation_it_cannot_fuse():
    model, _ = gpt2_lm(activation_function="gelu_fast")  # GPT-2's activation field
    with pytest.raises(ValueError, match="moge_triton.*'gelu_fast'"):
        model.set_experts_implementation("moge_triton")


@pytest.mark.parametrize("case", MODEL_CASES)
def test_grouped_mm_refused_for_unaligned_sizes(case):
    model, batch = build(case, **UNALIGNED)  # experts of 37
    assert {block.experts.intermediate_dim for block in model.moge_blocks()} == {37}
    assert model.config._experts_implementation == "eager"  # the default, for every size
    with pytest.raises(ValueError, match="multiples of 8"):
        model.set_experts_implementation("grouped_mm")
    with pytest.raises(ValueError, match="multiples of 8"):  # asked for when the model is built
        build(case, **UNALIGNED, experts_implementation="grouped_mm")
    model, _ = build(case, **ALIGNED, experts_implementation="grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"


def test_grouped_mm_checks_the_sizes_of_each_swin_stage_with_moge_layers():
    """Swin's stages widen: `grouped_mm` is refused for a MoGE layer whose stage has unaligned sizes, and accepted
    where every MoGE layer's are aligned, whatever the sizes of the stages without one (the config's `hidden_size`
    is the last stage's width, its `dense_intermediate_size` the first stage's MLP)."""
    stages = dict(embed_dim=8, depths=[2, 2, 2], num_heads=[2, 2, 2], mlp_ratio=1.5)  # MLPs of 12, 24, 48
    for model_class in (SwinMoGEModel, SwinMoGEForImageClassification):
        model = model_class(swin_config(**stages, moe_layers=[3, 5], experts_implementation="grouped_mm"))
        sizes = [(block.experts.hidden_dim, block.experts.intermediate_dim) for block in model.moge_blocks()]
        assert sizes == [(16, 24), (32, 48)]
        with pytest.raises(ValueError, match=r"multiples of 8, got \[8, 12, 16, 24\]"):
            model_class(swin_config(**stages, moe_layers=[1, 3], experts_implementation="grouped_mm"))


@pytest.mark.parametrize("case", MODEL_CASES)
def test_moge_models_can_set_experts_implementation_after_a_dense_model(case):
    """transformers caches its experts check on the class; the dense parent built first must not disable ours."""
    CASES[case].build_dense()
    model, _ = build(case, **ALIGNED)
    model.set_experts_implementation("batched_mm")
    assert model.config._experts_implementation == "batched_mm"


@pytest.mark.parametrize("case", HEAD_CASES)
def test_bfloat16_forward(case):
    model, batch = build(case, **ALIGNED)
    model = model.to(torch.bfloat16).eval()
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}  # e.g. pixel values
    outputs = model(**batch)
    assert outputs.logits.dtype == torch.bfloat16
    assert torch.isfinite(outputs.loss) and torch.isfinite(outputs.moge_loss)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_window_weights_stay_float32_when_the_model_is_cast(case):
    model, batch = build(case, **ALIGNED)
    exact = [block.regularizer.window_matrix.clone() for block in model.moge_blocks()]
    model = model.to(torch.bfloat16)
    for block, matrix in zip(model.moge_blocks(), exact):
        assert block.regularizer.window_matrix.dtype == torch.float32
        torch.testing.assert_close(block.regularizer.window_matrix, matrix, rtol=0, atol=0)
    model.set_moge_sigma(2.5)  # and a new sigma is still written in place, in float32
    assert all(block.regularizer.window_matrix.dtype == torch.float32 for block in model.moge_blocks())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", HEAD_CASES)
def test_routing_losses_are_float32_under_autocast(case, dtype):
    model, batch = build(case, **ALIGNED, num_experts=16, moge_map_shape=[4, 4], moge_loss_coef=0.01)
    with torch.no_grad():  # confident routers, whose far windows' squared probabilities underflow in fp16
        for block in model.moge_blocks():
            block.router.weight.mul_(300.0)
    reference = model(**batch)
    with torch.autocast("cpu", dtype=dtype):
        outputs = model(**batch)
    assert outputs.moge_loss.dtype == torch.float32
    torch.testing.assert_close(outputs.moge_loss, reference.moge_loss, rtol=1e-2, atol=0)
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------------------------
# Auto classes, save and load
# ------------------------------------------------------------------------------------------------------------------

AUTO_CASES = [(name, getattr(transformers, CASES[name].auto_class)) for name in MODEL_CASES]


@pytest.mark.compat
@pytest.mark.parametrize("case,auto_class", AUTO_CASES)
def test_auto_class_round_trip(case, auto_class, tmp_path):
    model, batch = build(case, moge_sigma=2.5)
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    written = {p.name for p in tmp_path.iterdir()}
    # The family's own modeling file and what it imports (the shared layer, routing, config, losses); not another
    # family's file, nor 0.1.0's `modeling_moge.py` (a shim that only `upgrade_code` writes, for old folders).
    own = f"{type(model).__module__.rsplit('.', 1)[-1]}.py"
    others = {
        f"{head.model_class.__module__.rsplit('.', 1)[-1]}.py"
        for host in HOSTS.values()
        for head in host.heads.values()
    }
    assert {own, "moge_model.py", "moge_layer.py", "routing.py", "configuration_moge.py", "losses.py"} <= written
    assert not (others - {own}) & written and "modeling_moge.py" not in written
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.config)
    assert {**config.to_dict(), "_name_or_path": ""} == {**model.config.to_dict(), "_name_or_path": ""}
    assert config.auto_map[auto_class.__name__].endswith(type(model).__name__)

    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.moge_blocks()[0].regularizer.sigma == 2.5
    torch.testing.assert_close(
        loaded.moge_blocks()[0].regularizer.window_matrix, model.moge_blocks()[0].regularizer.window_matrix
    )
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert torch.equal(state[name], loaded_state[name]), name
    out, loaded_out = model(**batch), loaded(**batch)
    for name, value in out.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, loaded_out[name]), name


def tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("case", CAUSAL_LM_CASES)
def test_lm_head_is_tied_after_loading(case, tmp_path):
    model, _ = build(case)
    assert tied(model)
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, CASES[case].auto_class).from_pretrained(tmp_path)
    assert tied(loaded)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_auto_from_config_and_registration_is_idempotent(case):
    importlib.reload(moge_hf)
    importlib.reload(moge_hf)
    spec = CASES[case]
    own = spec.make_config()
    kwargs = {k: v for k, v in own.to_diff_dict().items() if k != "model_type"}
    config = AutoConfig.for_model(own.model_type, **kwargs)
    assert type(config) is type(own)
    assert type(getattr(transformers, spec.auto_class).from_config(config)) is spec.model_class
    assert type(AutoConfig.for_model(own.model_type)) is type(own)


@pytest.mark.parametrize("case", [name for name in CASES if CASES[name].task is not None])
def test_a_deep_copy_records_its_own_routing_also_in_the_middle_of_training(case):
    spec = CASES[case]
    model = spec.build()
    if not spec.moge_hf:
        model = moge_hf.add_moge_regularizer(model, moge_loss_coef=0.1, moge_map_shape=[2, 4], moge_window=2)
    model.train()
    batch = spec.batch()
    recorder, heard = routing_recorder(model), []
    recorder.listeners.append(heard.append)
    torch.manual_seed(0)
    outputs = model(**batch)  # its graph (and the routing's) is alive: a copy must not try to copy it
    copied = copy.deepcopy(model)
    assert len(heard) == 1
    torch.manual_seed(0)
    copied_outputs = copied(**batch)
    assert len(heard) == 1  # the copy's forward reaches its own recorder, not the original's listeners
    torch.testing.assert_close(copied_outputs.loss, outputs.loss)
    torch.testing.assert_close(copied_outputs.moge_loss, outputs.moge_loss)
    own = routing_recorder(copied)
    assert own is not recorder and not own.listeners
    assert all(any(tap.module is module for module in copied.modules()) for tap in own.taps)
    model(**batch)
    assert len(heard) == 2


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_data_parallel_replicas_sharing_the_recorder_record_apart(case):
    """`nn.DataParallel` replicas are shallow copies that share the recorder and run in threads: each thread's
    forward must get its own routing (this is what `Trainer` does on a machine with several GPUs and no launcher)."""

    def replicate(module):  # what `torch.nn.parallel.replicate` does, without devices
        replica = module._replicate_for_data_parallel()
        replica._parameters = dict(module._parameters)
        for name, child in module._modules.items():
            replica._modules[name] = None if child is None else replicate(child)
        return replica

    model, batch = build(case, moe_layers=[0, 1])
    model.eval()
    with torch.no_grad():
        expected = model(**batch)
    replicas = [replicate(model), replicate(model)]
    results, errors = [], []

    def work(replica):
        for _ in range(20):
            try:
                with torch.no_grad():
                    results.append(replica(**batch))
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(replica,)) for replica in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert len(results) == 40
    for outputs in results:
        for name in ("loss", "aux_loss", "moge_loss", "z_loss"):
            torch.testing.assert_close(getattr(outputs, name), getattr(expected, name))


@pytest.mark.parametrize("case", MODEL_CASES)
def test_the_routing_losses_read_the_routing_the_block_used_after_a_router_hook(case):
    model, batch = build(case, router_jitter_noise=0.0, num_experts_per_tok=1)
    model.eval()
    forced = {}

    def force(module, args, routing):  # every token to expert 3
        logits = torch.full_like(routing.logits, -5.0)
        logits[:, 3] = 5.0
        probs = logits.float().softmax(-1)
        weights, index = probs.topk(module.top_k, dim=-1)
        forced[module] = (probs, index)
        return routing._replace(
            logits=logits, clean_logits=logits, probs=probs, top_k_weights=weights, top_k_index=index
        )

    for block in model.moge_blocks():
        block.router.register_forward_hook(force)
    with torch.no_grad():
        outputs = model(**batch)
    mask = token_mask(batch)
    want = torch.stack([load_balancing_loss(probs, index, mask) for probs, index in forced.values()]).mean()
    torch.testing.assert_close(outputs.aux_loss, want)


@pytest.mark.parametrize("case", CAUSAL_LM_CASES)
def test_untie_word_embeddings_keeps_the_function_and_saves_both(case, tmp_path):
    model, batch = build(case)
    model.eval()
    before = model(**batch).logits
    assert model.untie_word_embeddings() is model
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not embeddings and torch.equal(head, embeddings) and not model.config.tie_word_embeddings
    torch.testing.assert_close(model(**batch).logits, before)
    with torch.no_grad():
        head.add_(1.0)  # they train apart from here
    assert not torch.equal(model.get_input_embeddings().weight, head)
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, CASES[case].auto_class).from_pretrained(tmp_path)
    assert not tied(loaded)
    assert torch.equal(loaded.get_output_embeddings().weight, head)
    assert torch.equal(loaded.get_input_embeddings().weight, embeddings)


@pytest.mark.parametrize("case", [name for name in MODEL_CASES if name not in CAUSAL_LM_CASES])
def test_untie_word_embeddings_without_output_embeddings_is_a_no_op(case):
    model, _ = build(case)
    assert model.get_output_embeddings() is None
    config = model.config.to_diff_dict()
    assert model.untie_word_embeddings() is model and model.config.to_diff_dict() == config


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_from_pretrained_experts_implementation(case, tmp_path):
    model, batch = build(case, **ALIGNED)
    model.eval()
    model.save_pretrained(tmp_path)
    auto_class = getattr(transformers, CASES[case].auto_class)
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        loaded = auto_class.from_pretrained(tmp_path, experts_implementation=implementation).eval()
        assert loaded.config._experts_implementation == implementation
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="experts_implementation"):
        auto_class.from_pretrained(tmp_path, experts_implementation="no_such_kernel")


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"moe_layers": [64]}, "moe_layers"),  # past the last layer (GPT-2's boundary: test_good_config_edge_cases)
        ({"moe_layers": []}, "moe_layers"),
        ({"moe_layers": [1, 1]}, "moe_layers"),
        ({"expert_intermediate_size": 0}, "expert_intermediate_size"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
        ({"router_z_loss_coef": float("nan")}, "router_z_loss_coef"),
        ({"router_jitter_noise": 1.5}, "router_jitter_noise"),
        ({"moge_loss_coef": -1.0}, "moge_loss_coef"),
        ({"moge_loss_coef": float("inf")}, "moge_loss_coef"),
        ({"moge_map_shape": [3, 3]}, "moge_map_shape"),
        ({"moge_map_shape": [8]}, "moge_map_shape"),
        ({"moge_window": 3}, "moge_window"),
        ({"moge_window": 0}, "moge_window"),
        ({"moge_sigma": 0.0}, "moge_sigma"),
        ({"moge_sigma_schedule": [10.0, 1.0]}, "moge_sigma_schedule"),
        ({"moge_sigma_schedule": [10.0, -1.0, 0.2]}, "moge_sigma_schedule"),
        ({"moge_padding": "same"}, "moge_padding"),
        ({"moge_reduction": "sum"}, "moge_reduction"),
        ({"num_experts": "8"}, "num_experts"),
        ({"router_aux_loss_global": 1}, "router_aux_loss_global"),
    ],
)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_bad_config_values_raise(case, overrides, field):
    with pytest.raises(ValueError, match=field):
        CASES[case].make_config(**overrides)


def test_good_config_edge_cases():
    assert gpt2_config(moge_window=3, moge_padding="circular").moge_window == 3  # a window larger than the map
    assert gpt2_config(moge_map_shape=(4, 2)).moge_map_shape == [4, 2]
    assert gpt2_config(moe_layers=None, n_layer=4).moe_layers == [1, 3]
    assert gpt2_config(moe_layers=None, n_layer=1).moe_layers == [0]
    assert gpt2_config(moe_layers=[1]).moe_layers == [1]  # the last of its 2 layers; one past it is refused
    with pytest.raises(ValueError, match="moe_layers"):
        gpt2_config(moe_layers=[2])
    assert gpt2_config(moge_map_shape=None, num_experts=32, moge_window=3).moge_resolved_map_shape == (4, 8)
    assert gpt2_config(num_experts_per_tok=1).moge_norm_topk_prob is False
    assert gpt2_config(num_experts_per_tok=2).moge_norm_topk_prob is True


@pytest.mark.parametrize(
    "field,value",
    [
        ("moge_loss_coef", -1.0),
        ("moge_padding", "same"),
        ("moge_window", 0),
        ("router_jitter_noise", 1.0),
        ("moge_sigma", float("nan")),
        ("moge_sigma_schedule", [1.0, 2.0]),
        ("num_experts", 0),
    ],
)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_bad_value_assigned_to_a_built_config_raises_and_keeps_the_old_one(case, field, value):
    config = CASES[case].make_config()
    before = getattr(config, field)
    with pytest.raises(ValueError, match=field):
        setattr(config, field, value)
    assert getattr(config, field) == before


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_fields_that_only_clash_together_are_checked_on_validate_save_and_model_build(case, tmp_path):
    spec = CASES[case]
    config = spec.make_config()
    config.moge_window = 3  # valid alone, but no 3x3 window fits the 2x4 map with valid padding
    with pytest.raises(ValueError, match="moge_window"):
        config.validate()
    with pytest.raises(ValueError, match="moge_window"):
        config.save_pretrained(tmp_path / "config")
    with pytest.raises(ValueError, match="moge_window"):
        spec.model_class(config)
    model, _ = build(case)
    model.save_pretrained(tmp_path / "model")
    auto_class = getattr(transformers, spec.auto_class)
    with pytest.raises(ValueError, match="moge_padding"):
        auto_class.from_pretrained(tmp_path / "model", moge_padding="same")
    with pytest.raises(ValueError, match="moge_window"):
        auto_class.from_pretrained(tmp_path / "model", moge_window=9)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_bad_config_file_raises_on_load(case, tmp_path):
    model, _ = build(case)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"moge_window": 2', '"moge_window": 5')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="moge_window"):
        getattr(transformers, CASES[case].auto_class).from_pretrained(tmp_path)


def test_sequence_longer_than_n_positions_raises():
    model, _ = gpt2_lm()  # GPT-2's learned positions
    with pytest.raises(ValueError, match="n_positions=32"):
        model(input_ids(batch=2, seq=33))
    with pytest.raises(ValueError, match="n_positions"):
        model(input_ids(batch=1, seq=4), position_ids=torch.tensor([[30, 31, 32, 33]]))


def test_generation_past_n_positions_raises_with_the_cache_counted():
    model, _ = gpt2_lm()
    model.eval()
    prompt = input_ids(seed=3, batch=2, seq=28)
    assert model.generate(prompt, max_new_tokens=4, do_sample=False).shape == (2, 32)  # fills the 32 positions
    for mask in (None, torch.ones(2, 28, dtype=torch.long)):  # a clear error, not an IndexError from the embedding
        with pytest.raises(ValueError, match="n_positions=32"):
            model.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=mask)
    # A cache passed by hand under the installed transformers' name (not one of our arguments): the check must count
    # its tokens.
    with torch.no_grad():
        cache = model(prompt, use_cache=True)[CACHE_NAME]
        with pytest.raises(ValueError, match=r"34 tokens long \(6 new \+ 28 cached\)"):
            model(input_ids(batch=2, seq=6), **{CACHE_NAME: cache})


@pytest.mark.parametrize("case", MODEL_CASES)
def test_forward_arguments_follow_the_dense_parent(case):
    # Every argument of the dense forward reaches ours (by name, or through **kwargs); a KV cache goes through under
    # the parent's own name (transformers renamed it), and then positions past the first input are keyword-only, so a
    # positional call written for another release fails loudly.
    spec = CASES[case]
    dense = inspect.signature(spec.dense_class.forward).parameters
    ours = inspect.signature(spec.model_class.forward).parameters
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values()) and CACHE_NAME not in ours
    if CACHE_NAME in dense:
        first, *rest = [p for name, p in ours.items() if name != "self"]
        assert all(p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD) for p in rest), first
        model, batch = build(case)
        with pytest.raises(TypeError):
            model(*list(batch.values())[:2])


@pytest.mark.parametrize("case", MASKED_CASES)
def test_attention_mask_of_the_wrong_shape_raises_naming_the_shapes(case):
    model, _ = build(case)
    ids = input_ids(batch=2, seq=7)
    for mask in (torch.ones(2, 5, dtype=torch.long), torch.ones(3, 7, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"attention_mask has shape .* it must be \(2, 7\)"):
            model(ids, attention_mask=mask)


@pytest.mark.parametrize("case", GENERATIVE_CASES)
def test_attention_mask_of_the_wrong_shape_after_a_cache_raises_naming_the_shapes(case):
    model, _ = build(case)
    ids = input_ids(batch=2, seq=7)
    with torch.no_grad():  # with a cache: cached + new tokens
        cache = model(ids, use_cache=True)[CACHE_NAME]
        with pytest.raises(ValueError, match=r"after 7 cached: it must be \(2, 8\)"):
            model(ids[:, :1], attention_mask=torch.ones(2, 7, dtype=torch.long), **{CACHE_NAME: cache})


def test_image_of_wrong_size_or_shape_raises():
    torch.manual_seed(0)
    model = ViTMoGEForImageClassification(vit_config())  # ViT's fixed image size (its position embeddings)
    with pytest.raises(ValueError, match="image size"):
        model(pixel_values(batch=2, size=20))
    with pytest.raises(ValueError, match="channel"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="pixel_values"):
        model()


@pytest.mark.parametrize("case", MODEL_CASES)
def test_nan_hidden_states_reaching_the_router_raise(case):
    """The error names the MoGE layer whose router saw them, also where `moe_layers` is not in layer order."""
    model, _ = build(case)
    layers = [0, len(host_of(type(model)).mlp.layer_modules(model.base_model)) - 1]
    model, batch = build(case, moe_layers=layers[::-1])
    block = model.moge_blocks()[-1]
    assert isinstance(block, MoGESparseMoeBlock) and block.layer_index == layers[-1]

    def poison(module, args):  # what a diverged layer before it would hand the MoGE layer
        return (torch.full_like(args[0], float("nan")), *args[1:])

    block.register_forward_pre_hook(poison)
    with pytest.raises(ValueError, match=rf"MoGE layer\(s\) \[{layers[-1]}\] .*not finite"):
        model(**batch)


@pytest.mark.parametrize("case", case_names(moge_hf=True, task="sequence-classification"))
def test_sequence_classification_without_pad_token_raises(case):
    model, batch = build(case, pad_token_id=None)
    with pytest.raises(ValueError, match="padding token"):
        model(**batch)


@pytest.mark.parametrize(
    "name, values",  # the first value that is not the model's own is set
    [
        ("moge_reduction", ["paper"]),
        ("moge_sigma", [3.0]),
        ("moge_window", [1]),
        ("moge_padding", ["circular"]),
        ("moge_map_shape", [[4, 2]]),
        ("num_experts_per_tok", [1, 2]),
        ("norm_topk_prob", [False, True]),
        ("router_jitter_noise", [0.1]),
        ("moe_layers", [[0], [1]]),
    ],
)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_moge_fields_changed_on_a_built_models_config_are_refused_not_silently_saved(case, name, values, tmp_path):
    # The MoGE layers read these when they are built: changed afterwards, the model would keep the old value and
    # save the new one, and the reloaded model would be another model.
    model, batch = build(case)
    built = {"norm_topk_prob": model.config.moge_norm_topk_prob}.get(name, getattr(model.config, name))
    value = next(value for value in values if value != built)
    setattr(model.config, name, value)
    with pytest.raises(ValueError, match=rf"config\.{name} was set to .* after the model was built"):
        model(**batch)
    with pytest.raises(ValueError, match=rf"config\.{name} was set"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_live_fields_and_set_moge_sigma_keep_config_and_model_in_step(case, tmp_path):
    model, batch = build(case)
    model.eval()
    model.set_moge_sigma(3.0)  # the way to change sigma: modules and config together
    model.config.moge_loss_coef = 0.5  # read at every forward
    model.config.router_aux_loss_coef = 0.0
    with torch.no_grad():
        out = model(**batch)
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, CASES[case].auto_class).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = loaded(**batch)
    torch.testing.assert_close(again.loss, out.loss)
    torch.testing.assert_close(again.moge_loss, out.moge_loss)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_a_shape_changing_field_set_on_a_built_model_gets_the_right_hint(case):
    model, batch = build(case)
    model.config.num_experts = 4
    with pytest.raises(ValueError, match=r"config\.num_experts .* it changes weight shapes: set it back to 8"):
        model(**batch)
    model.config.num_experts = 8  # back: the model runs again
    model(**batch)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_the_parallel_plans_name_the_models_own_modules(case):
    # The rules of transformers' distributed engine (expert parallelism from the host record's MLP, FSDP units from
    # the config): each names modules or weights the model has (a model nested in the host's, such as Swin's
    # encoder, must not add the rules again under its own prefix).
    model, _ = build(case)
    names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
    plans = {attribute: getattr(model, attribute, None) or {} for attribute in ("_ep_plan", "_fsdp_plan", "_tp_plan")}
    assert plans["_ep_plan"] or not hasattr(model, "_ep_plan")  # where transformers keeps plans, MoGE has one
    for attribute, plan in plans.items():
        for rule in plan:
            pattern = re.compile(re.escape(rule).replace(r"\*", r"\d+") + "$")
            assert any(pattern.match(name) for name in names), f"{attribute} rule {rule!r} names nothing"
