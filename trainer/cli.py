"""The `gannet` command line: train, resume, shards, sample, eval, bench (+ plugged-in commands: slurm).

User mistakes (bad keys, missing files, exhausted error budgets) end in one line on stderr and
exit code 2 (input) or 1 (run failed); tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from gannet.trainer.config.loader import config_names
from gannet.trainer.errors import ConfigError, GannetError

EPILOG = """examples:
  gannet shards mnist --out data/mnist            # 5,000 real MNIST digits, bundled offline
  gannet train lsgan_mnist                        # configs/lsgan_mnist.yaml
  gannet train gan_mnist recipe.loss=minimax train.steps=500 run_dir=runs/mm
  gannet train lsgan_mnist resume=auto            # continue runs/lsgan_mnist exactly
  gannet train lsgan_mnist data.shards=s3://bucket/mnist/    # shards in an object store (AWS_ENDPOINT_URL, AWS_PROFILE, ...)
  gannet sample runs/lsgan_mnist --out grid.png
  gannet sample runs/cgan_mnist --label 7 --out sevens.png
  gannet sample runs/t2i_mnist --text "a thick seven slanted to the right" --out grid.png
  gannet sample runs/t2i_mnist --text "a thin one" --text "a thick eight" --out interpolation.png
  accelerate launch -m gannet train lsgan_mnist  # same code, many processes
"""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    """The parser, and every command's handler by name (gannet's own and plugged-in ones)."""
    parser = argparse.ArgumentParser(
        prog="gannet", description="Train GANs from YAML configs on a CPU, one GPU or many (Accelerate DDP or DeepSpeed).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a config", description=(
        f"Train CONFIG: a YAML path or a name under configs/ ({', '.join(config_names())}). "
        "Overrides apply in order: key=value, or a YAML preset file such as launch/deepspeed/zero2.yaml."))
    p.add_argument("config", help="YAML file or config name, e.g. lsgan_mnist")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=100 resume=auto launch/deepspeed/zero2.yaml")

    p = sub.add_parser("resume", help="continue a run directory exactly", description="Continue RUN_DIR from its latest checkpoint, with its saved config.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=5000 to extend the run")

    p = sub.add_parser("shards", help="write WebDataset shards", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write WebDataset tar shards (image + cls + txt captions) for training.", epilog="""kinds:
  mnist                      the 5,000 bundled real digits (or IDX files: --images/--labels), with captions
                             measured from each digit (class, stroke thickness, slant, width)
  silhouettes                bundled horse (a-*.tar) and zebra (b-*.tar) silhouettes, + testA/ testB/ PNGs
  unpaired --a DIR --b DIR   two image folders of any size (e.g. trainA/ trainB/) -> a-*.tar, b-*.tar
  captions FOLDER            images with a caption file beside each (cat.jpg + cat.txt, one caption per line)
  cub ROOT                   CUB-200-2011 with Reed et al.'s captions: ROOT/images/CLASS/*.jpg + ROOT/text/CLASS/*.txt
  coco CAPTIONS.json --images DIR    COCO captions (captions_train2017.json) and its image folder""")
    p.add_argument("kind", choices=["mnist", "silhouettes", "unpaired", "captions", "cub", "coco"])
    p.add_argument("source", nargs="?", type=Path, help="the folder (captions, cub) or captions JSON (coco)")
    p.add_argument("--out", required=True, help=("output folder, or an object store prefix s3://BUCKET/PREFIX/ "
                                                 "(train-*.tar, val-*.tar; a-*.tar, b-*.tar for unpaired data)"))
    p.add_argument("--images", type=Path, help="mnist: IDX images file (e.g. train-images-idx3-ubyte.gz); coco: the image folder")
    p.add_argument("--labels", type=Path, help="MNIST IDX labels file")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--a", type=Path, help="unpaired: folder of domain A images, any size (e.g. trainA/)")
    p.add_argument("--b", type=Path, help="unpaired: folder of domain B images (e.g. trainB/)")
    p.add_argument("--holdout", type=int, help=("samples held out: val-*.tar for mnist (default 500), captions/cub/coco "
                                               "(default 0); testA/ testB/ for silhouettes (default 100)"))
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before splitting")

    p = sub.add_parser("sample", help="draw a sample grid from a run, or translate a folder", description=(
        "Draw samples from RUN_DIR's latest checkpoint into a PNG grid; for CycleGAN, translate the images "
        "in --input into the folder --out (--direction AtoB or BtoA)."))
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="PNG path (a folder with --direction)")
    p.add_argument("--direction", choices=["AtoB", "BtoA"], help="translate --input with this generator (CycleGAN)")
    p.add_argument("--input", type=Path, help="folder of images to translate (with --direction)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, help="class to draw (class-conditional runs, recipe cgan)")
    p.add_argument("--text", action="append", metavar="CAPTION",
                   help="caption to draw (text-to-image runs); give it twice for an interpolation grid between two captions")
    p.add_argument("--interpolate", type=int, default=8, metavar="STEPS",
                   help="columns of an interpolation grid from the first --text to the second (default 8)")
    p.add_argument("--raw", action="store_true", help="draw from the trained G, not its average (runs with recipe.ema_kimg > 0)")

    p = sub.add_parser("eval", help="FID/KID, precision/recall, memorization, equilibrium", description=(
        "Evaluate RUN_DIR's latest checkpoint offline: FID/KID and precision/recall in the features of a digit "
        "classifier trained on the run's shards (cached beside them), class coverage, a nearest-neighbour "
        "memorization check against held-out images, and the equilibrium report. Writes RUN_DIR/eval/."))
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, help="generated samples (default: the run's eval.samples, 1000)")
    p.add_argument("--heldout", help="held-out real shards (default: the run's eval.heldout, else val-*.tar beside the training shards)")
    p.add_argument("--steps", default="latest", help="checkpoints to score: latest (default), all, or e.g. 1000,2000")
    p.add_argument("--raw", action="store_true", help="score the trained G, not its average (runs with recipe.ema_kimg > 0)")

    add_bench_parser(sub)
    add_verify_parser(sub)
    return parser, {**COMMANDS, **add_plugin_commands(sub)}


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`gannet bench`: its tables, and the alternatives (--reference-step, --loader, --speed)."""
    p = sub.add_parser("bench", help="measure speed and per-rank memory", description=(
        "Measure images/s on 1 vs N processes (real `gannet train` runs) and per-rank bytes of parameters, "
        "gradients and optimizer state under DDP and ZeRO-1/2/3; prints a table and writes JSON."))
    p.add_argument("config", nargs="?", default="lsgan_mnist", help="config to measure (default lsgan_mnist)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to time (default 1 2)")
    p.add_argument("--world", type=int, default=2, help="processes for the memory table (default 2)")
    p.add_argument("--steps", type=int, help="training steps per timing run (default 60; with --speed, 5 timed steps each)")
    p.add_argument("--strategies", nargs="+", default=["ddp", "zero1", "zero2", "zero3"],
                   choices=["ddp", "zero1", "zero2", "zero3"], help="the first is the reference")
    p.add_argument("--out", type=Path, default=Path("runs/bench.json"), help="JSON report (default runs/bench.json)")
    p.add_argument("--reference-step", action="store_true", help=(
        "instead: time CONFIG's CycleGAN training step on the engine against a plain eager re-implementation "
        "of the reference step, in this process (e.g. gannet bench cyclegan_256 --reference-step --steps 5)"))
    p.add_argument("--loader", nargs="*", metavar="SHARDS", help=(
        "instead: time the data loader alone on data.shards and on each SHARDS given (e.g. an s3://BUCKET/PREFIX/), "
        "--steps batches each, in turns"))
    p.add_argument("--speed", action="store_true", help=(
        "instead: gannet's default step against a plain eager fp32 reference step (CycleGAN 256 px batch 1; "
        "the DCGAN/LSGAN default against the PyTorch DCGAN example's step), and the loader alone against what "
        "the step consumes; overrides apply to both models; --out gets speedup and loader_ratio per model"))
    p.add_argument("--loader-seconds", type=float, default=10.0, help="with --speed: seconds the loader is timed (default 10)")


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after options: gannet slurm CONFIG --nodes 2 --gpus-per-node 8 train.steps=100
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
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
    from gannet.trainer.loop import train

    train(load_config(args.config, args.overrides))
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

    target = args.out
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
    if args.kind == "unpaired":
        if args.a is None or args.b is None:
            raise ConfigError("gannet shards unpaired needs both --a DIR and --b DIR (the two domains' image folders)")
        counts = shards.write_unpaired_shards(args.out, args.a, args.b, shard_size=args.shard_size)
    elif args.kind == "silhouettes":
        counts = shards.write_silhouette_shards(args.out, shard_size=args.shard_size, seed=args.seed, **holdout)
    elif args.kind == "mnist":
        counts = shards.write_mnist_shards(args.out, images=args.images, labels=args.labels, shard_size=args.shard_size,
                                           seed=args.seed, **holdout)
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


def cmd_sample(args: argparse.Namespace) -> int:
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
        print(f"{args.run_dir} ({r['checkpoint']}, held-out {r['heldout']}, features: {r['extractor']})\n"
              f"  translation accuracy A->B {r['translation_accuracy_ab']:.1%}  B->A {r['translation_accuracy_ba']:.1%}\n"
              f"  FID A->B {r['fid_ab']:.2f} (real floor {r['fid_ab_floor']:.2f}: {r['fid_ab_ratio']:.2f}x)  "
              f"B->A {r['fid_ba']:.2f} (real floor {r['fid_ba_floor']:.2f}: {r['fid_ba_ratio']:.2f}x)\n"
              f"  KID A->B {r['kid_ab']:.4f} (real floor {r['kid_ab_floor']:.4f})  B->A {r['kid_ba']:.4f} "
              f"(real floor {r['kid_ba_floor']:.4f})\n"
              f"  held-out cycle L1 A {r['cycle_l1_a']:.4f}  B {r['cycle_l1_b']:.4f}\n"
              f"  wrote {args.run_dir / 'eval' / 'eval.json'} and translations.png")
        return 0
    mem = r["memorization"]
    coverage = f"  classes covered {r['classes_covered']}/10 {r['class_counts']}" if "class_counts" in r else ""
    if "condition_accuracy" in r:
        coverage += f"\n  follows its condition: the classifier sees the asked-for class in {r['condition_accuracy']:.1%} of samples"
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
    from gannet.trainer.bench.scaling import run_bench
    from gannet.trainer.config.loader import load_config

    if args.loader:  # `--loader s3://b/p/ data.batch_size=32`: key=value words after --loader are overrides
        import re

        overrides = [item for item in args.loader if re.match(r"^[A-Za-z_][\w.]*=", item)]
        args.loader = [item for item in args.loader if item not in overrides]
        args.overrides = [*args.overrides, *overrides]
    if args.speed:
        from gannet.trainer.bench.speed import MODELS, speed_bench

        for config in MODELS.values():  # a bad key fails here, not inside a launched process
            load_config(config, args.overrides)
        speed_bench(args.overrides, steps=args.steps or 5, seconds=args.loader_seconds, out=args.out)
        return 0
    cfg = load_config(args.config, args.overrides)  # a bad key fails here, not inside a launched process
    args.steps = args.steps or 60
    if args.loader is not None:
        from gannet.trainer.bench.loader import loader_bench

        loader_bench(cfg.data, args.loader, batches=args.steps, out=args.out)
        return 0
    if args.reference_step:
        from gannet.trainer.bench.step import cyclegan_step_bench

        if cfg.recipe.name != "cyclegan":
            raise ConfigError(f"--reference-step times the CycleGAN step against its reference; {args.config} is {cfg.recipe.name}")
        cyclegan_step_bench(args.config, args.overrides, steps=args.steps, out=args.out)
        return 0
    run_bench(args.config, args.overrides, processes=args.processes, world=args.world, steps=args.steps,
              strategies=args.strategies, out=args.out)
    return 0


def add_plugin_commands(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Subcommands other packages add through the `gannet.commands` entry-point group (e.g. `slurm`
    from gannet's own launch package): each entry point is a function that adds its subparser to
    `sub` and returns the handler. Training code thus never imports its launchers."""
    return {ep.name: ep.load()(sub) for ep in entry_points(group="gannet.commands")}


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a run's checkpoints against their manifests", description=(
        "Check every checkpoint of RUN_DIR against its manifest (each file's size and sha256): one line per "
        "checkpoint, ok or what is damaged. Exit 0 if none is damaged, 1 if any is, 2 if RUN_DIR is not a run. "
        "Checkpoints from gannet versions without manifests are listed as unverified."))
    p.add_argument("run_dir", type=Path)


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
            "verify": cmd_verify}
