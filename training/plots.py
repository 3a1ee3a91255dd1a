"""The PNGs a training run writes beside its metrics: the training curves (loss and validation NDCG@10 per epoch)
and, for a tuned run, the search's trials.

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


def plot_trials(history: list[dict[str, object]], path: Path, title: str, chosen: int | None = None) -> None:
    """Each trial's validation NDCG@10 (pruned ones at their last pass, hollow), the best so far and the `chosen`
    trial (the one that trained the model), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    numbers = [int(str(t["number"])) for t in history]
    values = [float(str(t["value"])) for t in history]
    complete = [t["state"] == "complete" for t in history]
    for done, face, edge in ((True, "tab:blue", "tab:blue"), (False, "none", "tab:gray")):
        shown = [(n, v) for n, v, c in zip(numbers, values, complete, strict=True) if c == done]
        if shown:
            xs, ys = zip(*shown, strict=True)
            axis.scatter(xs, ys, facecolors=face, edgecolors=edge, label="complete" if done else "pruned")
    best, running = -1.0, []
    for value, done in zip(values, complete, strict=True):
        best = max(best, value) if done else best
        running.append(best if best >= 0 else float("nan"))
    axis.step(numbers, running, where="post", color="tab:red", label="best so far")
    if chosen in numbers:
        at = numbers.index(chosen)
        axis.scatter([chosen], [values[at]], marker="*", s=200, color="tab:orange", zorder=3, label="chosen")
    axis.set_xlabel("trial")
    axis.set_ylabel("validation NDCG@10")
    axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
