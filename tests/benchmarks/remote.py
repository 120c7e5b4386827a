"""Sharing a stance through S3: deltastore push and clone against copying the full fine-tuned
model through the same client, in one run.

    python tests/benchmarks/remote.py [--model tiny|smollm|qwen0.5b] [--encoding int4] [--json]

The S3 endpoint is moto's server on 127.0.0.1 (what the tests use), reached through s3fs, so
the figures measure deltastore's own work (reading, checking, listing) and the bytes that
cross the wire, not a real network. Peers, in the same run and the same bucket:
- `aws s3 cp`-equivalent: s3fs `put` of the fine-tune's weight files, then `get` back;
- deltastore: `push` of the stance from a store holding it, then `clone` into a new store
  (which downloads the base's two small records, the manifest and the stance's objects, and
  checks each), then a second push and pull, which move no object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
from models import MODELS, build  # noqa: E402


def timed(call):
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, default="smollm")
    ap.add_argument("--encoding", default="int4")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import s3fs
    from moto.server import ThreadedMotoServer

    from deltastore import Store
    from deltastore.sharing.remote import clone, pull, push

    folders = build(args.model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    url = f"s3://{bucket}/deltas"
    out: dict = {"model": args.model, "encoding": args.encoding}
    try:
        with tempfile.TemporaryDirectory(prefix="deltastore-remote-bench-") as tmp:
            tmp = Path(tmp)
            weights = sorted(folders["adam"].glob("*.safetensors"))
            full_bytes = sum(p.stat().st_size for p in weights)
            t_put, _ = timed(lambda: [fs.put_file(str(p), f"{bucket}/full/{p.name}") for p in weights])
            t_get, _ = timed(lambda: [fs.get_file(f"{bucket}/full/{p.name}", str(tmp / p.name)) for p in weights])
            out["full_copy"] = {"bytes": full_bytes, "put_s": t_put, "get_s": t_get}

            with Store.init(tmp / "a") as a:
                a.add_base(folders["base"], name="base")
                t_commit, _ = timed(lambda: a.commit("stance", folders["adam"], base="base", encoding=args.encoding))
                t_push, pushed = timed(lambda: push(a, ["stance"], url))
                t_again, again = timed(lambda: push(a, ["stance"], url))
            t_clone, (b, cloned) = timed(lambda: clone(url, tmp / "b"))
            t_pull_again, pulled_again = timed(lambda: pull(b, url))
            b.close()
            out["deltastore"] = {
                "commit_s": t_commit,
                "push_s": t_push, "push_bytes": pushed.bytes_uploaded, "push_objects": pushed.objects_uploaded,
                "clone_s": t_clone, "clone_bytes": cloned.bytes_downloaded, "clone_objects": cloned.objects_downloaded,
                "second_push_s": t_again, "second_push_bytes": again.bytes_uploaded,
                "second_pull_s": t_pull_again, "second_pull_bytes": pulled_again.bytes_downloaded,
            }
    finally:
        server.stop()
    if args.json:
        print(json.dumps(out, indent=1))
        return
    f, d = out["full_copy"], out["deltastore"]
    print(f"{args.model}, stance stored {args.encoding}, S3 = moto on 127.0.0.1 through s3fs")
    print(f"{'':34}{'bytes':>14}{'up s':>9}{'down s':>9}")
    print(f"{'full fine-tune (s3fs put/get)':34}{f['bytes']:>14,}{f['put_s']:>9.2f}{f['get_s']:>9.2f}")
    print(f"{'deltastore push / clone':34}{d['push_bytes']:>14,}{d['push_s']:>9.2f}{d['clone_s']:>9.2f}")
    print(f"{'again (already there)':34}{d['second_push_bytes']:>14,}{d['second_push_s']:>9.2f}{d['second_pull_s']:>9.2f}")
    print(f"bytes: {d['push_bytes'] / f['bytes']:.3f} of the full copy; commit took {d['commit_s']:.2f} s")


if __name__ == "__main__":
    main()
