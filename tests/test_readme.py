"""The front page and docs/ are true: README.md within its 16,000 characters, every snippet on
it runs as written (on the CPU; `resfuse.models` stands in for torchvision where it does not
import), every link and every file path they name resolves in the repository, and nothing in
the repository cites a file outside it. (The generated results sections are checked in
tests/test_bench.py, `auto`'s table in tests/test_auto_table.py.)"""
import os
import re
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
              if f.endswith(".md"))


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_front_page_is_short():
    assert len(_read(README)) <= 16000


def _snippets():
    return re.findall(r"```python\n(.*?)```", _read(README), flags=re.S)


def test_front_page_has_snippets():
    assert len(_snippets()) >= 2


@pytest.mark.parametrize("i", range(len(_snippets())))
def test_front_page_snippet_runs(i, monkeypatch, capsys):
    code = _snippets()[i]
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or built for another torch
        import resfuse
        shim = types.ModuleType("torchvision")
        shim.models = resfuse.models
        monkeypatch.setitem(sys.modules, "torchvision", shim)
    monkeypatch.delenv("RESFUSE_BACKEND", raising=False)
    exec(compile(code, f"README.md snippet {i + 1}", "exec"), {"__name__": "__readme__"})


def _links(path):
    """Relative link targets (anchors dropped) of a Markdown file."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(path)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


@pytest.mark.parametrize("path", [README] + DOCS, ids=os.path.basename)
def test_links_and_paths_resolve(path):
    base = os.path.dirname(path)
    for target in _links(path):
        assert os.path.exists(os.path.normpath(os.path.join(base, target))), (path, target)
    # Repository paths named in backticks (`bench/decide.py`, `tests/test_plots.py`, ...).
    for name in re.findall(r"`([A-Za-z_][\w.-]*/[\w./-]*\.(?:py|sh|md|cu|cuh|h|cpp|json|csv))`",
                           _read(path)):
        if name.startswith(("../", "/")):
            continue
        assert os.path.exists(os.path.join(ROOT, name)), (path, name)


def test_docs_are_linked_from_the_front_page():
    linked = {os.path.normpath(os.path.join(ROOT, t)) for t in _links(README)}
    for path in DOCS:
        assert path in linked, f"{os.path.relpath(path, ROOT)} is not linked from README.md"


def test_nothing_cites_a_file_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    # The names are built here so that this file does not cite them itself.
    outside = [n + ".md" for n in ("DESIGN", "STYLE", "GPU")] + ["../" + "shared/"]
    for name in files:
        path = os.path.join(ROOT, name)
        if name.startswith("bench/results/") or not os.path.isfile(path):
            continue
        try:
            text = _read(path)
        except UnicodeDecodeError:
            continue
        for ref in outside:
            assert ref not in text, f"{name} cites {ref}, which is not in the repository"
