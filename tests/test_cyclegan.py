"""CycleGAN: the reference architectures' exact parameter counts, the image pool, deterministic
augmentation, one iteration's update order on the real engine, and real CLI runs on the bundled
horse/zebra silhouettes (unpaired shards from folders, exact resume with image pools, folder
translation, two processes under DDP and DeepSpeed)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from gannet.models.networks import PatchDiscriminator, ResnetGenerator
from gannet.models.recipes import get_recipe
from gannet.models.recipes.cyclegan import ImagePool
from gannet.trainer.bench.step import cyclegan_step_bench
from gannet.trainer.checkpoint.statefile import load_state
from gannet.trainer.cli import main as cli_main
from gannet.trainer.config.loader import load_config
from gannet.trainer.config.schema import DataConfig
from gannet.trainer.data.stream import augment, open_stream, stream_urls
from gannet.trainer.engine.distributed import free_port
from gannet.trainer.engine.setup import setup
from gannet.trainer.errors import ConfigError
from gannet.trainer.tracking.tracker import read_metrics as metrics
from tests.conftest import BIN, run, without_perf

count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731


@pytest.fixture(autouse=True)
def one_thread():
    """Networks this small gain nothing from more threads, and on a shared CPU extra threads spin-wait
    (a CycleGAN step here ran 20x slower with the default threads on an oversubscribed machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(*args: str) -> str:
    """The real CLI in a fresh process, one thread per process as in the multi-process tests; stdout."""
    return run([sys.executable, "-m", "gannet", *args]).stdout


def test_parameter_counts_match_the_reference_implementation():
    """junyanz/pytorch-CycleGAN-and-pix2pix prints 11.378 M (resnet_9blocks) and 2.765 M (basic D).

    G, 3 -> 3 channels, ngf 64, every conv with a bias (instance norm has no affine parameters):
      c7s1-64        3*64*49 + 64                =      9,472
      d128, d256     64*128*9 + 128 + 128*256*9 + 256 =  369,024
      9 x R256       9 * 2 * (256*256*9 + 256)   = 10,621,440
      u128, u64      256*128*9 + 128 + 128*64*9 + 64  =  368,832
      c7s1-3         64*3*49 + 3                 =      9,411
                                                   11,378,179
    D (70x70 PatchGAN), ndf 64, 4x4 kernels:
      3*64*16 + 64 + 64*128*16 + 128 + 128*256*16 + 256 + 256*512*16 + 512 + 512*1*16 + 1 = 2,764,737
    """
    G, D = ResnetGenerator(3, 64, 9), PatchDiscriminator(3, 64)
    assert count(G) == 11_378_179
    assert count(D) == 2_764_737
    norms = [m for net in (G, D) for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == (1 + 2 + 18 + 2) + 3 and not any(m.affine or m.track_running_stats for m in norms)
    assert not list(G.buffers()) and not list(D.buffers())
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in G.modules()) == 2 + 18
    assert D(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # one score per 70x70 patch
    small = ResnetGenerator(1, 8, 6)
    out = small(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32) and out.abs().max() <= 1
    weights = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(weights.std().item() - 0.02) < 0.001  # init N(0, 0.02)


def test_image_pool_returns_new_fakes_until_full_then_mixes_history():
    torch.manual_seed(0)
    pool = ImagePool(4)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first) and len(pool.images) == 4
    later = 10 + torch.arange(100.0).view(100, 1, 1, 1)
    out = pool.query(later).flatten()
    from_history = (out != later.flatten()).sum().item()
    assert 30 < from_history < 70  # about half are swapped for a stored fake
    assert (out < 4).any() and len(pool.images) == 4  # the first fakes came back out; the pool stays at its size
    assert ImagePool(0).query(later) is later


def test_augmentation_is_a_crop_and_flip_fixed_by_the_sample_position():
    cfg = DataConfig(image_size=4, load_size=6, mirror=True)
    sample = {"image": torch.arange(36.0).view(1, 6, 6), "label": torch.tensor(1)}
    crops = [augment(sample, cfg, (0, 0, 0, 0, i))["image"] for i in range(40)]
    assert all(c.shape == (1, 4, 4) for c in crops)
    assert torch.equal(crops[3], augment(sample, cfg, (0, 0, 0, 0, 3))["image"])  # same position, same crop
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 10
    flipped = sum(bool(c[0, 0, 0] > c[0, 0, 1]) for c in crops)  # rows decrease left to right after a flip
    assert 5 < flipped < 35
    assert augment(sample, DataConfig(image_size=6), (0,)) is sample  # no load_size, no flip: untouched


def tiny(shards, run_dir, **extra) -> list[str]:
    values = {"data.shards": f"{shards}/a-*.tar", "data.shards_b": f"{shards}/b-*.tar", "data.batch_size": 2,
              "data.shuffle_buffer": 20, "model.g_width": 8, "model.d_width": 8, "recipe.pool_size": 3,
              "train.steps": 6, "train.log_every": 1, "train.sample_every": 6, "train.checkpoint_every": 3,
              "train.num_samples": 4, "optim.g.decay_from": 2, "optim.d.decay_from": 2, "log.wandb": "disabled",
              "run_dir": str(run_dir)}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_one_iteration_updates_all_four_networks_and_the_g_step_leaves_d_untouched(silhouettes, tmp_path):
    cfg = load_config("cyclegan_silhouettes", tiny(silhouettes["small"], tmp_path))
    job = setup(cfg)
    engine, recipe = job.engine, job.recipe
    engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0)
    snapshot = lambda: {k: v.clone() for name in ("G", "D") for k, v in  # noqa: E731
                        ((f"{name}.{k}", v) for k, v in engine.module(name).state_dict().items())}
    before, events = snapshot(), []

    def after_g_step(*_):
        events.append("G")
        now = snapshot()
        assert all(torch.equal(now[k], before[k]) for k in now if k.startswith("D.")), "the G step changed D"
        assert all(p.grad is None for p in engine.nets["D"].parameters()), "a gradient leaked into D in the G step"

    def after_d_step(*_):
        events.append("D")

    engine.optimizers["G"].optimizer.register_step_post_hook(after_g_step)
    engine.optimizers["D"].optimizer.register_step_post_hook(after_d_step)
    out = recipe.iteration(engine)
    assert events == ["G", "D"]
    after = snapshot()
    for prefix in ("G.AB.", "G.BA.", "D.A.", "D.B."):  # all four networks moved
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(prefix)), f"{prefix} did not change"
    assert all(p.requires_grad for p in engine.nets["D"].parameters())
    assert set(out) == {"loss_g", "loss_d", "gan_ab", "gan_ba", "cycle_a", "cycle_b", "idt_a", "idt_b", "d_real", "d_fake", "d_scale"}
    expected_g = sum(out[k] for k in ("gan_ab", "gan_ba", "cycle_a", "cycle_b", "idt_a", "idt_b"))
    assert out["loss_g"].item() == pytest.approx(expected_g.item(), rel=1e-5)
    assert [len(p.images) for p in recipe.pools.values()] == [2, 2]  # one batch of fakes stored per pool
    assert engine.data.position.state_dict()["b"]["consumed"] == [2]  # B read from its own stream


def test_cli_trains_resumes_exactly_with_image_pools_and_translates_a_folder(silhouettes, tmp_path, capsys):
    """With DiffAugment on D and an EMA of the generators: their RNG draws and average resume exactly too."""
    run_dir = tmp_path / "run"
    options = {"recipe.augment": "diffaugment", "recipe.ema_kimg": 0.01}
    cli("train", "cyclegan_silhouettes", *tiny(silhouettes["small"], run_dir, **options))
    final = run_dir / "checkpoints" / "step-00000006"
    straight = {n: load_file(str(final / f"{n}.safetensors")) for n in ("G", "D", "G_ema")}
    assert not all(torch.equal(straight["G"][k], straight["G_ema"][k]) for k in straight["G"])  # an average, not a copy
    straight_pools = load_state(final / "rank0")["recipe"]
    straight_rows = metrics(run_dir)
    assert set(straight["G"]) == {k for k in straight["G"] if k.startswith(("AB.", "BA."))} and len(straight["G"]) > 0
    assert [len(straight_pools[d]) for d in "AB"] == [3, 3]  # full pools: later steps drew from them at random
    assert straight_pools["ema_images"] == 6 * 2
    assert straight_rows[-1]["train/lr_g"] == 0.0  # linear decay to zero at the last step

    shutil.rmtree(final)  # back to step 3, then resume: pools, RNG, both streams and optimizers restored
    cli("train", "cyclegan_silhouettes", *tiny(silhouettes["small"], run_dir, **options), "resume=auto")
    for name in ("G", "D", "G_ema"):
        resumed = load_file(str(final / f"{name}.safetensors"))
        assert all(torch.equal(resumed[k], straight[name][k]) for k in resumed), f"{name} differs after resume"
    pools = load_state(final / "rank0")["recipe"]
    assert all(torch.equal(a, b) for d in "AB" for a, b in zip(pools[d], straight_pools[d]))
    assert without_perf(metrics(run_dir)) == without_perf(straight_rows)

    grid = np.asarray(Image.open(run_dir / "samples" / "step-00000006.png"))
    assert grid.shape == (2 * 34 + 2, 2 * 98 + 2)  # 2 horse + 2 zebra triplets (real | translated | back), 32 px

    out = tmp_path / "zebras"
    result = cli("sample", str(run_dir), "--direction", "AtoB", "--input", str(silhouettes["full"] / "testA"), "--out", str(out))
    assert "translated 100 image(s) AtoB" in result
    assert {p.name for p in out.iterdir()} == {p.name for p in (silhouettes["full"] / "testA").iterdir()}
    assert Image.open(next(out.iterdir())).size == (32, 32)
    assert cli_main(["sample", str(run_dir), "--direction", "AtoB", "--out", str(out)]) == 2
    assert "--direction and --input go together" in capsys.readouterr().err
    assert cli_main(["sample", str(run_dir), "--out", str(tmp_path / "g.png")]) == 1  # a noise grid: not for CycleGAN
    assert "use `gannet sample RUN --direction AtoB" in capsys.readouterr().err


def test_unpaired_data_is_required_and_bad_folders_are_clear_errors(silhouettes, tmp_path, capsys):
    cfg = load_config("cyclegan_silhouettes", tiny(silhouettes["small"], tmp_path / "r", **{"data.shards_b": ""}))
    with pytest.raises(ConfigError, match="recipe cyclegan needs unpaired data"):
        get_recipe("cyclegan")(cfg.recipe, cfg)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not a png")
    empty = tmp_path / "b"
    empty.mkdir()
    shards = ["shards", "unpaired", "--a", str(tmp_path / "a"), "--b", str(empty), "--out", str(tmp_path / "o")]
    assert cli_main(shards) == 2 and "x.png is not a readable image" in capsys.readouterr().err
    (tmp_path / "a" / "x.png").unlink()
    Image.new("RGB", (50, 40)).save(tmp_path / "a" / "y.jpg")
    assert cli_main(shards) == 2 and "holds no images" in capsys.readouterr().err
    assert cli_main(shards[:2] + ["--a", str(tmp_path / "a"), "--out", str(tmp_path / "o")]) == 2
    assert "needs both --a DIR and --b DIR" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_two_processes_train_to_the_end(silhouettes, tmp_path, strategy):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "gannet", "train",
           "cyclegan_silhouettes", *tiny(silhouettes["small"], run_dir, **{"train.strategy": strategy, "train.steps": 4}),
           "train.cpu=true"]
    run(cmd)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    final = run_dir / "checkpoints" / "step-00000004"
    pools = [load_state(final / f"rank{r}")["recipe"] for r in (0, 1)]
    assert all(len(p[d]) == 3 for p in pools for d in "AB")
    assert not torch.equal(pools[0]["A"][0], pools[1]["A"][0])  # each rank keeps its own fakes


def test_bench_times_the_step_beside_the_plain_reference_step_and_both_compute_the_same(silhouettes, tmp_path, capsys):
    out = tmp_path / "bench.json"
    fp32 = [*tiny(silhouettes["small"], tmp_path / "unused"), "train.mixed_precision=no"]  # equal losses need the same precision
    report = cyclegan_step_bench("cyclegan_silhouettes", fp32, steps=2, out=out)
    ours, theirs = report["first_step_losses"]["gannet"], report["first_step_losses"]["reference"]
    assert ours == pytest.approx(theirs, rel=1e-5)  # same weights, same batches: the same computation
    assert report["gannet_ms"] > 0 and report["reference_ms"] > 0 and report["ratio"] > 0
    assert report["params"]["G"] == 2 * count(ResnetGenerator(1, 8, 6))
    assert json.loads(out.read_text())["ratio"] == report["ratio"]
    assert "ratio gannet/reference" in capsys.readouterr().out


def test_diffaugment_changes_what_d_sees_and_only_when_asked(silhouettes, tmp_path):
    seen = []
    D = lambda x, domain: seen.append(x) or x.mean()  # noqa: E731  (records D's input)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    for policy, differs in (("none", False), ("diffaugment", True)):
        cfg = load_config("cyclegan_silhouettes", tiny(silhouettes["small"], tmp_path, **{"recipe.augment": policy}))
        get_recipe("cyclegan")(cfg.recipe, cfg).judge(D, x, "A")
        assert seen[-1].shape == x.shape and (not torch.equal(seen[-1], x)) == differs
    with pytest.raises(ConfigError, match="recipe.diffaugment"):
        load_config("cyclegan_silhouettes", tiny(silhouettes["small"], tmp_path, **{"recipe.diffaugment": "sharpen"}))
