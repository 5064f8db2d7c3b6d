"""Every command the docs give runs from a clean checkout.

The docs state figures with the command that reproduces them (docs/benchmarks.md, "How to
measure"). A command or log under a developer's scratch folder (``/work/scratch/...``) is not in
a reader's checkout, so the figure cannot be rerun or checked; and a ``python benchmarks/X.py``
whose file was renamed or removed fails the same way. Both are text checks (< 0.1 s).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What a reader of the checkout reads: the docs, the README, the benchmarks' docstrings (their
# commands), the library's docstrings and comments, the examples and the tests' notes.
_SOURCES = (
    [ROOT / "README.md"]
    + sorted((ROOT / "docs").glob("*.md"))
    + sorted((ROOT / "benchmarks").glob("*.py"))
    + sorted((ROOT / "examples").glob("*.py"))
    + sorted((ROOT / "mis_lightning").rglob("*.py"))
    + sorted((ROOT / "tests").glob("*.py"))
)

# Scratch folders of the developers' sessions; this file names the pattern itself.
_SCRATCH = re.compile("/work/" + "scratch")
_BENCH = re.compile(r"\bbenchmarks/([A-Za-z0-9_]+\.(?:py|sh))\b")


def _lines():
    for path in _SOURCES:
        if path == Path(__file__).resolve():
            continue
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield path.relative_to(ROOT), no, line


def test_no_command_or_log_points_into_a_scratch_folder():
    hits = [f"{p}:{no}: {line.strip()[:120]}" for p, no, line in _lines() if _SCRATCH.search(line)]
    assert not hits, (
        f"{len(hits)} line(s) cite a scratch folder the reader's checkout lacks; bring the "
        "script into benchmarks/ (and cite that command) or state the figure without the path:\n"
        + "\n".join(hits)
    )


def test_every_benchmark_the_docs_name_exists():
    missing = sorted({
        f"{p}:{no}: benchmarks/{m.group(1)}"
        for p, no, line in _lines()
        for m in _BENCH.finditer(line)
        if not (ROOT / "benchmarks" / m.group(1)).is_file()
    })
    assert not missing, "benchmarks named in the docs that the checkout lacks:\n" + "\n".join(missing)


def _top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (what ``from module import name`` finds)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_benchmarks_import_only_what_the_test_helpers_define():
    """A benchmark that reuses a test's reference (``from test_x import helper``, imported inside
    its ``main``, so ``--help`` still runs) breaks silently when the helper moves: acc42 found
    ``storage_cells.py`` (the bf29 truth table docs/validation.md cites) failing at
    ``from test_storage_rounding import _values`` after the helper moved to tests/_lowp.py."""
    broken = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            helper = ROOT / "tests" / f"{node.module}.py"
            if not helper.is_file():
                continue
            defined = _top_level_names(helper)
            broken += [f"{path.name}:{node.lineno}: {node.module}.{a.name}" for a in node.names if a.name not in defined]
    assert not broken, "benchmarks import names the tests' modules lack:\n" + "\n".join(broken)


# A session tag opening a bracket, "(cf56)", "(p52a)", "(rv52: median ...)", "(nux53 #14: ...)": the developers'
# provenance, which the user documentation does not carry (docs/benchmarks.md, the measurements' log, does); the
# technical names of that shape (dtypes, percentiles, group sizes) are no tags.
_TAG = re.compile(r"\(([a-z]{1,5}\d{2}[a-z]?)(?=[) :;,#]|$)")
_NOT_TAGS = {"float16", "float32", "float64", "bf16", "fp16", "int4", "int8", "p10", "p90", "g32", "g64", "g128"}


def test_the_user_docs_carry_no_session_tags():
    """cf56 wrote "(cf56)" into docs/method.md's new paragraphs, and ~100 earlier headings and
    sentences of docs/method.md and docs/validation.md carried such tags ("**Convolutions (kc32).**",
    "(rv52: median 0.155 ...)"); the README and docs/*.md other than docs/benchmarks.md now carry none
    opening a bracket (ux57)."""
    found = [f"{path}:{no}: ({m.group(1)})" for path, no, line in _lines()
             if path.suffix == ".md" and path.name != "benchmarks.md"
             for m in _TAG.finditer(line) if m.group(1) not in _NOT_TAGS]
    assert not found, "session tags in the user docs:\n" + "\n".join(found)


# A citation of a user doc's section by name: `method.md section 5, "X"`, `docs/validation.md, "X"`,
# `docs/validation.md "X"` (X may run over a line break, a comment's "#" or a docstring's indent).
_CITE = re.compile(r'\b(method|validation)\.md(?: section \d+)?,? \\?"([^"\\]{2,120})\\?"')
_SPACE = re.compile(r"\s+(?:#\s+)?")


def test_every_section_the_code_and_docs_cite_by_name_is_found_in_that_doc():
    """ux57 renamed ~10 headings of docs/method.md and docs/validation.md (their session tags out:
    "Twenty-seventh session (hc27): ..." now "Twenty-seventh session: ..."); a citation by the old
    tag (the diagonal estimator's report warning, `docs/validation.md, "hc27"`; five code comments'
    `method.md section 5, "wc37"`; method.md's `docs/validation.md "gn28"`) then named text the doc
    no longer holds (rv57b). Each cited name must occur in the cited doc (whitespace folded,
    case-insensitive); docs/benchmarks.md, the sessions' record, is not read."""
    docs = {name: _SPACE.sub(" ", (ROOT / "docs" / f"{name}.md").read_text(encoding="utf-8")).lower()
            for name in ("method", "validation")}
    missing = []
    for path in _SOURCES:
        if path.name == "benchmarks.md" or path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        for m in _CITE.finditer(text):
            name = _SPACE.sub(" ", m.group(2)).strip().lower()
            if name not in docs[m.group(1)]:
                no = text.count("\n", 0, m.start()) + 1
                missing.append(f"{path.relative_to(ROOT)}:{no}: {m.group(1)}.md \"{m.group(2)}\"")
    assert not missing, "cited sections not found:\n" + "\n".join(missing)
