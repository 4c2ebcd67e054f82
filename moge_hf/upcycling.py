"""Sparse upcycling (Komatsuzaki et al. 2023): MoGE models initialized from dense GPT-2 / ViT checkpoints.

Every non-MLP weight of the dense model is copied as is; in each layer of `config.moe_layers`, every expert starts
as a copy of that layer's dense MLP (optionally with a little Gaussian noise) and the router is freshly initialized.
With renormalized top-k gate weights (`norm_topk_prob`, the default for `num_experts_per_tok > 1`) the gate weights of
a token sum to one, so the upcycled model computes exactly what the dense one does until training moves the experts
apart.

Where a host family keeps its layers and MLPs comes from its record (`MoGEHost`, at the end of its modeling file),
which `register_host` hands to its classes (`moge_class.moge_host`). This module only imports `torch` and
`transformers`, so that folders written by `save_pretrained` still load with `trust_remote_code=True`
(`moge_model.py` imports it for `from_dense`).
"""

import copy
import dataclasses
import math
import os
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["upcycle_from_dense", "upcycle_to_moe"]

# Keys of a dense config's `to_dict()` that describe the dense checkpoint rather than the model to build.
_DENSE_ONLY_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_commit_hash")


def upcycle_from_dense(
    moge_class: type[PreTrainedModel],
    dense_model_or_path: PreTrainedModel | str | os.PathLike,
    *,
    expert_noise_std: float = 0.0,
    **config_overrides,
) -> PreTrainedModel:
    r"""Build a `moge_class` model from a dense GPT-2 / ViT model by sparse upcycling (what `from_dense` calls).

    The MoGE config is the dense config plus `config_overrides`. Every weight outside the MLPs of `moe_layers` is
    copied exactly, as are the MLPs of the other layers. In each MoGE layer every expert is a copy of the layer's dense
    MLP (GPT-2's `Conv1D` weights transposed into the experts' `(out, in)` layout) and the router keeps the model's
    fresh initialization (normal, std `initializer_range`). Head weights that the dense model lacks (e.g. the
    `score` of a sequence classifier upcycled from a `GPT2LMHeadModel`) are freshly initialized, with a warning, as
    `from_pretrained` does for a checkpoint of another head.

    Args:
        moge_class (`type[PreTrainedModel]`):
            The MoGE model class to build: `GPT2MoGEModel`, `GPT2MoGELMHeadModel`,
            `GPT2MoGEForSequenceClassification`, `ViTMoGEModel` or `ViTMoGEForImageClassification` (or a subclass).
        dense_model_or_path (`PreTrainedModel`, `str` or `os.PathLike`):
            A dense transformers model of the same family (GPT-2 for the GPT-2 MoGE classes, ViT for the ViT ones),
            or a local `save_pretrained` folder or Hub id holding one, loaded with the matching dense class
            (`GPT2LMHeadModel` for `GPT2MoGELMHeadModel`, ...). A model instance of another class of the family is
            accepted too: its base model and whichever head weights match are copied (so a `GPT2LMHeadModel`
            can become a `GPT2MoGEForSequenceClassification`, and any GPT-2 model a `GPT2MoGEModel`). When the
            target is `ViTMoGEModel`, the pooler and mask token are kept if and only if the dense model has them.
        expert_noise_std (`float`, *optional*, defaults to 0.0):
            Relative standard deviation of independent Gaussian noise added to the `up_proj` and `down_proj` weights
            of every expert: the noise's std is `expert_noise_std` times the std of the dense weight it perturbs.
            Biases are copied exactly. `0.0` makes every expert an exact copy. Uses torch's global random generator.
        config_overrides:
            Fields for the MoGE config (`num_experts`, `num_experts_per_tok`, `moe_layers`, `moge_loss_coef`, ...,
            or dense fields that do not change weight shapes, such as dropout rates or `num_labels`). Invalid values
            raise the config's `ValueError`. `expert_intermediate_size`, if given, must equal the dense MLP's size.

    Returns:
        `PreTrainedModel`: the `moge_class` model in evaluation mode (as `from_pretrained` returns models), in the
        dense model's dtype and on its device. `config._name_or_path` names the dense source: the folder or Hub id
        it was loaded from, or the dense model's own `config._name_or_path`.

    Raises:
        `ValueError`: the dense model is not of the family of `moge_class` (or already a MoGE model), the folder holds
            another model type, an override is invalid, or an override changes a weight shape.
        `OSError`: `dense_model_or_path` is not a folder with a `config.json` nor a reachable Hub id.
        `TypeError`: `moge_class` is not a MoGE class, or `dense_model_or_path` neither a model nor a path.

    Example:

    ```python
    >>> from transformers import GPT2LMHeadModel
    >>> from moge_hf import GPT2MoGELMHeadModel
    >>> dense = GPT2LMHeadModel.from_pretrained("openai-community/gpt2")
    >>> moge = GPT2MoGELMHeadModel.from_dense(dense, num_experts=8, num_experts_per_tok=2, moge_window=2)
    ```
    """
    dense_class = _dense_class_of(moge_class)
    family = moge_class.moge_host
    _check_noise(expert_noise_std)

    if isinstance(dense_model_or_path, (str, os.PathLike)):
        source = os.fspath(dense_model_or_path)
        dense = _load_dense(moge_class, dense_class, family, source)
    elif isinstance(dense_model_or_path, PreTrainedModel):
        dense = dense_model_or_path
        source = dense.config._name_or_path
        _check_dense_model(moge_class, dense_class, family, dense)
    else:
        raise TypeError(
            f"{moge_class.__name__}.from_dense takes a dense {family.display_name} model or the path / Hub id of one, "
            f"got {type(dense_model_or_path).__name__}"
        )

    config = _moge_config(moge_class, dense.config, config_overrides)
    config._name_or_path = source
    if config_overrides.get("tie_word_embeddings") and not getattr(dense.config, "tie_word_embeddings", True):
        logger.warning(
            f"{moge_class.__name__}.from_dense: tie_word_embeddings=True on an untied dense model drops its own "
            "output embeddings (lm_head): the upcycled head is the input embeddings"
        )
    dense_base = dense.base_model
    init_kwargs = {}
    if issubclass(moge_class, family.base_class):  # a base model: mirror the dense base's optional parts
        init_kwargs = _optional_parts(family, dense_base)
    moge = moge_class._from_config(config, dtype=dense.dtype, **init_kwargs)
    moge.to(dense.device)
    _check_norm_topk_prob(moge_class, config)

    with torch.no_grad():
        _copy_base(moge_class, family, dense_base, moge.base_model, expert_noise_std)
        if moge.base_model is not moge:
            _copy_heads(moge_class, dense, moge)
    if moge.can_generate() and dense.can_generate() and getattr(dense, "generation_config", None) is not None:
        moge.generation_config = copy.deepcopy(dense.generation_config)
    return moge.eval()


def _dense_class_of(moge_class: type) -> type[PreTrainedModel]:
    """The dense transformers class `moge_class` upcycles from (its head record's, see `MoGEHost`)."""
    head = getattr(moge_class, "moge_head", None)
    if head is None:
        raise TypeError(
            f"upcycle_from_dense builds MoGE models: {getattr(moge_class, '__name__', moge_class)!r} is not a MoGE "
            "model class"
        )
    return head.dense_class


def _expected(family: Any, dense_class: type[PreTrainedModel], what: str) -> str:
    model_type = family.dense_model_type
    return f"a dense {family.display_name} {what} (model_type {model_type!r}, e.g. {dense_class.__name__})"


def _describe(config_dict: dict) -> str:
    """`model_type 'vit' (ViTForImageClassification)`: what a config dict holds, for error messages."""
    model_type, architectures = config_dict.get("model_type"), config_dict.get("architectures")
    found = f"model_type {model_type!r}" if model_type else "no model_type"
    return found + (f" ({', '.join(architectures)})" if architectures else "")


def _load_dense(moge_class: type, dense_class: type[PreTrainedModel], family: Any, source: str) -> PreTrainedModel:
    """Load the dense model at `source` (local folder or Hub id) with `dense_class`, after checking its model type."""
    expected = _expected(family, dense_class, "checkpoint")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise OSError(
            f"{moge_class.__name__}.from_dense expected {expected} in the folder {source!r}, but found no "
            "config.json there (save the dense model with `save_pretrained`)"
        )
    if os.path.isfile(source):
        raise OSError(
            f"{moge_class.__name__}.from_dense expected {expected}: a `save_pretrained` folder or a Hub id, "
            f"but {source!r} is a file"
        )
    if not os.path.exists(os.path.expanduser(source)) and (
        source.startswith(("/", "./", "../", "~")) or source.count("/") > 1
    ):
        raise FileNotFoundError(f"{moge_class.__name__}.from_dense: the folder {source!r} does not exist")
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(source)
    except OSError as error:
        raise OSError(
            f"{moge_class.__name__}.from_dense expected {expected} at {source!r}, which is not a local folder (none "
            f"exists there) and could not be read as a Hub model id: {error}"
        ) from error
    model_type = config_dict.get("model_type")
    if model_type != family.dense_model_type:
        already = " (it is already a MoGE model)" if model_type == moge_class.config_class.model_type else ""
        raise ValueError(
            f"{moge_class.__name__}.from_dense expected {expected} at {source!r}, but found "
            f"{_describe(config_dict)}{already}"
        )
    dense, info = dense_class.from_pretrained(source, output_loading_info=True)
    if dense_class is family.base_class and family.optional_base_parts:
        # A base model built by `from_pretrained` has its optional parts as its `__init__` defaults say (a ViTModel: a
        # pooler, no mask token) whatever the checkpoint holds: mirror the checkpoint instead (no fresh part where it
        # has none, its part where it has one). Only a checkpoint with a part off by default is loaded a second time.
        wanted = {
            flag: True
            for flag, part in family.optional_base_parts.items()
            if any(key == part or key.startswith(part + ".") for key in info["unexpected_keys"])
        }
        if wanted:
            dense = dense_class.from_pretrained(source, **wanted)
        for part in family.optional_base_parts.values():
            if any(key == part or key.startswith(part + ".") for key in info["missing_keys"]):
                owner, _, name = part.rpartition(".")
                setattr(dense.get_submodule(owner) if owner else dense, name, None)
    return dense


def _check_dense_model(
    moge_class: type, dense_class: type[PreTrainedModel], family: Any, dense: PreTrainedModel
) -> None:
    """Raise a `ValueError` unless `dense` is a dense model of `family` (any head) with the usual MLP layout."""
    model_type = getattr(dense.config, "model_type", None)
    expected = _expected(family, dense_class, "model")
    if model_type != family.dense_model_type or not isinstance(dense.base_model, family.base_class):
        already = " (it is already a MoGE model)" if model_type == moge_class.config_class.model_type else ""
        raise ValueError(
            f"{moge_class.__name__}.from_dense expected {expected}, but got a {type(dense).__name__} with "
            f"model_type {model_type!r}{already}"
        )


def _moge_config(moge_class: type, dense_config: PreTrainedConfig, overrides: dict) -> PreTrainedConfig:
    """The dense config's fields plus `overrides`, as `moge_class`'s config (which checks the MoGE fields)."""
    config_dict = dense_config.to_dict()
    for key in _DENSE_ONLY_CONFIG_KEYS:
        config_dict.pop(key, None)
    attn_implementation = getattr(dense_config, "_attn_implementation", None)
    if attn_implementation is not None and "attn_implementation" not in overrides:
        config_dict["attn_implementation"] = attn_implementation
    # Configs accept unknown keyword arguments silently; a misspelled override (`num_expert=4`) must not be lost,
    # and only config fields count (not methods, properties or the model type).
    if "dtype" in overrides or "torch_dtype" in overrides:
        raise ValueError(
            f"{moge_class.__name__}.from_dense: the upcycled model takes the dense model's dtype; load the dense "
            "model in the dtype you want (e.g. `from_pretrained(path, dtype=torch.bfloat16)`) or cast the result"
        )
    known = moge_class.config_class()
    fields = {field.name for field in dataclasses.fields(known)} | set(known.attribute_map) | set(known.to_dict())
    fields = (fields | {"num_labels"}) - set(_DENSE_ONLY_CONFIG_KEYS)  # `num_labels` sets `id2label`
    unknown = sorted(key for key in overrides if key != "attn_implementation" and key not in fields)
    if unknown:
        raise ValueError(f"{moge_class.__name__}.from_dense: unknown config field(s) {unknown}")
    config_dict.update(overrides)
    return moge_class.config_class(**config_dict)


def _optional_parts(family: Any, dense_base: nn.Module) -> dict:
    """`__init__` arguments of a MoGE base model that give it the optional parts the dense base model has."""
    parts = {}
    for flag, part in family.optional_base_parts.items():
        owner, _, name = part.rpartition(".")
        parts[flag] = getattr(dense_base.get_submodule(owner) if owner else dense_base, name, None) is not None
    return parts


def _check_norm_topk_prob(moge_class: type, config: PreTrainedConfig) -> None:
    if config.num_experts_per_tok == 1 and config.norm_topk_prob is None and config.num_experts > 1:
        logger.warning(
            f"{moge_class.__name__}.from_dense: with top-1 routing and norm_topk_prob left unset, each token's "
            "expert output is scaled by its gate probability, so the upcycled model does not start as the dense "
            "one. Pass norm_topk_prob=True to start from the dense model's function."
        )


def _copy_base(
    moge_class: type, family: Any, dense_base: nn.Module, moge_base: nn.Module, expert_noise_std: float
) -> None:
    """Copy the dense base model into the MoGE base model: MLPs of `moe_layers` into every expert, the rest as is."""
    config, mlp = moge_base.config, family.mlp
    layers, moge_layers = mlp.layer_modules(dense_base), mlp.layer_modules(moge_base)
    names = {module: name for name, module in moge_base.named_modules()}
    moe_prefixes = tuple(f"{names[moge_layers[index]]}.{mlp.module}." for index in config.moe_layers)
    dense_state = {k: v for k, v in dense_base.state_dict().items() if not k.startswith(moe_prefixes)}
    moge_state = {k: v for k, v in moge_base.state_dict().items() if not k.startswith(moe_prefixes)}

    missing = sorted(moge_state.keys() - dense_state.keys())
    # A pooler or mask token the MoGE model has no place for (e.g. a `ViTModel`'s upcycled into an image classifier,
    # or a masked-image-modeling ViT's mask token) is dropped.
    droppable = tuple(family.optional_base_parts.values())
    unexpected = sorted(k for k in dense_state.keys() - moge_state.keys() if not k.startswith(droppable))
    if missing or unexpected:
        raise ValueError(
            f"{moge_class.__name__}.from_dense: the MoGE model does not have the dense model's layout "
            f"(missing from the dense model: {missing[:5]}, not in the MoGE model: {unexpected[:5]}); "
            "do not override fields that change the architecture (such as the number of layers)"
        )
    for key, target in moge_state.items():
        _copy_checked(moge_class, key, target, dense_state[key])

    for index in config.moe_layers:
        where = f"{names[moge_layers[index]]}.{mlp.module}"
        weights = mlp.dense_weights(getattr(layers[index], mlp.module), f"layer {index}'s MLP ({where})")
        experts = getattr(moge_layers[index], mlp.module).experts
        actual_size = weights["up_proj"].shape[0]
        if experts.intermediate_dim != actual_size:
            raise ValueError(
                f"{moge_class.__name__}.from_dense copies each dense MLP into every expert, so the experts must have "
                f"the dense MLP's hidden size {actual_size} (layer {index}), but the MoGE config asks for "
                f"expert_intermediate_size={config.expert_intermediate_size} ({experts.intermediate_dim}); do not "
                "override expert_intermediate_size or the MLP size"
            )
        for name, source in weights.items():
            target = getattr(experts, name)
            _copy_checked(moge_class, f"{where}.experts.{name}", target, source.unsqueeze(0).expand_as(target))
            if expert_noise_std > 0 and experts.DENSE_WEIGHTS[name][1] == "weight":
                _add_expert_noise(target, source, expert_noise_std)


def _add_expert_noise(target: torch.Tensor, source: torch.Tensor, std: float) -> None:
    """Add to the `(E, ...)` expert copies `target` independent Gaussian noise of `std` times the std of the dense
    weight `source` (torch's global generator)."""
    scale = std * source.detach().float().std()
    target.add_((torch.randn(target.shape, device=target.device, dtype=torch.float32) * scale).to(target.dtype))


def _copy_checked(
    moge_class: type, key: str, target: torch.Tensor, source: torch.Tensor, where: str | None = None
) -> None:
    """Copy `source` into `target`, refusing other shapes; `where` names the call in the error (default
    `<moge_class>.from_dense`)."""
    if target.shape != source.shape:
        raise ValueError(
            f"{where or moge_class.__name__ + '.from_dense'}: {key} has shape {tuple(target.shape)} in the "
            f"{moge_class.__name__} but {tuple(source.shape)} in the dense model; do not override fields that "
            "change weight shapes"
        )
    target.copy_(source)


def _copy_heads(moge_class: type, dense: PreTrainedModel, moge: PreTrainedModel) -> None:
    """Copy the head weights of `moge` that `dense` has with the same name and shape; warn about the others."""
    prefix = moge.base_model_prefix + "."
    base_pointers = {tensor.data_ptr() for tensor in moge.base_model.state_dict().values()}
    dense_state = dense.state_dict() if dense.base_model is not dense else {}
    fresh = []
    for key, target in moge.state_dict().items():
        if key.startswith(prefix) or target.data_ptr() in base_pointers:  # base weights, or tied to them
            continue
        source = dense_state.get(key)
        if source is not None and source.shape == target.shape:
            target.copy_(source)
        else:
            found = "missing" if source is None else f"shape {tuple(source.shape)}"
            fresh.append(f"{key} (MoGE {tuple(target.shape)}, dense {found})")
    if fresh:
        logger.warning(
            f"{moge_class.__name__}.from_dense: these head weights are not in the dense {type(dense).__name__} and "
            f"are newly initialized; train them before use: {', '.join(fresh)}"
        )


# ---- dense Llama / Mistral / Qwen decoders into transformers' own MoE siblings --------------------------------------

# Dense class -> its MoE sibling in transformers (same attention, norms and embeddings; SwiGLU experts, softmax top-k).
MOE_SIBLINGS = {
    "LlamaForCausalLM": "MixtralForCausalLM",
    "LlamaModel": "MixtralModel",
    "MistralForCausalLM": "MixtralForCausalLM",
    "MistralModel": "MixtralModel",
    "Qwen2ForCausalLM": "Qwen2MoeForCausalLM",
    "Qwen2Model": "Qwen2MoeModel",
    "Qwen3ForCausalLM": "Qwen3MoeForCausalLM",
    "Qwen3Model": "Qwen3MoeModel",
}


def _check_noise(expert_noise_std) -> None:
    is_number = isinstance(expert_noise_std, (int, float)) and not isinstance(expert_noise_std, bool)
    if not is_number or not math.isfinite(expert_noise_std) or expert_noise_std < 0:
        raise ValueError(f"expert_noise_std must be a finite number >= 0, got {expert_noise_std!r}")


# Set by `upcycle_to_moe` itself (its arguments, the dense model's sizes and dtype), not by `config_overrides`.
_UPCYCLING_KEYS = {"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "dtype"}


def _check_sibling_overrides(config_class: type, sibling_fields: dict, overrides: dict) -> None:
    """Refuse `config_overrides` the sibling's config does not have (a misspelled field would be stored and ignored)
    and those `upcycle_to_moe` sets itself."""
    own = sorted(key for key in overrides if key in _UPCYCLING_KEYS or key == "torch_dtype")
    if own:
        raise ValueError(
            f"upcycle_to_moe: {', '.join(own)} {'is' if len(own) == 1 else 'are'} set by upcycle_to_moe itself "
            "(num_experts and num_experts_per_tok are its arguments; the experts' size and the dtype are the dense "
            "model's), not by config overrides"
        )
    unknown = sorted(key for key in overrides if key not in sibling_fields)
    if unknown:
        raise ValueError(
            f"upcycle_to_moe: {config_class.__name__} has no field {', '.join(unknown)}; the MoE layers of each "
            "sibling are chosen by its own fields (Qwen: mlp_only_layers, decoder_sparse_step; Mixtral: every layer)"
        )


def _sibling_config(dense_config: PreTrainedConfig, config_class: type, num_experts: int, top_k: int, overrides: dict):
    """The MoE sibling's config: every field the dense config shares with it, the dense MLP size as the experts' size,
    renormalized top-k weights (so that copies of one MLP sum to it); a dense field the sibling lacks must be at its
    default (else the sibling could not compute what the dense model does: refused, the field named)."""
    dense_fields = dense_config.to_dict()
    dense_defaults = type(dense_config)(num_hidden_layers=dense_config.num_hidden_layers).to_dict()
    sibling_defaults = config_class().to_dict()
    _check_sibling_overrides(config_class, sibling_defaults, overrides)
    full_attention = set(dense_fields.get("layer_types") or ()) <= {"full_attention"}
    fields = {}
    for key, value in dense_fields.items():
        if key in _DENSE_ONLY_CONFIG_KEYS:
            continue
        if key == "max_window_layers" and full_attention:
            continue  # where sliding windows would start (Qwen): no layer has one
        if key in sibling_defaults:
            fields[key] = value
        elif key == "layer_types" and set(value) <= {"full_attention"}:
            continue  # the sibling's attention is full everywhere unless told otherwise
        elif key == "head_dim":
            fields[key] = value  # read by the siblings' attention even where their config does not declare it
        elif value != dense_defaults.get(key, value) or key == "layer_types":
            raise ValueError(
                f"upcycle_to_moe: the dense {type(dense_config).__name__} sets {key}={value!r}, which "
                f"{config_class.__name__} cannot express: the upcycled model would not compute what the dense one does"
            )
    for key in ("sliding_window",):  # a window the dense model does not have must not appear
        if key in sibling_defaults and key not in dense_fields:
            fields[key] = None
    experts_key = "num_local_experts" if "num_local_experts" in sibling_defaults else "num_experts"
    fields |= {experts_key: num_experts, "num_experts_per_tok": top_k}
    if "moe_intermediate_size" in sibling_defaults:
        fields["moe_intermediate_size"] = dense_config.intermediate_size
    if "shared_expert_intermediate_size" in sibling_defaults:
        fields["shared_expert_intermediate_size"] = dense_config.intermediate_size
    if "norm_topk_prob" in sibling_defaults:
        fields["norm_topk_prob"] = True
    fields |= overrides
    return config_class(**fields)


def upcycle_to_moe(
    dense_model_or_path: PreTrainedModel | str | os.PathLike,
    *,
    num_experts: int,
    num_experts_per_tok: int,
    expert_noise_std: float = 0.0,
    **config_overrides,
) -> PreTrainedModel:
    r"""Upcycle a dense Llama, Mistral, Qwen2 or Qwen3 model into its MoE sibling in transformers, exactly at init.

    `LlamaForCausalLM` and `MistralForCausalLM` become `MixtralForCausalLM`, `Qwen2ForCausalLM` becomes
    `Qwen2MoeForCausalLM`, `Qwen3ForCausalLM` becomes `Qwen3MoeForCausalLM` (their base models the siblings' base
    models). Attention, norms, embeddings and head are copied; in every MoE layer each expert is a copy of the layer's
    dense MLP (plus optional noise) and the router keeps its fresh initialization; the top-k weights are renormalized
    (`norm_topk_prob=True` where the sibling has the field; Mixtral always renormalizes), so the upcycled model
    computes what the dense one does until training moves the experts apart (checked: without noise, both models run
    on a few tokens and must agree). Qwen2-MoE's shared expert starts inert: a copy of the dense MLP with its
    `down_proj` zero (its output is 0 at init; it trains like the rest). The result is a plain transformers model (its
    folder needs no remote code); `add_moge_regularizer` gives it MoGE.

    Args:
        dense_model_or_path: the dense model, or a `save_pretrained` folder / Hub id (loaded with the Auto class of
            its architecture).
        num_experts, num_experts_per_tok: experts per MoE layer and the top-k.
        expert_noise_std: relative std of Gaussian noise added to every expert's weights (times the std of the dense
            weight); 0 keeps the upcycled model exact.
        config_overrides: fields of the sibling's config, e.g. `mlp_only_layers` / `decoder_sparse_step` (Qwen) for
            which layers become MoE layers (the others keep the dense MLP), `router_aux_loss_coef`,
            `output_router_logits`.

    Raises:
        `ValueError`: a dense class with no sibling (the supported ones are listed), a dense config field the sibling
            cannot express (named), bad `num_experts` / `num_experts_per_tok` / noise.
    """
    _check_noise(expert_noise_std)
    for name, value in (("num_experts", num_experts), ("num_experts_per_tok", num_experts_per_tok)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"upcycle_to_moe: {name} must be a positive integer, got {value!r}")
    if num_experts_per_tok > num_experts:
        raise ValueError(f"upcycle_to_moe: num_experts_per_tok={num_experts_per_tok} > num_experts={num_experts}")
    if isinstance(dense_model_or_path, (str, os.PathLike)):
        dense_config = transformers.AutoConfig.from_pretrained(dense_model_or_path)
        architecture = (getattr(dense_config, "architectures", None) or [None])[0]
        if architecture not in MOE_SIBLINGS:
            raise ValueError(_no_sibling(architecture or dense_config.model_type))
        dense = getattr(transformers, architecture).from_pretrained(dense_model_or_path)
    elif isinstance(dense_model_or_path, PreTrainedModel):
        dense = dense_model_or_path
    else:
        raise TypeError(f"upcycle_to_moe takes a dense model or a folder, got {type(dense_model_or_path).__name__}")
    sibling_name = MOE_SIBLINGS.get(type(dense).__name__)
    if sibling_name is None:
        raise ValueError(_no_sibling(type(dense).__name__))
    sibling_class = getattr(transformers, sibling_name)
    config = _sibling_config(
        dense.config, sibling_class.config_class, num_experts, num_experts_per_tok, config_overrides
    )
    moe = sibling_class(config).to(dense.device, next(dense.parameters()).dtype)
    source = dense.state_dict()
    with torch.no_grad():
        for key, target in moe.state_dict().items():
            if key in source:
                _copy_checked(sibling_class, key, target, source[key], "upcycle_to_moe")
            elif key.endswith(".mlp.experts.gate_up_proj") or key.endswith(".mlp.experts.down_proj"):
                mlp = key.rpartition(".experts.")[0]
                gate, up, down = (source[f"{mlp}.{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj"))
                weight = torch.cat([gate, up]) if key.endswith("gate_up_proj") else down
                _copy_checked(sibling_class, key, target, weight.unsqueeze(0).expand_as(target), "upcycle_to_moe")
                if expert_noise_std > 0:
                    _add_expert_noise(target, weight, expert_noise_std)
            elif ".mlp.shared_expert." in key:
                dense_key = key.replace(".shared_expert.", ".")
                if key.endswith("down_proj.weight"):
                    target.zero_()  # inert at init: the shared expert adds nothing
                else:
                    _copy_checked(sibling_class, key, target, source[dense_key], "upcycle_to_moe")
            elif key.endswith(".mlp.gate.weight") or key.endswith(".mlp.shared_expert_gate.weight"):
                continue  # routers: freshly initialized
            else:
                raise ValueError(
                    f"upcycle_to_moe: {sibling_name} has {key}, which the dense {type(dense).__name__} lacks"
                )
    if expert_noise_std == 0:
        _check_same_function(dense, moe)
    if moe.can_generate() and dense.can_generate():
        moe.generation_config = copy.deepcopy(dense.generation_config)  # its stop tokens and sampling defaults
    return moe


def _check_same_function(dense: PreTrainedModel, moe: PreTrainedModel) -> None:
    """Raise unless the upcycled model computes what the dense one does on a few tokens (a config difference that no
    field check caught would show here)."""
    ids = torch.arange(1, 9, device=dense.device).remainder(dense.config.vocab_size).unsqueeze(0)
    modes = dense.training, moe.training
    dense.eval(), moe.eval()
    with torch.no_grad():
        outputs = [model(input_ids=ids) for model in (dense, moe)]
    dense.train(modes[0]), moe.train(modes[1])
    expected, got = (getattr(out, "logits", None) for out in outputs)
    if expected is None:  # base models
        expected, got = (out.last_hidden_state for out in outputs)
    expected, got = expected.float(), got.float()
    tolerance = 1e-4 if next(dense.parameters()).dtype == torch.float32 else 5e-2
    error = (expected - got).abs().max().item()
    if not error <= tolerance * max(1.0, expected.abs().max().item()):
        raise ValueError(
            f"upcycle_to_moe: {type(moe).__name__} built from {type(dense).__name__}'s config does not compute what "
            f"the dense model does (max difference {error:.3g} on 8 tokens): a dense setting it cannot express"
        )


def _no_sibling(found: str) -> str:
    return (
        f"upcycle_to_moe: no MoE sibling in transformers for {found}; it upcycles {', '.join(MOE_SIBLINGS)} "
        f"(into {', '.join(sorted(set(MOE_SIBLINGS.values())))})"
    )
