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


# A developer's tag anywhere in running text: a session ("session 52", "s52", "the ninth session") or a
# helper's name and number ("cf56", "p52a", "nux53", "rv57b", "lead56", "(rv52: median ...)"): the
# developers' provenance, which the user documentation and the library's messages do not carry
# (docs/benchmarks.md, the measurements' log, does). Technical names of that shape are no tags: dtypes,
# percentiles, group sizes, a colour map, a hash function, the benchmark scripts' own case names.
_ORDINAL = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
            "fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|twenty-[a-z]+")
_TAG = re.compile(r"(?<![\w./\\-])([a-z]{1,6}\d{2}[a-z]?)(?!\w)|\b[Ss]essions? \d+"
                  rf"|\b(?i:{_ORDINAL})(?:-to-[a-z]+)? sessions?\b")
_NOT_TAGS = {
    "float16", "float32", "float64", "bfloat16", "bf16", "fp16", "fp32", "fp64", "f32", "f64",
    "int16", "int32", "int64", "p10", "p90", "p99", "g32", "g64", "g128",
    "tab10",  # matplotlib's colour map
    "triple32",  # Wellons' hash (docs/method.md, record draws)
    "cov80",  # the share of selections covered by the 80% interval (a table column)
    "cnn10", "logit50",  # case names of benchmarks/ggn_exact_sandwich.py and record_selection.py
}
# Symbols of that shape, no tags only inside a code span (``s2^2 / s22``): the fourth-power cross sum
# (functional/leakage.py), x rounded to float32 (functional/point_proof.py); "(s22)" is a session's tag.
_SYMBOLS = {"s22", "x32"}
_CODE = re.compile(r"``[^`]+``|`[^`\n]+`")
# The one place a tag may stand: in the name of a section of docs/benchmarks.md, where the figure is
# recorded (`docs/benchmarks.md, "pl44"`, `docs/benchmarks.md "p47d", "tol47"`, `docs/benchmarks.md,
# "Twenty-second session: fp8"`); each such name must be there.
_NAME = r'\\?"([^"\\]{2,120})\\?"'
_ANCHOR = re.compile(r"benchmarks\.md,?\s+(?:section\s+)?" + _NAME + r"(?:,?\s+(?:and\s+)?" + _NAME + ")*")


def _blank_anchors(text: str) -> str:
    """``text`` with each benchmarks.md anchor blanked (line breaks kept, so line numbers hold)."""
    return _ANCHOR.sub(lambda m: re.sub(r"[^\n]", "#", m.group(0)), text)


def _tags(text: str) -> list[tuple[int, str]]:
    """(line offset, tag) of every developer's tag in ``text`` outside a benchmarks.md anchor."""
    text = _blank_anchors(text)
    code = [m.span() for m in _CODE.finditer(text)]
    return [(text.count("\n", 0, m.start()), m.group(0)) for m in _TAG.finditer(text)
            if m.group(0) not in _NOT_TAGS
            and not (m.group(0) in _SYMBOLS and any(a < m.start() < b for a, b in code))]


def test_the_tag_allow_list_passes_symbols_in_code_alone():
    """The symbols ``s22`` and ``x32`` were allowed anywhere: a session's tag "(s22)" passed (rv58a)."""
    assert [t for _, t in _tags("fixed in s22 (s22, x32)")] == ["s22", "s22", "x32"]
    assert _tags("``s2^2 / s22`` and `|x32 - x|`, float32, p90, bf16") == []
    assert [t for _, t in _tags("nux52 #3, rv58a, before session 42, the ninth session")] == [
        "nux52", "rv58a", "session 42", "ninth session"]


def _user_docs():
    return [ROOT / "README.md"] + [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "benchmarks.md"]


def _library_strings():
    """(path, line, text) of every string literal of the library that holds running text (a space):
    docstrings, warnings, errors, report and remedy texts; identifiers and keys ("gs32") are not text."""
    for path in sorted((ROOT / "mis_lightning").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and " " in node.value:
                yield path.relative_to(ROOT), node.lineno, node.value


def test_the_user_docs_carry_no_session_tags():
    """cf56 wrote "(cf56)" into docs/method.md's new paragraphs; ux57 took ~100 tags opening a bracket
    out of docs/method.md and docs/validation.md, and this test then read only those, so ~400 more in
    running text stayed ("cv29's least-squares design", "until rn28 the denominator", "before session
    54", "the ninth session's stored rows", validation.md's sections "## dg30: ..." and "### Ninth
    session: ..."). Every tag outside a cited docs/benchmarks.md section name fails."""
    found = [f"{path.relative_to(ROOT)}:{no + 1}: {tag}" for path in _user_docs()
             for no, tag in _tags(path.read_text(encoding="utf-8"))]
    assert not found, f"{len(found)} session / helper tags in the user docs:\n" + "\n".join(found)


def test_the_librarys_messages_and_docstrings_carry_no_session_tags():
    """The library's warnings, errors, remedy texts and docstrings are user documentation too:
    ~350 tags stood there ("(nux48 #12: a message that led with ...)", "until nu48 the NaN check",
    "(cv40)" and "(nu48, nu49)" in the K-FAC warning's figures, "failed, session 42")."""
    found = [f"{path}:{line + no}: {tag}" for path, line, text in _library_strings() for no, tag in _tags(text)]
    assert not found, f"{len(found)} session / helper tags in the library's strings:\n" + "\n".join(found)


def test_every_benchmarks_section_cited_by_name_exists():
    """A figure's provenance is cited as `docs/benchmarks.md, "NAME"`: a heading of docs/benchmarks.md
    must start with NAME (a tag: "pl44", the section "## pl44: ...") or hold it (a title: "Compile
    threshold"), whitespace folded, case-insensitive, or the reader finds nothing (docs/estimation.md
    and docs/lightning.md cited "nux52", whose findings are recorded under "ux52b")."""
    heads = [_SPACE.sub(" ", line.lstrip("#")).strip().lower()
             for line in (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    texts = [(p.relative_to(ROOT), p.read_text(encoding="utf-8")) for p in _user_docs()]
    texts += [(path, text) for path, _, text in _library_strings()]
    missing = set()
    for path, text in texts:
        for m in _ANCHOR.finditer(text):
            for name in re.findall(_NAME, m.group(0)):
                key = _SPACE.sub(" ", name).strip().lower()
                tag = re.fullmatch(r"[a-z]{1,6}\d{2}[a-z]?", key)
                if name.isupper() or any(h.startswith((key + ":", key + " ")) or (not tag and key in h) for h in heads):
                    continue  # (an upper-case NAME is the docs' placeholder of the convention itself)
                missing.add(f"{path}: {name!r}")
    assert not missing, "benchmarks.md sections cited that it lacks:\n" + "\n".join(sorted(missing))


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
