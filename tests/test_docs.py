"""The docs: docs/cli.md's CLI reference and schema/catalog.sql are generated and must be in
step; the README stays short and points into docs/; the site builds with no warning."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from cli.docs import ROOT, catalog_sql, cli_reference, commands, main


def test_generated_docs_are_in_step():
    assert main([]) == 0, "run `python -m cli.docs --write` (make docs)"


def test_every_command_is_documented_in_the_cli_reference():
    page = (ROOT / "docs" / "cli.md").read_text()
    for path, cmd in commands():
        assert f"### deltastore {' '.join(path)}" in page, f"{' '.join(path)} is not in docs/cli.md"
        assert cmd.help, f"{' '.join(path)} has no help text"


def test_catalog_sql_matches_the_migrations():
    assert (ROOT / "schema" / "catalog.sql").read_text() == catalog_sql()
    assert "CREATE TABLE versions" in catalog_sql()
    assert cli_reference().count("```") % 2 == 0


def test_the_readme_is_short_and_indexes_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 10_000, f"README.md is {len(readme.encode())} bytes: move text to docs/"
    assert "make demo" in readme and "make test" in readme
    linked = set(re.findall(r"\]\(docs/([\w./-]+\.md)\)", readme))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), f"docs pages the README does not list: {sorted(pages - linked)}"


def test_every_docs_page_is_in_the_site_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = set(re.findall(r"'([\w./-]+\.md)'", str(nav)))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} | {"schema/FORMAT.md", "schema/ARCHITECTURE.md"}
    assert pages - listed == set(), f"not in mkdocs.yml's nav: {sorted(pages - listed)}"


def test_the_site_builds_with_no_warning(tmp_path):
    # --strict turns every warning (a broken link or anchor, a page left out) into a failure;
    # not with --quiet, which drops the warnings before strict mode counts them.
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                          "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and not re.search(r"WARNING\s+-", out.stderr), out.stderr[-3000:]
    home = (tmp_path / "site" / "index.html").read_text()
    assert "make demo" in home and 'href="tutorial.html"' in home
    assert (tmp_path / "site" / "schema" / "FORMAT.html").exists()
