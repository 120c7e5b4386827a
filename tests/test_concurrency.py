"""Many writers on one store: processes committing to one stance, tagging, and running gc at
the same time. None loses another's work; numbers come out 1..N without gaps or duplicates."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from deltastore import Store

from helpers import assert_same_state, load_folder, make_model, write_folder

WRITERS = 4
VERSIONS_EACH = 5

# One process: wait until every process is ready (imports are slow, commits are fast), then
# either commit its models one after another, tagging some, or run gc in a loop until told to
# stop, each round first landing and deleting a scratch stance made of one of the writers'
# models: gc then has objects to remove that a commit may be reusing at that very moment.
WORKER = r"""
import json, sys, time
from pathlib import Path
from deltastore import Store

root, role, arg = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
sync = root.parent / "sync"
(sync / f"ready-{role}-{arg.get('writer', 'gc')}").touch()
while not (sync / "go").exists():
    time.sleep(0.01)
if role == "commit":
    for k, (model, name) in enumerate(arg["models"]):
        with Store.open(root) as store:
            v = store.commit("shared", model, base=arg["base"], message=name,
                             metadata={"writer": str(arg["writer"]), "model": name},
                             tag=name if k % 2 == 0 else None).version
            if k == 1:
                store.tag(v.id, f"second-of-{arg['writer']}")
    print("done", flush=True)
else:
    rounds = removed = 0
    with Store.open(root) as store:
        while True:
            stop = (sync / "stop").exists()
            model = arg["scratch"][rounds % len(arg["scratch"])]
            store.commit("scratch", model, base=arg["base"])
            store.delete_stance("scratch")
            removed += len(store.gc().removed)
            rounds += 1
            if stop:
                break
    print(json.dumps({"rounds": rounds, "removed": removed}), flush=True)
"""


def test_four_writers_and_a_gc_loop_lose_nothing(tmp_path) -> None:
    pair = make_model(tmp_path, layers=2, hidden=8)
    names = sorted(pair.base_state)
    shared_heads = [torch.randn(pair.base_state["head.weight"].shape, generator=torch.Generator().manual_seed(s))
                    for s in range(3)]
    models: dict[str, Path] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(WRITERS * VERSIONS_EACH):
        gen = torch.Generator().manual_seed(100 + i)
        state = {n: t.clone() for n, t in pair.base_state.items()}
        # Objects shared between versions (and with the scratch stance), and one of its own.
        state["head.weight"] = shared_heads[i % 3].clone()
        own = names[i % len(names)]
        state[own] = state[own] + 0.01 * torch.randn(state[own].shape, generator=gen)
        name = f"m{i:02d}"
        models[name] = write_folder(tmp_path / "models" / name, state)
        states[name] = state

    root = tmp_path / "store"
    with Store.init(root) as store:
        base = store.add_base(pair.base, name="tiny").id
    sync = tmp_path / "sync"
    sync.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def start(role: str, arg: dict) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(root), role, json.dumps(arg)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    order = sorted(models)
    writers = [start("commit", {"writer": w, "base": base,
                                "models": [[str(models[n]), n] for n in order[w::WRITERS]]})
               for w in range(WRITERS)]
    # The scratch stance lands the very models the writers are committing, so gc keeps
    # removing objects that a writer may be about to reuse, until that writer's version lands.
    collector = start("gc", {"base": base, "scratch": [str(models[n]) for n in reversed(order)]})
    procs = writers + [collector]
    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready-*"))) < len(procs):
        assert time.monotonic() < deadline, "workers never got ready"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    (sync / "go").touch()
    for p in writers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    (sync / "stop").touch()
    out, err = collector.communicate(timeout=120)
    assert collector.returncode == 0, err
    done = json.loads(out)
    assert done["rounds"] >= 1 and done["removed"] >= 1

    with Store.open(root) as store:
        log = store.log("shared")
        assert sorted(v.number for v in log) == list(range(1, WRITERS * VERSIONS_EACH + 1))
        # One line of history: each version's parent is the one numbered just before it.
        by_number = {v.number: v for v in log}
        assert [by_number[n].parent for n in range(1, len(log) + 1)] == \
            [None] + [by_number[n].id for n in range(1, len(log))]
        assert sorted(v.message for v in log) == order
        # Each writer's own versions landed in the order it made them.
        for w in range(WRITERS):
            mine = sorted((v for v in log if v.metadata["writer"] == str(w)), key=lambda v: v.number)
            assert [v.message for v in mine] == order[w::WRITERS]
        tags = {t["name"]: t["version_id"] for t in store.catalog.tags()}
        tagged = {n for w in range(WRITERS) for k, n in enumerate(order[w::WRITERS]) if k % 2 == 0}
        assert {n for n in tags if n.startswith("m")} == tagged
        assert all(store.resolve(f"shared@{n}").message == n for n in tagged)
        assert len([n for n in tags if n.startswith("second-of-")]) == WRITERS
        for v in log:
            out = store.export(v, tmp_path / "exports" / v.message)
            assert_same_state(load_folder(out), states[v.message])
        report = store.fsck(read_data=True)
        assert report.ok, report.errors
        assert not report.kinds() & {"stale-pending", "tmp-file"}
        assert [s["name"] for s in store.stances()] == ["shared"]
