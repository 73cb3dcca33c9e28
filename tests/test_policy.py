"""Policy, pure: decide() under every rollout rule, and their order, without a server."""

import pytest

import serve_package as sp

from conftest import DEMO_PAYLOAD, machine


@pytest.fixture(scope="module")
def release():
    return sp.load_release(DEMO_PAYLOAD, "3815.2.5")


def app(n=1, version="3760.2.0", group="stable"):
    return sp.parse_request(machine(n, version, group)).apps[0]


def test_older_is_offered_equal_and_newer_are_not(release):
    assert sp.decide(app(), release) == sp.Decision(True, "older than 3815.2.5",
                                                    version="3815.2.5", final="3815.2.5")
    assert sp.decide(app(version="3815.2.5"), release) == sp.Decision(False, "up to date",
                                                                      settled=True)
    assert sp.decide(app(version="3815.2.6"), release) == sp.Decision(False, "newer than 3815.2.5",
                                                                          settled=True)
    assert sp.decide(app(version="3815.2.5+dev"), release).reason == "up to date"


def test_a_version_that_is_not_one_is_a_warning(release):
    decision = sp.decide(app(version="banana"), release)
    assert decision == sp.Decision(False, "its version 'banana' is not a version, so it is not "
                                   "offered 3815.2.5", warning="bad-version")


def test_changed_payload_offers_nothing_whatever_the_policy(release):
    decision = sp.decide(app(), release, intact=False, policy=sp.Policy(force=True))
    assert not decision.offer and decision.warning and "changed on disk" in decision.reason


def test_force_offers_equal_and_newer_and_says_so(release):
    force = sp.Policy(force=True)
    for version in ("3815.2.5", "9999.0.0"):
        decision = sp.decide(app(version=version), release, policy=force)
        assert decision == sp.Decision(True, "forced: it runs %s" % version, forced=True,
                                       version="3815.2.5", final="3815.2.5")
    assert sp.decide(app(), release, policy=force) == sp.Decision(True, "older than 3815.2.5",
                                                                  version="3815.2.5", final="3815.2.5")


def test_groups_and_machine_ids(release):
    policy = sp.Policy(groups=frozenset({"beta"}), machine_ids=frozenset({"%032x" % 2}))
    assert sp.decide(app(1, group="stable"), release, policy=policy).reason == \
        "its group 'stable' is not one of --group beta"
    assert sp.decide(app(2, group="beta"), release, policy=policy).reason == \
        "not one of the machines named by --machine-id"
    assert sp.decide(app(1, group="beta"), release, policy=policy).offer


def test_min_version(release):
    policy = sp.Policy(min_version="3700.0.0")
    decision = sp.decide(app(version="3600.1.0"), release, policy=policy)
    assert not decision.offer and decision.warning
    assert "older than --min-version 3700.0.0" in decision.reason
    assert sp.decide(app(version="3700.0.0"), release, policy=policy).offer


def test_pause_and_slots_spare_a_machine_that_holds_one(release):
    policy = sp.Policy(max_concurrent=2, pause_file="/run/pause")
    full = sp.FleetContext(held=False, in_use=2)
    assert sp.decide(app(), release, policy=policy, context=full).reason == \
        "waiting for a slot: 2 machines are updating (--max-concurrent)"
    assert sp.decide(app(), release, policy=policy, context=sp.FleetContext(False, 1)).offer
    paused = "rollout paused: /run/pause exists"
    assert sp.decide(app(), release, policy=policy, gate=paused).reason == paused
    holder = sp.FleetContext(held=True, in_use=2)
    assert sp.decide(app(), release, policy=policy, gate=paused, context=holder).offer


def test_the_first_rule_that_refuses_gives_the_reason(release):
    policy = sp.Policy(groups=frozenset({"beta"}), min_version="3700.0.0", max_concurrent=1)
    decision = sp.decide(app(version="3600.0.0", group="stable"), release, policy=policy,
                         gate="rollout paused", context=sp.FleetContext(False, 5))
    assert decision.reason.startswith("its group 'stable'")
