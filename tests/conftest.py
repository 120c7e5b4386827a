"""Shared test set-up.

The Hub client chooses Xet uploads whenever hf_xet is installed, and reads that choice once,
when it is first imported; the local Hub server speaks plain LFS. So the choice is made here,
before any test module imports transformers or huggingface_hub.

`one_thread`: for a module of tiny models, where a second intra-op thread only adds waiting
(badly so on a busy machine); a module takes it with
`pytestmark = pytest.mark.usefixtures("one_thread")`.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_list_of_stores(tmp_path_factory, monkeypatch):
    """Every store a test makes is listed in the per-user list of stores (repo/knownstores.py):
    each test has a list of its own, never the user's, and sees no store another test made."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
