"""GPT-2 MoGE: `GPT2Model`, `GPT2LMHeadModel` and `GPT2ForSequenceClassification` whose MLPs in `config.moe_layers` are
MoGE layers (`moge_layer.py`). Everything else (attention implementations, the KV cache and `generate`, gradient
checkpointing, weight init, embedding resizing) is transformers' GPT-2. The file ends with the family's record.

Kept free of anything but `torch`, `transformers` and sibling files: `save_pretrained` copies it with the files it
imports relatively, so that the folder loads with `trust_remote_code=True`.
"""

import math

import torch
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    SequenceClassifierOutputWithPast,
)
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from .configuration_moge import GPT2MoGEConfig
from .moge_model import (
    HostCard,
    MoGEHead,
    MoGEHost,
    MoGEMLP,
    MoGEModelMixin,
    _passed_through,
    _with_routing_fields,
    register_host,
)


__all__ = [
    "GPT2MoGEForSequenceClassification",
    "GPT2MoGELMHeadModel",
    "GPT2MoGEModel",
    "GPT2MoGEPreTrainedModel",
]


MoGEModelOutputWithPast = _with_routing_fields(
    "MoGEModelOutputWithPast",
    BaseModelOutputWithPastAndCrossAttentions,
    "Outputs of [`GPT2MoGEModel`]: those of `GPT2Model`, plus the routing fields.",
    __name__,
)
MoGECausalLMOutputWithPast = _with_routing_fields(
    "MoGECausalLMOutputWithPast",
    CausalLMOutputWithCrossAttentions,
    "Outputs of [`GPT2MoGELMHeadModel`]: those of `GPT2LMHeadModel`, plus the routing fields. `loss` (when `labels` "
    "are given) is the language-modeling loss plus the weighted routing losses.",
    __name__,
)
MoGESequenceClassifierOutputWithPast = _with_routing_fields(
    "MoGESequenceClassifierOutputWithPast",
    SequenceClassifierOutputWithPast,
    "Outputs of [`GPT2MoGEForSequenceClassification`]: those of `GPT2ForSequenceClassification`, plus the routing "
    "fields. `loss` (when `labels` are given) is the classification loss plus the weighted routing losses.",
    __name__,
)


class GPT2MoGEPreTrainedModel(MoGEModelMixin, GPT2PreTrainedModel):
    config_class = GPT2MoGEConfig
    config: GPT2MoGEConfig


class GPT2MoGEModel(GPT2MoGEPreTrainedModel, GPT2Model):
    """`GPT2Model` whose MLPs in `config.moe_layers` are MoGE layers; returns the routing losses too."""

    def __init__(self, config: GPT2MoGEConfig):
        self._build(GPT2Model, config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoGEModelOutputWithPast:
        r"""Arguments of `GPT2Model.forward`, plus `output_router_logits` (defaults to `config.output_router_logits`).

        The KV cache, `use_cache` and the other arguments go to `GPT2Model.forward` as given: the cache under the name
        the installed transformers uses (`CACHE_NAME`: `cache` since 5.24, `past_key_values` before). Padding tokens
        (`attention_mask == 0`, given as a 2-D mask) take no part in the routing losses.
        """
        inputs = input_ids if input_ids is not None else inputs_embeds
        if inputs is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        new_tokens = tuple(inputs.shape[:2]) if inputs.dim() > 1 else (1, inputs.shape[0])
        self._check_positions(new_tokens[1], self._cached_length(kwargs), position_ids)
        return self._moge_forward(
            GPT2Model.forward,
            MoGEModelOutputWithPast,
            input_ids,
            attention_mask=attention_mask,
            new_tokens=new_tokens,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            output_router_logits=output_router_logits,
            **kwargs,
        )

    def _check_positions(self, seq_length: int, past_length: int, position_ids: torch.Tensor | None):
        max_positions = self.config.n_positions
        if position_ids is not None:
            if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= max_positions:
                raise ValueError(
                    f"position_ids reach {int(position_ids.max())}, but the model has n_positions={max_positions} "
                    "position embeddings"
                )
            return
        if past_length + seq_length > max_positions:
            raise ValueError(
                f"The sequence is {past_length + seq_length} tokens long ({seq_length} new + {past_length} cached), "
                f"longer than the model's n_positions={max_positions}; truncate the input"
            )


class GPT2MoGELMHeadModel(GPT2MoGEPreTrainedModel, GPT2LMHeadModel, GenerationMixin):
    """GPT-2 MoGE with a language-modeling head tied to the input embeddings; `generate` works as for GPT-2.

    Example:

    ```python
    >>> import torch
    >>> from moge_hf import GPT2MoGEConfig, GPT2MoGELMHeadModel
    >>> model = GPT2MoGELMHeadModel(GPT2MoGEConfig(n_layer=2, n_embd=64, n_head=4, num_experts=4, moge_window=2))
    >>> ids = torch.randint(0, 100, (2, 16))
    >>> out = model(ids, labels=ids)
    >>> out.loss, out.aux_loss, out.moge_loss
    ```
    """

    def __init__(self, config: GPT2MoGEConfig):
        GPT2PreTrainedModel.__init__(self, config)  # not GPT2LMHeadModel.__init__: it builds a dense GPT2Model
        self.transformer = GPT2MoGEModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoGECausalLMOutputWithPast:
        r"""Arguments of `GPT2LMHeadModel.forward` (the KV cache under `CACHE_NAME`), plus `output_router_logits`.

        With `labels`, `loss` is the shifted language-modeling loss plus `router_aux_loss_coef * aux_loss +
        router_z_loss_coef * z_loss + moge_loss_coef * moge_loss`, in training and in evaluation alike.
        """
        outputs: MoGEModelOutputWithPast = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = self._add_routing_losses(loss, outputs, labels, kwargs)

        return MoGECausalLMOutputWithPast(
            loss=loss, logits=logits, **_passed_through(outputs, MoGECausalLMOutputWithPast)
        )


class GPT2MoGEForSequenceClassification(GPT2MoGEPreTrainedModel, GPT2ForSequenceClassification):
    """GPT-2 MoGE with a linear head on the last non-padding token, like `GPT2ForSequenceClassification`."""

    # The classification loss is a mean over the batch, not a sum over `num_items_in_batch`: let Trainer divide it
    # (and the routing losses) by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: GPT2MoGEConfig):
        GPT2PreTrainedModel.__init__(self, config)  # not the parent's __init__: it builds a dense GPT2Model
        self.num_labels = config.num_labels
        self.transformer = GPT2MoGEModel(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoGESequenceClassifierOutputWithPast:
        r"""Arguments of `GPT2ForSequenceClassification.forward`, plus `output_router_logits`.

        With `labels`, `loss` is the classification loss (by `config.problem_type`) plus the weighted routing losses.
        """
        outputs: MoGEModelOutputWithPast = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # (B, S, num_labels)
        batch_size = logits.shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (set config.pad_token_id).")
        if self.config.pad_token_id is None or input_ids is None:
            last_token = -1
        else:
            # The rightmost token that is not padding, for left and right padding alike.
            non_pad = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_token = (positions * non_pad).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]  # (B, num_labels)

        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=pooled_logits, config=self.config)
            loss = self._add_routing_losses(loss, outputs, labels, kwargs)

        return MoGESequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_logits, **_passed_through(outputs, MoGESequenceClassifierOutputWithPast)
        )


# ------------------------------------------------------------------------------------------------------------------
# The record
# ------------------------------------------------------------------------------------------------------------------


def _card_rows(config: dict) -> list[tuple[str, object]]:
    return [
        ("layers", config.get("n_layer")),
        ("hidden size", config.get("n_embd")),
        ("attention heads", config.get("n_head")),
        ("context length (`n_positions`)", config.get("n_positions")),
        ("vocabulary", config.get("vocab_size")),
    ]


GPT2_MOGE = register_host(
    MoGEHost(
        config_class=GPT2MoGEConfig,
        display_name="GPT-2",
        heads={
            "AutoModel": MoGEHead(
                GPT2MoGEModel, GPT2Model, "feature-extraction", "base", "base model (hidden states, no head)"
            ),
            "AutoModelForCausalLM": MoGEHead(
                GPT2MoGELMHeadModel, GPT2LMHeadModel, "text-generation", "causal-lm", "causal language model"
            ),
            "AutoModelForSequenceClassification": MoGEHead(
                GPT2MoGEForSequenceClassification,
                GPT2ForSequenceClassification,
                "text-classification",
                "sequence-classification",
                "sequence classifier",
            ),
        },
        dense_model_type="gpt2",
        mlp=MoGEMLP(
            layers="h.*",
            module="mlp",
            up_proj="c_fc",
            down_proj="c_proj",
            activation="activation_function",
            dropout="resid_pdrop",
            conv1d=True,
            # GPT-2's scaled init of the residual projections (1 / sqrt(2 * n_layer)), for the experts too.
            residual_std=lambda config: config.initializer_range / math.sqrt(2 * config.n_layer),
        ),
        small_config={"n_layer": 4, "n_embd": 128, "n_head": 4},
        dropout_fields=("resid_pdrop", "embd_pdrop", "attn_pdrop"),
        optional_base_parts={},
        card=HostCard(
            tag="gpt2",
            rows=_card_rows,
            intro="GPT-2",
            tokens="each token of the text",
            snippet="""
                from transformers import {{ model.auto_class }}, AutoTokenizer
                {%- if head.kind != "base" %}, pipeline{% endif %}

                repo_id = "{{ model.repo_id }}"

                {% if head.kind == "causal-lm" -%}
                generator = pipeline("text-generation", model=repo_id, trust_remote_code=True)
                print(generator("Once upon a time", max_new_tokens=20)[0]["generated_text"])

                # or step by step
                tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
                model = {{ model.auto_class }}.from_pretrained(repo_id, trust_remote_code=True)
                inputs = tokenizer("Once upon a time", return_tensors="pt")
                print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
                {% elif head.kind == "sequence-classification" -%}
                classifier = pipeline("text-classification", model=repo_id, trust_remote_code=True)
                print(classifier("Once upon a time"))

                # or step by step
                tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
                model = {{ model.auto_class }}.from_pretrained(repo_id, trust_remote_code=True)
                logits = model(**tokenizer("Once upon a time", return_tensors="pt")).logits
                {% else -%}
                tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
                model = {{ model.auto_class }}.from_pretrained(repo_id, trust_remote_code=True)
                hidden_states = model(**tokenizer("Once upon a time", return_tensors="pt")).last_hidden_state
                {% endif -%}
                """,
            preprocessing="""
                This repository holds no tokenizer files: use the tokenizer the model was trained with (its vocabulary
                has {{ config.vocab_size }} tokens).
                """,
            limitations="""
                - A small research model from a MoGE study, not a product: it has not been evaluated for safety, bias
                  or factuality, and it reflects whatever its training text contains.
                  {%- if head.kind == "causal-lm" %} Do not use its generations as facts.{% endif %}
                - The context is at most {{ config.n_positions }} tokens (`n_positions`); longer inputs raise an error.
                """,
        ),
    )
)
