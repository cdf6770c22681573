"""Captions for handwritten digits, derived from the pixels themselves.

The text-to-image GAN needs image + caption pairs; MNIST has none, so gannet writes them from
what can be measured on each digit: its class name, its stroke thickness, its slant and its
width, each put in one of three bins, phrased several ways (as CUB-200 has ten captions per
bird). The same measurements score generated digits afterwards: a caption asked for a thick
seven slanted to the right, and `describe` says whether the image shows one.

Bins are the terciles measured on the bundled 5,000 digits, so each word covers about a third
of the data and every caption word carries information.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thin", "medium", "thick")
SLANT = ("slanted to the left", "upright", "slanted to the right")
WIDTH = ("narrow", "medium-width", "wide")
# Tercile edges measured on the bundled MNIST digits (gannet.trainer.data.shards.bundled_mnist).
THICKNESS_EDGES = (2.57, 3.12)  # stroke width in pixels: 2 x ink area / boundary pixels
SLANT_EDGES = (0.0, 0.26)  # horizontal shift per pixel of height (second moments); > 0 leans right
WIDTH_EDGES = (14, 17)  # width of the inked bounding box in pixels, at 28 x 28


@dataclass(frozen=True)
class Description:
    digit: int
    thickness: int  # index into THICKNESS
    slant: int  # index into SLANT
    width: int  # index into WIDTH


def measure(pixels: np.ndarray) -> tuple[float, float, int]:
    """(stroke width, slant, ink width) of one grayscale digit, uint8 or float in [0, 255]."""
    ink = pixels > 127
    if not ink.any():
        return 0.0, 0.0, 0
    inner = ink & np.roll(ink, 1, 0) & np.roll(ink, -1, 0) & np.roll(ink, 1, 1) & np.roll(ink, -1, 1)
    thickness = 2.0 * ink.sum() / max(int((ink & ~inner).sum()), 1)
    weight = pixels.astype(np.float64)
    rows, cols = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
    total = weight.sum()
    cx, cy = (weight * cols).sum() / total, (weight * rows).sum() / total
    up = cy - rows  # image rows grow downwards; slant is measured with height growing upwards
    slant = (weight * (cols - cx) * up).sum() / max((weight * up**2).sum(), 1e-9)
    xs = np.nonzero(ink.any(0))[0]
    return float(thickness), float(slant), int(xs[-1] - xs[0] + 1)


def describe(pixels: np.ndarray, digit: int) -> Description:
    thickness, slant, width = measure(pixels)
    return Description(digit, int(np.digitize(thickness, THICKNESS_EDGES)), int(np.digitize(slant, SLANT_EDGES)),
                       int(np.digitize(width, WIDTH_EDGES)))


def phrasings(d: Description) -> list[str]:
    """Several captions of one description, from terse to wordy (one is drawn per sample and epoch)."""
    name, thick, slant, width = DIGITS[d.digit], THICKNESS[d.thickness], SLANT[d.slant], WIDTH[d.width]
    return [
        f"a {thick} {name} {slant}",
        f"the digit {d.digit} written with {thick} strokes, {slant}",
        f"a {width} handwritten {name} in {thick} strokes",
        f"a {width}, {thick} {name}, {slant}",
        f"handwritten {name}: {thick} lines, {width}, {slant}",
    ]


def caption_digit(pixels: np.ndarray, digit: int) -> str:
    """All phrasings of one digit image, one per line (the `txt` field of a caption shard)."""
    return "\n".join(phrasings(describe(pixels, digit)))


def caption_attributes(caption: str) -> dict[str, int]:
    """The attribute bins a caption names (a caption need not name all of them, or any)."""
    words = caption.lower().replace(",", " ").replace(":", " ").split()
    found = {}
    for attribute, names in (("thickness", THICKNESS), ("width", WIDTH)):
        hits = [i for i, name in enumerate(names) if name in words]
        if len(hits) == 1:
            found[attribute] = hits[0]
    text = " ".join(words)
    hits = [i for i, phrase in enumerate(SLANT) if phrase in text]
    if len(hits) == 1:
        found["slant"] = hits[0]
    return found


def attribute_agreement(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """For each attribute, the fraction of generated digits whose measured bin is the one their
    caption asked for (chance is about 1/3). `images` are uint8 (N, H, W) at 28 x 28."""
    hits: dict[str, list[bool]] = {"thickness": [], "slant": [], "width": []}
    for pixels, caption in zip(images, captions):
        measured = describe(pixels, digit=0)
        for attribute, wanted in caption_attributes(caption).items():
            hits[attribute].append(getattr(measured, attribute) == wanted)
    return {attribute: float(np.mean(h)) for attribute, h in hits.items() if h}
