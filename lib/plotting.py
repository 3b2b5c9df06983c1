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


def trajectories_figure(trajectories_by_label, title, snapshot_times=(0.0, 0.6, 0.85, 0.95, 0.98, 1.0), num_paths=30,
                        lim=2.5):
    """The paper's Figure 5 for 2-D data: how particles travel from noise (t = 0) to data (t = T).

    trajectories_by_label: {'λ=0 (reverse SDE)': (times (K,), states (K, N, 2)), ...}, times in generative
    time from 0 to T. One row per entry: scatter snapshots at the fractions `snapshot_times` of T (the
    VP SDE keeps the particles noise-like until late, so the defaults crowd towards t = T), then the first
    coordinate of `num_paths` particles against t, where the reverse SDE's paths are rough and the
    probability-flow ODE's smooth.
    """
    rows, cols = len(trajectories_by_label), len(snapshot_times) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * (cols + 1), 2.7 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * (cols - 1) + [2]})
    for r, (label, (times, states)) in enumerate(trajectories_by_label.items()):
        times, states = times.cpu(), states.cpu()
        T = times[-1].item()
        for c, frac in enumerate(snapshot_times):
            k = int(torch.argmin((times - frac * T).abs()))
            ax = axes[r, c]
            ax.scatter(states[k, :, 0], states[k, :, 1], s=1, c="tab:red")
            ax.set_title(f"t = {times[k].item():.2f}")
            ax.set_xlabel("$x_1$")
            _square(ax, lim)
            if c == 0:
                ax.set_ylabel(f"{label}\n$x_2$")
        ax = axes[r, -1]
        ax.plot(times, states[:, :num_paths, 0], lw=0.7, alpha=0.8)  # (K, num_paths): one line per particle
        ax.set_xlim(0, T)
        ax.set_ylim(-lim, lim)
        ax.set_xlabel("generative time t")
        ax.set_ylabel("$x_1$")
        ax.set_title(f"{min(num_paths, states.shape[1])} particle paths")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _square(ax, lim):
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
