"""Figures for 2-D toy runs: samples against data, and particle trajectories (the paper's Figure 5)."""
import matplotlib
import torch

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def samples_figure(data, samples_by_label, title, lim=1.6):
    """One panel per entry of samples_by_label ({'λ=0': (N, 2) tensor, ...}) over the data (M, 2)."""
    n = len(samples_by_label) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.2), sharex=True, sharey=True)
    panels = [("data", data, "tab:blue")] + [(k, v, "tab:red") for k, v in samples_by_label.items()]
    for ax, (label, points, color) in zip(axes, panels):
        if label != "data":
            ax.scatter(data[:, 0], data[:, 1], s=1, c="lightgray", label="data")
        ax.scatter(points[:, 0].cpu(), points[:, 1].cpu(), s=1, c=color, label=label)
        ax.set_title(label)
        ax.set_xlabel("$x_1$")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    axes[0].set_ylabel("$x_2$")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def trajectories_figure(trajectories_by_label, T, title, num_paths=40, num_snapshots=5, lim=2.5):
    """Rows: one per entry ({'λ=0 (reverse SDE)': list of (N, 2) states}); columns: snapshots in time
    from generative t = 0 (noise) to t = T (data), then the paths of `num_paths` particles."""
    rows = len(trajectories_by_label)
    cols = num_snapshots + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows), squeeze=False)
    for r, (label, states) in enumerate(trajectories_by_label.items()):
        steps = len(states) - 1
        picks = [round(k * steps / (num_snapshots - 1)) for k in range(num_snapshots)]
        for c, k in enumerate(picks):
            ax = axes[r, c]
            y = states[k].cpu()
            ax.scatter(y[:, 0], y[:, 1], s=1, c="tab:red")
            ax.set_title(f"t = {T * k / steps:.2f}")
            _square(ax, lim)
            if c == 0:
                ax.set_ylabel(f"{label}\n$x_2$")
        ax = axes[r, -1]
        path = torch.stack(list(states))[:, :num_paths].cpu()  # (steps + 1, num_paths, 2)
        for j in range(path.shape[1]):
            ax.plot(path[:, j, 0], path[:, j, 1], lw=0.6, alpha=0.7)
        ax.scatter(path[0, :, 0], path[0, :, 1], s=6, c="gray", label="t = 0")
        ax.scatter(path[-1, :, 0], path[-1, :, 1], s=6, c="black", label="t = T")
        ax.set_title(f"{path.shape[1]} particle paths")
        ax.legend(loc="lower right", fontsize=7)
        _square(ax, lim)
    for ax in axes[-1]:
        ax.set_xlabel("$x_1$")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _square(ax, lim):
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
