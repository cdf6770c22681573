"""`gannet export`: every recipe's trained G leaves as ONNX and torch.export files that compute what
gannet computes, load without gannet, draw the run's grids through `gannet sample FILE`, and fail on
a damaged or foreign file with one line.

One short in-process training run per recipe (tiny networks, 2 steps) is shared by that recipe's
tests. The recipes are read from the registry; one per kind of generator input runs in `make test`
(gan: noise; cgan: a label; t2i: a sentence embedding; cyclegan: an image) and the others are
marked slow (`pytest -m slow tests/test_export.py`). The text run encodes captions with a tiny
BERT saved as a local Hugging Face folder (MiniLM's tokenizer, random weights), which exports in a
second where MiniLM takes most of a minute; docs/export.md gives MiniLM's figures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from PIL import Image

import gannet
from gannet.models.recipes import discover
from gannet.models.text import SentenceEncoder, bundled_minilm
from gannet.trainer import export
from gannet.trainer.cli import main as cli_main
from gannet.trainer.config.loader import load_config
from gannet.trainer.errors import ConfigError
from gannet.trainer.evaluation.sampling import load_networks, open_run
from gannet.trainer.loop import train
from tests.conftest import gannet as gannet_process
from tests.conftest import process_env
from tests.test_train import bundled_config

FAST = ("gan", "cgan", "t2i", "cyclegan")  # one recipe per kind of generator input
RECIPES = [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in sorted(discover())]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks gain nothing from threads; on a shared CPU extra threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A local Hugging Face encoder folder: MiniLM's tokenizer and a 1-layer BERT of width 32."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(bundled_minilm(), local_files_only=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=RECIPES)
def run(request, mnist_shards, silhouettes, tiny_bert, tmp_path_factory) -> Path:
    """A 2-step run of the recipe's bundled config, tiny networks, with a checkpoint at step 2."""
    config = bundled_config(request.param)
    data = yaml.safe_load(config.read_text())["data"]
    small = silhouettes["small"]
    values = ({"data.shards": f"{small}/a-*.tar", "data.shards_b": f"{small}/b-*.tar"} if data.get("shards_b")
              else {"data.shards": f"{mnist_shards}/train-*.tar"})
    if data.get("text_encoder"):
        values.update({"data.text_encoder": str(tiny_bert), "model.cond_dim": 8})
    run_dir = tmp_path_factory.mktemp(request.param)
    values.update({"data.batch_size": 4, "data.num_workers": 1, "data.shuffle_buffer": 20, "model.g_width": 8,
                   "model.d_width": 8, "train.steps": 2, "train.log_every": 1, "train.sample_every": 2,
                   "train.checkpoint_every": 2, "train.num_samples": 4, "optim.g.schedule": "constant",
                   "optim.d.schedule": "constant", "log.wandb": "disabled", "run_dir": str(run_dir)})
    train(load_config(str(config), [f"{k}={v}" for k, v in values.items()]))
    return run_dir


def reference(run_dir: Path):
    """The run's config, recipe and networks, as `gannet sample RUN` opens them, and a function giving
    PyTorch's images ([-1, 1]) for a file's inputs (its own pixel range for images)."""
    cfg, recipe, kept = open_run(run_dir)
    nets = load_networks(recipe, kept[max(kept)])

    def images(name: str, inputs: dict[str, torch.Tensor], pixels: str) -> torch.Tensor:
        with torch.no_grad():
            if recipe.translates:
                return recipe.translate(nets, export.from_pixels(inputs["image"], pixels), name)
            return recipe.generate(nets, inputs)

    return cfg, recipe, nets, images


def file_inputs(path: Path, batch: int, seed: int) -> dict[str, torch.Tensor]:
    specs = export.open_exported(path).inputs
    return dict(zip([spec.name for spec in specs], export.example_inputs(specs, batch, "float", seed=seed)))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """exported(fmt) -> {generator name: file}: each run's default export in each format, made once."""
    made: dict[str, dict[str, Path]] = {}

    def files(fmt: str) -> dict[str, Path]:
        if fmt not in made:
            out = tmp_path_factory.mktemp("exported") / f"g.{fmt}"
            made[fmt] = {e.meta["generator"]: e.path for e in export.export_run(run, out)}
        return made[fmt]

    return files


def test_onnx_runs_in_onnxruntime_as_pytorch_does_at_batch_1_and_7_and_says_what_it_is(run, exported):
    cfg, recipe, nets, images = reference(run)
    files = exported("onnx")
    assert set(files) == set(recipe.generators(nets))
    for name, path in files.items():
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (1, 7):
            inputs = file_inputs(path, batch, seed=batch)
            (out,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
            expected = export.to_pixels(images(name, inputs, "float"), "float")
            assert out.shape == tuple(expected.shape) and out.dtype == np.float32
            assert np.abs(out - expected.numpy()).max() <= 1e-4, (name, batch)
        meta = session.get_modelmeta().custom_metadata_map
        assert {k: meta[k] for k in ("producer", "recipe", "run", "step", "image_size", "channels", "gannet_version")} == {
            "producer": "gannet", "recipe": cfg.recipe.name, "run": str(run), "step": "2",
            "image_size": str(cfg.data.image_size), "channels": str(cfg.data.channels), "gannet_version": gannet.__version__}
        kinds = [spec["kind"] for spec in json.loads(meta["inputs"])]
        assert meta["z_dim"] == (str(cfg.model.z_dim) if "noise" in kinds else "0")
        assert meta["weights"] == {"AtoB": "G.AB", "BtoA": "G.BA"}.get(name, "G_ema" if "G_ema" in nets else "G")
        if "label" in kinds:
            assert json.loads(meta["class_names"]) == [str(i) for i in range(cfg.model.num_classes)]
        if "embedding" in kinds:
            assert meta["text_encoder"] == cfg.data.text_encoder and "mean" in meta["text_pooling"]


def test_pt2_loads_with_torch_export_in_a_process_without_gannet_and_matches(run, exported, tmp_path):
    *_, images = reference(run)
    files = exported("pt2")
    cases = {}
    for name, path in files.items():
        assert json.loads(path.with_suffix(".json").read_text())["generator"] == name  # the metadata beside it
        inputs = file_inputs(path, 7, seed=3)
        torch.save(list(inputs.values()), tmp_path / f"{name}.in.pt")
        cases[name] = export.to_pixels(images(name, inputs, "float"), "float")
    script = ("import json, sys, torch\n"
              "for name, path in json.loads(sys.argv[1]).items():\n"
              "    program = torch.export.load(path)\n"
              "    torch.save(program.module()(*torch.load(f'{name}.in.pt')), f'{name}.out.pt')\n"
              "assert not [m for m in sys.modules if m.startswith('gannet')], 'gannet was imported'\n")
    env = {k: v for k, v in process_env().items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script, json.dumps({k: str(v) for k, v in files.items()})], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, expected in cases.items():
        assert (torch.load(tmp_path / f"{name}.out.pt") - expected).abs().max().item() <= 1e-5, name


def test_sample_from_the_file_draws_the_runs_grid(run, exported, tmp_path, silhouettes):
    _, recipe, *_ = reference(run)
    if recipe.translates:
        folder = tmp_path / "in"
        folder.mkdir()
        for path in sorted((silhouettes["full"] / "testA").iterdir())[:5]:
            shutil.copy(path, folder / path.name)
        for direction, path in exported("onnx").items():
            for source, out in ((run, tmp_path / f"run-{direction}"), (path, tmp_path / f"file-{direction}")):
                assert cli_main(["sample", str(source), "--direction", direction, "--input", str(folder), "--out", str(out)]) == 0
            assert max_difference(tmp_path / f"run-{direction}", tmp_path / f"file-{direction}") <= 1
        return
    path = exported("onnx")["G"]
    # G itself (not its average), a fixed batch of 3 (20 samples: 6 batches and a padded 2), uint8 pixels
    fixed = export.export_run(run, tmp_path / "fixed.pt2", batch=3, pixels="uint8", raw=True)[0].path
    asks = {"": [], "label": ["--label", "3"], "embedding": ["--text", "a thick seven", "--text", "a thin one"]}
    kind = next((spec.kind for spec in export.open_exported(path).inputs if spec.kind != "noise"), "")
    grid = lambda source, *raw: cli_main(["sample", str(source), "--seed", "5", "--n", "20", *asks[kind], *raw,  # noqa: E731
                                          "--out", str(tmp_path / f"{source.name}{''.join(raw)}.png")])
    assert grid(run) == grid(path) == grid(run, "--raw") == grid(fixed) == 0
    assert max_difference(tmp_path / f"{run.name}.png", tmp_path / f"{path.name}.png") <= 1
    assert max_difference(tmp_path / f"{run.name}--raw.png", tmp_path / "fixed.pt2.png") <= 1
    assert export.open_exported(fixed).meta["weights"] == "G"
    if kind == "label":  # the default grid too: classes in turn, as the run draws them
        for source in (run, path):
            cli_main(["sample", str(source), "--seed", "5", "--out", str(tmp_path / f"{source.name}.default.png")])
        assert max_difference(tmp_path / f"{run.name}.default.png", tmp_path / f"{path.name}.default.png") <= 1


def max_difference(a: Path, b: Path) -> int:
    """Largest per-pixel difference of two PNGs, or of two folders of PNGs with the same names."""
    pairs = [(a, b)] if a.is_file() else [(p, b / p.name) for p in sorted(a.iterdir())]
    assert pairs and all(q.is_file() for _, q in pairs)
    arrays = [(np.asarray(Image.open(p), dtype=int), np.asarray(Image.open(q), dtype=int)) for p, q in pairs]
    assert all(x.shape == y.shape and x.std() > 0 for x, y in arrays)  # drawn, not blank
    return max(int(np.abs(x - y).max()) for x, y in arrays)


def test_export_options_that_cannot_work_are_one_line_errors(run, tmp_path, capsys):
    kept = sorted(open_run(run)[2])
    for args, message in ((["--step", "7"], f"keeps checkpoints at steps {kept[0]}"),
                          (["--direction", "sideways"], "hands out"),
                          (["--batch", "0"], "give dynamic or a batch size >= 1"),
                          (["--format", "pt2"], "does not end in .pt2")):
        assert cli_main(["export", str(run), "--out", str(tmp_path / "g.onnx"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gannet: error: ") and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.iterdir())  # nothing half-written


def foreign_and_damaged_files(folder: Path) -> dict[str, Path]:
    """Files `gannet sample` must refuse: ONNX and .pt2 models that gannet did not write, the same
    truncated, junk under both names, and a file that is not there."""
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign",
                              [value("x", TensorProto.FLOAT, [1])], [value("y", TensorProto.FLOAT, [1])])
    files = {name: folder / name for name in ("foreign.onnx", "foreign.pt2", "cut.onnx", "cut.pt2", "junk.onnx", "junk.pt2")}
    onnx.save(helper.make_model(graph), files["foreign.onnx"])
    torch.export.save(torch.export.export(torch.nn.Tanh(), (torch.zeros(2),)), files["foreign.pt2"])
    for kind in ("onnx", "pt2"):
        whole = files[f"foreign.{kind}"].read_bytes()
        files[f"cut.{kind}"].write_bytes(whole[: len(whole) // 2])
        files[f"junk.{kind}"].write_bytes(b"\x00not a model\xff" * 50)
    return {**files, "missing.onnx": folder / "missing.onnx"}


def test_a_damaged_or_foreign_file_is_one_line_and_exit_2(tmp_path, capsys):
    for name, path in foreign_and_damaged_files(tmp_path).items():
        assert cli_main(["sample", str(path), "--out", str(tmp_path / "grid.png")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"gannet: error: {path}") and err.count("\n") == 1, err
        assert ("not written by gannet export" in err) == name.startswith("foreign"), err
    assert not (tmp_path / "grid.png").exists()
    # and in a real process: no traceback either
    result = gannet_process("sample", str(tmp_path / "cut.onnx"), "--out", str(tmp_path / "grid.png"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_missing_export_extra_is_one_line_naming_the_install_command(tmp_path, monkeypatch, capsys):
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "g.onnx")]) == 2
    assert capsys.readouterr().err == "gannet: error: writing ONNX needs onnxruntime: pip install 'gannet[export]'\n"
    with pytest.raises(ConfigError, match=r"reading ONNX needs onnxruntime: pip install 'gannet\[export\]'"):
        export.require("onnx", writing=False)
    export.require("pt2", writing=True)  # torch.export needs nothing more


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_with_encoder_the_sentence_encoder_and_its_tokenizer_leave_too(tiny_bert, tmp_path, fmt):
    check_encoder_export(str(tiny_bert), tmp_path, fmt)


@pytest.mark.slow
def test_with_encoder_the_bundled_minilm_leaves_as_onnx(tmp_path):
    """The real all-MiniLM-L6-v2 (87 MiB of fp32 weights; most of a minute to export on a 2-core CPU)."""
    check_encoder_export("minilm", tmp_path, "onnx")


def check_encoder_export(name: str, folder: Path, fmt: str) -> None:
    """The exported encoder, fed by the exported tokenizer alone, gives gannet's caption embeddings."""
    from tokenizers import Tokenizer

    result = export.export_encoder(name, folder / f"g.{fmt}", fmt)
    assert result.path == folder / f"g.encoder.{fmt}" and (folder / "g.tokenizer.json").is_file()
    assert result.meta["role"] == "encoder" and result.meta["text_encoder"] == name
    captions = ["a thick seven slanted to the right", "a thin one", "an eight"]
    tokenizer = Tokenizer.from_file(str(folder / result.meta["tokenizer"]))
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(captions)
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    vectors = export.open_exported(result.path).run((ids, mask))
    assert (vectors - SentenceEncoder(name)(captions)).abs().max().item() <= 1e-5


def test_class_names_come_from_classes_json_beside_the_shards_else_the_indices(tmp_path):
    shards = str(tmp_path / "train-{000000..000002}.tar")
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        (tmp_path / name).write_bytes(b"")
    assert export.class_names(shards, 3) == ["0", "1", "2"]
    for written, names in (({"classes": ["x", "y", "z"], "counts": [1, 2, 3]}, ["x", "y", "z"]),  # as gannet shards images writes it
                           ({"classes": ["only", "two"]}, ["0", "1", "2"]), (["not", "the", "format"], ["0", "1", "2"])):
        (tmp_path / "classes.json").write_text(json.dumps(written))
        assert export.class_names(shards, 3) == names