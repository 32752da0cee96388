"""The README, BENCHMARKS.md and docs/ stay true to the repository: every relative link leads somewhere (a
file of the repository, or a heading of the page it names: GitHub's anchors; links to the web are not
followed, no network here), every `pgkd` command and `make` target they show exists, no table is cut in two,
and the README stays a front door (at most 200 lines, linking into docs/ on its first screen)."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchor for each heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_link_leads_somewhere(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or REPO not in file.parents and file != REPO:
            broken.append(f"{target}: no {path}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, broken


README_MAX_LINES = 200


def code_of(page: Path) -> str:
    """What a page shows as code: its fenced blocks and its `inline spans`, the places a reader copies
    commands from (prose may name a command loosely; code must be exact)."""
    text = page.read_text(encoding="utf-8")
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join([*blocks, *spans])


# `pgkd X [Y]` as a shell shows it (`pgkd`, `.venv/bin/pgkd`), never `pgkd.distill`, `pgkd_services` or a
# namespace (`kubectl -n pgkd logs`).
COMMAND = re.compile(r"(?:^|(?<!-n)[\s]|[/(|;&])pgkd[ \t]+([a-z][a-z-]*)(?:[ \t]+([a-z][a-z-]*)\b(?![./:=]))?", re.M)


def shown_commands() -> dict[tuple[str, ...], set[str]]:
    """(X,) or (X, Y) -> the pages showing it. Y is kept when it is a plain lower-case word (a subcommand,
    or a command's argument such as a service name); `pgkd X Y --help` must exit 0 either way."""
    shown: dict[tuple[str, ...], set[str]] = {}
    for page in PAGES:
        for x, y in COMMAND.findall(code_of(page)):
            shown.setdefault((x, y) if y else (x,), set()).add(page.relative_to(REPO).as_posix())
    return shown


def test_the_pages_show_commands():
    """The extraction finds what is there: a guard against a pattern that silently matches nothing."""
    shown = shown_commands()
    assert {("distill",), ("predict",), ("serve",), ("service", "deployer"), ("stream", "status")} <= set(shown)


@pytest.mark.parametrize("command", sorted(shown_commands()), ids=" ".join)
def test_every_pgkd_command_shown_exists(command, capsys):
    """Every `pgkd X [Y]` in the README, BENCHMARKS.md and docs/ is a command: `pgkd X [Y] --help` exits 0.
    (`pgkd settings` comes from issue 28's settings model: until it lands, this fails for it.)"""
    from pgkd.cli import main
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0, f"pgkd {' '.join(command)} (shown in {sorted(shown_commands()[command])}): " \
                                 f"{capsys.readouterr().err.strip()}"


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9][\w.-]*)\s*:(?!=)", text, flags=re.M))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_make_target_shown_exists(page):
    targets = makefile_targets()
    assert {"demo", "test", "setup"} <= targets
    shown = set(re.findall(r"(?:^|[\s(`#])make[ \t]+([a-z][\w-]*)", code_of(page), flags=re.M))
    assert not shown - targets, f"{page.name} shows make targets the Makefile lacks: {sorted(shown - targets)}"


def test_the_readme_is_a_front_door_not_a_manual():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    first_screen = "\n".join(lines[:40])
    assert "docs/" in first_screen, "the README's first screen links into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_table_is_cut_in_two_by_a_blank_line(page):
    """A blank line inside a table ends it: what follows renders as a paragraph of pipes."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    cut = re.findall(r"^\|.*\|\n\n(\|(?!\s*[-:]+\s*\|).*\|)$", text, flags=re.M)
    headless = [row for row in cut if not re.search(r"^" + re.escape(row) + r"\n\|[\s:-]+\|", text, flags=re.M)]
    assert not headless, f"{page.name}: table rows after a blank line, without a header: {headless}"
