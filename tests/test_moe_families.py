"""Every MoE family of the installed transformers, found as transformers lists them, given `add_moge_regularizer`.

The families are discovered, not named: every causal-LM class of transformers' auto mapping whose modeling module
records `router_logits` (`_can_record_outputs`). Each is built tiny from its own config class's defaults, shrunk by
the generic rules of `tiny_config` (hidden 32, 8 experts top-2, the fewest layers that keep every kind of layer the
default has); only the families whose configs need more name themselves in `SPECIAL`. A family transformers adds is
tested without anyone writing its name. Each family is regularized correctly or refused with its reason (`REFUSED`).

`python tests/test_moe_families.py` prints the routing table of docs/MOE_FAMILIES.md for the installed transformers.
"""

import copy
import importlib
import re
from pathlib import Path

import pytest
import torch
import transformers
from tiny import MOE_COMMON
from transformers.models.auto import modeling_auto

from moge_hf import add_moge_regularizer, group_sparsity_loss
from moge_hf.routing import NUM_EXPERTS_NAMES, TOP_K_NAMES, _router_spec, moge_routers, scores
from moge_hf.transformers_moe import describe_routing


def moe_families() -> dict[str, type]:
    """model_type -> causal-LM class, for every class of the auto mapping whose module records router logits (the
    first model_type of each class)."""
    families: dict[type, str] = {}
    for model_type, class_name in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        model_class = getattr(transformers, class_name, None)
        if model_class is None or model_class in families:
            continue
        module = importlib.import_module(model_class.__module__)
        if any(
            "router_logits" in (getattr(value, "_can_record_outputs", None) or {}) for value in vars(module).values()
        ):
            families[model_class] = model_type
    return {model_type: model_class for model_class, model_type in families.items()}


# The generic shrink rules: transformers' MoE fields of the shared tiny configs (tests/tiny.py), under every name the
# families use; as many KV heads as heads (some attention variants need it).
TINY = dict(
    MOE_COMMON,
    num_key_value_heads=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    expert_intermediate_size=32,
    ffn_hidden_size=32,
    head_dim=8,
    **dict.fromkeys(NUM_EXPERTS_NAMES, 8),
    **dict.fromkeys(TOP_K_NAMES, 2),
    n_group=2,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    first_k_dense_replace=0,
    max_position_embeddings=64,
)

DROP = object()  # a field of the shrunk config left out (the config derives it)
GEMMA4_TEXT_MOE = dict(
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
    vocab_size_per_layer_input=99,
    hidden_size_per_layer_input=8,
    global_head_dim=8,
)
# The families whose defaults the generic rules do not shrink to a model that runs, and what they need.
SPECIAL = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),  # an attention layer among the first two
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "dots1": dict(n_shared_experts=1),
    "zaya": dict(num_experts_per_tok=1),  # ZAYA routes top-1 only
    "kolibri1_1": dict(head_dim=16, index_num_heads=1),
    "granitemoehybrid": dict(
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16, layer_types=["mamba", "attention"]
    ),
    "bailing_hybrid": dict(num_expert_group=2),
    "mimo_v2_flash": dict(num_key_value_heads=2, head_dim=24),  # sliding layers double the KV heads
    "qwen4_exp": dict(
        indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2
    ),
    "dots3_note": dict(
        per_layer_config=DROP,
        swa_num_attention_heads=4,
        swa_num_key_value_heads=4,
        swa_q_lora_rank=16,
        swa_kv_lora_rank=16,
        swa_head_dim=16,
        swa_qk_nope_head_dim=8,
        swa_v_head_dim=8,
        index_head_dim=8,
        index_n_heads=2,
        index_topk=4,
    ),
    "gemma4": dict(text_config=GEMMA4_TEXT_MOE),  # what AutoModelForCausalLM builds for gemma4
    "gemma4_text": GEMMA4_TEXT_MOE,
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=2),
    "longcat_flash": dict(zero_expert_num=2, expert_ffn_hidden_size=32, ffn_hidden_size=32),
    "dbrx": dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=64,
        attn_config=dict(kv_n_heads=4, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2),
    ),
}

# The families add_moge_regularizer refuses, and the reason it gives (at most 3).
REFUSED = {"doge": "not one per expert"}  # product-key routing: 2 x sqrt(E) logits, no distribution over experts


def _layers_needed(fields: dict, num_layers: int) -> int:
    """The fewest layers that keep every kind of layer the default config has (attention kinds, dense and MoE)."""
    needed = TINY["num_hidden_layers"]
    for name, value in fields.items():
        if isinstance(value, list) and len(value) == num_layers and all(isinstance(x, (str, int)) for x in value):
            kinds, seen = set(value), set()
            for i, kind in enumerate(value):
                seen.add(kind)
                if seen == kinds:
                    needed = max(needed, i + 1)
                    break
        elif name.endswith("_layers") and isinstance(value, list) and value and all(type(x) is int for x in value):
            needed = max(needed, next(i for i in range(num_layers + 1) if i not in value) + 1)
    return min(needed, num_layers)


def _shrunk(config) -> dict:
    """`config`'s fields, shrunk by the rules of TINY; per-layer lists cut to the layers kept; nested configs too."""
    fields = config.to_dict()
    num_layers = fields.get("num_hidden_layers")
    keep = _layers_needed(fields, num_layers) if num_layers else None
    shrunk = {}
    for name, value in fields.items():
        if name == "num_hidden_layers" and keep:
            shrunk[name] = keep
        elif name in TINY and (value is None or (isinstance(value, int) and not isinstance(value, bool))):
            shrunk[name] = TINY[name]
        elif keep and isinstance(value, list) and len(value) == num_layers:
            shrunk[name] = value[:keep]
        elif keep and isinstance(value, dict) and value and all(str(i).isdigit() for i in value):
            shrunk[name] = {i: v for i, v in value.items() if int(i) < keep}
        elif isinstance(getattr(config, name, None), transformers.PreTrainedConfig):
            nested = getattr(config, name)
            shrunk[name] = type(nested)(**{**nested.to_dict(), **_shrunk(nested)})
    return shrunk


def tiny_config(model_type: str, model_class: type):
    config_class = model_class.config_class
    fields = _shrunk(config_class())
    for name, value in SPECIAL.get(model_type, {}).items():
        if isinstance(value, dict) and isinstance(fields.get(name), transformers.PreTrainedConfig):
            value = type(fields[name])(**{**fields[name].to_dict(), **value})
        fields[name] = value
    return config_class(**{name: value for name, value in fields.items() if value is not DROP})


FAMILIES = moe_families()
MOGE = dict(moge_loss_coef=0.1, moge_map_shape=[2, 4], moge_window=2, moge_sigma=0.8)


def build(model_type: str):
    torch.manual_seed(0)
    model = FAMILIES[model_type](tiny_config(model_type, FAMILIES[model_type]))
    # Random routers (some families initialize theirs to zero), as a trained checkpoint has; eval mode (no jitter).
    with torch.no_grad():
        for parameter in router_parameters(model):
            parameter.normal_(0, 0.5)
    return model.eval()


def router_parameters(model) -> list[torch.nn.Parameter]:
    parameters = [parameter for tap in moge_routers(model) for parameter in tap.module.parameters()]
    return [parameter for parameter in parameters if parameter.requires_grad]


def inputs():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (3, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_families_are_discovered_and_few_are_refused():
    assert {"qwen3_moe", "mixtral", "olmoe"} <= set(FAMILIES)
    assert len(REFUSED) <= 3
    assert set(SPECIAL) - {"gemma4", "gemma4_text", "doge"} <= set(FAMILIES) | set(SPECIAL)  # no stale names


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_is_regularized_or_refused(model_type, tmp_path):
    model = build(model_type)
    batch = inputs()
    try:
        with torch.no_grad():
            own = model(**batch, output_router_logits=True)
    except Exception as error:  # transformers' own model does not run: nothing of moge_hf's to test
        pytest.skip(f"transformers {transformers.__version__}: {type(model).__name__} itself fails: {error}")
    plain = copy.deepcopy(model)
    refused = REFUSED.get(model_type)
    if isinstance(_router_spec(model), type):  # older releases record a MoE block's output, not its router's
        refused = "the hidden size"
    if refused:
        with pytest.raises(ValueError, match=refused):
            add_moge_regularizer(model, **MOGE)
        return
    add_moge_regularizer(model, **MOGE)
    routing = model.moge_regularizer.routing
    assert routing.scoring in ("softmax", "sigmoid", "sqrt_softplus")
    out = model(**batch, output_router_logits=True)

    # moge_loss: the regularizer of the routing transformers itself returns, through the router's own scoring, over
    # the routed experts (extra logits left out), padding left out; loss = the model's own + lambda * moge_loss.
    mask = batch["attention_mask"].reshape(-1).bool()
    per_layer = []
    recorded = getattr(own, "router_logits", None) or ()  # some families' heads return none in older releases
    for logits in recorded:
        logits = logits.reshape(-1, logits.shape[-1])[:, : routing.num_experts]
        if logits.shape[0] != mask.shape[0]:  # a router that sees only some tokens is not compared here
            continue
        probs = scores(logits, routing.scoring)
        per_layer.append(group_sparsity_loss(probs, (2, 4), 2, 0.8, mask=mask))
    if recorded and len(per_layer) == len(recorded):
        torch.testing.assert_close(out.moge_loss.detach(), torch.stack(per_layer).mean())
    torch.testing.assert_close(out.loss.detach(), own.loss + 0.1 * out.moge_loss.detach())
    torch.testing.assert_close(out.logits.detach(), own.logits)

    # The routers get the regularizer's gradient.
    grads = torch.autograd.grad(out.moge_loss, router_parameters(model), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    # A native checkpoint: it reloads with plain transformers, keeps the settings, regularizes alike again.
    try:
        model.save_pretrained(tmp_path / "moge")
        reloaded = type(plain).from_pretrained(tmp_path / "moge")
    except Exception as error:  # only where transformers cannot save and reload the tiny model itself
        with pytest.raises(type(error)):
            plain.save_pretrained(tmp_path / "plain")
            type(plain).from_pretrained(tmp_path / "plain")
        return
    assert reloaded.config.moge_loss_coef == 0.1 and not hasattr(reloaded, "moge_regularizer")
    add_moge_regularizer(reloaded)
    with torch.no_grad():
        again = reloaded(**batch)
    torch.testing.assert_close(again.moge_loss, out.moge_loss.detach())


# What the tiny families' routers compute, as their modeling code reads (the library reads it from the model).
KNOWN_SCORING = {
    "qwen3_moe": "softmax",
    "mixtral": "softmax",
    "olmoe": "softmax",
    "deepseek_v3": "sigmoid",
    "glm4_moe": "sigmoid",
    "afmoe": "sigmoid",  # its router is initialized to zero: read with random weights, put back after
    "llama4": "sigmoid",  # dense weights from the router itself (its experts take none)
    "deepseek_v4": "sqrt_softplus",
    "longcat_flash": "softmax",  # routed and zero-computation experts
}


@pytest.mark.parametrize("model_type", sorted(set(KNOWN_SCORING) & set(FAMILIES)))
def test_the_scoring_is_read_from_what_the_model_computes(model_type):
    torch.manual_seed(0)
    model = FAMILIES[model_type](tiny_config(model_type, FAMILIES[model_type]))
    if isinstance(_router_spec(model), type):
        pytest.skip("this release of transformers records the MoE block's output, not its router's (refused)")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert describe_routing(model).scoring == KNOWN_SCORING[model_type]
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # the probe changed nothing


def test_the_papers_softmax_is_an_option_and_a_built_field():
    family = "deepseek_v3" if "deepseek_v3" in FAMILIES else "afmoe"  # a sigmoid router in each release tested
    model, batch = build(family), inputs()
    with torch.no_grad():
        own = copy.deepcopy(model)(**batch, output_router_logits=True)
    mask = batch["attention_mask"].reshape(-1).bool()
    expected = {}
    for scoring in ("softmax", "sigmoid"):
        per_layer = [group_sparsity_loss(scores(z, scoring), (2, 4), 2, 0.8, mask=mask) for z in own.router_logits]
        expected[scoring] = torch.stack(per_layer).mean()
    assert not torch.allclose(expected["softmax"], expected["sigmoid"])
    for setting, scoring in [("auto", "sigmoid"), ("softmax", "softmax"), ("sigmoid", "sigmoid")]:
        add_moge_regularizer(model, **MOGE, moge_scoring=setting)
        assert model.moge_regularizer.routing.scoring == scoring and model.config.moge_scoring == setting
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).moge_loss, expected[scoring])
    with pytest.raises(ValueError, match="moge_scoring"):
        model.config.moge_scoring = "softmax"  # built into the regularizer: add_moge_regularizer rebuilds it
    with pytest.raises(ValueError, match="must be one of"):
        add_moge_regularizer(model, moge_scoring="tanh")


def routing_table() -> list[str]:
    """The per-family table of docs/MOE_FAMILIES.md, as the installed transformers' families route."""
    lines = [
        "| model type | class | experts (logits) | top-k | scoring read | selection bias | expert groups | MoGE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model_type in sorted(FAMILIES):
        model = build(model_type)
        try:
            d = describe_routing(model)
        except ValueError as error:
            lines.append(f"| {model_type} | {FAMILIES[model_type].__name__} | | | | | | refused: {error} |")
            continue
        width = f"{d.num_experts}" + (f" ({d.logits_per_token})" if d.logits_per_token != d.num_experts else "")
        if model_type in REFUSED:
            what = "refused: the router gives no logit per expert"
        elif d.scoring is None:
            what = "softmax of the logits (not read; a warning says so)"
        else:
            what = {"softmax": "softmax", "sigmoid": "sigmoid / sum", "sqrt_softplus": "sqrt(softplus) / sum"}
            what = what[d.scoring] + (" over the routed experts" if width != str(d.num_experts) else "")
        row = [model_type, FAMILIES[model_type].__name__, width, d.top_k, d.scoring or "-", "yes" * d.selection_bias]
        lines.append("| " + " | ".join(str(x) for x in [*row, d.expert_groups or "", what]) + " |")
    return lines


def test_the_docs_family_table_is_what_the_code_reads():
    text = (Path(__file__).resolve().parent.parent / "docs" / "MOE_FAMILIES.md").read_text()
    version = re.search(r"^transformers (\S+)$", text, flags=re.MULTILINE).group(1)
    if version != transformers.__version__:
        pytest.skip(f"docs/MOE_FAMILIES.md's table is for transformers {version}, not {transformers.__version__}")
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| model type |")))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("| ")), len(lines))
    assert lines[start:end] == routing_table()


if __name__ == "__main__":  # the routing table of docs/MOE_FAMILIES.md
    print(f"transformers {transformers.__version__}\n")
    print("\n".join(routing_table()))
