"""Learned token embeddings (textual inversion): placeholder tokens added to a model's
tokenizer(s) and text encoder(s), the prompt rewrite that uses them, and their files.

A textual-inversion embedding (Gal et al. 2022; used against erased concepts by Pham et al.,
"Circumventing Concept Erasure Methods for Text-to-Image Generative Models", ICLR 2024) is
``vectors`` new rows of a text encoder's input-embedding matrix, one per placeholder token,
with every other weight of the model unchanged. Training them is the ``embedding`` attack
(``resalign.algorithms.embedding_attack``); this module is what training and evaluation share:

- :func:`placeholder_tokens`: the token strings, ``token`` then ``token_v1``, ``token_v2``, ...
  Not diffusers' ``token_1``: diffusers' pipelines expand a prompt's ``token`` into
  ``token token_1 ...`` themselves (``maybe_convert_prompt``), which would double the extra
  vectors of a prompt already rewritten here; with these names the pipeline passes the
  rewritten prompt on unchanged, so generation conditions exactly as training did (tested).
- :func:`rewrite_prompt`: every whole-word occurrence of ``replaces`` (case-insensitive) becomes
  the placeholder tokens joined by spaces; used for the attack's captions and for the
  evaluation prompts (metrics keep reading the original prompt).
- :func:`add_placeholder_tokens`: adds the tokens to each tokenizer (SDXL: both), grows each
  encoder's embedding by those rows (``resize_token_embeddings``; every existing row is copied
  bit for bit) and writes the given rows.
- :class:`LearnedEmbedding`: the result, saved as ``learned_embeds.safetensors``
  (``{token: [vectors, dim]}`` for the first text encoder: the file diffusers' textual
  inversion training writes and ``load_textual_inversion`` reads), for SDXL also
  ``learned_embeds_2.safetensors`` (the second encoder's rows, as diffusers' SDXL script
  writes it), and ``embedding.json`` (token, tokens, vectors, replaces, init).

CLIP pooling: a text model whose config has the legacy ``eos_token_id`` 2 pools at the
*largest* token id of each prompt (transformers keeps this for old checkpoints, SDXL's among
them), which with added tokens is the placeholder instead of the end token. Where the
tokenizer's end token is the largest id of the base vocabulary (CLIP's), the model is switched
to pooling at the first end token: the same position for every prompt without added tokens,
and still the end token with them (SDXL's pooled ``text_embeds`` depend on it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..errors import UserError

EMBEDDING_DIR = "embedding"
EMBEDDING_JSON = "embedding.json"
# file per text encoder: the names diffusers' textual inversion scripts write
FILES = {
    "text_encoder": "learned_embeds.safetensors",
    "text_encoder_2": "learned_embeds_2.safetensors",
}


def placeholder_tokens(token: str, vectors: int) -> list[str]:
    """The placeholder token strings of a ``vectors``-vector embedding named ``token``."""
    return [token] + [f"{token}_v{i}" for i in range(1, int(vectors))]


def rewrite_prompt(text: str, replaces: str, placeholder: str) -> str:
    """``text`` with every whole-word, case-insensitive ``replaces`` replaced by
    ``placeholder`` (the placeholder tokens joined by spaces)."""
    pattern = re.compile(r"\b" + re.escape(replaces) + r"\b", re.IGNORECASE)
    return pattern.sub(lambda _: placeholder, text)


def text_encoders(bundle: Any) -> list[tuple[str, Any, Any]]:
    """``(name, tokenizer, text encoder)`` of each text encoder of ``bundle`` (SDXL: two).
    SD3's three (CLIP-L, CLIP-G, T5 with its own vocabulary) and Flux's two (CLIP-L, T5) are
    refused: a token learned in the CLIP(s) alone would reach T5 as plain text, so the attack
    would not be the published one."""
    layout = getattr(bundle, "layout", None)
    if layout in ("sd3", "flux"):
        from ..errors import UserError

        name = {"sd3": "SD3", "flux": "Flux"}[layout]
        raise UserError(
            f"textual-inversion attacks (algorithm: embedding) are not built for {name} "
            "models (T5 has its own tokenizer: a token learned in CLIP would reach it as text)",
            hint=f"attack {name} with algorithm full, lora or dreambooth",
        )
    pairs = [("text_encoder", bundle.tokenizer, bundle.text_encoder)]
    if getattr(bundle, "family", None) == "sdxl":
        pairs.append(("text_encoder_2", bundle.tokenizer_2, bundle.text_encoder_2))
    return pairs


def word_embedding(tokenizer: Any, encoder: Any, word: str, *, what: str) -> torch.Tensor:
    """The input-embedding row of ``word``, which must be one token of ``tokenizer``."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UserError(
            f"{what} {word!r} is {len(ids)} tokens for this model's tokenizer ({pieces}), "
            "not one, so it has no single embedding to start from",
            hint=f"choose a word that is one token of the tokenizer for {what}",
        )
    return encoder.get_input_embeddings().weight[ids[0]].detach().clone()


def _pool_at_eos(tokenizer: Any, encoder: Any, base_vocab: int) -> None:
    """Make a legacy CLIP text model (``eos_token_id`` 2: pools at the largest id) pool at the
    first end token, where that is the same position for every prompt of the base vocabulary
    (the end token is its largest id). See the module docstring."""
    text_model = getattr(encoder, "text_model", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if text_model is None or getattr(text_model, "eos_token_id", None) != 2 or eos is None:
        return
    if int(eos) == base_vocab - 1:
        text_model.eos_token_id = int(eos)
        encoder.config.eos_token_id = int(eos)


def add_placeholder_tokens(
    bundle: Any, tokens: Sequence[str], rows: Mapping[str, torch.Tensor]
) -> dict[str, int]:
    """Add ``tokens`` to every tokenizer of ``bundle`` and give them ``rows[name]``
    (``[len(tokens), dim]``) in the matching text encoder's input embeddings, which grow by
    that many rows (existing rows are copied unchanged). Returns the first new token id per
    encoder name. A token already in a vocabulary is a :class:`UserError`."""
    first: dict[str, int] = {}
    for name, tok, enc in text_encoders(bundle):
        if name not in rows:
            raise UserError(
                f"the learned embedding has no rows for {name}",
                hint="an SDXL embedding needs learned_embeds_2.safetensors too (retrain it "
                "on this model)",
            )
        r = rows[name]
        dim = int(enc.get_input_embeddings().weight.shape[1])
        if tuple(r.shape) != (len(tokens), dim):
            raise UserError(
                f"the learned embedding for {name} has shape {tuple(r.shape)}, but this model "
                f"needs ({len(tokens)}, {dim}) ({len(tokens)} token(s) of width {dim})",
                hint="it was trained on another model; retrain it on this one",
            )
        taken = [t for t in tokens if t in tok.get_vocab()]
        if taken:
            raise UserError(
                f"placeholder token(s) {taken} are already in the tokenizer of {name}",
                hint="choose another embedding.token (e.g. '<concept>'), one that is not a "
                "word of the model's vocabulary",
            )
        base_vocab = len(tok)
        tok.add_tokens(list(tokens))
        ids = tok.convert_tokens_to_ids(list(tokens))
        if ids != list(range(base_vocab, base_vocab + len(tokens))):
            raise UserError(
                f"the tokenizer of {name} gave the placeholder tokens ids {ids}, not the next "
                f"ones after its {base_vocab} entries",
                hint="use a tokenizer without gaps in its ids",
            )
        old = enc.get_input_embeddings().weight
        if int(old.shape[0]) != base_vocab:
            raise UserError(
                f"the text encoder {name} has {int(old.shape[0])} embedding rows for a "
                f"tokenizer of {base_vocab} tokens",
                hint="a model whose tokenizer and text encoder sizes agree is needed",
            )
        # mean_resizing off and the global RNG untouched: the new rows are overwritten below
        with torch.random.fork_rng(devices=[]):
            enc.resize_token_embeddings(base_vocab + len(tokens), mean_resizing=False)
        weight = enc.get_input_embeddings().weight
        with torch.no_grad():
            weight[base_vocab:] = r.to(weight.device, weight.dtype)
        weight.requires_grad_(False)
        _pool_at_eos(tok, enc, base_vocab)
        first[name] = base_vocab
    return first


@dataclass
class LearnedEmbedding:
    """A trained textual-inversion embedding: ``tokens`` (``token`` first) standing for the
    word ``replaces``, with ``rows[encoder name]`` of shape ``[len(tokens), dim]``."""

    token: str
    tokens: list[str]
    replaces: str
    init: str
    rows: dict[str, torch.Tensor]

    @property
    def vectors(self) -> int:
        return len(self.tokens)

    @property
    def placeholder(self) -> str:
        """What ``replaces`` becomes in a prompt: the tokens joined by spaces."""
        return " ".join(self.tokens)

    def rewrite(self, text: str) -> str:
        """``text`` with ``replaces`` replaced by the placeholder (:func:`rewrite_prompt`)."""
        return rewrite_prompt(text, self.replaces, self.placeholder)

    def describe(self) -> dict[str, Any]:
        """``embedding.json``'s content."""
        return {
            "token": self.token,
            "tokens": list(self.tokens),
            "vectors": self.vectors,
            "replaces": self.replaces,
            "init": self.init,
            "placeholder": self.placeholder,
            "files": {name: FILES[name] for name in self.rows},
        }

    def save(self, folder: Path) -> Path:
        """Write the files into ``folder`` (created); returns it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, r in self.rows.items():
            save_file(
                {self.token: r.detach().to("cpu", torch.float32).contiguous()},
                str(folder / FILES[name]),
            )
        atomic_write_text(folder / EMBEDDING_JSON, json.dumps(self.describe(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Path) -> LearnedEmbedding:
        """Read what :meth:`save` wrote; a missing or malformed file is a :class:`UserError`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path = folder / EMBEDDING_JSON
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            rows = {}
            for name, fname in meta["files"].items():
                state = load_file(str(folder / fname))
                rows[name] = state[meta["token"]]
            return cls(meta["token"], list(meta["tokens"]), meta["replaces"], meta["init"], rows)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"cannot read the learned embedding in {folder}: {exc}",
                where=str(folder),
                hint="re-run the attack node that wrote it (`resalign verify` finds damaged "
                "results)",
            ) from None

    def apply(self, bundle: Any) -> dict[str, int]:
        """Add the tokens with their rows to ``bundle``'s tokenizer(s) and text encoder(s)
        (:func:`add_placeholder_tokens`); prompts then need :meth:`rewrite`."""
        return add_placeholder_tokens(bundle, self.tokens, self.rows)


def check_fit(bundle: Any, texts: Sequence[str], *, what: str) -> None:
    """Refuse ``texts`` (captions or prompts already rewritten with the placeholder tokens)
    that the tokenizer(s) would truncate: CLIP cuts at ``model_max_length`` silently, which
    dropped the last vectors and the end token of "a handwritten digit <concept> ..._v3" on
    the demo's 8-token model, so the attack trained and was scored on cut text."""
    for name, tok, _ in text_encoders(bundle):
        limit = int(tok.model_max_length)
        for text in dict.fromkeys(texts):
            n = len(tok(text, truncation=False).input_ids)
            if n > limit:
                raise UserError(
                    f"{what} {text!r} is {n} tokens with the embedding attack's placeholder "
                    f"token(s), more than the {name} tokenizer's {limit}: it would be cut",
                    hint="use fewer embedding.vectors, or a model whose text encoder takes "
                    "longer text (model.tiny.max_length)",
                )


def find_embedding(node_out: Path) -> Path | None:
    """The ``embedding/`` folder of an attack result, if it has one."""
    folder = Path(node_out) / EMBEDDING_DIR
    return folder if (folder / EMBEDDING_JSON).is_file() else None
