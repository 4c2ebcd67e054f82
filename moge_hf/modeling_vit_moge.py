"""ViT MoGE: `ViTModel` and `ViTForImageClassification` whose MLPs in `config.moe_layers` are MoGE layers
(`moge_layer.py`). Everything else is transformers' ViT. The file ends with the family's record.

Kept free of anything but `torch`, `transformers` and sibling files: `save_pretrained` copies it with the files it
imports relatively, so that the folder loads with `trust_remote_code=True`.
"""

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTForImageClassification, ViTModel, ViTPreTrainedModel
from transformers.utils.generic import can_return_tuple

from .configuration_moge import ViTMoGEConfig
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


__all__ = ["ViTMoGEForImageClassification", "ViTMoGEModel", "ViTMoGEPreTrainedModel"]


ViTMoGEModelOutput = _with_routing_fields(
    "ViTMoGEModelOutput",
    BaseModelOutputWithPooling,
    "Outputs of [`ViTMoGEModel`]: those of `ViTModel`, plus the routing fields.",
    __name__,
)
ViTMoGEImageClassifierOutput = _with_routing_fields(
    "ViTMoGEImageClassifierOutput",
    ImageClassifierOutput,
    "Outputs of [`ViTMoGEForImageClassification`]: those of `ViTForImageClassification`, plus the routing fields. "
    "`loss` (when `labels` are given) is the classification loss plus the weighted routing losses.",
    __name__,
)


class ViTMoGEPreTrainedModel(MoGEModelMixin, ViTPreTrainedModel):
    config_class = ViTMoGEConfig
    config: ViTMoGEConfig


class ViTMoGEModel(ViTMoGEPreTrainedModel, ViTModel):
    """`ViTModel` whose MLPs in `config.moe_layers` are MoGE layers; returns the routing losses too."""

    def __init__(self, config: ViTMoGEConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        self._build(ViTModel, config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ViTMoGEModelOutput:
        r"""Arguments of `ViTModel.forward`, plus `output_router_logits` (default: `config.output_router_logits`)."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        return self._moge_forward(
            ViTModel.forward,
            ViTMoGEModelOutput,
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            output_router_logits=output_router_logits,
            **kwargs,
        )


class ViTMoGEForImageClassification(ViTMoGEPreTrainedModel, ViTForImageClassification):
    """ViT MoGE with a linear classifier on the [CLS] token, like `ViTForImageClassification`.

    Example:

    ```python
    >>> import torch
    >>> from moge_hf import ViTMoGEConfig, ViTMoGEForImageClassification
    >>> config = ViTMoGEConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64,
    ...                        num_attention_heads=4, intermediate_size=128, num_experts=4, moge_window=2,
    ...                        num_labels=10)
    >>> model = ViTMoGEForImageClassification(config)
    >>> out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 7]))
    ```
    """

    # The classification loss is a mean over the batch: let Trainer divide it by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: ViTMoGEConfig):
        ViTPreTrainedModel.__init__(self, config)  # not the parent's __init__: it builds a dense ViTModel
        self.num_labels = config.num_labels
        self.vit = ViTMoGEModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ViTMoGEImageClassifierOutput:
        r"""Arguments of `ViTForImageClassification.forward`, plus `output_router_logits`.

        With `labels`, `loss` is the classification loss (by `config.problem_type`) plus the weighted routing losses.
        """
        outputs: ViTMoGEModelOutput = self.vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
            loss = self._add_routing_losses(loss, outputs, labels, kwargs)

        return ViTMoGEImageClassifierOutput(
            loss=loss, logits=logits, **_passed_through(outputs, ViTMoGEImageClassifierOutput)
        )


# ------------------------------------------------------------------------------------------------------------------
# The record
# ------------------------------------------------------------------------------------------------------------------


def _card_rows(config: dict) -> list[tuple[str, object]]:
    return [
        ("layers", config.get("num_hidden_layers")),
        ("hidden size", config.get("hidden_size")),
        ("attention heads", config.get("num_attention_heads")),
        ("image size", f"{config.get('image_size')} x {config.get('image_size')}"),
        ("patch size", config.get("patch_size")),
    ]


VIT_MOGE = register_host(
    MoGEHost(
        config_class=ViTMoGEConfig,
        display_name="ViT",
        heads={
            "AutoModel": MoGEHead(
                ViTMoGEModel, ViTModel, "image-feature-extraction", "base", "base model (hidden states, no head)"
            ),
            "AutoModelForImageClassification": MoGEHead(
                ViTMoGEForImageClassification,
                ViTForImageClassification,
                "image-classification",
                "image-classification",
                "image classifier",
            ),
        },
        dense_model_type="vit",
        # ViTLayer applies the dropout after its MLP, so the MoGE block has none of its own.
        mlp=MoGEMLP(layers="layers.*", module="mlp", up_proj="fc1", down_proj="fc2", activation="hidden_act"),
        small_config={
            "image_size": 32,
            "patch_size": 4,
            "num_hidden_layers": 6,
            "hidden_size": 192,
            "num_attention_heads": 3,
            "intermediate_size": 768,
        },
        dropout_fields=("hidden_dropout_prob", "attention_probs_dropout_prob"),
        optional_base_parts={"add_pooling_layer": "pooler", "use_mask_token": "embeddings.mask_token"},
        card=HostCard(
            tag="vit",
            rows=_card_rows,
            intro="Vision Transformer (ViT)",
            tokens="each image patch and the [CLS] token",
            snippet=IMAGE_CARD_SNIPPET,
            preprocessing=IMAGE_CARD_PREPROCESSING,
            limitations="""
                - A small research model from a MoGE study, not a product: its only evaluation is what this card
                  reports, and it should only be trusted on images like those it was trained on.
                - It expects {{ config.image_size }} x {{ config.image_size }} images with {{ config.num_channels }}
                  channels (patches of {{ config.patch_size }} pixels); other sizes need
                  `interpolate_pos_encoding=True`, which it was not trained with.
                """,
        ),
    )
)
