"""Train every bundled model from its config and draw the README's sample grids into docs/img/.

    nice -n 10 .venv/bin/python docs/img/make_figures.py [CONFIG ...]   # about an hour on a 2-core CPU

Each model is trained with `make train CONFIG=...` (shards first, full step count, resume=auto: a
finished run is reused, a killed one continues), then drawn with `gannet sample` as a user would.
Only the small PNGs belong in git; the runs stay under runs/ (ignored). The grids are drawn from
fixed seeds, so a rerun of the same runs gives the same pictures.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "img"
GANNET = str(ROOT / ".venv" / "bin" / "gannet")
# Cheapest first, so the pictures of the short runs exist early.
CONFIGS = ["sngan_mnist", "gan_mnist", "lsgan_mnist", "cgan_mnist", "t2i_mnist", "cyclegan_silhouettes", "r3gan_mnist",
           "r3gan_cmnist"]
T2I_FROM, T2I_TO = "a thin upright one", "a thick eight slanted to the right"


def run(*argv: str) -> None:
    """One command in the repository root; a failure stops the script (a picture from a broken run is worse than none)."""
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, cwd=ROOT, check=True)


def train(config: str) -> Path:
    run("make", "train", f"CONFIG={config}")
    return ROOT / "runs" / config


def unconditional(config: str, run_dir: Path) -> None:
    """8 x 8 samples from fixed noise (the EMA of G where the run keeps one)."""
    run(GANNET, "sample", str(run_dir), "--n", "64", "--seed", "0", "--out", str(OUT / f"{config}.png"))


def conditional(config: str, run_dir: Path) -> None:
    """Classes 0-9 in turn: 100 samples make a 10 x 10 grid whose columns are the classes; the top 6 rows are kept."""
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.png"
        run(GANNET, "sample", str(run_dir), "--n", "100", "--seed", "0", "--out", str(full))
        image = Image.open(full)
        tile = (image.height - 2) // 10  # grids are 2 px apart with a 2 px border
        image.crop((0, 0, image.width, 2 + 6 * tile)).save(OUT / f"{config}.png", optimize=True)


def text_to_image(config: str, run_dir: Path) -> None:
    """8 noise vectors (rows), each drawn at 8 points between two captions (columns)."""
    run(GANNET, "sample", str(run_dir), "--text", T2I_FROM, "--text", T2I_TO, "--interpolate", "8", "--n", "64",
        "--seed", "0", "--out", str(OUT / f"{config}.png"))


def translation(config: str, run_dir: Path) -> None:
    """Held-out images of each domain (never trained on) above their translations: horses -> zebras, zebras -> horses."""
    data = ROOT / "data" / "silhouettes"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for direction, folder in (("AtoB", "testA"), ("BtoA", "testB")):
            inputs = Path(tmp) / folder
            inputs.mkdir()
            for path in sorted((data / folder).iterdir())[:8]:
                (inputs / path.name).symlink_to(path)
            translated = Path(tmp) / f"{folder}-{direction}"
            run(GANNET, "sample", str(run_dir), "--direction", direction, "--input", str(inputs), "--out", str(translated))
            rows.append([Image.open(p).convert("L") for p in sorted(inputs.iterdir())])
            rows.append([Image.open(translated / f"{p.stem}.png").convert("L") for p in sorted(inputs.iterdir())])
    tile, pad = rows[1][0].width, 2
    sheet = Image.new("L", (pad + 8 * (tile + pad), pad + len(rows) * (tile + pad)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.resize((tile, tile)), (pad + c * (tile + pad), pad + r * (tile + pad)))
    sheet.save(OUT / f"{config}.png", optimize=True)


DRAW = {"cgan_mnist": conditional, "r3gan_cmnist": conditional, "t2i_mnist": text_to_image, "cyclegan_silhouettes": translation}


def main(configs: list[str]) -> None:
    for config in configs or CONFIGS:
        run_dir = train(config)
        DRAW.get(config, unconditional)(config, run_dir)
        print(f"wrote {OUT / (config + '.png')} ({(OUT / (config + '.png')).stat().st_size} bytes)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
