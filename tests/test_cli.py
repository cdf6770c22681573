"""The command line's conventions: every argument explains itself, `gannet train` without a config
says what to give, `--dry-run` shows the resolved config and what `auto` picks without creating
anything, and a resumed run refuses a config that changes what its checkpoints were trained with."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import pytest
import yaml

from gannet.trainer.cli import build_parser
from gannet.trainer.cli import main as cli_main
from gannet.trainer.config.loader import config_names, config_to_dict, load_config
from gannet.trainer.config.resume import is_safe, unsafe_changes
from gannet.trainer.engine import fast
from tests.conftest import REPO, tiny_overrides


def parsers(parser: argparse.ArgumentParser, path: str = "gannet"):
    """Every parser under `parser` (subcommands, and their subcommands), with its command path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, f"{path} {name}")


def test_every_argument_and_command_has_help():
    parser, _ = build_parser()
    missing = []
    for path, p in parsers(parser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{path} {choice.dest}" for choice in action._choices_actions if not choice.help]
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"arguments without help: {missing}"
    commands = {path for path, _ in parsers(parser)}
    assert {"gannet bench scaling", "gannet bench memory", "gannet bench speed", "gannet bench step", "gannet bench loader",
            "gannet slurm"} <= commands


def test_time_options_are_in_seconds_with_an_s_suffix():
    parser, _ = build_parser()
    options = {option for _, p in parsers(parser) for action in p._actions for option in action.option_strings}
    timed = {o for o in options if any(word in o for word in ("time", "second", "delay", "timeout", "minute"))}
    assert timed == {"--time-s", "--signal-delay-s"} and all(o.endswith("-s") for o in timed)
    assert "--loader-s" in options and "--loader-seconds" not in options


def test_train_without_a_config_names_the_configs_and_an_example(capsys):
    assert cli_main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gannet: error: gannet train needs a CONFIG")
    assert all(name in err for name in config_names()) and "gannet train sngan_mnist" in err


def test_dry_run_prints_a_loadable_config_and_the_auto_choices_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "sngan_mnist", "train.steps=7", "model.g_width=8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no run directory, no W&B folder, nothing
    (tmp_path.parent / "dry.yaml").write_text(out)
    cfg = load_config("sngan_mnist", ["train.steps=7", "model.g_width=8"])
    assert config_to_dict(load_config(str(tmp_path.parent / "dry.yaml"))) == config_to_dict(cfg)  # the YAML is the config
    choices = fast.resolve(cfg, "cpu")
    assert f"mixed_precision={choices.mixed_precision}, compile=off, adam=fused, layout: G channels_last, D channels_last" in out
    assert "run: a new run in runs/sngan_mnist, 7 generator steps" in out and "data.shards: none found here" in out
    assert cli_main(["train", "cyclegan_silhouettes", "train.strategy=deepspeed", "--dry-run"]) == 0
    assert "layout: G contiguous, D contiguous" in capsys.readouterr().out  # the engine's own rule, not a copy


@pytest.mark.parametrize("key, safe", [
    ("train.steps", True), ("train.log_every", True), ("eval.samples", True), ("log.wandb", True), ("resume", True),
    ("train.compile", True), ("data.retry_backoff_s", True), ("train.max_rollbacks", True), ("train.spike_ratio", True),
    ("model.g_width", False), ("recipe.loss", False), ("recipe.name", False), ("data.image_size", False),
    ("data.shards", False), ("optim.g.lr", False), ("seed", False), ("train.strategy", False), ("train.grad_accum", False),
])
def test_the_resume_rule_lets_cadence_and_budget_change_but_not_what_was_trained(key, safe):
    assert is_safe(key) is safe


def test_resuming_under_changed_networks_recipe_or_data_stops_with_one_line_naming_the_keys(small_shards, tmp_path, capsys):
    run = tmp_path / "run"
    tiny = tiny_overrides(small_shards, run, **{"train.steps": 2, "train.checkpoint_every": 2, "train.log_every": 1})
    assert cli_main(["train", "lsgan_mnist", *tiny]) == 0
    capsys.readouterr()
    changed = ["model.g_width=32", "recipe.d_steps=2", "data.image_size=32", "optim.d.lr=1e-3"]
    assert cli_main(["train", "lsgan_mnist", *tiny, *changed, "resume=auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"gannet: error: {run} was trained with another data.image_size (28 -> 32), "
                                                         "model.g_width (16 -> 32), optim.d.lr (0.0002 -> 0.001), recipe.d_steps (1 -> 2)")
    assert cli_main(["resume", str(run), "model.g_width=32"]) == 2  # the same rule through `gannet resume`
    assert "model.g_width (16 -> 32)" in capsys.readouterr().err
    assert cli_main(["train", "lsgan_mnist", *tiny, "train.steps=9", "train.log_every=3", "eval.samples=50", "log.progress=lines",
                     "resume=auto", "--dry-run"]) == 0  # safe changes pass
    assert f"run: resumes {run} from step-00000002, 9 generator steps" in capsys.readouterr().out


def test_a_run_resumes_exactly_from_shards_that_moved_but_not_from_other_shards(small_shards, tmp_path, capsys):
    """Node-local scratch on a requeued job: the same shard files by name, another folder. The run
    continues as if nothing moved; fewer shards, or a glob whose files cannot be compared, are refused."""
    from safetensors.torch import load_file

    from gannet.trainer.tracking.tracker import read_metrics
    from tests.conftest import without_perf

    listed = "train-{000000..000005}.tar"
    moved = tmp_path / "scratch"
    shutil.copytree(small_shards, moved)
    run = lambda path, shards, steps, *extra: cli_main(["train", "lsgan_mnist", *tiny_overrides(  # noqa: E731
        shards, path, **{"data.shards": f"{shards}/{listed}", "train.steps": steps, "train.checkpoint_every": 2,
                         "train.log_every": 1}), *extra])
    assert run(tmp_path / "straight", small_shards, 4) == 0
    assert run(tmp_path / "run", small_shards, 2) == 0
    capsys.readouterr()
    assert run(tmp_path / "run", moved, 4, f"data.shards={moved}/train-{{000000..000004}}.tar", "resume=auto") == 2
    assert "another data.shards (" in capsys.readouterr().err
    assert run(tmp_path / "run", moved, 4, f"data.shards={moved}/train-*.tar", "resume=auto") == 2
    assert "another data.shards (" in capsys.readouterr().err
    assert run(tmp_path / "run", moved, 4, "resume=auto") == 0
    for name in ("G", "D"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "step-00000004" / f"{name}.safetensors")) for r in ("straight", "run"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f"{name} weights differ"
    assert without_perf(read_metrics(tmp_path / "run")) == without_perf(read_metrics(tmp_path / "straight"))


def test_unsafe_changes_compare_only_keys_both_configs_have():
    saved = config_to_dict(load_config("gan_mnist"))
    now = config_to_dict(load_config("lsgan_mnist"))  # another recipe: its own parameters are not listed one by one
    changes = unsafe_changes(saved, now)
    assert changes["recipe.name"] == ("gan", "lsgan") and "recipe.a" not in changes and "recipe.loss" not in changes


def test_a_renamed_key_in_an_older_config_is_read_under_its_new_name(tmp_path, caplog):
    old = config_to_dict(load_config("lsgan_mnist"))
    del old["data"]["retry_backoff_s"]
    old["data"]["retry_backoff"] = 0.25  # as runs before the rename saved it in config.yaml
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert load_config(str(tmp_path / "old.yaml")).data.retry_backoff_s == 0.25
    assert "data.retry_backoff is now data.retry_backoff_s" in caplog.text


def test_make_clean_keeps_runs_and_data_and_says_what_it_removed(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for folder in ("runs/lsgan_mnist", "data/mnist", "build", "pkg/__pycache__", ".pytest_cache"):
        (tmp_path / folder).mkdir(parents=True)
    make = lambda target: subprocess.run(["make", "-s", target], cwd=tmp_path, capture_output=True, text=True, check=True).stdout  # noqa: E731
    out = make("clean")
    assert (tmp_path / "runs" / "lsgan_mnist").is_dir() and (tmp_path / "data" / "mnist").is_dir()
    assert not (tmp_path / "build").exists() and not (tmp_path / "pkg" / "__pycache__").exists()
    assert "removed build .pytest_cache and 1 __pycache__ folder(s)" in out and "kept runs/" in out
    assert make("clean-runs").strip() == "make clean-runs: removing runs/: lsgan_mnist" and not (tmp_path / "runs").exists()
    assert (tmp_path / "data").is_dir() and "removing data/: mnist" in make("clean-data") and not (tmp_path / "data").exists()
