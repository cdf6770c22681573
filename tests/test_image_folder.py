"""`gannet shards images`: a folder of the user's own photos -> shards, and the loader at real
resolution. Real files of every kind the converter takes (made here with Pillow), junk included;
the same bytes for any worker count and on a rerun; a conversion killed mid-way leaves nothing
half-written; output straight to the S3 server on loopback; a class-conditional run on the result
and `gannet sample --label NAME`; center-crop, draft mode and mirroring, exactly again on resume."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gannet.trainer.config.schema import DataConfig
from gannet.trainer.data.folder import SHARD_MTIME, ImageOptions, scan, transform, write_image_shards
from gannet.trainer.data.shards import write_split
from gannet.trainer.data.stream import DataStream, StreamPosition, center_square, expand_urls
from tests.conftest import REPO, gannet, kill_when, process_env
from tests.object_store import S3Store

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
JUNK = {"cat/empty.jpg": "empty file", "dog/truncated.jpg": "damaged or truncated", "dog/notes.txt": "not an image",
        "dog/fake.png": "not an image", "cat/.DS_Store": "hidden file", ".thumbnails/": "hidden folder",
        "loose.jpg": "not in a class folder"}


def jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def halves(size: tuple[int, int], first, second, vertical: bool = True, mode: str = "RGB") -> Image.Image:
    """An image whose top (or left) half is `first` and the other half `second`."""
    img = Image.new(mode, size, second)
    w, h = size
    img.paste(first, (0, 0, w, h // 2) if vertical else (0, 0, w // 2, h))
    return img


def special_images(root: Path) -> None:
    """One file of each kind and mode, with a known expected look after conversion."""
    cat, dog = root / "cat", root / "dog"
    (cat / "deep" / "er").mkdir(parents=True)
    dog.mkdir()
    upright = halves((40, 60), RED, BLUE)  # shown upright: red on top; stored turned, with EXIF orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    (cat / "exif.jpg").write_bytes(jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif))
    alpha = Image.new("RGBA", (20, 20), (*GREEN, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half fully transparent
    alpha.save(cat / "alpha.png")
    Image.new("LA", (20, 20), (200, 255)).save(cat / "la.png")
    frames = [Image.new("P", (20, 20), 0), Image.new("P", (20, 20), 1)]
    for frame in frames:
        frame.putpalette([*RED, *BLUE] + [0] * 762)
    frames[0].save(cat / "deep" / "er" / "anim.gif", save_all=True, append_images=frames[1:])
    (dog / "cmyk.jpg").write_bytes(jpeg(Image.new("CMYK", (20, 20), (255, 0, 0, 0))))
    Image.fromarray(np.full((20, 20), 128 * 257, dtype=np.uint16)).save(dog / "sixteen.png")
    Image.fromarray(np.full((20, 20), 128 * 257, dtype=np.uint16)).save(dog / "sixteen.tif")
    Image.new("RGB", (20, 20), BLUE).save(dog / "photo.webp", lossless=True)
    Image.new("RGB", (20, 20), RED).save(dog / "bitmap.bmp")
    Image.new("1", (20, 20), 1).save(dog / "bilevel.png")
    Image.new("P", (20, 20), 3).save(dog / "palette.png")


def junk_files(root: Path) -> None:
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "truncated.jpg").write_bytes(jpeg(Image.effect_noise((64, 64), 60).convert("RGB"))[:800])
    (root / "dog" / "notes.txt").write_text("taken on holiday\n")
    (root / "dog" / "fake.png").write_text("not a picture")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "t.jpg").write_bytes(jpeg(Image.new("RGB", (8, 8))))
    (root / "loose.jpg").write_bytes(jpeg(Image.new("RGB", (8, 8))))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two classes of mixed real files: the special kinds, junk, and 40 noisy non-square JPEGs."""
    root = tmp_path_factory.mktemp("photos")
    special_images(root)
    junk_files(root)
    rng = np.random.default_rng(0)
    for i in range(40):
        w, h = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / ("cat" if i % 2 else "dog") / f"img_{i:02d}.jpg").write_bytes(jpeg(Image.fromarray(pixels)))
    return root


def shard_images(folder: Path, split: str = "train") -> dict[str, tuple[np.ndarray, int]]:
    """key -> (pixels, class) of every sample in FOLDER/SPLIT-*.tar."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {key: (np.asarray(Image.open(io.BytesIO(f.get("png") or f["jpg"]))), int(f["cls"])) for key, f in out.items()}


def test_every_kind_of_image_converts_and_junk_is_skipped_counted_and_listed(photos, tmp_path):
    opts = ImageOptions(size=16, format="png", background=WHITE)
    counts, found, tally = write_image_shards(photos, tmp_path / "out", opts, holdout=5, shard_size=10, progress=False)
    assert found.classes == ["cat", "dog"] and found.layout == "folders"
    assert {path: why.split(" (")[0] for path, why in tally.skipped} == JUNK
    assert len(found.files) - 4 == 51 == sum(tally.written.values()) and tally.written == {"val": 5, "train": 46}
    assert counts == {"val": 1, "train": 5}
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes["classes"] == ["cat", "dog"] and sum(classes["counts"].values()) == 51
    assert (tmp_path / "out" / "skipped.txt").read_text().count("\n") == len(JUNK)
    images = {**shard_images(tmp_path / "out"), **shard_images(tmp_path / "out", "val")}
    width = len(next(iter(images)))
    look = {rel: images[f"{i:0{width}d}"] for i, (rel, _) in enumerate(found.files) if f"{i:0{width}d}" in images}
    near = lambda pixel, colour: np.abs(pixel.astype(int) - colour).max() <= 3  # noqa: E731
    exif, _ = look["cat/exif.jpg"]
    assert near(exif[2, 8], RED) and near(exif[13, 8], BLUE)  # upright: red on top, as shown, not as stored
    alpha, _ = look["cat/alpha.png"]
    assert near(alpha[8, 2], WHITE) and near(alpha[8, 13], GREEN)  # transparency on the stated background
    assert look["cat/deep/er/anim.gif"][1] == 0 and near(look["cat/deep/er/anim.gif"][0][8, 8], RED)  # first frame, class cat
    assert near(look["dog/cmyk.jpg"][0][8, 8], (0, 255, 255)) and look["dog/cmyk.jpg"][1] == 1
    for sixteen in ("dog/sixteen.png", "dog/sixteen.tif"):
        assert near(look[sixteen][0][8, 8], (128, 128, 128))  # 16-bit grey scaled to 8 bits
    assert near(look["cat/la.png"][0][8, 8], (200, 200, 200)) and near(look["dog/bilevel.png"][0][8, 8], WHITE)
    assert near(look["dog/photo.webp"][0][8, 8], BLUE) and near(look["dog/bitmap.bmp"][0][8, 8], RED)
    assert all(pixels.shape == (16, 16, 3) for pixels, _ in images.values())


def test_transforms_crop_pad_stretch_and_wide_as_stylegans_tool():
    wide = Image.new("RGB", (60, 20), BLUE)
    wide.paste(RED, (20, 0, 40, 20))  # the middle third is red
    out = {name: np.asarray(transform(wide, ImageOptions(size=12, transform=name, background=WHITE)))
           for name in ("center-crop", "center-crop-wide", "pad", "stretch")}
    assert (out["center-crop"][:, :, 0] > 200).all()  # only the red middle survives
    assert (out["pad"][0] == 255).all() and (out["pad"][6, 0] == BLUE).all()  # white bars above, the whole width kept
    assert tuple(out["stretch"][6, 0]) == BLUE and tuple(out["stretch"][6, 6]) == RED  # squashed, all there
    assert (out["center-crop-wide"][0] == 255).all() and out["center-crop-wide"][6, 6, 0] > 200  # a 2:1 band in the square


def test_labels_from_stylegan_dataset_json_or_none(photos, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), RED).save(root / f"{i}.png")
    assert scan(root).layout == "none" and scan(root).classes == []
    (root / "dataset.json").write_text(json.dumps({"labels": [["0.png", 4], ["1.png", 2]]}))
    found = scan(root)
    assert found.files == [("0.png", 4), ("1.png", 2)] and found.classes == ["0", "1", "2", "3", "4"]
    assert found.skipped == [("2.png", "no label in dataset.json")]
    assert [label for _, label in scan(photos, "none").files] == [-1] * len(scan(photos, "none").files)


def test_the_same_bytes_for_any_worker_count_and_on_a_rerun(photos, tmp_path):
    opts = ImageOptions(size=24)
    outputs = []
    for workers, name in ((1, "one"), (2, "two"), (2, "two")):  # the third: a rerun into the same folder
        write_image_shards(photos, tmp_path / name, opts, shard_size=8, workers=workers, progress=False)
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert len([n for n in outputs[0] if n.endswith(".tar")]) == 7
    assert outputs[0] == outputs[1] == outputs[2]
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_a_killed_conversion_leaves_nothing_and_a_rerun_completes_identically(photos, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gannet", "shards", "images", str(photos), "--out", str(out), "--size", "64",
           "--shard-size", "4"]
    finished_one = lambda: len(list(tmp_path.glob(".out.tmp-*/train-*.tar"))) >= 2  # noqa: E731 (shard 0 closed)
    kill_when(cmd, finished_one)
    assert not list(out.glob("*")) and list(tmp_path.glob(".out.tmp-*"))  # nothing under final names
    result = subprocess.run(cmd, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converted 51 image(s)" in result.stdout and "skipped 7 file(s)" in result.stdout
    assert not list(tmp_path.glob(".out.tmp-*"))  # the killed run's temporary folder is gone too
    write_image_shards(photos, tmp_path / "reference", ImageOptions(size=64), shard_size=4, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()}


def test_a_folder_without_any_image_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("no photos here")
    (tmp_path / "empty.jpg").write_bytes(b"")
    result = gannet("shards", "images", str(tmp_path), "--out", str(tmp_path / "out"), "--size", "32", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "holds no readable image (2 file(s) skipped" in result.stderr and not (tmp_path / "out").exists()


def test_shards_go_straight_to_the_object_store(photos, tmp_path):
    server = S3Store(tmp_path / "moto.log")
    try:
        server.client().create_bucket(Bucket="mine")
        result = subprocess.run([sys.executable, "-m", "gannet", "shards", "images", str(photos), "--out", "s3://mine/photos/",
                                 "--size", "24", "--shard-size", "8"], cwd=tmp_path, env={**server.env, "PYTHONPATH": str(REPO)},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        client = server.client()
        stored = {o["Key"]: client.get_object(Bucket="mine", Key=o["Key"])["Body"].read()
                  for o in client.list_objects_v2(Bucket="mine")["Contents"]}
    finally:
        server.close()
    write_image_shards(photos, tmp_path / "local", ImageOptions(size=24), shard_size=8, progress=False)
    assert stored == {f"photos/{p.name}": p.read_bytes() for p in (tmp_path / "local").iterdir()}
    assert "data.shards='s3://mine/photos/train-*.tar'" in result.stdout and not list(tmp_path.glob("gannet-*"))


def test_a_conditional_run_trains_on_the_folders_classes_and_samples_one_by_name(photos, tmp_path):
    write_image_shards(photos, tmp_path / "data", ImageOptions(size=16), shard_size=12, progress=False)
    run = tmp_path / "run"
    gannet("train", "cgan_mnist", f"data.shards={tmp_path}/data/train-*.tar", "data.image_size=16", "data.channels=3",
           "data.mirror=true", "data.batch_size=8", "model.num_classes=2", "model.g_width=8", "model.d_width=8",
           "model.cond_dim=8", "train.steps=4", "train.log_every=2", "train.sample_every=4", "train.checkpoint_every=4",
           "log.wandb=disabled", f"run_dir={run}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(r["data/wait_ms"] >= 0 and r["data/loader_images_per_s"] > 0 for r in rows)
    by_name = gannet("sample", str(run), "--label", "dog", "--n", "4", "--out", str(tmp_path / "dog.png"))
    assert "dog.png" in by_name.stdout and Image.open(tmp_path / "dog.png").size == (2 * 18 + 2, 2 * 18 + 2)
    gannet("sample", str(run), "--label", "1", "--n", "4", "--out", str(tmp_path / "one.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dog.png")), np.asarray(Image.open(tmp_path / "one.png")))
    wrong = gannet("sample", str(run), "--label", "zebra", "--out", str(tmp_path / "z.png"), check=False)
    assert wrong.returncode == 2 and "--label 'zebra' is not one of this run's 2 classes (cat, dog)" in wrong.stderr


def asymmetric(w: int, h: int, i: int) -> Image.Image:
    """A w x h picture, numbered by i in its corner, brighter to the right: mirrored, it is darker to the right."""
    pixels = np.tile(np.linspace(0, 200, w, dtype=np.uint8), (h, 1))
    pixels[:4, :4] = i
    return Image.fromarray(np.stack([pixels] * 3, axis=-1))


@pytest.fixture(scope="module")
def wide_shards(tmp_path_factory) -> Path:
    """4 shards of 12 JPEGs stored 48x32 (non-square, more than twice the 12 px target: cropped, drafted)."""
    out = tmp_path_factory.mktemp("wide")
    write_split(((f"{i:04d}", {"jpg": jpeg(asymmetric(48, 32, i))}) for i in range(48)), out, "train", 12, mtime=SHARD_MTIME)
    return out


def test_stored_images_are_center_cropped_in_draft_mode_not_squashed():
    stored = Image.open(io.BytesIO(jpeg(asymmetric(48, 32, 0))))
    square = center_square(stored, 12, "RGB")
    assert stored.size == (24, 16) and square.size == (12, 12)  # decoded at 1/2 scale (draft), then cropped
    middle = np.asarray(Image.open(io.BytesIO(jpeg(asymmetric(48, 32, 0)))).convert("RGB").crop((8, 0, 40, 32)).resize((12, 12)))
    assert np.abs(np.asarray(square).astype(int) - middle).mean() < 6  # the centre 32x32, not all 48 columns squashed


def test_mirror_and_crop_are_the_same_after_resume(wide_shards):
    cfg = DataConfig(shards=f"{wide_shards}/train-*.tar", image_size=12, channels=3, batch_size=4, num_workers=2,
                     shuffle_buffer=8, mirror=True)
    urls = expand_urls(cfg.shards)
    full = DataStream(urls, cfg, rank=0, world=1, seed=0)
    reference = [next(full)["image"] for _ in range(30)]  # 48 images / 4 per batch: crosses epochs
    assert all(b.dtype == torch.uint8 and b.shape == (4, 3, 12, 12) for b in reference)
    brighter_right = [bool(img[0, 8, 11] > img[0, 8, 5]) for b in reference for img in b]
    assert 0.25 < sum(brighter_right) / len(brighter_right) < 0.75  # about half of the images mirrored
    first = DataStream(urls, cfg, rank=0, world=1, seed=0)
    for _ in range(11):
        next(first)
    resumed = DataStream(urls, cfg, rank=0, world=1, seed=0, position=StreamPosition.from_state(first.position.state_dict()))
    for i in range(11, 30):
        assert torch.equal(next(resumed)["image"], reference[i]), f"batch {i} differs after resume"
