"""Command line: ``unet-pipeline run|ensemble|preprocess|train|evaluate|predict|pacs|worklist|dataset|cache``.

It parses (:mod:`pipeline.cli.args`: every subcommand and flag, from which the docs' CLI reference is
generated) and calls (:mod:`pipeline.cli.commands`: start-up, dispatch to :mod:`pipeline.stages`, one-line errors
with their exit codes). Nothing here imports torch at module level: the threads and the OpenMP wait policy are
sized before it loads.
"""

from pipeline.cli.args import DEFAULT_WORK_DIR, _overrides, build_parser
from pipeline.cli.commands import main

__all__ = ["DEFAULT_WORK_DIR", "_overrides", "build_parser", "main"]
