"""The README and the docs name only commands, options and files that exist (issue 27).

Fast: the Markdown is parsed with regular expressions; commands are checked against the CLI parser
(`hma_gym.cli.build_parser`, which imports a subcommand's config module only to read its options), the
Makefile's targets and the repository's files. Nothing runs.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from hma_gym.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), RESULTS / "README.md"]
# the experiment history may name commands and options that were removed; its file paths must still exist
HISTORY = {ROOT / "docs" / "experiments.md"}
REPO_DIRS = ("hma_gym", "training", "policies", "benchmarks", "tests", "scripts", "docs")
ROOT_FILES = {"Makefile", "pyproject.toml", "README.md"}
REPO_PACKAGES = ("hma_gym", "training", "policies", "benchmarks", "tests", "scripts")
# bare `*.json` / `*.png` names are result files in benchmarks/results/, except these checkpoint parts
NOT_RESULTS = {"config.json", "policy.json", "detector.json", "tokenizer.json"}
MAX_README_LINES = 200

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`((?:[^`\n]|\n(?!\s*\n))+)`")  # a code span may wrap a line, not a paragraph
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.M)
SEGMENT_END = re.compile(r"\s(?:->|;|\||&&|#)\s|\n")


def code_of(text: str) -> list[str]:
    """Fenced blocks (continuation lines joined) and inline code spans outside them."""
    blocks = [b.replace("\\\n", " ") for b in FENCE.findall(text)]
    return blocks + [" ".join(span.split()) for span in INLINE.findall(FENCE.sub("", text))]


def expand(pattern: str) -> list[str]:
    """Shell brace expansion, one level at a time: `a{,_b}.json` -> `a.json`, `a_b.json`."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",") for x in expand(pattern[: m.start()] + alt + pattern[m.end():])]


def exists(path: Path) -> bool:
    """A file or directory, a glob that matches, or the stem of files (`--out DIR/name` -> name.json, name.png)."""
    return any(glob.glob(str(path))) if "*" in str(path) else path.exists() or any(glob.glob(f"{path}.*"))


@functools.cache
def options_of(sub: str) -> frozenset[str]:
    parser = build_parser(load=sub)
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return frozenset(s for a in subparsers.choices[sub]._actions for s in a.option_strings)


@functools.cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_./-]+)\s*:(?!=)", text, re.M))


def module_exists(name: str) -> bool:
    top = name.split(".")[0]
    if top not in REPO_PACKAGES:
        return importlib.util.find_spec(top) is not None
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists() or (base / "__main__.py").exists()


def command_problems(text: str) -> list[str]:
    """`hma-gym SUB [--opt ...]`, `SUB --opt` at the start of a code span, `make TARGET`, `python -m MODULE`."""
    bad = []
    for code in code_of(text):
        for m in re.finditer(r"\bhma-gym\s+([a-z][\w-]*)", code):
            sub = m.group(1)
            if sub not in COMMANDS:
                bad.append(f"hma-gym {sub}: no such subcommand")
                continue
            rest = code[m.end():]
            segment = re.split(r"\bhma-gym\s", SEGMENT_END.split(rest, maxsplit=1)[0], maxsplit=1)[0]
            bad += [f"hma-gym {sub} {o}: no such option" for o in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", segment)
                    if o not in options_of(sub)]
        m = re.match(r"([a-z][\w-]*)\s+(--.*)", code)
        if m and m.group(1) in COMMANDS and "\n" not in code:
            bad += [f"{m.group(1)} {o}: no such option" for o in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2))
                    if o not in options_of(m.group(1))]
        for target in re.findall(r"(?<![\w$(-])make\s+([a-z][\w.-]*)", code):
            if target not in make_targets():
                bad.append(f"make {target}: no such Makefile target")
        for module in re.findall(r"\bpython\d?(?:\.\d+)?\s+-m\s+([\w.]+)", code):
            if not module_exists(module):
                bad.append(f"python -m {module}: no such module")
    return bad


def _path_words(code: str) -> list[str]:
    """Words of a code span; commas separate words except inside shell braces (`a{,_b}.json`)."""
    words = re.findall(r"(?:\{[^{}\s]*\}|[^\s,;()\[\]\"'={}])+", code)
    return [w.strip("`.:") for w in words if w.strip("`.:")]


def path_problems(text: str, doc_dir: Path) -> list[str]:
    """Repository paths in code, bare result file names, and Markdown link targets."""
    bad = []
    for code in code_of(text):
        for word in _path_words(code):
            name, _, test = word.partition("::")
            first = name.split("/")[0]
            if "/" in name and first in REPO_DIRS or name in ROOT_FILES:
                for path in expand(name):
                    if not exists(ROOT / path):
                        bad.append(f"{path}: no such file")
                    elif test and not re.search(rf"^def {re.escape(test)}\(", (ROOT / path).read_text(), re.M):
                        bad.append(f"{path}::{test}: no such test")
            elif "/" not in name and re.fullmatch(r"[a-z0-9_{},*.-]+\.(json|png)", name) and name not in NOT_RESULTS:
                bad += [f"{p}: not in benchmarks/results/" for p in expand(name) if not exists(RESULTS / p)]
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc_dir / path).resolve() if path else None
        if dest is not None and not dest.exists():
            bad.append(f"link {target}: no such file")
        elif anchor and (dest is None or dest.suffix == ".md") and anchor not in anchors(dest):
            bad.append(f"link {target}: no such heading")
    return bad


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path | None) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))} if path else set()


# the history page names removed commands on purpose: it is left out of this check, not skipped in it
@pytest.mark.parametrize("doc", [d for d in DOCS if d not in HISTORY], ids=lambda p: str(p.relative_to(ROOT)))
def test_named_commands_exist(doc: Path) -> None:
    problems = command_problems(doc.read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_exist(doc: Path) -> None:
    problems = path_problems(doc.read_text(), doc.parent)
    assert not problems, "\n".join(problems)


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_layout_lists_every_top_level_directory() -> None:
    """The README's Layout block names exactly the repository's tracked top-level directories (not dot ones)."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    dirs = {line.split("/")[0] for line in tracked.splitlines() if "/" in line and not line.startswith(".")}
    readme = (ROOT / "README.md").read_text()
    layout = FENCE.findall(readme[readme.index("## Layout"):])[0]
    assert set(re.findall(r"^(\S+)/\s", layout, re.M)) == dirs


def test_checker_reports_what_is_missing() -> None:
    text = "\n".join([
        "Run `hma-gym fly --fast`, `hma-gym evaluate --policy expert --warp 9` and `train --no-such-flag`.",
        "```bash", "make demo", "make no-such-target", "python -m benchmarks.no_such_study", "```",
        "See `hma_gym/no_such_file.py`, `tests/test_cli.py::test_no_such_test`, `no_such_result.json`,",
        "[a link](docs/missing.md) and [an anchor](README.md#no-such-heading).",
    ])
    assert sorted(command_problems(text)) == sorted([
        "hma-gym fly: no such subcommand",
        "hma-gym evaluate --warp: no such option",
        "train --no-such-flag: no such option",
        "make no-such-target: no such Makefile target",
        "python -m benchmarks.no_such_study: no such module",
    ])
    assert sorted(path_problems(text, ROOT)) == sorted([
        "hma_gym/no_such_file.py: no such file",
        "tests/test_cli.py::test_no_such_test: no such test",
        "no_such_result.json: not in benchmarks/results/",
        "link docs/missing.md: no such file",
        "link README.md#no-such-heading: no such heading",
    ])
    good = ("`hma-gym evaluate --policy expert --no-paired`, `make test`, `python -m pytest`, "
            "`tests/test_cli.py::test_help_lists_every_command`, `eval_model_lift{,_greedy}.json`, "
            "[tests](README.md#tests)")
    assert command_problems(good) == [] and path_problems(good, ROOT) == []
