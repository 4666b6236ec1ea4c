"""The documentation is true of the code: the quickstart runs, the site builds strictly, quoted errors exist.

* The quickstart's Python blocks (sections of examples/quickstart.py, included with pymdownx.snippets) are
  concatenated as a reader would paste them and executed, with the one block that loads SmolLM2 and the
  movie data swapped for a tiny random model; the result must be a reloadable pruned model on disk.
* ``mkdocs build --strict`` (broken links, anchors, nav entries, API references and docstring problems are
  errors). Skipped when the ``docs`` extra is not installed.
* Every Python block of every page compiles; the error messages quoted on the troubleshooting page occur in
  the source; every ``peft-gates`` option named in the CLI guide exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SNIPPET = re.compile(r'^(?P<indent>[ \t]*)--8<-- "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"[ \t]*$', re.M)
MARKER = re.compile(r"^\s*# --8<-- \[(start|end):[\w-]+\]\s*$")
FENCE = re.compile(r"^```python[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)  # unindented fences only
LOAD_BLOCK_MARK = "assets.load_smollm2()"


def expand_snippets(text: str) -> str:
    """The subset of pymdownx.snippets the docs use: whole files and named sections, dedented."""

    def include(match: re.Match[str]) -> str:
        lines = (ROOT / match["path"]).read_text().splitlines()
        if match["section"]:
            start = lines.index(next(x for x in lines if x.strip() == f"# --8<-- [start:{match['section']}]"))
            end = lines.index(next(x for x in lines if x.strip() == f"# --8<-- [end:{match['section']}]"))
            lines = lines[start + 1 : end]
        body = textwrap.dedent("\n".join(x for x in lines if not MARKER.match(x)))
        return textwrap.indent(body, match["indent"])

    return SNIPPET.sub(include, text)


def python_blocks(page: Path) -> list[str]:
    return [m["code"] for m in FENCE.finditer(expand_snippets(page.read_text()))]


# --------------------------------------------------------------------------------------------- quickstart


def test_quickstart_blocks_are_the_example_sections():
    blocks = python_blocks(DOCS / "quickstart.md")
    assert len(blocks) >= 5
    assert sum(LOAD_BLOCK_MARK in block for block in blocks) == 1
    example = (ROOT / "examples" / "quickstart.py").read_text()
    for block in blocks:
        for line in block.strip().splitlines():
            assert line.strip() in example, line


@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="the quickstart uses TRL: pip install trl"
)
def test_quickstart_verbatim_gives_a_pruned_model(tmp_path, monkeypatch, capsys):
    """Paste the quickstart's blocks in order; only the model and data are tiny stand-ins."""
    stand_in = (
        "import _smoke\n"
        "model, tokenizer, train_dataset, max_steps = _smoke.quickstart_setup()\n"
        "max_steps = 2\n"
    )
    code = "\n".join(
        stand_in if LOAD_BLOCK_MARK in block else block for block in python_blocks(DOCS / "quickstart.md")
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, str(DOCS / "quickstart.md"), "exec"), {"__name__": "quickstart"})
    finally:
        torch.set_num_threads(threads)
    assert "parameters after pruning" in capsys.readouterr().out
    config = json.loads((tmp_path / "gates-quickstart" / "pruned" / "config.json").read_text())
    assert config["model_type"] == "llama_pruned" and len(config["pruned_layers"]) == 2
    assert (tmp_path / "gates-quickstart" / "pruned" / "tokenizer.json").exists()
    adapter = json.loads((tmp_path / "gates-quickstart" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PEFT_GATES" and adapter["placement"] == "units"


# --------------------------------------------------------------------------------------------- the site


def _missing_docs_packages() -> list[str]:
    return [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx")
            if importlib.util.find_spec(m.split(".")[0]) is None
            or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)]  # fmt: skip


def test_mkdocs_build_strict(tmp_path):
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(f"docs extra not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "config" / "index.html").exists()
    api = (tmp_path / "site" / "api" / "training" / "index.html").read_text()
    assert "set_sparsity_step" in api and ":func:" not in api  # docstrings rendered, Sphinx roles converted


# --------------------------------------------------------------------------------------------- claims


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if p.name != "DESIGN-NOTES.md")


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_compile(page: Path):
    for block in python_blocks(page):
        compile(block, str(page), "exec")


def _source_strings() -> list[str]:
    """Every string literal of the package (f-strings with ``{}`` for their fields), as Python joins them."""
    import ast

    strings = []
    for path in sorted((ROOT / "peft_gates").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                strings.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
    return strings


#: Fragments of the messages quoted on the troubleshooting page that peft_gates raises or logs itself.
OWN_MESSAGES = [
    "needs the coupled structures of model_type=",
    "use placement='both' (or 'rows'/'columns') or add the family to peft_gates.architectures.ARCHITECTURES",
    "must name exactly one unit output per entry",
    "; the unit outputs of",
    "also ends with",
    "does not divide in_features=",
    "gates on the output layer (lm_head) do not train under TRL's SFTTrainer",
    "add 'lm_head' to GateConfig.exclude_modules (or drop it from target_modules)",
    "DDP with ddp_find_unused_parameters=True and reentrant gradient checkpointing fails",
    "no gate is trained: ",
    "did not run a training forward with gradients in the first step",
    "carries no peft_gates adapter; wrap the model first with",
    "had been repacked for CPU inference by an earlier eval forward",
    "cannot fold gates in place into",
    "use merge_and_unload(), which dequantizes into a new pruned dense model",
    "exists and is not empty; pass overwrite=True to replace it",
    "has no ArchSpec entry in peft_gates.architectures.ARCHITECTURES",
    "peft_gates: cast ",
]


def test_troubleshooting_quotes_real_messages():
    page = " ".join((DOCS / "troubleshooting.md").read_text().split())
    strings = _source_strings()
    for fragment in OWN_MESSAGES:
        assert fragment in page, f"troubleshooting.md no longer quotes: {fragment}"
        assert any(fragment in s for s in strings), f"peft_gates no longer says: {fragment}"


def test_cli_guide_names_only_real_options():
    from peft_gates.cli import build_parser

    parser = build_parser()
    options = {"--help", "--version", "--local-dir"}  # --local-dir: the `hf download` hint
    for action in parser._subparsers._group_actions[0].choices.values():  # noqa: SLF001
        for sub in action._actions:  # noqa: SLF001
            options.update(sub.option_strings)
    text = (DOCS / "guides" / "cli.md").read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert named <= options, named - options
