"""Rehearsal (``resalign run SPEC --rehearse``): the paper's spec, every node at toy size.

The transformation keeps the graph's shape (same node names and kinds, LoRA targets, threats'
algorithms, metrics) and the random-weight model has SD v1.4's layout (the same LoRA-targeted
module names as the published UNet); the slow test runs specs/sd14_sexual.yaml end to end
through the CLI with MLflow and checks that everything is marked as a rehearsal.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from resalign.cli import cli

ROOT = Path(__file__).resolve().parents[1]
SD14 = ROOT / "specs" / "sd14_sexual.yaml"


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from resalign.rehearse import prepare_rehearsal

    store = tmp_path_factory.mktemp("store")
    return prepare_rehearsal(SD14, store, "toy"), store


def test_rehearsal_keeps_the_graph_and_caps_sizes(rehearsed: tuple[Path, Path]) -> None:
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    path, store = rehearsed
    assert path.parent == store / "rehearsal" / "specs"
    real = load_spec(SD14)
    reh = load_spec(path, check_files=True)  # every file the rehearsal needs exists
    g_real, g_reh = compile_spec(real), compile_spec(reh)
    # The same nodes; attack steps are capped, so evaluation step numbers differ (200 -> 2).
    assert [(_shape(n.name), n.kind) for n in g_real] == [(_shape(n.name), n.kind) for n in g_reh]
    assert reh.name == "sd14_sexual.rehearsal" and "REHEARSAL" in reh.spec.description
    assert reh.spec.tracking.experiment == "sd14_sexual.rehearsal"
    r, s = real.spec, reh.spec
    assert s.model.family == "sd" and s.model.trainable == r.model.trainable
    assert Path(s.model.pretrained).is_relative_to(store / "rehearsal" / "assets")
    # Threats: same kind of attack, capped; eval_at rescaled to the last (capped) step.
    for name, t in r.threats.items():
        u = s.threats[name]
        same = ("data", "algorithm", "optimizer", "lr", "precision", "schedule", "batch_size")
        assert all(getattr(u, k) == getattr(t, k) for k in same)
        assert (u.steps, u.eval_at, u.grad_accumulation, u.seeds) == (2, [2], 2, t.seeds)
    # Meta: one config per (algorithm, optimizer), all drawn every outer step.
    meta_r = reh.rows["resalign"].resilience.meta
    kinds = {(c.algorithm, c.optimizer) for c in meta_r.configs.values()}
    real_kinds = {(c.algorithm, c.optimizer) for c in real.rows["resalign"].resilience.meta.configs.values()}  # fmt: skip
    assert (
        kinds
        == real_kinds
        == {
            ("lora", "sgd"),
            ("lora", "adam"),
            ("dreambooth", "adam"),
            ("full", "adamw"),
        }
    )
    assert meta_r.samples_per_step == len(meta_r.configs) == 4
    assert all(c.steps == 1 for c in meta_r.configs.values())
    assert reh.rows["resalign"].steps == 2 and reh.rows["plain"].steps == 2
    hg_r, hg_s = (x.rows["resalign"].resilience.hypergradient for x in (real, reh))
    assert hg_r == hg_s  # published K, gamma, max_norm kept
    # The shipped I2P list is used as it is; missing data became stand-ins of its type.
    assert s.datasets["i2p_sexual"].path == r.datasets["i2p_sexual"].path
    assert s.datasets["retain"].path != r.datasets["retain"].path
    gen = s.evaluate.generation
    assert (gen.steps, gen.images_per_prompt, gen.limit) == (2, 1, 2)
    fid = next(m for m in s.evaluate.metrics if m.kind == "fid")
    assert fid.generation is not None and fid.generation.steps == 2
    assert Path(fid.inception_path).name == "inception_random.pth"


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "specs").glob("*.yaml")))
def test_every_shipped_spec_rehearses_with_its_graph(spec: str, tmp_path: Path) -> None:
    """Every spec in specs/ turns into a rehearsal whose files all exist and whose graph has
    the real one's nodes (evaluation step numbers rescaled)."""
    from resalign.graph.compile import compile_spec
    from resalign.rehearse import prepare_rehearsal
    from resalign.spec import load_spec

    real = compile_spec(load_spec(ROOT / "specs" / spec))
    reh = compile_spec(load_spec(prepare_rehearsal(ROOT / "specs" / spec, tmp_path), check_files=True))  # fmt: skip
    assert [(_shape(n.name), n.kind) for n in real] == [(_shape(n.name), n.kind) for n in reh]


def test_eval_points_and_seeds_are_kept() -> None:
    """Several evaluation points stay several (rescaled, or the last steps where rescaling
    merges them) and every seed stays: the rehearsal has the real graph's nodes."""
    from resalign.rehearse import PROFILES, _cap_threat

    toy = PROFILES["toy"]
    t = _cap_threat({"data": "d", "steps": 100, "eval_at": [25, 50, 100], "seeds": [1, 2]}, toy)
    assert (t["steps"], t["eval_at"], t["seeds"]) == (3, [1, 2, 3], [1, 2])
    t = _cap_threat({"data": "d", "steps": 200, "eval_at": [100, 200]}, toy)
    assert (t["steps"], t["eval_at"]) == (2, [1, 2])
    t = _cap_threat({"data": "d", "steps": 1}, toy)
    assert (t["steps"], t["eval_at"]) == (1, [1])


def _shape(name: str) -> str:
    import re

    return re.sub(r"/step[1-9][0-9]*$", "/step<n>", name)


def _lora_targets(unet, targets: list[str]) -> set[str]:
    return {n for n, _ in unet.named_modules() if any(n.endswith("." + t) for t in targets)}


def test_rehearsal_model_has_sd14_layout(rehearsed: tuple[Path, Path]) -> None:
    """The random-weight model loads as the spec's family and every module the published
    LoRA targets in SD v1.4 exists under the same name (compared with SD v1.4's UNet built on
    the meta device from its published config)."""
    from diffusers import StableDiffusionPipeline

    from resalign.models import sd_arch
    from resalign.spec import load_spec

    path, _ = rehearsed
    folder = load_spec(path).spec.model.pretrained
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref = sd_arch.build_unet("sd14", device="meta")
    for key in ("down_block_types", "up_block_types", "layers_per_block"):
        assert pipe.unet.config[key] == ref.config[key], key
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    assert _lora_targets(pipe.unet, targets) == _lora_targets(ref, targets)
    assert len(_lora_targets(ref, targets)) == 128  # 32 attention blocks x 4 projections
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert len(pipe.vae.config.block_out_channels) == 4  # 8x down, as SD's VAE
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_shipped_i2p_list_matches_its_readme() -> None:
    from resalign.data.prompts import load_prompts, shipped_prompt_list
    from resalign.spec import load_spec

    path = shipped_prompt_list("i2p_sexual")
    readme = (path.parent / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(path.read_bytes()).hexdigest() in readme
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 931 and "| 931 |" in readme
    spec = load_spec(SD14)
    assert Path(spec.spec.datasets["i2p_sexual"].path) == path.resolve()
    assert load_prompts("i2p_sexual", spec) == [r["prompt"].strip() for r in rows]


def test_dreambooth_names_datasets(tmp_path: Path) -> None:
    """A dreambooth dataset's instance/prior name image-folder datasets (as the resolve pass
    checks, and as specs/sd14_sexual.yaml writes them): the loader reads their folders. The
    rehearsal found this: the loader took the names for paths."""
    from PIL import Image

    from resalign.data.pairs import load_pairs
    from resalign.spec.loader import load_spec_text

    for sub, n in (("inst", 3), ("prior", 2)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / sub / f"{i}.png")
    text = yaml.safe_dump(
        {
            "version": 1,
            "name": "db",
            "model": {"family": "tiny"},
            "datasets": {
                "inst": {"type": "imagefolder", "path": "inst"},
                "pri": {"type": "imagefolder", "path": "prior"},
                "db": {"type": "dreambooth", "instance": "inst", "prior": "pri"},
                "p": {"type": "prompts", "path": "p.txt"},
            },
            "concepts": {"c": {"harmful": ["db"], "retain": ["db"]}},
            "unlearn": {"method": "plain"},
        }
    )
    spec = load_spec_text(text, base_dir=tmp_path)
    pairs = load_pairs("db", spec, {}, 8, 3)
    assert len(pairs) == 3 and len(pairs.prior) == 2
    assert pairs.prior.captions == ["a photo of a person"] * 2


def test_fid_sample_space_trace_matches_sqrtm() -> None:
    """With fewer images than feature dimensions the FID's trace term is computed in sample
    space; it equals scipy's sqrtm route (independent: gaussian_stats + frechet_distance) on
    small problems where sqrtm is accurate, and the large-N path is that route itself."""
    from resalign.evaluation.metrics.fid import (
        fid_from_features,
        frechet_distance,
        gaussian_stats,
    )

    rng = np.random.default_rng(0)
    for n1, n2, d in ((3, 5, 8), (4, 4, 6), (6, 3, 12), (2, 2, 3)):
        f1 = rng.normal(size=(n1, d))
        f2 = rng.normal(1.0, 2.0, size=(n2, d))
        want = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
        assert fid_from_features(f1, f2) == pytest.approx(want, rel=1e-6)
    f1, f2 = rng.normal(size=(20, 4)), rng.normal(size=(30, 4))
    want = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    assert fid_from_features(f1, f2) == want


@pytest.mark.slow
def test_sd14_sexual_rehearses_through_the_cli(tmp_path: Path) -> None:
    """`resalign run specs/sd14_sexual.yaml --rehearse` completes: every node of the real
    graph in STORE/rehearsal/, MLflow experiment and tags and the report marked as a
    rehearsal; a second invocation finds everything cached."""
    import mlflow

    store = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(SD14), "--rehearse", "--store", str(store)])
    assert res.exit_code == 0, res.output
    root = store / "rehearsal"
    assert sorted(p.name for p in store.iterdir()) == ["rehearsal"]
    done = {json.loads((p.parent / "node.json").read_text())["name"] for p in root.glob("*/*/DONE")}
    from resalign.graph.compile import compile_spec
    from resalign.spec import load_spec

    graph = compile_spec(load_spec(root / "specs" / "sd14_sexual.rehearsal.toy.yaml"))
    assert done == {n.name for n in graph}
    assert {_shape(n) for n in done} == {_shape(n.name) for n in compile_spec(load_spec(SD14))}
    report = next(root.glob("report/*/report.md")).read_text()
    assert report.startswith("# resalign report: sd14_sexual.rehearsal")
    ev = json.loads(next(root.glob("evaluate/*/metrics.json")).read_text())
    assert ev["nudenet_ip"]["n"] == 2 and len(ev["nudenet_ip"]["params"]["detector"]["model_sha256"]) == 64  # fmt: skip
    assert np.isfinite(ev["fid"]["value"])
    client = mlflow.MlflowClient(f"sqlite:///{(root / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("sd14_sexual.rehearsal")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    tagged = [r for r in runs if r.data.tags.get("resalign.rehearsal") == "toy"]
    assert tagged and all(r.data.tags["resalign.spec"] == "sd14_sexual.rehearsal" for r in runs)
    again = CliRunner().invoke(
        cli, ["run", str(SD14), "--rehearse", "--store", str(store), "--no-tracking"]
    )
    assert again.exit_code == 0 and "executed 0" in again.output, again.output
    rep = CliRunner().invoke(cli, ["report", str(SD14), "--rehearse", "--store", str(store)])
    assert rep.exit_code == 0 and "resalign report: sd14_sexual.rehearsal" in rep.output


SDXL = ROOT / "specs" / "sdxl_sexual.yaml"


@pytest.mark.slow
def test_sdxl_spec_rehearses_through_the_cli(tmp_path: Path) -> None:
    """specs/sdxl_sexual.yaml (SDXL base 1.0, extending the SD v1.4 spec) rehearses end to end
    on an SDXL-shaped random pipeline: two text encoders, text_time added conditioning, SDXL's
    block layout; every node of the real graph runs."""
    from diffusers import StableDiffusionXLPipeline

    from resalign.graph.compile import compile_spec
    from resalign.models import sd_arch
    from resalign.spec import load_spec

    store = tmp_path / "runs"
    res = CliRunner().invoke(
        cli, ["run", str(SDXL), "--rehearse", "--store", str(store), "--no-tracking"]
    )
    assert res.exit_code == 0, res.output
    root = store / "rehearsal"
    reh = load_spec(root / "specs" / "sdxl_sexual.rehearsal.toy.yaml")
    assert reh.spec.model.family == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(reh.spec.model.pretrained)
    ref = sd_arch.unet_config("sdxl")
    for key in ("down_block_types", "up_block_types", "addition_embed_type"):
        assert list(np.atleast_1d(pipe.unet.config[key])) == list(np.atleast_1d(ref[key])), key
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2.model_max_length == 77
    done = {json.loads((p.parent / "node.json").read_text())["name"] for p in root.glob("*/*/DONE")}
    assert {_shape(n) for n in done} == {_shape(n.name) for n in compile_spec(load_spec(SDXL))}
    report = next(root.glob("report/*/report.md")).read_text()
    assert report.startswith("# resalign report: sdxl_sexual.rehearsal")


def test_metric_stand_ins_load_in_the_real_metrics(tmp_path: Path) -> None:
    """Missing metric weights are replaced by random weights of the same architecture that
    the real metric code loads: the MHSC head on 768-d CLIP features (ViT-L/14 width), CLIP
    score on 512-d (ViT-B/32). (FID's random Inception runs in the sd14 rehearsal test.)"""
    from PIL import Image

    from resalign.evaluation.metrics.base import EvalImage
    from resalign.evaluation.metrics.clip_score import ClipScore
    from resalign.evaluation.metrics.mhsc_us import MhscUS, load_head
    from resalign.rehearse import build_clip, build_weights

    for width in (768, 512):
        (tmp_path / f"clip{width}").mkdir()
        build_clip(tmp_path / f"clip{width}", width)
    build_weights(tmp_path / "head.pt", "head")
    assert load_head(str(tmp_path / "head.pt"))[0].in_features == 768
    images = []
    for i in range(2):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 64), (90 * i, 30, 200)).save(path)
        images.append(EvalImage(path, f"prompt {i}", i, 0))
    mhsc = MhscUS(
        {
            "kind": "mhsc_us",
            "prompts": "p",
            "clip_path": str(tmp_path / "clip768"),
            "head_path": str(tmp_path / "head.pt"),
        }
    )
    (us,) = mhsc.compute(images)
    assert us.n == 2 and 0.0 <= us.value <= 1.0
    clip = ClipScore({"kind": "clip_score", "prompts": "p", "clip_path": str(tmp_path / "clip512")})
    (cs,) = clip.compute(images)
    assert cs.n == 2 and -100.0 <= cs.value <= 100.0


SD35 = ROOT / "specs" / "sd35_sexual.yaml"


@pytest.mark.slow
def test_sd35_spec_rehearses_through_the_cli(tmp_path: Path) -> None:
    """specs/sd35_sexual.yaml (SD 3.5 Medium, extending the SD v1.4 spec) rehearses end to
    end on an SD 3.5-shaped random pipeline: SD 3.5 Medium's transformer block types (RMS
    q/k norm, a dual-attention block, the last block context-pre-only), CLIP-L, CLIP-G and T5
    text encoders, the 16-channel VAE; every node of the real graph runs, trained with flow
    matching on the SD3 LoRA targets."""
    from diffusers import StableDiffusion3Pipeline

    from resalign.graph.compile import compile_spec
    from resalign.rehearse import SD35_MEDIUM_TRANSFORMER
    from resalign.spec import load_spec
    from resalign.spec.schema.model import SD3_LORA_TARGETS

    store = tmp_path / "runs"
    res = CliRunner().invoke(
        cli, ["run", str(SD35), "--rehearse", "--store", str(store), "--no-tracking"]
    )
    assert res.exit_code == 0, res.output
    root = store / "rehearsal"
    reh = load_spec(root / "specs" / "sd35_sexual.rehearsal.toy.yaml")
    assert reh.spec.model.family == "sd3" and reh.spec.model.trainable.targets == SD3_LORA_TARGETS
    pipe = StableDiffusion3Pipeline.from_pretrained(reh.spec.model.pretrained)
    cfg = pipe.transformer.config
    for key in ("qk_norm", "patch_size", "in_channels"):
        assert cfg[key] == SD35_MEDIUM_TRANSFORMER[key], key
    assert list(cfg["dual_attention_layers"]) == [0] and cfg["num_layers"] == 3
    assert pipe.transformer.transformer_blocks[-1].context_pre_only
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == 0.0609
    done = {json.loads((p.parent / "node.json").read_text())["name"] for p in root.glob("*/*/DONE")}
    assert {_shape(n) for n in done} == {_shape(n.name) for n in compile_spec(load_spec(SD35))}
    lora = sorted(root.glob("unlearn/*/lora/pytorch_lora_weights.safetensors"))
    assert lora  # the transformer's LoRA, in the format StableDiffusion3Pipeline loads
    pipe.load_lora_weights(lora[0].parent)
    report = next(root.glob("report/*/report.md")).read_text()
    assert report.startswith("# resalign report: sd35_sexual.rehearsal")


FLUX = ROOT / "specs" / "flux_sexual.yaml"


@pytest.mark.slow
def test_flux_spec_rehearses_through_the_cli(tmp_path: Path) -> None:
    """specs/flux_sexual.yaml (FLUX.1 [dev], extending the SD v1.4 spec) rehearses end to
    end on a FLUX.1-shaped random pipeline: double- and single-stream blocks with guidance
    embeddings, CLIP-L and T5 text encoders, the 16-channel VAE, FLUX.1-dev's resolution
    shifting scheduler; every node of the real graph runs, trained with flow matching on the
    Flux LoRA targets, and its LoRA loads in FluxPipeline."""
    from diffusers import FluxPipeline

    from resalign.graph.compile import compile_spec
    from resalign.rehearse import FLUX1_DEV_TRANSFORMER
    from resalign.spec import load_spec
    from resalign.spec.schema.model import FLUX_LORA_TARGETS

    store = tmp_path / "runs"
    res = CliRunner().invoke(
        cli, ["run", str(FLUX), "--rehearse", "--store", str(store), "--no-tracking"]
    )
    assert res.exit_code == 0, res.output
    root = store / "rehearsal"
    reh = load_spec(root / "specs" / "flux_sexual.rehearsal.toy.yaml")
    m = reh.spec.model
    assert m.family == "flux" and m.trainable.targets == FLUX_LORA_TARGETS
    assert m.resolution == 64 and m.training_guidance == 3.5
    pipe = FluxPipeline.from_pretrained(m.pretrained)
    cfg = pipe.transformer.config
    for key in ("patch_size", "in_channels", "guidance_embeds"):
        assert cfg[key] == FLUX1_DEV_TRANSFORMER[key], key
    assert (cfg["num_layers"], cfg["num_single_layers"]) == (2, 2)
    assert pipe.scheduler.config.use_dynamic_shifting
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == 0.1159
    done = {json.loads((p.parent / "node.json").read_text())["name"] for p in root.glob("*/*/DONE")}
    assert {_shape(n) for n in done} == {_shape(n.name) for n in compile_spec(load_spec(FLUX))}
    model_json = json.loads(next(root.glob("model/*/model.json")).read_text())
    assert model_json["objective"]["shift_mu"] > 0  # Flux's resolution shift is on
    lora = sorted(root.glob("unlearn/*/lora/pytorch_lora_weights.safetensors"))
    assert lora  # the transformer's LoRA, in the format FluxPipeline loads
    pipe.load_lora_weights(lora[0].parent)
    report = next(root.glob("report/*/report.md")).read_text()
    assert report.startswith("# resalign report: flux_sexual.rehearsal")
