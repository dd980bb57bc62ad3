"""N jobs of one command at once against the same N one after the other, repeated: does sharing the host cost?

Each repeat runs the N jobs both ways (which way goes first alternates between repeats, so a machine that warms
up or slows down over the run favours neither) and times the wall clock from the first start to the last end.
It prints, for each way, the min / median / max over the repeats and the ratio of the medians (at once over one
after the other: below 1, running them together saves time; above 1, they fight over the CPUs). Each job's
start-up line (``threads: ...``, pipeline/cpus.py) is printed once, to show what the jobs took.

``{job}`` in the command is replaced by the job's index (0..N-1), so that jobs write to their own folders.
The jobs run at once are told they share the host (``UNET_PIPELINE_JOBS=N``, as docs/scheduling.md says to)
unless ``--no-declare-jobs`` (what a user who does not set it gets: the jobs then find each other in the folder of
live jobs, pipeline/cpus.py). ``--rate REGEX`` also collects a rate each job prints (training's patches/s): summed
over the jobs at once, averaged over the jobs one after the other. Run it on an otherwise idle machine::

    .venv/bin/python scripts/bench_concurrency.py --jobs 2 --repeats 3 -- \\
        unet-pipeline predict --model models:/hippocampus@champion /data/cases --out /tmp/out-{job} --overwrite
    .venv/bin/python scripts/bench_concurrency.py --jobs 2 --repeats 3 \\
        --rate '([0-9.]+) patches/s' -- unet-pipeline run configs/hippocampus.yaml --fold {job} --force \\
        --work-dir /tmp/work --set train.epochs=3 --set train.iterations_per_epoch=40
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _commands(command: list[str], jobs: int) -> list[list[str]]:
    """The command of each job, ``{job}`` replaced by its index."""
    return [[arg.replace("{job}", str(j)) for arg in command] for j in range(jobs)]


def _rate(text: str, pattern: str | None) -> float | None:
    """The last rate a job printed (``pattern``'s first group, e.g. ``([0-9.]+) patches/s``), or ``None``."""
    if pattern is None:
        return None
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def _run(commands: list[list[str]], together: bool, env: dict[str, str], logs: Path,
         rate: str | None = None) -> tuple[float, list[str], list[float | None]]:
    """Run the jobs at once or one after the other; the wall time, each job's start-up thread line and its rate."""
    procs, lines = [], []
    files = [(logs / f"job{j}.out").open("w") for j in range(len(commands))]
    errs = [logs / f"job{j}.err" for j in range(len(commands))]
    start = time.perf_counter()
    try:
        for j, cmd in enumerate(commands):
            with errs[j].open("w") as err:
                proc = subprocess.Popen(cmd, stdout=files[j], stderr=err, env=env)
            procs.append(proc)
            if not together:
                proc.wait()
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - start
    finally:
        for f in files:
            f.close()
    rates: list[float | None] = []
    for j, code in enumerate(codes):
        text = errs[j].read_text()
        if code != 0:
            sys.exit(f"job {j} ({' '.join(commands[j])}) exited {code}:\n{text[-2000:]}")
        lines.append(next((x for x in text.splitlines() if x.startswith("threads: ")), "(no threads line)"))
        rates.append(_rate(text.replace("\r", "\n") + (logs / f"job{j}.out").read_text(), rate))
    return wall, lines, rates


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    """Parse the arguments, run the repeats, print the figures (and write them as JSON with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="jobs of the command (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of both ways (default 3)")
    p.add_argument("--declare-jobs", action=argparse.BooleanOptionalAction, default=True,
                   help="set UNET_PIPELINE_JOBS=N for the jobs run at once (default: yes)")
    p.add_argument("--rate", default=None, metavar="REGEX",
                   help="a rate each job prints, its first group a number (the last one printed counts), e.g. "
                        "'([0-9.]+) patches/s': summed over the jobs at once (the host's throughput), averaged over "
                        "the jobs one after the other (each ran alone)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command ({job}: the job's index)")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.jobs < 1 or args.repeats < 1:
        p.error("give --jobs >= 1, --repeats >= 1 and the command after --")
    commands = _commands(command, args.jobs)
    alone = {k: v for k, v in os.environ.items() if k != "UNET_PIPELINE_JOBS"}
    shared = {**alone, "UNET_PIPELINE_JOBS": str(args.jobs)} if args.declare_jobs else alone
    walls: dict[str, list[float]] = {"at once": [], "one after the other": []}
    rates: dict[str, list[float]] = {"at once": [], "one after the other": []}
    seen: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        for r in range(args.repeats):
            order = [True, False] if r % 2 == 0 else [False, True]
            for together in order:
                name = "at once" if together else "one after the other"
                wall, lines, job_rates = _run(commands, together, shared if together else alone, Path(tmp), args.rate)
                walls[name].append(wall)
                seen.setdefault(name, lines)
                said = ""
                if args.rate is not None:
                    if any(x is None for x in job_rates):
                        sys.exit(f"a job printed no rate matching {args.rate!r} (see its output in {tmp})")
                    host = sum(job_rates) if together else statistics.mean(job_rates)
                    rates[name].append(host)
                    said = f", rate {host:.2f} ({' + '.join(f'{x:.2f}' for x in job_rates)})" if together else \
                        f", rate {host:.2f} (mean of {', '.join(f'{x:.2f}' for x in job_rates)})"
                print(f"repeat {r + 1}/{args.repeats}, {args.jobs} jobs {name}: {wall:.1f} s{said}", flush=True)
    print(f"\n{args.jobs} jobs of: {' '.join(command)}")
    for name, lines in seen.items():
        for line in sorted(set(lines)):
            print(f"  {name}: {line}")
    figures = {name: _stats(v) for name, v in walls.items()}
    for name, s in figures.items():
        print(f"{name:>20}: min {s['min']:.1f} s, median {s['median']:.1f} s, max {s['max']:.1f} s "
              f"({len(walls[name])} repeats)")
    ratio = figures["at once"]["median"] / figures["one after the other"]["median"]
    print(f"{'ratio':>20}: {ratio:.2f} (median at once / median one after the other; below 1: together is faster)")
    rate_figures = {name: _stats(v) for name, v in rates.items() if v}
    for name, s in rate_figures.items():
        how = "summed over the jobs" if name == "at once" else "mean over the jobs, each alone"
        print(f"{'rate, ' + name:>20}: min {s['min']:.2f}, median {s['median']:.2f}, max {s['max']:.2f} ({how})")
    if args.json:
        args.json.write_text(json.dumps({"jobs": args.jobs, "command": command, "declare_jobs": args.declare_jobs,
                                         "walls_s": walls, "figures": figures, "ratio_of_medians": ratio,
                                         "rates": rates, "rate_figures": rate_figures, "thread_lines": seen},
                                        indent=1))


if __name__ == "__main__":
    main()
