"""Swin MoGE: `SwinModel` and `SwinForImageClassification` whose MLPs in `config.moe_layers` (counted over the blocks
of all stages) are MoGE layers (`moge_layer.py`). Everything else is transformers' Swin: shifted-window attention,
patch merging between stages, stages whose widths double (so do the experts). The file ends with the family's record.

Kept free of anything but `torch`, `transformers` and sibling files: `save_pretrained` copies it with the files it
imports relatively, so that the folder loads with `trust_remote_code=True`.
"""

import torch
from torch import nn
from transformers.models.swin.modeling_swin import (
    SwinForImageClassification,
    SwinImageClassifierOutput,
    SwinModel,
    SwinModelOutput,
    SwinPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from .configuration_moge import SwinMoGEConfig
from .moge_model import (
    IMAGE_CARD_PREPROCESSING,
    IMAGE_CARD_SNIPPET,
    HostCard,
    MoGEHead,
    MoGEHost,
    MoGEMLP,
    MoGEModelMixin,
    _passed_through,
    _with_routing_fields,
    register_host,
)


__all__ = ["SwinMoGEForImageClassification", "SwinMoGEModel", "SwinMoGEPreTrainedModel"]


SwinMoGEModelOutput = _with_routing_fields(
    "SwinMoGEModelOutput",
    SwinModelOutput,
    "Outputs of [`SwinMoGEModel`]: those of `SwinModel`, plus the routing fields.",
    __name__,
)
SwinMoGEImageClassifierOutput = _with_routing_fields(
    "SwinMoGEImageClassifierOutput",
    SwinImageClassifierOutput,
    "Outputs of [`SwinMoGEForImageClassification`]: those of `SwinForImageClassification`, plus the routing fields. "
    "`loss` (when `labels` are given) is the classification loss plus the weighted routing losses.",
    __name__,
)


class SwinMoGEPreTrainedModel(MoGEModelMixin, SwinPreTrainedModel):
    config_class = SwinMoGEConfig
    config: SwinMoGEConfig


class SwinMoGEModel(SwinMoGEPreTrainedModel, SwinModel):
    """`SwinModel` whose MLPs in `config.moe_layers` are MoGE layers; returns the routing losses too."""

    def __init__(self, config: SwinMoGEConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        self._build(SwinModel, config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> SwinMoGEModelOutput:
        r"""Arguments of `SwinModel.forward`, plus `output_router_logits` (default: `config.output_router_logits`)."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        return self._moge_forward(
            SwinModel.forward,
            SwinMoGEModelOutput,
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_router_logits=output_router_logits,
            **kwargs,
        )


class SwinMoGEForImageClassification(SwinMoGEPreTrainedModel, SwinForImageClassification):
    """Swin MoGE with a linear classifier on the average-pooled last stage, like `SwinForImageClassification`."""

    # The classification loss is a mean over the batch: let Trainer divide it by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: SwinMoGEConfig):
        SwinPreTrainedModel.__init__(self, config)  # not the parent's __init__: it builds a dense SwinModel
        self.num_labels = config.num_labels
        self.swin = SwinMoGEModel(config)
        self.classifier = (
            nn.Linear(self.swin.num_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> SwinMoGEImageClassifierOutput:
        r"""Arguments of `SwinForImageClassification.forward`, plus `output_router_logits`.

        With `labels`, `loss` is the classification loss (by `config.problem_type`) plus the weighted routing losses.
        """
        outputs: SwinMoGEModelOutput = self.swin(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        logits = self.classifier(outputs.pooler_output)

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
            loss = self._add_routing_losses(loss, outputs, labels, kwargs)

        return SwinMoGEImageClassifierOutput(
            loss=loss, logits=logits, **_passed_through(outputs, SwinMoGEImageClassifierOutput)
        )


# ------------------------------------------------------------------------------------------------------------------
# The record
# ------------------------------------------------------------------------------------------------------------------


def _card_rows(config: dict) -> list[tuple[str, object]]:
    return [
        ("stages (blocks per stage)", config.get("depths")),
        ("hidden size (first stage, doubled per stage)", config.get("embed_dim")),
        ("attention heads per stage", config.get("num_heads")),
        ("window size", config.get("window_size")),
        ("image size", f"{config.get('image_size')} x {config.get('image_size')}"),
        ("patch size", config.get("patch_size")),
    ]


SWIN_MOGE = register_host(
    MoGEHost(
        config_class=SwinMoGEConfig,
        display_name="Swin",
        heads={
            "AutoModel": MoGEHead(
                SwinMoGEModel, SwinModel, "image-feature-extraction", "base", "base model (hidden states, no head)"
            ),
            "AutoModelForImageClassification": MoGEHead(
                SwinMoGEForImageClassification,
                SwinForImageClassification,
                "image-classification",
                "image-classification",
                "image classifier",
            ),
        },
        dense_model_type="swin",
        # SwinLayer applies the dropout after its MLP, so the MoGE block has none of its own.
        mlp=MoGEMLP(
            layers="encoder.layers.*.blocks.*", module="mlp", up_proj="fc1", down_proj="fc2", activation="hidden_act"
        ),
        small_config={
            "image_size": 32,
            "patch_size": 2,
            "embed_dim": 48,
            "depths": [2, 2, 2],
            "num_heads": [3, 6, 12],
            "window_size": 4,
        },
        dropout_fields=("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"),
        optional_base_parts={"add_pooling_layer": "pooler", "use_mask_token": "embeddings.mask_token"},
        card=HostCard(
            tag="swin",
            rows=_card_rows,
            intro="Swin Transformer",
            tokens="each image patch of every stage (patches merge between stages)",
            snippet=IMAGE_CARD_SNIPPET,
            preprocessing=IMAGE_CARD_PREPROCESSING,
            limitations="""
                - A small research model from a MoGE study, not a product: its only evaluation is what this card
                  reports, and it should only be trusted on images like those it was trained on.
                - It was trained on {{ config.image_size }} x {{ config.image_size }} images with
                  {{ config.num_channels }} channels (patches of {{ config.patch_size }} pixels).
                """,
        ),
    )
)
