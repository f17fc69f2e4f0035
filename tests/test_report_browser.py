"""The report page in a real browser: headless Chromium loads index.html and every figure must decode.

A copy of the page gets a small inline script that, on the load event, writes one line per <img>
(``src=ok:naturalWidth`` or ``src=broken``) into the DOM; ``chromium --headless --dump-dom`` prints it.
No Selenium or Playwright. Skipped when Chromium is absent (Debian: apt-get install -y chromium).
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import maskfer_fixtures as mf
from test_report import EXTRA, read_page, report_fixtures

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=15000"]

CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var lines = [];
  document.querySelectorAll('img').forEach(function (img) {
    var ok = img.complete && img.naturalWidth > 0;
    lines.push(img.getAttribute('src') + '=' + (ok ? 'ok:' + img.naturalWidth + 'x' + img.naturalHeight : 'broken'));
  });
  var pre = document.createElement('pre');
  pre.id = 'img-check';
  pre.textContent = 'IMGCHECK\\n' + lines.join('\\n') + '\\nEND';
  document.body.appendChild(pre);
});
</script>"""


# checked before any fixture is built, so a machine without Chromium skips at once
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not found: install Chromium for this "
                                "test (Debian: apt-get install -y chromium; or set CHROMIUM=/path/to/chromium)")


def chromium(*args: str, user_dir: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={user_dir}", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_every_figure_loads_in_headless_chromium(tmp_path_factory, tmp_path, tiny_clip_dir):
    pytest.importorskip("matplotlib", reason=EXTRA)
    pytest.importorskip("sklearn", reason=EXTRA)
    from PIL import Image

    from maskfer.report import write_report

    fx = report_fixtures(tmp_path_factory.getbasetemp() / "report_fx", tiny_clip_dir)
    out = tmp_path / "report"
    # a sweep page: heat-maps plus the selected run's figures from the selected/ subfolder
    index = write_report(fx["sweep"], out=out, baseline=fx["baseline"], log=mf.quiet)
    _, page = read_page(index)
    assert len(page.imgs) >= 6

    check = out / "check.html"  # same folder, so the relative <img> paths resolve as in index.html
    check.write_text(index.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    proc = chromium("--dump-dom", check.as_uri(), user_dir=tmp_path / "chromium-profile")
    m = re.search(r"IMGCHECK\n(.*?)\nEND", proc.stdout, re.S)
    assert m, f"no image report in the DOM (rc {proc.returncode}); stderr:\n{proc.stderr[-2000:]}"
    seen = dict(line.rsplit("=", 1) for line in m.group(1).splitlines())
    assert sorted(seen) == sorted(set(page.imgs))
    broken = [src for src, state in seen.items() if not state.startswith("ok:")]
    assert not broken, f"figures that did not load: {broken}"
    for src, state in seen.items():
        with Image.open(out / src) as im:
            assert state == f"ok:{im.width}x{im.height}", (src, state)
