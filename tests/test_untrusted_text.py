"""Text and names from outside are data: nothing a pulled repo (or a user) writes can take over a
terminal or a ref.

The hostile repo is written with the plain huggingface_hub client against a local Hub server,
as anyone could: its manifest carries terminal escapes (C0, DEL, C1, bidirectional overrides)
in the message, the metadata keys and values and `created`; the payloads are real, so every
hash checks out and only the text is hostile.
"""

from __future__ import annotations

import copy
import json
import os
import pty
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd, HfApi, constants
from safetensors.torch import save as save_safetensors

from cli.main import cli
from cli.output import escape
from deltastore import Store
from deltastore.core.errors import AmbiguousRef, PulledDataRejected, RefNotFound, UnsafeInput
from deltastore.core.hashing import canonical_json, manifest_id
from deltastore.sharing.hub import pull, push

from helpers import finetune_, make_model, saved_state, store_snapshot, write_folder
from hubserver import HubServer

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-mallory"
REPO = "mallory/stances"

# What a hostile repo can do to a terminal: set the title, clear the screen, print fake text
# in green and hide what follows; write the clipboard (OSC 52); the same in 8-bit C1 form; text
# reversed by bidirectional overrides.
TITLE_CLEAR_FAKE = "\x1b]0;pwned\x07\x1b[2J\x1b[H\x1b[1;32mall checks passed\x1b[8m"
CLIPBOARD = "\x1b]52;c;cm0gLXJmIH4=\x07"
C1 = "\x9b2J\x9d0;c1\x9c\x85"
BIDI = "\u202etxt.exe\u202c \u2066iso\u2069 \u200f\u061c"
MESSAGE = TITLE_CLEAR_FAKE + CLIPBOARD + C1 + BIDI + "\x7f\x00\r\nsecond line\tcell"
# Keys may not hold C0 or DEL (a local rule since metadata existed); C1 and bidi they may.
METADATA = {"lr\u202e\x9b31m": TITLE_CLEAR_FAKE, "note": CLIPBOARD + C1 + BIDI, "plain": "2e-5"}
CREATED = "2026\x1b]0;t\x07-11-30T00:00:00\x9b8mZ"
BIDI_CHARS = set("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    pair = make_model(tmp)
    fts = []
    for n in range(3):
        module = copy.deepcopy(pair.base_module)
        finetune_(module, seed=500 + n)
        fts.append(write_folder(tmp / f"ft-{n}", saved_state(module)))
    return pair, fts


@pytest.fixture
def store(tmp_path, models):
    pair, _ = models
    with Store.init(tmp_path / "store") as s:
        s.add_base(pair.base, name="tiny")
        yield s


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with HubServer(tmp_path / "hub", tokens={TOKEN: "mallory"}) as server:
        yield server


def hostile_repo(hub, source: Store, ref: str, *, stance: str = "curious", message: str = MESSAGE,
                 metadata: dict | None = None, created: str = CREATED) -> str:
    """Commit a repo holding `ref`'s payloads under a rewritten manifest, with the plain client.
    Returns the version id the manifest hashes to."""
    v = source.resolve(ref)
    m = v.manifest()
    m.update(stance=stance, number=1, parent=None, message=message,
             metadata=METADATA if metadata is None else metadata, created=created)
    vid = manifest_id(m)
    tensors = {}
    for e in v.tensors:
        for part, o in e.objects.items():
            data = source.objects.get(o.id, raw_size=o.size)
            tensors[f"{e.name}::{part}"] = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if o.size
                                            else torch.empty(0, dtype=torch.uint8))
    payload = save_safetensors(tensors, metadata={"deltastore.format": "deltastore/hub/1", "deltastore.version": vid,
                                                  "deltastore.manifest": canonical_json(m).decode()})
    entry = {"number": 1, "id": vid, "parent": None, "base": v.base_id, "encoding": v.encoding,
             "encodings": sorted({e.encoding for e in v.tensors}), "tensors": len(v.tensors),
             "bytes": sum(o.size for e in v.tensors for o in e.objects.values()), "created": created,
             "message": message, "tag": f"{stance}-v1",
             "files": {"payloads": f"{stance}/v1.safetensors", "manifest": f"{stance}/v1.json"}}
    index = {"format": "deltastore/hub/1", "stances": {stance: [entry]},
             "bases": {v.base_id: {"name": TITLE_CLEAR_FAKE, "hub_id": CLIPBOARD, "tensors": None, "bytes": None}}}
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(REPO, exist_ok=True)
    api.create_commit(REPO, [CommitOperationAdd("deltastore.json", json.dumps(index).encode()),
                             CommitOperationAdd(f"{stance}/v1.json", canonical_json(m)),
                             CommitOperationAdd(f"{stance}/v1.safetensors", payload)], commit_message="hostile")
    return vid


def pull_from(store, hub, tmp_path, **kwargs):
    return pull(store, REPO, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache", progress=False, **kwargs)


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run_on_a_terminal(commands: list[list[str]], env: dict[str, str]) -> bytes:
    """Run deltastore commands in one child process whose stdin, stdout and stderr are a
    pseudo-terminal; everything it wrote there."""
    script = ("import json, sys\nfrom cli.main import cli\nprint('tty' if sys.stdout.isatty() else 'no tty')\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    try:\n        cli.main(args, prog_name='deltastore')\n    except SystemExit:\n        pass\n")
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", script, json.dumps(commands)], stdin=slave, stdout=slave,
                         stderr=slave, cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child and every copy of the terminal's end are gone
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
    finally:
        os.close(master)
        p.wait(timeout=60)
    return bytes(out)


def control_characters(text: str) -> list[str]:
    # The terminal turns "\n" into "\r\n"; any other C0, DEL, C1 or bidi character came from data.
    return sorted({c for c in text if (ord(c) < 32 and c not in "\r\n") or 0x7f <= ord(c) <= 0x9f or c in BIDI_CHARS})


# -- 1. display is escaped ---------------------------------------------------------------------------


def test_escape_shows_every_control_character_and_keeps_the_rest():
    assert escape("a\x1b]0;t\x07b") == "a\\x1b]0;t\\x07b"
    assert escape("x\ny\tz\r") == "x\\ny\\tz\\r"
    assert escape("\x9b\x85\x7f\x00") == "\\x9b\\x85\\x7f\\x00"
    assert escape("\u202eabc\u202c\u2066\u2069\u200f\u2028") == "\\u202eabc\\u202c\\u2066\\u2069\\u200f\\u2028"
    assert escape("curious-uncertainty@2 é — 学 \\x1b") == "curious-uncertainty@2 é — 学 \\x1b"
    assert escape(5) == "5"


def test_a_hostile_repo_prints_no_control_character_on_a_terminal(models, store, hub, tmp_path):
    pair, fts = models
    source = Store.init(tmp_path / "source")
    source.add_base(pair.base, name="tiny")
    source.commit("curious", fts[0], base="tiny")
    vid = hostile_repo(hub, source, "curious@1")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1", "DELTASTORE_DIR": str(store.root),
           "PYTHONPATH": str(ROOT), "TERM": "xterm"}
    short = vid[3:15]
    out = run_on_a_terminal([["pull", REPO], ["log"], ["log", "curious"], ["show", "curious@1"], ["show", short],
                             ["stances"], ["stats"], ["show", "curious@\x1b]0;t\x07"],
                             ["log", "--where", f"lr\u202e\x9b31m={TITLE_CLEAR_FAKE}"]], env)
    text = out.decode("utf-8")
    assert text.startswith("tty"), text[:200]  # the commands really wrote to a terminal
    assert b"\x1b" not in out and b"\x07" not in out
    assert control_characters(text) == []
    # What the manifest says is all there, shown as escapes.
    assert "pulled curious@1" in text
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[H\\x1b[1;32mall checks passed\\x1b[8m" in text  # log and show
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07" in text
    assert "\\x9b2J\\x9d0;c1\\x9c\\x85" in text and "\\u202etxt.exe\\u202c" in text
    assert "\\x7f\\x00\\r\\nsecond line\\tcell" in text
    assert "meta     lr\\u202e\\x9b31m=" in text
    assert "created  2026\\x1b]0;t\\x07-11-30T00:00:00\\x9b8mZ" in text
    assert "no version matches 'curious@\\x1b]0;t\\x07'" in text  # an error echoing a typed ref
    assert text.count(f"curious@1  {short}") >= 3  # log, log curious, log --where
    assert "Traceback" not in text


def test_json_output_round_trips_the_exact_strings(models, store, hub, tmp_path):
    pair, fts = models
    source = Store.init(tmp_path / "source")
    source.add_base(pair.base, name="tiny")
    source.commit("curious", fts[0], base="tiny")
    vid = hostile_repo(hub, source, "curious@1")
    r = invoke("--store", store.root, "pull", REPO, "--endpoint", hub.url, "--token", TOKEN, "--json")
    assert r.exit_code == 0, r.output
    assert r.stdout.isascii()  # every control character written as \u escape
    shown = json.loads(invoke("--store", store.root, "show", "curious@1", "--json").stdout)
    assert (shown["id"], shown["message"], shown["metadata"], shown["created"]) == (vid, MESSAGE, METADATA, CREATED)
    logged = json.loads(invoke("--store", store.root, "log", "--json").stdout)
    assert [(v["message"], v["metadata"], v["created"]) for v in logged] == [(MESSAGE, METADATA, CREATED)]
    # And the library hands them over untouched.
    v = store.resolve("curious@1")
    assert (v.message, v.metadata, v.created) == (MESSAGE, METADATA, CREATED)


def test_local_text_is_escaped_too(models, store, tmp_path):
    _, fts = models
    store.commit("mine", fts[0], base="tiny", message="fine\x1b[2J", metadata={"k\u202e": "v\x07"})
    r = invoke("--store", store.root, "log")
    assert "fine\\x1b[2J" in r.stdout and "\x1b" not in r.stdout
    r = invoke("--store", store.root, "show", "mine")
    assert "meta     k\\u202e=v\\x07" in r.stdout and "\x07" not in r.stdout


def test_stored_text_is_bounded(models, store):
    from deltastore.core.errors import MetadataError
    from deltastore.core.names import MAX_MESSAGE, MAX_METADATA_KEY, MAX_METADATA_KEYS, MAX_METADATA_VALUE

    _, fts = models
    before = store_snapshot(store.root)
    with pytest.raises(UnsafeInput, match=f"at most {MAX_MESSAGE} are stored"):
        store.commit("mine", fts[0], base="tiny", message="x" * (MAX_MESSAGE + 1))
    with pytest.raises(MetadataError, match="not allowed"):
        store.commit("mine", fts[0], base="tiny", metadata={"k" * (MAX_METADATA_KEY + 1): "v"})
    with pytest.raises(MetadataError, match="longer than"):
        store.commit("mine", fts[0], base="tiny", metadata={"k": "v" * (MAX_METADATA_VALUE + 1)})
    with pytest.raises(MetadataError, match=f"at most {MAX_METADATA_KEYS}"):
        store.commit("mine", fts[0], base="tiny", metadata={f"k{n}": "v" for n in range(MAX_METADATA_KEYS + 1)})
    assert store_snapshot(store.root) == before
    r = invoke("--store", store.root, "commit", "mine", fts[0], "--base", "tiny", "-m", "x" * (MAX_MESSAGE + 1))
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and len(r.stderr) < 200


def test_a_pulled_manifest_over_the_bounds_is_refused(models, store, hub, tmp_path):
    from deltastore.core.names import MAX_MESSAGE

    pair, fts = models
    source = Store.init(tmp_path / "source")
    source.add_base(pair.base, name="tiny")
    source.commit("curious", fts[0], base="tiny")
    hostile_repo(hub, source, "curious@1", message="x" * (MAX_MESSAGE + 1), metadata={})
    before = store_snapshot(store.root)
    with pytest.raises(PulledDataRejected, match=f"at most {MAX_MESSAGE} are stored"):
        pull_from(store, hub, tmp_path)
    assert store_snapshot(store.root) == before


# -- 2. names cannot shadow ids ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ee74cce54678", "deadbeef", "DEADBEEF99", "0123456789abcdef0123"])
def test_a_hex_only_name_is_refused_locally(models, store, name):
    pair, fts = models
    v = store.commit("mine", fts[0], base="tiny").version
    before = store_snapshot(store.root)
    for call in (lambda: store.commit(name, fts[1], base="tiny"), lambda: store.rename_stance("mine", name),
                 lambda: store.tag("mine@1", name), lambda: store.commit("mine", fts[1], base="tiny", tag=name),
                 lambda: store.add_base(pair.base, name=name)):
        with pytest.raises(UnsafeInput, match="would read as a version id"):
            call()
    assert store_snapshot(store.root) == before
    r = invoke("--store", store.root, "commit", name, fts[1], "--base", "tiny")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "would read as a version id" in r.stderr
    assert store.resolve(v.short_id).id == v.id


def test_names_that_are_not_hex_only_stay_allowed(models, store):
    _, fts = models
    for name in ("deadbee", "deadbeef-2", "cafe-babe-0123", "g0123456789"):  # 7 digits, a '-', a letter past f
        store.commit(name, fts[0], base="tiny")
    store.tag("deadbee@1", "v1.0-abcdef12")
    assert sorted(s["name"] for s in store.stances()) == ["cafe-babe-0123", "deadbee", "deadbeef-2", "g0123456789"]


def test_a_hex_only_name_is_refused_from_a_pull(models, store, hub, tmp_path):
    pair, fts = models
    source = Store.init(tmp_path / "source")
    source.add_base(pair.base, name="tiny")
    v = source.commit("curious", fts[0], base="tiny").version
    hostile_repo(hub, source, "curious@1", stance=v.short_id, message="", metadata={})
    before = store_snapshot(store.root)
    with pytest.raises(PulledDataRejected, match="would read as a version id"):
        pull_from(store, hub, tmp_path)
    assert store_snapshot(store.root) == before


def test_ref_resolution_order(models, store):
    """FORMAT.md, section 5: STANCE@N, STANCE@TAG, b3:<hex> (an id prefix, always), STANCE, and
    a bare id prefix of 8+ hex digits only where no stance has that name."""
    _, fts = models
    one = store.commit("mine", fts[0], base="tiny", tag="first").version
    two = store.commit("mine", fts[1], base="tiny").version
    other = store.commit("other", fts[2], base="tiny").version
    assert store.resolve("mine").id == two.id
    assert store.resolve("mine@1").id == one.id and store.resolve("mine@first").id == one.id
    assert store.resolve(one.id).id == one.id and store.resolve(one.id[:11]).id == one.id  # b3: + 8 digits
    assert store.resolve(one.short_id[:8]).id == one.id
    with pytest.raises(RefNotFound):
        store.resolve(one.short_id[:7])  # too short to be read as an id
    # A store from before the rule may hold a stance named like an id prefix: a bare ref matching
    # both is ambiguous (never silently the stance); its STANCE@N form and b3: form are not.
    store.catalog.rename_stance("other", two.short_id)
    with pytest.raises(AmbiguousRef, match="write .*@N"):
        store.resolve(two.short_id)
    assert store.resolve(f"{two.short_id}@1").id == other.id
    assert store.resolve("b3:" + two.short_id).id == two.id


# -- 4. refs parsed with bounds ------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["mine@99999999999999999999", "mine@" + "9" * 5000, "mine@2147483648",
                                 "mine@0", "mine@\u00b2", "mine@\uff11", "@1", "mine@", "b3:zz", "b3:"])
def test_refs_out_of_bounds_are_no_such_version(models, store, ref):
    _, fts = models
    store.commit("mine", fts[0], base="tiny")
    with pytest.raises(RefNotFound):
        store.resolve(ref)
    r = invoke("--store", store.root, "show", ref)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "no version matches" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr) < 300


def test_long_names_are_cut_in_messages(models, store):
    _, fts = models
    store.commit("mine", fts[0], base="tiny")
    long = "t" * 10_000
    for args in (["tag", "mine@1", long], ["show", long], ["show", f"mine@{long}"], ["log", long],
                 ["tag", "--delete", f"mine@{long}"], ["stance", "rename", long, "x"]):
        r = invoke("--store", store.root, *args)
        assert r.exit_code == 1 and r.stderr.count("\n") == 1, (args[0], r.stderr[:200])
        assert len(r.stderr) < 400 and "characters)" in r.stderr, r.stderr[:400]


# -- 5. pipes ---------------------------------------------------------------------------------------------


def cli_process(store: Store, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DELTASTORE_DIR": str(store.root)}
    return subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()", *args], cwd=ROOT, env=env,
                            **kwargs)


def test_output_to_a_closed_pipe_ends_quietly(models, store, tmp_path):
    _, fts = models
    for n in range(3):  # more than a pipe holds (64 kB), so that `head` leaves before the end
        store.commit("mine", fts[n], base="tiny", message="m" * 60_000)
    # The reader gone before anything is written.
    for args in (["log"], ["show", "mine"], ["stats"]):
        read, write = os.pipe()
        os.close(read)
        with open(tmp_path / "err", "wb") as err:
            p = cli_process(store, *args, stdout=write, stderr=err)
        os.close(write)
        assert p.wait(timeout=120) in (0, 141), args
        assert (tmp_path / "err").read_bytes() == b"", args
    # `deltastore log | head -1`.
    with open(tmp_path / "err", "wb") as err:
        p = cli_process(store, "log", stdout=subprocess.PIPE, stderr=err)
    head = subprocess.Popen(["head", "-1"], stdin=p.stdout, stdout=subprocess.PIPE)
    p.stdout.close()
    first = head.communicate(timeout=120)[0]
    assert p.wait(timeout=120) in (0, 141)
    assert first.startswith(b"version") and (tmp_path / "err").read_bytes() == b""


# -- 6. the Hub cache ------------------------------------------------------------------------------------


def test_a_damaged_hub_cache_is_named_and_force_download_fetches_afresh(models, store, hub, tmp_path):
    pair, fts = models
    source = Store.init(tmp_path / "source")
    source.add_base(pair.base, name="tiny")
    source.commit("curious", fts[0], base="tiny", message="honest")
    push(source, ["curious@1"], REPO, token=TOKEN, endpoint=hub.url, progress=False)
    with Store.init(tmp_path / "first") as first:
        first.add_base(pair.base)
        pull_from(first, hub, tmp_path)
    blob = (tmp_path / "cache").glob("models--mallory--stances/snapshots/*/curious/v1.safetensors")
    blob = next(blob).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))

    before = store_snapshot(store.root)
    with pytest.raises(PulledDataRejected) as err:
        pull_from(store, hub, tmp_path)
    assert "local Hugging Face cache" in str(err.value) and "--force-download" in str(err.value)
    assert "\n" not in str(err.value)
    assert store_snapshot(store.root) == before
    r = pull_from(store, hub, tmp_path, force_download=True)
    assert [hv.ref for hv in r.pulled] == ["curious@1"]
    assert store.resolve("curious@1").id == source.resolve("curious@1").id
    # A file the Hub itself serves wrong is not blamed on the cache.
    hostile_repo(hub, source, "curious@1", stance="other", message="", metadata={})
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_commit(REPO, [CommitOperationAdd("other/v1.json", b"{}")], commit_message="break")
    with pytest.raises(PulledDataRejected) as err:
        pull_from(store, hub, tmp_path, stance="other")
    assert "cache" not in str(err.value)


# -- 7. temporary folders ----------------------------------------------------------------------------


def test_push_leaves_no_folder_behind_and_fsck_removes_a_killed_ones(models, store, hub, tmp_path):
    _, fts = models
    store.commit("mine", fts[0], base="tiny")
    system_tmp = set(Path(tempfile.gettempdir()).glob("deltastore-push-*"))
    push(store, ["mine@1"], REPO, token=TOKEN, endpoint=hub.url, progress=False)
    store.commit("mine", fts[1], base="tiny")
    with HubServer(tmp_path / "other-hub", tokens={"tok-reader": "reader", TOKEN: "mallory"}) as other:
        push(store, ["mine@1"], REPO, token=TOKEN, endpoint=other.url, progress=False)
        with pytest.raises(Exception, match="no access"):  # refused after its files were written
            push(store, ["mine@2"], REPO, token="tok-reader", endpoint=other.url, progress=False)
    assert list((store.root / "tmp").iterdir()) == []
    assert set(Path(tempfile.gettempdir()).glob("deltastore-push-*")) == system_tmp

    # A push killed on the way leaves its folder in tmp/, where fsck --repair finds it.
    dead = store.root / "tmp" / "999999999-push-0123abcd"
    (dead / "mine").mkdir(parents=True)
    (dead / "mine" / "v2.safetensors").write_bytes(b"x" * 1000)
    live = store.root / "tmp" / f"{os.getpid()}-push-4567cdef"
    live.mkdir()
    report = store.fsck()
    assert any(p.kind == "tmp-file" and p.subject == str(dead) for p in report.problems)
    assert store.gc_plan().tmp_files == (str(dead),)
    report = store.fsck(repair=True)
    assert f"removed {dead}" in report.repaired and not dead.exists() and live.exists()
