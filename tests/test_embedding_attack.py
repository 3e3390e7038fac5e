"""The ``embedding`` (textual-inversion) attack: only new token rows train, in the one attack
loop; the learned embedding is saved, reloaded and used for generation exactly as trained;
the schema refuses what it cannot run; and ``resalign run`` evaluates an embedding threat
with the token in the prompts (real tiny SD/SDXL pipelines throughout, no mocks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from pydantic import ValidationError
from tiny_bundle import Pairs, tiny_bundle

from resalign.algorithms.attack import AttackConfig, denoise_loss, run_attack
from resalign.errors import UserError
from resalign.models.embeddings import LearnedEmbedding, rewrite_prompt

WORDS = ["a", "handwritten", "digit", "zero", "one", "two"]  # single tokens, as after pretraining
ZEROS = "a handwritten digit zero"


def Bundle(family: str = "tiny") -> Any:
    """A real ModelBundle of the tiny SD- (or SDXL-) shaped pipeline."""
    return tiny_bundle(family=family, words=WORDS)


def _data(captions: list[str] | None = None, seed: int = 1) -> Pairs:
    captions = captions or [ZEROS] * 4 + ["a handwritten digit one"] * 4
    g = torch.Generator().manual_seed(seed)
    return Pairs(torch.rand(len(captions), 1, 8, 8, generator=g) * 2 - 1, captions)


def config(seed: int = 0, embedding: dict | None = None, **threat: Any) -> AttackConfig:
    block = {"replaces": "zero", **(embedding or {})}
    base = dict(batch_size=4, grad_accumulation=1, precision="fp32", lr=5e-2, steps=3)
    return AttackConfig.from_threat(
        {"data": "x", "algorithm": "embedding", "embedding": block, **{**base, **threat}}, seed
    )


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _emb_key(state: dict[str, torch.Tensor]) -> str:
    (key,) = [k for k in state if k.endswith("token_embedding.weight")]
    return key


def test_only_the_new_rows_change_and_everything_else_is_bit_identical():
    b = Bundle()
    unet0, vae0, text0 = _snapshot(b.unet), _snapshot(b.vae), _snapshot(b.text_encoder)
    zero_id = b.tokenizer.convert_tokens_to_ids("zero</w>")
    res = run_attack(b, _data(), config(embedding={"vectors": 2}))
    assert all(torch.equal(unet0[k], v) for k, v in _snapshot(b.unet).items())
    assert all(torch.equal(vae0[k], v) for k, v in _snapshot(b.vae).items())
    text1 = _snapshot(b.text_encoder)
    assert set(text1) == set(text0)  # the wrapper is gone: an ordinary text encoder
    emb = _emb_key(text0)
    assert all(torch.equal(text0[k], text1[k]) for k in text0 if k != emb)
    old, new = text0[emb], text1[emb]
    n = old.shape[0]
    assert new.shape == (n + 2, old.shape[1])
    assert torch.equal(new[:n], old)  # every existing row, bit for bit
    rows = res.embedding.rows["text_encoder"]
    assert torch.equal(new[n:], rows)
    # both vectors started at the init word's row and moved
    assert all(not torch.equal(rows[i], old[zero_id]) for i in range(2))
    assert res.trainable == 2 * old.shape[1] and res.trainable_tensors == 1
    assert b.tokenizer.convert_tokens_to_ids(["<concept>", "<concept>_v1"]) == [n, n + 1]
    assert res.embedding.describe()["placeholder"] == "<concept> <concept>_v1"


def test_the_untrained_token_conditions_as_the_word_and_training_lowers_the_loss():
    """Independent of the loop: the DDPM loss on fixed (noise, t) draws, through the plain
    text encoder, of the concept's captions with the word (before) and the learned token
    (after). With ``init`` = the word, the one-vector token conditions exactly as the word."""
    from resalign.algorithms.embedding_attack import attach_embeddings

    data = _data([ZEROS] * 8)

    def loss(b: Any, captions: list[str]) -> float:
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            lat = b.encode_images(data.images)
            cond = b.encode_condition(captions)
            draws = [denoise_loss(b.unet, b.noise_scheduler, lat, cond, g) for _ in range(16)]
        return float(sum(draws) / len(draws))

    fresh = Bundle()
    before = loss(fresh, data.captions)
    emb = attach_embeddings(
        fresh, token="<concept>", vectors=1, init="zero", replaces="zero", captions=data.captions
    )
    with torch.no_grad():  # the wrapper before any step: the token is the word
        same = emb.condition(data.captions)["encoder_hidden_states"]
    assert torch.equal(same, fresh.encode_condition(data.captions)["encoder_hidden_states"])

    b = Bundle()
    cfg = config(steps=40, batch_size=8, optimizer="adam", weight_decay=0.0)
    run_attack(b, data, cfg)
    after = loss(b, [rewrite_prompt(c, "zero", "<concept>") for c in data.captions])
    # measured 1.312 -> 1.293 (the loop's own per-step losses are dominated by the random
    # timesteps, so the fixed draws above are the measure)
    assert after < before - 0.01, (before, after)


def test_stop_at_then_continue_is_the_whole_attack(tmp_path):
    """As tests/test_attack.py's: a segment stopped at step 2 and continued from its state
    ends bitwise where the uninterrupted attack does (cosine schedule over all 5 steps)."""
    cfg = config(steps=5, checkpoint_every=10, schedule="cosine", embedding={"vectors": 2})
    ref = run_attack(Bundle(), _data(), cfg)
    part = run_attack(Bundle(), _data(), cfg, state_dir=tmp_path, stop_at=2)
    assert part.steps == 2 and part.losses == ref.losses[:2]
    state = torch.load(tmp_path / "attack_state.pt", weights_only=True)
    assert list(state["params"]) == ["text_encoder.placeholder_rows"]  # the rows, nothing else
    assert not torch.equal(part.embedding.rows["text_encoder"], ref.embedding.rows["text_encoder"])
    res = run_attack(Bundle(), _data(), cfg, state_dir=tmp_path)
    assert res.resumed_from == 2 and res.losses == ref.losses
    assert torch.equal(res.embedding.rows["text_encoder"], ref.embedding.rows["text_encoder"])


@pytest.mark.parametrize("family", ["tiny", "sdxl"])
def test_saved_embedding_generates_as_it_was_trained(tmp_path, family):
    """Saved, reloaded into a fresh model and used by the diffusers pipeline (what evaluation
    generates with): the conditioning equals the training conditioning bitwise (SDXL: both
    encoders and the pooled embedding). The pipeline's own textual-inversion prompt expansion
    leaves the rewritten prompt alone (the ``_v<i>`` names)."""
    b = Bundle(family)
    res = run_attack(b, _data(), config(embedding={"vectors": 2}))
    res.embedding.save(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    want = {"embedding.json", "learned_embeds.safetensors"}
    assert files == (want | {"learned_embeds_2.safetensors"} if family == "sdxl" else want)
    meta = json.loads((tmp_path / "embedding.json").read_text())
    assert (meta["token"], meta["vectors"], meta["replaces"], meta["init"]) == (
        "<concept>", 2, "zero", "zero",
    )  # fmt: skip

    loaded = LearnedEmbedding.load(tmp_path)
    fresh = Bundle(family)
    loaded.apply(fresh)
    prompt = loaded.rewrite("A handwritten digit Zero, zeros, zero.")
    assert prompt == "A handwritten digit <concept> <concept>_v1, zeros, <concept> <concept>_v1."
    want_cond = b.encode_condition([prompt])
    got = fresh.encode_condition([prompt])
    pipe = fresh.pipeline()
    enc = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                             do_classifier_free_guidance=False)  # fmt: skip
    assert torch.equal(got["encoder_hidden_states"], want_cond["encoder_hidden_states"])
    assert torch.equal(enc[0], want_cond["encoder_hidden_states"])
    if family == "sdxl":
        pooled = want_cond["added_cond_kwargs"]["text_embeds"]
        assert torch.equal(got["added_cond_kwargs"]["text_embeds"], pooled)
        assert torch.equal(enc[2], pooled)
        # the second encoder's rows were trained too
        assert set(res.embedding.rows) == {"text_encoder", "text_encoder_2"}
    # and the token does condition differently from the word
    word = fresh.encode_condition(["A handwritten digit Zero, zeros, zero."])
    assert not torch.equal(word["encoder_hidden_states"], got["encoder_hidden_states"])


def test_the_file_is_the_one_diffusers_textual_inversion_loads(tmp_path):
    """Independent implementation: diffusers' ``load_textual_inversion`` of
    ``learned_embeds.safetensors`` conditions a prompt with the token as our loader does."""
    res = run_attack(Bundle(), _data(), config())
    res.embedding.save(tmp_path)
    ours = Bundle()
    LearnedEmbedding.load(tmp_path).apply(ours)
    theirs = Bundle().pipeline()
    theirs.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    prompt = "a handwritten digit <concept>"
    enc = theirs.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                               do_classifier_free_guidance=False)  # fmt: skip
    assert torch.equal(enc[0], ours.encode_condition([prompt])["encoder_hidden_states"])


def test_runtime_errors_are_user_errors():
    # the word is not in any caption: the token would never train
    with pytest.raises(UserError, match="no caption .* contains the word 'zero'"):
        run_attack(Bundle(), _data(["a handwritten digit one"] * 4), config())
    # init must be one token of the tokenizer ("seven" is 5 byte tokens here)
    with pytest.raises(UserError, match="embedding.init 'seven' is 5 tokens"):
        run_attack(Bundle(), _data(), config(embedding={"init": "seven"}))
    # the token must be new
    with pytest.raises(UserError, match="already in the tokenizer"):
        run_attack(Bundle(), _data(), config(embedding={"token": "a"}))
    # captions the tokenizer would cut (CLIP truncates silently): 3 words + 30 vectors + BOS
    # and EOS are 35 tokens, over max_length 32; 27 vectors make exactly 32 and pass
    with pytest.raises(
        UserError, match="is 35 tokens .* more than the text_encoder tokenizer's 32"
    ):
        run_attack(Bundle(), _data(), config(embedding={"vectors": 30}))
    run_attack(Bundle(), _data(), config(embedding={"vectors": 27}, steps=1))


def test_schema_defaults_and_errors():
    from resalign.spec.schema.threats import ThreatSpec

    t = ThreatSpec(data="x", algorithm="embedding", embedding={"replaces": "zero"})
    assert t.embedding is not None
    assert (t.embedding.token, t.embedding.init, t.embedding.vectors) == ("<concept>", "zero", 1)
    cfg = AttackConfig.from_threat(t, seed=1)
    assert (cfg.embedding_token, cfg.embedding_init, cfg.embedding_vectors) == (
        "<concept>", "zero", 1,
    )  # fmt: skip
    plain = AttackConfig.from_threat({"data": "x"}, seed=1)
    assert plain.embedding_token is None and plain.embedding_replaces is None

    bad = [
        ({"algorithm": "embedding"}, "needs an embedding block"),
        ({"embedding": {"replaces": "zero"}}, "read by algorithm embedding only"),
        ({"algorithm": "lora", "embedding": {"replaces": "zero"}}, "algorithm is lora"),
        ({"algorithm": "embedding", "embedding": {}}, "replaces"),
        ({"algorithm": "embedding", "embedding": {"replaces": "two words"}}, "single word"),
        ({"algorithm": "embedding", "embedding": {"replaces": "x", "init": "a,b"}}, "single word"),
        ({"algorithm": "embedding", "embedding": {"replaces": "x", "token": "<a b>"}}, "spaces"),
        ({"algorithm": "embedding", "embedding": {"replaces": "x", "vectors": 0}}, "vectors"),
        ({"algorithm": "embedding", "embedding": {"replaces": "x", "tokn": "y"}}, "tokn"),
    ]
    for block, msg in bad:
        with pytest.raises(ValidationError, match=msg):
            ThreatSpec.model_validate({"data": "x", **block})


TINY_SPEC = Path(__file__).resolve().parent / "specs" / "tiny.yaml"


def _spec(tmp_path: Path, threat: dict) -> Path:
    d = yaml.safe_load(TINY_SPEC.read_text(encoding="utf-8"))
    d.pop("baselines")
    d["threats"] = {"ti": threat}
    d["tracking"]["system_metrics"] = False
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    return p


def test_validate_reports_a_bad_embedding_block_with_its_place(tmp_path):
    from resalign.cli import cli

    bad = {"data": "harmful", "algorithm": "full", "embedding": {"replaces": "zero"}}
    res = CliRunner().invoke(cli, ["validate", str(_spec(tmp_path, bad))])
    assert res.exit_code == 2, res.output
    assert "spec.yaml:" in res.output and "read by algorithm embedding only" in res.output
    assert "Traceback" not in res.output


def test_plain_threats_keep_their_keys_and_an_embedding_threat_is_keyed_by_its_block(tmp_path):
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    g = compile_spec(load_spec(TINY_SPEC))
    assert "embedding" not in g["attack/original/benign/seed1/step2"].params["threat"]
    threat = {"data": "harmful", "algorithm": "embedding", "embedding": {"replaces": "zero"},
              "steps": 2, "seeds": [1]}  # fmt: skip
    a = compile_spec(load_spec(_spec(tmp_path, threat)))["attack/original/ti/seed1/step2"]
    threat["embedding"] = {"replaces": "zero", "init": "zero"}  # the default, written
    b = compile_spec(load_spec(_spec(tmp_path, threat)))["attack/original/ti/seed1/step2"]
    threat["embedding"] = {"replaces": "zero", "vectors": 2}
    c = compile_spec(load_spec(_spec(tmp_path, threat)))["attack/original/ti/seed1/step2"]
    assert a.key == b.key != c.key


@pytest.mark.slow
def test_resalign_run_evaluates_an_embedding_threat_with_the_token(tmp_path):
    """The tiny spec with one embedding threat on the concept's images, evaluated at steps 1
    and 2: the attack writes the embedding (no UNet copy), the second segment continues the
    first, and each evaluation generates the concept's prompts with the token: images of
    the other digits' prompts are the pre-attack evaluation's, byte for byte (same UNet, same
    seeds), the concept's differ."""
    from resalign.cli import cli
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    threat = {"data": "harmful", "algorithm": "embedding", "embedding": {"replaces": "zero"},
              "steps": 2, "eval_at": [1, 2], "batch_size": 4, "grad_accumulation": 1,
              "precision": "fp32", "optimizer": "adam", "lr": 0.1, "seeds": [1],
              "checkpoint_every": 1}  # fmt: skip
    path, store = _spec(tmp_path, threat), tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(path), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 0, res.output
    g = compile_spec(load_spec(path))
    for row in ("original", "resalign/seed0"):
        s1 = store / "attack" / g[f"attack/{row}/ti/seed1/step1"].key
        s2 = store / "attack" / g[f"attack/{row}/ti/seed1/step2"].key
        for s in (s1, s2):
            assert (s / "embedding" / "learned_embeds.safetensors").is_file()
            assert not (s / "unet").exists()
        assert (s1 / "resume" / "checkpoint.pt").is_file()
        stats = json.loads((s2 / "stats.json").read_text())
        assert stats["resumed_from"] == 1 and stats["embedding"]["token"] == "<concept>"
        r1 = LearnedEmbedding.load(s1 / "embedding").rows["text_encoder"]
        r2 = LearnedEmbedding.load(s2 / "embedding").rows["text_encoder"]
        assert not torch.equal(r1, r2)

        pre = store / "evaluate" / g[f"evaluate/{row}/pre/step0"].key / "images" / "g0" / "images"
        post = store / "evaluate" / g[f"evaluate/{row}/ti/seed1/step2"].key
        gen = json.loads((post / "generation.json").read_text())
        assert gen["g0"]["embedding"]["placeholder"] == "<concept>"
        img = post / "images" / "g0" / "images"
        index = [json.loads(x) for x in (img / "index.jsonl").read_text().splitlines()]
        concept = [e for e in index if " zero" in e["prompt"]]
        others = [e for e in index if " zero" not in e["prompt"]]
        assert concept and others
        assert all(e["pipeline_prompt"] == e["prompt"].replace("zero", "<concept>")
                   for e in concept)  # fmt: skip
        assert all(e["pipeline_prompt"] == e["prompt"] for e in others)
        for e in others:
            assert (img / e["file_name"]).read_bytes() == (pre / e["file_name"]).read_bytes()
        assert any(
            (img / e["file_name"]).read_bytes() != (pre / e["file_name"]).read_bytes()
            for e in concept
        )
        metrics = json.loads((post / "metrics.json").read_text())
        assert metrics["concept_rate"]["n"] == len(concept)  # read from the original prompts

    # a word of the training captions that no evaluation prompt says: the evaluation refuses
    # (the token would never be used and the attack would look harmless)
    d = yaml.safe_load(path.read_text(encoding="utf-8"))
    d["datasets"]["sketches"] = {"type": "digits", "split": "train", "digits": [0], "limit": 8,
                                 "caption": "a {name} sketch"}  # fmt: skip
    d["threats"]["ti"].update(
        data="sketches", embedding={"replaces": "sketch", "init": "zero"}, eval_at=[1]
    )
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    res = CliRunner().invoke(cli, ["run", str(path), "--store", str(store), "--no-tracking"])
    assert res.exit_code == 2, res.output
    assert "is in no evaluation prompt" in res.output, res.output


def test_legacy_clip_pools_at_the_end_token_not_at_the_placeholder(tmp_path):
    """A CLIP text model with the legacy ``eos_token_id`` 2 (SDXL's encoders) pools at the
    largest id, i.e. at an added token; adding tokens switches it to the first end token,
    which is the same position for every prompt without them (the end token being the largest
    base id, as in CLIP's vocabulary)."""
    from types import SimpleNamespace

    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from resalign.models.embeddings import add_placeholder_tokens

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in CLIP
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                        model_max_length=16)  # fmt: skip
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         projection_dim=16, eos_token_id=2,
                         bos_token_id=vocab["<|startoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    torch.manual_seed(0)
    enc = CLIPTextModelWithProjection(cfg).eval()

    def pooled(prompt: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids = tok([prompt], padding="max_length", max_length=16, return_tensors="pt").input_ids
        with torch.no_grad():
            out = enc.text_model(ids)
        eos = int((ids[0] == tok.eos_token_id).nonzero()[0])
        return out.pooler_output[0], out.last_hidden_state[0], eos

    before, _, _ = pooled("ab c")
    rows = {"text_encoder": torch.randn(1, 16)}
    add_placeholder_tokens(SimpleNamespace(tokenizer=tok, text_encoder=enc, family="sd"),
                           ["<x>"], rows)  # fmt: skip
    assert enc.text_model.eos_token_id == tok.eos_token_id
    after, _, _ = pooled("ab c")
    assert torch.equal(before, after)  # prompts without the token: unchanged
    got, hidden, eos = pooled("ab <x> c")
    assert torch.equal(got, hidden[eos])  # at the end token, not at "<x>" (position 3)
    assert not torch.equal(got, hidden[3])
