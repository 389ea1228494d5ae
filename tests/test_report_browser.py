"""The HTML report in a real browser (issue 16): headless Chromium, driven by playwright through
Debian's chromium (``.ci/run`` installs it), at a phone's 390 px and a laptop's 1280 px.

At both widths: the page body does not scroll sideways (tables and figures scroll in their own
boxes), every image is decoded, no network request is made (the file is self-contained), and the
verdict table has one row per cell. The screenshots are kept as test artifacts in
``$NTRL_TEST_ARTIFACTS`` (default: ``test-artifacts/`` in the repository).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("NTRL_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from ntrl.study import StudyConfig
    from ntrl.study.rarity import rarity

    out = tmp_path_factory.mktemp("browser") / "browser"
    study = StudyConfig(name="browser", policies=["single_logit", "mlp"], optimizers=["sgd", "npg"], p0s=[0.05, 0.005],
                        seeds=2, extinction_steps=300, width=8, well_p0s=[0.1, 0.03], price_scales=[1.0, 0.5])
    rarity(study, out, workers=2, wandb_mode="disabled", progress=False)
    return out


@pytest.mark.parametrize("width", [390, 1280])
def test_report_in_headless_chromium(report, width):
    exe = chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium for the report test (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    n_cells = sum(1 for _ in csv.DictReader(open(report / "verdicts.csv", encoding="utf-8")))
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto((report / "report.html").as_uri())
            page.wait_for_load_state("load")
            sizes = page.evaluate("""() => ({
                scroll: document.documentElement.scrollWidth, body: document.body.scrollWidth,
                inner: window.innerWidth,
                images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]),
                rows: document.querySelectorAll('table.verdicts')[0].tBodies[0].rows.length,
                markdownLeft: document.body.innerText.includes('**'),
            })""")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"report-{width}px.png"), full_page=False)
        finally:
            browser.close()
    assert sizes["scroll"] <= sizes["inner"] and sizes["body"] <= sizes["inner"], sizes
    assert len(sizes["images"]) >= 5 and all(ok and w > 0 for ok, w in sizes["images"]), sizes["images"]
    assert sizes["rows"] == n_cells == 4
    assert not sizes["markdownLeft"]
    foreign = [u for u in requests if not u.startswith(("file:", "data:"))]
    assert not foreign, foreign
