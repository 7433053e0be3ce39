"""report.html in a real browser: headless Chromium (Debian: apt-get install chromium) loads
the rendered fixture report, its DOM opens with the recommendation, and a screenshot shows
the page drawn with its styles and charts. Skipped, with the reason, where there is no
Chromium, unless GPTBENCH_REQUIRE_BROWSER=1 (CI sets it): then a missing Chromium fails."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gptbench.report import charts
from gptbench.report.render import render_report
from paths import FIXTURES

FIXTURE_SUITE = Path(FIXTURES) / "suite"

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RECOMMENDATION_RGB = (240, 246, 255)  # the recommendation box's background (#f0f6ff)
WIDTH_PX, HEIGHT_PX = 1280, 1600


@pytest.fixture(scope="module")
def browser():
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None and os.environ.get("GPTBENCH_REQUIRE_BROWSER") == "1":
        pytest.fail("GPTBENCH_REQUIRE_BROWSER=1 but no Chromium on this machine (Debian: "
                    "apt-get install chromium)")
    if found is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium); "
                    "report.html was not checked in a browser")
    return found


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    suite_dir = shutil.copytree(FIXTURE_SUITE, tmp_path_factory.mktemp("browser") / "suite")
    render_report(suite_dir)
    return suite_dir / "report.html"


def headless(browser: str, profile, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium's sandbox refuses to run as root, which test machines often are.
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def test_the_dom_opens_with_the_recommendation(browser, report_html, tmp_path):
    proc = headless(browser, tmp_path / "profile", "--dump-dom", report_html.as_uri())
    dom = proc.stdout
    assert proc.returncode == 0 and "<body>" in dom, proc.stderr[-2000:]
    assert dom.index('<section id="recommendation">') < dom.index("<h2>Findings</h2>")
    assert "2 ranks: pure_data_parallel (2gpu-dp2), 317.3 tokens/s, 1.75x the next best" in dom
    assert dom.count('<img src="data:image/png;base64,') == len(charts.CHARTS)


def test_a_screenshot_shows_the_page_drawn(browser, report_html, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = headless(browser, tmp_path / "profile", f"--window-size={WIDTH_PX},{HEIGHT_PX}",
                    f"--screenshot={shot}", report_html.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (WIDTH_PX, HEIGHT_PX)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50, "the page is blank or nearly so"
    box = sum(count for count, rgb in colours if rgb == RECOMMENDATION_RGB)
    assert box > 0.02 * WIDTH_PX * HEIGHT_PX, "the recommendation box was not drawn with its style"


def test_democheck_sees_every_chart_drawn_and_names_a_broken_one(browser, report_html, tmp_path):
    from gptbench import democheck

    assert democheck.browser_check(str(report_html.parent), browser) == []
    broken = shutil.copytree(report_html.parent, tmp_path / "broken")
    page = broken / "report.html"
    html = page.read_text(encoding="utf-8")
    start = html.index('<img src="data:image/png;base64,') + len('<img src="data:image/png;base64,')
    page.write_text(html[:start] + "bm90IGEgcG5n" + html[html.index('"', start):], encoding="utf-8")
    problems = democheck.browser_check(str(broken), browser)
    assert len(problems) == 1 and problems[0].startswith("--browser: a broken image: "), problems
