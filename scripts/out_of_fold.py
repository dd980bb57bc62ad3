"""The out-of-fold quality runs, as a queue that any number of sessions (or nightly jobs) can advance.

The estimate's deciding evidence (docs/quality.md) is every fold of every task under two split seeds,
and for the members' agreement a second training seed of each: 30 to 60 runs of 20 minutes, more than
one sitting on a CPU. Each run gets its own work directory,
``ROOT/TASK/split{S}/seed{T}/fold{F}``, so no run gates against another's champion, and a run counts as
done once its ``evaluation/fold_{F}/quality_records.json`` exists. ``--max-runs N`` trains the next
``N`` missing runs in order (all folds of a split before the next split; the training seeds of a fold
one after the other) and stops; without it the plan is printed and nothing runs.

``--assemble`` gathers what is done, per task and split, into what ``scripts/quality_estimate.py``
reads: ``ROOT/TASK/split{S}/single/fold_{F}/quality_records.json`` (training seed 0's records), and,
where a fold has two or more training seeds done, ``members/fold_{F}`` (``scripts/member_agreement.py``:
the seeds' mean pairwise Dice, every member trained without the fold's cases). Then::

    python scripts/quality_estimate.py ROOT/TASK/split0/single ROOT/TASK/split1/single
    python scripts/quality_estimate.py ROOT/TASK/split0/members ROOT/TASK/split1/members

The folds assembled so far are listed; a split with fewer than all its folds is cross-fitted over
the folds it has (a single fold: leave one out).

Usage::

    python scripts/out_of_fold.py --root unet-work/oof                      # the plan
    python scripts/out_of_fold.py --root unet-work/oof --max-runs 4         # the next four runs
    python scripts/out_of_fold.py --root unet-work/oof --train-seeds 0 1 --max-runs 4
    python scripts/out_of_fold.py --root unet-work/oof --assemble
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("hippocampus", "hn_ct", "left_atrium")
RECORDS = "quality_records.json"


@dataclass(frozen=True)
class Run:
    """One training run of the queue.

    Attributes:
        task: the config's name in ``configs/``.
        split_seed: ``data.split_seed``.
        train_seed: ``train.seed``.
        fold: ``data.fold``.
    """

    task: str
    split_seed: int
    train_seed: int
    fold: int

    def work_dir(self, root: Path) -> Path:
        """The run's own work directory under ``root``."""
        return root / self.task / f"split{self.split_seed}" / f"seed{self.train_seed}" / f"fold{self.fold}"

    def evaluation(self, root: Path) -> Path:
        """The run's evaluation folder (its records and masks)."""
        return self.work_dir(root) / "evaluation" / f"fold_{self.fold}"

    def done(self, root: Path) -> bool:
        """Whether the run finished: its evaluation wrote the per-case records."""
        return (self.evaluation(root) / RECORDS).is_file()

    def command(self, root: Path, minutes: float, executable: str) -> list[str]:
        """The ``unet-pipeline run`` command line of this run."""
        return [executable, "run", str(ROOT / "configs" / f"{self.task}.yaml"),
                "--set", f"train.time_budget_minutes={minutes:g}", "--set", f"data.split_seed={self.split_seed}",
                "--set", f"data.fold={self.fold}", "--set", f"train.seed={self.train_seed}",
                "--work-dir", str(self.work_dir(root))]


def queue(tasks: Sequence[str], split_seeds: Sequence[int], train_seeds: Sequence[int], folds: int) -> list[Run]:
    """Every run, in the order they are trained: by task, split seed, fold, then training seed.

    Args:
        tasks: config names.
        split_seeds: ``data.split_seed`` values.
        train_seeds: ``train.seed`` values (two or more give the members' agreement).
        folds: folds per split.
    """
    return [Run(t, s, k, f) for t in tasks for s in split_seeds for f in range(folds) for k in train_seeds]


def _link_preprocessed(run: Run, root: Path) -> None:
    """Hard-link the cases another run of the task already preprocessed (the plan checks they still fit)."""
    target = run.work_dir(root) / "preprocessed"
    if target.exists():
        return
    for other in sorted((root / run.task).glob("split*/seed*/fold*/preprocessed")):
        if any(other.iterdir()):
            shutil.copytree(other, target, copy_function=os.link)
            return


def assemble(root: Path, runs: Sequence[Run]) -> list[str]:
    """Gather the finished runs into ``single/`` and ``members/`` folders per task and split; say what is there.

    Args:
        root: the queue's root.
        runs: the queue (only the finished runs are used).
    """
    lines = []
    shipped_seed = min(r.train_seed for r in runs)  # the model that would ship; the other seeds only disagree
    for task, split in sorted({(r.task, r.split_seed) for r in runs}):
        base = root / task / f"split{split}"
        mine = [r for r in runs if (r.task, r.split_seed) == (task, split) and r.done(root)]
        single, members = [], []
        for fold in sorted({r.fold for r in mine}):
            done = [r for r in mine if r.fold == fold]
            first = next((r for r in done if r.train_seed == shipped_seed), None)
            if first is not None:
                out = base / "single" / f"fold_{fold}"
                out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(first.evaluation(root) / RECORDS, out / RECORDS)
                single.append(fold)
            if first is not None and len(done) >= 2:
                others = [r for r in done if r is not first]
                cmd = [sys.executable, str(ROOT / "scripts" / "member_agreement.py"),
                       *(str(r.evaluation(root)) for r in (first, *others)),
                       "--out", str(base / "members" / f"fold_{fold}")]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    lines.append(f"{task} split {split} fold {fold}: members not assembled: "
                                 f"{(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
                    continue
                members.append(fold)
        lines.append(f"{task} split {split}: single folds {single or 'none'} -> {base / 'single'}; "
                     f"members folds {members or 'none'} -> {base / 'members'}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan, train the next runs, or assemble the finished ones."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="where every run's work directory goes")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="default: all three")
    parser.add_argument("--split-seeds", nargs="+", type=int, default=[0, 1], help="default: 0 1")
    parser.add_argument("--train-seeds", nargs="+", type=int, default=[0],
                        help="default: 0; two or more train the members (0 1: every fold twice)")
    parser.add_argument("--folds", type=int, default=5, help="folds per split (default 5, the configs' num_folds)")
    parser.add_argument("--minutes", type=float, default=20.0, help="train.time_budget_minutes (default 20)")
    parser.add_argument("--max-runs", type=int, default=0, help="train at most this many missing runs (default 0)")
    parser.add_argument("--assemble", action="store_true", help="gather the finished runs for quality_estimate.py")
    args = parser.parse_args(argv)

    root = args.root.resolve()
    runs = queue(args.tasks, args.split_seeds, args.train_seeds, args.folds)
    missing = [r for r in runs if not r.done(root)]
    print(f"{len(runs) - len(missing)} of {len(runs)} runs done under {root}; {len(missing)} to go "
          f"(about {len(missing) * (args.minutes + 3) / 60:.1f} h at {args.minutes:g} training minutes each)")
    executable = str(Path(sys.executable).with_name("unet-pipeline"))
    for run in missing[: args.max_runs]:
        run.work_dir(root).mkdir(parents=True, exist_ok=True)
        _link_preprocessed(run, root)
        cmd = run.command(root, args.minutes, executable)
        print("running:", " ".join(cmd), flush=True)
        with (run.work_dir(root) / "run.log").open("w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0 or not run.done(root):
            print(f"{run.work_dir(root)}: run failed (exit {code}); see its run.log", file=sys.stderr)
            return 1
    if not args.max_runs and not args.assemble:
        for run in missing[:10]:
            print("next:", " ".join(run.command(root, args.minutes, executable)))
    if args.assemble:
        print("\n".join(assemble(root, runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
