"""MLflow as a newcomer sees it, in a real browser (issue 21): Debian's Chromium headless,
driven by selenium through Debian's chromedriver, against the real ``mlflow server`` that
``resalign ui`` starts on 127.0.0.1 (and stops on Ctrl-C).

- The address ``resalign ui`` prints lands on the runs table (model-training view, not the
  GenAI overview), which lists the tiny spec's rows with their summary metrics as columns:
  resalign and plain side by side, each value the one MLflow's client returns.
- The report run's ``report.html`` renders inside MLflow's artifact viewer with its images.
- The standalone report's table fits a 1000-px window.

Where Chromium, chromedriver or selenium is missing the tests skip, saying what to install;
under CI (``CI=true``) they fail instead (``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow_ui import UiProcess

from resalign.cli import cli

SPEC = Path(__file__).resolve().parent / "specs" / "tiny.yaml"
# MLflow's UI took 25-40 s to draw the runs table on this loaded 2-core machine
WAIT = 240


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, p in (("chromium", chromium), ("chromedriver", driver)) if not p]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        msg = (
            f"no {', '.join(missing)}: apt-get install -y chromium chromium-driver "
            "(Debian) and pip install selenium (the dev extras)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the browser tests: {msg}")
        pytest.skip(msg)
    opts = Options()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1920,1080"):  # fmt: skip
        opts.add_argument(a)
    d = webdriver.Chrome(options=opts, service=Service(driver))
    d.set_page_load_timeout(WAIT)
    return d


@pytest.fixture()
def browser():
    d = _browser()
    yield d
    d.quit()


def _until(what, fn, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# The runs table (ag-grid): per displayed row, its cells by column id.
_GRID = """
const out = {};
document.querySelectorAll('[role=row][row-index]').forEach(r => {
  const i = r.getAttribute('row-index');
  r.querySelectorAll('[role=gridcell]').forEach(c => {
    (out[i] = out[i] || {})[c.getAttribute('col-id')] = c.innerText; });
});
return Object.values(out);
"""


@pytest.mark.slow
def test_resalign_ui_lands_on_the_runs_table_with_rows_side_by_side(tmp_path, browser):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", str(SPEC), "--store", str(store)])
    assert res.exit_code == 0, res.output
    c = MlflowClient(f"sqlite:///{store.resolve() / 'mlflow.db'}")
    exp = c.get_experiment_by_name("tiny").experiment_id
    summaries = {
        r.info.run_name: r.data.metrics
        for r in c.search_runs([exp], "tags.`resalign.kind` = 'summary'")
    }
    assert set(summaries) == {"original · tiny", "resalign u0 · tiny", "plain u0 · tiny"}
    report_run = c.search_runs([exp], "tags.`resalign.kind` = 'report'")[0].info.run_id

    ui = UiProcess(store, tmp_path / "ui.log")
    ui.start()
    try:
        (line,) = [x for x in ui.printed if x.strip().startswith("tiny: ")]
        url = line.split()[-1]
        assert url.startswith(f"{ui.url}/#/experiments/{exp}/runs?workflowType=machine_learning")
        # the assistant panel (open on first load) takes a third of the window
        browser.get(f"{ui.url}/health")
        browser.execute_script(
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')"
        )
        # the grid renders only the columns in view: wide enough for every summary metric
        # (with the unlearn/ medians 1400 px left the last ones unrendered)
        browser.set_window_size(3600, 700)
        browser.get(url)

        def table():
            rows = browser.execute_script(_GRID)
            named = {r.get("attributes.`Run Name`", "").split("\n")[-1]: r for r in rows}
            return named if set(summaries) <= set(named) else None

        rows = _until("the summary rows in the runs table", table)
        assert "Model training" in browser.find_element("tag name", "body").text
        for name in ("resalign u0 · tiny", "plain u0 · tiny"):
            for key, value in summaries[name].items():
                cell = rows[name][f"metrics.`{key}`"]  # a column per summary metric
                assert float(cell) == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)
        browser.save_screenshot(str(tmp_path / "runs_table.png"))

        # the report run's report.html in MLflow's artifact viewer: every image drawn
        browser.get(f"{ui.url}/#/experiments/{exp}/runs/{report_run}/artifacts/report.html")
        frame = _until(
            "the artifact viewer's iframe",
            lambda: browser.find_elements("css selector", "iframe.mlflow-html-iframe"),
        )[0]
        browser.switch_to.frame(frame)
        drawn = _until(
            "report.html's images",
            lambda: browser.execute_script(
                "const im = [...document.images];"
                "return im.length && im.every(i => i.complete && i.naturalWidth > 0)"
                " ? im.map(i => i.alt) : null"
            ),
        )
        assert {"concept_rate_vs_steps.png", "grids.png"} <= set(drawn)
        browser.switch_to.default_content()
    finally:
        ui.stop()


def test_the_report_table_fits_a_1000_px_window(tmp_path, browser):
    from test_report import ROWS, THREATS, make_store

    from resalign.evaluation.report import results_from_store, write_report

    graph = make_store(tmp_path / "runs")
    results = results_from_store(graph, tmp_path / "runs")
    write_report(results, tmp_path / "out", rows=ROWS, threats=THREATS, title="demo",
                 all_steps=True)  # fmt: skip
    browser.set_window_size(1000, 900)
    browser.get((tmp_path / "out" / "report.html").as_uri())
    width = browser.execute_script("return window.innerWidth")
    assert 900 < width <= 1000
    tables = browser.execute_script(
        "return [...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().right)"
    )
    assert tables and max(tables) <= width
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
