"""The pipeline against an ``mlflow server`` whose store is a real PostgreSQL (the lab set-up in the README).

One short ``unet-pipeline run`` on the embedded demo data logs its run and metrics and registers a champion
through the server; ``predict --model models:/NAME@champion`` uses it; and the rows are in PostgreSQL, read
back with psycopg2, not in a SQLite file anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.conftest import TINY, run_main
from tests.postgres import PostgresCluster, PostgresMlflowServer

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.postgres"]  # the session's fixtures postgres and postgres_mlflow_server

MODEL = "postgres-unet"
EXPERIMENT = "postgres-store"
EPOCHS = 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, as a lab member runs it."""
    command = [str(Path(sys.executable).with_name("unet-pipeline")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(postgres_mlflow_server: PostgresMlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short run on the demo data, tracked and registered through the PostgreSQL-backed server."""
    from pipeline.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("postgres-run")
    dataset = make_demo_dataset(root / "demo", 8, [32, 32, 32], seed=3)
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"dataset": str(dataset), "num_folds": 4}
    cfg["train"].update({"epochs": EPOCHS, "val_every": 1})
    cfg["mlflow"] = {"experiment": EXPERIMENT, "model_name": MODEL, "tracking_uri": postgres_mlflow_server.uri}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = root / "work"
    res = _cli("run", str(config), "--work-dir", str(work))
    assert res.returncode == 0, res.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=postgres_mlflow_server.uri, registry_uri=postgres_mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 1
    return {"root": root, "work": work, "dataset": dataset.parent, "run_id": runs[0].info.run_id}


def _rows(postgres: PostgresCluster, sql: str, *params: object) -> list[tuple]:
    # closing(): a psycopg2 connection's own ``with`` ends the transaction but leaves the connection open.
    with closing(postgres.connect()) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def test_the_run_its_metrics_and_the_champion_are_rows_in_postgresql(trained: dict, postgres: PostgresCluster) -> None:
    run_id = trained["run_id"]
    runs = _rows(postgres, "SELECT r.status, e.name FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
                           "WHERE r.run_uuid = %s", run_id)
    assert runs == [("FINISHED", EXPERIMENT)]
    # Every epoch's loss and validation Dice, once each: nothing lost or doubled on the way to the database.
    for key in ("train_loss", "val_dice"):
        steps = _rows(postgres, "SELECT step FROM metrics WHERE run_uuid = %s AND key = %s ORDER BY step", run_id, key)
        assert [s for (s,) in steps] == list(range(1, EPOCHS + 1)), key
    assert _rows(postgres, "SELECT count(*) FROM latest_metrics WHERE run_uuid = %s AND key = 'val_mean_dice'",
                 run_id) == [(1,)]
    params = dict(_rows(postgres, "SELECT key, value FROM params WHERE run_uuid = %s", run_id))
    assert params and not any(str(trained["dataset"]) in v for v in params.values())
    versions = _rows(postgres, "SELECT version, run_id, status FROM model_versions WHERE name = %s", MODEL)
    assert versions == [(1, run_id, "READY")]
    aliases = dict(_rows(postgres, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", MODEL))
    assert aliases.get("champion") == 1
    # The work directory holds no store of its own: the server and its database have it all.
    assert not list(trained["work"].rglob("*.db"))


def test_the_mlflow_client_reads_the_same_through_the_server(trained: dict,
                                                            postgres_mlflow_server: PostgresMlflowServer) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=postgres_mlflow_server.uri, registry_uri=postgres_mlflow_server.uri)
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED" and "val_mean_dice" in run.data.metrics
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert (champion.version, champion.run_id) == ("1", trained["run_id"])
    assert champion.tags["gate.decision"] == "promoted: there was no champion"
    # Artifacts went through the server (mlflow-artifacts:/), into its --artifacts-destination.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert any((postgres_mlflow_server.root / "artifacts").rglob("MLmodel"))
    assert not list(postgres_mlflow_server.root.rglob("*.db"))  # the server keeps no SQLite store beside it


def test_predict_uses_the_champion_from_the_postgresql_backed_registry(trained: dict, tmp_path: Path,
                                                                       postgres_mlflow_server: PostgresMlflowServer,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    scan = sorted((trained["dataset"] / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "pred"
    # A colleague's shell: only the server's address, a fresh work directory (no local store to fall back on).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_mlflow_server.uri)
    res = run_main("predict", "--model", f"models:/{MODEL}@champion", str(scan), "--out", str(out),
                   "--work-dir", str(tmp_path / "work"))
    assert res.returncode == 0, res.stderr[-3000:]
    mask = nib.load(out / scan.name)
    assert mask.shape == nib.load(scan).shape
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    record = json.loads((out / scan.name.replace(".nii.gz", ".json")).read_text())
    assert set(record["labels"]) == {"dim sphere", "bright sphere"}
