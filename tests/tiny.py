"""Tiny MoGE configs and inputs shared by the tests (hidden 32, 2-4 layers, 4 heads, batch 13, seq 7)."""

import torch
from transformers import TrainingArguments

from moge_hf import GPT2MoGEConfig, ViTMoGEConfig


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
