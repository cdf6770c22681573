"""`gannet export`: a trained generator leaves gannet as a file that runs without it; and the
reading side, so that `gannet sample FILE` draws from such a file what the run drew.

Two formats hold the same network:
- ONNX (`.onnx`): for serving and other runtimes and languages (onnxruntime, TensorRT, OpenVINO,
  onnxruntime-web); writing it needs the `export` extra (onnx, onnxscript; onnxruntime checks it).
- torch.export (`.pt2`): for PyTorch programs without gannet (`torch.export.load`, AOTInductor);
  nothing beyond torch. Its metadata is inside (extra file gannet.json) and in FILE.json beside it.

The generators come from the recipe contract (`Recipe.generators`: plain modules and their declared
inputs), so nothing here knows which GAN it exports. What leaves is the network in eval mode with
every parametrization folded into plain weights (spectral norm divides by a constant in eval mode),
wrapped so that images go in and come out in the file's pixel range ([0, 1] floats or uint8) rather
than gannet's [-1, 1]. Each file is read back and checked against PyTorch before it is kept.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils import parametrize

import gannet
from gannet.models.recipes.base import Generator, GeneratorInput
from gannet.trainer.errors import ConfigError, GannetError

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
INSTALL = "pip install 'gannet[export]'"
META_FILE = "gannet.json"  # the metadata inside a .pt2 (and FILE.json beside it)
TOLERANCE = {"float": 1e-4, "uint8": 1.0}  # file vs PyTorch, in the file's pixel units (uint8: a rounding tie)
CHECK_BATCHES = (1, 7)
# Metadata values that are not strings: ONNX metadata_props hold strings, so these travel as JSON.
TYPED_KEYS = ("format_version", "step", "image_size", "channels", "z_dim", "inputs", "class_names", "batch", "text_dim",
              "text_max_tokens")
EXAMPLE_CAPTIONS = ["a thick seven slanted to the right", "a thin one", "an upright eight of medium thickness"]
log = logging.getLogger("gannet.export")


def require(fmt: str, writing: bool) -> None:
    """One line naming the install command where the `export` extra is missing (ONNX only)."""
    needed = ("onnx", "onnxscript", "onnxruntime") if writing else ("onnxruntime",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None] if fmt == "onnx" else []
    if missing:
        raise ConfigError(f"{'writing' if writing else 'reading'} ONNX needs {', '.join(missing)}: {INSTALL}")


def to_pixels(images: torch.Tensor, pixels: str) -> torch.Tensor:
    """[-1, 1] -> the file's range: [0, 1] floats, or uint8 rounded as gannet's PNGs are."""
    images = images.clamp(-1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8) if pixels == "uint8" else (images + 1) / 2


def from_pixels(images: torch.Tensor, pixels: str) -> torch.Tensor:
    """The file's range -> [-1, 1]."""
    return images.float() / 127.5 - 1 if pixels == "uint8" else images * 2 - 1


class Deployed(nn.Module):
    """A generator as it leaves: image inputs and the output in the file's pixel range, and only the
    image out of a generator that returns more (a text G's KL term)."""

    def __init__(self, net: nn.Module, inputs: tuple[GeneratorInput, ...], pixels: str):
        super().__init__()
        self.net, self.images, self.pixels = net, [spec.kind == "image" for spec in inputs], pixels

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.net(*[from_pixels(a, self.pixels) if image else a for a, image in zip(args, self.images)])
        return to_pixels(out[0] if isinstance(out, (tuple, list)) else out, self.pixels)


def folded(net: nn.Module) -> nn.Module:
    """A copy in eval mode with parametrized weights (spectral norm) stored as the plain weights they
    compute: exporters then see ordinary convolutions, and the file holds no power-iteration buffers."""
    net = copy.deepcopy(net).eval().requires_grad_(False)
    for module in list(net.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return net


def example_inputs(inputs: tuple[GeneratorInput, ...], batch: int, pixels: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of each declared kind, for tracing and for checking a file against PyTorch."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for spec in inputs:
        shape = (batch, *spec.shape)
        if spec.kind == "label":
            out.append(torch.randint(spec.classes, shape, generator=rng))
        elif spec.kind == "image":
            out.append(torch.randint(0, 256, shape, generator=rng, dtype=torch.uint8) if pixels == "uint8"
                       else torch.rand(shape, generator=rng))
        elif spec.kind == "embedding":
            out.append(nn.functional.normalize(torch.randn(shape, generator=rng), dim=1))
        else:
            out.append(torch.randn(shape, generator=rng))
    return tuple(out)


def dynamic_shapes(inputs: tuple[GeneratorInput, ...], batch: int | None) -> dict[str, tuple[dict, ...]] | None:
    """A batch dimension shared by every input (unless fixed), and free height and width for images
    within whatever range the network accepts (the exporter works it out)."""
    dims = {} if batch else {0: Dim("batch", min=1)}
    shapes = tuple({**dims, **({2: Dim.AUTO, 3: Dim.AUTO} if spec.kind == "image" else {})} for spec in inputs)
    return {"args": shapes} if any(shapes) else None  # Deployed.forward takes *args


def class_names(shards: str, classes: int) -> list[str]:
    """The names of a run's classes: from the classes.json beside its shards (`gannet shards images`
    writes one; gannet.trainer.evaluation.sampling reads it for `gannet sample --label NAME`), else
    the indices themselves."""
    from gannet.trainer.evaluation.sampling import class_names as written

    try:
        names = written(shards)
    except GannetError:  # the shards are gone (moved, or the run came from elsewhere): the indices will do
        names = None
    return names if names is not None and len(names) == classes else [str(i) for i in range(classes)]


@dataclass
class Export:
    """What `gannet export` wrote: a file, and how far its outputs are from PyTorch's."""

    path: Path
    meta: dict[str, Any]
    difference: float  # largest |file - PyTorch| over the check batches, in the file's pixel units
    batches: tuple[int, ...]

    def line(self) -> str:
        size = self.path.stat().st_size / 2**20
        role = f"{self.meta['weights']} at step {self.meta['step']}" if self.meta["role"] == "generator" else "sentence encoder"
        runtime = "onnxruntime" if self.path.suffix == ".onnx" else "torch.export.load"
        return (f"wrote {self.path} ({size:.2f} MiB, {role}); {runtime} matches PyTorch within {self.difference:.1e} "
                f"at batch {' and '.join(map(str, self.batches))}")


def export_run(run_dir: Path, out: Path, *, fmt: str | None = None, step: int | None = None, raw: bool = False,
               batch: int | None = None, pixels: str = "float", name: str | None = None,
               with_encoder: bool = False) -> list[Export]:
    """Write RUN_DIR's generator(s) at `step` (default: the latest checkpoint) to `out`, G_ema unless
    `raw`; a recipe with several generators (CycleGAN: AtoB, BtoA) writes one file each, OUT.NAME.onnx,
    unless `name` picks one. `batch` fixes the batch size (None: dynamic). `with_encoder` writes the
    sentence encoder a text G's embeddings come from beside it (OUT.encoder.onnx + OUT.tokenizer.json)."""
    from gannet.trainer.evaluation.sampling import load_networks, open_run

    fmt = output_format(out, fmt)
    require(fmt, writing=True)
    cfg, recipe, kept = open_run(run_dir)
    if step is not None and step not in kept:
        raise ConfigError(f"--step {step}: {run_dir} keeps checkpoints at steps {', '.join(map(str, sorted(kept)))}")
    step = max(kept) if step is None else step
    recipe.sample_raw = raw
    generators = recipe.generators(load_networks(recipe, kept[step]))
    if name is not None and name not in generators:
        raise ConfigError(f"--direction {name}: {run_dir} ({cfg.recipe.name}) hands out {', '.join(generators)}")
    chosen = {name: generators[name]} if name else generators
    if with_encoder and not any(spec.kind == "embedding" for gen in chosen.values() for spec in gen.inputs):
        raise ConfigError(f"--with-encoder: {run_dir} ({cfg.recipe.name}) does not draw from sentence embeddings")
    about = {"recipe": cfg.recipe.name, "run": str(run_dir), "step": step, "image_size": cfg.data.image_size,
             "channels": cfg.data.channels, "z_dim": 0}
    written = []
    for key, generator in chosen.items():
        path = out if len(chosen) == 1 else out.with_name(f"{out.stem}.{key}{out.suffix}")
        meta = generator_meta(generator, key, about, cfg.data.shards, batch, pixels)
        written.append(write_checked(Deployed(folded(generator.module), generator.inputs, pixels).eval(), generator.inputs,
                                     meta, path, fmt, batch, pixels))
    if with_encoder:
        spec = next(spec for gen in chosen.values() for spec in gen.inputs if spec.kind == "embedding")
        written.append(export_encoder(spec.encoder, out, fmt))
    return written


def output_format(out: Path, fmt: str | None) -> str:
    """--format, else --out's suffix; the two must agree (a .pt2 file holding ONNX helps nobody)."""
    implied = FORMATS.get(out.suffix)
    if fmt is None and implied is None:
        raise ConfigError(f"--out {out}: name it FILE.onnx or FILE.pt2 (or give --format onnx|pt2 with that suffix)")
    if fmt is not None and implied != fmt:
        raise ConfigError(f"--out {out} does not end in .{fmt}, which --format {fmt} writes")
    return fmt or implied


def generator_meta(generator: Generator, key: str, about: dict[str, Any], shards: str, batch: int | None,
                   pixels: str) -> dict[str, Any]:
    """Everything a user of the file needs to know, and what `gannet sample FILE` reads back."""
    meta = {"producer": "gannet", "gannet_version": gannet.__version__, "format_version": 1, "role": "generator",
            "generator": key, "weights": generator.weights, **about, "pixels": pixels, "layout": "NCHW",
            "batch": batch or "dynamic", "inputs": [asdict(spec) for spec in generator.inputs]}
    for spec in generator.inputs:
        if spec.kind == "noise":
            meta["z_dim"] = int(np.prod(spec.shape))
        if spec.kind == "label":
            meta["class_names"] = class_names(shards, spec.classes)
        if spec.kind == "embedding":
            from gannet.models.text import SentenceEncoder

            meta.update(SentenceEncoder(spec.encoder).describe(), text_dim=spec.shape[0])
    return meta


def write_checked(module: nn.Module, inputs: tuple[GeneratorInput, ...] | tuple[str, ...], meta: dict[str, Any], path: Path,
                  fmt: str, batch: int | None, pixels: str, examples: Callable[[int], tuple[torch.Tensor, ...]] | None = None,
                  shapes: tuple[dict, ...] | None = None) -> Export:
    """Trace, write atomically (temp file + rename), read back and compare with PyTorch; a file that
    disagrees beyond the tolerance is removed and the export fails."""
    names = [spec.name if isinstance(spec, GeneratorInput) else spec for spec in inputs]
    if examples is None:
        examples, shapes = (lambda n: example_inputs(inputs, n, pixels)), dynamic_shapes(inputs, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad(), quiet_exporters():
            (write_onnx if fmt == "onnx" else write_pt2)(module, examples(batch or 2), names, shapes, meta, tmp)
        os.replace(tmp, path)
    except GannetError:
        raise
    except Exception as exc:  # an exporter's failure: one line, the network and the reason
        raise GannetError(f"could not export {meta.get('weights', 'the encoder')} to {fmt}: {first_line(exc)}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    if fmt == "pt2":
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    batches = (batch,) if batch else CHECK_BATCHES
    difference = max(compare(module, open_exported(path), examples(n)) for n in batches)
    if difference > TOLERANCE.get(meta.get("pixels", "float"), TOLERANCE["float"]):
        path.unlink()
        raise GannetError(f"the {fmt} export of {meta.get('weights', 'the encoder')} differs from PyTorch by {difference:.3g}: "
                          f"not written (please report it with the run's config)")
    return Export(path, meta, difference, batches)


def compare(module: nn.Module, exported: Exported, args: tuple[torch.Tensor, ...]) -> float:
    with torch.no_grad():
        expected = module(*args).double()
    return (exported.run(args).double() - expected).abs().max().item()


def write_onnx(module: nn.Module, args: tuple, names: list[str], shapes: Any, meta: dict[str, Any], path: Path) -> None:
    program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=["output"],
                                dynamic_shapes=shapes, verbose=False)
    program.model.metadata_props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    program.save(str(path), external_data=False)


def write_pt2(module: nn.Module, args: tuple, names: list[str], shapes: Any, meta: dict[str, Any], path: Path) -> None:
    del names  # a .pt2 takes its inputs by position; the metadata names them
    program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    torch.export.save(program, path, extra_files={META_FILE: json.dumps(meta)})


class quiet_exporters:
    """The exporters' progress lines and warnings about absent optional packages (torchvision's
    ops) are not the user's business; errors still surface as exceptions."""

    NAMES = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch.fx.experimental.symbolic_shapes")

    def __enter__(self):
        self.levels = {name: logging.getLogger(name).level for name in self.NAMES}
        for name in self.NAMES:
            logging.getLogger(name).setLevel(logging.ERROR)
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # shared batch Dims: intended

    def __exit__(self, *exc):
        self.warnings.__exit__(*exc)
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def export_encoder(encoder_name: str, out: Path, fmt: str) -> Export:
    """The sentence encoder a text G's embeddings come from, as a second file beside OUT
    (OUT.encoder.onnx: token ids and attention mask in, the embedding out) with its tokenizer
    (OUT.tokenizer.json, for the `tokenizers` package), so captions become images without gannet."""
    from gannet.models.text import SentenceEncoder

    encoder = SentenceEncoder(encoder_name)
    exportable = encoder.exportable()
    if exportable is None:
        raise ConfigError(f"--with-encoder: data.text_encoder={encoder_name} hashes words and has no network to export "
                          f"(gannet.models.text.hashed_bag_of_words computes its vectors in a few lines)")
    module, tokenizer = exportable
    path, tokenizer_file = out.with_name(f"{out.stem}.encoder{out.suffix}"), out.with_name(f"{out.stem}.tokenizer.json")
    meta = {"producer": "gannet", "gannet_version": gannet.__version__, "format_version": 1, "role": "encoder",
            **encoder.describe(), "tokenizer": tokenizer_file.name, "batch": "dynamic",
            "inputs": [{"name": "input_ids", "kind": "tokens"}, {"name": "attention_mask", "kind": "tokens"}]}
    # [CLS] and [SEP] at least; captions longer than the encoder reads are truncated, by the saved tokenizer too
    batch, tokens = Dim("batch", min=1), Dim("tokens", min=2, max=encoder.max_tokens)

    def examples(n: int) -> tuple[torch.Tensor, ...]:
        captions = [EXAMPLE_CAPTIONS[i % len(EXAMPLE_CAPTIONS)] + " and more" * (i % 3) for i in range(n)]
        ids = encoder.tokenize(captions)
        return ids["input_ids"], ids["attention_mask"]

    result = write_checked(module.eval(), ("input_ids", "attention_mask"), meta, path, fmt, None, "float", examples,
                           ({0: batch, 1: tokens}, {0: batch, 1: tokens}))
    from tokenizers import Tokenizer

    saved = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: the encoder's own stays as it is
    saved.enable_truncation(encoder.max_tokens)
    saved.save(str(tokenizer_file))
    return result


@dataclass
class Exported:
    """A file `gannet export` wrote, opened: its metadata and a way to run it."""

    path: Path
    meta: dict[str, Any]
    run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]  # inputs in order -> the output, as a tensor

    @property
    def inputs(self) -> tuple[GeneratorInput, ...]:
        return tuple(GeneratorInput(**{**spec, "shape": tuple(spec["shape"])}) for spec in self.meta["inputs"])

    def generate(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Images in [-1, 1] (gannet's range, so grids are drawn as from a run) from named inputs in
        gannet's ranges; a file of fixed batch N runs in batches of N, the last one padded."""
        pixels, fixed = self.meta["pixels"], self.meta["batch"]
        args = [to_pixels(inputs[spec.name], pixels) if spec.kind == "image" else inputs[spec.name] for spec in self.inputs]
        n = len(args[0])
        if fixed == "dynamic":
            return from_pixels(self.run(tuple(args)), pixels)
        chunks = []
        for start in range(0, n, fixed):
            part = [a[start : start + fixed] for a in args]
            pad = fixed - len(part[0])
            chunks.append(self.run(tuple(torch.cat([p, p[-1:].expand(pad, *p.shape[1:])]) for p in part))[: fixed - pad])
        return from_pixels(torch.cat(chunks), pixels)

    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A grid's inputs drawn as a run draws them (AdversarialRecipe and cgan's `fixed_inputs`): noise
        from `generator` in the order declared, classes in turn. Captions are the run's data, not the file's."""
        inputs = {}
        for spec in self.inputs:
            if spec.kind == "noise":
                inputs[spec.name] = torch.randn(n, *spec.shape, generator=generator)
            elif spec.kind == "label":
                inputs[spec.name] = torch.arange(n) % spec.classes
            else:
                raise ConfigError(f"{self.path} draws from captions: give --text CAPTION (a run's own prompts are in "
                                  f"its data, which the file does not hold)" if spec.kind == "embedding" else
                                  f"{self.path} translates images: gannet sample FILE --direction "
                                  f"{self.meta['generator']} --input DIR --out DIR")
        return inputs

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Caption embeddings from the encoder the file names (gannet's own, as the run made them)."""
        from gannet.models.text import SentenceEncoder

        return SentenceEncoder(self.meta["text_encoder"])(captions)


def exported_file(path: Path) -> bool:
    """Whether `gannet sample PATH` means an exported file rather than a run directory."""
    return Path(path).suffix in FORMATS


def open_exported(path: Path) -> Exported:
    """An exported file, ready to run; a missing, damaged or foreign file is one line (exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (or is not a file)")
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise ConfigError(f"{path} is not an exported generator: gannet export writes FILE.onnx or FILE.pt2")
    require(fmt, writing=False)
    try:
        with quiet_exporters():
            meta, run = (open_onnx if fmt == "onnx" else open_pt2)(path)
    except GannetError:
        raise
    except Exception as exc:  # whatever a parser raises on a truncated or foreign file
        raise ConfigError(f"{path} is not a readable {fmt} file ({first_line(exc)})") from None
    if meta.get("producer") != "gannet" or not isinstance(meta.get("inputs"), list):
        raise ConfigError(f"{path} was not written by gannet export (no gannet metadata in it): "
                          f"gannet sample reads the files `gannet export` writes")
    return Exported(path, meta, run)


def open_onnx(path: Path) -> tuple[dict[str, Any], Callable]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    for key in TYPED_KEYS:
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except ValueError:
                pass
    names = [node.name for node in session.get_inputs()]

    def run(args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        feed = {name: arg.detach().cpu().numpy() for name, arg in zip(names, args)}
        return torch.from_numpy(session.run(None, feed)[0])

    return meta, run


def open_pt2(path: Path) -> tuple[dict[str, Any], Callable]:
    extra = {META_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    meta = json.loads(extra[META_FILE]) if extra[META_FILE] else {}
    module = program.module()

    def run(args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            return module(*args)

    return meta, run


def sample_file(path: Path, out: Path, *, n: int, seed: int, label: int | str | None = None, texts: list[str] | None = None,
                interpolate: int = 8, raw: bool = False) -> Path:
    """`gannet sample FILE`: the grid `gannet sample RUN` draws with the same options and seed, drawn by the file."""
    from gannet.trainer.evaluation.sampling import check_request, draw_grid

    model = open_exported(path)
    names = list(model.meta.get("class_names", ()))
    if label is not None and not str(label).lstrip("-").isdigit():  # a class by the name the file carries
        if label not in names:
            raise ConfigError(f"--label {label!r} is not one of this file's classes ({', '.join(names[:20])})")
        label = names.index(label)
    label = None if label is None else int(label)
    check_request(str(path), model.meta["recipe"], {spec.kind for spec in model.inputs}, label, texts, len(names))
    if raw:
        raise ConfigError(f"--raw picks a run's network; {path} holds one ({model.meta['weights']}): export with --raw instead")
    return draw_grid(out, n=n, seed=seed, label=label, texts=texts, interpolate=interpolate, z_dim=model.meta["z_dim"],
                     encode=model.encode, default=model.fixed_inputs, generate=model.generate)


def translate_file(path: Path, direction: str, input_dir: Path, out_dir: Path) -> list[Path]:
    """`gannet sample FILE --direction D --input DIR --out DIR`, as from the run the file came from."""
    from gannet.trainer.data.shards import image_files
    from gannet.trainer.evaluation.sampling import decode_images, write_translations

    model = open_exported(path)
    if "image" not in {spec.kind for spec in model.inputs}:
        raise GannetError(f"{path} holds a {model.meta['recipe']} generator, which does not translate images (CycleGAN does)")
    if model.meta["generator"] != direction:
        raise ConfigError(f"{path} translates {model.meta['generator']}, not {direction}: export that direction "
                          f"(gannet export RUN --direction {direction} --out FILE)")
    files = image_files(input_dir)
    images = decode_images(files, model.meta["image_size"], model.meta["channels"])
    return write_translations(files, images, lambda batch: model.generate({"image": batch}), out_dir)
