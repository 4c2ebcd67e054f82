"""Where the MoGE models lived up to moge_hf 0.1.0, kept so that old imports and old saved folders keep working.

The models are now in `modeling_gpt2_moge.py` and `modeling_vit_moge.py` (the shared machinery in `moge_model.py`).
Folders saved by 0.1.0 name this module in their `auto_map` (`modeling_moge.GPT2MoGELMHeadModel`, ...);
`python -m moge_hf.upgrade_code <folder>` writes this file with the new ones into such a folder, so that it loads with
`trust_remote_code=True` without a change to its `config.json`.
"""

from .modeling_gpt2_moge import (
    GPT2MoGEForSequenceClassification,
    GPT2MoGELMHeadModel,
    GPT2MoGEModel,
    GPT2MoGEPreTrainedModel,
)
from .modeling_vit_moge import ViTMoGEForImageClassification, ViTMoGEModel, ViTMoGEPreTrainedModel
from .moge_layer import MoGEExperts, MoGERouter, MoGERouting, MoGESparseMoeBlock
from .moge_model import EXPERTS_IMPLEMENTATIONS


__all__ = [
    "EXPERTS_IMPLEMENTATIONS",
    "GPT2MoGEForSequenceClassification",
    "GPT2MoGELMHeadModel",
    "GPT2MoGEModel",
    "GPT2MoGEPreTrainedModel",
    "MoGEExperts",
    "MoGERouter",
    "MoGERouting",
    "MoGESparseMoeBlock",
    "ViTMoGEForImageClassification",
    "ViTMoGEModel",
    "ViTMoGEPreTrainedModel",
]
