"""moge_hf: Mixture of Group Experts (MoGE) for Hugging Face transformers.

Importing the package registers the MoGE configs and models with the Auto classes (safe to repeat) and marks them
for `save_pretrained` to write their code and `auto_map`, so saved folders load with `trust_remote_code=True`.
"""

import transformers
from transformers import AutoConfig

from . import diagnostics
from .configuration_moge import GPT2MoGEConfig, SwinMoGEConfig, ViTMoGEConfig
from .hub import (
    HubTokenError,
    MoGEHubCallback,
    add_moge_hub_callback,
    check_moge_model_dir,
    prepare_upload_folder,
    push_model_dir,
    render_model_card,
)
from .losses import default_map_shape, group_sparsity_loss, group_window_matrix, load_balancing_loss, router_z_loss
from .modeling_gpt2_moge import (
    GPT2MoGEForSequenceClassification,
    GPT2MoGELMHeadModel,
    GPT2MoGEModel,
    GPT2MoGEPreTrainedModel,
)
from .modeling_swin_moge import SwinMoGEForImageClassification, SwinMoGEModel, SwinMoGEPreTrainedModel
from .modeling_vit_moge import ViTMoGEForImageClassification, ViTMoGEModel, ViTMoGEPreTrainedModel
from .moge_layer import GroupSparsityRegularizer, MoGEExperts, MoGERouter, MoGESparseMoeBlock, set_moge_sigma
from .moge_model import HOSTS
from .training import (
    MoGEArguments,
    MoGERoutingMetrics,
    MoGESigmaCallback,
    MoGESigmaSchedule,
    add_moge_callback,
    annealed_sigma,
)
from .transformers_moe import add_moge_regularizer, describe_routing
from .upcycling import upcycle_to_moe


__version__ = "0.2.0"

__all__ = [
    "diagnostics",
    "HubTokenError",
    "MoGEHubCallback",
    "add_moge_hub_callback",
    "check_moge_model_dir",
    "prepare_upload_folder",
    "push_model_dir",
    "render_model_card",
    "GPT2MoGEConfig",
    "GPT2MoGEForSequenceClassification",
    "GPT2MoGELMHeadModel",
    "GPT2MoGEModel",
    "GPT2MoGEPreTrainedModel",
    "MoGEArguments",
    "MoGEExperts",
    "MoGERouter",
    "MoGERoutingMetrics",
    "MoGESigmaCallback",
    "MoGESigmaSchedule",
    "MoGESparseMoeBlock",
    "SwinMoGEConfig",
    "SwinMoGEForImageClassification",
    "SwinMoGEModel",
    "SwinMoGEPreTrainedModel",
    "ViTMoGEConfig",
    "ViTMoGEForImageClassification",
    "ViTMoGEModel",
    "ViTMoGEPreTrainedModel",
    "add_moge_callback",
    "add_moge_regularizer",
    "describe_routing",
    "upcycle_to_moe",
    "GroupSparsityRegularizer",
    "set_moge_sigma",
    "annealed_sigma",
    "default_map_shape",
    "group_sparsity_loss",
    "group_window_matrix",
    "load_balancing_loss",
    "router_z_loss",
]


def _register() -> None:
    for host in HOSTS.values():
        AutoConfig.register(host.model_type, host.config_class, exist_ok=True)
        host.config_class.register_for_auto_class()
        for auto_name, model_class in host.auto_classes.items():
            getattr(transformers, auto_name).register(host.config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_name)


_register()
