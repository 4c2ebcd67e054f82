"""Lazy initialization: a model built on the meta device (`with torch.device("meta")`, accelerate's
`init_empty_weights`, FSDP's meta init) and given its memory afterwards computes the same MoGE loss as one built
normally. The group-sparsity regularizer's buffers are non-persistent (in no checkpoint): they must be rebuilt from
its settings, never left uninitialized (garbage) or on the meta device."""

import pytest
import torch
import transformers
from tiny import CASES, case_names

from moge_hf import GroupSparsityRegularizer, add_moge_regularizer
from moge_hf.routing import moge_routers


MOGE = dict(moge_loss_coef=0.1, moge_map_shape=[2, 4], moge_window=2, moge_sigma=0.8)
# transformers' MoE families (the table, tests/tiny.py), given `add_moge_regularizer`.
MOE_CASES = case_names(moge_hf=False)


def _routers(model) -> list[torch.Tensor]:
    if hasattr(model, "moge_blocks"):
        return [block.router.weight for block in model.moge_blocks()]
    return [router.module.weight for router in moge_routers(model)]


def _moge_loss_and_grads(model, inputs):
    """The model's `moge_loss` in training mode, and its gradient wrt each router's weights."""
    model.train()
    moge_loss = model(**inputs).moge_loss
    return moge_loss.detach(), torch.autograd.grad(moge_loss, _routers(model))


def assert_same_moge_loss(model, reference, inputs):
    want, want_grads = _moge_loss_and_grads(reference, inputs)
    got, got_grads = _moge_loss_and_grads(model, inputs)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-6)


def _copy_model_buffers(model, reference):
    """The model's own non-persistent buffers (rotary frequencies), which `to_empty` also leaves uninitialized and
    `load_state_dict` does not restore; the regularizer's are left alone: they are what the tests check."""
    for name, buffer in reference.named_buffers():
        if not name.startswith("moge_regularizer."):
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, buffer.clone())


def _on_meta(case, regularize_on_meta: bool):
    with torch.device("meta"):
        model = case.model_class(case.make_config())
        if regularize_on_meta:
            add_moge_regularizer(model, **MOGE)
    if not regularize_on_meta:
        add_moge_regularizer(model, **MOGE)  # on a model whose weights are all on the meta device
    assert model.moge_regularizer.window_matrix.is_meta
    return model


@pytest.mark.parametrize("regularize_on_meta", [True, False])
@pytest.mark.parametrize("case", MOE_CASES)
def test_a_regularizer_built_on_the_meta_device_computes_the_right_loss_after_to_empty(case, regularize_on_meta):
    case = CASES[case]
    reference = add_moge_regularizer(case.build(), **MOGE)
    model = _on_meta(case, regularize_on_meta)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    _copy_model_buffers(model, reference)
    assert_same_moge_loss(model, reference, case.batch(1))


@pytest.mark.parametrize("case", MOE_CASES)
def test_fsdp_style_materialization_module_by_module_rebuilds_the_buffers(case):
    # FSDP1 materializes a meta module one submodule at a time: `to_empty(recurse=False)`.
    case = CASES[case]
    reference = add_moge_regularizer(case.build(), **MOGE)
    model = _on_meta(case, regularize_on_meta=True)
    for module in model.modules():
        module.to_empty(device="cpu", recurse=False)
    model.load_state_dict(reference.state_dict())
    _copy_model_buffers(model, reference)
    assert_same_moge_loss(model, reference, case.batch(2))


@pytest.mark.parametrize("case", MOE_CASES)
def test_weights_assigned_to_a_meta_model_leave_no_meta_regularizer(case):
    # `load_state_dict(..., assign=True)` gives the weights without `to_empty`: the non-persistent buffers stay on the
    # meta device (the model's own rotary ones too, rebuilt here the way a user of that path must).
    case = CASES[case]
    reference = add_moge_regularizer(case.build(), **MOGE)
    model = _on_meta(case, regularize_on_meta=True)
    model.load_state_dict(reference.state_dict(), assign=True)
    _copy_model_buffers(model, reference)
    assert model.moge_regularizer.window_matrix.is_meta
    assert_same_moge_loss(model, reference, case.batch(3))
    assert not model.moge_regularizer.window_matrix.is_meta


@pytest.mark.parametrize("include_buffers", [False, True])
@pytest.mark.parametrize("case", MOE_CASES)
def test_accelerate_init_empty_weights(case, include_buffers):
    accelerate = pytest.importorskip("accelerate")
    case = CASES[case]
    reference = add_moge_regularizer(case.build(), **MOGE)
    with accelerate.init_empty_weights(include_buffers=include_buffers):
        model = case.model_class(case.make_config())
        add_moge_regularizer(model, **MOGE)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    _copy_model_buffers(model, reference)
    assert_same_moge_loss(model, reference, case.batch(4))


@pytest.mark.parametrize("device_map", [None, "cpu"])
@pytest.mark.parametrize("case", MOE_CASES)
def test_regularizing_a_model_loaded_by_from_pretrained(case, tmp_path, device_map):
    # from_pretrained builds on the meta device; the regularizer, added after it, or re-applied from a saved
    # regularized folder, must match the one of the model it was saved from.
    case = CASES[case]
    reference = add_moge_regularizer(case.build(), **MOGE)
    reference.save_pretrained(tmp_path)
    kwargs = {} if device_map is None else {"device_map": device_map}
    auto_class = getattr(transformers, case.auto_class)
    loaded = add_moge_regularizer(auto_class.from_pretrained(tmp_path, **kwargs))
    assert_same_moge_loss(loaded, reference, case.batch(5))
    fresh = add_moge_regularizer(auto_class.from_pretrained(tmp_path, **kwargs), **MOGE)
    assert_same_moge_loss(fresh, reference, case.batch(5))


@pytest.mark.parametrize("case", case_names(moge_hf=True))
def test_moge_models_built_on_the_meta_device_without_init_weights(case):
    # moge_hf's own models: `init_weights()` repairs the buffers, but `to_empty` + `load_state_dict` alone must too.
    case = CASES[case]
    reference = case.build()
    with torch.device("meta"):
        model = case.model_class(case.make_config())
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    # The dense parent's own non-persistent buffers (Swin's relative position index) are transformers' to rebuild, in
    # `init_weights`: copied here, so that what is checked is the MoGE modules' buffers rebuilding themselves.
    regularizers = {name for name, module in model.named_modules() if isinstance(module, GroupSparsityRegularizer)}
    saved = reference.state_dict()
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name not in saved and name.rpartition(".")[0] not in regularizers:
                model.get_buffer(name).copy_(buffer)
    assert_same_moge_loss(model, reference, case.batch(6))


def test_the_regularizer_alone_meta_to_empty_assign_and_casts():
    want = GroupSparsityRegularizer(16, [4, 4], 3, 0.7, "circular", "paper")
    probs = torch.rand(5, 16).softmax(-1)
    with torch.device("meta"):
        meta = GroupSparsityRegularizer(16, [4, 4], 3, 0.7, "circular", "paper")
    lazy = GroupSparsityRegularizer(16, [4, 4], 3, 0.7, "circular", "paper").to("meta")
    assert meta.window_matrix.is_meta and lazy.window_matrix.is_meta
    torch.testing.assert_close(lazy(probs), want(probs), rtol=0, atol=0)  # built where the probabilities are
    meta.to_empty(device="cpu")
    for name, buffer in want.named_buffers():
        assert torch.equal(getattr(meta, name), buffer), name
    # `to_empty` on a real module empties real memory too: rebuilt as well; and a cast keeps the weights float32.
    real = GroupSparsityRegularizer(16, [4, 4], 3, 0.7, "circular", "paper")
    real.set_sigma(2.0)
    real.to_empty(device="cpu").to(torch.bfloat16)
    want.set_sigma(2.0)
    for name, buffer in want.named_buffers():
        assert torch.equal(getattr(real, name), buffer), name
