"""`envfarm tune`: measures every arrangement against SyncVectorEnv and names the fastest (no timing asserted)."""

import io

from envfarm.cli import main
from envfarm.tune import arrangements, tune


def test_tune_measures_each_arrangement_and_names_the_fastest():
    out = io.StringIO()
    best = tune("CartPole-v1", 4, policy_us=50, seconds=0.2, repeats=1, out=out)
    text = out.getvalue()
    candidates = arrangements(4, 2)
    assert best in [options for options in candidates.values() if options is not None]
    for name in candidates:
        assert any(line.startswith(name) for line in text.splitlines()), text
    assert "fastest envfarm arrangement: envfarm.make_vec('CartPole-v1', 4" in text


def test_the_candidates_count_the_trainer_as_a_process():
    assert arrangements(8, 2) == {
        "sync": None,
        "default": {},
        "inline": {"inline_worker": True, "num_workers": 2},
        "a CPU for the trainer": {"num_workers": 1},
    }
    assert arrangements(8, 1) == {"sync": None, "default": {}}


def test_tune_runs_from_the_command_line(capsys):
    assert main(["tune", "CartPole-v1", "--num-envs", "2", "--seconds", "0.1", "--repeats", "1"]) == 0
    assert "fastest envfarm arrangement" in capsys.readouterr().out
