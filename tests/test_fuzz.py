"""Every reader of outside input, fuzzed for a few seconds each (tests/fuzz/run.py runs them
longer): no input may raise anything but a DeltastoreError, allocate more than its declared
sizes allow, or take more than a few seconds; every valid seed must be read without error."""

from __future__ import annotations

import os

import pytest

from fuzz.run import run_target
from fuzz.targets import BUILDERS, build

SECONDS = float(os.environ.get("DELTASTORE_FUZZ_SECONDS", "3"))
NAMES = ["safetensors", "shard_index", "object", "manifest", "hub_index", "hub_payloads", "peft_adapter",
         "metadata_file"]


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return build(tmp_path_factory.mktemp("fuzz"))


def test_every_reader_has_a_target():
    assert len(BUILDERS) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_fuzz(targets, name, tmp_path):
    if name not in targets:
        pytest.skip(f"no {name} reader in this build")
    stats = run_target(targets[name], SECONDS, crashes=tmp_path)
    print(stats.line())
    assert not stats.seeds_refused, f"valid seeds refused: {stats.seeds_refused}"
    assert stats.execs > len(targets[name].seeds)
    assert not stats.failures, "\n\n".join(stats.first_failures.values())
