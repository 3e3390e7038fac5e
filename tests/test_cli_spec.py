"""The CLI around specs: round trip of every shipped spec, JSON Schema, import hygiene, stubs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from resalign import __version__
from resalign.cli import cli
from resalign.spec import load_yaml_text
from resalign.spec.compose import compose_text

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "specs").glob("*.yaml"))


def test_specs_are_shipped() -> None:
    assert "sd14_sexual.yaml" in {p.name for p in SHIPPED}


@pytest.mark.parametrize("spec", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_spec_validates_plans_and_fits_json_schema(spec: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")  # in the dev extra
    runner = CliRunner()
    res = runner.invoke(cli, ["validate", str(spec)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"ok {spec}: ") and res.output.rstrip().endswith("nodes")
    res = runner.invoke(cli, ["plan", str(spec)])
    assert res.exit_code == 0, res.output
    assert "report" in res.output
    res = runner.invoke(cli, ["plan", "--mermaid", str(spec)])
    assert res.exit_code == 0 and res.output.startswith("flowchart TD")
    schema = json.loads(runner.invoke(cli, ["schema"]).output)
    data, _ = load_yaml_text(spec.read_text(), str(spec))
    if "extends" not in data:  # an editor sees the file as written
        jsonschema.validate(data, schema)
    composed, _, _ = compose_text(spec.read_text(), str(spec), spec.parent, path=spec)
    jsonschema.validate(composed, schema)


def test_json_schema_rejects_a_misspelt_key() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(CliRunner().invoke(cli, ["schema"]).output)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "model": {"family": "tiny"}, "conceptz": {}}, schema)


def test_schema_output_file(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    res = CliRunner().invoke(cli, ["schema", "--output", str(out)])
    assert res.exit_code == 0
    assert json.loads(out.read_text())["title"] == "resalign spec"


def test_sd14_spec_is_the_paper_setting() -> None:
    from resalign.spec import load_spec

    r = load_spec(ROOT / "specs" / "sd14_sexual.yaml")
    s = r.spec
    assert s.model.pretrained == "CompVis/stable-diffusion-v1-4"
    assert s.model.trainable.kind == "lora" and s.model.trainable.rank == 4
    configs = s.unlearn.resilience.meta.configs
    algos = [c.algorithm for c in configs.values()]
    assert len(configs) == 15 and algos.count("lora") == 13 and algos.count("dreambooth") == 1
    full = next(c for c in configs.values() if c.algorithm == "full")
    assert (full.optimizer, full.lr, full.steps) == ("adamw", 1e-6, 5)
    lora = [c for c in configs.values() if c.algorithm == "lora"]
    assert {c.lr for c in lora} == {1e-4, 1e-5, 1e-6}
    assert {c.steps for c in lora} <= {5, 10, 20, 30} and {c.optimizer for c in lora} == {
        "sgd",
        "adam",
    }
    assert set(s.threats) == {"dreambench", "diffusiondb"}
    assert {m.kind for m in s.evaluate.metrics} == {"nudenet_ip", "fid"}


def test_validate_several_reports_each(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    good = ROOT / "specs" / "sd14_sexual.yaml"
    res = CliRunner().invoke(cli, ["validate", str(good), str(bad)])
    assert res.exit_code == 2
    assert f"ok {good}:" in res.output and f"{bad}:1:1: missing required key" in res.output


def test_bench_without_a_name_prints_usage_and_exits_2() -> None:
    res = CliRunner().invoke(cli, ["bench"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output


def test_version_and_help() -> None:
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
    res = CliRunner().invoke(cli, ["--help"])
    for command in ("validate", "plan", "schema", "run", "report", "ui", "grid"):
        assert command in res.output


LIGHT = """
import sys
from resalign.cli import main
sys.argv = ["resalign"] + sys.argv[1:]
try:
    main()
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "diffusers", "peft", "mlflow", "transformers") if m in sys.modules]
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["validate", "specs/sd14_sexual.yaml"],
        ["plan", "specs/sd14_sexual.yaml"],
        ["plan", "specs/digits_demo.yaml", "--estimate", "--store", "tests/specs"],
        ["grid", "templates/attack_search_digits.yaml.j2", "--list", "--estimate"],
        ["schema"],
    ],
    ids=["help", "validate", "plan", "plan-estimate", "grid-estimate", "schema"],
)
def test_light_commands_import_no_heavy_library(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-c", LIGHT, *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert "HEAVY=\n" in proc.stderr or proc.stderr.rstrip().endswith("HEAVY="), proc.stderr
    assert "Traceback" not in proc.stderr
    # CPU time, not wall time: the 5 s wall bound this replaced failed whenever a study shared
    # the 2 cores, while a command's own CPU time barely moves with load (measured: 0.45 s for
    # validate, 1.1 s for grid --estimate, at load 2). The HEAVY line above is what catches a
    # heavy import; this bound catches slow work of our own.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 3, cpu


def test_python_dash_m(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "resalign", "validate", "specs/sd14_sexual.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ok specs/sd14_sexual.yaml: ")
