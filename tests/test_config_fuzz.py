"""Config fuzzing: random keys, values, types, overrides and broken YAML are either a valid config
or one ConfigError of one line (exit 2 from the CLI, nothing written), never another exception."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gannet.trainer.config.loader import CONFIG_DIR, config_from_dict, load_config
from gannet.trainer.errors import ConfigError
from tests.conftest import gannet

BASE = yaml.safe_load((CONFIG_DIR / "lsgan_mnist.yaml").read_text())
SECTIONS = {"data": ["shards", "image_size", "channels", "batch_size", "num_workers", "max_errors", "load_size", "mirror"],
            "model": ["generator", "discriminator", "z_dim", "g_width", "norm", "num_classes", "widths", "expansion"],
            "optim.g": ["lr", "betas", "schedule", "decay_from", "clip_grad", "zero_stage", "lr_final", "decay_kimg"],
            "train": ["steps", "strategy", "grad_accum", "mixed_precision", "log_every", "keep_checkpoints"],
            "eval": ["every", "samples", "extractor", "inception"], "log": ["wandb", "progress"],
            "recipe": ["name", "d_steps", "a", "b", "c", "loss", "int_beta", "pool_size"], "": ["name", "seed", "resume", "run_dir"]}

scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["lsgan", "gan", "cyclegan", "t2i", "cgan", "inception", "bf16", "linear",
                                                    "deepspeed", "1e-3", "[0.5, 0.9]", "auto", "0", "cosine"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6) | st.integers(0, 3), inner, max_size=3), max_leaves=6)
known_keys = st.sampled_from([f"{section}.{key}".lstrip(".") for section, keys in SECTIONS.items() for key in keys])
any_keys = known_keys | st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(list(SECTIONS)) | st.text(max_size=6), st.text(max_size=8))


def assert_one_line(exc: ConfigError) -> None:
    message = str(exc)
    assert message and "\n" not in message and "\r" not in message, repr(message)


def accepted_or_config_error(build) -> None:
    """The property: a Config, or a one-line ConfigError. Anything else escapes and fails the test."""
    try:
        build()
    except ConfigError as exc:
        assert_one_line(exc)


def set_dotted(raw: dict, key: str, value) -> None:
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


# database=None: the examples are drawn afresh each run and nothing is written into the checkout.
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.tuples(any_keys, values), min_size=1, max_size=4))
def test_random_keys_and_values_in_the_config_dict(changes):
    raw = copy.deepcopy(BASE)
    for key, value in changes:
        set_dotted(raw, key, value)
    accepted_or_config_error(lambda: config_from_dict(raw))


def test_the_fuzzed_property_can_fail():
    """What the fuzzers would report: a number that is not finite is refused in one line."""
    raw = copy.deepcopy(BASE)
    set_dotted(raw, "optim.g.lr", float("nan"))
    with pytest.raises(ConfigError, match=r"^optim.g.lr=nan must be a finite number$"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match=r"^unknown key 'train\.a\\nb' \(allowed in train: steps,"):
        load_config("lsgan_mnist", ["train.a\nb=1"])  # a line break in a key is shown escaped: one line


@FUZZ
@given(st.lists(st.builds(lambda k, v: f"{k}={v}", any_keys, st.text(max_size=16)) | st.text(max_size=20), max_size=4))
def test_random_command_line_overrides(overrides):
    accepted_or_config_error(lambda: load_config("lsgan_mnist", overrides))


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")) | st.binary(max_size=100))
def test_random_yaml_files(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("yaml") / "cfg.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    accepted_or_config_error(lambda: load_config(str(path)))


@FUZZ
@given(st.integers(0, len((CONFIG_DIR / "lsgan_mnist.yaml").read_text()) - 1), st.sampled_from(["[", "{", ":", "\t", "'", "*x", "!!python/object:os.system", "- ", "%"]))
def test_a_real_config_with_one_break(tmp_path_factory, at, junk):
    text = (CONFIG_DIR / "lsgan_mnist.yaml").read_text()
    path = tmp_path_factory.mktemp("yaml") / "broken.yaml"
    path.write_text(text[:at] + junk + text[at:])
    accepted_or_config_error(lambda: load_config(str(path)))


@pytest.mark.parametrize("args, message", [  # an unknown key: tests/test_config.py
    (["BROKEN", "train.steps=5"], "gannet: error: BROKEN: not valid YAML (ParserError: expected ',' or ']', but got '<stream end>' "
                                  "at line 3, column 1)"),
    (["lsgan_mnist", "optim.g.betas=[0.5,"], "gannet: error: override 'optim.g.betas=[0.5,': not valid YAML"),
])
def test_cli_config_errors_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    broken = tmp_path / "broken.yaml"
    broken.write_text("recipe: {name: lsgan}\ntrain: [steps: 3\n")
    run_dir = tmp_path / "run"
    args = [str(broken) if a == "BROKEN" else a for a in args]
    result = gannet("train", *args, f"run_dir={run_dir}", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.replace("BROKEN", str(broken))), result.stderr
    assert not run_dir.exists() and result.stdout == ""
