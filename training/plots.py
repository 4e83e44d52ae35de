"""The PNG plots of a `python -m moe_mtp.train` run, drawn from its metrics history: loss.png and expert_load.png,
which the generated model card shows too."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..atomic import atomic_path

PLOTS = ("loss.png", "expert_load.png")


def save_plots(output_dir: Path, history: dict) -> None:
    """loss.png (total, main, MTP and balance losses, eval loss) and expert_load.png (per MoE layer, the load of
    each expert relative to the mean over the run: 1 is balanced)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(f"plots need matplotlib ({error}); `pip install matplotlib`, or pass --no-plots") from None
    _loss_plot(plt, output_dir / "loss.png", history["records"])
    if history["loads"]:
        _load_plot(plt, output_dir / "expert_load.png", history)


def _loss_plot(plt, path: Path, records: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if k.endswith("loss") or k.startswith("mtp_loss")]
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=key, marker="o" if key.startswith("eval") else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def _load_plot(plt, path: Path, history: dict) -> None:
    loads, layers = torch.stack(history["loads"]), history["layers"]
    columns = min(4, len(layers))
    rows = math.ceil(len(layers) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    vmax = max(2.0, float(loads.max()))
    for index, ax in enumerate(axes.flat):
        if index >= len(layers):
            ax.axis("off")
            continue
        image = ax.imshow(
            loads[:, index].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest",
            extent=(-0.5, loads.shape[-1] - 0.5, history["load_steps"][-1], history["load_steps"][0]),
        )  # fmt: skip
        ax.set_title(layers[index])
        ax.set_xlabel("expert")
        ax.set_ylabel("step")
    fig.colorbar(image, ax=axes, label="load / mean load")
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
