"""``reward_curve.png`` from a run's ``metrics.jsonl`` (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from grpo.io.logging import read_metrics


def curve(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the finite values of metric ``name`` in ``records``."""
    points = [
        (int(r["step"]), float(r[name]))
        for r in records
        if isinstance(r.get(name), (int, float)) and "step" in r
    ]
    return [s for s, _ in points], [v for _, v in points]


def plot_reward_curve(metrics_path: str | Path, png_path: str | Path, *, title: str = "") -> Path:
    """Plot mean reward per logged step, the eval reward when the run evaluated, and kl
    (when logged) on a second axis.

    Args:
        metrics_path: a ``metrics.jsonl`` written by the trainer.
        png_path: where to write the figure.
        title: figure title.

    Returns:
        ``png_path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps, rewards = curve(records, "reward")
    if not steps:
        raise ValueError(f"{metrics_path}: no 'reward' values to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(steps, rewards, color="tab:blue", marker=".", label="reward")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward", color="tab:blue")
    eval_steps, eval_rewards = curve(records, "eval_reward")
    if eval_steps:  # the held-out curve, on the same axis so the two compare directly
        ax.plot(eval_steps, eval_rewards, color="tab:green", marker="o", label="eval reward")
        ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    kl_steps, kls = curve(records, "kl")
    if kl_steps:
        ax2 = ax.twinx()
        ax2.plot(kl_steps, kls, color="tab:orange", alpha=0.6, label="kl")
        ax2.set_ylabel("kl", color="tab:orange")
    ax.set_title(title or "GRPO reward curve")
    return save_figure(fig, png_path)


def save_figure(fig, png_path: str | Path) -> Path:
    """Write ``fig`` to ``png_path`` (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
