"""Did `make demo` do its job? Every configuration of the suite that can be formed must be
recorded `ok` with parity passed; the others `not_applicable`. CI runs this after
`make demo`:

    python -m gptbench.democheck [--browser] [SUITE_YAML] [OUTPUT_DIR]

`--browser` also opens the suite's report.html in headless Chromium, as a user would, and
checks what the browser made of it: the recommendation and its table, the tables, every
chart of the folder drawn (each image decoded by the browser: no broken image).

Prints one line per problem and exits 1, or a one-line summary and exits 0.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from gptbench import launcher, results
from gptbench.errors import UserError
from gptbench.suite import load_suite

SUITE = "deepspeed_configs/demo-cpu.yaml"


def check(suite_path: str, output_dir: str | None = None) -> tuple[list[str], dict]:
    """(problems, count of each expected status) for the suite's records."""
    suite = load_suite(suite_path, output_dir)
    problems, counts = [], {}
    for run in suite.runs:
        expected = ("not_applicable"
                    if launcher.prepare(suite.base, list(run.overrides), run.ranks).not_applicable
                    else "ok")
        counts[expected] = counts.get(expected, 0) + 1
        path = results.run_path(suite.output_dir, run.run_id)
        record = results.read_record(path)
        if record is None:
            problems.append(f"{run.run_id}: no readable record at {path}")
        elif record["status"] != expected:
            problems.append(f"{run.run_id}: {record['status']} where {expected} was expected: "
                            f"{record.get('error')}")
        elif expected == "ok" and (record.get("parity") or {}).get("passed") is not True:
            parity = record.get("parity") or {}
            problems.append(f"{run.run_id}: parity not passed (tokens_match "
                            f"{parity.get('tokens_match')}, max |dlogit| "
                            f"{parity.get('max_abs_logit_diff')}, tolerance "
                            f"{parity.get('tolerance')})")
    return problems, counts


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Appended to a copy of the page: once everything has loaded, the browser writes what it
# drew into the DOM, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const out = document.createElement("pre");
  out.id = "democheck";
  out.textContent = JSON.stringify({
    images: images.length,
    broken: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    recommendation: !!document.querySelector("section#recommendation"),
    recommendation_tables: document.querySelectorAll("section#recommendation table").length,
    tables: document.querySelectorAll("table").length,
  });
  document.body.appendChild(out);
});
</script>"""


def find_browser() -> str | None:
    return next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


def browser_check(output_dir: str, browser: str | None = None) -> list[str]:
    """What headless Chromium shows of output_dir/report.html; the problems found."""
    import json

    from gptbench.report.charts import CHARTS

    browser = browser or find_browser()
    if browser is None:
        return ["--browser: no Chromium on this machine (Debian: apt-get install chromium)"]
    page = os.path.join(output_dir, "report.html")
    if not os.path.isfile(page):
        return [f"--browser: no report at {page}"]
    charts = [name for name in CHARTS if os.path.isfile(os.path.join(output_dir, name))]
    with tempfile.TemporaryDirectory(prefix="democheck-") as tmp:
        probe = os.path.join(tmp, "report.html")
        with open(page, encoding="utf-8") as f:
            html = f.read()
        with open(probe, "w", encoding="utf-8") as f:
            f.write(html.replace("</body>", PROBE + "</body>"))
        # --no-sandbox: Chromium's sandbox refuses to run as root (CI machines often are).
        proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                               f"--user-data-dir={os.path.join(tmp, 'profile')}",
                               "--virtual-time-budget=10000", "--dump-dom",
                               "file://" + os.path.abspath(probe)],
                              capture_output=True, text=True, timeout=180)
    dom = proc.stdout
    start = dom.find('<pre id="democheck">')
    if start < 0:
        return [f"--browser: {browser} did not load {page} (exit {proc.returncode}): "
                f"{proc.stderr.strip().splitlines()[-1:] or ''}"]
    import html as html_lib

    seen = json.loads(html_lib.unescape(dom[start + len('<pre id="democheck">'):
                                            dom.index("</pre>", start)]))
    problems = []
    if not seen["recommendation"]:
        problems.append("--browser: the page has no recommendation section")
    elif not seen["recommendation_tables"]:
        problems.append("--browser: the recommendation has no table")
    if seen["tables"] < 3:
        problems.append(f"--browser: {seen['tables']} table(s) drawn, expected at least 3")
    if seen["images"] != len(charts):
        problems.append(f"--browser: {seen['images']} chart(s) on the page, but the folder "
                        f"holds {len(charts)} ({', '.join(charts)})")
    for alt in seen["broken"]:
        problems.append(f"--browser: a broken image: {alt}")
    return problems


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    browser = "--browser" in args
    args = [a for a in args if a != "--browser"]
    suite_path = args[0] if args else SUITE
    try:
        problems, counts = check(suite_path, args[1] if len(args) > 1 else None)
        if browser:
            problems += browser_check(load_suite(suite_path, args[1] if len(args) > 1
                                                 else None).output_dir)
    except UserError as e:
        print(f"democheck: error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"democheck: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"democheck: {suite_path}: {counts.get('ok', 0)} ok with parity passed, "
          f"{counts.get('not_applicable', 0)} not applicable, as expected"
          + ("; the report opens in a browser with its recommendation, tables and every "
             "chart drawn" if browser else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
