"""Shared test set-up.

The Hub client chooses Xet uploads whenever hf_xet is installed, and reads that choice once,
when it is first imported; the local Hub server speaks plain LFS. So the choice is made here,
before any test module imports transformers or huggingface_hub.
"""

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
