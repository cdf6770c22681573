"""The W&B side of the tracker, on real offline W&B runs read back from their files: what a
dashboard receives (groups, step axis, images, histograms, tables, config with the git commit),
one history across attempts of a run, and a dead server that never holds up the loop."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from gannet.trainer.config.loader import load_config
from gannet.trainer.tracking import tracker as tracking
from gannet.trainer.tracking.tracker import Tracker, git_state, read_metrics
from gannet.trainer.tracking.wandb_files import find_run_files, read_history, read_media_files, read_records
from tests.conftest import tiny_overrides


def config(run: Path, mode: str = "offline"):
    return load_config("lsgan_mnist", tiny_overrides(Path("unused"), run, **{"log.wandb": mode, "log.progress": "lines"}))


def attempt(run: Path, start: int, steps: range) -> None:
    """One attempt of a run: a tracker resumed at `start` logs `steps` and finishes."""
    tracker = Tracker(run, config(run), enabled=True, start_step=start)
    for step in steps:
        tracker.log(step, {"train/loss_d": step / 100, "perf/images_per_s": 1.0})
    tracker.finish()


def history_steps(run: Path) -> list[int]:
    """Every history step of every attempt (offline-run-* dir) of the run, oldest attempt first."""
    return [row["_step"] for f in find_run_files(run) for row in read_history(f)]


def test_dashboard_content(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    grid = run / "grid.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(grid)
    tracker = Tracker(run, config(run), enabled=True, start_step=0)
    tracker.log(5, {"train/loss_d": 0.5, "perf/images_per_s": 99.0}, histograms={"train/d_real_outputs": np.linspace(0, 1, 32)})
    tracker.log_image(5, "samples/fixed_noise", grid)
    tracker.log_table(5, "samples/text_to_image", ["prompt", "image"],
                      [["a red bird", Image.new("RGB", (8, 8), "red")], ["a blue bird", np.zeros((8, 8, 3), np.uint8)]])
    tracker.log(10, {"eval/fid": 12.5})
    tracker.finish()

    (log_file,) = find_run_files(run)
    rows = {row["_step"]: row for row in read_history(log_file)}
    assert sorted(rows) == [5, 10] and rows[5]["step"] == 5  # the explicit step axis is a logged value too
    assert rows[5]["train/loss_d"] == 0.5 and rows[10]["eval/fid"] == 12.5
    assert rows[5]["train/d_real_outputs/_type"] == "histogram" and sum(rows[5]["train/d_real_outputs/values"]) == 32
    assert rows[5]["samples/fixed_noise/_type"] == "image-file"
    assert rows[5]["samples/text_to_image/_type"] == "table-file" and rows[5]["samples/text_to_image/nrows"] == 2
    assert len(read_media_files(run)) == 1  # the grid
    records = read_records(log_file)
    # a table with media goes to W&B as a run_table artifact holding its images (staged in WANDB_DATA_DIR)
    (table,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "run_table"]
    images = [c for c in table.manifest.contents if c.path.endswith(".png")]
    assert len(images) == 2 and all(Path(c.local_path).is_file() for c in images)
    axes = {r.metric.glob_name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert all(axes[f"{group}/*"] == "step" for group in ("train", "eval", "perf"))
    config_items = {item.key: item.value_json for r in records if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    assert '"commit"' in config_items["git"] and git_state()["commit"] in config_items["git"]  # this checkout's commit
    assert '"lsgan"' in config_items["recipe"]


def test_one_history_across_attempts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    attempt(run, 0, range(5, 25, 5))  # W&B got 5..20 onto disk; the last checkpoint was step 10
    attempt(run, 10, range(15, 35, 5))  # re-trained 15 and 20 are not sent twice
    assert history_steps(run) == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in read_metrics(run)] == [5, 10, 15, 20, 25, 30]

    # A killed attempt whose W&B log lost its tail: metrics.jsonl reached step 40 and a checkpoint
    # step 35, but W&B persisted nothing past 30. The next attempt sends 35 again from metrics.jsonl.
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 35, "train/loss_d": 0.35}\n{"step": 40, "train/loss_d": 0.4}\n')
    attempt(run, 35, range(40, 50, 5))
    assert history_steps(run) == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    values = {row["_step"]: row["train/loss_d"] for f in find_run_files(run) for row in read_history(f)}
    assert values == {r["step"]: r["train/loss_d"] for r in read_metrics(run)}


def test_unreachable_server_never_blocks_logging_and_falls_back_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(tracking, "INIT_TIMEOUT_S", 3.0)
    run = tmp_path / "run"
    run.mkdir()
    started = time.perf_counter()
    tracker = Tracker(run, config(run, "online"), enabled=True, start_step=0)
    for step in range(1, 201):
        tracker.log(step, {"train/loss_d": step / 1000})
    logging_s = time.perf_counter() - started
    assert logging_s < 1.5, f"200 log calls took {logging_s:.1f} s with W&B unreachable"
    tracker.finish()
    assert time.perf_counter() - started < 30
    assert len(read_metrics(run)) == 200  # gannet's own record is complete regardless
    assert history_steps(run) == list(range(1, 201))  # and the queued rows went to an offline run

def test_disabled_writes_no_wandb_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    tracker = Tracker(run, config(run, "disabled"), enabled=True, start_step=0)
    tracker.log(1, {"train/loss_d": 1.0}, histograms={"train/d_real_outputs": np.ones(4)})
    tracker.finish()
    assert not (run / "wandb").exists() and len(read_metrics(run)) == 1
