"""The ``controls`` section: extra report rows that are not unlearning methods.

A top-level section rather than a field of ``model.tiny.pretrain``: the model section is the
original model node's key, so a switch there would change the key of every cached model
(and of everything downstream) even when off; here the original's nodes keep their keys and
the control adds nodes beside them.
"""

from __future__ import annotations

from pydantic import Field

from .base import StrictModel

ORACLE_ROW = "oracle"


class ControlsSpec(StrictModel):
    """Controls that tell the method's effect apart from what any model would do."""

    oracle: bool = Field(
        default=False,
        description="add a row 'oracle' after 'original': a model that never learned the "
        "concepts (the same architecture and pretraining with every pretraining item whose "
        "label is a concept's 'label' removed), evaluated and attacked like 'original', so "
        "recovery after an attack is told apart from learning the concept anew. Needs "
        "model.family tiny with model.tiny.pretrain on labelled data (digits) and a 'label' "
        "on every concept",
    )
