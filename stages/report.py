"""`pipeline report RUN_DIR`: pictures of what a run directory holds, and a short Markdown summary.

It reads what the stages wrote, wherever under RUN_DIR they are (the default layout, an experiment's, a
student.out of your own): a student's losses.jsonl, an evaluation's metrics.json. Per student, L_align, L_gt
and the learning rate over steps; per `eval --mode align`, L_align per layer of fresh and trained heads on
its store's queries; and one chart of the metric of every other evaluation. Writes into RUN_DIR/report/.
"""
from __future__ import annotations

import json
import os

METRICS = {"vqa_accuracy": "VQA accuracy (%)", "cider": "CIDEr (x100)", "accuracy": "accuracy (%)"}
REPORT_DNAME = "report"


def _find(run_dpath: str, fname: str) -> list[str]:
    """Directories under run_dpath holding fname, sorted (DeepSpeed checkpoints and the report left out)."""
    found = []
    for dpath, dnames, fnames in os.walk(run_dpath):
        dnames[:] = sorted(d for d in dnames if d not in ("checkpoints", REPORT_DNAME))
        if fname in fnames:
            found.append(dpath)
    return found


def _name(run_dpath: str, dpath: str) -> str:
    return os.path.relpath(dpath, run_dpath).replace(os.sep, "-")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_training(rows: list[dict], title: str, fpath: str) -> None:
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    panels = (("l_align", "L_align\n(MSE to the teacher's\nlayer outputs)"), ("l_gt", "L_gt\n(cross-entropy,\nnats per token)"),
              ("lr", "learning rate"))
    epochs = sorted({r["epoch"] for r in rows})
    for ax, (key, label) in zip(axes, panels):
        many = key != "lr" and len(epochs) > 1  # per-step losses are noisy over many steps: add epoch means
        ax.plot(steps, [r[key] for r in rows], lw=0.8 if many else 1.2, alpha=0.4 if many else 1.0,
                label="per step" if many else None)
        if many:
            last = [max(r["step"] for r in rows if r["epoch"] == e) for e in epochs]
            means = [sum(r[key] for r in rows if r["epoch"] == e) / sum(r["epoch"] == e for r in rows) for e in epochs]
            ax.plot(last, means, lw=1.8, color="tab:red", label="epoch mean")
            ax.legend(loc="upper right")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel("optimiser step (one global batch each)")
    axes[-1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(fpath, dpi=120)
    plt.close(fig)


def plot_align(metrics: dict, title: str, fpath: str) -> None:
    plt = _pyplot()
    fresh, trained = metrics["l_align_per_layer_init"], metrics["l_align_per_layer_trained"]
    layers = range(len(fresh))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.4
    ax.bar([x - width / 2 for x in layers], fresh, width, label=f"fresh heads (mean {metrics['l_align_init']:.4g})")
    ax.bar([x + width / 2 for x in layers], trained, width, label=f"trained heads (mean {metrics['l_align_trained']:.4g})")
    ax.set_xticks(list(layers))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("L_align (MSE to the teacher's layer outputs)")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(fpath, dpi=120)
    plt.close(fig)


def plot_evals(evals: dict[str, dict], fpath: str) -> None:
    """One horizontal bar per evaluation, one panel per metric (VQA accuracy and CIDEr are not one scale)."""
    plt = _pyplot()
    by_metric: dict[str, list[tuple[str, float]]] = {}
    for name, m in evals.items():
        metric = next(k for k in METRICS if k in m)
        by_metric.setdefault(metric, []).append((f"{name} (n={m['n']})", m[metric]))
    fig, axes = plt.subplots(len(by_metric), 1, squeeze=False,
                             figsize=(8, 1.2 + 0.45 * sum(len(v) for v in by_metric.values()) + 0.8 * len(by_metric)))
    for ax, (metric, bars) in zip(axes[:, 0], by_metric.items()):
        labels, values = zip(*bars)
        ax.barh(range(len(bars)), values, color="tab:blue")
        ax.set_yticks(range(len(bars)), labels)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center")
        ax.set_xlabel(METRICS[metric])
        top = max(values) * 1.15 or 1.0  # room for the value labels
        ax.set_xlim(0, top if metric == "cider" else max(100.0, top))  # percentages on their whole scale
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_title("evaluations under this run directory")
    fig.tight_layout()
    fig.savefig(fpath, dpi=120)
    plt.close(fig)


def report(run_dpath: str) -> str:
    """Write the PNGs and report.md into RUN_DIR/report; returns report.md's path."""
    out = os.path.join(run_dpath, REPORT_DNAME)
    os.makedirs(out, exist_ok=True)
    lines = [f"# Report of {run_dpath}", ""]
    for dpath in _find(run_dpath, "losses.jsonl"):
        rows = [json.loads(line) for line in open(os.path.join(dpath, "losses.jsonl")) if line.endswith("\n")]
        if not rows:
            continue
        name = _name(run_dpath, dpath)
        plot_training(rows, f"student {name}", os.path.join(out, f"training-{name}.png"))
        last = rows[-1]
        lines += [f"## Student {name}", "",
                  f"{last['step']} steps; final L_align {last['l_align']:.4g}, L_gt {last['l_gt']:.4g} "
                  f"(first step: {rows[0]['l_align']:.4g}, {rows[0]['l_gt']:.4g}).", "",
                  f"![training of {name}](training-{name}.png)", ""]
    metrics = {_name(run_dpath, d): json.load(open(os.path.join(d, "metrics.json")))
               for d in _find(run_dpath, "metrics.json")}
    for name, m in metrics.items():
        if "l_align_init" in m and "l_align_per_layer_init" not in m:
            lines += [f"{name}: L_align {m['l_align_init']:.4g} fresh, {m['l_align_trained']:.4g} trained; no per-layer "
                      "values (rerun `pipeline eval --mode align` to plot them).", ""]
        if "l_align_per_layer_init" in m:
            plot_align(m, f"{name}: {m['n']} queries of {m['store']}", os.path.join(out, f"align-{name}.png"))
            lines += [f"## L_align per layer: {name}", "",
                      f"On {m['n']} queries of the store {m['store']}: fresh heads {m['l_align_init']:.4g}, trained "
                      f"{m['l_align_trained']:.4g} (ratio {m['l_align_ratio']:.3f}).", "",
                      f"![L_align per layer, {name}](align-{name}.png)", ""]
    evals = {name: m for name, m in metrics.items() if any(k in m for k in METRICS)}
    if evals:
        plot_evals(evals, os.path.join(out, "evaluations.png"))
        lines += ["## Evaluations", "", "| evaluation | mode | queries | metric | value |", "|---|---|---|---|---|"]
        for name, m in evals.items():
            metric = next(k for k in METRICS if k in m)
            lines.append(f"| {name} | {m['mode']} | {m['n']} | {metric} | {m[metric]:.2f} |")
        lines += ["", "![evaluations](evaluations.png)", ""]
    fpath = os.path.join(out, "report.md")
    with open(fpath, "w") as f:
        f.write("\n".join(lines))
    return fpath
