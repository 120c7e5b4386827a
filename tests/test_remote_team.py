"""Team use of one remote: two people, each with a store, pushing and pulling the same stance
through one shared folder, in any order (docs/sharing.md, "A team store"; FORMAT.md §10).

The remote numbers a stance's versions as they arrive, so a version pushed second takes the
next number there; its pusher's store keeps its own number. A pull lands a version under the
remote's number when that is above every number the stance has here, and otherwise under the
stance's next number here, and says so. Nobody ends with a stance that cannot be pulled, and
every version of both people ends in both stores.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from deltastore import Store
from deltastore.core.hashing import canonical_json
from deltastore.sharing.remote import Remote, pull, push

from helpers import finetune_, make_model, run_cli, run_json, saved_state, store_snapshot, write_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("team-model"))


def take(pair, root: Path, stance: str, seed: int) -> str:
    """Commit a seeded fine-tune to `stance` in the store at `root`; its id."""
    ft = copy.deepcopy(pair.base_module)
    finetune_(ft, seed=seed)
    folder = write_folder(root.parent / f"ft-{seed}", saved_state(ft))
    with Store.open(root) as s:
        return s.commit(stance, folder, base="tiny", base_weights=pair.base, encoding="int8",
                        message=f"take {seed}").version.id


def ids(root: Path) -> dict[str, str]:
    """id -> ref, of every version in the store at `root`."""
    with Store.open(root) as s:
        return {v.id: v.ref for v in s.log()}


def landed_as_reported(root: Path, report: dict) -> None:
    """Each version a pull reports is in the store under the ref the report gives it here."""
    with Store.open(root) as s:
        for rv in report["pulled"] + report["already_here"]:
            assert s.resolve(rv["local"]).id == rv["id"], rv


def test_the_readme_team_workflow_two_people_pushing_one_stance_in_turns(pair, tmp_path):
    url = f"file://{tmp_path / 'shared' / 'stances'}"
    alice = tmp_path / "alice" / ".deltastore"
    with Store.init(alice) as s:
        s.add_base(pair.base, name="tiny")
    assert run_cli(alice, "remote", "add", "team", url).exit_code == 0
    a1 = take(pair, alice, "s", 1)
    run_json(alice, "push", "s", "--remote", "team")
    cloned = CliRunner().invoke(cli, ["clone", url, str(tmp_path / "bob")])
    assert cloned.exit_code == 0, cloned.output
    bob = tmp_path / "bob" / ".deltastore"

    # Both commit s@2; Alice pushes first, so Bob's s@2 becomes the remote's s@3, and his push says so.
    a2, b2 = take(pair, alice, "s", 2), take(pair, bob, "s", 3)
    run_json(alice, "push", "s", "--remote", "team")
    pushed = run_json(bob, "push", "s", "--remote", "origin")
    assert [(rv["ref"], rv["local"], rv["id"]) for rv in pushed["pushed"]] == [("s@3", "s@2", b2)]
    said = run_cli(bob, "push", "s", "--remote", "origin")
    assert said.exit_code == 0 and f"s@3 {b2[:15]} is already there (s@2 here)" in said.output

    # Bob pulls the stance as docs/sharing.md shows: Alice's s@2 cannot land on his s@2, so it takes s@3.
    got = run_cli(bob, "pull", "origin", "--stance", "s")
    assert got.exit_code == 0, got.output
    assert f"pulled s@2 {a2[:15]} as s@3 here" in got.output and "1 new versions" in got.output
    assert ids(bob) == {a1: "s@1", b2: "s@2", a2: "s@3"}
    report = run_json(alice, "pull", "team", "--stance", "s")
    assert [(rv["ref"], rv["local"]) for rv in report["pulled"]] == [("s@3", "s@3")]  # free here: as on the remote
    landed_as_reported(alice, report)

    # Again the other way round: Bob pushes first this time; then each pulls everything.
    a4, b4 = take(pair, alice, "s", 4), take(pair, bob, "s", 5)
    run_json(bob, "push", "s", "--remote", "origin")
    run_json(alice, "push", "s", "--remote", "team")
    reports = {who: run_json(who, "pull", name) for who, name in ((alice, "team"), (bob, "origin"))}
    on_remote = {rv.id for rv in Remote(url).versions()}
    assert on_remote == {a1, a2, b2, a4, b4}
    for who, report in reports.items():
        assert set(ids(who)) == on_remote
        landed_as_reported(who, report)
        assert {rv["id"] for rv in report["pulled"]} == ({b4} if who == alice else {a4})
        with Store.open(who) as s:
            assert s.fsck(read_data=True).ok
        # And the stance can be pulled again: nothing new, nothing changed.
        before = store_snapshot(who)
        again = run_json(who, "pull", "team" if who == alice else "origin")
        assert not again["pulled"] and len(again["already_here"]) == 5
        landed_as_reported(who, again)
        assert store_snapshot(who) == before


def test_a_version_pushed_second_by_each_person_is_in_both_stores_after_a_pull_by_each(pair, tmp_path):
    """Neither person pulls before pushing: both stores give s@1 and s@2 to their own versions."""
    url = f"file://{tmp_path / 'team'}"
    stores = [tmp_path / who / ".deltastore" for who in ("alice", "bob")]
    made = []
    for k, root in enumerate(stores):
        with Store.init(root) as s:
            s.add_base(pair.base, name="tiny")
        made.append([take(pair, root, "s", 10 * k + n) for n in (1, 2)])
    for root in stores:
        with Store.open(root) as s:
            push(s, ["s@1", "s@2"], url)
    for root in stores:
        with Store.open(root) as s:
            pull(s, url)
    for root, (mine, theirs) in zip(stores, (made, made[::-1])):
        with Store.open(root) as s:
            assert [v.id for v in reversed(s.log("s"))] == mine + theirs  # theirs after mine, in their order
            assert [v.number for v in s.log("s")] == [4, 3, 2, 1]


def test_one_version_under_two_refs_is_pulled_and_reported_once(pair, tmp_path):
    url = f"file://{tmp_path / 'team'}"
    a = tmp_path / "a" / ".deltastore"
    with Store.init(a) as s:
        s.add_base(pair.base, name="tiny")
    vid = take(pair, a, "s", 1)
    with Store.open(a) as s:
        push(s, ["s@1"], url)
    remote = Remote(url)
    # A remote anyone can write to may list one version twice: in its stance and in another one.
    for stance, number in (("s", 2), ("t", 1)):
        remote.fs.makedirs(remote.path("refs", stance), exist_ok=True)
        remote.fs.pipe_file(remote.ref_path(stance, number),
                            canonical_json({"id": vid, "stance": stance, "number": number}) + b"\n")
    b = tmp_path / "b" / ".deltastore"
    Store.init(b).close()
    result = run_cli(b, "pull", "--remote", url)
    assert result.exit_code == 0, result.output
    assert result.output.count("pulled ") == 1 and f"pulled s@1 {vid[:15]}" in result.output
    assert "1 new versions" in result.output
    assert ids(b) == {vid: "s@1"}
    again = run_json(b, "pull", "--remote", url)
    assert not again["pulled"] and {(rv["ref"], rv["local"]) for rv in again["already_here"]} == \
        {("s@1", "s@1"), ("s@2", "s@1"), ("t@1", "s@1")}


def test_pull_into_another_stance_from_a_remote(pair, tmp_path):
    url = f"file://{tmp_path / 'team'}"
    a, b = (tmp_path / who / ".deltastore" for who in ("a", "b"))
    for root in (a, b):
        with Store.init(root) as s:
            s.add_base(pair.base, name="tiny")
    theirs = [take(pair, a, "s", n) for n in (1, 2)]
    take(pair, a, "other", 3)
    mine = take(pair, b, "s", 4)
    with Store.open(a) as s:
        push(s, ["s@1", "s@2", "other"], url)
    before = store_snapshot(b)
    several = run_cli(b, "pull", "--remote", url, "--into", "from-a")
    assert several.exit_code == 1 and len(several.output.strip().splitlines()) == 1
    assert "--into takes the versions of one stance" in several.output
    assert store_snapshot(b) == before
    got = run_json(b, "pull", "--remote", url, "--stance", "s", "--into", "from-a")
    assert [(rv["ref"], rv["local"]) for rv in got["pulled"]] == [("s@1", "from-a@1"), ("s@2", "from-a@2")]
    assert ids(b) == {mine: "s@1", theirs[0]: "from-a@1", theirs[1]: "from-a@2"}
    # A version already here stays where it is: a pull into yet another stance brings nothing.
    assert not run_json(b, "pull", "--remote", url, "--stance", "s", "--into", "again")["pulled"]
    assert ids(b) == {mine: "s@1", theirs[0]: "from-a@1", theirs[1]: "from-a@2"}
