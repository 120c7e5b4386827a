"""mixedrank-aw:R, fitted to the activations on calibration prompts: it keeps a layer's outputs
better than plain mixedrank in the same bytes, decodes as mixedrank does, records its prompts,
and is refused in one line without them."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from cli.main import cli  # noqa: E402
from deltastore import Store  # noqa: E402
from deltastore.codecs import encodings  # noqa: E402
from deltastore.core.hashing import bytes_id  # noqa: E402
from deltastore.metrics.calibration import calibrate  # noqa: E402
from tiny_lm import adam_like, pair, prompts_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fitting_to_the_inputs_keeps_the_outputs_better_in_the_same_bytes() -> None:
    g = torch.Generator().manual_seed(7)
    # Inputs that use few directions strongly, as a layer's activations do.
    x = torch.randn(400, 48, generator=g) * torch.logspace(0, -3, 48)
    dw = torch.randn(64, 48, generator=g) * 1e-3
    cov = (x.double().T @ x.double())
    zero = torch.zeros(64, 48)
    plain, fitted = encodings.get("mixedrank:2"), encodings.get("mixedrank-aw:2", calibration={"w": cov})
    out = {}
    for name, enc in (("plain", plain), ("fitted", fitted.for_tensor("w"))):
        encoded = enc.encode(zero, dw)
        out[name] = (sum(len(p) for p in encoded.parts.values()),
                     float(((enc.decode(zero, encoded, dtype=torch.float32, shape=(64, 48)) - dw) @ x.T).norm()))
        # Decoded by the entry's own record, as apply decodes it: no calibration needed.
        again = encodings.from_params(enc.spec, encoded.params)
        assert torch.equal(again.decode(zero, encoded, dtype=torch.float32, shape=(64, 48)),
                           enc.decode(zero, encoded, dtype=torch.float32, shape=(64, 48)))
    assert out["fitted"][0] <= out["plain"][0] * 1.01
    assert out["fitted"][1] < 0.5 * out["plain"][1], out


def test_commit_with_calibration_records_the_prompts_and_applies_bit_exact(tmp_path) -> None:
    base, ft = pair(tmp_path, adam_like(0.02))
    prompts = prompts_file(tmp_path)
    root = tmp_path / "store"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", str(root)]).exit_code == 0
    s = ["--store", str(root)]
    refused = runner.invoke(cli, [*s, "commit", "c", str(ft), "--base", str(base), "--encoding", "mixedrank-aw:4"])
    assert refused.exit_code == 1 and "--calibration FILE" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    done = runner.invoke(cli, [*s, "commit", "c", str(ft), "--base", str(base), "--encoding", "mixedrank-aw:4",
                               "--calibration", str(prompts), "--json"])
    assert done.exit_code == 0, done.output
    shown = json.loads(runner.invoke(cli, [*s, "show", "c@1", "--json"]).stdout)
    assert shown["metadata"]["calibration.prompts"] == "prompts.txt"
    assert shown["metadata"]["calibration.prompts_id"] == bytes_id(prompts.read_bytes())
    with Store.open(root) as store:
        v = store.resolve("c@1")
        assert {e.encoding for e in v.tensors if len(e.shape) == 2} == {"mixedrank-aw:4"}
        target = tmp_path / "target"
        import shutil
        shutil.copytree(base, target)
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        store.apply_files("c", target)  # every result checked against its recorded id
        store.revert_files(target)
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
        assert store.fsck(read_data=True).ok


def test_calibration_sums_every_linear_layers_inputs(tmp_path) -> None:
    base, ft = pair(tmp_path, adam_like(0.02))
    cal = calibrate(ft, prompts_file(tmp_path))
    linear = [n for n in cal.covariances if n.endswith("proj.weight")]
    assert linear and cal.positions > 10
    for name, c in cal.covariances.items():
        assert c.shape[0] == c.shape[1] and torch.allclose(c, c.T) and float(c.diagonal().min()) >= 0, name
