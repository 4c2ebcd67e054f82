"""`upcycle_to_moe`: dense Llama / Mistral / Qwen2 / Qwen3 into transformers' own MoE siblings, exactly at init."""

import sys

import pytest
import torch
import transformers
from test_remote_code import run_child
from tiny import VOCAB, lm_batch, training_args
from transformers import AutoModelForCausalLM, Trainer

from moge_hf import add_moge_regularizer, upcycle_to_moe
from moge_hf.routing import moge_routers
from moge_hf.upcycling import MOE_SIBLINGS


DENSE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Per family: the dense config's own settings worth carrying (Mistral's window, Qwen3's head_dim != hidden / heads).
FAMILIES = {"Llama": {}, "Mistral": dict(sliding_window=4), "Qwen2": {}, "Qwen3": dict(head_dim=16)}


def dense_model(family: str, head: str = "ForCausalLM", **overrides):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**{**DENSE, **FAMILIES[family], **overrides})
    return getattr(transformers, f"{family}{head}")(config).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head", ["ForCausalLM", "Model"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_upcycled_sibling_computes_what_the_dense_model_does(family, head):
    dense = dense_model(family, head)
    moe = upcycle_to_moe(dense, num_experts=8, num_experts_per_tok=2).eval()
    assert type(moe).__name__ == MOE_SIBLINGS[type(dense).__name__]
    assert len(moge_routers(moe)) == 2  # every layer an MoE layer
    with torch.no_grad():
        expected, got = dense(ids())[0], moe(ids())[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    experts = moe.model.layers[0].mlp.experts if head == "ForCausalLM" else moe.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[7])  # copies of one MLP
    if head == "ForCausalLM":  # greedy generation with the KV cache, token for token
        prompt = ids(1)[:1]
        generate = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(moe.generate(prompt, **generate), dense.generate(prompt, **generate))


def test_noise_moves_the_experts_apart_and_layers_can_stay_dense():
    dense = dense_model("Qwen3")
    noisy = upcycle_to_moe(dense, num_experts=4, num_experts_per_tok=2, expert_noise_std=0.05)
    experts = noisy.model.layers[0].mlp.experts
    assert not torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])
    partial = upcycle_to_moe(dense, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]).eval()
    assert len(moge_routers(partial)) == 1 and torch.equal(
        partial.model.layers[0].mlp.gate_proj.weight, dense.model.layers[0].mlp.gate_proj.weight
    )
    with torch.no_grad():
        torch.testing.assert_close(partial(ids()).logits, dense(ids()).logits, atol=1e-5, rtol=0)


def test_qwen2_moe_shared_expert_starts_inert():
    moe = upcycle_to_moe(dense_model("Qwen2"), num_experts=4, num_experts_per_tok=2)
    shared = moe.model.layers[0].mlp.shared_expert
    assert shared.down_proj.weight.count_nonzero() == 0 and shared.gate_proj.weight.count_nonzero() > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_folder_upcycles_and_its_result_loads_without_moge_hf(family, tmp_path):
    dense = dense_model(family)
    dense.save_pretrained(tmp_path / "dense")
    moe = upcycle_to_moe(tmp_path / "dense", num_experts=4, num_experts_per_tok=2).eval()
    moe.save_pretrained(tmp_path / "moe")
    assert not list((tmp_path / "moe").glob("*.py"))  # a native checkpoint: no code of its own
    inputs = {"input_ids": ids()}
    torch.save(inputs, tmp_path / "moe" / "inputs.pt")
    child = run_child(tmp_path / "moe", "AutoModelForCausalLM", tmp_path)
    assert child["class"] == MOE_SIBLINGS[f"{family}ForCausalLM"]
    with torch.no_grad():
        torch.testing.assert_close(child["outputs"]["logits"], dense(**inputs).logits, atol=1e-5, rtol=0)
    assert torch.equal(child["generated"][:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(reloaded).__name__ == MOE_SIBLINGS[f"{family}ForCausalLM"]


def test_the_upcycled_model_trains_with_moge(tmp_path):
    moe = upcycle_to_moe(dense_model("Qwen3"), num_experts=8, num_experts_per_tok=2, output_router_logits=True)
    add_moge_regularizer(moe, moge_loss_coef=0.1)
    batch = lm_batch(0, batch=4, seq=7, low=3)
    out = moe.train()(**batch)
    router = moge_routers(moe)[0].module.weight
    (gradient,) = torch.autograd.grad(out.moge_loss, router)
    assert gradient.abs().sum() > 0
    rows = [{key: value[i] for key, value in batch.items()} for i in range(4)]
    trainer = Trainer(
        model=moe, args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=2), train_dataset=rows
    )
    before = router.detach().clone()
    trainer.train()
    assert not torch.equal(router, before)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)


def test_what_cannot_be_upcycled_exactly_is_refused(tmp_path):
    with pytest.raises(ValueError, match="attention_bias"):
        upcycle_to_moe(dense_model("Llama", attention_bias=True), num_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="mlp_bias"):
        upcycle_to_moe(dense_model("Llama", mlp_bias=True), num_experts=4, num_experts_per_tok=2)
    sliding = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="layer_types"):
        upcycle_to_moe(
            dense_model("Qwen3", layer_types=sliding, use_sliding_window=True, sliding_window=4),
            num_experts=4,
            num_experts_per_tok=2,
        )
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="no MoE sibling.*LlamaForCausalLM"):
        upcycle_to_moe(gpt2, num_experts=4, num_experts_per_tok=2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="no MoE sibling in transformers for GPT2LMHeadModel"):
        upcycle_to_moe(tmp_path / "gpt2", num_experts=4, num_experts_per_tok=2)
    llama = dense_model("Llama")
    for bad in (dict(num_experts=0, num_experts_per_tok=1), dict(num_experts=2, num_experts_per_tok=3)):
        with pytest.raises(ValueError, match="num_experts"):
            upcycle_to_moe(llama, **bad)
    with pytest.raises(ValueError, match="expert_noise_std"):
        upcycle_to_moe(llama, num_experts=2, num_experts_per_tok=1, expert_noise_std=float("nan"))


def test_a_sibling_that_would_compute_otherwise_is_caught(monkeypatch):
    # A difference no field check knows of (here: the sibling's norms drift) is caught by running both models.
    import moge_hf.upcycling as upcycling

    copy_checked = upcycling._copy_checked

    def drifting(owner, key, target, source, where=None):
        copy_checked(owner, key, target, source, where)
        if key.endswith("norm.weight"):
            target.mul_(1.5)

    monkeypatch.setattr(upcycling, "_copy_checked", drifting)
    with pytest.raises(ValueError, match="does not compute what the dense model does"):
        upcycle_to_moe(dense_model("Mistral"), num_experts=4, num_experts_per_tok=2)
    assert "moge_hf" in sys.modules


def test_a_qwen3_without_sliding_windows_upcycles_whatever_its_max_window_layers():
    # Qwen3 checkpoints name where sliding windows would start (`max_window_layers`, e.g. 36 in a 36-layer model) even
    # with `use_sliding_window=False`; Qwen3-MoE has no such field, and needs none when no layer has a window.
    dense = dense_model("Qwen3", max_window_layers=2, use_sliding_window=False)
    moe = upcycle_to_moe(dense, num_experts=4, num_experts_per_tok=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids()).logits, dense(ids()).logits, atol=1e-5, rtol=0)


def test_the_dense_generation_config_is_kept():
    dense = dense_model("Llama")
    dense.generation_config.update(eos_token_id=[2, 7], do_sample=True, temperature=0.6, top_p=0.9)
    moe = upcycle_to_moe(dense, num_experts=4, num_experts_per_tok=2)
    assert moe.generation_config.to_diff_dict() == dense.generation_config.to_diff_dict()


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("Qwen3", {"mlp_only_layer": [0]}, r"Qwen3MoeConfig has no field mlp_only_layer;"),
        ("Llama", {"mlp_only_layers": [0]}, r"MixtralConfig has no field mlp_only_layers;"),
        ("Llama", {"dtype": torch.bfloat16}, r"dtype is set by upcycle_to_moe itself"),
        ("Llama", {"num_local_experts": 6}, r"num_local_experts is set by upcycle_to_moe itself"),
        ("Llama", {"hidden_size": 64}, r"upcycle_to_moe: .* has shape .* in the MixtralForCausalLM but"),
    ],
    ids=["misspelled", "not-the-siblings", "dtype", "experts", "shape"],
)
def test_config_overrides_the_sibling_would_ignore_or_that_clash_are_refused(family, overrides, message):
    with pytest.raises(ValueError, match=message):
        upcycle_to_moe(dense_model(family), num_experts=4, num_experts_per_tok=2, **overrides)
