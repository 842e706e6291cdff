"""Concept tokens (`<new1>`, `<new2>`, ...): added to the tokenizer up front, each with its own embedding row.

The text encoder's table stays frozen; every new token's row is a separate parameter, so the rows of
finished concepts can be frozen and kept out of the optimizer (and out of its weight decay) while the
current concept's row trains. Rows start as a copy of a rare token's embedding (Custom Diffusion uses
id 42170, "ktn")."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConceptTokenEmbedding(nn.Module):
    """Drop-in for a text encoder's `nn.Embedding`: ids below `base_vocab` read the frozen table,
    ids `base_vocab + k` read `rows[k]`."""

    def __init__(self, base: nn.Embedding, num_tokens: int, init_token_id: int):
        super().__init__()
        if not 0 <= init_token_id < base.num_embeddings:
            raise ValueError(f"init_token_id {init_token_id} is outside the vocabulary (0..{base.num_embeddings - 1})")
        self.base = base
        self.base_vocab = base.num_embeddings
        self.base.requires_grad_(False)
        init = base.weight.detach()[init_token_id]
        # frozen until their task starts (the expert-freezing callback turns the current one on)
        self.rows = nn.ParameterList([nn.Parameter(init.clone(), requires_grad=False) for _ in range(num_tokens)])

    def forward(self, ids: Tensor) -> Tensor:
        out = self.base(ids.clamp(max=self.base_vocab - 1))
        is_new = ids >= self.base_vocab
        if not len(self.rows) or not bool(is_new.any()):
            return out
        table = torch.stack(list(self.rows)).to(out.dtype)
        new = table[(ids - self.base_vocab).clamp(min=0, max=len(self.rows) - 1)]
        return torch.where(is_new.unsqueeze(-1), new, out)


def add_concept_tokens(
    tokenizer, text_encoder: nn.Module, tokens: list[str], init_token_id: int
) -> ConceptTokenEmbedding:
    """Adds `tokens` to the tokenizer (ids must follow the base vocabulary) and swaps the text encoder's
    token embedding for a `ConceptTokenEmbedding`; returns it."""
    known = {**tokenizer.get_vocab(), **tokenizer.get_added_vocab()}
    clash = [t for t in tokens if t in known]
    if clash:
        raise ValueError(f"concept tokens {clash} are already in the vocabulary: choose other token names")
    embeddings = text_encoder.get_input_embeddings()
    base_vocab = embeddings.num_embeddings
    if len(tokenizer) != base_vocab:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the text encoder {base_vocab}: not a matching pair"
        )
    tokenizer.add_tokens(list(tokens))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if ids != list(range(base_vocab, base_vocab + len(tokens))):
        raise ValueError(f"concept tokens got ids {ids}, expected them right after the vocabulary")
    table = ConceptTokenEmbedding(embeddings, len(tokens), init_token_id)
    text_encoder.set_input_embeddings(table)
    return table
