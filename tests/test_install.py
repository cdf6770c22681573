"""An ordinary (non-editable) install works outside the source tree.

The wheel is built from a copy of the sources, installed with pip into a fresh virtual
environment, and used from an unrelated directory: shards, a short training run, a DeepSpeed
preset named by its source-tree path, and an sbatch script from the bundled template. Beside it
the venv holds a user's own packages named `models` and `trainer` (as any research environment
may): gannet installs under the one name `gannet`, so it neither imports them nor hides them. The fresh
venv borrows the test environment's third-party packages through a .pth file (a full install of
torch & co. takes minutes and a network), but nothing of the source tree: the checks assert that
gannet itself is imported from the venv.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO, process_env

SOURCES = ("gannet", "trainer", "models", "launch", "configs", "pyproject.toml", "README.md", "LICENSE")


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def test_wheel_installs_into_a_fresh_venv_and_runs_from_another_directory(tmp_path):
    src, wheels, venv, elsewhere = (tmp_path / name for name in ("src", "wheels", "venv", "elsewhere"))
    for name in SOURCES:  # a copy: building in the checkout would leave build/ and egg-info there
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / name).is_dir() else {}))
    env = {k: v for k, v in process_env().items() if k != "PYTHONPATH"}  # the checkout must not be importable
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        tmp_path, env)
    (wheel,) = wheels.glob("gannet-*.whl")

    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        tmp_path, env)
    # Third-party packages from this environment (after the install, so pip sees a venv without gannet).
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       tmp_path, env).stdout.strip())
    borrowed = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (purelib / "borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(borrowed)))
    for other in ("models", "trainer"):  # a user's own packages of those names, which gannet must never import
        (purelib / other).mkdir()
        (purelib / other / "__init__.py").write_text(f"raise ImportError('the user\\'s own {other} package')\n")

    elsewhere.mkdir()
    gannet = str(venv / "bin" / "gannet")
    run([gannet, "shards", "mnist", "--out", "d"], elsewhere, env)
    run([gannet, "train", "lsgan_mnist", "data.shards=d/train-{000000..000008}.tar", "train.steps=5", "run_dir=r",
         "data.batch_size=32", "model.g_width=16", "model.d_width=16", "train.log_every=5", "train.sample_every=5",
         "train.checkpoint_every=5", "log.wandb=disabled"], elsewhere, env)
    assert (elsewhere / "r" / "checkpoints" / "step-00000005" / "G.safetensors").is_file()
    assert (elsewhere / "r" / "samples" / "step-00000005.png").is_file()

    probe = run([str(python), "-c", (
        "import gannet.trainer, gannet.configs, gannet.launch\n"
        "from gannet.trainer.config.loader import load_config\n"
        "cfg = load_config('lsgan_mnist', ['launch/deepspeed/zero2.yaml'])\n"
        "for other in ('models', 'trainer'):\n"
        "    try:\n"
        "        __import__(other)\n"
        "    except ImportError as e:\n"
        "        print(str(e).replace(' ', '_'))\n"
        "print(gannet.trainer.__file__, gannet.configs.__file__, gannet.launch.__file__, cfg.train.strategy, sep='\\n')")],
        elsewhere, env)
    theirs_models, theirs_trainer, *files, strategy = probe.stdout.split()
    assert (theirs_models, theirs_trainer) == ("the_user's_own_models_package", "the_user's_own_trainer_package")
    assert strategy == "deepspeed"  # the preset, found inside the installed package
    for file in files:
        assert Path(file).resolve().is_relative_to(venv.resolve()) and not Path(file).resolve().is_relative_to(REPO), file

    run([gannet, "slurm", "lsgan_mnist", "--nodes", "1", "--gpus-per-node", "0", "--sbatch", "job.sbatch",
         "run_dir=r2"], elsewhere, env)
    script = (elsewhere / "job.sbatch").read_text()
    assert "#SBATCH --nodes=1" in script and "accelerate" in script and "{{" not in script


def test_bundled_configs_and_presets_resolve_from_any_directory(tmp_path, monkeypatch):
    from gannet.trainer.config.loader import load_config, resolve_config_path

    monkeypatch.chdir(tmp_path)  # neither configs/ nor launch/ is here
    cfg = load_config("configs/lsgan_mnist.yaml", ["launch/deepspeed/zero3.yaml"])
    assert cfg.name == "lsgan_mnist" and cfg.train.strategy == "deepspeed" and cfg.optim.g.zero_stage == 3
    assert resolve_config_path("cyclegan_silhouettes").name == "cyclegan_silhouettes.yaml"
    (tmp_path / "launch" / "deepspeed").mkdir(parents=True)  # a file of that path here wins over the bundled one
    (tmp_path / "launch" / "deepspeed" / "zero3.yaml").write_text("train: {strategy: ddp}\n")
    assert load_config("lsgan_mnist", ["launch/deepspeed/zero3.yaml"]).train.strategy == "ddp"
