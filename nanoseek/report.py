"""Run artifacts a person wants to look at: PNG plots from metrics.jsonl and a short report.md."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # figures without pyplot: no process-wide backend or figure registry


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) from RUN/metrics.jsonl."""
    steps, evals = [], []
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        (evals if "val_loss" in rec else steps).append(rec)
    return steps, evals


def plot_training(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    steps, evals = read_metrics(run_dir)
    if not steps:
        return []
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    x = [r["step"] for r in steps]
    paths = []

    fig, ax = _figure((7, 4))
    ax.plot(x, [r["main"] for r in steps], label="train: next-token")
    if "mtp" in steps[0]:
        ax.plot(x, [r["mtp"] for r in steps], label="train: MTP", alpha=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "loss.png"))

    fig, ax = _figure((7, 3))
    ax.plot(x, [r["lr"] for r in steps])
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "lr.png"))

    if steps[0].get("max_vio"):
        fig, ax = _figure((7, 4))
        for layer in range(len(steps[0]["max_vio"])):
            ax.plot(x, [r["max_vio"][layer] for r in steps], label=f"MoE layer {layer}")
        ax.set(xlabel="step", ylabel="MaxVio = max load / mean load - 1", title="Expert load balance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "expert_load.png"))
    return paths


def plot_rl(run_dir: Path) -> list[Path]:
    """GRPO plots from RUN/metrics.jsonl: rewards, completion length, KL and entropy, held-out accuracy."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval" in r]
    if not steps:
        return []
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    x = [r["step"] for r in steps]
    panels = [("reward.png", "Rewards (batch mean)", [k for k in ("reward", "accuracy", "format") if k in steps[0]]),
              ("length.png", "Completion length (tokens)", ["len"]),
              ("kl_entropy.png", "KL to the reference and policy entropy", ["kl", "entropy"])]
    paths = []
    for name, title, keys in panels:
        fig, ax = _figure((7, 3.5))
        for k in keys:
            ax.plot(x, [r[k] for r in steps], label=k)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / name))
    if evals:
        fig, ax = _figure((7, 3.5))
        for k in evals[0]["eval"]:
            ax.plot([r["step"] for r in evals], [r["eval"][k] for r in evals], "o-", label=k)
        ax.set(xlabel="step", ylabel="fraction correct", title="Held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / "heldout.png"))
    return paths


def _figure(size: tuple[float, float]):
    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _cell(value) -> str:
    """A markdown table cell: a literal | (reasoning traces use it) must be escaped."""
    return str(value).replace("|", "\\|")


def compute_rows(compute: dict) -> dict[str, str]:
    """report.md's rows of what a run used (`cost.run_compute`): total FLOPs, MFU and the GEMM peak it is measured
    against (with where that came from), device-hours, dollars."""
    return {"total FLOPs": f"{compute['flops']:.3e}", "MFU": f"{compute.get('mfu', float('nan')):.1%}",
            **({"MFU against (GEMM peak per device)": compute["peak"]} if "peak" in compute else {}),
            "device-hours": f"{compute['device_hours']:.4f}",
            "cost": f"${compute['cost']:.4f} at ${compute['price_per_hour']}/device-hour"}


def write_report(run_dir: Path, sections: dict[str, dict]) -> Path:
    """RUN/report.md, titled after the run directory: one table per section (name -> {label: value}), then
    the plots."""
    run_dir = Path(run_dir)
    lines = [f"# nanoseek run {run_dir.resolve().name}", ""]
    for name, rows in sections.items():
        lines += [f"## {name}", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in rows.items()]
        lines.append("")
    plots = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").exists() else []
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
