"""The fast step's switches (gannet.trainer.engine.fast): `auto` resolves to what the log says and the engine
applies it; bf16 and torch.compile leave what a run computes close to fp32 eager; the speed bench
reports `speedup` and `loader_ratio` per model, and its DCGAN reference computes what gannet computes.
Speed itself is never asserted (README, Performance)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import open_stream, stream_urls
from gannet.trainer.engine import fast
from gannet.trainer.engine.setup import setup
from gannet.trainer.tracking.tracker import read_metrics as metrics
from tests.conftest import gannet, run, tiny_overrides


@pytest.fixture(autouse=True)
def one_thread():
    """As every test process (tests.conftest.process_env): one math thread, the same float order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses(run_dir) -> list[tuple[float, float]]:
    return [(row["train/loss_d"], row["train/loss_g"]) for row in metrics(run_dir)]


def test_auto_resolves_to_what_the_log_says_and_the_engine_applies_it(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    gannet("train", "lsgan_mnist", *tiny_overrides(small_shards, run_dir, **{"train.steps": 2, "train.log_every": 1}))
    line = next(line for line in (run_dir / "train.log").read_text().splitlines() if "speed settings on" in line)
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, run_dir))
    expected = fast.resolve(cfg, "cpu")
    precision = "bf16" if fast.cpu_has_fast_bf16() else "no"
    assert expected.mixed_precision == precision and not expected.compile and expected.adam == "fused"
    assert f"mixed_precision={precision}, compile=off, adam=fused, layout: G channels_last, D channels_last" in line

    job = setup(cfg)  # what the engine built matches the line
    engine = job.engine
    assert engine.accelerator.mixed_precision == precision
    assert all(group["fused"] for opt in engine.optimizers.values() for group in opt.param_groups)
    conv = engine.module("D").net[2].weight  # 16 input channels: the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert engine.fast.describe() in line
    engine.close()


def test_explicit_settings_win_and_instance_norm_stays_contiguous(silhouettes, tmp_path):
    from gannet.models.networks import DCGANDiscriminator, PatchDiscriminator

    cfg = load_config("lsgan_mnist", ["train.mixed_precision=no", "train.adam=foreach", "train.compile=off"])
    choices = fast.resolve(cfg, "cpu")
    assert (choices.mixed_precision, choices.compile, choices.adam) == ("no", False, "foreach")
    assert fast.channels_last_pays(PatchDiscriminator(3, 8), "auto", "cuda")[0] is False  # pytorch#72341
    assert fast.channels_last_pays(DCGANDiscriminator(8, 1, 28), "auto", "cuda")[0] is True
    assert fast.channels_last_pays(DCGANDiscriminator(8, 1, 28), "on", "cpu")[0] is True
    assert fast.resolve(load_config("lsgan_mnist", ["train.strategy=deepspeed"]), "cpu").mixed_precision == "no"
    deepspeed = fast.resolve(load_config("lsgan_mnist", ["train.strategy=deepspeed"]), "cpu")
    net = DCGANDiscriminator(8, 1, 28)
    fast.prepare_network("D", net, deepspeed, load_config("lsgan_mnist", ["train.strategy=deepspeed"]))
    assert deepspeed.channels_last == {"D": False} and net.net[2].weight.is_contiguous()  # ZeRO flattens parameters


def test_resumed_fused_adam_keeps_channels_last_moments_in_step():
    """Checkpoints store moments contiguous; fused Adam on CPU reads them as flat memory beside a
    channels_last weight, so without `match_layouts` a resumed step silently differs (measured: by lr)."""
    x = torch.randn(2, 8, 10, 10)

    def resumed(fused: bool) -> torch.Tensor:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(conv.parameters(), 1e-2, fused=fused)
        conv(x).square().mean().backward()
        opt.step()
        saved = opt.state_dict()
        saved["state"] = {k: {n: t.contiguous() for n, t in v.items()} for k, v in saved["state"].items()}
        opt.load_state_dict(saved)  # as a checkpoint gives them back
        fast.match_layouts(opt)
        assert opt.state[conv.weight]["exp_avg"].stride() == conv.weight.stride()
        conv(x).square().mean().backward()
        opt.step()
        return conv.weight.detach()

    assert torch.allclose(resumed(True), resumed(False), atol=1e-6)


def test_bf16_first_steps_stay_close_to_fp32(small_shards, tmp_path):
    """The same tiny run in fp32 and in bf16 autocast: losses step for step within bf16's rounding."""
    if not fast.cpu_has_fast_bf16():
        pytest.skip("this CPU has no native bf16 (auto stays fp32)")
    runs = {}
    for precision in ("no", "bf16"):
        gannet("train", "lsgan_mnist", *tiny_overrides(small_shards, tmp_path / precision, **{
            "train.steps": 20, "train.log_every": 1, "train.sample_every": 20, "train.checkpoint_every": 20,
            "train.mixed_precision": precision}))
        runs[precision] = losses(tmp_path / precision)
    assert len(runs["no"]) == len(runs["bf16"]) == 20
    diffs = [abs(a - b) / abs(a) for pair in zip(runs["no"], runs["bf16"]) for a, b in zip(*pair)]
    assert max(diffs) < 0.1 and sum(diffs) / len(diffs) < 0.03, diffs
    assert runs["no"] != runs["bf16"]  # bf16 really ran


def test_compile_matches_eager_with_an_ema_copy_and_a_gradient_penalty(plugin_recipe, small_shards, tmp_path):
    """torch.compile of G and D (graph capture through AOTAutograd; the aot_eager backend skips code
    generation to stay fast) gives eager's losses, with the R1 penalty's double backward running
    eagerly, the EMA copy left uncompiled, and D frozen in G's step (a recompile, reported)."""
    results = {}
    for mode in ("off", "on"):
        cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path, **{
            "recipe.name": plugin_recipe, "recipe.ema_kimg": 1, "recipe.r1_gamma": 1, "train.compile": mode, "train.compile_backend": "aot_eager",
            "train.mixed_precision": "no", "data.batch_size": 8, "model.g_width": 4, "model.d_width": 4}))
        job = setup(cfg)
        job.engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0)
        torch.manual_seed(1)
        results[mode] = [{k: v.item() for k, v in job.recipe.iteration(job.engine).items() if v.ndim == 0} for _ in range(3)]
        ema = job.engine.nets["G_ema"]
        assert "forward" not in vars(ema) and not any(p.requires_grad for p in ema.parameters())
        job.engine.close()
    for eager, compiled in zip(results["off"], results["on"]):
        assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)
    assert results["on"][0]["r1"] > 0
    report = fast.compile_report(2)
    assert re.search(r"torch.compile: [1-9]\d* graph\(s\), \d+ graph break\(s\), [1-9]\d* recompile\(s\) of 2", report), report


def test_dcgan_reference_step_computes_what_gannet_computes_in_fp32(small_shards, tmp_path):
    """Same weights, same batch, same noise: gannet's LSGAN step and the DCGAN example's step agree in
    fp32; in bf16 (where auto picks it) the first-step losses differ by bf16 rounding only."""
    out = tmp_path / "row.json"
    tiny = [f"data.shards={small_shards}/train-*.tar", "model.g_width=8", "model.d_width=8", "data.batch_size=16"]
    run([sys.executable, "-m", "gannet.trainer.bench.speed", "dcgan_lsgan_mnist", str(out), "2", "0.5", *tiny, "train.mixed_precision=no"])
    row = json.loads(out.read_text())
    assert row["first_step_losses"]["gannet"] == pytest.approx(row["first_step_losses"]["reference"], rel=1e-5)
    assert row["mixed_precision"] == "no" and row["speedup"] > 0 and row["loader_ratio"] > 0
    if fast.cpu_has_fast_bf16():
        run([sys.executable, "-m", "gannet.trainer.bench.speed", "dcgan_lsgan_mnist", str(out), "1", "0.5", *tiny])
        row = json.loads(out.read_text())
        assert row["mixed_precision"] == "bf16"
        assert max(row["loss_rel_difference"].values()) < 0.05


def test_speed_bench_reports_speedup_and_loader_ratio_per_model(tmp_path):
    out = tmp_path / "speed.json"
    small = ["model.g_width=4", "model.d_width=4", "data.image_size=64", "data.load_size=72"]  # both models, small and fast
    result = gannet("bench", "speed", "--steps", "1", "--loader-s", "0.5", *small, "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"cyclegan_256", "dcgan_lsgan_mnist"}
    for name, row in report["models"].items():
        assert row["speedup"] > 0 and row["loader_ratio"] > 0, name
        assert row["speedup"] == pytest.approx(row["reference_ms"] / row["gannet_ms"])
        assert row["loader_ratio"] == pytest.approx(row["loader"]["images_per_s"] / row["training_images_per_s"])
    assert report["models"]["cyclegan_256"]["batch_size"] == 1 and report["models"]["dcgan_lsgan_mnist"]["batch_size"] == 64
    assert {row["image_size"] for row in report["models"].values()} == {64}
    assert "loader ratio" in result.stdout and len(report["load_average_before"]) == 3


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: `make bench-gpu` runs these on a GPU")


@pytest.mark.gpu
@needs_gpu
def test_gpu_auto_picks_bf16_compile_channels_last_and_fused_adam(small_shards, tmp_path):
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path))
    choices = fast.resolve(cfg, "cuda")
    assert (choices.mixed_precision, choices.compile, choices.adam) == ("bf16", True, "fused")
    job = setup(cfg)
    engine = job.engine
    assert engine.device.type == "cuda" and torch.backends.cudnn.benchmark
    assert engine.module("D").net[2].weight.is_contiguous(memory_format=torch.channels_last)
    engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0)
    out = job.recipe.iteration(engine)
    assert torch.isfinite(out["loss_d"]) and out["loss_d"].dtype == torch.float32
    engine.close()


@pytest.mark.gpu
@needs_gpu
def test_gpu_training_run_with_defaults_logs_its_settings_and_compile_report(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    gannet("train", "lsgan_mnist", *tiny_overrides(small_shards, run_dir, **{"train.steps": 10}))
    log = (run_dir / "train.log").read_text()
    assert "speed settings on cuda: mixed_precision=bf16, compile=on" in log and "torch.compile:" in log
