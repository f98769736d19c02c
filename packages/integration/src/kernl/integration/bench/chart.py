"""The bar chart of ``kernl bench``: speedup over Hugging Face eager, per shape and engine."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def speedup_chart(results: dict, title: str):
    """Grouped bars, one group per (batch, seq), one bar per engine; returns the figure."""
    engines = list(results["engines"])
    shapes = list(results["engines"]["HF eager"]["shapes"])
    baseline = {s: results["engines"]["HF eager"]["shapes"][s]["latency_ms"] for s in shapes}
    figure, axis = plt.subplots(figsize=(max(8, 1.4 * len(shapes)), 4.5))
    width = 0.8 / len(engines)
    for index, engine in enumerate(engines):
        ratios = [baseline[s] / results["engines"][engine]["shapes"][s]["latency_ms"] for s in shapes]
        positions = [i + (index - (len(engines) - 1) / 2) * width for i in range(len(shapes))]
        bars = axis.bar(positions, ratios, width, label=engine)
        if engine == "kernl":
            axis.bar_label(bars, labels=[f"{r:.1f}x" for r in ratios], fontsize=7)
    axis.set_xticks(range(len(shapes)), [s.replace("x", " x ") for s in shapes])
    axis.set_xlabel("batch x sequence length")
    axis.set_ylabel("speedup over Hugging Face (eager attention)")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_title(title)
    axis.legend(fontsize=8, ncols=2)
    figure.tight_layout()
    return figure
