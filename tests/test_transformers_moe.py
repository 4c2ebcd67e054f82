"""MoGE on transformers' own MoE models (Qwen3-MoE, OLMoE, Mixtral): `add_moge_regularizer`, the callback, saving."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import CASES as TABLE
from tiny import VOCAB, case_names, lm_batch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from moge_hf import add_moge_regularizer, group_sparsity_loss
from moge_hf.routing import moge_routers


# transformers' MoE families of the shared table (tests/tiny.py): tiny Qwen3-MoE, OLMoE, Mixtral with 8 experts top-2.
CASES = case_names(moge_hf=False)
MOGE = dict(moge_loss_coef=0.1, moge_map_shape=[2, 4], moge_window=2, moge_sigma=0.8)


def build(case: str, **moge):
    model = TABLE[case].build()
    return add_moge_regularizer(model, **moge) if moge else model


def batch(seed: int = 0, size: int = 4, seq: int = 7) -> dict[str, torch.Tensor]:
    return lm_batch(seed, batch=size, seq=seq, low=3)


def reference_moge_loss(router_logits, mask, sigma=0.8, **kwargs):
    flat = mask.reshape(-1).bool()
    probs = [layer.float().softmax(-1) for layer in router_logits]
    per_layer = [group_sparsity_loss(p, (2, 4), 2, sigma, mask=flat, **kwargs) for p in probs]
    return torch.stack(per_layer).mean()


@pytest.mark.compat
@pytest.mark.parametrize("case", CASES)
def test_loss_is_the_models_own_plus_lambda_times_moge_loss(case):
    inputs = batch()
    plain = build(case).eval()
    model = build(case, **MOGE).eval()
    with torch.no_grad():
        own = plain(**inputs, output_router_logits=True)
        out = model(**inputs, output_router_logits=True)
    assert len(moge_routers(model)) == 2
    # moge_loss: the regularizer of the router logits transformers itself returns, padding left out.
    expected = reference_moge_loss(own.router_logits, inputs["attention_mask"])
    torch.testing.assert_close(out.moge_loss, expected)
    assert not torch.allclose(
        expected, reference_moge_loss(own.router_logits, torch.ones_like(inputs["attention_mask"]))
    )
    torch.testing.assert_close(out.loss, own.loss + 0.1 * out.moge_loss)
    torch.testing.assert_close(out.logits, own.logits)  # the model itself is unchanged
    assert list(out.keys())[-1] == "moge_loss" and isinstance(out, type(own))
    # Without labels there is no loss; with return_dict=False, moge_loss ends the tuple.
    with torch.no_grad():
        assert model(inputs["input_ids"]).loss is None
        as_tuple = model(**inputs, return_dict=False)
        own_loss = plain(**inputs).loss  # without router logits asked for, the model's own loss has no aux loss
    torch.testing.assert_close(as_tuple[0], own_loss + 0.1 * out.moge_loss)
    torch.testing.assert_close(as_tuple[-1], out.moge_loss)


@pytest.mark.parametrize("case", CASES)
def test_lambda_zero_leaves_the_loss_exactly_the_models_own(case):
    inputs = batch(seed=1)
    plain = build(case)
    model = build(case, **{**MOGE, "moge_loss_coef": 0.0})
    own, out = plain(**inputs), model(**inputs)
    assert torch.equal(out.loss, own.loss)
    assert out.moge_loss > 0 and not out.moge_loss.requires_grad  # reported, not trained on


@pytest.mark.compat
@pytest.mark.parametrize("case", CASES)
def test_the_routers_get_the_regularizers_gradient(case):
    inputs = batch(seed=2)
    grads = {}
    for coef in (0.0, 0.1):
        model = build(case, **{**MOGE, "moge_loss_coef": coef})
        out = model(**inputs)
        out.loss.backward()
        routers = [router.module.weight for router in moge_routers(model)]
        grads[coef] = [weight.grad.clone() for weight in routers]
        if coef:
            moge_grads = torch.autograd.grad(model(**inputs).moge_loss, routers)
    for with_moge, without, moge in zip(grads[0.1], grads[0.0], moge_grads):
        assert moge.abs().sum() > 0
        torch.testing.assert_close(with_moge - without, 0.1 * moge, rtol=1e-4, atol=1e-7)


@pytest.mark.compat
def test_settings_are_saved_and_reapplied_and_the_folder_stays_native(tmp_path):
    model = build("qwen3_moe", **{**MOGE, "moge_padding": "circular", "moge_reduction": "paper"})
    model.eval()
    inputs = batch(seed=3)
    with torch.no_grad():
        expected = model(**inputs)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in MOGE} == MOGE and saved["moge_padding"] == "circular"
    assert saved["architectures"] == ["Qwen3MoeForCausalLM"] and "auto_map" not in saved
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == []  # no code: a native checkpoint

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is TABLE["qwen3_moe"].model_class
    with torch.no_grad():
        assert "moge_loss" not in loaded(**inputs)  # plain transformers: the model's own loss
        add_moge_regularizer(loaded)  # no arguments: the saved settings
        again = loaded(**inputs)
    assert loaded.moge_regularizer.padding == "circular" and loaded.moge_regularizer.reduction == "paper"
    torch.testing.assert_close(again.moge_loss, expected.moge_loss)
    torch.testing.assert_close(again.loss, expected.loss)
    with torch.no_grad():  # arguments override the saved settings; applying again replaces, never stacks, the hooks
        add_moge_regularizer(loaded, moge_loss_coef=0.2)
        twice = loaded(**inputs)
    torch.testing.assert_close(twice.loss, expected.loss + 0.1 * expected.moge_loss)

    child = textwrap.dedent(
        """
        import sys
        sys.modules["moge_hf"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        inputs = torch.load(sys.argv[2])
        with torch.no_grad():
            torch.save({"logits": model(**inputs).logits, "coef": model.config.moge_loss_coef}, sys.argv[3])
        """
    )
    torch.save({k: v for k, v in inputs.items() if k != "labels"}, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", child, str(tmp_path), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")]
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["coef"] == 0.1
    torch.testing.assert_close(out["logits"], expected.logits)


def test_bad_settings_and_models_are_refused():
    model = build("mixtral")
    with pytest.raises(ValueError, match=r"moge_map_shape.*\[3, 3\].*8 experts"):
        add_moge_regularizer(model, moge_map_shape=[3, 3])
    with pytest.raises(ValueError, match="moge_loss_coef"):
        add_moge_regularizer(model, moge_loss_coef=-1.0)
    with pytest.raises(ValueError, match="moge_window"):
        add_moge_regularizer(model, moge_map_shape=[2, 4], moge_window=3)
    with pytest.raises(ValueError, match="moge_padding"):
        add_moge_regularizer(model, moge_padding="same")
    with pytest.raises(TypeError, match="moge_windw"):
        add_moge_regularizer(model, moge_windw=2)
    assert not hasattr(model.config, "moge_loss_coef")  # a refused call changes nothing
    dense = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="records no router logits"):
        add_moge_regularizer(dense)


def test_reentrant_checkpointing_is_refused_when_the_regularizer_would_train_nothing():
    model = build("qwen3_moe", **MOGE)
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    kwargs_name = next(n for n in inspect.signature(enable).parameters if n.endswith("checkpointing_kwargs"))
    enable(**{kwargs_name: {"use_reentrant": True}})
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(**batch(seed=6))
    # Only weights after the last router train (the final norm, the LM head): nothing to lose, no error.
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(("model.norm", "lm_head")))
    model(**batch(seed=6)).loss.backward()


def test_positional_arguments_and_base_models_are_read_right():
    inputs = batch(seed=7)
    model = build("qwen3_moe", **MOGE).eval()
    with torch.no_grad():
        by_name = model(**inputs)
        # input_ids and attention_mask positionally (the forward's order): the mask still leaves padding out.
        by_position = model(inputs["input_ids"], inputs["attention_mask"], labels=inputs["labels"])
    torch.testing.assert_close(by_position.moge_loss, by_name.moge_loss)
    torch.testing.assert_close(by_position.loss, by_name.loss)
    # A base model has no loss: `labels` must not shift its first output (hidden states), tuple or not.
    base = add_moge_regularizer(build("qwen3_moe").model, **MOGE).eval()
    with torch.no_grad():
        plain = base(inputs["input_ids"], return_dict=False)
        labelled = base(inputs["input_ids"], labels=inputs["labels"], return_dict=False)
    assert torch.equal(plain[0], labelled[0])


def test_an_interrupted_forward_leaves_nothing_behind():
    """torch calls the model's always-called hooks on an `Exception`, not on a KeyboardInterrupt (Ctrl-C during
    `generate`): the next forward must not add the interrupted one's routing to its own."""
    from moge_hf.routing import routing_recorder

    model = build("qwen3_moe", **MOGE).eval()
    inputs = batch(seed=8)
    with torch.no_grad():
        want = model(**inputs).moge_loss
    recorder, heard = routing_recorder(model), []
    recorder.listeners.append(lambda forward: heard.append(len(forward.records)))
    fire = [True]

    def interrupt(module, args, output):
        if fire[0]:
            fire[0] = False
            raise KeyboardInterrupt

    recorder.taps[-1].module.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        got = model(**inputs).moge_loss
    torch.testing.assert_close(got, want)
    assert heard == [2]  # the next forward's two layers, nothing of the interrupted one


# ---- the config of a regularized model -------------------------------------------------------------------------
# The regularizer is built from `moge_map_shape`, `moge_window`, `moge_padding` and `moge_reduction`: one of them
# changed on the config afterwards would be saved but not trained (the reloaded model would be another model), so the
# config refuses it at once, and the forward refuses a value written around that check. `moge_loss_coef`, `moge_sigma`
# and `moge_sigma_schedule` are read live, and checked.


@pytest.mark.parametrize(
    "name, value, same",
    [
        ("moge_window", 1, 2),
        ("moge_map_shape", [4, 2], (2, 4)),
        ("moge_padding", "circular", "valid"),
        ("moge_reduction", "paper", "mean"),
    ],
)
def test_built_fields_set_on_a_regularized_models_config_are_refused_not_silently_saved(name, value, same, tmp_path):
    model = build("qwen3_moe", **MOGE).eval()
    inputs = batch(seed=9)
    with torch.no_grad():
        want = model(**inputs).moge_loss
    before = getattr(model.config, name)
    with pytest.raises(ValueError, match=rf"config\.{name} was set to .* add_moge_regularizer\(model, {name}="):
        setattr(model.config, name, value)
    assert getattr(model.config, name) == before
    setattr(model.config, name, same)  # the value the regularizer was built with is fine (a tuple too)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[name] == before
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).moge_loss, want)
    # Written around the check (the config's __dict__): refused at the next forward, before the model runs.
    model.config.__dict__[name] = value
    with pytest.raises(ValueError, match=rf"config\.{name} was set to"), torch.no_grad():
        model(**inputs)
    model.config.__dict__[name] = before
    # The way to change it: add_moge_regularizer again, which rebuilds the regularizer.
    add_moge_regularizer(model, **{name: value})
    assert getattr(model.config, name) == value
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).moge_loss, want)
    # Other configs of the class are left alone: no check on a model that has no regularizer.
    plain = build("qwen3_moe")
    setattr(plain.config, name, value)
    assert type(plain.config) is TABLE["qwen3_moe"].model_class.config_class


def test_live_fields_take_effect_and_are_saved(tmp_path):
    inputs = batch(seed=10)
    model = build("qwen3_moe", **MOGE).eval()
    plain = build("qwen3_moe").eval()
    model.config.moge_sigma = 3.0  # applied at the next forward
    model.config.moge_loss_coef = 0.5
    with torch.no_grad():
        out, own = model(**inputs), plain(**inputs)
        want = build("qwen3_moe", **{**MOGE, "moge_sigma": 3.0})(**inputs).moge_loss
    assert model.moge_regularizer.sigma == 3.0
    torch.testing.assert_close(out.moge_loss, want)
    torch.testing.assert_close(out.loss, own.loss + 0.5 * want)
    model.save_pretrained(tmp_path)
    loaded = add_moge_regularizer(AutoModelForCausalLM.from_pretrained(tmp_path)).eval()
    with torch.no_grad():
        again = loaded(**inputs)
    torch.testing.assert_close(again.moge_loss, out.moge_loss)
    torch.testing.assert_close(again.loss, out.loss)


@pytest.mark.parametrize("coef", [-0.5, float("nan"), float("inf"), True])
def test_an_invalid_lambda_is_refused_at_assignment_and_at_forward(coef, tmp_path):
    model = build("qwen3_moe", **MOGE)
    inputs = batch(seed=11)
    with pytest.raises(ValueError, match=r"moge_loss_coef.* must be a finite number >= 0"):
        model.config.moge_loss_coef = coef
    assert model.config.moge_loss_coef == 0.1
    with pytest.raises(ValueError, match=r"moge_sigma.* must be a number in"):
        model.config.moge_sigma = -1.0
    model.config.__dict__["moge_loss_coef"] = coef  # around the check: the forward refuses it, never trains
    with pytest.raises(ValueError, match=r"moge_loss_coef.* must be a finite number >= 0"):
        model(**inputs)
    model.config.__dict__["moge_loss_coef"] = 0.1
    model.save_pretrained(tmp_path)  # the folder holds what trained, and can be re-applied
    loaded = add_moge_regularizer(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert loaded.config.moge_loss_coef == 0.1


def test_a_regularized_config_saves_pickles_and_copies_as_the_plain_one(tmp_path):
    import copy
    import pickle

    model = build("qwen3_moe", **MOGE)
    plain_class = TABLE["qwen3_moe"].model_class.config_class
    plain = plain_class.__new__(plain_class)
    plain.__dict__.update(copy.deepcopy(model.config.__dict__))  # the same config, of the plain class
    assert plain == model.config and model.config == plain
    model.config.save_pretrained(tmp_path / "regularized")
    plain.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "regularized" / "config.json").read_text() == (tmp_path / "plain" / "config.json").read_text()
    for config in (copy.deepcopy(model.config), copy.deepcopy(model).config, pickle.loads(pickle.dumps(model.config))):
        assert config == model.config and config.moge_window == 2
        with pytest.raises(ValueError, match=r"config\.moge_window was set"):
            config.moge_window = 1  # still the config of a regularized model
    # transformers' Auto classes find the model class of the config (by its class's name).
    assert type(AutoModelForCausalLM.from_config(model.config)) is TABLE["qwen3_moe"].model_class
    # Unpickled in a new process, where add_moge_regularizer never ran.
    (tmp_path / "config.pkl").write_bytes(pickle.dumps(model.config))
    child = textwrap.dedent(
        """
        import pickle, sys
        config = pickle.load(open(sys.argv[1], "rb"))
        try:
            config.moge_window = 1
        except ValueError as error:
            print(type(config).__name__, config.moge_window, "refused" if "add_moge_regularizer" in str(error) else "")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "config.pkl")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [plain_class.__name__, "2", "refused"]


@pytest.mark.parametrize("case", CASES)
def test_the_default_window_fits_an_eight_expert_map(case, tmp_path):
    # 8 experts (Mixtral's count) lay out on a 2 x 4 map, where the default 3 x 3 window does not fit with "valid"
    # padding: left unset, the window is the map's smaller side; set, it is checked as given.
    model = add_moge_regularizer(TABLE[case].build(), moge_loss_coef=0.1)
    assert tuple(model.moge_regularizer.map_shape) == (2, 4) and model.config.moge_window == 2
    assert model.moge_regularizer.window == 2
    assert torch.isfinite(model(**batch()).moge_loss)
    model.save_pretrained(tmp_path)  # saved, the window is the one applied again
    again = add_moge_regularizer(type(model).from_pretrained(tmp_path))
    assert again.config.moge_window == 2 and again.moge_regularizer.window == 2
    with pytest.raises(ValueError, match=r"`moge_window` 3 does not fit the 2x4 expert map"):
        add_moge_regularizer(TABLE[case].build(), moge_window=3)
    circular = add_moge_regularizer(TABLE[case].build(), moge_padding="circular")  # a 3 x 3 window wraps around
    assert circular.config.moge_window == 3


def test_a_map_one_expert_wide_is_refused_unless_the_windows_wrap_around():
    # 7 experts lay out only as 1 x 7: the only "valid" window (1 x 1) would make the loss the constant 1 / 7.
    model = TABLE["qwen3_moe"].build(num_experts=7)
    with pytest.raises(ValueError, match=r"1x7 map, where the only window that fits .* makes the MoGE loss a"):
        add_moge_regularizer(model, moge_loss_coef=0.1)
    model = add_moge_regularizer(model, moge_loss_coef=0.1, moge_padding="circular")
    assert model.moge_regularizer.window == 3
    routers = [router.module.weight for router in moge_routers(model)]
    grads = torch.autograd.grad(model(**batch()).moge_loss, routers)
    assert all(grad.norm() > 1e-4 for grad in grads)  # a 1 x 1 window gives ~1e-8: rounding of a constant


def test_the_regularizer_reaches_the_loss_of_heads_without_labels():
    """A question-answering head takes start and end positions, not `labels`: its loss gets lambda * moge_loss too."""
    from transformers import Qwen3MoeForQuestionAnswering

    config = TABLE["qwen3_moe"].make_config()
    torch.manual_seed(0)
    plain = Qwen3MoeForQuestionAnswering(config).eval()
    model = add_moge_regularizer(Qwen3MoeForQuestionAnswering(config), **MOGE).eval()
    model.load_state_dict(plain.state_dict())
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    positions = {"start_positions": torch.tensor([1, 2, 0, 3]), "end_positions": torch.tensor([2, 4, 1, 5])}
    with torch.no_grad():
        own, out = plain(**inputs, **positions), model(**inputs, **positions)
    torch.testing.assert_close(out.loss, own.loss + 0.1 * out.moge_loss)


def test_the_coefficient_can_change_between_compiled_forwards():
    """The coefficient is read at each forward; a compiled model takes every value, 0 included, without a crash."""
    model = build("qwen3_moe", **MOGE).train()
    compiled = torch.compile(model, backend="eager")
    inputs = batch()
    for coef in (0.5, 0.25, 0.1, 0.0):
        model.config.moge_loss_coef = coef
        out = compiled(**inputs)
        own = TABLE["qwen3_moe"].model_class.forward(model, **inputs)  # the model's own loss: no hook
        torch.testing.assert_close(out.loss, own.loss + coef * out.moge_loss)


def test_a_submodule_given_the_regularizer_on_its_own_is_named():
    model = build("qwen3_moe")
    add_moge_regularizer(model.model, **MOGE)
    with pytest.raises(ValueError, match=r"the submodule 'model' of this Qwen3MoeForCausalLM records the routing"):
        add_moge_regularizer(model, **MOGE)
