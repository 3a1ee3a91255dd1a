"""The PNGs a training run writes beside its metrics: the training curves (loss and validation NDCG@10 per epoch).

matplotlib is imported on first use with the Agg backend: no display is needed, and the service never loads it.
"""

from __future__ import annotations

from pathlib import Path


def plot_curves(curves: list[dict[str, float]], path: Path, title: str) -> None:
    """Training loss and validation NDCG@10 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [c["epoch"] for c in curves]
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(epochs, [c["loss"] for c in curves], color="tab:blue", marker="o", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    ndcg_axis = loss_axis.twinx()
    ndcg_axis.plot(epochs, [c["val_ndcg@10"] for c in curves], color="tab:red", marker="s", label="val NDCG@10")
    ndcg_axis.set_ylabel("validation NDCG@10", color="tab:red")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
