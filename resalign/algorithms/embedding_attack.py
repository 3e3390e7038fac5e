"""The ``embedding`` attack: textual inversion against an unlearned model.

The attacker keeps every weight of the released model and learns only ``vectors`` new token
embeddings (textual inversion, Gal et al. 2022), the attack that Pham et al. ("Circumventing
Concept Erasure Methods for Text-to-Image Generative Models", ICLR 2024) used to show that
erased concepts are still reachable through the text encoder's input: new rows of the input
embedding matrix of the text encoder (SDXL: of both encoders, as diffusers' SDXL textual
inversion script trains them), with the UNet, the VAE and every other text-encoder weight
frozen. The training captions say the placeholder token where they said the word ``replaces``
(e.g. "a handwritten digit <concept>"), and so do the evaluation prompts
(:mod:`resalign.models.embeddings`).

It runs in the one attack loop (:func:`resalign.algorithms.attack.run_attack`): the same DDPM
loss, optimizer, schedule, generator, checkpoints and ``stop_at`` segments as the other
attacks; this module only supplies the trainable tensors (:meth:`EmbeddingAttack.named_parameters`)
and the batch conditioning (:meth:`EmbeddingAttack.condition`, through the text encoder with
gradients to the new rows).

How only the new rows train: the text encoder's input embedding is wrapped
(:class:`PlaceholderEmbedding`) so that token ids of the base vocabulary read the frozen
matrix and the new ids read a separate ``[vectors, dim]`` parameter. The rest of the matrix is
therefore never touched (bit-identical, tested), the optimizer state is ``vectors × dim``
numbers rather than the whole vocabulary's, and weight decay (AdamW's is decoupled and would
shrink every row it sees) applies to the new rows only. diffusers' textual inversion script
instead trains the whole matrix and copies the old rows back after every step; the result is
the same for the new rows up to the optimizer state of the others, which it keeps and we do
not. At the end the rows are written into the grown embedding matrix and the wrapper is
removed (:meth:`EmbeddingAttack.merge`), so the bundle is an ordinary model with the token.

Departures from Pham et al. / Gal et al.: captions are the threat's data set's own captions
with the word replaced (not Gal et al.'s prompt templates "a photo of a {}"); every vector of a
multi-vector embedding starts at the ``init`` word's embedding, as in diffusers' script; the
loss is the attack loop's (timesteps uniform over the training schedule, the VAE posterior
mean as latents).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UserError
from ..models.embeddings import (
    LearnedEmbedding,
    add_placeholder_tokens,
    check_fit,
    placeholder_tokens,
    rewrite_prompt,
    text_encoders,
    word_embedding,
)


class PlaceholderEmbedding(torch.nn.Module):
    """An input-embedding layer: ids below ``first`` read the frozen ``base`` layer, ids
    ``first .. first + len(rows) - 1`` read the trainable ``rows``."""

    def __init__(self, base: torch.nn.Embedding, first: int, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.first = int(first)
        self.rows = torch.nn.Parameter(
            rows.detach().to(base.weight.device, torch.float32).clone(), requires_grad=True
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        new = ids >= self.first
        # always through ``rows`` (a zero gradient when a batch has no placeholder), so the
        # optimizer steps on them every step, as on any other trained tensor
        idx = (ids - self.first).clamp(0, self.rows.shape[0] - 1)
        mine = torch.nn.functional.embedding(idx, self.rows).to(out.dtype)
        return torch.where(new.unsqueeze(-1), mine, out)


class EmbeddingAttack:
    """The placeholder tokens attached to a bundle for training (:func:`attach_embeddings`)."""

    def __init__(
        self,
        bundle: Any,
        token: str,
        tokens: list[str],
        replaces: str,
        init: str,
        layers: dict[str, tuple[Any, PlaceholderEmbedding]],
    ):
        self.bundle = bundle
        self.token = token
        self.tokens = tokens
        self.replaces = replaces
        self.init = init
        self.layers = layers  # encoder name -> (text encoder, its wrapped input embedding)
        self.placeholder = " ".join(tokens)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trained tensors (checkpoint names): one ``[vectors, dim]`` per text encoder."""
        return [
            (f"{name}.placeholder_rows", layer.rows) for name, (_, layer) in self.layers.items()
        ]

    def rewrite(self, captions: Sequence[str]) -> list[str]:
        """``captions`` with ``replaces`` replaced by the placeholder tokens."""
        return [rewrite_prompt(c, self.replaces, self.placeholder) for c in captions]

    def condition(self, captions: Sequence[str]) -> dict[str, Any]:
        """The UNet conditioning of the rewritten ``captions``, with gradients to the rows
        (:meth:`ModelBundle.condition_from_tokens`, what ``encode_condition`` computes)."""
        b = self.bundle
        return b.condition_from_tokens(b.tokenize(self.rewrite(captions)))

    def merge(self) -> LearnedEmbedding:
        """Write the rows into the grown embedding matrices, remove the wrappers, and return
        the learned embedding."""
        rows: dict[str, torch.Tensor] = {}
        for name, (enc, layer) in self.layers.items():
            with torch.no_grad():
                w = layer.base.weight
                w[layer.first : layer.first + layer.rows.shape[0]] = layer.rows.to(w.dtype)
            enc.set_input_embeddings(layer.base)
            rows[name] = layer.rows.detach().to("cpu", torch.float32).clone()
        return LearnedEmbedding(self.token, list(self.tokens), self.replaces, self.init, rows)


def attach_embeddings(
    bundle: Any,
    *,
    token: str,
    vectors: int,
    init: str,
    replaces: str,
    captions: Sequence[str],
) -> EmbeddingAttack:
    """Add ``vectors`` placeholder tokens named after ``token`` to ``bundle`` (every text
    encoder), each row initialised to the embedding of the word ``init``, and make those rows
    the only trainable tensors. ``captions`` (the attack's training captions) must contain
    ``replaces`` somewhere, or the rows would never receive a gradient."""
    found = sum(rewrite_prompt(c, replaces, "\0") != c for c in captions)
    if not found:
        sample = ", ".join(repr(c) for c in list(dict.fromkeys(captions))[:3])
        raise UserError(
            f"no caption of the embedding attack's data contains the word {replaces!r} "
            f"(embedding.replaces), so the new token would never be trained; captions look "
            f"like {sample}",
            hint="set embedding.replaces to a word of the captions (the concept's name), or "
            "give the threat data whose captions name the concept",
        )
    tokens = placeholder_tokens(token, vectors)
    init_rows = {
        name: word_embedding(tok, enc, init, what="embedding.init").repeat(len(tokens), 1)
        for name, tok, enc in text_encoders(bundle)
    }
    first = add_placeholder_tokens(bundle, tokens, init_rows)
    placeholder = " ".join(tokens)
    check_fit(bundle, [rewrite_prompt(c, replaces, placeholder) for c in captions],
              what="the training caption")  # fmt: skip
    layers: dict[str, tuple[Any, PlaceholderEmbedding]] = {}
    for name, _, enc in text_encoders(bundle):
        enc.requires_grad_(False)
        layer = PlaceholderEmbedding(enc.get_input_embeddings(), first[name], init_rows[name])
        enc.set_input_embeddings(layer)
        layers[name] = (enc, layer)
    return EmbeddingAttack(bundle, token, tokens, replaces, init, layers)
