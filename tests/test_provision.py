"""Issue: run it for months, safely (part 5). GET /ignition and GET /butane: a new machine's
config that points it at this server. The JSON is checked by Ignition's own validator
(ignition-validate, Debian's ignition package; CI installs it) and by reading it back."""

import json
import os
import shutil
import subprocess
import urllib.parse

import pytest


def data_url(source: str) -> str:
    assert source.startswith("data:,")
    return urllib.parse.unquote(source[len("data:,"):])


def test_ignition_points_a_new_machine_here(server, tmp_path):
    status, headers, body = server.request(
        "GET", "/ignition?group=beta&extension=python&extension=zfs", headers={"Host": "10.0.0.5:8000"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    config = json.loads(body)
    assert config["ignition"] == {"version": "3.3.0"}
    files = {f["path"]: f for f in config["storage"]["files"]}
    assert data_url(files["/etc/flatcar/update.conf"]["contents"]["source"]) == \
        "SERVER=http://10.0.0.5:8000/v1/update\nGROUP=beta\n"
    assert data_url(files["/etc/flatcar/enabled-sysext.conf"]["contents"]["source"]) == \
        "python\nzfs\n"
    assert all(f["mode"] == 0o644 and f["overwrite"] is True for f in files.values())
    validator = shutil.which("ignition-validate")
    if validator is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ignition-validate is not installed: .ci/run installs Debian's ignition")
        pytest.skip("ignition-validate is not installed (apt-get install ignition)")
    path = tmp_path / "config.ign"
    path.write_bytes(body)
    result = subprocess.run([validator, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert result.returncode == 0, result.stdout.decode()


def test_butane_says_the_same(server):
    status, headers, body = server.request("GET", "/butane?group=stable",
                                           headers={"Host": "updates.example:8000"})
    assert status == 200 and headers["Content-Type"] == "application/yaml; charset=utf-8"
    assert body.decode() == (
        "variant: flatcar\nversion: 1.0.0\nstorage:\n  files:\n"
        "    - path: /etc/flatcar/update.conf\n      mode: 0644\n      overwrite: true\n"
        "      contents:\n        inline: |\n"
        "          SERVER=http://updates.example:8000/v1/update\n          GROUP=stable\n")


@pytest.mark.parametrize("query", ["group=a%20b", "extension=../x", "extension=" + "x" * 80])
def test_names_that_are_not_words_are_refused(server, query):
    status, _, body = server.request("GET", "/ignition?" + query)
    assert status == 400 and b"is not a group or extension name" in body


def test_the_readmes_unit_file_verifies(pyz, tmp_path):
    """The unit file in the README, as written there (paths pointed at this test's files), is
    one systemd takes without a word: systemd-analyze verify prints nothing."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "README.md"), encoding="utf-8").read()
    block = readme.split("\n    [Unit]\n    Description=serve-package, an Omaha", 1)[1]
    block = block.split("\n\n    [Install]\n    WantedBy=multi-user.target\n", 1)[0]
    unit = ("[Unit]\nDescription=serve-package, an Omaha" + block +
            "\n\n[Install]\nWantedBy=multi-user.target\n").replace("\n    ", "\n")
    unit = unit.replace("/opt/serve-package/serve-package.pyz", pyz).replace(
        "/srv/flatcar", str(tmp_path))
    path = tmp_path / "serve-package.service"
    path.write_text(unit)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is not installed: .ci/run installs Debian's systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    result = subprocess.run([analyze, "verify", "--man=no", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert result.returncode == 0 and result.stdout == b"", result.stdout.decode()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
