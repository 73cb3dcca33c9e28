"""The HTML status page as a real browser shows it: headless Chromium (Debian's chromium
package; .ci/run installs it) loads the page while a machine walks through its update."""

import os
import shutil
import subprocess
import tempfile

import pytest

import serve_package as sp

from conftest import DEMO_PAYLOAD, ROOT, Running, check, event


NON_PRODUCTION = 1 << 28
ARTIFACTS = os.environ.get("SERVE_PACKAGE_ARTIFACTS", os.path.join(ROOT, ".ci", "artifacts"))


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is required in CI (.ci/run installs Debian's chromium)")
    pytest.skip("no Chromium here: apt-get install chromium (CI installs it and runs this)")


@pytest.fixture(scope="module")
def chromium():
    return find_chromium()


def browse(chromium, url, *flags):
    """Chromium, headless, with the flags that keep it off the network and out of the sandbox
    it cannot have as root in a container."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-quic", "--user-data-dir=" + profile] + list(flags) + [url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=90)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout.decode("utf-8", "replace")


def test_status_page_in_a_browser(chromium):
    with Running(sp.load_release(DEMO_PAYLOAD, "3815.2.5")) as running:
        url = "http://127.0.0.1:%d/" % running.port

        def post(body):
            assert running.post(body)[0] == 200

        post(check(alias="node-7"))
        post(event(13, 1, alias="node-7"))
        running.request("GET", "/packages/update.gz", headers={"Range": "bytes=0-74999"})
        dom = browse(chromium, url, "--dump-dom")
        assert 'offering <span id="offering">3815.2.5</span>' in dom
        assert '<tr class="machine" data-state="downloading"><td class="name">node-7</td>' in dom
        assert '<progress max="100" value="48.4"></progress> downloading 48% (73/151 KiB)' in dom
        assert "3760.2.0 \u2192 3815.2.5" in dom

        post(event(14, 1, alias="node-7"))
        post(event(3, 1, alias="node-7"))
        other = b"fedcba9876543210fedcba9876543210"
        post(check(alias="node-8").replace(b"0123456789abcdef0123456789abcdef", other))
        post(event(3, 0, 10 | NON_PRODUCTION, alias="node-8").replace(
            b"0123456789abcdef0123456789abcdef", other))
        dom = browse(chromium, url, "--dump-dom")
        assert '<td class="name">node-7</td>' in dom and "installed, waiting for reboot" in dom
        assert 'data-state="failed"><td class="name">node-8</td>' in dom
        assert "payload hash mismatch (error 10; flags: non-production server)" in dom
        assert ('<p id="summary">2 machine(s): <a href="?state=failed">1 failed</a>, '
                '<a href="?state=installed">1 installed</a>.</p>') in dom

        os.makedirs(ARTIFACTS, exist_ok=True)
        shot = os.path.join(ARTIFACTS, "status-page.png")
        if os.path.exists(shot):
            os.unlink(shot)
        browse(chromium, url, "--screenshot=" + shot, "--window-size=1280,720")
        with open(shot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        print("status page screenshot: %s" % shot)
