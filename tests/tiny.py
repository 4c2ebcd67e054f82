"""Tiny configs, inputs and the one table of model cases shared by the tests (hidden 32, 2-4 layers, 4 heads, batch
13, seq 7).

`CASES` lists every model the shared checks run on: each class of the moge_hf hosts (GPT-2, ViT) and transformers' own
MoE families that `add_moge_regularizer` takes (Qwen3-MoE, OLMoE, Mixtral). The modeling, remote-code, training,
diagnostics and Hub tests pick their cases from it (`case_names(...)`); a new host adds its rows here.
"""

import dataclasses
from collections.abc import Callable

import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    TrainingArguments,
)

from moge_hf import (
    GPT2MoGEConfig,
    GPT2MoGEForSequenceClassification,
    GPT2MoGELMHeadModel,
    GPT2MoGEModel,
    ViTMoGEConfig,
    ViTMoGEForImageClassification,
    ViTMoGEModel,
)
from moge_hf.moge_model import MoGEModelMixin


BATCH, SEQ, VOCAB = 13, 7, 99


# The dense parts of the tiny configs (also the dense models that tests upcycle).
GPT2_DENSE = dict(
    vocab_size=VOCAB,
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_inner=37,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=VOCAB - 1,
    eos_token_id=VOCAB - 1,
    pad_token_id=0,
)
VIT_DENSE = dict(
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=5,
)


def gpt2_config(**overrides) -> GPT2MoGEConfig:
    kwargs = dict(
        GPT2_DENSE,
        num_experts=8,
        num_experts_per_tok=2,
        moge_map_shape=[2, 4],
        moge_window=2,
        moge_loss_coef=0.1,
        router_z_loss_coef=0.001,
    )
    kwargs.update(overrides)
    return GPT2MoGEConfig(**kwargs)


def vit_config(**overrides) -> ViTMoGEConfig:
    kwargs = dict(
        VIT_DENSE,
        num_experts=8,
        num_experts_per_tok=1,
        moge_map_shape=[2, 4],
        moge_window=2,
        moge_loss_coef=0.1,
    )
    kwargs.update(overrides)
    return ViTMoGEConfig(**kwargs)


def input_ids(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=generator)


def pixel_values(seed: int = 0, batch: int = BATCH, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Trainer arguments for tiny CPU runs: no reports, no saving, a log line every step."""
    kwargs = dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def lm_batch(seed: int = 0, batch: int = BATCH, seq: int = SEQ, low: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with right padding on a few rows (id 0, masked), and LM labels (-100 on padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[: max(1, batch // 3), -3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# transformers' MoE families, tiny: hidden 32, 2 layers, 4 heads, 8 experts top-2 (sizes multiples of 8: transformers'
# default experts implementation, grouped_mm, needs them).
MOE_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model the shared checks run on: how to build it (tiny, random) and a batch for it."""

    name: str
    family: str  # a moge_hf host ("gpt2", "vit") or a transformers MoE family ("qwen3_moe", "olmoe", "mixtral")
    model_class: type[PreTrainedModel]
    make_config: Callable[..., object]  # tiny config; keyword arguments override its fields
    make_batch: Callable[[int], dict]  # seed -> inputs, with labels when the model has a head
    auto_class: str  # the Auto class that loads it
    task: str | None  # "causal-lm", "sequence-classification", "image-classification"; None: a base model

    @property
    def moge_hf(self) -> bool:
        """A moge_hf model (MoGE layers built in), not a transformers MoE model given `add_moge_regularizer`."""
        return issubclass(self.model_class, MoGEModelMixin)

    def build(self, seed: int = 0, **overrides) -> PreTrainedModel:
        torch.manual_seed(seed)
        return self.model_class(self.make_config(**overrides))

    def batch(self, seed: int = 0) -> dict:
        return self.make_batch(seed)


def _without_labels(make_batch):
    return lambda seed: {k: v for k, v in make_batch(seed).items() if k != "labels"}


def _images(seed: int, num_labels: int = 5) -> dict:
    return {"pixel_values": pixel_values(seed), "labels": torch.arange(BATCH) % num_labels}


CASES = {
    case.name: case
    for case in [
        ModelCase("gpt2-base", "gpt2", GPT2MoGEModel, gpt2_config, _without_labels(lm_batch), "AutoModel", None),
        ModelCase("gpt2-lm", "gpt2", GPT2MoGELMHeadModel, gpt2_config, lm_batch, "AutoModelForCausalLM", "causal-lm"),
        ModelCase(
            "gpt2-seqcls",
            "gpt2",
            GPT2MoGEForSequenceClassification,
            lambda **kw: gpt2_config(**{"num_labels": 3, **kw}),
            lambda seed: {**lm_batch(seed), "labels": torch.arange(BATCH) % 3},
            "AutoModelForSequenceClassification",
            "sequence-classification",
        ),
        ModelCase("vit-base", "vit", ViTMoGEModel, vit_config, _without_labels(_images), "AutoModel", None),
        ModelCase(
            "vit-cls",
            "vit",
            ViTMoGEForImageClassification,
            vit_config,
            _images,
            "AutoModelForImageClassification",
            "image-classification",
        ),
        ModelCase(
            "qwen3_moe",
            "qwen3_moe",
            Qwen3MoeForCausalLM,
            lambda **kw: Qwen3MoeConfig(
                **{**MOE_COMMON, "num_experts": 8, "moe_intermediate_size": 16, "head_dim": 8, **kw}
            ),
            lambda seed: lm_batch(seed, batch=4, low=3),
            "AutoModelForCausalLM",
            "causal-lm",
        ),
        ModelCase(
            "olmoe",
            "olmoe",
            OlmoeForCausalLM,
            lambda **kw: OlmoeConfig(**{**MOE_COMMON, "num_experts": 8, **kw}),
            lambda seed: lm_batch(seed, batch=4, low=3),
            "AutoModelForCausalLM",
            "causal-lm",
        ),
        ModelCase(
            "mixtral",
            "mixtral",
            MixtralForCausalLM,
            lambda **kw: MixtralConfig(**{**MOE_COMMON, "num_local_experts": 8, "head_dim": 8, **kw}),
            lambda seed: lm_batch(seed, batch=4, low=3),
            "AutoModelForCausalLM",
            "causal-lm",
        ),
    ]
}


def case_names(*, moge_hf: bool | None = None, head: bool | None = None, family: str | None = None) -> list[str]:
    """The names of the cases that match: moge_hf models or transformers MoE models, with or without a head."""
    return [
        name
        for name, case in CASES.items()
        if (moge_hf is None or case.moge_hf == moge_hf)
        and (head is None or (case.task is not None) == head)
        and (family is None or case.family == family)
    ]


MOGE_FAMILIES = sorted({case.family for case in CASES.values() if case.moge_hf})
