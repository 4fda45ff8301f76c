"""The README and docs/ hold together: every relative link points at a file that exists (and, for a
link into a markdown page, at a heading that exists), and the README's two commands are Makefile targets."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at whitespace or ")" (a title may follow).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def unfenced(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    return "\n".join(re.sub(r"`[^`]*`", "", line) for line in unfenced(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in unfenced(page.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        found.add(s if n == 0 else f"{s}-{n}")
    return found


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ...


def test_pages_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "results.md", "method.md", "real-models.md", "benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_link_checker_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading: with `code`\n", encoding="utf-8")
    page.write_text("[ok](there.md#a-heading-with-code) [gone](missing.md) ![img](x.jpg) "
                    "[web](https://example.com) `[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n",
                    encoding="utf-8")
    assert relative_links(page) == ["there.md#a-heading-with-code", "missing.md", "x.jpg"]
    assert "a-heading-with-code" in anchors(tmp_path / "there.md")


def test_readme_commands_are_makefile_targets():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^make {target}\b", readme, re.M), f"README lost `make {target}`"
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no `{target}` target"
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    """docs/python-api.md's example, as written, with two training steps instead of the family's 200."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)[1]
    assert "resolve_erase(pipe, pairs)" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("resolve_erase(pipe, pairs)", "resolve_erase(pipe, pairs, steps=2)"),
                 "python-api.md", "exec"), scope)
    assert scope["images"].shape == (1, 64, 64, 3) and scope["result"].patch.concepts == ["red"]
    assert (tmp_path / "no_red.safetensors").is_file() and scope["erased"].patches


def test_the_reliability_figures_are_the_fuzz_run_s():
    """docs/reliability.md's fuzzing table is docs/fuzz_results.json, and that run found no traceback and
    no silent wrong result."""
    results = json.loads((ROOT / "docs" / "fuzz_results.json").read_text())
    assert results["total"]["tracebacks"] == 0 and results["total"]["silent_wrong"] == 0
    text = (ROOT / "docs" / "reliability.md").read_text()
    for target, counts in results["targets"].items():
        row = f"| {target} | {sum(counts.values())} | {counts.get('refused', 0)} | {counts.get('accepted', 0)} |"
        assert row in text, row
    assert f"| **all** | **{results['total']['inputs']}** |" in text
