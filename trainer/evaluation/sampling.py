"""Opening a finished (or running) run directory on one process: `gannet sample`, `gannet eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from gannet.models.recipes import make_recipe
from gannet.models.recipes.base import Recipe
from gannet.trainer.checkpoint.store import list_checkpoints
from gannet.trainer.config.loader import config_from_dict
from gannet.trainer.config.schema import Config
from gannet.trainer.data import remote
from gannet.trainer.data.shards import image_fields, image_files
from gannet.trainer.data.stream import ShardExamples, decode_image_sample, expand_urls
from gannet.trainer.errors import ConfigError, GannetError
from gannet.trainer.evaluation.images import grid_array, save_grid

# What G draws from besides noise, by the recipe's declared `condition`, as generator inputs name it.
CONDITION_INPUT = {"": "noise", "label": "label", "text": "embedding"}


def open_run(run_dir: Path, eval_overrides: dict[str, Any] | None = None) -> tuple[Config, Recipe, dict[int, Path]]:
    """The run's saved config (eval settings optionally overridden), its recipe (reading the run's
    data where it needs examples or prompts), and its kept checkpoints by step."""
    config_file = run_dir / "config.yaml"
    kept = {int(p.name.split("-")[1]): p for p in list_checkpoints(run_dir)}
    if not config_file.is_file() or not kept:
        raise GannetError(f"{run_dir} is not a gannet run directory with a checkpoint")
    raw = yaml.safe_load(config_file.read_text())
    raw.setdefault("eval", {}).update(eval_overrides or {})
    cfg = config_from_dict(raw)
    return cfg, make_recipe(cfg, ShardExamples(cfg)), kept


def load_networks(recipe: Recipe, checkpoint: Path) -> dict[str, nn.Module]:
    """The recipe's networks with a checkpoint's weights, in eval mode."""
    nets = recipe.build()
    for name, net in nets.items():
        net.load_state_dict(load_file(str(checkpoint / f"{name}.safetensors")))
        net.eval()
    return nets


def class_index(cfg: Config, label: str | int) -> int:
    """`--label`: a class index, or a class name from the classes.json beside the run's shards."""
    if isinstance(label, int) or label.lstrip("-").isdigit():
        return int(label)
    names = class_names(cfg.data.shards)
    if names is None:
        raise ConfigError(f"--label {label!r}: there is no classes.json beside the run's shards ({cfg.data.shards}) to "
                          f"name classes by (gannet shards images writes one); give the class index")
    if label not in names:
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise ConfigError(f"--label {label!r} is not one of this run's {len(names)} classes ({shown})")
    return names.index(label)


def class_names(shards: str) -> list[str] | None:
    """Class names by index from classes.json in the folder (or under the prefix) of the first shard, or None."""
    first = expand_urls(shards)[0]
    try:
        if remote.is_remote(first):
            with remote.open_shard(f"{remote.parent(first)}/classes.json", remote.RetryPolicy(retries=1)) as f:
                return list(json.loads(f.read())["classes"])
        path = Path(first).parent / "classes.json"
        return list(json.loads(path.read_text())["classes"]) if path.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sample_grid(run_dir: Path, out: Path, *, n: int, seed: int, label: str | int | None = None,
                texts: list[str] | None = None, interpolate: int = 8, raw: bool = False) -> Path:
    """A PNG grid from the run's latest checkpoint: the run's own prompts/classes by default; one
    class (`label`) for a conditional GAN; one caption, or an interpolation between two captions
    (rows: noise vectors; columns: `interpolate` steps from the first caption to the second), for a
    text-to-image GAN. A run that keeps an EMA of G draws from it, unless `raw`."""
    cfg, recipe, kept = open_run(run_dir)
    recipe.sample_raw = raw
    kinds = {"image"} if recipe.translates else {"noise", CONDITION_INPUT[recipe.condition]}
    if label is not None and "label" in kinds:
        label = class_index(cfg, label)
    check_request(str(run_dir), cfg.recipe.name, kinds, label, texts, cfg.model.num_classes)
    nets = load_networks(recipe, kept[max(kept)])
    return draw_grid(out, n=n, seed=seed, label=label, texts=texts, interpolate=interpolate, z_dim=cfg.model.z_dim,
                     encode=recipe.encode, default=recipe.fixed_inputs, generate=lambda inputs: recipe.generate(nets, inputs))


def draw_grid(out: Path, *, n: int, seed: int, label: int | None, texts: list[str] | None, interpolate: int, z_dim: int,
              encode: Callable[[list[str]], torch.Tensor], default: Callable[[int, torch.Generator], dict[str, torch.Tensor]],
              generate: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> Path:
    """The grid's inputs from `seed`, drawn alike for a run and for an exported file (`gannet.trainer.export`),
    so both give the same picture: `default` draws the run's own grid inputs."""
    noise = torch.Generator().manual_seed(seed)
    nrow = None
    if label is not None:
        inputs = {"z": torch.randn(n, z_dim, generator=noise), "label": torch.full((n,), label)}
    elif texts:
        steps = interpolate if len(texts) == 2 else 1
        rows = max(n // steps, 1)
        z = torch.randn(rows, z_dim, generator=noise).repeat_interleave(steps, dim=0)
        first, second = encode(texts if len(texts) == 2 else texts * 2)
        beta = torch.linspace(0, 1, steps).repeat(rows)[:, None] if steps > 1 else torch.zeros(rows, 1)
        inputs, nrow = {"z": z, "text_emb": (1 - beta) * first + beta * second}, (steps if steps > 1 else None)
    else:
        inputs = default(n, noise)
    with torch.no_grad():
        images = generate(inputs)
    return save_grid(images, out, nrow=nrow)


def check_request(source: str, recipe: str, kinds: set[str], label: int | None, texts: list[str] | None, classes: int) -> None:
    """What a grid asks for must be what the generator (a run's, or an exported file's) draws from."""
    if "image" in kinds:
        raise GannetError(f"{source} trained {recipe}, which translates real images and does not sample noise: "
                          f"use `gannet sample RUN --direction AtoB --input DIR --out DIR`")
    if label is not None and "label" not in kinds:
        raise GannetError(f"--label needs a class-conditional run (recipe cgan); {source} is {recipe}")
    if texts and "embedding" not in kinds:
        raise GannetError(f"--text needs a text-to-image run (recipe t2i); {source} is {recipe}")
    if texts and len(texts) > 2:
        raise GannetError("--text: give one caption, or two to interpolate between")
    if label is not None and not 0 <= label < classes:
        raise GannetError(f"--label {label} is not a class of this run (0..{classes - 1})")


def decode_images(files: list[Path], image_size: int, channels: int) -> torch.Tensor:
    """Image files as a run's networks take them: resized to its image size and channels, as in training."""
    return torch.stack([decode_image_sample(image_fields(path), image_size, channels)["image"] for path in files])


def translate_folder(run_dir: Path, direction: str, input_dir: Path, out_dir: Path, *, batch_size: int = 16) -> list[Path]:
    """Translate every image in INPUT_DIR with RUN_DIR's latest generator for `direction` (AtoB or
    BtoA): each is resized to the run's image size, as in training, and written as OUT_DIR/NAME.png."""
    cfg, recipe, kept = open_run(run_dir)
    if not recipe.translates:
        raise GannetError(f"{run_dir} trained recipe {cfg.recipe.name!r}, which does not translate images (CycleGAN does)")
    files = image_files(input_dir)
    images = decode_images(files, cfg.data.image_size, cfg.data.channels)
    nets = load_networks(recipe, kept[max(kept)])
    return write_translations(files, images, lambda batch: recipe.translate(nets, batch, direction), out_dir, batch_size)


def write_translations(files: list[Path], images: torch.Tensor, translate: Callable[[torch.Tensor], torch.Tensor],
                       out_dir: Path, batch_size: int = 16) -> list[Path]:
    """OUT_DIR/NAME.png for each input file, translated in batches (by a run or an exported file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            fakes = translate(images[start : start + batch_size])
            for path, fake in zip(files[start : start + batch_size], fakes):
                written.append(out_dir / f"{path.stem}.png")
                Image.fromarray(grid_array(fake[None], nrow=1, pad=0)).save(written[-1])
    return written
