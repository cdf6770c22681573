"""A run's one-page report (RUN/eval/report.png): curves from metrics.jsonl beside the images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from gannet.trainer.tracking.tracker import read_metrics  # noqa: E402


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def write_report(run_dir: Path, result: dict[str, Any]) -> Path:
    """Loss curves, D outputs against equilibrium, FID over steps, the latest samples, the
    memorization grid and class coverage, in one PNG."""
    rows = read_metrics(run_dir)
    target = result["equilibrium"]["equilibrium"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    ax = axes[0, 0]
    for key in ("train/loss_d", "train/loss_g"):
        ax.plot(*_series(rows, key), label=key.split("/")[1])
    ax.axhline(target["loss_d"], color="grey", ls="--", label="D loss at equilibrium")
    ax.set(title="losses", xlabel="step")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(*_series(rows, "train/d_real"), label="D(x)")
    ax.plot(*_series(rows, "train/d_fake"), label="D(G(z))")
    ax.axhline(target["d_real"], color="grey", ls="--", label="equilibrium")
    ax.set(title="discriminator outputs", xlabel="step")
    ax.legend()
    ax = axes[0, 2]
    ax.plot(*_series(rows, "eval/fid"), "o-", label="during training")
    ax.plot(*_series(result["over_steps"], "eval/fid"), "s--", label="gannet eval (checkpoints)")
    ax.axhline(result["fid_heldout_reference"], color="grey", ls="--", label="held-out real vs train")
    ax.set(title=f"FID ({result['extractor']['kind']} features)", xlabel="step")
    ax.legend()
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    images = [(f"samples ({grids[-1].stem})" if grids else "no samples", grids[-1] if grids else None),
              (f"memorization: {result['memorization']['verdict']}", run_dir / "eval" / "memorization.png")]
    for ax, (title, path) in zip(axes[1, :2], images):
        if path is not None and path.exists():
            ax.imshow(Image.open(path), cmap="gray")
        ax.set(title=title)
        ax.axis("off")
    ax = axes[1, 2]
    if "class_counts" in result:
        ax.bar(range(10), result["class_counts"])
        ax.set(title=f"class coverage: {result['classes_covered']}/10", xlabel="class (by the classifier)", xticks=range(10))
    else:
        ax.axis("off")
    text = f"precision {result['precision']:.3f}  recall {result['recall']:.3f}  KID {result['kid']:.4g}"
    warnings = result["equilibrium"]["warnings"]
    fig.suptitle(f"{run_dir.name} @ {result['checkpoint']}: {text}" + ("\n" + "; ".join(warnings) if warnings else ""))
    fig.tight_layout()
    out = run_dir / "eval" / "report.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
