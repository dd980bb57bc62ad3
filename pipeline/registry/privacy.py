"""What may leave the work directory: case pseudonyms and path-free configurations.

Patient names can sit in folder and file names, so case ids (taken from file names)
and dataset paths never go to MLflow params, tags, artifact names or artifact
contents. Instead:

* a case is named by a pseudonym ``case-<10 hex>``, an HMAC of its id under a random
  key kept in the work directory (``.case-key``, mode 0600): stable across the calls
  of one work directory (the gate table and the QC pictures of two runs line up),
  meaningless elsewhere, and not reversible by guessing names without the key. The
  work directory's own ``evaluation/cases.csv`` keeps the real ids next to them;
* a dataset is named by its ``dataset.json`` name and content hash, not its path.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

KEY_FILE = ".case-key"


class CaseAliases:
    """Pseudonyms of case ids, keyed per work directory.

    Args:
        work_dir: the work directory holding (or getting) the key.
    """

    def __init__(self, work_dir: Path) -> None:
        path = work_dir / KEY_FILE
        if not path.is_file():
            work_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.with_name(f"{KEY_FILE}.{os.getpid()}.tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            # Two calls racing to create it: the first rename wins and both read that one.
            try:
                os.link(path.with_name(f"{KEY_FILE}.{os.getpid()}.tmp"), path)
            except FileExistsError:
                pass
            path.with_name(f"{KEY_FILE}.{os.getpid()}.tmp").unlink(missing_ok=True)
        self._key = path.read_text().strip().encode()

    def __call__(self, case_id: str) -> str:
        """The pseudonym of ``case_id``.

        Args:
            case_id: the case's id (from its file name).
        """
        return "case-" + hmac.new(self._key, case_id.encode(), hashlib.sha256).hexdigest()[:10]

    def rows(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` with their ``case`` column replaced by pseudonyms.

        Args:
            rows: mappings with a ``case`` key.
        """
        return [{**r, "case": self(str(r["case"]))} for r in rows]

    def splits(self, folds: Sequence[Mapping[str, Sequence[str]]]) -> list[dict[str, list[str]]]:
        """Cross-validation folds with pseudonyms instead of case ids.

        Args:
            folds: ``[{"train": [...], "val": [...]}, ...]``.
        """
        return [{part: sorted(self(c) for c in ids) for part, ids in fold.items()} for fold in folds]


def dataset_label(name: str, data_hash: str) -> str:
    """How a dataset is named outside the work directory: its name and content hash, never its path.

    Args:
        name: the ``dataset.json`` name.
        data_hash: the content hash.
    """
    return f"{name} (sha256 {data_hash[:16]})"


def holdout_label(case_list: str | None) -> str | None:
    """How a run names its held-out cases (``data.holdout``) instead of their file's path: count and content hash.

    Args:
        case_list: the case-list file, or ``None`` (no held-out cases).
    """
    if case_list is None:
        return None
    from pipeline.data import read_case_list

    ids = sorted(set(read_case_list(case_list)))
    return f"{len(ids)} held-out cases (sha256 {hashlib.sha256(chr(10).join(ids).encode()).hexdigest()[:16]})"


def redact_config(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """A configuration without paths that may carry names (``data.dataset``, ``registry.evaluation_set``).

    Args:
        config: the resolved configuration (nested sections).
        dataset: what to write instead of the dataset path (see :func:`dataset_label`).
    """
    out = {section: dict(values) if isinstance(values, Mapping) else values for section, values in config.items()}
    if isinstance(out.get("data"), dict) and out["data"].get("dataset") is not None:
        out["data"]["dataset"] = dataset
    if isinstance(out.get("data"), dict) and out["data"].get("holdout") is not None:
        out["data"]["holdout"] = holdout_label(out["data"]["holdout"])
    if isinstance(out.get("registry"), dict) and out["registry"].get("evaluation_set") is not None:
        out["registry"]["evaluation_set"] = "a fixed evaluation set (path not logged)"
    return out


def run_params(flat_config: Mapping[str, Any], dataset_name: str, data_hash: str, has_evaluation_set: bool,
               counts: Mapping[str, int], network_plan: Mapping[str, Any], world_size: int) -> dict[str, Any]:
    """MLflow params: the config without paths (the dataset by name and content hash), split and plan sizes.

    Args:
        flat_config: the configuration, flattened to ``section.key``.
        dataset_name: the ``dataset.json`` name.
        data_hash: the dataset's content hash.
        has_evaluation_set: whether ``registry.evaluation_set`` names a fixed set (its path is not logged).
        counts: ``num_cases``, ``num_train``, ``num_val``.
        network_plan: the plan's ``network`` section.
        world_size: DDP processes.
    """
    params = {k: v for k, v in flat_config.items() if k not in ("data.dataset", "registry.evaluation_set")}
    params["data.holdout"] = holdout_label(params.get("data.holdout"))
    return {**params, "data.dataset": dataset_label(dataset_name, data_hash),
            "registry.evaluation_set": "fixed" if has_evaluation_set else "validation fold",
            **{f"data.{k}": v for k, v in counts.items()}, "ddp.world_size": world_size,
            **{f"plan.{k}": v for k, v in network_plan.items()}}
