"""Pulling a DICOM dataset from a PACS: instances/s and cases/s from a local Orthanc, cold and warm.

Makes N hippocampus studies (an MR series of 24-47 slices and a SEG or RTSTRUCT each, from the shared MSD
cases, repeated with new UIDs past 208), stores them in a fresh local Orthanc, then runs what
``unet-pipeline dataset check URL`` runs: cold (empty cache: every instance retrieved, every case
converted) and warm (nothing new: nothing retrieved, nothing converted), and the cold pull once more
with one request at a time, the way a series-by-series client retrieves, for the ratio.

    python scripts/bench_dataset.py --studies 260
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data import dicom_source  # noqa: E402
from pipeline.data.dicom_dataset import scan_instances  # noqa: E402
from pipeline.data.dicom_index import index_files  # noqa: E402
from pipeline.data.dicom_labels import ClassMatcher  # noqa: E402


def _maker():
    spec = importlib.util.spec_from_file_location("make_dicom_dataset", REPO / "scripts" / "make_dicom_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pull_and_scan(url: str, work: Path, classes: list[str], workers: int) -> dict[str, float]:
    old = dicom_source.MAX_WORKERS
    dicom_source.MAX_WORKERS = workers
    try:
        t0 = time.perf_counter()
        files, stats = dicom_source.pull(url, work / "instances")
        t1 = time.perf_counter()
        scan, converted = scan_instances(index_files(files, work / "index.json"), ClassMatcher(tuple(classes)), work)
        t2 = time.perf_counter()
    finally:
        dicom_source.MAX_WORKERS = old
    return {"listed": stats.listed, "retrieved": stats.retrieved, "pull_s": t1 - t0, "scan_s": t2 - t1,
            "total_s": t2 - t0, "cases": len(scan.cases), "skipped": len(scan.skipped), "converted": converted}


def main() -> None:
    """Make, store, pull cold, warm and sequentially; print the table and write ``--json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus", help="MSD folder")
    p.add_argument("--studies", type=int, default=260, help="studies to make and pull")
    p.add_argument("--rtstruct-every", type=int, default=5, help="every Nth study gets an RTSTRUCT instead of a SEG")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    from tests.orthanc import start_orthanc  # the suite's Orthanc starter: a fresh server on free local ports

    maker = _maker()
    meta = json.loads((args.data / "dataset.json").read_text())
    classes = [n for v, n in sorted((int(k), v) for k, v in meta["labels"].items()) if v != 0]
    root = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    server = start_orthanc(root / "orthanc")
    try:
        t0 = time.perf_counter()
        entries = meta["training"]
        for n in range(args.studies):
            e = entries[n % len(entries)]
            kind = "RTSTRUCT" if n % args.rtstruct_every == args.rtstruct_every - 1 else "SEG"
            maker.make_study(args.data / e["image"], args.data / e["label"], root / "dicom", classes, n, kind)
        files = sorted((root / "dicom").rglob("*.dcm"))
        made_s = time.perf_counter() - t0
        server.upload(files)
        print(f"{args.studies} studies, {len(files)} instances: made in {made_s:.0f} s, stored in Orthanc in "
              f"{time.perf_counter() - t0 - made_s:.0f} s")
        import os

        os.environ.update(server.env())
        rows = {"cold": _pull_and_scan(server.url, root / "cache", classes, dicom_source.MAX_WORKERS),
                "warm": _pull_and_scan(server.url, root / "cache", classes, dicom_source.MAX_WORKERS),
                "cold, 1 request at a time": _pull_and_scan(server.url, root / "cache1", classes, 1)}
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'':<28}{'retrieved':>10}{'pull s':>9}{'instances/s':>13}{'scan s':>9}{'cases':>7}{'cases/s':>9}")
    for name, r in rows.items():
        print(f"{name:<28}{r['retrieved']:>10}{r['pull_s']:>9.1f}{r['listed'] / r['pull_s']:>13.1f}"
              f"{r['scan_s']:>9.1f}{r['cases']:>7}{r['cases'] / r['total_s']:>9.2f}")
    cold, seq = rows["cold"], rows["cold, 1 request at a time"]
    print(f"concurrent pull ({dicom_source.MAX_WORKERS} requests) vs one at a time: "
          f"{seq['pull_s'] / cold['pull_s']:.2f}x; warm vs cold, whole check: {cold['total_s'] / rows['warm']['total_s']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
