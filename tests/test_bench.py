"""Smoke test of `envfarm bench`: it runs every available backend and writes its outputs (no timing asserted)."""

import csv
import dataclasses
import io
import json

from envfarm import bench
from envfarm.cli import main


def test_bench_writes_one_row_per_backend_env_and_num_envs(tmp_path):
    config = dataclasses.replace(bench.QUICK, envs=("cartpole", "synthetic"), num_envs=(4,), repeats=1, steps=300)
    log = io.StringIO()
    bench.run_bench(config, tmp_path, log=log)

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
    monkeypatch.setattr(bench, "_missing_module", lambda names: names[0] if names else None)
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
