"""`gannet bench scaling|memory|step` run real timing and memory measurements and report them against references.

Only the report's consistency and ZeRO's partitioning (a behaviour, not a speed) are asserted
here; the speed numbers themselves belong to the README and the issue notes.
"""

from __future__ import annotations

import json

import pytest

from gannet.trainer.cli import main as cli_main
from tests.conftest import gannet


def test_bench_scaling_reports_throughput_and_bench_memory_sees_zero2_halve_optimizer_state(small_shards, tmp_path):
    config = ["lsgan_mnist", f"data.shards={small_shards}/train-*.tar", "data.batch_size=32", "model.g_width=16",
              "model.d_width=16", "recipe.d_steps=2"]
    gannet("bench", "scaling", *config, "--processes", "1", "--steps", "10", "--out", str(tmp_path / "scaling.json"))
    (speed,) = json.loads((tmp_path / "scaling.json").read_text())["throughput"]
    assert speed["processes"] == 1 and speed["images_per_s"] > 0
    # a generator step after k=2 D-steps draws 2 real batches of 32: ms/step and images/s must agree on that
    assert speed["images_per_s"] * speed["ms_per_step"] / 1000 == pytest.approx(64)
    result = gannet("bench", "memory", *config, "--strategies", "ddp", "zero2", "--out", str(tmp_path / "memory.json"))
    ddp, zero2 = json.loads((tmp_path / "memory.json").read_text())["memory_per_rank"]
    assert (ddp["strategy"], zero2["strategy"], zero2["world"]) == ("ddp", "zero2", 2)
    assert ddp["params"] == zero2["params"] > 0  # ZeRO-2 keeps whole parameters on every rank
    assert 0.45 < zero2["optimizer_vs_ddp"] < 0.6  # Adam's moments split over 2 ranks
    assert ddp["master"] == 0 < zero2["master"]
    assert ddp["activations"] > 0 and ddp["peak"] == ddp["total"] + ddp["activations"]
    assert "memory per rank" in result.stdout and "zero2" in result.stdout


@pytest.mark.slow  # about 50 s on a quiet 2-core machine: a CycleGAN training run plus a 2-process memory run
def test_bench_memory_table_measures_any_recipe_through_its_own_iteration(silhouettes, tmp_path):
    """CycleGAN (two generator/discriminator pairs, its own iteration): measured at each optimizer step."""
    out = tmp_path / "bench.json"
    gannet("bench", "memory", "cyclegan_silhouettes", f"data.shards={silhouettes['small']}/a-*.tar",
           f"data.shards_b={silhouettes['small']}/b-*.tar", "data.batch_size=2", "model.g_width=8", "model.d_width=8",
           "optim.g.schedule=constant", "optim.d.schedule=constant",
           "--strategies", "ddp", "--out", str(out))
    (ddp,) = json.loads(out.read_text())["memory_per_rank"]
    for name in ("G", "D"):
        net = ddp["networks"][name]
        assert net["grads"] == net["params"] > 0  # fp32 gradients, one per parameter, present at the step
        assert 2 * net["params"] <= net["optimizer"] < 2.01 * net["params"]  # Adam's two moments (+ a step count per tensor)


def test_bench_step_is_for_cyclegan_only(capsys):
    assert cli_main(["bench", "step", "lsgan_mnist"]) == 2
    assert "gannet bench step times the CycleGAN step" in capsys.readouterr().err


def test_bench_alone_lists_its_modes_and_a_bad_key_fails_before_anything_runs(capsys):
    assert cli_main(["bench"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == ["scaling", "memory", "speed", "step", "loader", "guard"]
    assert cli_main(["bench", "scaling", "train.stepz=5"]) == 2  # a key=value where CONFIG goes is an override
    assert "unknown key 'train.stepz'" in capsys.readouterr().err


def test_bench_memory_leaves_out_a_refused_strategy_and_stops_at_missing_shards_before_any_process(small_shards, tmp_path, capsys):
    """A penalty on D refuses ZeRO-3: the table goes on without it (with the reason), instead of failing
    minutes in; shards that are not there stop the bench in one line, before torchrun starts."""
    from gannet.trainer.bench.scaling import plan_strategies

    config = ["lsgan_mnist", f"data.shards={small_shards}/train-*.tar", "recipe.r1_gamma=1"]
    allowed, refused = plan_strategies(config[0], config[1:], ["ddp", "zero2", "zero3"], cpu=True)
    assert allowed == ["ddp", "zero2"] and "optim.d.zero_stage <= 2" in refused["zero3"]
    assert cli_main(["bench", "memory", "lsgan_mnist", f"data.shards={tmp_path}/none-*.tar", "--out", str(tmp_path / "m.json")]) == 2
    assert "no file matches" in capsys.readouterr().err and not (tmp_path / "m.json").exists()


def test_a_launch_killed_for_memory_is_named_in_the_first_line_a_table_shows():
    """torchrun exits 1 whatever happened to a rank; a rank (or a plain child) the OS killed reads as such, as
    `bench memory` shows a strategy it could not measure (the stderr is torchrun's own wording)."""
    import subprocess

    from gannet.trainer.bench.scaling import check_launch

    killed = subprocess.CompletedProcess([], 1, "", "  exitcode  : -9 (pid: 20337)\n  traceback : Signal 9 (SIGKILL) received by PID 20337")
    with pytest.raises(RuntimeError) as err:
        check_launch(killed, "memory under zero1")
    assert str(err.value).splitlines()[0] == "bench memory under zero1 failed: killed by the OS (SIGKILL: out of memory?)"
    with pytest.raises(RuntimeError, match=r"^bench speed sngan failed: killed by the OS"):  # a plain child (bench speed)
        check_launch(subprocess.CompletedProcess([], -9, "", ""), "speed sngan")
    with pytest.raises(RuntimeError, match=r"^bench memory under ddp failed: exit 1\n"):
        check_launch(subprocess.CompletedProcess([], 1, "", "ConfigError: bad"), "memory under ddp")
