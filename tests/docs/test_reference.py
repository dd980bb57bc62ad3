"""The config and CLI references are generated from the code, and anything undocumented fails the build."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import typing
from pathlib import Path

import pytest

from pipeline import cli, config
from tests.conftest import REPO
from tests.docs.conftest import build_site, docs_reference

ref = docs_reference()


def _all_keys() -> dict[str, dataclasses.Field]:
    return {f"{section}.{f.name}": f for section, cls in config._sections().items() for f in dataclasses.fields(cls)}


def test_every_config_key_has_its_type_default_and_meaning() -> None:
    rows = {r["key"]: r for r in ref.config_rows()}
    assert set(rows) == set(_all_keys())
    defaults = config.PipelineConfig().to_dict()
    for key, row in rows.items():
        section, name = key.split(".")
        assert row["meaning"] and "\n" not in row["meaning"], key
        assert row["default"] == ref._yaml_value(defaults[section][name]), key
        # the same words the validator uses when it refuses a value of the wrong type
        assert row["type"] == config._type_name(typing.get_type_hints(config._sections()[section])[name]), key
    assert rows["train.optimizer"]["type"] == "'sgd' or 'adamw'"
    assert rows["qc.flag_quantile"]["default"] == "0.19"


def test_the_config_page_lists_every_key(site: Path) -> None:
    html = (site / "reference" / "config" / "index.html").read_text()
    missing = [key for key in _all_keys() if f"<code>{key}</code>" not in html]
    assert not missing, f"keys missing from the built config reference: {missing}"


def test_a_key_without_documentation_fails_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = config.TrainConfig.__doc__
    entry = next(line for line in doc.splitlines() if line.strip().startswith("ema_decay:"))
    monkeypatch.setattr(config.TrainConfig, "__doc__", doc.replace(entry + "\n", ""))
    with pytest.raises(ref.UndocumentedError, match=r"train\.ema_decay"):
        ref.config_rows()


def test_the_build_fails_on_an_undocumented_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The real build (in-process, so that the edited docstring is what the hook reads) refuses the site."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import MkDocsException

    doc = config.PacsConfig.__doc__
    monkeypatch.setattr(config.PacsConfig, "__doc__", doc.replace("Attributes:", "Fields:"))
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    monkeypatch.chdir(REPO)
    with pytest.raises(MkDocsException):
        build(load_config(str(REPO / "mkdocs.yml"), site_dir=str(tmp_path / "site")))
    assert "config key(s) without an 'Attributes:' entry" in caplog.text and "pacs.url" in caplog.text
    assert not (tmp_path / "site" / "reference" / "config" / "index.html").exists()


_BUILD_PARSER = cli.build_parser


def _parser_with(extra: str) -> argparse.ArgumentParser:
    parser = _BUILD_PARSER()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if extra == "flag":
        sub.choices["predict"].add_argument("--undocumented-flag", type=int)
    else:
        sub.add_parser("undocumented-command")
    return parser


@pytest.mark.parametrize(("extra", "named"), [("flag", "--undocumented-flag"), ("command", "undocumented-command")])
def test_a_flag_or_command_without_help_fails_the_reference(monkeypatch: pytest.MonkeyPatch, extra: str,
                                                            named: str) -> None:
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(extra))
    with pytest.raises(ref.UndocumentedError, match=named):
        ref.cli_markdown()


def test_every_command_and_flag_is_in_the_cli_page(site: Path) -> None:
    html = (site / "reference" / "cli" / "index.html").read_text()
    commands = ref.cli_commands()
    names = {c["command"] for c in commands}
    assert {"unet-pipeline run", "unet-pipeline predict", "unet-pipeline pacs watch"} <= names

    def flags(parser: argparse.ArgumentParser) -> set[str]:
        found = {s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for p in a.choices.values():
                    found |= flags(p)
        return found

    missing = [flag for flag in flags(cli.build_parser()) if flag not in html]
    assert not missing, f"flags missing from the built CLI reference: {missing}"
    for name in names:
        assert f"<code>{name}</code>" in html, name


def test_attributes_entries_join_continuation_lines_and_stop_at_the_next_section() -> None:
    doc = """Summary.

    Attributes:
        alpha: first line
            and its continuation.
        beta (int): second.

    Note:
        gamma: not an attribute.
    """
    assert ref.attributes_section(doc) == {"alpha": "first line and its continuation.", "beta": "second."}


@pytest.mark.parametrize("breakage", ["broken link", "orphan page", "broken anchor"])
def test_the_build_fails_on_a_broken_link_or_a_page_outside_the_nav(tmp_path: Path, breakage: str) -> None:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "docs", root / "docs", ignore=shutil.ignore_patterns("results"))
    (root / "docs" / "results").mkdir()
    for f in (REPO / "docs" / "results").rglob("*.json"):  # the results page links these
        (root / "docs" / "results" / f.relative_to(REPO / "docs" / "results")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / "docs" / "results" / f.relative_to(REPO / "docs" / "results"))
    (root / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "docs_reference.py", root / "scripts")
    shutil.copy(REPO / "mkdocs.yml", root)
    assert build_site(tmp_path / "ok", root / "mkdocs.yml").returncode == 0  # the copy itself builds
    page = root / "docs" / "troubleshooting.md"
    if breakage == "broken link":
        page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    elif breakage == "orphan page":
        (root / "docs" / "orphan.md").write_text("# A page nobody links from the nav\n")
    else:
        page.write_text(page.read_text() + "\nSee [exit codes](scheduling.md#no-such-heading).\n")
    result = build_site(tmp_path / "broken", root / "mkdocs.yml")
    assert result.returncode != 0, f"the build passed with a {breakage}"
    assert {"broken link": "no-such-page.md", "orphan page": "orphan.md",
            "broken anchor": "no-such-heading"}[breakage] in result.stderr
