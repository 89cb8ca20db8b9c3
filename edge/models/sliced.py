"""A task model partitioned before training (TEESlice): a public backbone plus private slices.

Every linear layer of the encoder is `Adapted`: `base` holds the published backbone's weight W0 (frozen,
public: it may run anywhere), and a low-rank adapter x B^T A^T -- the owner's private slice -- is added to it.
The encoder's biases and LayerNorms, the adapters and the task head are trained; only they differ from the
published all-MiniLM-L6-v2. `public_linears` names the layers whose weights are the public ones.
"""
from __future__ import annotations

from torch import nn

from edge.models.bert import BertClassifier, BertConfig


class Adapted(nn.Module):
    """y = x W0^T + b + (x B^T) A^T: W0 public (`base.weight`), B (`down`, rank x in), A (`up`, out x rank) and b private."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)    # starts as the public layer

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class SlicedClassifier(BertClassifier):
    """BertClassifier whose encoder linears carry private low-rank adapters."""

    def __init__(self, config: BertConfig, num_labels: int = 2, rank: int = 8):
        super().__init__(config, num_labels)
        self.rank = rank
        for layer in self.bert.encoder.layer:
            for parent, attr in adapted_slots(layer):
                setattr(parent, attr, Adapted(getattr(parent, attr), rank))

    def public_linears(self) -> set[str]:
        """Module paths of the linears whose weights are the public backbone's (what may be outsourced)."""
        return {f"{name}.base" for name, m in self.named_modules() if isinstance(m, Adapted)}

    def public_state_names(self) -> set[str]:
        """State-dict entries copied from the published backbone and never trained."""
        emb = {f"bert.embeddings.{t}.weight" for t in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
        return emb | {f"{p}.weight" for p in self.public_linears()}


def adapted_slots(layer) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every linear in a BertLayer."""
    a = layer.attention
    return [(a.self, "query"), (a.self, "key"), (a.self, "value"), (a.output, "dense"),
            (layer.intermediate, "dense"), (layer.output, "dense")]


def from_public(backbone, num_labels: int, rank: int) -> SlicedClassifier:
    """A sliced classifier on a published BertModel (its weights copied), adapters at zero, head untrained."""
    model = SlicedClassifier(backbone.config, num_labels, rank)
    public = backbone.state_dict()
    names = {k: k.removeprefix("bert.").replace(".base.", ".") for k in model.state_dict()}
    model.load_state_dict({k: public[p] for k, p in names.items() if p in public}, strict=False)
    return model
