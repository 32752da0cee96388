"""A BERT classifier that reads a text as a sentence encoder does: the mean of its token vectors
(padding left out), scaled to unit length, then a linear head.

all-MiniLM-L6-v2 was trained to be read this way; `BertForSequenceClassification` reads the `[CLS]`
token through a pooler layer that MiniLM's training never shaped, and with 800 labels it scored
below MiniLM's own sentence embeddings (BENCHMARKS.md). This file imports only torch and
transformers: it is copied into every saved student, so that a plain transformers user loads one
with `AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`, and
`pipeline("text-classification", model=folder, trust_remote_code=True)` reads a text as pgkd does (the
pipeline named in the config's `custom_pipelines`, which truncates by default).
"""
from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, BertPreTrainedModel, TextClassificationPipeline
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingBertConfig(BertConfig):
    # Its own model type: a folder of this model is never silently read as a [CLS]-pooled BERT.
    model_type = "pgkd-mean-pooling-bert"

    def __init__(self, **kwargs):
        kwargs.setdefault("auto_map", {
            "AutoConfig": "mean_pooling.MeanPoolingBertConfig",
            "AutoModelForSequenceClassification": "mean_pooling.MeanPoolingBertForSequenceClassification"})
        # transformers' text-classification pipeline has no saved setting that truncates by default; a
        # custom pipeline does (it needs trust_remote_code=True, as the model does).
        kwargs.setdefault("custom_pipelines", {"text-classification": {
            "impl": "mean_pooling.MeanPoolingTextClassificationPipeline",
            "pt": ["AutoModelForSequenceClassification"], "type": "text"}})
        super().__init__(**kwargs)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The unit-length mean of the non-padding token vectors (all-MiniLM-L6-v2's sentence embedding)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


class MeanPoolingBertForSequenceClassification(BertPreTrainedModel):
    config_class = MeanPoolingBertConfig

    def __init__(self, config: MeanPoolingBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.classifier(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class MeanPoolingTextClassificationPipeline(TextClassificationPipeline):
    """transformers' text-classification pipeline, truncating by default as pgkd does: a text longer than
    the tokenizer's `model_max_length` (pgkd's 128 tokens) is read by its first tokens, as `pgkd predict`
    reads it, instead of crashing past the position embeddings. `truncation=False` asks for the stock one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("truncation", True)
        super().__init__(*args, **kwargs)
