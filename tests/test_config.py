"""Configs: YAML + overrides are typed and validated; a mistake is one line and exit code 2."""

from __future__ import annotations

import pytest
import yaml

from gannet.trainer.config.loader import config_from_dict, config_to_dict, load_config
from gannet.trainer.errors import ConfigError
from tests.conftest import gannet


def test_default_config_loads_with_recipe_params():
    cfg = load_config("lsgan_mnist")
    assert cfg.name == "lsgan_mnist"
    assert cfg.recipe.name == "lsgan" and (cfg.recipe.a, cfg.recipe.b, cfg.recipe.c) == (0.0, 1.0, 1.0)
    assert cfg.optim.g.betas == (0.5, 0.999)
    assert str(cfg.run_path) == "runs/lsgan_mnist"


def test_overrides_are_parsed_as_yaml_and_type_checked():
    cfg = load_config("gan_mnist", ["train.steps=7", "recipe.loss=minimax", "recipe.d_steps=3", "optim.d.lr=1e-3",
                                    "optim.g.betas=[0.0, 0.9]", "train.cpu=true"])
    assert cfg.train.steps == 7 and cfg.recipe.loss == "minimax" and cfg.recipe.d_steps == 3
    assert cfg.optim.d.lr == 1e-3 and cfg.optim.g.betas == (0.0, 0.9) and cfg.train.cpu is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=5", "unknown key 'train.stepz' (allowed in train: steps,"),
        ("recipe.lr=1", "unknown key 'recipe.lr' (allowed in recipe: d_steps, ema_kimg, ema_rampup, ema_start, r1_gamma, r1_every, gp_weight, augment, diffaugment, ada_target, ada_interval, ada_kimg, topk, topk_kimg, a, b, c)"),
        ("train.steps=ten", "train.steps='ten' must be an integer"),
        ("train.steps=0", "train.steps=0 must be > 0"),
        ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is not allowed (choose one of: auto, no, fp16, bf16)"),
        ("train.compile=maybe", "train.compile='maybe' is not allowed (choose one of: auto, on, off)"),
        ("recipe.name=wgan", "recipe.name='wgan' is not a known recipe (choose one of: cgan, cyclegan, gan, lsgan, r3gan, r3gan_cond, t2i)"),
        ("optim.g.betas=[0.5]", "optim.g.betas=[0.5] must be a list of 2 values"),
        ("recipe.d_steps=0", "recipe.d_steps=0 must be >= 1"),
        ("data.image_size=30", "data.image_size=30 does not fit DCGAN"),
        ("steps", "override 'steps' is not of the form key=value"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        cfg = load_config("lsgan_mnist", [override])
        from gannet.models.recipes import get_recipe  # network sizes are checked when the recipe builds

        get_recipe(cfg.recipe.name)(cfg.recipe, cfg).build()
    assert message in str(info.value)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("gan_mnist", ["recipe.loss=minimax", "seed=3"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_cli_bad_key_exits_2_with_one_line():
    result = gannet("train", "lsgan_mnist", "train.stepz=5", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gannet: error: unknown key 'train.stepz' (allowed in train: steps, strategy,")
    assert "num_samples" in lines[0] and lines[0].endswith(")")


def test_cli_missing_config_and_missing_shards_exit_2(tmp_path):
    missing = gannet("train", "no_such_config", check=False)
    assert missing.returncode == 2 and "config 'no_such_config' not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_data = gannet("train", "lsgan_mnist", f"data.shards={tmp_path}/nothing-*.tar", f"run_dir={tmp_path}/run",
                     "log.wandb=disabled", check=False)
    assert no_data.returncode == 2 and "data.shards: no file matches" in no_data.stderr
    assert len(no_data.stderr.strip().splitlines()) == 1


def test_presets_merge_into_the_config_in_order():
    cfg = load_config("lsgan_mnist", ["launch/deepspeed/zero3.yaml", "optim.d.zero_stage=1"])
    assert (cfg.train.strategy, cfg.train.mixed_precision) == ("deepspeed", "bf16")
    assert (cfg.optim.g.zero_stage, cfg.optim.d.zero_stage, cfg.optim.g.clip_grad) == (3, 1, 0.0)
    assert cfg.optim.g.lr == 2e-4  # keys the preset does not name keep their values
    with pytest.raises(ConfigError, match="preset 'nope.yaml' not found"):
        load_config("lsgan_mnist", ["nope.yaml"])
