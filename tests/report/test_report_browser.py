"""The run report in a real headless browser: Chromium from the OS packages (`/usr/bin/chromium`).

Driven through Chromium's own command line, no browser driver package: `--dump-dom` of a copy of the
report with a small check script added (the report itself runs no script: its Content-Security-Policy
forbids it, so the copy leaves that one meta tag out) measures every chart and bar as laid out, and
`--screenshot` of the report itself is kept as a test artifact in `tests/artifacts/` (git-ignored; CI
keeps the folder). Each Chromium runs in its own process group with a fresh profile folder and a time
limit, and the group is ended afterwards, whatever happened.

Without Chromium the test is skipped, saying how to install it; in CI (CI=true) it fails instead: CI
installs Chromium first (.ci/run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import zlib
from html import unescape
from pathlib import Path

import pytest

from include.datafly_fullstory.report import REPORT_FILE
from include.datafly_fullstory.stats import read_stats

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
TIMEOUT_S = 90
INSTALL = (
    "Chromium is not installed, so the run report's browser test did not run. Install it from the OS "
    "packages (Debian/Ubuntu, as root: `apt-get install -y chromium`; CI's .ci/run does this), or point "
    "CHROMIUM at a Chromium or Chrome binary."
)
CHECK = """<script>
(function () {
  const box = (el) => { const b = el.getBoundingClientRect(); return [b.width, b.height]; };
  const charts = [...document.querySelectorAll("svg.chart")].map((svg) => {
    const bars = [...svg.querySelectorAll("rect.bar")];
    const positive = bars.filter((r) => parseFloat(r.dataset.value) > 0);
    const points = [...svg.querySelectorAll("circle.point")];
    const lines = [...svg.querySelectorAll("path.in-flight, polyline")];
    return {
      name: svg.dataset.chart, box: box(svg), bars: bars.length, positive: positive.length,
      drawn: positive.filter((r) => { const [w, h] = box(r); return w > 0 && h > 0; }).length,
      labels: positive.map((r) => r.dataset.label),
      points: points.filter((c) => { const [w, h] = box(c); return w > 0 && h > 0; }).length,
      lines: lines.filter((p) => { const b = p.getBBox(); return b.width > 0; }).length,
    };
  });
  const resources = performance.getEntriesByType("resource").map((e) => e.name);
  document.body.setAttribute("data-check", JSON.stringify({charts, resources, width: document.body.scrollWidth}));
})();
</script>"""


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; skips (fails in CI) before the demo run is made when there is none."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail(INSTALL, pytrace=False)
        pytest.skip(INSTALL)
    return path


def run_chromium(binary: str, profile: Path, *args: str) -> str:
    """One headless Chromium in its own process group (fresh profile), ended by group when done."""
    profile.mkdir(parents=True)
    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "HOME": str(profile)},
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish within {TIMEOUT_S}s: {err.decode(errors='replace')[-2000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers (zygote, renderer) left behind, if any
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode("utf-8", errors="replace")


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the (filtered) pixel bytes of a PNG, with the standard library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    idat, at = b"", 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        if kind == b"IDAT":
            idat += data[at + 8 : at + 8 + length]
        at += 12 + length
    return width, height, zlib.decompress(idat)


def test_the_report_renders_its_charts_in_chromium(chromium, report_demo, tmp_path):
    binary = chromium
    driver, runs, _ = report_demo
    store = driver.store(runs[-1])
    stats = read_stats(store)
    html = store.read_bytes(REPORT_FILE).decode("utf-8")
    policy = re.search(r'<meta http-equiv="Content-Security-Policy"[^>]*>', html)
    assert policy and "default-src 'none'" in policy.group(0)

    check = tmp_path / "check.html"
    check.write_text(
        html.replace(policy.group(0), "").replace("</body>", CHECK + "</body>"), encoding="utf-8"
    )
    dom = run_chromium(
        binary, tmp_path / "profile-dom", "--window-size=1280,1000", "--dump-dom", check.as_uri()
    )
    found = re.search(r'data-check="([^"]*)"', dom)
    assert found, f"the check script did not run: {dom[:500]}"
    result = json.loads(unescape(found.group(1)))
    charts = {c["name"]: c for c in result["charts"]}

    assert result["resources"] == []  # the page fetched nothing
    expected = {"outcome-shares", "rows-by-outcome", "events-by-name", "identification", "delivery-timeline"}
    assert expected <= set(charts)
    assert len([n for n in charts if n.startswith("trend-")]) == 10
    for chart in result["charts"]:
        assert chart["box"][0] > 0 and chart["box"][1] > 0, chart
        assert chart["drawn"] == chart["positive"], chart  # every bar with a value has a box
    outcomes = [o for o, n in stats["rows"].items() if o != "read" and n]
    assert sorted(charts["rows-by-outcome"]["labels"]) == sorted(outcomes)
    assert sorted(charts["outcome-shares"]["labels"]) == sorted(outcomes)
    assert charts["events-by-name"]["drawn"] == min(16, len(stats["events_by_name"]))
    timeline = charts["delivery-timeline"]
    assert timeline["lines"] >= 1 and timeline["drawn"] >= 3  # in flight; items/s; retries and 429s
    assert any(label.startswith("throttled") for label in timeline["labels"])
    assert charts["trend-delivered_share"]["points"] == len(runs)  # two earlier runs and this one
    assert charts["trend-delivered_share"]["lines"] == 1
    assert result["width"] <= 1280  # nothing wider than the window

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "run_report.png"
    shot.unlink(missing_ok=True)
    run_chromium(
        binary,
        tmp_path / "profile-shot",
        "--window-size=1280,4000",
        f"--screenshot={shot}",
        Path(store.path(REPORT_FILE)).as_uri(),
    )
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (1280, 4000)
    assert len(set(pixels)) > 64, "the screenshot is blank"
    (ARTIFACTS / "run_report.check.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"screenshot of the run report: {shot}")
