"""Where the MoGE models lived up to moge_hf 0.1.0, kept so that its public names (the models, their outputs, the
layer classes, `AUTO_MODEL_CLASSES`, `EXPERTS_IMPLEMENTATIONS`) and old saved folders keep working.

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
    MoGECausalLMOutputWithPast,
    MoGEModelOutputWithPast,
    MoGESequenceClassifierOutputWithPast,
)
from .modeling_vit_moge import (
    ViTMoGEForImageClassification,
    ViTMoGEImageClassifierOutput,
    ViTMoGEModel,
    ViTMoGEModelOutput,
    ViTMoGEPreTrainedModel,
)
from .moge_layer import MoGEExperts, MoGERouter, MoGERouting, MoGESparseMoeBlock
from .moge_model import EXPERTS_IMPLEMENTATIONS, HOSTS, MoGEModelMixin


# 0.1.0's table of the Auto classes of each family, now read from the host records.
AUTO_MODEL_CLASSES = {model_type: host.auto_classes for model_type, host in HOSTS.items()}


__all__ = [
    "AUTO_MODEL_CLASSES",
    "EXPERTS_IMPLEMENTATIONS",
    "MoGECausalLMOutputWithPast",
    "MoGEModelMixin",
    "MoGEModelOutputWithPast",
    "MoGESequenceClassifierOutputWithPast",
    "ViTMoGEImageClassifierOutput",
    "ViTMoGEModelOutput",
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
