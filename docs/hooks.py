"""mkdocs hook: the site also carries files that live outside docs/, at their repository paths.

schema/ (FORMAT.md, ARCHITECTURE.md and the files they link to) stays at the project's top
level, and examples/RESULTS.md is rewritten in place by the example scripts, so neither moves
into docs/; README.md is the site's home page. Links are written as GitHub shows the repository
(docs/tutorial.md from the README, ../schema/FORMAT.md from a page in docs/,
../docs/benchmarks.md from examples/), and rewritten here
to where the site puts each file, so `mkdocs build --strict` still checks every one of them.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ("schema/*.md", "schema/*.sql", "schema/*.json", "examples/*.md", "examples/*.png")
HOME = "index.md"


def on_files(files, config):
    files.append(File.generated(config, HOME, abs_src_path=str(ROOT / "README.md")))
    for pattern in OUTSIDE:
        for path in sorted(ROOT.glob(pattern)):
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == HOME:
        # The README sits one folder above docs/: its links into docs/ lose that prefix.
        return re.sub(r"\]\(docs/", "](", markdown)
    if "/" not in page.file.src_uri:
        # A page of docs/ reaches schema/ and examples/ one folder up; the site has them beside it.
        return re.sub(r"\]\(\.\./(schema|examples)/", r"](\1/", markdown)
    if page.file.src_uri.startswith("examples/"):
        # examples/ reaches docs/ one folder up; on the site, docs/ is the top.
        return re.sub(r"\]\(\.\./docs/", "](../", markdown)
    return markdown
