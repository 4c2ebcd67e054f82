"""The documentation speaks of the software and its studies, never of how they were made: no commit hashes, no paths
of one workspace, no "this session" or "reported in issue N". The README stays short, with the rest one page per topic
under docs/; the links between the pages resolve; docs/HUB.md lists the code files `save_pretrained` writes for every
host. docs/RESULTS.md opens with a summary whose numbers are all copied from its detailed sections."""

import re
from pathlib import Path

import pytest
from tiny import CASES, case_names


ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md"] + sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))

# URLs may legitimately hold hex words (a commit in a link to another project); they are blanked before matching.
URL = re.compile(r"<?https?://[^\s)>\]]+>?")
HISTORY = [
    # A 7 to 40 character lowercase hex word with at least one letter and one digit, as `git log --oneline` prints
    # commits. Not after `#` (hex colours) or `0x`; dates, versions and numbers such as 1e-5 have no such word.
    ("commit hash", re.compile(r"(?<![#\w])(?<!0x)(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")),
    ("workspace path", re.compile(r"/work/|\.\./shared|/tmp/")),
    # nox's own word for one environment of the matrix ("nox session", `--session`) is the software, not history.
    ("session", re.compile(r"(?<![-.`])(?<!nox )\bsessions?\b", re.IGNORECASE)),
    ("issue number", re.compile(r"\bissue\s*#?\d+|\breported in issue", re.IGNORECASE)),
    ("workspace", re.compile(r"\bdevelopment (?:machine|VM)\b|\bthis workspace\b|\bthe GPU machine\b", re.IGNORECASE)),
    # How the code came to be rather than what it does.
    ("history", re.compile(r"\b(?:a|the) first version\b|\ban earlier run\b|\bthe issue(?:'s)?\b", re.IGNORECASE)),
]


def history_hits(path: Path) -> list[str]:
    """`file:line: what: 'match'` for every development-history word in the markdown file at `path`."""
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    hits = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = URL.sub(lambda match: " " * len(match.group()), line)
        for what, pattern in HISTORY:
            hits += [f"{name}:{number}: {what}: {match.group()!r}" for match in pattern.finditer(text)]
    return hits


@pytest.mark.parametrize("name", DOCS)
def test_docs_speak_of_the_software_not_its_history(name):
    hits = history_hits(ROOT / name)
    assert not hits, "development history in the docs:\n" + "\n".join(hits)


def test_the_check_finds_history_and_only_history(tmp_path):
    copy = tmp_path / "RESULTS.md"
    text = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    broken = text + "\nMeasured at deadbee1.\n"
    copy.write_text(broken, encoding="utf-8")
    line = broken.splitlines().index("Measured at deadbee1.") + 1
    assert history_hits(copy) == [f"{copy}:{line}: commit hash: 'deadbee1'"]

    copy.write_text(
        "run in this session, as reported in issue 14, on the development machine (`/work/shared/data`)\n"
        "commit 1c1e8df; data in ../shared/data; output in /tmp/x; over 3 sessions\n"
        "A first version was slower in an earlier run on the 2-core development VM, as the issue's case shows.\n",
        encoding="utf-8",
    )
    found = [hit.split(": ", 2)[1:] for hit in history_hits(copy)]
    assert found == [
        ["workspace path", "'/work/'"],
        ["session", "'session'"],
        ["issue number", "'reported in issue'"],
        ["workspace", "'development machine'"],
        ["commit hash", "'1c1e8df'"],
        ["workspace path", "'../shared'"],
        ["workspace path", "'/tmp/'"],
        ["session", "'sessions'"],
        ["workspace", "'development VM'"],
        ["history", "'A first version'"],
        ["history", "'an earlier run'"],
        ["history", '"the issue\'s"'],
    ]

    copy.write_text(
        "colour `#1f77b4ff`, <https://github.com/karpathy/char-rnn/commit/1c1e8df0>, 11 nox sessions\n"
        "`nox --session compat`, 2026-11-30, torch 2.13.0+cpu, λ = 1e-5, 0x1f2e3d4c, deadbeef, 1234567\n"
        "arXiv 2504.09265, https://example.org/a1b2c3d4e5f6 and `load_balance`\n",
        encoding="utf-8",
    )
    assert history_hits(copy) == []


def results_summary() -> tuple[str, str]:
    """docs/RESULTS.md split into its opening (title, introduction, "## Summary") and the detailed sections."""
    text = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    start = text.index("\n## Summary\n")
    end = text.index("\n## ", start + 1)
    return text[:end], text[end:]


NUMBER = re.compile(r"[+−-]?\d+(?:\.\d+)+|[+−-]?\d+(?:\.\d+)?e-\d+")
INTERVAL = re.compile(r"\[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]")


def test_results_summary_numbers_are_copied_from_the_details():
    summary, details = results_summary()
    details = details.replace("−", "-")
    numbers = {match.group().replace("−", "-") for match in NUMBER.finditer(summary)}
    assert len(numbers) > 50
    missing = [n for n in sorted(numbers) if not re.search(r"(?<![\d.])" + re.escape(n) + r"(?!\d)", details)]
    assert not missing, f"numbers in the summary of docs/RESULTS.md that its details do not report: {missing}"
    # Each interval is copied as a whole: the details write it `[a, b]` or `(a, b)`.
    intervals = set(INTERVAL.findall(summary.replace("−", "-")))
    assert len(intervals) >= 20
    missing = [(a, b) for a, b in sorted(intervals) if f"[{a}, {b}]" not in details and f"({a}, {b})" not in details]
    assert not missing, f"intervals in the summary of docs/RESULTS.md that its details do not report: {missing}"


def test_results_summary_fits_one_screen_and_shows_the_gap_against_experts():
    summary, _ = results_summary()
    section = summary[summary.index("\n## Summary\n") :]
    assert len(section.strip().splitlines()) <= 60
    assert "](figures/gap/gap_vs_experts.png)" in section
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")):
        assert (ROOT / "docs" / image).is_file(), image


# ---- the README and the pages under docs/ ---------------------------------------------------------------------------

# The README: what MoGE is, the set-up commands, the quick start, the main job and a pointer per topic, read in a few
# minutes; everything else is in docs/, linked from its last section.
README_LINKS_SECTION = "\n## Documentation\n"
README_MAX_LINES = 130


def test_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    body, links = readme.split(README_LINKS_SECTION)
    assert len(body.splitlines()) <= README_MAX_LINES
    linked = set(re.findall(r"\]\((docs/[\w.]+\.md)\)", links))
    assert linked == {name for name in DOCS if name.startswith("docs/")}


FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of the markdown file at `path`."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", path.read_text(encoding="utf-8")), re.MULTILINE):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts by its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(path: Path) -> list[str]:
    """The targets of the markdown links in `path` that point into the repository (not into code)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def broken_links(page: Path) -> list[str]:
    """`target: why` for every link of `page` into the repository whose file or heading does not exist."""
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and (linked.suffix != ".md" or anchor not in github_anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("name", DOCS)
def test_links_between_the_pages_resolve(name):
    broken = broken_links(ROOT / name)
    assert not broken, f"{name}: broken links:\n" + "\n".join(broken)


def test_the_link_check_finds_broken_links(tmp_path):
    page = tmp_path / "PAGE.md"
    page.write_text(
        "# Title\n\n## Saving, loading: `save_pretrained`\n\n## Saving, loading: `save_pretrained`\n\n"
        "[a](#saving-loading-save_pretrained) [b](#saving-loading-save_pretrained-1) [c](#nowhere) [d](MISSING.md)\n"
        "[e](https://example.org/x) [f](PAGE.md#title) `[g](#in-code)`\n\n```python\nx = y[0](#not-a-link)\n```\n",
        encoding="utf-8",
    )
    assert github_anchors(page) == {"title", "saving-loading-save_pretrained", "saving-loading-save_pretrained-1"}
    assert broken_links(page) == ["#nowhere: no heading #nowhere in PAGE.md", "MISSING.md: no file MISSING.md"]


# ---- docs/HUB.md: the code files of a saved folder ------------------------------------------------------------------

CODE_FILES_LINE = "Code files beside the modeling file:"


def documented_code_files() -> set[str]:
    """The code files docs/HUB.md says `save_pretrained` writes beside the model's modeling file."""
    text = (ROOT / "docs" / "HUB.md").read_text(encoding="utf-8")
    paragraph = text[text.index(CODE_FILES_LINE) :].split("\n\n")[0]
    return set(re.findall(r"`(\w+\.py)`", paragraph))


@pytest.mark.parametrize("case", case_names(moge_hf=True))
def test_the_hub_page_lists_the_code_files_save_pretrained_writes(case, tmp_path):
    model = CASES[case].build()
    model.save_pretrained(tmp_path)
    written = {path.name for path in tmp_path.glob("*.py")}
    modeling = f"{type(model).__module__.rsplit('.', 1)[-1]}.py"
    # The page names the modeling file by its pattern (a new host adds none of its own to it), the rest one by one.
    assert re.fullmatch(r"modeling_\w+_moge\.py", modeling)
    assert "`modeling_<name>_moge.py`" in (ROOT / "docs" / "HUB.md").read_text(encoding="utf-8")
    assert written == {modeling} | documented_code_files()
