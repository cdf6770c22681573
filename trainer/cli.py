"""The `gannet` command line: train, resume, shards, sample, eval, bench (+ plugged-in commands: slurm).

User mistakes (bad keys, missing files, exhausted error budgets) end in one line on stderr and
exit code 2 (input) or 1 (run failed); tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from gannet import __version__
from gannet.trainer.config.loader import config_names
from gannet.trainer.config.schema import Config
from gannet.trainer.errors import ConfigError, GannetError

DEFAULT_CONFIG = "sngan_mnist"  # what `make train` trains; `gannet bench`'s default config too

EPILOG = f"""examples:
  gannet shards mnist --out data/mnist            # 5,000 real MNIST digits, bundled offline
  gannet train {DEFAULT_CONFIG}                        # configs/{DEFAULT_CONFIG}.yaml, the default
  gannet train {DEFAULT_CONFIG} --dry-run              # the resolved config and what each `auto` picks here
  gannet shards mnist --size 32 --out data/mnist32   # the same, padded to 32 px (r3gan_mnist)
  gannet train gan_mnist recipe.loss=minimax train.steps=500 run_dir=runs/mm
  gannet train {DEFAULT_CONFIG} resume=auto            # continue runs/{DEFAULT_CONFIG} exactly
  gannet train {DEFAULT_CONFIG} data.shards=s3://bucket/mnist/    # shards in an object store (AWS_ENDPOINT_URL, AWS_PROFILE, ...)
  gannet sample runs/{DEFAULT_CONFIG} --out grid.png
  gannet eval runs/{DEFAULT_CONFIG}                    # FID/KID, precision/recall, memorization -> runs/{DEFAULT_CONFIG}/eval/
  gannet sample runs/cgan_mnist --label 7 --out sevens.png
  gannet shards images photos/ --out data/photos --size 64   # your own folder: one subfolder per class
  gannet sample runs/my_photos --label tulip --out tulips.png  # a class by its folder's name
  gannet sample runs/t2i_mnist --text "a thick seven slanted to the right" --out grid.png
  gannet sample runs/t2i_mnist --text "a thin one" --text "a thick eight" --out interpolation.png
  gannet export runs/{DEFAULT_CONFIG} --out sngan.onnx  # G_ema as ONNX; --out sngan.pt2 for torch.export
  gannet sample sngan.onnx --seed 0 --out grid.png  # the run's grid, drawn by the file
  gannet bench scaling --processes 1 2            # images/s on 1 vs 2 processes
  accelerate launch -m gannet train {DEFAULT_CONFIG}   # same code, many processes
"""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    """The parser, and every command's handler by name (gannet's own and plugged-in ones)."""
    parser = argparse.ArgumentParser(
        prog="gannet", description="Train GANs from YAML configs on a CPU, one GPU or many (Accelerate DDP or DeepSpeed).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gannet {__version__}", help="print gannet's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (gannet COMMAND --help)")
    for add in (add_train_parser, add_resume_parser, add_shards_parser, add_sample_parser, add_eval_parser, add_bench_parser,
                add_verify_parser, add_export_parser):
        add(sub)
    return parser, {**COMMANDS, **add_plugin_commands(sub)}


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; key=value words after options (`gannet slurm CONFIG --nodes 2 train.steps=100`)
    join the command's overrides. The docs' command lines go through here too (tests/test_docs_commands.py)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        words = next((name for name in ("overrides", "words") if hasattr(args, name)), None)  # `words`: bench loader's
        if words is None or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, words, getattr(args, words) + extra)
    return args


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a config", description=(
        f"Train CONFIG: a YAML path or a name under configs/ ({', '.join(config_names())}). "
        "Overrides apply in order: key=value, or a YAML preset file such as launch/deepspeed/zero2.yaml."))
    p.add_argument("config", nargs="?", metavar="CONFIG", help=f"YAML file or config name, e.g. {DEFAULT_CONFIG}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=100 resume=auto launch/deepspeed/zero2.yaml")
    p.add_argument("--dry-run", action="store_true", help=(
        "print the resolved config (YAML) and what each `auto` setting chooses on this machine, then exit "
        "without creating anything"))


def add_resume_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="continue a run directory exactly", description=(
        "Continue RUN_DIR from its latest checkpoint, with its saved config. Overrides may change what is safe to "
        "change mid-run (train.steps, logging, sampling and checkpoint cadence, eval.*, log.*); a change to the "
        "networks, recipe, data or optimizers is refused, naming the keys."))
    p.add_argument("run_dir", type=Path, help="the run directory (holds config.yaml and checkpoints/)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="e.g. train.steps=5000 to extend the run")


def add_shards_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write WebDataset shards", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write WebDataset tar shards (image + cls + txt captions) for training.", epilog="""kinds:
  mnist                      the 5,000 bundled real digits (or IDX files: --images/--labels), with captions
                             measured from each digit (class, stroke thickness, slant, width)
  silhouettes                bundled horse (a-*.tar) and zebra (b-*.tar) silhouettes, + testA/ testB/ PNGs
  unpaired --a DIR --b DIR   two image folders of any size (e.g. trainA/ trainB/) -> a-*.tar, b-*.tar
  captions FOLDER            images with a caption file beside each (cat.jpg + cat.txt, one caption per line)
  cub ROOT                   CUB-200-2011 with Reed et al.'s captions: ROOT/images/CLASS/*.jpg + ROOT/text/CLASS/*.txt
  coco CAPTIONS.json --images DIR    COCO captions (captions_train2017.json) and its image folder
  images DIR --size N        your own photos, any format and size -> N x N: one subfolder per class
                             (classes.json beside the shards), StyleGAN's dataset.json, or no labels""")
    p.add_argument("kind", choices=["mnist", "silhouettes", "unpaired", "captions", "cub", "coco", "images"],
                   help="what to convert (the kinds below)")
    p.add_argument("source", nargs="?", type=Path, help="the folder (captions, cub, images) or captions JSON (coco)")
    p.add_argument("--out", required=True, help=("output folder, or an object store prefix s3://BUCKET/PREFIX/ "
                                                 "(train-*.tar, val-*.tar; a-*.tar, b-*.tar for unpaired data)"))
    p.add_argument("--images", type=Path, help="mnist: IDX images file (e.g. train-images-idx3-ubyte.gz); coco: the image folder")
    p.add_argument("--labels", type=Path, help=("mnist: the IDX labels file; images: where classes come from: auto "
                                               "(default: dataset.json, else class subfolders, else none) | folders | dataset.json | none"))
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--a", type=Path, help="unpaired: folder of domain A images, any size (e.g. trainA/)")
    p.add_argument("--b", type=Path, help="unpaired: folder of domain B images (e.g. trainB/)")
    p.add_argument("--holdout", type=int, help=("samples held out: val-*.tar for mnist (default 500), captions/cub/coco "
                                               "(default 0), images (default 0); testA/ testB/ for silhouettes (default 100)"))
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before splitting (default 0)")
    g = p.add_argument_group("images")
    g.add_argument("--size", type=int, help=("images: side of the square images written, in pixels (e.g. 256); mnist: pad "
                   "the 28-px digits with background to SIZE px (32 for R3GAN's networks, which double a 4x4 map)"))
    g.add_argument("--transform", default="center-crop", help=("center-crop (default) | center-crop-wide (a 2:1 band "
                   "in the square) | pad (whole image, bars of --background) | stretch"))
    g.add_argument("--format", default="jpg", help=("jpg (default) | png | keep (JPEG/PNG/WebP files stored as they are, "
                   "cropped by the loader at training time; the rest as PNG)"))
    g.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    g.add_argument("--channels", type=int, default=3, help="3 (RGB, default) or 1 (grey)")
    g.add_argument("--background", default="black", help="fills transparent pixels and pad bars (a colour name or #rrggbb)")
    g.add_argument("--workers", type=int, default=1, help="processes that decode and encode (default 1; the bytes are the same for any)")


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw a sample grid from a run, or translate a folder", description=(
        "Draw samples from RUN_DIR's latest checkpoint into a PNG grid; for CycleGAN, translate the images "
        "in --input into the folder --out (--direction AtoB or BtoA). RUN_DIR may be a file `gannet export` "
        "wrote (FILE.onnx, FILE.pt2): the same seed draws the same grid."))
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR|FILE", help="a run directory, or a file gannet export wrote (.onnx, .pt2)")
    p.add_argument("--out", type=Path, required=True, help="PNG path (a folder with --direction)")
    p.add_argument("--direction", choices=["AtoB", "BtoA"], help="translate --input with this generator (CycleGAN)")
    p.add_argument("--input", type=Path, help="folder of images to translate (with --direction)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--label", help=("class to draw (class-conditional runs, recipe cgan): its index, or its name in the "
                                     "classes.json beside the run's shards (gannet shards images writes it)"))
    p.add_argument("--text", action="append", metavar="CAPTION",
                   help="caption to draw (text-to-image runs); give it twice for an interpolation grid between two captions")
    p.add_argument("--interpolate", type=int, default=8, metavar="STEPS",
                   help="columns of an interpolation grid from the first --text to the second (default 8)")
    p.add_argument("--raw", action="store_true", help="draw from the trained G, not its average (runs with recipe.ema_kimg > 0)")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID/KID, precision/recall, memorization, equilibrium", description=(
        "Evaluate RUN_DIR's latest checkpoint offline: FID/KID and precision/recall in the features of a digit "
        "classifier trained on the run's shards (cached beside them), class coverage, a nearest-neighbour "
        "memorization check against held-out images, and the equilibrium report. Writes RUN_DIR/eval/."))
    p.add_argument("run_dir", type=Path, help="the run directory to score")
    p.add_argument("--n", type=int, help="generated samples (default: the run's eval.samples, 1000)")
    p.add_argument("--heldout", help="held-out real shards (default: the run's eval.heldout, else val-*.tar beside the training shards)")
    p.add_argument("--steps", default="latest", help="checkpoints to score: latest (default), all, or e.g. 1000,2000")
    p.add_argument("--raw", action="store_true", help="score the trained G, not its average (runs with recipe.ema_kimg > 0)")


# `gannet bench MODE`: each mode's one-line summary (its help, and the list `gannet bench` prints)
BENCH_MODES = {
    "scaling": "images/s of real `gannet train` runs on 1 vs N processes (cores shared out equally)",
    "memory": "per-rank bytes of parameters, gradients, Adam state and ZeRO masters under DDP and ZeRO-1/2/3",
    "speed": "gannet's default step vs a plain eager fp32 reference step (CycleGAN 256 px, DCGAN 28 px), and the "
             "loader vs what the step consumes",
    "step": "CONFIG's CycleGAN training step on the engine vs a plain eager re-implementation of the reference step",
    "loader": "the data loader alone on data.shards and on each SHARDS given (e.g. s3://BUCKET/PREFIX/), in turns",
    "guard": "CONFIG's training step with the divergence guard's per-step checks against without them, in turns",
}


def bench_modes_text() -> str:
    return "modes (gannet bench MODE --help):\n" + "".join(f"  {mode:8} {text}\n" for mode, text in BENCH_MODES.items())


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`gannet bench MODE`: one subcommand per measurement, each against a reference from the same run."""
    p = sub.add_parser("bench", help="measure speed, scaling and per-rank memory", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Measure gannet against references taken in the same run; prints a table and writes JSON.",
                       epilog=bench_modes_text())
    modes = p.add_subparsers(dest="mode", metavar="MODE", help="what to measure (the modes below)")
    for add in (add_bench_scaling_parser, add_bench_memory_parser, add_bench_speed_parser, add_bench_step_parser,
                add_bench_loader_parser, add_bench_guard_parser):
        add(modes)


def _bench_mode(modes: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """A bench mode's parser, with the option every mode takes (--out)."""
    p = modes.add_parser(name, help=BENCH_MODES[name], description=BENCH_MODES[name][0].upper() + BENCH_MODES[name][1:] + ".")
    p.add_argument("--out", type=Path, default=Path(f"runs/bench-{name}.json"), help=f"JSON report (default runs/bench-{name}.json)")
    return p


def _config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("config", nargs=None if required else "?", default=None if required else DEFAULT_CONFIG, metavar="CONFIG",
                   help="config to measure" + ("" if required else f" (default {DEFAULT_CONFIG})"))
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides, as for gannet train")


def add_bench_scaling_parser(modes: argparse._SubParsersAction) -> None:
    p = _bench_mode(modes, "scaling")
    _config_args(p)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to time; the first is the reference (default 1 2)")
    p.add_argument("--steps", type=int, default=60, help="training steps per timed run; images/s over the second half (default 60)")


def add_bench_memory_parser(modes: argparse._SubParsersAction) -> None:
    p = _bench_mode(modes, "memory")
    _config_args(p)
    p.add_argument("--world", type=int, default=2, help="processes the networks are partitioned over (default 2)")
    p.add_argument("--strategies", nargs="+", default=["ddp", "zero1", "zero2", "zero3"], choices=["ddp", "zero1", "zero2", "zero3"],
                   help="strategies to measure; the first is the reference (default ddp zero1 zero2 zero3)")


def add_bench_speed_parser(modes: argparse._SubParsersAction) -> None:
    p = _bench_mode(modes, "speed")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to both models")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each side, in turns; the median is reported (default 5)")
    p.add_argument("--loader-s", type=float, default=10.0, help="seconds the loader alone is timed, per model (default 10)")


def add_bench_step_parser(modes: argparse._SubParsersAction) -> None:
    p = _bench_mode(modes, "step")
    _config_args(p, required=True)
    p.add_argument("--steps", type=int, default=5, help="timed steps of each side, in turns; the median is reported (default 5)")


def add_bench_loader_parser(modes: argparse._SubParsersAction) -> None:
    p = _bench_mode(modes, "loader")
    p.add_argument("words", nargs="*", metavar="CONFIG|SHARDS|key=value", help=(
        f"the config (default {DEFAULT_CONFIG}; its data.shards is timed first), other shard sources to time beside "
        "it (a folder pattern, s3://BUCKET/PREFIX/, an http(s):// brace pattern), and config overrides"))
    p.add_argument("--steps", type=int, default=60, help="batches timed per source (default 60)")
    p.add_argument("--sizes", type=int, nargs="+", metavar="PX", help=(
        "instead: the loader at these sizes (e.g. 64 128 256) on JPEG shards it writes itself, against plain "
        "Pillow decoding of the same bytes, with 1 and 2 workers; draft mode 512 -> 256; conversion with 1 and 2 workers"))


def add_bench_guard_parser(modes: argparse._SubParsersAction) -> None:
    p = _bench_mode(modes, "guard")
    _config_args(p)
    p.add_argument("--steps", type=int, default=20, help="training steps per timed block (default 20)")
    p.add_argument("--rounds", type=int, default=10, help="alternating blocks per side (default 10)")


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a run's checkpoints against their manifests", description=(
        "Check every checkpoint of RUN_DIR against its manifest (each file's size and sha256): one line per "
        "checkpoint, ok or what is damaged. Exit 0 if none is damaged, 1 if any is, 2 if RUN_DIR is not a run. "
        "Checkpoints from gannet versions without manifests are listed as unverified."))
    p.add_argument("run_dir", type=Path, help="the run directory to check")


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parse(parser, argv)
    prepare_process()
    try:
        return commands[args.command](args)
    except GannetError as exc:
        print(f"gannet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gannet: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not lost_contact(exc):
            raise
        print(f"gannet: error: rank {os.environ.get('RANK', '0')} lost contact with the other processes (one died, or did "
              f"not answer within train.dist_timeout_s): {str(exc).splitlines()[0][:200]}; resume=auto continues from the "
              f"last checkpoint", file=sys.stderr)
        return 1


def lost_contact(exc: BaseException) -> bool:
    """A collective failed because a peer died or timed out: torch's DistError (NCCL), or gloo's
    RuntimeError (gloo reports a reset connection or a timeout that way)."""
    import torch.distributed as dist

    return isinstance(exc, getattr(dist, "DistError", ())) or "/gloo/" in str(exc)


def prepare_process() -> None:
    """What every gannet process needs first (the CLI, and each task of a Slurm job)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # DeepSpeed (imported by accelerate) must be told it is on a CPU (DS_ACCELERATOR=cpu); setting it
    # here, at the process entry point, also spares every CPU run a misleading detection warning.
    if not _cuda_present():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_train(args: argparse.Namespace) -> int:
    from gannet.trainer.config.loader import load_config

    if args.config is None:
        raise ConfigError(f"gannet train needs a CONFIG: one of {', '.join(config_names())} (configs/), or a YAML file; "
                          f"key=value overrides are optional. E.g. gannet train {DEFAULT_CONFIG}, or gannet train "
                          f"{DEFAULT_CONFIG} train.steps=500 --dry-run to see what it would do")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from gannet.trainer.dry_run import dry_run

        print(dry_run(cfg))
        return 0
    from gannet.trainer.loop import train

    train(cfg)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from gannet.trainer.config.loader import load_config
    from gannet.trainer.loop import train

    saved = args.run_dir / "config.yaml"
    if not saved.is_file():
        raise GannetError(f"{args.run_dir} is not a gannet run directory (no config.yaml)")
    train(load_config(str(saved), [*args.overrides, "resume=auto", f"run_dir={args.run_dir}"]))
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from gannet.trainer.data import remote, shards

    target = args.destination = args.out
    if not remote.is_remote(target):
        args.out = Path(target)
        return _write_shards(args, shards)
    if not target.startswith("s3://"):
        raise ConfigError(f"--out {target}: shards can be written to a folder or to s3://BUCKET/PREFIX/, not over HTTP")
    remote.check_writable(target)  # credentials and bucket, before minutes of conversion
    import tempfile

    prefix = target if target.endswith("/") else target + "/"
    uploaded: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gannet-shards-") as staging:  # each shard passes through here
        args.out = Path(staging) / "out"
        with shards.on_each_shard(lambda path: uploaded.append(remote.upload_file(Path(path), prefix + Path(path).name))):
            counts = _write_shards(args, shards, report=False)
        remote.upload_folder(args.out, prefix, replace=counts, uploaded=uploaded)  # the rest (e.g. testA/), stale shards
    print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} shard(s) to {target}")
    return 0


def _write_shards(args: argparse.Namespace, shards, report: bool = True):
    holdout = {"holdout": args.holdout} if args.holdout is not None else {}  # else each kind's default
    if args.kind == "images":
        counts = _write_image_shards(args, holdout)
    elif args.kind == "unpaired":
        if args.a is None or args.b is None:
            raise ConfigError("gannet shards unpaired needs both --a DIR and --b DIR (the two domains' image folders)")
        counts = shards.write_unpaired_shards(args.out, args.a, args.b, shard_size=args.shard_size)
    elif args.kind == "silhouettes":
        counts = shards.write_silhouette_shards(args.out, shard_size=args.shard_size, seed=args.seed, **holdout)
    elif args.kind == "mnist":
        counts = shards.write_mnist_shards(args.out, images=args.images, labels=args.labels, shard_size=args.shard_size,
                                           seed=args.seed, size=args.size, **holdout)
    else:
        if args.source is None:
            raise ConfigError(f"gannet shards {args.kind} needs its source: the folder, or the COCO captions JSON")
        if args.kind == "coco" and args.images is None:
            raise ConfigError("gannet shards coco needs --images DIR (the folder the JSON's file_name entries are in)")
        items = {"captions": lambda: shards.caption_pairs(args.source), "cub": lambda: shards.cub_captions(args.source),
                 "coco": lambda: shards.coco_captions(args.source, args.images)}[args.kind]()
        counts = shards.write_caption_shards(args.out, items, shard_size=args.shard_size, seed=args.seed, **holdout)
    if not report:
        return counts
    print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} shard(s) to {args.out}")
    return 0


def _write_image_shards(args: argparse.Namespace, holdout: dict[str, int]) -> dict[str, int]:
    """`gannet shards images DIR --size N`: the conversion, then its summary on stdout."""
    from gannet.trainer.data import folder

    if args.source is None or args.size is None:
        raise ConfigError("gannet shards images needs the folder and --size N: gannet shards images DIR --out OUT --size 256")
    opts = folder.ImageOptions(size=args.size, transform=args.transform, format=args.format, quality=args.quality,
                               channels=args.channels, background=folder.parse_background(args.background))
    counts, found, tally = folder.write_image_shards(
        args.source, args.out, opts, labels=str(args.labels or "auto"), shard_size=args.shard_size, seed=args.seed,
        workers=args.workers, progress=sys.stderr.isatty(), **holdout)
    print(folder.summary(found, tally, opts, args.destination))
    return counts


def cmd_sample(args: argparse.Namespace) -> int:
    from gannet.trainer.export import exported_file

    if exported_file(args.run_dir):  # a file `gannet export` wrote: the same options, drawn by the file
        from gannet.trainer.export import sample_file as sample_grid
        from gannet.trainer.export import translate_file as translate_folder
    else:
        from gannet.trainer.evaluation.sampling import sample_grid, translate_folder
    if (args.direction is None) != (args.input is None):
        raise ConfigError("--direction and --input go together: gannet sample RUN --direction AtoB --input DIR --out DIR")
    if args.direction:
        written = translate_folder(args.run_dir, args.direction, args.input, args.out)
        print(f"translated {len(written)} image(s) {args.direction} into {args.out}")
        return 0
    print(sample_grid(args.run_dir, args.out, n=args.n, seed=args.seed, label=args.label, texts=args.text,
                      interpolate=args.interpolate, raw=args.raw))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gannet.trainer.evaluation.evaluate import evaluate

    r = evaluate(args.run_dir, n=args.n, heldout_pattern=args.heldout, steps=args.steps, raw=args.raw)
    if "translation_accuracy_ab" in r:  # a translation run (CycleGAN)
        history = "".join(f"  step {row['step']}: FID ratio A->B {row['fid_ab_ratio']:.2f}x  B->A {row['fid_ba_ratio']:.2f}x  "
                          f"cycle L1 A {row['cycle_l1_a']:.4f}  B {row['cycle_l1_b']:.4f}\n" for row in r["over_steps"][:-1])
        print(f"{args.run_dir} ({r['checkpoint']}, held-out {r['heldout']}, features: {r['extractor']})\n{history}"
              f"  translation accuracy A->B {r['translation_accuracy_ab']:.1%}  B->A {r['translation_accuracy_ba']:.1%}\n"
              f"  FID A->B {r['fid_ab']:.2f} (real floor {r['fid_ab_floor']:.2f}: {r['fid_ab_ratio']:.2f}x)  "
              f"B->A {r['fid_ba']:.2f} (real floor {r['fid_ba_floor']:.2f}: {r['fid_ba_ratio']:.2f}x)\n"
              f"  KID A->B {r['kid_ab']:.4f} (real floor {r['kid_ab_floor']:.4f})  B->A {r['kid_ba']:.4f} "
              f"(real floor {r['kid_ba_floor']:.4f})\n"
              f"  held-out cycle L1 A {r['cycle_l1_a']:.4f}  B {r['cycle_l1_b']:.4f}\n"
              + "".join(f"  warning: {w}\n" for w in r["divergence"]["warnings"])
              + f"  wrote {args.run_dir / 'eval' / 'eval.json'} and translations.png")
        return 0
    mem = r["memorization"]
    coverage = f"  classes covered {r['classes_covered']}/10 {r['class_counts']}" if "class_counts" in r else ""
    if "condition_accuracy" in r:
        sets = {"train": "of the training set", "heldout": "held out"}
        real = ", ".join(f"{v:.1%} {sets[k]}" for k, v in r.get("condition_accuracy_real", {}).items())
        coverage += (f"\n  follows its condition: the classifier sees the asked-for class in {r['condition_accuracy']:.1%} of samples"
                     f" (+-{r['condition_accuracy_ci95']:.1%}, 95%)" + (f"; in real images: {real}" if real else ""))
    if "caption_agreement" in r:
        coverage += "\n  caption agreement (chance ~33%): " + ", ".join(f"{k} {v:.1%}" for k, v in r["caption_agreement"].items())
    history = "".join(f"\n  step {row['step']}: FID {row['eval/fid']:.2f}" for row in r["over_steps"][:-1])
    print(f"{args.run_dir} ({r['checkpoint']}, generator {r['generator']}, {r['samples']} samples, features: {r['extractor']}){history}\n"
          f"  FID {r['fid']:.2f} (real held-out vs train: {r['fid_heldout_reference']:.2f})  KID {r['kid']:.4f}\n"
          f"  precision {r['precision']:.3f}  recall {r['recall']:.3f}{coverage}\n"
          f"  memorization: {mem['verdict']} (nearest-train distance vs held-out: pixels {mem['pixel']['ratio']:.2f}x, "
          f"features {mem['feature']['ratio']:.2f}x)\n"
          f"  equilibrium: {r['equilibrium']['recent']} vs {r['equilibrium']['equilibrium']}"
          + "".join(f"\n  warning: {w}" for w in r["equilibrium"]["warnings"])
          + f"\n  wrote {args.run_dir / 'eval' / 'eval.json'} and report.png")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`gannet bench` alone lists the modes; each mode's handler checks the config before anything starts."""
    if args.mode is None:
        print(bench_modes_text(), end="")
        return 0
    return BENCH_COMMANDS[args.mode](args)


def _bench_config(args: argparse.Namespace) -> Config:
    """Load the config once here, so a bad key fails at once and not inside a launched process. A
    key=value given where CONFIG goes (`gannet bench scaling train.steps=5`) is an override."""
    from gannet.trainer.config.loader import load_config

    if "=" in args.config:
        args.config, args.overrides = DEFAULT_CONFIG, [args.config, *args.overrides]
    return load_config(args.config, args.overrides)


def cmd_bench_guard(args: argparse.Namespace) -> int:
    from gannet.trainer.bench.guard import guard_bench

    _bench_config(args)
    guard_bench(args.config, args.overrides, steps=args.steps, rounds=args.rounds, out=args.out)
    return 0


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    from gannet.trainer.bench.scaling import scaling_bench

    _bench_config(args)
    scaling_bench(args.config, args.overrides, processes=args.processes, steps=args.steps, out=args.out)
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from gannet.trainer.bench.scaling import memory_bench

    _bench_config(args)
    memory_bench(args.config, args.overrides, world=args.world, strategies=args.strategies, out=args.out)
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from gannet.trainer.bench.speed import MODELS, speed_bench
    from gannet.trainer.config.loader import load_config

    for config in MODELS.values():  # a bad key fails here, not inside a launched process
        load_config(config, args.overrides)
    speed_bench(args.overrides, steps=args.steps, seconds=args.loader_s, out=args.out)
    return 0


def cmd_bench_step(args: argparse.Namespace) -> int:
    from gannet.trainer.bench.step import cyclegan_step_bench

    cfg = _bench_config(args)
    if cfg.recipe.name != "cyclegan":
        raise ConfigError(f"gannet bench step times the CycleGAN step against its reference; {args.config} is {cfg.recipe.name}")
    cyclegan_step_bench(args.config, args.overrides, steps=args.steps, out=args.out)
    return 0


def cmd_bench_loader(args: argparse.Namespace) -> int:
    """`gannet bench loader [CONFIG] [SHARDS ...] [key=value ...]`: the first word is CONFIG when it
    names a config (bundled or a YAML file); key=value words are overrides, the rest shard sources."""
    from gannet.trainer.bench.loader import loader_bench
    from gannet.trainer.config.loader import load_config

    words, config = args.words, DEFAULT_CONFIG
    if words and "=" not in words[0] and (words[0] in config_names() or words[0].endswith((".yaml", ".yml"))):
        config, words = words[0], words[1:]
    overrides = [w for w in words if re.match(r"^[A-Za-z_][\w.]*=", w)]
    cfg = load_config(config, overrides)
    if args.sizes:
        from gannet.trainer.bench.loader import resolution_bench

        resolution_bench(cfg.data, args.sizes, out=args.out)
        return 0
    loader_bench(cfg.data, [w for w in words if w not in overrides], batches=args.steps, out=args.out)
    return 0


BENCH_COMMANDS = {"scaling": cmd_bench_scaling, "memory": cmd_bench_memory, "speed": cmd_bench_speed, "step": cmd_bench_step,
                  "loader": cmd_bench_loader, "guard": cmd_bench_guard}


def add_plugin_commands(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Subcommands other packages add through the `gannet.commands` entry-point group (e.g. `slurm`
    from gannet's own launch package): each entry point is a function that adds its subparser to
    `sub` and returns the handler. Training code thus never imports its launchers."""
    return {ep.name: ep.load()(sub) for ep in entry_points(group="gannet.commands")}


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trained generator to ONNX or torch.export (.pt2)", description=(
        "Write RUN_DIR's generator (G_ema where the run keeps one) as a file that runs without gannet: ONNX for "
        "onnxruntime and other runtimes (needs pip install 'gannet[export]'), .pt2 for torch.export.load. Images "
        "come out (and, for CycleGAN, go in) as N x C x H x W in [0, 1], or uint8 with --pixels uint8; the file "
        "holds the recipe, image size, channels, z size, class names, step, run and gannet version. Each file is "
        "read back and checked against PyTorch before it is kept. `gannet sample FILE` draws from it."))
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory (runs/NAME) to export from")
    p.add_argument("--out", type=Path, required=True, help=(
        "FILE.onnx or FILE.pt2 (a .pt2 gets FILE.json beside it); CycleGAN writes FILE.AtoB.onnx and FILE.BtoA.onnx"))
    p.add_argument("--format", choices=["onnx", "pt2"], help="default: from --out's suffix")
    p.add_argument("--step", type=int, help="the checkpoint to export (default: the latest)")
    p.add_argument("--raw", action="store_true", help="export the trained G, not its average (runs with recipe.ema_kimg > 0)")
    p.add_argument("--batch", default="dynamic", metavar="dynamic|N", help="dynamic batch size (default) or a fixed N")
    p.add_argument("--pixels", choices=["float", "uint8"], default="float",
                   help="images as float32 in [0, 1] (default) or uint8 0..255, rounded as gannet's PNGs are")
    p.add_argument("--direction", metavar="NAME", help="CycleGAN: export one direction only (AtoB or BtoA), to --out itself")
    p.add_argument("--with-encoder", action="store_true", help=(
        "text-to-image runs: also export the sentence encoder (FILE.encoder.onnx, token ids -> embedding) and its "
        "tokenizer (FILE.tokenizer.json)"))


def cmd_export(args: argparse.Namespace) -> int:
    from gannet.trainer.export import export_run

    if args.batch != "dynamic" and not (args.batch.isdigit() and int(args.batch) > 0):
        raise ConfigError(f"--batch {args.batch}: give dynamic or a batch size >= 1")
    written = export_run(args.run_dir, args.out, fmt=args.format, step=args.step, raw=args.raw,
                         batch=None if args.batch == "dynamic" else int(args.batch), pixels=args.pixels,
                         name=args.direction, with_encoder=args.with_encoder)
    for export in written:
        print(export.line())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from gannet.trainer.checkpoint.store import checkpoint_dir, verify_run

    if not (args.run_dir / "config.yaml").is_file() and not checkpoint_dir(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir} is not a gannet run directory (no config.yaml, no checkpoints/)")
    verdicts = verify_run(args.run_dir)
    for verdict in verdicts:
        print(verdict.line())
    if not verdicts:
        print(f"{args.run_dir}: no checkpoints")
    return 1 if any(v.status == "damaged" for v in verdicts) else 0


COMMANDS = {"train": cmd_train, "resume": cmd_resume, "shards": cmd_shards, "sample": cmd_sample, "eval": cmd_eval, "bench": cmd_bench,
            "verify": cmd_verify, "export": cmd_export}
