"""The simulated fleet (tests/simulate.py), short: 20 machines of both boards through a floored
path, a release cycle with a floor, SIGHUP storms, the pause file, kill -9 and a restart from
the state file, and a flood of made-up ids, against the built .pyz. Two seeds; a failure names
the seed and the schedule to replay with `python3 tests/simulate.py --seed N`."""

import pytest

from simulate import simulate


@pytest.mark.parametrize("seed", [1, 2])
def test_every_machine_arrives(pyz, tmp_path, seed):
    result = simulate(pyz, machines=20, seed=seed, where=str(tmp_path))
    assert result["arrived"] == 20 and result["failed checks"] == 0
