"""Real multi-process runs on CPU (gloo): accelerate launch with 2 processes and with 2 emulated
nodes, DDP vs single-process and accumulation equivalence, DeepSpeed ZeRO 1-3 against DDP, exact
DeepSpeed resume, and DDP resume on a different number of processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gannet.trainer.engine.distributed import free_port
from gannet.trainer.tracking.tracker import read_metrics as metrics
from tests.conftest import BIN, REPO, accelerate_train, process_env, run, tiny_overrides, without_perf


def test_two_processes_train_to_the_end(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    accelerate_train(tiny_overrides(small_shards, run_dir, **{"train.steps": 24, "train.checkpoint_every": 12}))
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 24]  # rank 0 alone writes: no duplicated lines
    final = run_dir / "checkpoints" / "step-00000024"
    assert {p.name for p in final.iterdir()} >= {"G.safetensors", "D.safetensors", "rank0.json", "rank1.json"}
    assert rows[-1]["perf/images_per_s"] > 0


def test_two_emulated_nodes_on_loopback(small_shards, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    overrides = tiny_overrides(small_shards, run_dir, **{"train.steps": 20, "data.num_workers": 1})
    nodes = [
        subprocess.Popen(
            [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gannet", "train", "lsgan_mnist", *overrides],
            cwd=REPO, env=process_env(ACCELERATE_USE_CPU="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert metrics(run_dir)[-1]["step"] == 20
    assert (run_dir / "checkpoints" / "step-00000020" / "rank1.json").exists()


def harness(out: Path, processes: int, *overrides: str, steps: int = 4, config: str = "lsgan_mnist") -> dict[str, torch.Tensor]:
    """Weights after `steps` iterations of `config` on fixed global batches (tests/dist_harness.py)."""
    script = str(REPO / "tests" / "dist_harness.py")
    args = [str(out), str(steps), "train.cpu=true", "train.mixed_precision=no", *overrides]  # an fp32 tolerance claim
    env = process_env(HARNESS_CONFIG=config)
    if processes == 1:
        run([sys.executable, script, *args], env=env)
    else:
        run([str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(free_port()), script, *args], env=env)
    return load_file(str(out))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], moved_from: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - moved_from[k]).abs().max().item() for k in a)
    assert diff < 1e-5 < 1e-3 < moved, f"max weight difference {diff:.2e} (training moved weights by {moved:.2e})"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """1 process x global batch 16 after 4 steps, and the weights it started from."""
    tmp = tmp_path_factory.mktemp("ref")
    return {"trained": harness(tmp / "one.st", 1), "initial": harness(tmp / "init.st", 1, steps=0)}


def test_ddp_two_processes_match_one_process_with_twice_the_batch(reference, tmp_path):
    assert_same_weights(harness(tmp_path / "two.st", 2), reference["trained"], reference["initial"])


def test_accumulation_of_two_half_batches_matches_the_full_batch(reference, tmp_path):
    assert_same_weights(harness(tmp_path / "acc.st", 1, "train.grad_accum=2"), reference["trained"], reference["initial"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])  # 0: a frozen D's engine lets G's backward through
def test_deepspeed_zero_stages_on_two_processes_match_ddp(reference, tmp_path, stage):
    weights = harness(tmp_path / f"zero{stage}.st", 2, "train.strategy=deepspeed",
                      f"optim.g.zero_stage={stage}", f"optim.d.zero_stage={stage}")
    assert_same_weights(weights, reference["trained"], reference["initial"])


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), pytest.param("zero1", marks=pytest.mark.slow), "zero2"])
def test_compiled_networks_on_two_processes_match_eager(reference, tmp_path, strategy):
    """train.compile under DDP and DeepSpeed ZeRO-1/2: graph capture (aot_eager: AOTAutograd
    without code generation, so the test does not wait for a C++ compiler) computes the eager run's
    weights; a wrapper that bypassed the compiled forward, or broke gradient sync, would not."""
    extra = [] if strategy == "ddp" else ["train.strategy=deepspeed", f"optim.g.zero_stage={strategy[-1]}",
                                          f"optim.d.zero_stage={strategy[-1]}"]
    weights = harness(tmp_path / f"{strategy}.st", 2, "train.compile=on", "train.compile_backend=aot_eager", *extra)
    assert_same_weights(weights, reference["trained"], reference["initial"])
    report = (tmp_path / f"{strategy}.st.compile.txt").read_text()
    assert re.match(r"torch.compile: [1-9]\d* graph\(s\), 0 graph break\(s\)", report), report


@pytest.mark.parametrize("g_stage, d_stage", [(2, 3), pytest.param(1, 1, marks=pytest.mark.slow)])  # [2-3] covers mixed stages; [1-1]: -m slow
def test_deepspeed_resume_is_exact_with_per_network_zero_stages(small_shards, tmp_path, g_stage, d_stage):
    extra = {"train.strategy": "deepspeed", "optim.g.zero_stage": g_stage, "optim.d.zero_stage": d_stage,
             "train.checkpoint_every": 10, "train.sample_every": 10}
    accelerate_train(tiny_overrides(small_shards, tmp_path / "straight", **{**extra, "train.steps": 20}))
    accelerate_train(tiny_overrides(small_shards, tmp_path / "split", **{**extra, "train.steps": 10}))
    assert (tmp_path / "split" / "checkpoints" / "step-00000010" / "deepspeed_D").is_dir()
    accelerate_train(tiny_overrides(small_shards, tmp_path / "split", **{**extra, "train.steps": 20}) + ["resume=auto"])
    for name in ("G", "D"):
        a, b = (load_file(str(tmp_path / run / "checkpoints" / "step-00000020" / f"{name}.safetensors"))
                for run in ("straight", "split"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after a DeepSpeed resume"
    assert without_perf(metrics(tmp_path / "split")) == without_perf(metrics(tmp_path / "straight"))


def test_ddp_checkpoint_resumes_on_a_different_number_of_processes(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    accelerate_train(tiny_overrides(small_shards, run_dir, **{"train.steps": 10}))
    saved = load_file(str(run_dir / "checkpoints" / "step-00000010" / "G.safetensors"))
    result = run([sys.executable, "-m", "gannet", "train", "lsgan_mnist",
                  *tiny_overrides(small_shards, run_dir, **{"train.steps": 11, "train.checkpoint_every": 1}), "resume=auto"])
    assert "resuming on 1 processes from a 2-process checkpoint" in result.stderr
    assert metrics(run_dir)[-1]["step"] == 11
    after = load_file(str(run_dir / "checkpoints" / "step-00000011" / "G.safetensors"))
    # one step of Adam at lr 2e-4 from the restored weights: close to them, so they were really loaded
    params = [k for k in saved if "running" not in k and "num_batches" not in k]
    assert 0 < max((after[k] - saved[k]).abs().max().item() for k in params) < 1e-3


def test_deepspeed_bf16_preset_trains_on_a_single_process(small_shards, tmp_path):
    """No launcher, bf16 weights (BatchNorm buffers cast with them), fp32 weights in the checkpoint."""
    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "gannet", "train", "lsgan_mnist", *tiny_overrides(small_shards, run_dir, **{"train.steps": 10}),
         "launch/deepspeed/zero2.yaml"])
    rows = metrics(run_dir)
    assert rows[-1]["step"] == 10 and all(abs(r["train/loss_d"]) < 10 for r in rows)
    weights = load_file(str(run_dir / "checkpoints" / "step-00000010" / "G.safetensors"))
    assert {t.dtype for t in weights.values()} <= {torch.float32, torch.int64}
    assert (run_dir / "checkpoints" / "step-00000010" / "deepspeed_G").is_dir()
    assert (run_dir / "samples" / "step-00000010.png").exists()


def test_in_training_eval_gathers_samples_from_both_ranks(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    accelerate_train(tiny_overrides(mnist_shards, run_dir, **{"train.steps": 10, "eval.every": 10, "eval.samples": 101}))
    (row,) = [r for r in metrics(run_dir) if "eval/fid" in r]
    assert row["step"] == 10 and row["eval/fid"] > 0 and 0 <= row["eval/precision"] <= 1
