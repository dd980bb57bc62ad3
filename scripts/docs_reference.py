"""The config and CLI references of the docs site, generated from the code (a MkDocs hook; the tests call it too).

The config reference reads every section dataclass of ``pipeline/config/schema.py``: each field's key, its type (named as
the config validator names it in its errors) and default, and its one-line meaning from the ``Attributes:`` section
of the class docstring (Google style, one ``name: meaning`` entry per key). The CLI reference walks the argparse
parser of ``pipeline/cli/args.py`` (``build_parser``). A key without an ``Attributes:`` entry, or a sub-command, flag or
argument without help, raises :class:`UndocumentedError` naming it, so ``mkdocs build`` fails.

Pages ask for a reference with a marker line: ``<!-- reference: config -->`` or ``<!-- reference: cli -->``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from typing import Any

MARKER = re.compile(r"^<!-- reference: (\w+) -->$", re.MULTILINE)
_ENTRY = re.compile(r"^(\s*)(\w+)\s*(?:\([^)]*\))?:\s*(.*)$")


class UndocumentedError(Exception):
    """A config key, sub-command or flag has no documentation; the message names it."""


def attributes_section(doc: str | None) -> dict[str, str]:
    """The ``name: meaning`` entries of a Google-style ``Attributes:`` section; continuation lines are joined.

    Args:
        doc: a docstring (``inspect.cleandoc`` is applied).
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    entries: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return entries
    base = len(lines[start]) - len(lines[start].lstrip())
    entry_indent, current = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base:
            break  # the next section (or prose) starts
        match = _ENTRY.match(line)
        if match and (entry_indent is None or indent == entry_indent):
            entry_indent, current = indent, match.group(2)
            entries[current] = match.group(3).strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_rows() -> list[dict[str, str]]:
    """One row per config key: ``key``, ``type``, ``default``, ``meaning``; raises UndocumentedError for a key without one."""
    from pipeline import config

    rows, missing = [], []
    for section, cls in config._sections().items():
        hints = typing.get_type_hints(cls)
        documented = attributes_section(cls.__doc__)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            meaning = documented.get(f.name, "")
            if not meaning:
                missing.append(f"{section}.{f.name}")
            rows.append({"key": f"{section}.{f.name}", "type": config._type_name(hints[f.name]),
                         "default": _yaml_value(_default(f)), "meaning": meaning})
    if missing:
        raise UndocumentedError(
            f"config key(s) without an 'Attributes:' entry in their class docstring (pipeline/config/schema.py): "
            f"{', '.join(missing)}")
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_markdown() -> str:
    """The config reference: one table per section, from pipeline/config/schema.py."""
    from pipeline import config

    out = []
    rows = config_rows()
    for section, cls in config._sections().items():
        intro = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        out += [f"## `{section}`", "", intro, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| `{r['key']}` | {_cell(r['type'])} | `{_cell(r['default'])}` | {_cell(r['meaning'])} |"
                for r in rows if r["key"].split(".")[0] == section]
        out.append("")
    return "\n".join(out)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str | None, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-command of ``parser``."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            found += [(name, helps.get(name), sub) for name, sub in action.choices.items()]
    return found


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    value = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper())
    return f"{names} {value}"


def cli_commands(parser: argparse.ArgumentParser | None = None, prefix: str = "unet-pipeline") -> list[dict[str, Any]]:
    """Every command with its help and arguments, depth first; raises UndocumentedError for anything without help.

    Args:
        parser: the parser to walk (default: ``pipeline.cli.build_parser()``).
        prefix: the command line that leads to ``parser``.
    """
    if parser is None:
        from pipeline.cli import build_parser

        parser = build_parser()
    commands, missing = [], []
    for name, text, sub in _subcommands(parser):
        path = f"{prefix} {name}"
        if not (text or "").strip():
            missing.append(f"command '{path}'")
        args = []
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"'{_flag(action)}' of '{path}'")
            default = action.default if action.default not in (None, False, [], argparse.SUPPRESS) else None
            args.append({"flag": _flag(action), "help": action.help or "", "required": bool(action.required),
                         "default": default})
        commands.append({"command": path, "help": text or "", "arguments": args})
        try:
            commands += cli_commands(sub, path)
        except UndocumentedError as exc:
            missing.append(str(exc).split(": ", 1)[1])
    if missing:
        raise UndocumentedError(f"CLI without help text (pipeline/cli/args.py): {'; '.join(missing)}")
    return commands


def cli_markdown() -> str:
    """The CLI reference: one section per command, a table of its arguments."""
    out = []
    for c in cli_commands():
        out += [f"## `{c['command']}`", "", c["help"][0].upper() + c["help"][1:] + ".", ""]
        if not c["arguments"]:
            out += ["Sub-commands only (below).", ""]
            continue
        out += ["| argument | meaning | default |", "| --- | --- | --- |"]
        for a in c["arguments"]:
            default = "required" if a["required"] else ("" if a["default"] is None else f"`{a['default']}`")
            out.append(f"| `{_cell(a['flag'])}` | {_cell(a['help'])} | {default} |")
        out.append("")
    return "\n".join(out)


GENERATORS = {"config": config_markdown, "cli": cli_markdown}


def expand(markdown: str) -> str:
    """Replace each ``<!-- reference: NAME -->`` marker line with the generated reference.

    Args:
        markdown: a page's Markdown.
    """
    def generate(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise UndocumentedError(f"unknown reference '{name}' (known: {', '.join(GENERATORS)})")
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: expand reference markers; an undocumented key or flag fails the build.

    Args:
        markdown: the page's Markdown.
        page: the MkDocs page.
        config: the MkDocs config.
        files: the site's files.
    """
    from mkdocs.exceptions import PluginError

    try:
        return expand(markdown)
    except UndocumentedError as exc:
        raise PluginError(f"{page.file.src_path}: {exc}") from None
