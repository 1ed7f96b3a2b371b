"""scripts/benchmark_data.py runs end to end on a small corpus, reports every figure, and cleans up."""

import json

import pytest

from conftest import run_script


@pytest.mark.slow
def test_benchmark_data_reports_every_figure_and_cleans_up(tmp_path):
    """One JSON line per measurement: each kind's preparation next to cp + sync with its peak RSS,
    start-up on the generated and the default dataset, and the machine's load; nothing is left."""
    work = tmp_path / "work"
    proc = run_script("-m", "scripts.benchmark_data", "--size", "3M", "--work", work, "--startup-runs", "1",
                      check=True, timeout=600)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    seen = [(r["bench"], r.get("input") or r.get("dataset")) for r in records]
    assert seen == [("generate", None), *[("prepare", k) for k in ("plain", "jsonl", "gz", "mixed")],
                    *[(b, d) for d in ("generated", "default") for b in ("startup_train_single", "startup_data")],
                    ("machine", None)]
    for r in records[1:5]:
        assert r["mb_per_s"] > 0 and r["cp_sync_mb_per_s"] > 0 and 0 < r["peak_rss_mb"] < 300
    assert records[4]["output_mb"] >= 3.0 and "load average" in records[-1]["uptime"]
    assert not work.exists()
