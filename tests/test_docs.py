"""The README and docs/ are what a newcomer reads first: a link that leads nowhere or a flag the command line
refuses costs them the five minutes the README promises."""
import argparse
import re
from pathlib import Path

import pytest

from jaxpipe.cli import _parser

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", _prose(text), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _commands(text: str) -> list[str]:
    """Every command line the page shows: lines of its code blocks (continuations joined), inline code, and
    the flags of a table whose header names the command (`| `jaxpipe train` flag | ... |`)."""
    blocks = [b.replace("\\\n", " ") for b in FENCE.findall(text)]
    lines = [line.split("  #")[0] for b in blocks for line in b.splitlines()[1:-1]]
    table_cmd = None
    for row in _prose(text).splitlines():
        if not row.startswith("|"):
            table_cmd = None
        elif table_cmd is None:  # a table's header
            table_cmd = (re.findall(r"\bjaxpipe [a-z][\w-]*", row.split("|")[1]) or [""])[0]
        elif table_cmd:
            lines += [f"{table_cmd} {span}" for span in re.findall(r"`(--[^`]+)`", row.split(" | ")[0])]
    spans = re.findall(r"`([^`\n]+)`", _prose(text))
    return [line.replace("\\|", "|") for line in lines + spans]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file_and_heading(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(text)):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert anchor in _anchors(dest.read_text(encoding="utf-8")), f"{page.name}: link to {target}: no heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_jaxpipe_flag_shown_is_one_the_command_takes(page):
    shown = 0
    for line in _commands(page.read_text(encoding="utf-8")):
        for m in re.finditer(r"\bjaxpipe ([a-z][\w-]*)(?=\s|$)((?:(?!\bjaxpipe ).)*)", line):
            cmd, rest = m.group(1), m.group(2)
            commands = _subparsers(_parser())
            assert cmd in commands, f"{page.name}: `{line}`: jaxpipe has no command {cmd!r}"
            sub = commands[cmd]
            if nested := _subparsers(sub):  # `jaxpipe trace merge|plot DIR`
                word, rest = [*rest.split(None, 1), ""][:2]
                subs = [nested.get(w) for w in word.split("|")]
                assert all(subs), f"{page.name}: `{line}`: jaxpipe {cmd} has no command {word!r}"
                cmd = f"{cmd} {word}"
            else:
                subs = [sub]
            rest = rest.split(" -- ")[0]  # what follows supervise's `--` is the job, checked as its own command
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest):
                assert all(flag in s._option_string_actions for s in subs), \
                    f"{page.name}: `{line}`: jaxpipe {cmd} has no {flag}"
                shown += 1
    if page.name in ("README.md", "training.md"):
        assert shown >= 10, f"{page.name}: only {shown} jaxpipe flags found: is the command table still there?"


def test_the_readme_lists_every_registered_choice_of_the_keys_it_names():
    """The README's "Keys most runs set" names each registry-backed key with its choices: a schedule, DP
    algorithm or codec added to a registry must show up there too."""
    from jaxpipe.config import REGISTERED

    para = _prose((REPO / "README.md").read_text()).split("Keys most runs set:")[1].split("\n\n")[0]
    para = " ".join(para.split())
    shown = 0
    for key, registry in REGISTERED:
        m = re.search(rf"`{re.escape(key)}` \(([^)]*)\)", para)
        if m is None:
            continue
        shown += 1
        assert [c.strip() for c in m.group(1).split(",")] == list(registry.names()), key
    assert shown >= 4, para
