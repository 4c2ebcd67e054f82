"""Tiny configs, inputs and the one table of model cases shared by the tests (hidden 32, 2-4 layers, 4 heads, batch
13, seq 7).

`CASES` lists every model the shared checks run on: each class of the moge_hf hosts (GPT-2, ViT) and transformers' own
MoE families that `add_moge_regularizer` takes (Qwen3-MoE, OLMoE, Mixtral). A row says what the tests need of its model
(task, inputs, tokens routed, dense class and config, generative or not); the tests pick their cases by these
properties (`case_names(...)`), never by name, so a new host adds its rows here and nothing else. A moge_hf row missing
something a test needs fails at import, naming the row and the field.
"""

import dataclasses
from collections.abc import Callable, Sequence

import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwinConfig,
    SwinForImageClassification,
    SwinModel,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.pytorch_utils import Conv1D

from moge_hf import (
    GPT2MoGEConfig,
    GPT2MoGEForSequenceClassification,
    GPT2MoGELMHeadModel,
    GPT2MoGEModel,
    SwinMoGEConfig,
    SwinMoGEForImageClassification,
    SwinMoGEModel,
    ViTMoGEConfig,
    ViTMoGEForImageClassification,
    ViTMoGEModel,
)
from moge_hf.moge_layer import MoGESparseMoeBlock
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


# Swin: 16x16 images in 2x2 patches, two stages of two blocks (8x8 patches of width 16, merged into 4x4 of width 32),
# windows of 4 (the second block of the first stage shifts them); the MLPs are twice as wide as their stage.
SWIN_DENSE = dict(
    image_size=16,
    patch_size=2,
    num_channels=3,
    embed_dim=16,
    depths=[2, 2],
    num_heads=[2, 4],
    window_size=4,
    mlp_ratio=2.0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
    num_labels=5,
)


def swin_config(**overrides) -> SwinMoGEConfig:  # MoGE in blocks 1 and 3: one per stage
    moge = dict(num_experts=8, moge_map_shape=[2, 4], moge_window=2, moge_loss_coef=0.1)
    return SwinMoGEConfig(**{**SWIN_DENSE, **moge, **overrides})


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


# The tasks the tests know how to check (the task loss, the labels); a case of another task fails at import.
TASKS = ("causal-lm", "sequence-classification", "image-classification")
# An expert size that is a multiple of 8 on every host (the tiny hidden sizes are 32): what transformers' grouped GEMMs
# (`grouped_mm`) need. The tiny configs' own MLP size, 37, is not one.
ALIGNED = {"expert_intermediate_size": 40}
UNALIGNED = {"expert_intermediate_size": 37}


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model the shared checks run on: how to build it (tiny, random), a batch for it, and what the tests need to
    know of it. The fields after `task` are keyword-only; those in `MOGE_HF_FIELDS` are required of a moge_hf case."""

    name: str
    family: str  # a moge_hf host ("gpt2", "vit") or a transformers MoE family ("qwen3_moe", "olmoe", "mixtral")
    model_class: type[PreTrainedModel]
    make_config: Callable[..., PretrainedConfig]  # tiny config; keyword arguments override its fields
    make_batch: Callable[..., dict]  # (seed, batch=<its default>) -> inputs of `batch` examples, labels with a head
    auto_class: str  # the Auto class that loads it
    task: str | None  # one of `TASKS`; None: a base model (no head, no labels)
    _: dataclasses.KW_ONLY
    generative: bool | None = None  # it can `generate` (checked against `model_class.can_generate()`)
    # moge_hf cases only (None for transformers' MoE cases):
    dense_class: type[PreTrainedModel] | None = None  # the dense transformers class it subclasses and upcycles from
    make_dense_config: Callable[..., PretrainedConfig] | None = None  # tiny dense config, the shape of `make_config`'s
    # batch -> the tokens each MoGE layer routes for it (padding included): one number for every layer, or one per MoGE
    # layer (a hierarchical model, whose stages see fewer tokens).
    num_tokens: Callable[[dict], int | Sequence[int]] | None = None

    def __post_init__(self):
        problems = []
        if self.task not in (None, *TASKS):
            problems.append(f"task={self.task!r} is none of {TASKS} (the tests would not know its task loss)")
        if (self.task is None) != (self.auto_class == "AutoModel"):
            problems.append(f"task={self.task!r} does not go with auto_class={self.auto_class!r}")
        if not hasattr(transformers, self.auto_class):
            problems.append(f"transformers has no {self.auto_class}")
        if self.generative is None:
            problems.append("generative is not set")
        elif self.generative != self.model_class.can_generate():
            problems.append(f"generative={self.generative}, but {self.model_class.__name__}.can_generate() is not")
        if type(self.make_config()) is not self.model_class.config_class:
            problems.append(f"make_config() does not give a {self.model_class.config_class.__name__}")
        if self.moge_hf:
            problems += [f"{field} is not set" for field in MOGE_HF_FIELDS if getattr(self, field) is None]
            if self.dense_class is not None:
                if issubclass(self.dense_class, MoGEModelMixin):
                    problems.append(f"dense_class={self.dense_class.__name__} is a MoGE class, not a dense one")
                elif self.dense_class not in self.model_class.__mro__:
                    problems.append(f"it does not subclass dense_class={self.dense_class.__name__}")
            if self.dense_class is not None and self.make_dense_config is not None:
                config = self.make_dense_config()
                if type(config) is not self.dense_class.config_class:
                    problems.append(
                        f"make_dense_config() gives a {type(config).__name__}, not the "
                        f"{self.dense_class.config_class.__name__} of {self.dense_class.__name__}"
                    )
        if problems:
            raise ValueError(
                f"tests/tiny.py, the case {self.name!r} ({self.model_class.__name__}): {'; '.join(problems)}"
            )

    @property
    def moge_hf(self) -> bool:
        """A moge_hf model (MoGE layers built in), not a transformers MoE model given `add_moge_regularizer`."""
        return issubclass(self.model_class, MoGEModelMixin)

    def build(self, seed: int = 0, **overrides) -> PreTrainedModel:
        torch.manual_seed(seed)
        return self.model_class(self.make_config(**overrides))

    def build_dense(self, seed: int = 0, **overrides) -> PreTrainedModel:
        """The dense model it upcycles from (`dense_class`), tiny, random, in evaluation mode."""
        torch.manual_seed(seed)
        return self.dense_class(self.make_dense_config(**overrides)).eval()

    def batch(self, seed: int = 0, size: int | None = None) -> dict:
        """Inputs (with labels when the model has a head): the row's default batch size, or `size` examples."""
        return self.make_batch(seed) if size is None else self.make_batch(seed, size)

    def inputs(self, seed: int = 0, size: int | None = None) -> dict:
        """The batch without its labels: what the model's forward needs."""
        return {key: value for key, value in self.batch(seed, size).items() if key != "labels"}

    def routed_tokens(self, batch: dict, num_moe_layers: int) -> list[int]:
        """The tokens each of the model's `num_moe_layers` MoGE layers routes for `batch`."""
        count = self.num_tokens(batch)
        counts = [count] * num_moe_layers if isinstance(count, int) else list(count)
        if len(counts) != num_moe_layers:
            raise ValueError(f"{self.name}: num_tokens gives {len(counts)} counts for {num_moe_layers} MoGE layers")
        return counts


# What every moge_hf test may need of a moge_hf case (`ModelCase.__post_init__` refuses a row without one).
MOGE_HF_FIELDS = ("dense_class", "make_dense_config", "num_tokens")


def _without_labels(make_batch):
    return lambda seed, *size: {k: v for k, v in make_batch(seed, *size).items() if k != "labels"}


def _images(seed: int, batch: int = BATCH, num_labels: int = 5) -> dict:
    return {"pixel_values": pixel_values(seed, batch=batch), "labels": torch.arange(batch) % num_labels}


def _gpt2_dense(**overrides) -> GPT2Config:
    return GPT2Config(**{**GPT2_DENSE, **overrides})


def _vit_dense(**overrides) -> ViTConfig:
    return ViTConfig(**{**VIT_DENSE, **overrides})


def _token_count(batch: dict) -> int:  # every token of every sequence, padding included
    return batch["input_ids"].numel()


def _vit_token_count(batch: dict) -> int:  # 16x16 images, 4x4 patches: 16 patches + [CLS]
    return len(batch["pixel_values"]) * 17


def _swin_token_count(batch: dict) -> list[int]:  # per MoGE layer: 8x8 patches in stage 1, 4x4 in stage 2
    return [len(batch["pixel_values"]) * 64, len(batch["pixel_values"]) * 16]


GPT2_ROW = dict(make_dense_config=_gpt2_dense, num_tokens=_token_count)
VIT_ROW = dict(make_dense_config=_vit_dense, num_tokens=_vit_token_count)
SWIN_ROW = dict(make_dense_config=lambda **kw: SwinConfig(**{**SWIN_DENSE, **kw}), num_tokens=_swin_token_count)


def _moe_batch(seed: int, batch: int = 4) -> dict:
    return lm_batch(seed, batch=batch, low=3)


def _table(*cases: ModelCase) -> dict[str, ModelCase]:
    table = {}
    for case in cases:
        if case.name in table:
            raise ValueError(f"tests/tiny.py: two cases are named {case.name!r}")
        table[case.name] = case
    return table


CASES = _table(
    ModelCase(
        "gpt2-base",
        "gpt2",
        GPT2MoGEModel,
        gpt2_config,
        _without_labels(lm_batch),
        "AutoModel",
        None,
        generative=False,
        dense_class=GPT2Model,
        **GPT2_ROW,
    ),
    ModelCase(
        "gpt2-lm",
        "gpt2",
        GPT2MoGELMHeadModel,
        gpt2_config,
        lm_batch,
        "AutoModelForCausalLM",
        "causal-lm",
        generative=True,
        dense_class=GPT2LMHeadModel,
        **GPT2_ROW,
    ),
    ModelCase(
        "gpt2-seqcls",
        "gpt2",
        GPT2MoGEForSequenceClassification,
        lambda **kw: gpt2_config(**{"num_labels": 3, **kw}),
        lambda seed, batch=BATCH: {**lm_batch(seed, batch=batch), "labels": torch.arange(batch) % 3},
        "AutoModelForSequenceClassification",
        "sequence-classification",
        generative=False,
        dense_class=GPT2ForSequenceClassification,
        make_dense_config=lambda **kw: _gpt2_dense(**{"num_labels": 3, **kw}),
        num_tokens=_token_count,
    ),
    ModelCase(
        "vit-base",
        "vit",
        ViTMoGEModel,
        vit_config,
        _without_labels(_images),
        "AutoModel",
        None,
        generative=False,
        dense_class=ViTModel,
        **VIT_ROW,
    ),
    ModelCase(
        "vit-cls",
        "vit",
        ViTMoGEForImageClassification,
        vit_config,
        _images,
        "AutoModelForImageClassification",
        "image-classification",
        generative=False,
        dense_class=ViTForImageClassification,
        **VIT_ROW,
    ),
    ModelCase(
        "swin-base",
        "swin",
        SwinMoGEModel,
        swin_config,
        _without_labels(_images),
        "AutoModel",
        None,
        generative=False,
        dense_class=SwinModel,
        **SWIN_ROW,
    ),
    ModelCase(
        "swin-cls",
        "swin",
        SwinMoGEForImageClassification,
        swin_config,
        _images,
        "AutoModelForImageClassification",
        "image-classification",
        generative=False,
        dense_class=SwinForImageClassification,
        **SWIN_ROW,
    ),
    ModelCase(
        "qwen3_moe",
        "qwen3_moe",
        Qwen3MoeForCausalLM,
        lambda **kw: Qwen3MoeConfig(
            **{**MOE_COMMON, "num_experts": 8, "moe_intermediate_size": 16, "head_dim": 8, **kw}
        ),
        _moe_batch,
        "AutoModelForCausalLM",
        "causal-lm",
        generative=True,
    ),
    ModelCase(
        "olmoe",
        "olmoe",
        OlmoeForCausalLM,
        lambda **kw: OlmoeConfig(**{**MOE_COMMON, "num_experts": 8, **kw}),
        _moe_batch,
        "AutoModelForCausalLM",
        "causal-lm",
        generative=True,
    ),
    ModelCase(
        "mixtral",
        "mixtral",
        MixtralForCausalLM,
        lambda **kw: MixtralConfig(**{**MOE_COMMON, "num_local_experts": 8, "head_dim": 8, **kw}),
        _moe_batch,
        "AutoModelForCausalLM",
        "causal-lm",
        generative=True,
    ),
)


def moge_blocks_by_path(model: PreTrainedModel) -> dict[str, MoGESparseMoeBlock]:
    """The MoGE blocks of `model`'s base model by their path in it: the path of the dense MLP each one replaced."""
    return {
        name: module for name, module in model.base_model.named_modules() if isinstance(module, MoGESparseMoeBlock)
    }


def dense_mlp_weights(mlp: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """`(up, up_bias, down, down_bias)` of a dense MLP in the experts' (out, in) layout: its two projections in the
    order it registers them, `nn.Linear` (out, in) or transformers' `Conv1D` (in, out, GPT-2's)."""
    projections = [module for module in mlp.children() if isinstance(module, (torch.nn.Linear, Conv1D))]
    if len(projections) != 2:
        raise ValueError(f"{type(mlp).__name__}: expected two projections (up, down), found {projections}")
    weights = []
    for projection in projections:
        weights += [projection.weight if isinstance(projection, torch.nn.Linear) else projection.weight.T]
        weights += [projection.bias]
    return tuple(weights)


def case_names(
    *,
    moge_hf: bool | None = None,
    head: bool | None = None,
    family: str | None = None,
    task: str | None = None,
    generative: bool | None = None,
    per_family: bool = False,
) -> list[str]:
    """The names of the cases that match: moge_hf models or transformers MoE models, with or without a head, of a
    family, a task, generative or not. `per_family`: only the first match of each family (for expensive checks, where
    another head of the same family adds nothing), a head model where the family has one."""
    names = [
        name
        for name, case in CASES.items()
        if (moge_hf is None or case.moge_hf == moge_hf)
        and (head is None or (case.task is not None) == head)
        and (family is None or case.family == family)
        and (task is None or case.task == task)
        and (generative is None or case.generative == generative)
    ]
    if per_family:
        names.sort(key=lambda name: CASES[name].task is None)  # stable: heads first, in the table's order
        first = {}
        for name in names:
            first.setdefault(CASES[name].family, name)
        names = [name for name in CASES if name in first.values()]
    return names


def first_case(**filters) -> str:
    """The first case that matches `case_names(**filters)`, for a check that runs on one model with these properties;
    a table without one is an error, not a silently skipped test."""
    names = case_names(**filters)
    if not names:
        raise LookupError(f"tests/tiny.py: no case with {filters}")
    return names[0]
