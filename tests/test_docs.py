"""README is the front door, docs/ the house: README stays short, starts with the two set-up commands,
and every relative link in README and docs/ points to a file (and heading) that exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_BYTES = 15_000
SETUP_COMMANDS = [
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && sat-infer examples/images --out captions.jsonl",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && python -m pytest -q",
]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_readme_is_short():
    assert README.stat().st_size <= README_MAX_BYTES


def test_readme_starts_with_the_two_setup_commands():
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert [b.strip() for b in blocks[:2]] == SETUP_COMMANDS


def test_docs_has_pages():
    assert len(list((ROOT / "docs").glob("*.md"))) >= 4


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        for link in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, "\n".join(broken)
