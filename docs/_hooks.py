"""MkDocs hooks of the peft_gates site.

``benchmarks.md`` is written by the benchmark runs (another part of the project); until it exists, a
generated placeholder page keeps the nav entry and the links to it valid, so ``mkdocs build --strict``
passes without weakening link validation for every other page.
"""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

PLACEHOLDER = """# Benchmarks

The measured accuracy, training cost and inference speed of `peft_gates` are written to this page by the
benchmark scripts in `benchmarks/` (`python -m benchmarks.accuracy`, `python -m benchmarks.train_cost`,
`python -m benchmarks.inference`). This build has no measurements yet.
"""


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    if files.get_file_from_path("benchmarks.md") is None:
        files.append(File.generated(config, "benchmarks.md", content=PLACEHOLDER))
    return files
