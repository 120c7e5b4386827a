"""The alternatives deltastore is measured against: a full copy (safetensors), the copy
compressed (zstd, ZipNN), and a PEFT LoRA adapter of the same fine-tune."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch

ZIPNN_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def load_lm(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM from a model folder, on CPU, in eval mode, quietly."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def file_dtype(path: Path) -> str:
    """The safetensors dtype that holds most of a file's bytes ("BF16", "F32", ...)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    size: dict[str, int] = {}
    for name, t in header.items():
        if name != "__metadata__":
            begin, end = t["data_offsets"]
            size[t["dtype"]] = size.get(t["dtype"], 0) + end - begin
    return max(size, key=size.get)


def torch_dtype(path: Path) -> torch.dtype:
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[file_dtype(path)]


def zstd_command(src: Path, dst: Path) -> list[str] | None:
    """`zstd -3 -T2` of a file, or None where the zstd program is missing."""
    if not shutil.which("zstd"):
        return None
    return ["zstd", "-3", "-T2", "-q", "-f", "-o", str(dst), str(src)]


def zstd_file(src: Path, dst: Path) -> int:
    """Compress `src` as `zstd -3 -T2` does (the program, else the library); the bytes written."""
    cmd = zstd_command(src, dst)
    if cmd:
        subprocess.run(cmd, check=True)
    else:
        import zstandard

        with open(src, "rb") as fin, open(dst, "wb") as fout:
            zstandard.ZstdCompressor(level=3, threads=2).copy_stream(fin, fout)
    return dst.stat().st_size


def zipnn_compressor(dtype: str):
    """ZipNN as its users call it on a checkpoint's bytes: byte grouping for the file's main
    dtype, its default method (zstd level 3 / Huffman), two threads. Its compress rewrites the
    buffer it is given in place (zipnn 0.5.4, `bytes` included): give it a copy."""
    from zipnn import ZipNN

    return ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES.get(dtype, "bfloat16"), threads=2)


def zipnn_roundtrips(data: bytes, compressed: bytes, dtype: str) -> bool:
    return bytes(zipnn_compressor(dtype).decompress(compressed)) == data


def lora_adapter(base: Path, fine_tune: Path, out: Path, rank: int = 32) -> int:
    """A PEFT LoRA adapter of rank `rank` on every linear layer (PEFT's "all-linear"), in the
    base's dtype, whose pairs are the truncated SVD of each layer's delta; saved with
    save_pretrained. Returns the adapter file's bytes."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    from deltastore.exports.lora import LINEAR, factors

    dtype = torch_dtype(Path(fine_tune) / "model.safetensors")
    model = load_lm(base, dtype)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", lora_dropout=0.0)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    prefix = "base_model.model."
    with torch.no_grad(), safe_open(Path(fine_tune) / "model.safetensors", "pt") as f:
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            tuned = f.get_tensor(name.removeprefix(prefix) + ".weight")
            delta = tuned.float() - module.get_base_layer().weight.float()
            a, b = factors(delta, rank, LINEAR)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(out)
    return (Path(out) / "adapter_model.safetensors").stat().st_size
