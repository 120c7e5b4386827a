"""A Hub repo's model card, README.md: YAML front matter the Hub reads, then what the repo holds
and how to apply it (with deltastore, or without)."""

from __future__ import annotations

import json
from typing import Any

from ..core.units import size
from .hubindex import INDEX_FILE, META_MANIFEST, PART_SEPARATOR


def model_card(repo_id: str, index: dict) -> str:
    """README.md: YAML front matter the Hub reads, then what the repo holds and how to use it."""
    hub_ids = sorted({b["hub_id"] for b in index["bases"].values() if b.get("hub_id")})
    encodings = sorted({enc.split(":")[0] for es in index["stances"].values() for e in es for enc in e["encodings"]})
    q = json.dumps  # a JSON string is a YAML scalar, whatever it holds
    yaml = ["---", "library_name: deltastore"]
    if len(hub_ids) == 1:
        yaml.append(f"base_model: {q(hub_ids[0])}")
    elif hub_ids:
        yaml += ["base_model:"] + [f"- {q(h)}" for h in hub_ids]
    yaml.append("base_model_relation: adapter")
    yaml += ["tags:"] + [f"- {q(t)}" for t in ["deltastore", "stance-delta", *encodings]]
    yaml.append("---")

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = yaml + ["", f"# {repo_id}", "",
                    "Fine-tuning deltas (\"stances\") of a base model, stored with deltastore: each version holds "
                    "per-tensor differences against its base, identified by content hashes, and verified "
                    "when pulled.", "", "## Bases", "",
                    "| base id | name | Hub id | Hub commit | tensors | size |", "| --- | --- | --- | --- | --- | --- |"]
    for bid, b in sorted(index["bases"].items()):
        commit = f"`{b['hub_revision']}`" if b.get("hub_revision") else "-"
        lines.append(f"| `{bid[:19]}` | {cell(b.get('name') or '-')} | {cell(b.get('hub_id') or '-')} | {commit} | "
                     f"{b.get('tensors', '-')} | {size(b.get('bytes'))} |")
    lines += ["", "## Stances", "",
              "| stance | version | revision | id | encodings | tensors | size | created | message |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stance, entries in sorted(index["stances"].items()):
        for e in entries:
            lines.append(f"| {cell(stance)} | {e['number']} | `{e['tag']}` | `{e['id'][:15]}` | "
                         f"{cell(', '.join(e['encodings']))} | {e['tensors']} | {size(e['bytes'])} | "
                         f"{cell(e['created'][:10])} | {cell(e['message'] or '-')} |")
    first = next(((s, es[-1]) for s, es in sorted(index["stances"].items()) if es), None)
    ref = f"{first[0]}@{first[1]['number']}" if first else "STANCE@N"
    tag = first[1]["tag"] if first else "STANCE-vN"
    base_hint = f" --hub-id {hub_ids[0]}" if len(hub_ids) == 1 else ""
    name = ref.split("@")[0]
    if index["bases"] and all(b.get("hub_revision") for b in index["bases"].values()):
        # Every base was fetched from the Hub at a known commit: a pull can fetch that one.
        lines += ["", "## How to apply", "",
                  "In Python, in one line: the base is fetched from the Hub at the commit the stances were "
                  "made on, the stance pulled (every hash checked) and applied in place:", "", "```python",
                  "import deltastore", "",
                  f"model = deltastore.load({q(repo_id)}, stance={q(name)})", "model.generate(...)",
                  "model.deltastore.revert()   # the base again, bit for bit; .switch(\"STANCE\") for another",
                  "```", "", "or from the command line (the pull refuses a base whose weights at that commit are "
                  "not those the stances were made on):", "", "```bash", "pip install deltastore",
                  "deltastore init",
                  f"deltastore pull {repo_id} --fetch-base    # everything; --stance S for one stance",
                  f"deltastore pull {repo_id} --revision {tag} --fetch-base   # one version",
                  f"deltastore export {ref} --out ./{ref.replace('@', '-v')}",
                  "```", ""]
    else:
        lines += ["", "## How to apply", "",
                  "Register your copy of the base model, pull, then apply a version (the pull refuses any "
                  "delta whose base differs from yours, and checks every hash):", "", "```bash",
                  "pip install deltastore", "deltastore init",
                  f"deltastore base add path/to/base-model{base_hint}",
                  f"deltastore pull {repo_id}                 # everything; --stance S for one stance",
                  f"deltastore pull {repo_id} --revision {tag}   # one version",
                  f"deltastore apply {ref} path/to/base-model --out ./{ref.replace('@', '-v')}",
                  "```", "", "or on a loaded model, in place and reverted exactly afterwards:", "", "```python",
                  "from deltastore import Store", "from deltastore.hub import pull", "",
                  "store = Store.open()", f"pull(store, {q(repo_id)})",
                  f"with store.applied(model, {q(ref)}):", "    model.generate(...)", "```", ""]
    lines += [
              "## Reading it without deltastore", "",
              f"`{INDEX_FILE}` lists the stances and versions. Each version is `STANCE/vN.safetensors`, "
              f"whose `uint8` tensors `<tensor name>{PART_SEPARATOR}<part>` are the encoded deltas, with the "
              f"manifest (encodings, shapes, hashes) in its metadata under `{META_MANIFEST}`, and "
              "`STANCE/vN.json`, the same manifest; its BLAKE3 is the version id. Each version is "
              "also the Hub revision `STANCE-vN`.", ""]
    return "\n".join(lines)
