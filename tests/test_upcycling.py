"""Sparse upcycling (`from_dense`): the upcycled model starts as the dense one, weights land where they belong."""

import re

import pytest
import torch
from tiny import GPT2_DENSE, VIT_DENSE, VOCAB, input_ids, pixel_values
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.testing_utils import CaptureLogger

from moge_hf import (
    GPT2MoGEForSequenceClassification,
    GPT2MoGELMHeadModel,
    GPT2MoGEModel,
    ViTMoGEForImageClassification,
    ViTMoGEModel,
)
from moge_hf.upcycling import logger as upcycling_logger


ATOL = RTOL = 1e-5


def dense_gpt2_config(**overrides) -> GPT2Config:
    return GPT2Config(**{**GPT2_DENSE, "n_layer": 3, **overrides})


def dense_vit_config(**overrides) -> ViTConfig:
    return ViTConfig(**{**VIT_DENSE, **overrides})


def make_dense(model_class, config, seed: int = 0):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # non-zero biases, so that a bias copied to the wrong place shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.05)
    return model


def moe_kwargs(num_experts: int, top_k: int, moe_layers: list[int]) -> dict:
    kwargs = dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=moe_layers, moge_window=2)
    if top_k == 1:
        kwargs["norm_topk_prob"] = True  # the gate weight of the one chosen expert is then 1
    return kwargs


def dense_mlp(model, family: str, index: int) -> tuple[torch.Tensor, ...]:
    """`(up, up_bias, down, down_bias)` of a dense layer's MLP in the experts' (out, in) layout."""
    if family == "gpt2":
        mlp = model.base_model.h[index].mlp
        return mlp.c_fc.weight.T, mlp.c_fc.bias, mlp.c_proj.weight.T, mlp.c_proj.bias
    mlp = model.base_model.layers[index].mlp
    return mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias


def check_weights(dense, moge, family: str) -> None:
    """Non-MLP weights and the MLPs of dense layers equal; every expert is its layer's dense MLP; routers fresh."""
    config = moge.config
    layers = "h" if family == "gpt2" else "layers"
    moe_prefixes = tuple(f"{layers}.{i}.mlp." for i in config.moe_layers)
    dense_base, moge_base = dense.base_model.state_dict(), moge.base_model.state_dict()
    copied = [key for key in moge_base if not key.startswith(moe_prefixes)]
    assert len(copied) == len(moge_base) - 5 * len(config.moe_layers)  # all but the routers and experts
    for key in copied:
        torch.testing.assert_close(moge_base[key], dense_base[key], rtol=0, atol=0, msg=key)
    if moge.base_model is not moge:  # the head
        prefix, dense_state = moge.base_model_prefix + ".", dense.state_dict()
        for key, value in moge.state_dict().items():
            if not key.startswith(prefix):
                torch.testing.assert_close(value, dense_state[key], rtol=0, atol=0, msg=key)

    routers = []
    for index in config.moe_layers:
        block = getattr(moge.base_model, layers)[index].mlp
        for name, weight in zip(
            ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"), dense_mlp(dense, family, index)
        ):
            experts = getattr(block.experts, name)
            assert experts.shape == (config.num_experts, *weight.shape), name
            for expert in experts:
                torch.testing.assert_close(expert, weight, rtol=0, atol=0)
        routers.append(block.router.weight)
        std = block.router.weight.float().std().item()
        assert 0.5 * config.initializer_range < std < 2 * config.initializer_range, std
    for i in range(1, len(routers)):
        assert not torch.equal(routers[0], routers[i])  # each router drawn afresh


@pytest.mark.parametrize(
    "num_experts,top_k,moe_layers,n_inner",
    [(4, 1, [0, 1, 2], 37), (8, 2, [0, 2], 37), (4, 2, [1], 64), (8, 1, [0, 1], 64), (8, 8, [2], 37)],
)
def test_gpt2_lm_head_equals_dense(num_experts, top_k, moe_layers, n_inner):
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config(n_inner=n_inner))
    moge = GPT2MoGELMHeadModel.from_dense(dense, **moe_kwargs(num_experts, top_k, moe_layers))
    assert type(moge) is GPT2MoGELMHeadModel and not moge.training
    assert moge.config.model_type == "gpt2_moge" and moge.config.moe_layers == moe_layers
    assert moge.config.architectures in (None, ["GPT2MoGELMHeadModel"])
    assert moge.lm_head.weight is moge.transformer.wte.weight
    check_weights(dense, moge, "gpt2")
    ids = input_ids()
    with torch.no_grad():
        expected, out = dense(ids).logits, moge(ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, expected, rtol=RTOL, atol=ATOL)
    routes = torch.cat(out.router_logits).argmax(-1)
    if top_k < num_experts:  # the tokens really go to different experts, not all to one
        assert routes.unique().numel() > 1


def test_gpt2_sequence_classification_equals_dense():
    dense = make_dense(GPT2ForSequenceClassification, dense_gpt2_config(num_labels=3))
    moge = GPT2MoGEForSequenceClassification.from_dense(dense, **moe_kwargs(4, 2, [0, 2]))
    assert moge.config.num_labels == 3
    check_weights(dense, moge, "gpt2")
    ids = input_ids()
    ids[:4, -2:] = 0  # right padding: the head reads the last non-padding token
    with torch.no_grad():
        torch.testing.assert_close(moge(ids).logits, dense(ids).logits, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dense_class", [GPT2Model, GPT2LMHeadModel])
def test_gpt2_base_model_equals_dense(dense_class):
    """`GPT2MoGEModel` upcycles a `GPT2Model`, or the base model of any GPT-2 model."""
    dense = make_dense(dense_class, dense_gpt2_config())
    moge = GPT2MoGEModel.from_dense(dense, **moe_kwargs(4, 2, [1, 2]))
    assert type(moge) is GPT2MoGEModel
    check_weights(dense, moge, "gpt2")
    ids = input_ids()
    with torch.no_grad():
        expected = dense.base_model(ids).last_hidden_state
        torch.testing.assert_close(moge(ids).last_hidden_state, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dense_class", [ViTModel, ViTForImageClassification])
def test_vit_base_model_equals_dense(dense_class):
    """`ViTMoGEModel` has a pooler if and only if the dense base model has one (a classifier's has none)."""
    dense = make_dense(dense_class, dense_vit_config())
    moge = ViTMoGEModel.from_dense(dense, **moe_kwargs(8, 2, [0, 1]))
    assert (moge.pooler is None) == (dense.base_model.pooler is None)
    check_weights(dense, moge, "vit")
    pixels = pixel_values()
    with torch.no_grad():
        expected, out = dense.base_model(pixels), moge(pixels)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=RTOL, atol=ATOL)
    if dense_class is ViTModel:
        torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("num_experts,top_k,moe_layers", [(4, 1, [0, 1]), (8, 2, [1])])
def test_vit_image_classification_equals_dense(num_experts, top_k, moe_layers):
    dense = make_dense(ViTForImageClassification, dense_vit_config())
    moge = ViTMoGEForImageClassification.from_dense(dense, **moe_kwargs(num_experts, top_k, moe_layers))
    assert moge.config.num_labels == 5 and not moge.training
    check_weights(dense, moge, "vit")
    pixels = pixel_values()
    with torch.no_grad():
        torch.testing.assert_close(moge(pixels).logits, dense(pixels).logits, rtol=RTOL, atol=ATOL)


def test_from_local_folder(tmp_path):
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    dense.save_pretrained(tmp_path / "gpt2")
    moge = GPT2MoGELMHeadModel.from_dense(tmp_path / "gpt2", **moe_kwargs(4, 2, [0, 2]))
    assert moge.config._name_or_path == str(tmp_path / "gpt2")  # the dense source
    check_weights(dense, moge, "gpt2")
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(moge(ids).logits, dense(ids).logits, rtol=RTOL, atol=ATOL)

    dense = make_dense(ViTForImageClassification, dense_vit_config())
    dense.save_pretrained(tmp_path / "vit")
    moge = ViTMoGEForImageClassification.from_dense(str(tmp_path / "vit"), **moe_kwargs(4, 1, [0, 1]))
    check_weights(dense, moge, "vit")
    pixels = pixel_values()
    with torch.no_grad():
        torch.testing.assert_close(moge(pixels).logits, dense(pixels).logits, rtol=RTOL, atol=ATOL)


def test_expert_noise_makes_experts_differ_but_stay_close():
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    torch.manual_seed(1)
    moge = GPT2MoGELMHeadModel.from_dense(dense, expert_noise_std=0.01, **moe_kwargs(4, 2, [0, 2]))
    for index in (0, 2):
        experts = moge.transformer.h[index].mlp.experts
        up, up_bias, down, down_bias = dense_mlp(dense, "gpt2", index)
        for name, weight in (("up_proj", up), ("down_proj", down)):
            copies = getattr(experts, name)
            noise = (copies - weight).flatten(1)  # (E, ...)
            relative = noise.std(dim=1) / weight.std()
            assert torch.all((relative > 0.005) & (relative < 0.02)), relative
            for i in range(len(copies)):
                for j in range(i):
                    assert not torch.equal(copies[i], copies[j])
        # The biases are copied exactly.
        torch.testing.assert_close(experts.up_proj_bias, up_bias.expand_as(experts.up_proj_bias), rtol=0, atol=0)
        torch.testing.assert_close(experts.down_proj_bias, down_bias.expand_as(experts.down_proj_bias), rtol=0, atol=0)
    ids = input_ids()
    with torch.no_grad():
        moge_logits, dense_logits = moge(ids).logits, dense(ids).logits
    assert not torch.allclose(moge_logits, dense_logits, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(moge_logits, dense_logits, rtol=0, atol=0.05)


def test_save_and_reload_through_auto_classes(tmp_path):
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    moge = GPT2MoGELMHeadModel.from_dense(dense, expert_noise_std=0.01, **moe_kwargs(4, 2, [0, 2]))
    moge.save_pretrained(tmp_path / "lm")
    assert (tmp_path / "lm" / "upcycling.py").is_file()  # imported by modeling_moge.py: needed for remote code
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert type(reloaded) is GPT2MoGELMHeadModel and reloaded.lm_head.weight is reloaded.transformer.wte.weight
    base = AutoModel.from_pretrained(tmp_path / "lm")
    assert type(base) is GPT2MoGEModel
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, moge(ids).logits, rtol=0, atol=0)
        expected = moge.transformer(ids).last_hidden_state
        torch.testing.assert_close(base(ids).last_hidden_state, expected, rtol=0, atol=0)

    dense = make_dense(ViTForImageClassification, dense_vit_config())
    moge = ViTMoGEForImageClassification.from_dense(dense, **moe_kwargs(4, 1, [1]))
    moge.save_pretrained(tmp_path / "vit")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "vit")
    assert type(reloaded) is ViTMoGEForImageClassification
    pixels = pixel_values()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, dense(pixels).logits, rtol=RTOL, atol=ATOL)


def test_keeps_the_dense_dtype():
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config()).to(torch.bfloat16)
    moge = GPT2MoGELMHeadModel.from_dense(dense, **moe_kwargs(4, 2, [0, 2]))
    assert moge.dtype == torch.bfloat16 and moge.config.dtype == torch.bfloat16
    assert all(param.dtype == torch.bfloat16 for param in moge.parameters())
    check_weights(dense, moge, "gpt2")


def test_upcycled_model_trains():
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    moge = GPT2MoGELMHeadModel.from_dense(dense, moge_loss_coef=0.1, **moe_kwargs(4, 2, [0, 2])).train()
    ids = input_ids()
    moge(ids, labels=ids).loss.backward()
    for index in (0, 2):
        block = moge.transformer.h[index].mlp
        assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0
        assert block.experts.up_proj.grad.abs().sum() > 0


def test_new_head_from_another_dense_class_is_initialized_with_a_warning():
    """A `GPT2LMHeadModel` upcycles into a sequence classifier: the base is copied, the new `score` is fresh."""
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    with CaptureLogger(upcycling_logger) as captured:
        moge = GPT2MoGEForSequenceClassification.from_dense(dense, num_labels=4, **moe_kwargs(4, 2, [0, 2]))
    assert "score.weight" in captured.out and "newly initialized" in captured.out
    assert moge.score.weight.shape == (4, 32)
    check_weights(dense.transformer, moge.transformer, "gpt2")
    ids = input_ids()
    with torch.no_grad():
        expected = dense.transformer(ids).last_hidden_state
        torch.testing.assert_close(moge.transformer(ids).last_hidden_state, expected, rtol=RTOL, atol=ATOL)


def test_top1_without_renormalization_warns():
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    with CaptureLogger(upcycling_logger) as captured:
        GPT2MoGELMHeadModel.from_dense(dense, num_experts=4, num_experts_per_tok=1, moge_window=2)
    assert "norm_topk_prob=True" in captured.out


def test_wrong_dense_architecture_raises():
    vit = make_dense(ViTForImageClassification, dense_vit_config())
    with pytest.raises(ValueError, match=r"expected a dense GPT-2 model .*got a ViTForImageClassification"):
        GPT2MoGELMHeadModel.from_dense(vit)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"expected a dense ViT model .*got a BertModel with model_type 'bert'"):
        ViTMoGEModel.from_dense(bert)
    gpt2 = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    with pytest.raises(ValueError, match=r"expected a dense ViT model .*GPT2LMHeadModel"):
        ViTMoGEForImageClassification.from_dense(gpt2)
    moge = GPT2MoGELMHeadModel.from_dense(gpt2, **moe_kwargs(4, 2, [0]))
    with pytest.raises(ValueError, match="already a MoGE model"):
        GPT2MoGELMHeadModel.from_dense(moge)
    with pytest.raises(TypeError, match="takes a dense GPT-2 model or the path"):
        GPT2MoGELMHeadModel.from_dense(gpt2.state_dict())


def test_wrong_folder_raises(tmp_path):
    make_dense(ViTForImageClassification, dense_vit_config()).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"expected a dense GPT-2 checkpoint .* found model_type 'vit'"):
        GPT2MoGELMHeadModel.from_dense(tmp_path / "vit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=r"expected a dense ViT checkpoint .*no config.json"):
        ViTMoGEForImageClassification.from_dense(tmp_path / "empty")
    with pytest.raises(OSError, match="is a file"):
        ViTMoGEForImageClassification.from_dense(tmp_path / "vit" / "config.json")


def test_bad_overrides_raise():
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    with pytest.raises(ValueError, match=r"dense MLP's hidden size 37 .*expert_intermediate_size=64"):
        GPT2MoGELMHeadModel.from_dense(dense, expert_intermediate_size=64, **moe_kwargs(4, 2, [0]))
    with pytest.raises(ValueError, match="`num_experts` must be an integer >= 1"):  # the config's own check
        GPT2MoGELMHeadModel.from_dense(dense, num_experts=0)
    with pytest.raises(ValueError, match=r"`moe_layers` must hold layer indices in \[0, 3\)"):
        GPT2MoGELMHeadModel.from_dense(dense, **moe_kwargs(4, 2, [3]))
    with pytest.raises(ValueError, match=r"wte.weight has shape \(99, 64\) in the MoGE model but \(99, 32\)"):
        GPT2MoGELMHeadModel.from_dense(dense, n_embd=64, **moe_kwargs(4, 2, [0]))
    with pytest.raises(ValueError, match="do not override fields that change the architecture"):
        GPT2MoGELMHeadModel.from_dense(dense, n_layer=4, **moe_kwargs(4, 2, [0]))
    with pytest.raises(ValueError, match="expert_noise_std must be a finite number >= 0"):
        GPT2MoGELMHeadModel.from_dense(dense, expert_noise_std=-0.1, **moe_kwargs(4, 2, [0]))


def test_misspelled_override_is_an_error():
    dense = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['num_expert'\]"):
        GPT2MoGELMHeadModel.from_dense(dense, num_expert=4)
    # Only config fields count: not the model type, not methods or properties; the dtype follows the dense model.
    for name, value in [("model_type", "x"), ("to_dict", 1), ("dense_intermediate_size", 64)]:
        with pytest.raises(ValueError, match=rf"unknown config field\(s\) \['{name}'\]"):
            GPT2MoGELMHeadModel.from_dense(dense, **{name: value})
    with pytest.raises(ValueError, match="takes the dense model's dtype"):
        GPT2MoGELMHeadModel.from_dense(dense, dtype=torch.bfloat16)


def test_vit_with_a_mask_token_upcycles_into_a_classifier():
    torch.manual_seed(3)
    dense = ViTModel(dense_vit_config(), use_mask_token=True).eval()
    moge = ViTMoGEForImageClassification.from_dense(dense, num_labels=5, **moe_kwargs(4, 2, [1]))
    assert moge.vit.embeddings.mask_token is None  # a classifier has no place for it: dropped
    with torch.no_grad():
        expected = dense(pixel_values()).last_hidden_state
        got = moge.vit(pixel_values()).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_tying_an_untied_dense_model_warns_that_its_lm_head_is_dropped():
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config(tie_word_embeddings=False))
    with CaptureLogger(upcycling_logger) as captured:
        GPT2MoGELMHeadModel.from_dense(dense, tie_word_embeddings=True, **moe_kwargs(4, 2, [0]))
    assert "drops its own output embeddings" in captured.out


def test_vit_folder_keeps_exactly_the_optional_parts_its_checkpoint_has(tmp_path):
    torch.manual_seed(0)
    ViTForImageClassification(dense_vit_config()).save_pretrained(tmp_path / "no_pooler")
    masked = ViTModel(dense_vit_config(), use_mask_token=True)
    masked.save_pretrained(tmp_path / "mask")
    moge = ViTMoGEModel.from_dense(tmp_path / "no_pooler", **moe_kwargs(4, 2, [1]))
    assert moge.pooler is None  # no freshly initialized pooler the checkpoint never had
    moge = ViTMoGEModel.from_dense(tmp_path / "mask", **moe_kwargs(4, 2, [1]))
    torch.testing.assert_close(moge.embeddings.mask_token, masked.embeddings.mask_token)
    assert moge.pooler is not None


def test_one_expert_top1_does_not_warn_about_the_gate_scale():
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    with CaptureLogger(upcycling_logger) as captured:
        GPT2MoGELMHeadModel.from_dense(dense, num_experts=1, num_experts_per_tok=1, moge_window=1)
    assert "norm_topk_prob" not in captured.out


def test_from_dense_names_a_missing_folder_as_missing(tmp_path):
    for path in (str(tmp_path / "missing"), "/missing/path", "./runs/missing"):
        with pytest.raises(FileNotFoundError, match=rf"the folder '{re.escape(path)}' does not exist"):
            GPT2MoGELMHeadModel.from_dense(path)
