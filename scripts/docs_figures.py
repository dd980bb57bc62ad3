"""Draw the speed and budget plots of docs/results.md from the tables on that page (no numbers of its own).

    .venv/bin/python scripts/docs_figures.py            # writes docs/img/speed.png and docs/img/budget.png

The speed plot is the table "Whole predict jobs against MONAI" (seconds per job, ours against the same job with
MONAI's sliding window); the budget plot is the protocol's table (held-out mean Dice after 20 CPU-minutes of
training, ours against the hand-written MONAI script, per fold and training seed).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _rows(page: str, header: str) -> list[list[str]]:
    """The body rows (cells stripped of Markdown emphasis) of the table whose header line starts with ``header``.

    Args:
        page: the page's Markdown.
        header: the start of the table's header line.
    """
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([re.sub(r"[*`]", "", cell).strip() for cell in line.strip().strip("|").split("|")])
    return rows


def speed_plot(page: str, out: Path) -> None:
    """Seconds per ``predict`` job, ours and MONAI's sliding window, bf16 and float32.

    Args:
        page: docs/results.md.
        out: the PNG to write.
    """
    rows = _rows(page, "| job | ours s | MONAI s |")
    names = ["(a) 1 scan", "(b) 20 scans", "(c) CT 512x512x139"]
    bf16, fp32 = rows[:3], rows[3:6]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3), dpi=100)
    for ax, name, b, f in zip(axes, names, bf16, fp32):
        ours, monai = [float(b[1]), float(f[1])], [float(b[2]), float(f[2])]
        x = range(2)
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="ours", color="#3f51b5")
        ax.bar([i + 0.2 for i in x], monai, 0.4, label="MONAI sliding window", color="#bdbdbd")
        ax.set_xticks(list(x), ["bf16 (auto)", "float32"])
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("seconds per job" if name == names[0] else "")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper right", ncol=2)
    fig.suptitle("Whole predict jobs on 2 CPU cores (lower is better)", fontsize=11, x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out)
    plt.close(fig)


def budget_plot(page: str, out: Path) -> None:
    """Held-out mean Dice after 20 CPU-minutes, per fold and seed, ours against the MONAI script.

    Args:
        page: docs/results.md.
        out: the PNG to write.
    """
    rows = _rows(page, "| fold | seed | ours anterior")
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    for fold, marker in (("0", "o"), ("1", "s")):
        mine = [r for r in rows if r[0] == fold]
        seeds = [int(r[1]) for r in mine]
        ax.plot(seeds, [float(r[2].split("/")[-1]) for r in mine], marker, color="#3f51b5", label=f"ours, fold {fold}")
        ax.plot(seeds, [float(r[4].split("/")[-1]) for r in mine], marker, color="#9e9e9e",
                label=f"MONAI script, fold {fold}", fillstyle="none")
    ax.axhline(0.895, color="#e65100", lw=1, ls="--", label="nnU-Net, 1000 GPU epochs (~0.895)")
    ax.set_xticks([0, 1, 2])
    ax.set_xlabel("training seed")
    ax.set_ylabel("held-out mean Dice")
    ax.set_title("Hippocampus, 20 CPU-minutes of training, 42 held-out cases per fold", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    """Write both plots next to the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder for speed.png and budget.png")
    args = parser.parse_args()
    page = (ROOT / "docs" / "results.md").read_text()
    args.out.mkdir(parents=True, exist_ok=True)
    speed_plot(page, args.out / "speed.png")
    budget_plot(page, args.out / "budget.png")
    print(args.out / "speed.png", args.out / "budget.png")


if __name__ == "__main__":
    main()
