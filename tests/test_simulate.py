"""The simulated fleet (tests/simulate.py), short: 20 machines of both boards, with OEMs, groups,
canaries and two flaky machines, through a floored path, a release cycle with a floor, a bad
release that the halt must stop at the canaries and the operator withdraws, SIGHUP storms, the
pause file, a full state directory, kill -9 twice (once restarting from the state format
before this one) and floods of made-up ids, labels, events and setup reports, against the built
.pyz. A failure names the seed and the schedule: `python3 tests/simulate.py --seed N`
replays it."""

from simulate import simulate


def test_every_machine_arrives(pyz, tmp_path):
    result = simulate(pyz, machines=20, seed=1, where=str(tmp_path), seconds=120)
    assert result["arrived"] == 20 and result["restarts survived"] == 2
    assert result["held and said why"] > 0 and result["slots high-water"] <= 8
    assert [what for _, what in result["schedule"]].count("bad") == 1
