"""The README's CLI reference and schema/catalog.sql are generated; they must be in step."""

from pathlib import Path

from cli.docs import ROOT, catalog_sql, cli_reference, commands, main


def test_generated_docs_are_in_step():
    assert main([]) == 0, "run `python -m cli.docs --write` (make docs)"


def test_every_command_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for path, cmd in commands():
        assert f"### deltastore {' '.join(path)}" in readme, f"{' '.join(path)} is not in the README"
        assert cmd.help, f"{' '.join(path)} has no help text"
    assert "make demo" in readme and "make test" in readme


def test_catalog_sql_matches_the_migrations():
    assert (ROOT / "schema" / "catalog.sql").read_text() == catalog_sql()
    assert "CREATE TABLE versions" in catalog_sql()
    assert cli_reference().count("```") % 2 == 0
