"""What ``llmkern finetune`` prints and draws: the before/after table and the loss curve."""
from __future__ import annotations

from pathlib import Path

from llmkern.train.memory import format_bytes
from llmkern.train.metrics import read_metrics


def _pct(metrics: dict, subset: str, key: str) -> str:
    value = metrics.get(subset, {}).get(key)
    return "-" if value is None else f"{100 * value:.1f}%"


def comparison_table(base: dict, tuned: dict) -> str:
    """A text table of the base and fine-tuned evaluations (from :func:`llmkern.finetune.evaluate.evaluate`)."""
    n_seen = base.get("seen", {}).get("n", 0)
    n_held = base.get("held_out", {}).get("n", 0)
    rows = [
        (f"exact match, training schemas (n={n_seen})", _pct(base, "seen", "exact_match"), _pct(tuned, "seen", "exact_match")),
        ("execution accuracy, training schemas", _pct(base, "seen", "execution_accuracy"), _pct(tuned, "seen", "execution_accuracy")),
        (f"exact match, held-out schemas (n={n_held})", _pct(base, "held_out", "exact_match"), _pct(tuned, "held_out", "exact_match")),
        ("execution accuracy, held-out schemas", _pct(base, "held_out", "execution_accuracy"), _pct(tuned, "held_out", "execution_accuracy")),
        ("generation tokens/s", f"{base['generation']['tokens_per_s']:.0f}", f"{tuned['generation']['tokens_per_s']:.0f}"),
        ("generation peak memory", format_bytes(base["generation"]["peak_memory_bytes"]),
         format_bytes(tuned["generation"]["peak_memory_bytes"])),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'base':>10}  {'fine-tuned':>10}"]
    lines += [f"{name:{width}}  {a:>10}  {b:>10}" for name, a, b in rows]
    return "\n".join(lines)


def plot_loss(metrics_jsonl: str | Path, png: str | Path, title: str = "QLoRA fine-tuning") -> bool:
    """Draw the training loss (and validation loss, where logged) per step from the trainer's
    ``metrics.jsonl`` into ``png``. Returns False, drawing nothing, when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(metrics_jsonl)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and not r.get("skipped")]
    valid = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per SQL byte")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True
