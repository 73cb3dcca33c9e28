"""The newest parts as pure code, with no subprocess and no real seconds: each board's path
(Catalog.path, Catalog.for_machine) from plain releases; the Reloader with its loading given;
the Watcher's verdict on each look at the tree with the clock given; the Ticker's round."""

import json
import os
import queue

import pytest

import serve_package as sp

from conftest import Clock, machine


def release(demo_release, version, board="amd64-usr", floor=""):
    step = sp.Step(floor=bool(floor), reason=floor, target=False)
    return demo_release._replace(version=version, key=sp.parse_version(version), board=board,
                                 step=step)


@pytest.fixture
def releases(demo_release):
    return [release(demo_release, "4000.0.0"), release(demo_release, "3760.2.0", floor="new disk"),
            release(demo_release, "3510.2.0", floor="old key"),
            release(demo_release, "4100.0.0", floor="never: above the target"),
            release(demo_release, "3900.0.0", board="arm64-usr")]


def test_a_boards_path_is_its_floors_in_order_then_its_target(releases):
    catalog = sp.Catalog(releases)
    assert [r.version for r in catalog.path("amd64-usr")] == ["3510.2.0", "3760.2.0", "4100.0.0"]
    held = sp.Catalog(releases, targets=("4000.0.0",))
    assert [r.version for r in held.path("amd64-usr")] == ["3510.2.0", "3760.2.0", "4000.0.0"]
    assert held.target_rules["amd64-usr"] == "held by --target-version 4000.0.0"
    assert [r.version for r in catalog.path("arm64-usr")] == ["3900.0.0"]
    assert catalog.path("riscv-usr") == ()


@pytest.mark.parametrize("version, offered", [
    ("3000.0.0", "3510.2.0"), ("3510.2.0", "3760.2.0"), ("3600.1.0", "3760.2.0"),
    ("3760.2.0", "4000.0.0"), ("4000.0.0", "4000.0.0"), ("", "4000.0.0"), ("junk", "4000.0.0")])
def test_a_machine_is_offered_the_lowest_floor_above_it(releases, version, offered):
    catalog = sp.Catalog(releases, targets=("4000.0.0",))
    assert catalog.for_machine("amd64-usr", version).version == offered


def test_two_targets_for_one_board_are_refused(releases):
    with pytest.raises(sp.PayloadError, match="hold a board on one release"):
        sp.Catalog(releases, targets=("4000.0.0", "3760.2.0"))


def test_the_reloader_swaps_the_releases_and_keeps_them_when_loading_fails(demo_release):
    app = sp.Service(sp.Catalog([release(demo_release, "3760.2.0")]), sp.AppSettings(), Clock())
    given = []

    def load(known):
        given.append(list(known))
        if len(given) == 2:
            raise sp.PayloadError("update.gz: not a payload")
        return sp.Catalog([release(demo_release, "4000.0.0")])

    reloader = sp.Reloader(app, load, lambda: sp.Policy(max_concurrent=3))
    reloader.reload("SIGHUP")
    assert app.catalog.for_board("amd64-usr").version == "4000.0.0"
    assert given[0] == [demo_release.packages[0]]  # unchanged files are not read again
    assert app.rollout.policy.max_concurrent == 3
    reloader.reload("SIGHUP")
    assert app.catalog.for_board("amd64-usr").version == "4000.0.0"  # kept
    assert app.reloading_since is None


def test_a_policy_that_does_not_parse_leaves_the_current_one(demo_release):
    app = sp.Service(sp.Catalog([demo_release]), sp.AppSettings(
        policy=sp.Policy(max_concurrent=2)), Clock())

    def policy():
        raise sp.UsageError("--max-concurrent x: not a number")

    reloader = sp.Reloader(app, lambda known: sp.Catalog([demo_release]), policy)
    reloader.reload("watch")
    assert app.rollout.policy.max_concurrent == 2


def test_a_reload_asked_for_runs_in_the_reloaders_thread(demo_release):
    app = sp.Service(sp.Catalog([release(demo_release, "3760.2.0")]), sp.AppSettings(), Clock())
    reloader = sp.Reloader(app, lambda known: sp.Catalog([release(demo_release, "4000.0.0")]))
    reloader.start()
    try:
        reloader.request("SIGHUP")
        for _ in range(500):
            if app.catalog.for_board("amd64-usr").version == "4000.0.0":
                break
            reloader.stop.wait(0.01)
        assert app.catalog.for_board("amd64-usr").version == "4000.0.0"
    finally:
        reloader.stop.set()


def write_release(root, version, files, record=True):
    where = root / "amd64-usr" / version
    where.mkdir(parents=True)
    for name, data in files.items():
        (where / name).write_bytes(data)
        (where / (name + ".sha256")).write_text("0" * 64 + "  " + name + "\n")
    if record:  # as download writes it: each file's size, to tell a whole copy
        (where / sp.RELEASE_RECORD).write_text(json.dumps({
            "format": sp.RELEASE_RECORD_FORMAT, "version": version, "board": "amd64-usr",
            "files": {name: {"sha256": "0" * 64, "size": len(data)}
                      for name, data in files.items()}}))


def test_the_watcher_reloads_a_whole_release_at_once_and_a_copy_once_settled(tmp_path):
    clock = Clock(0.0)
    watcher = sp.Watcher(str(tmp_path), queue.Queue(), sp.tree_state(str(tmp_path)), clock=clock)
    assert not watcher.reload_due(watcher.look(), clock())
    write_release(tmp_path, "4000.0.0", {"flatcar_production_update.gz": b"x" * 10})
    assert watcher.reload_due(watcher.look(), clock())  # download's record: whole, at once
    assert not watcher.reload_due(watcher.look(), clock())  # taken once
    write_release(tmp_path, "4100.0.0", {"flatcar_production_update.gz": b"y"}, record=False)
    assert not watcher.reload_due(watcher.look(), clock())  # a copy by hand: it may go on
    clock.advance(sp.WATCH_SETTLE - 1)
    assert not watcher.reload_due(watcher.look(), clock())
    clock.advance(1)
    assert watcher.reload_due(watcher.look(), clock())  # unchanged for WATCH_SETTLE


def test_the_watcher_waits_for_a_release_its_record_says_is_not_whole(tmp_path):
    clock = Clock(0.0)
    watcher = sp.Watcher(str(tmp_path), queue.Queue(), (), clock=clock)
    write_release(tmp_path, "4000.0.0", {"flatcar_production_update.gz": b"x" * 10})
    where = tmp_path / "amd64-usr" / "4000.0.0"
    (where / "flatcar_production_update.gz").write_bytes(b"x" * 5)  # cut short
    assert not watcher.reload_due(watcher.look(), clock())
    (where / "flatcar_production_update.gz").write_bytes(b"x" * 10)
    assert watcher.reload_due(watcher.look(), clock())


def test_a_changed_config_file_is_a_reload(tmp_path):
    config = tmp_path / "serve-package.conf"
    config.write_text("max-concurrent = 2\n")
    (tmp_path / "releases").mkdir()
    clock = Clock(0.0)
    watcher = sp.Watcher(str(tmp_path / "releases"), queue.Queue(), (), str(config), clock=clock)
    assert not watcher.reload_due(watcher.look(), clock())
    config.write_text("max-concurrent = 30\n")
    clock.advance(sp.WATCH_SETTLE)
    assert watcher.reload_due(watcher.look(), clock())


def test_the_ticker_says_what_is_due(demo_release, caplog):
    arm = demo_release._replace(board="arm64-usr")
    app = sp.Service(sp.Catalog([demo_release]), sp.AppSettings(), Clock())
    app.update_check(sp.parse_request(machine(1).replace(b'"amd64-usr"', b'"arm64-usr"')),
                     "10.0.0.7", "http://10.0.0.1:8000")
    ticker = sp.Ticker(app, every=0.01).start()
    try:
        for _ in range(500):
            if any("the fleet needs what is not served" in r.getMessage() for r in caplog.records):
                break
            ticker.stop.wait(0.01)
    finally:
        ticker.stop.set()
    assert any("arm64-usr" in r.getMessage() for r in caplog.records), arm


def test_a_reload_that_fails_unforeseen_leaves_the_reloader_reloading(demo_release, caplog):
    """An error no check foresaw (a directory the server may not list) is one line, and the
    next SIGHUP still reloads."""
    app = sp.Service(sp.Catalog([release(demo_release, "3760.2.0")]), sp.AppSettings(), Clock())
    loads = []

    def load(known):
        loads.append(1)
        if len(loads) == 1:
            raise PermissionError(13, "Permission denied", "/srv/releases/arm64-usr")
        if len(loads) == 2:
            raise RuntimeError("a bug")
        return sp.Catalog([release(demo_release, "4000.0.0")])

    reloader = sp.Reloader(app, load).start()
    try:
        for _ in range(3):
            reloader.request("SIGHUP")
            for _ in range(500):
                if not reloader.wanted.is_set() and app.reloading_since is None:
                    break
                reloader.stop.wait(0.01)
            reloader.stop.wait(0.05)
        for _ in range(500):
            if app.catalog.for_board("amd64-usr").version == "4000.0.0":
                break
            reloader.stop.wait(0.01)
    finally:
        reloader.stop.set()
    assert app.catalog.for_board("amd64-usr").version == "4000.0.0"
    said = [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()]
    assert said[0].endswith("/srv/releases/arm64-usr: Permission denied")
    assert "a bug" in said[1]


def test_a_board_directory_that_cannot_be_listed_is_one_sentence(tmp_path, monkeypatch):
    """As when download made it as root with umask 077 and the server runs as its own user
    (the test runs as root, who may list anything: the refusal is the OS's, given here)."""
    board = tmp_path / "amd64-usr"
    board.mkdir()
    listdir = os.listdir

    def refused(path):
        if path == str(board):
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)

    monkeypatch.setattr(sp.os, "listdir", refused)
    with pytest.raises(sp.PayloadError, match="amd64-usr cannot be listed: Permission denied"):
        sp.load_catalog_for(sp.Settings(package_dir=str(tmp_path)))
