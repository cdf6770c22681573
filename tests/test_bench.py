"""`gannet bench` runs real timing and memory measurements and reports them against references.

Only the report's shape and ZeRO's partitioning (a behaviour, not a speed) are asserted here;
the speed numbers themselves belong to the README and the issue notes.
"""

from __future__ import annotations

import json

from tests.conftest import gannet


def test_bench_reports_throughput_and_zero2_halves_optimizer_state(small_shards, tmp_path):
    out = tmp_path / "bench.json"
    result = gannet("bench", "lsgan_mnist", f"data.shards={small_shards}/train-*.tar", "data.batch_size=32",
                    "model.g_width=16", "model.d_width=16", "--processes", "1", "--steps", "10",
                    "--strategies", "ddp", "zero2", "--out", str(out))
    report = json.loads(out.read_text())
    (speed,) = report["throughput"]
    assert speed["processes"] == 1 and speed["images_per_s"] > 0 and speed["speedup_vs_1"] == 1.0
    ddp, zero2 = report["memory_per_rank"]
    assert (ddp["strategy"], zero2["strategy"], zero2["world"]) == ("ddp", "zero2", 2)
    assert ddp["params"] == zero2["params"] > 0  # ZeRO-2 keeps whole parameters on every rank
    assert 0.45 < zero2["optimizer_vs_ddp"] < 0.6  # Adam's moments split over 2 ranks
    assert ddp["master"] == 0 < zero2["master"]
    assert "memory per rank" in result.stdout and "zero2" in result.stdout


def test_bench_tables_refuse_a_translation_recipe_with_a_pointer():
    result = gannet("bench", "cyclegan_silhouettes", check=False)
    assert result.returncode == 2 and "--reference-step" in result.stderr
