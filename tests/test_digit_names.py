"""Per-digit caption names (``datasets.<d>.names``): captions in which digits share words
(issue 20.3's shared-word attempt, specs/digits_benign_shared.yaml). The names reach every
place a digit caption is made: the pairs, the prompt lists, the concept metric's prompts and
the keys of the nodes that read them; a dataset without names keeps its dump (and keys)."""

from __future__ import annotations

from pathlib import Path

from resalign.data.digits import caption_for
from resalign.data.pairs import load_pairs
from resalign.evaluation.metrics.concept_rate import ConceptRate
from resalign.graph.compile import compile_spec
from resalign.spec import load_spec
from resalign.spec.schema.data import DigitsData
from resalign.steps.evaluate import metric_context

SPECS = Path(__file__).resolve().parents[1] / "specs"
NAMES = {0: "round zero", 6: "round six", 8: "round eight", 9: "round nine"}


def test_caption_for_uses_a_name_where_given_and_the_digit_word_elsewhere() -> None:
    assert caption_for(0, "a handwritten digit {name}", NAMES) == "a handwritten digit round zero"
    assert caption_for(1, "a handwritten digit {name}", NAMES) == "a handwritten digit one"
    assert caption_for(6, "{digit}: {name}", NAMES) == "6: round six"


def test_a_dataset_without_names_dumps_as_before() -> None:
    assert "names" not in DigitsData(type="digits").model_dump(mode="json")
    dumped = DigitsData(type="digits", names={0: "round zero"}).model_dump(mode="json")
    assert dumped["names"] == {"0": "round zero"}
    assert DigitsData.model_validate(dumped).names == {0: "round zero"}


def test_the_shared_word_spec_names_the_pairs_the_prompts_and_its_keys() -> None:
    demo = compile_spec(load_spec(SPECS / "digits_demo.yaml"))
    shared_spec = load_spec(SPECS / "digits_benign_shared.yaml")
    shared = compile_spec(shared_spec)
    # pretraining reads the captions: its own model node, and so its own evaluations
    assert shared["model"].key != demo["model"].key
    pre = shared["evaluate/plain/seed0/pre/step0"].params
    assert "caption_names" not in demo["evaluate/plain/seed0/pre/step0"].params
    assert pre["caption_names"] == {str(k): v for k, v in NAMES.items()}

    # the pairs every step trains on carry the names (here: the pretraining set)
    pairs = load_pairs("digits_train", shared_spec.spec)
    by_label = {lab: cap for lab, cap in zip(pairs.labels, pairs.captions, strict=True)}
    assert by_label[0] == "a handwritten digit round zero"
    assert by_label[8] == "a handwritten digit round eight"
    assert by_label[3] == "a handwritten digit three"

    # the concept metric asks for the concept by the name it was trained under
    metric_spec = pre["evaluate"]["metrics"][0]
    metric = ConceptRate(metric_spec, metric_context(pre))
    prompts = metric.prompts()
    assert prompts is not None and "a handwritten digit round zero" in prompts
    assert "a handwritten digit zero" not in prompts and "a handwritten digit five" in prompts
    assert metric.params()["caption_names"]["0"] == "round zero"
    # the demo's metric is unchanged
    dpre = demo["evaluate/plain/seed0/pre/step0"].params
    dm = ConceptRate(dpre["evaluate"]["metrics"][0], metric_context(dpre))
    assert "a handwritten digit zero" in dm.prompts() and "caption_names" not in dm.params()
