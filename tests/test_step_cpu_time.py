"""bench/step_cpu_time.py: its flags."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not installed: import it from the repo

from bench import step_cpu_time  # noqa: E402


@pytest.mark.parametrize("argv, message", [(["encoder"], "invalid choice: 'encoder'"),
                                           (["decoder", "--calls", "0"], "--calls must be at least 1, got 0")])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        step_cpu_time.main(argv)
    assert message in capsys.readouterr().err
