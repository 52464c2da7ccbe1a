"""Smoke test of `envfarm bench`: it runs every available backend and writes its outputs (no timing asserted)."""

import csv
import dataclasses
import io
import json

import pytest

from envfarm import bench, bench_run, bench_training
from envfarm.cli import main


def test_bench_writes_one_row_per_backend_env_and_num_envs(tmp_path):
    config = dataclasses.replace(bench.QUICK, envs=("cartpole", "synthetic"), num_envs=(4,), repeats=1, steps=300)
    log = io.StringIO()
    bench_run.run_bench(config, tmp_path, log=log)

    report = json.loads((tmp_path / "bench.json").read_text())
    with open(tmp_path / "bench.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    measured = {(m["backend"], m["env_id"], m["num_envs"]) for m in report["measurements"]}
    keys = [(r["backend"], r["env_id"], r["num_envs"]) for r in report["results"]]
    assert report["errors"] == []
    assert len(keys) == len(set(keys)) and set(keys) == measured
    assert [(r["backend"], r["env_id"], int(r["num_envs"])) for r in csv_rows] == keys
    for env_id in ("CartPole-v1", "envfarm/Synthetic-v0"):
        for backend in ("sync", "async", "envfarm", "envfarm-wire", "ideal"):
            assert (backend, env_id, 4) in measured
    assert all(r["steps_per_s"] > 0 and float(c["steps_per_s"]) > 0 for r, c in zip(report["results"], csv_rows))
    assert "[1/" in log.getvalue()


def test_bench_skips_missing_extras_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run, "_missing_module", lambda names: names[0] if names else None)
    code = main(
        [
            "bench",
            "--quick",
            "--envs",
            "cartpole,pong",
            "--backends",
            "sync,envpool",
            "--steps",
            "50",
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "bench.json").read_text())
    assert code == 0
    assert [(r["backend"], r["env_id"]) for r in report["results"]] == [("sync", "CartPole-v1")]
    assert any(s.startswith("envpool:") for s in report["skipped"]) and any(
        s.startswith("ALE/Pong-v5:") for s in report["skipped"]
    )


def test_bench_training_loops_run_each_backend_with_a_torch_policy_in_a_process_of_its_own(tmp_path):
    pytest.importorskip("torch")
    code = main(
        [
            "bench",
            "--training",
            "--envs",
            "cartpole",
            "--num-envs",
            "4",
            "--backends",
            "sync,envfarm,ideal",
            "--loops",
            "ppo-1t",
            "--repeats",
            "1",
            "--seconds",
            "0.2",
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "bench.json").read_text())
    assert code == 0 and report["errors"] == []
    rows = {(r["loop"], r["backend"]): r for r in report["results"]}
    assert set(rows) == {("ppo-1t", backend) for backend in ("sync", "envfarm", "ideal")}
    for row in rows.values():
        assert row["steps_per_s"] > 0 and row["cpu_us_per_step"] > 0
        assert row["vs_ideal"] == row["steps_per_s"] / rows[row["loop"], "ideal"]["steps_per_s"]
    # a PPO loop times whole rollouts of ROLLOUT steps per env, updates included
    assert all(
        m["env_steps"] % (bench_training.ROLLOUT * 4) == 0 for m in report["measurements"] if m["loop"] == "ppo-1t"
    )
    assert "--loops ppo-1t" in report["meta"]["command"]


def test_bench_refuses_an_unknown_loop_and_two_presets(tmp_path, capsys):
    assert main(["bench", "--quick", "--loops", "greedy", "--out", str(tmp_path)]) == 2
    assert "unknown loop 'greedy'; choose from random, mlp, mlp-1t, ppo, ppo-1t" in capsys.readouterr().err
    assert main(["bench", "--quick", "--training", "--out", str(tmp_path)]) == 2
    assert "two presets" in capsys.readouterr().err


def test_bench_skips_the_training_loops_without_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run, "check_loops", lambda loops: "torch is not installed (pip install torch)")
    code = main(
        [
            "bench",
            "--quick",
            "--envs",
            "cartpole",
            "--backends",
            "sync",
            "--loops",
            "random,ppo",
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "bench.json").read_text())
    assert code == 0 and [r["loop"] for r in report["results"]] == ["random"]
    assert report["skipped"] == ["the training loops: torch is not installed (pip install torch)"]
