"""Sparse upcycling (`from_dense`): the upcycled model starts as the dense one, weights land where they belong.

The checks about every model run on each moge_hf class of the table (tests/tiny.py), upcycled from its row's dense
class and tiny dense config; those about one host's own parts (GPT-2's weight names, ViT's pooler and mask token) build
that host's classes by name."""

import re

import pytest
import torch
import transformers
from tiny import (
    CASES,
    GPT2_DENSE,
    VIT_DENSE,
    VOCAB,
    case_names,
    dense_mlp_weights,
    first_case,
    moge_blocks_by_path,
    pixel_values,
)
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.testing_utils import CaptureLogger

from moge_hf import GPT2MoGELMHeadModel, ViTMoGEForImageClassification, ViTMoGEModel
from moge_hf.upcycling import logger as upcycling_logger


ATOL = RTOL = 1e-5
MODEL_CASES = case_names(moge_hf=True)
HEAD_CASES = case_names(moge_hf=True, head=True)
# One head model per host family, for the checks of the upcycling machinery itself.
FAMILY_CASES = case_names(moge_hf=True, head=True, per_family=True)
ROUTING = {"aux_loss", "moge_loss", "z_loss"}


def make_dense(model_class, config, seed: int = 0):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # non-zero biases, so that a bias copied to the wrong place shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.05)
    return model


def dense_of(case: str, seed: int = 0, **overrides):
    """The dense model of a table row (its `dense_class`, its tiny dense config), biases non-zero."""
    return make_dense(CASES[case].dense_class, CASES[case].make_dense_config(**overrides), seed)


def other_family(case: str) -> str:
    """A head model of another host family than `case`'s."""
    return next(name for name in FAMILY_CASES if CASES[name].family != CASES[case].family)


def moe_kwargs(num_experts: int, top_k: int, moe_layers: list[int]) -> dict:
    kwargs = dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=moe_layers, moge_window=2)
    if top_k == 1:
        kwargs["norm_topk_prob"] = True  # the gate weight of the one chosen expert is then 1
    return kwargs


def check_weights(dense, moge) -> None:
    """Non-MLP weights and the MLPs of dense layers equal; every expert is its layer's dense MLP; routers fresh. Each
    MoGE block sits where the dense MLP it replaced sat: the dense model's module of the same path."""
    config = moge.config
    blocks = moge_blocks_by_path(moge)
    assert len(blocks) == len(config.moe_layers)
    moe_prefixes = tuple(f"{path}." for path in blocks)
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
    for path, block in blocks.items():
        dense_weights = dense_mlp_weights(dense.base_model.get_submodule(path))
        for name, weight in zip(("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"), dense_weights):
            experts = getattr(block.experts, name)
            assert experts.shape == (config.num_experts, *weight.shape), name
            for expert in experts:
                torch.testing.assert_close(expert, weight, rtol=0, atol=0)
        routers.append(block.router.weight)
        std = block.router.weight.float().std().item()
        assert 0.5 * config.initializer_range < std < 2 * config.initializer_range, std
    for i in range(1, len(routers)):
        assert not torch.equal(routers[0], routers[i])  # each router drawn afresh


def assert_same_outputs(got, want, rtol=RTOL, atol=ATOL) -> None:
    """Every tensor output of `want` (logits, hidden states, pooler output) is the same in `got`."""
    compared = [name for name, value in want.items() if isinstance(value, torch.Tensor)]
    assert compared
    for name in compared:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("num_experts,top_k,moe_layers", [(4, 1, [0, 1]), (8, 2, [1]), (8, 8, [0])])
@pytest.mark.parametrize("case", MODEL_CASES)
def test_upcycled_model_equals_dense(case, num_experts, top_k, moe_layers):
    spec = CASES[case]
    dense = dense_of(case)
    moge = spec.model_class.from_dense(dense, **moe_kwargs(num_experts, top_k, moe_layers))
    assert type(moge) is spec.model_class and not moge.training
    assert moge.config.model_type == spec.model_class.config_class.model_type and moge.config.moe_layers == moe_layers
    assert moge.config.architectures in (None, [spec.model_class.__name__])
    assert moge.config.num_labels == dense.config.num_labels
    if dense.get_output_embeddings() is not None:  # tied, as the dense model's
        assert moge.get_output_embeddings().weight is moge.get_input_embeddings().weight
    check_weights(dense, moge)
    inputs = spec.inputs()  # with right padding on the text models: a sequence classifier reads the last real token
    with torch.no_grad():
        expected, out = dense(**inputs), moge(**inputs, output_router_logits=True)
    assert_same_outputs(out, expected)
    routes = torch.cat(out.router_logits).argmax(-1)
    if top_k < num_experts:  # the tokens really go to different experts, not all to one
        assert routes.unique().numel() > 1


BASE_SOURCES = [
    (base, source)
    for base in case_names(moge_hf=True, head=False)
    for source in case_names(moge_hf=True, family=CASES[base].family)
]


@pytest.mark.parametrize("case,source", BASE_SOURCES, ids=[f"{base}-from-{source}" for base, source in BASE_SOURCES])
def test_base_model_upcycles_the_base_of_any_dense_model_of_its_family(case, source):
    """A MoGE base model upcycles the dense base model, or the base model of any dense head model of its family, and
    has exactly its optional parts (ViT: a pooler iff the dense base model has one; a classifier's has none)."""
    dense = dense_of(source)
    moge = CASES[case].model_class.from_dense(dense, **moe_kwargs(8, 2, [0, 1]))
    assert type(moge) is CASES[case].model_class
    check_weights(dense, moge)
    inputs = CASES[case].inputs()
    with torch.no_grad():
        expected, out = dense.base_model(**inputs), moge(**inputs)
    assert set(out.keys()) - ROUTING == set(expected.keys())
    assert_same_outputs(out, expected)


@pytest.mark.parametrize("case", HEAD_CASES)
def test_a_head_upcycled_from_the_dense_base_model_is_initialized_with_a_warning(case):
    """A head model upcycled from its family's dense base model: the base is copied, the head's own weights (those not
    tied to the base's) are fresh, and the log names them."""
    spec = CASES[case]
    source = first_case(moge_hf=True, head=False, family=spec.family)
    dense = dense_of(source)
    with CaptureLogger(upcycling_logger) as captured:
        moge = spec.model_class.from_dense(dense, **moe_kwargs(4, 2, [1]))
    fresh = [name for name, _ in moge.named_parameters() if not name.startswith(moge.base_model_prefix + ".")]
    for name in fresh:
        assert name in captured.out
    assert ("newly initialized" in captured.out) == bool(fresh), captured.out
    check_weights(dense, moge.base_model)
    inputs = spec.inputs()
    with torch.no_grad():
        expected = dense(**inputs).last_hidden_state
        torch.testing.assert_close(moge.base_model(**inputs).last_hidden_state, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_from_local_folder(case, tmp_path):
    spec = CASES[case]
    dense = dense_of(case)
    dense.save_pretrained(tmp_path / "dense")
    inputs = spec.inputs()
    with torch.no_grad():
        expected = dense(**inputs)
    for folder in (tmp_path / "dense", str(tmp_path / "dense")):  # a Path or a str
        moge = spec.model_class.from_dense(folder, **moe_kwargs(4, 2, [0, 1]))
        assert moge.config._name_or_path == str(tmp_path / "dense")  # the dense source
        check_weights(dense, moge)
        with torch.no_grad():
            assert_same_outputs(moge(**inputs), expected)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_expert_noise_makes_experts_differ_but_stay_close(case):
    spec = CASES[case]
    dense = dense_of(case)
    torch.manual_seed(1)
    moge = spec.model_class.from_dense(dense, expert_noise_std=0.01, **moe_kwargs(4, 2, [0, 1]))
    for path, block in moge_blocks_by_path(moge).items():
        experts = block.experts
        up, up_bias, down, down_bias = dense_mlp_weights(dense.base_model.get_submodule(path))
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
    inputs = spec.inputs()
    with torch.no_grad():
        moge_logits, dense_logits = moge(**inputs).logits, dense(**inputs).logits
        # The noise shows in the base model's normalized output (a classifier's logits at init can be too small).
        moge_states, dense_states = (model.base_model(**inputs).last_hidden_state for model in (moge, dense))
    assert not torch.allclose(moge_states, dense_states, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(moge_logits, dense_logits, rtol=0, atol=0.05)


@pytest.mark.parametrize("case", HEAD_CASES)
def test_save_and_reload_through_auto_classes(case, tmp_path):
    spec = CASES[case]
    base_class = CASES[first_case(moge_hf=True, head=False, family=spec.family)].model_class
    dense = dense_of(case)
    moge = spec.model_class.from_dense(dense, expert_noise_std=0.01, **moe_kwargs(4, 2, [0, 1]))
    moge.save_pretrained(tmp_path / "moge")
    assert (tmp_path / "moge" / "upcycling.py").is_file()  # imported by the modeling code: needed for remote code
    reloaded = getattr(transformers, spec.auto_class).from_pretrained(tmp_path / "moge")
    assert type(reloaded) is spec.model_class
    if reloaded.get_output_embeddings() is not None:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    base = AutoModel.from_pretrained(tmp_path / "moge")
    assert type(base) is base_class
    inputs = spec.inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, moge(**inputs).logits, rtol=0, atol=0)
        expected = moge.base_model(**inputs).last_hidden_state
        torch.testing.assert_close(base(**inputs).last_hidden_state, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_keeps_the_dense_dtype(case):
    dense = dense_of(case).to(torch.bfloat16)
    moge = CASES[case].model_class.from_dense(dense, **moe_kwargs(4, 2, [0, 1]))
    assert moge.dtype == torch.bfloat16 and moge.config.dtype == torch.bfloat16
    assert all(param.dtype == torch.bfloat16 for param in moge.parameters())
    check_weights(dense, moge)


@pytest.mark.parametrize("case", HEAD_CASES)
def test_upcycled_model_trains(case):
    spec = CASES[case]
    moge = spec.model_class.from_dense(dense_of(case), moge_loss_coef=0.1, **moe_kwargs(4, 2, [0, 1])).train()
    moge(**spec.batch()).loss.backward()
    for block in moge_blocks_by_path(moge).values():
        assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0
        assert block.experts.up_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_top1_without_renormalization_warns(case):
    with CaptureLogger(upcycling_logger) as captured:
        CASES[case].model_class.from_dense(dense_of(case), num_experts=4, num_experts_per_tok=1, moge_window=2)
    assert "norm_topk_prob=True" in captured.out


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_wrong_dense_architecture_raises(case):
    moge_class = CASES[case].model_class
    other = dense_of(other_family(case))
    with pytest.raises(ValueError, match=rf"expected a dense .* model .*got a {type(other).__name__}"):
        moge_class.from_dense(other)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"expected a dense .* model .*got a BertModel with model_type 'bert'"):
        moge_class.from_dense(bert)
    dense = dense_of(case)
    moge = moge_class.from_dense(dense, **moe_kwargs(4, 2, [0]))
    with pytest.raises(ValueError, match="already a MoGE model"):
        moge_class.from_dense(moge)
    with pytest.raises(TypeError, match="takes a dense .* model or the path"):
        moge_class.from_dense(dense.state_dict())


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_wrong_folder_raises(case, tmp_path):
    moge_class = CASES[case].model_class
    other = dense_of(other_family(case))
    other.save_pretrained(tmp_path / "other")
    model_type = other.config.model_type
    with pytest.raises(ValueError, match=rf"expected a dense .* checkpoint .* found model_type '{model_type}'"):
        moge_class.from_dense(tmp_path / "other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=r"expected a dense .* checkpoint .*no config.json"):
        moge_class.from_dense(tmp_path / "empty")
    with pytest.raises(OSError, match="is a file"):
        moge_class.from_dense(tmp_path / "other" / "config.json")


# ---- one host's own parts ------------------------------------------------------------------------------------------


def dense_gpt2_config(**overrides) -> GPT2Config:
    return GPT2Config(**{**GPT2_DENSE, "n_layer": 3, **overrides})


def dense_vit_config(**overrides) -> ViTConfig:
    return ViTConfig(**{**VIT_DENSE, **overrides})


def test_bad_overrides_raise():
    dense = make_dense(GPT2LMHeadModel, dense_gpt2_config())
    with pytest.raises(ValueError, match=r"dense MLP's hidden size 37 .*expert_intermediate_size=64"):
        GPT2MoGELMHeadModel.from_dense(dense, expert_intermediate_size=64, **moe_kwargs(4, 2, [0]))
    with pytest.raises(ValueError, match="`num_experts` must be an integer >= 1"):  # the config's own check
        GPT2MoGELMHeadModel.from_dense(dense, num_experts=0)
    with pytest.raises(ValueError, match=r"`moe_layers` must hold layer indices in \[0, 3\)"):
        GPT2MoGELMHeadModel.from_dense(dense, **moe_kwargs(4, 2, [3]))
    with pytest.raises(ValueError, match=r"wte.weight has shape \(99, 64\) in the GPT2MoGELMHeadModel but \(99, 32\)"):
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


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_one_expert_top1_does_not_warn_about_the_gate_scale(case):
    with CaptureLogger(upcycling_logger) as captured:
        CASES[case].model_class.from_dense(dense_of(case), num_experts=1, num_experts_per_tok=1, moge_window=1)
    assert "norm_topk_prob" not in captured.out


def test_from_dense_names_a_missing_folder_as_missing(tmp_path):
    for path in (str(tmp_path / "missing"), "/missing/path", "./runs/missing"):
        with pytest.raises(FileNotFoundError, match=rf"the folder '{re.escape(path)}' does not exist"):
            GPT2MoGELMHeadModel.from_dense(path)
