import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moge_hf  # noqa: F401  (registers the MoGE model types, e.g. "gpt2_moge", with the Auto classes)


# fmt: off
config = AutoConfig.for_model(
    "gpt2_moge", n_layer=4, n_embd=64, n_head=4,  # a tiny GPT-2; layers 1 and 3 become MoGE layers
    num_experts=16, num_experts_per_tok=2, moge_map_shape=[4, 4], moge_window=3,  # 16 experts on a 4x4 map
    moge_loss_coef=1e-2, moge_sigma=1.0,  # lambda and sigma of the group-sparsity regularizer
)
# fmt: on
model = AutoModelForCausalLM.from_config(config)
input_ids = torch.randint(0, config.vocab_size, (2, 32))
out = model(input_ids, labels=input_ids)  # loss = LM loss + 0.01 * aux_loss + lambda * moge_loss
print(f"loss {out.loss.item():.3f}  aux_loss {out.aux_loss.item():.3f}  moge_loss {out.moge_loss.item():.4f}")
out.loss.backward()  # trains like any transformers model
