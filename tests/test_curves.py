"""curves.png reads well: whole epochs, several labelled log ticks, the per-step loss on top, legends off the
lines."""
from model.train import curves_figure


def records(n_epochs: int = 2, steps_per_epoch: int = 3) -> list[dict]:
    out, step = [], 0
    for e in range(1, n_epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            out.append({"kind": "step", "epoch": e, "step": step, "loss": 20.0 / step, "fragment": 1, "global": 1})
        val = {d: {f"r{k}": 0.1 * e * k / 10 for k in (1, 5, 10)} for d in ("annotation", "search")}
        out.append({"kind": "epoch", "epoch": e, "step": step, "loss": 20.0 / step, "fragment": 2.0 / step,
                    "global": 15.0 / step, "val": val})
    return out


def test_curves_axes_and_legends():
    fig = curves_figure(records())
    fig.canvas.draw()
    loss_ax, recall_ax = fig.axes[:2]
    epoch_ticks = [t for t in recall_ax.get_xticks() if recall_ax.get_xlim()[0] <= t <= recall_ax.get_xlim()[1]]
    assert epoch_ticks and all(float(t).is_integer() for t in epoch_ticks), epoch_ticks
    lo, hi = loss_ax.get_ylim()
    labelled = [t for t in loss_ax.yaxis.get_majorticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert loss_ax.get_yscale() == "log" and len(labelled) >= 3, [t.get_text() for t in labelled]
    step_line = next(line for line in loss_ax.lines if line.get_label() == "loss (per step)")
    assert step_line.get_zorder() > max(line.get_zorder() for line in loss_ax.lines if line is not step_line)
    renderer = fig.canvas.get_renderer()
    for ax in (loss_ax, recall_ax):
        legend = ax.get_legend()
        assert legend is not None
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
