"""A stored version as one GGUF model file (base + delta) that llama.cpp and Ollama run whole.

The file is what llama.cpp's convert_hf_to_gguf.py writes for the fine-tuned model folder, done
through the ``gguf`` package (tests/test_gguf_model.py cites the converter's code):

- metadata: ``general.type = "model"``, gguf.Metadata's general.* (name: the version's ref),
  the architecture's hyperparameters as TextModel.set_gguf_parameters writes them (LlamaModel
  adds ``vocab_size`` and ``rope.dimension_count``; GPT2Model writes its own short list),
  ``general.file_type``, ``general.quantization_version``;
- tensors: every weight under gguf-py's name for it (``blk.N.attn_q.weight``, ...); Llama's
  q and k projections permuted as LlamaModel.permute does (llama.cpp's rope pairs adjacent
  values, Hugging Face's the two halves); GPT-2's Conv1D weights transposed to (out, in);
  1-D tensors, norms, biases and GPT-2's position embedding in f32, every other weight in the
  file type (f32, f16, bf16, q8_0; a q8_0 row that is not whole blocks of 32 falls back to f16);
- tokenizer: the converter's ``_set_vocab_gpt2``: ``tokenizer.ggml.model = "gpt2"``, the
  pre-tokenizer named from the hash of the tokenization of the converter's check text (only
  the hashes in ``PRE_TOKENIZERS``), every token with its type, then gguf.SpecialVocab (merges,
  special token ids, add_bos/add_eos, chat template).

A tokenizer that path cannot write (SentencePiece's tokenizer.model, a Llama tokenizer that
gguf.LlamaHfVocab reads, a BPE pre-tokenizer whose hash is not known here) is refused: llama.cpp
refuses a file without a tokenizer it knows, and a wrong pre-tokenizer would split text other
than the model was trained on. Nothing is written then. This module never imports click,
prints or exits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch

from ..core.durable import new_file
from ..core.errors import DeltastoreError
from .export_source import architecture, model_config
from .gguf_lora import permute_rows, quantized, rope_heads, unpermute_rows

# gguf and transformers (optional: pip install 'deltastore[gguf]') are imported inside the
# functions that need them, so that their absence is one clear error there and nowhere else.

if TYPE_CHECKING:  # Store for types only: nothing here needs store.py loaded
    from ..store import Store

__all__ = ["ARCHITECTURES", "GGUF_FILE_TYPES", "GgufExport", "GgufExportError", "PRE_TOKENIZERS", "export_base_gguf",
           "export_gguf", "read_gguf_model"]

#: Hugging Face architecture -> gguf-py's MODEL_ARCH member.
ARCHITECTURES = {"LlamaForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2", "GPT2LMHeadModel": "GPT2"}
#: --dtype -> gguf.LlamaFileType member (the converter's --outtype).
GGUF_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}

#: The converter's check text (get_vocab_base_pre): the sha256 of str(tokenizer.encode(CHKTXT))
#: names the BPE pre-tokenizer llama.cpp must use.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
          '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作'
          '1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told '
          'he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
#: The hashes of the converter's table for the tokenizers of the architectures above.
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
}
# Tensors the converter does not write.
SKIPPED = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
GPT2_SKIPPED = (".attn.bias", ".attn.masked_bias")
GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GgufExportError(DeltastoreError, ValueError):
    """A version that cannot be written as a GGUF model llama.cpp loads."""


@dataclass(frozen=True)
class GgufExport:
    """What ``export_gguf`` wrote: the file, its architecture and file type, the tensors by
    GGUF type, the pre-tokenizer, the file's size."""

    ref: str
    out: Path
    architecture: str
    dtype: str
    tensors: int
    types: dict[str, int]
    pre_tokenizer: str
    bytes: int


def _hparams(folder: Path) -> dict[str, Any]:
    # As the converter's load_hparams: the config as transformers reads it, defaults included.
    try:
        from transformers import AutoConfig
    except ImportError:
        raise GgufExportError("a GGUF model is written with transformers installed: pip install transformers") from None
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True).to_dict()
    except (OSError, ValueError, KeyError) as error:
        raise GgufExportError(f"cannot read {folder}/config.json: {str(error)[:200]}") from None


def _find(hparams: dict[str, Any], keys: tuple[str, ...]) -> Any:
    key = next((k for k in keys if k in hparams), None)
    return hparams[key] if key is not None else None


def _rope_theta(hparams: dict[str, Any]) -> Any:
    # transformers 5 keeps it under rope_parameters; the converter mirrors it from there.
    if hparams.get("rope_theta") is not None:
        return hparams["rope_theta"]
    rope = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    return rope.get("rope_theta") if isinstance(rope, dict) else None


def _text_model_parameters(writer: Any, hparams: dict[str, Any], blocks: int) -> None:
    """TextModel.set_gguf_parameters, for the keys a Llama or Qwen2 config holds."""
    writer.add_block_count(blocks)
    if (n_ctx := _find(hparams, ("max_position_embeddings", "n_ctx", "n_positions", "max_length"))) is not None:
        writer.add_context_length(n_ctx)
    if (n_embd := _find(hparams, ("hidden_size", "n_embd", "dim"))) is not None:
        writer.add_embedding_length(n_embd)
    if (n_ff := _find(hparams, ("intermediate_size", "n_inner", "hidden_dim"))) is not None:
        writer.add_feed_forward_length(n_ff)
    if (n_head := _find(hparams, ("num_attention_heads", "n_head", "n_heads"))) is not None:
        writer.add_head_count(n_head)
    if (n_head_kv := _find(hparams, ("num_key_value_heads", "n_kv_heads"))) is not None:
        writer.add_head_count_kv(n_head_kv)
    if (theta := _rope_theta(hparams)) is not None:
        writer.add_rope_freq_base(theta)
    if (rms := _find(hparams, ("rms_norm_eps", "norm_eps"))) is not None:
        writer.add_layer_norm_rms_eps(rms)
    if (eps := _find(hparams, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        writer.add_layer_norm_eps(eps)
    if (head_dim := hparams.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _parameters(writer: Any, arch: str, hparams: dict[str, Any], blocks: int, file_type: Any) -> None:
    import gguf

    if arch == "GPT2LMHeadModel":
        # GPT2Model.set_gguf_parameters (n_ctx, which configs saved by transformers 5 lack, read
        # from n_positions there).
        writer.add_block_count(blocks)
        writer.add_context_length(hparams.get("n_ctx") or hparams["n_positions"])
        writer.add_embedding_length(hparams["n_embd"])
        writer.add_feed_forward_length(4 * hparams["n_embd"])
        writer.add_head_count(hparams["n_head"])
        writer.add_layer_norm_eps(hparams["layer_norm_epsilon"])
        writer.add_file_type(file_type)
        return
    _text_model_parameters(writer, hparams, blocks)
    writer.add_file_type(file_type)
    if arch == "LlamaForCausalLM":  # LlamaModel.set_gguf_parameters
        writer.add_vocab_size(hparams["vocab_size"])
        rope_dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
        writer.add_rope_dimension_count(rope_dim)
        rope = hparams.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type")) == "linear" and "factor" in rope:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
    elif arch == "Qwen2ForCausalLM":  # Qwen2Model.set_gguf_parameters: yarn scaling, if any
        rope = hparams.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type")) == "yarn" and "factor" in rope:
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(rope["factor"])
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    types: list[int]
    pre: str


def _vocab(folder: Path, hparams: dict[str, Any]) -> _Vocab:
    """TextModel.get_vocab_base and get_vocab_base_pre; refused where the converter would take
    another path or does not know the pre-tokenizer."""
    import gguf

    if (folder / "tokenizer.model").is_file():
        raise GgufExportError(f"{folder} holds a SentencePiece tokenizer (tokenizer.model), which export --format "
                              "gguf does not write; a GGUF model is written for BPE tokenizers (tokenizer.json) only")
    if not (folder / "tokenizer.json").is_file():
        raise GgufExportError(f"{folder} has no tokenizer.json: a GGUF model needs the tokenizer written into it")
    try:
        gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError, ValueError, KeyError):
        pass  # not a Llama-2 style tokenizer: the converter goes on to the BPE path, as here
    else:
        raise GgufExportError(f"{folder} holds a Llama-2 style tokenizer, which export --format gguf does not write")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # transformers raises many kinds
        raise GgufExportError(f"cannot load the tokenizer of {folder}: {str(error)[:200]}") from None
    vocab_size = hparams.get("vocab_size", len(tokenizer.vocab))
    if max(tokenizer.vocab.values()) >= vocab_size:
        raise GgufExportError(f"the tokenizer of {folder} has ids beyond the model's vocab_size {vocab_size}")
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise GgufExportError(
            f"the tokenizer of {folder} is not one whose pre-tokenizer llama.cpp is known here to share (hash "
            f"{digest[:16]}...; known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); nothing was written: "
            "convert the exported model folder (deltastore export) with llama.cpp's convert_hf_to_gguf.py")
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return _Vocab(tokens, types, pre)


def gguf_tensor(arch: str, name: str, w: torch.Tensor, hparams: dict[str, Any]) -> torch.Tensor:
    """A Hugging Face weight as the converter's modify_tensors hands it to the writer."""
    if w.dtype not in (torch.float16, torch.float32):
        w = w.to(torch.float32)
    if (heads := rope_heads(arch, name, hparams)) is not None:
        w = permute_rows(w, heads)  # LlamaModel.permute: rope's halves to adjacent pairs
    elif arch == "GPT2LMHeadModel" and name.endswith(GPT2_CONV1D):
        w = w.transpose(1, 0)
    return w.contiguous()


def _qtype(new_name: str, n_dims: int, file_type: Any, arch_enum: Any) -> Any:
    """prepare_tensors' choice of a tensor's type."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if n_dims <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
        return Q.F32
    always_f32 = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)
    if any(key in gguf.MODEL_TENSORS[arch_enum] and new_name == gguf.TENSOR_NAMES[key] + ".weight"
           for key in always_f32):
        return Q.F32
    return {gguf.LlamaFileType.ALL_F32: Q.F32, gguf.LlamaFileType.MOSTLY_F16: Q.F16,
            gguf.LlamaFileType.MOSTLY_BF16: Q.BF16, gguf.LlamaFileType.MOSTLY_Q8_0: Q.Q8_0}[file_type]


def export_gguf(store: Store, ref: str, out: str | os.PathLike, *, dtype: str = "f16", base_weights: Any = None,
                progress: Any = None) -> GgufExport:
    """Write version ``ref`` (base + delta) as one GGUF model file ``out`` (which must not
    exist), with the base folder's config and tokenizer."""
    version = store.resolve(ref)
    source = store.base_source(store.base(version.base_id), base_weights)
    _check(out, dtype)
    infos, tensor = store.materialize(version, base_weights=source)
    return _write(source, out, version.ref, infos, tensor, dtype, progress)


def export_base_gguf(source: Any, out: str | os.PathLike, *, dtype: str = "f16", progress: Any = None) -> GgufExport:
    """Write a base model (a TensorSource of its folder) as it is, as one GGUF model file ``out``:
    what a GGUF LoRA of it is loaded onto in llama.cpp."""
    _check(out, dtype)
    return _write(source, out, "base", source.infos, source.get, dtype, progress)


def _check(out: str | os.PathLike, dtype: str) -> None:
    if dtype not in GGUF_FILE_TYPES:
        raise GgufExportError(f"a GGUF model's dtype must be one of {', '.join(GGUF_FILE_TYPES)}, got {dtype!r}")
    if Path(out).exists():
        raise GgufExportError(f"{out} exists; choose a new file")


def _write(source: Any, out: str | os.PathLike, title: str, infos: Any, tensor: Any, dtype: str,
           progress: Any) -> GgufExport:
    """The GGUF model file of the tensors ``tensor(n)`` for ``n`` in ``infos``, with the config and
    tokenizer of ``source``'s folder, named ``title`` (general.name)."""
    try:
        import gguf
    except ImportError:
        raise GgufExportError("a GGUF model is written with the gguf package: pip install 'deltastore[gguf]'") from None
    out = Path(out)
    folder = Path(source.folder) if source.folder is not None else None
    arch = architecture(model_config(folder, GgufExportError, "a GGUF model needs the base as a Hugging Face model "
                                     "folder (config.json, tokenizer.json); give --base-path FOLDER",
                                     what="a model config"))
    if arch not in ARCHITECTURES:
        raise GgufExportError(f"a GGUF model is written for {', '.join(ARCHITECTURES)} bases only; this base is "
                              f"{arch[:80]!r} (export writes a Hugging Face folder for any)")
    hparams = _hparams(folder)
    # The tokenizer first: a refusal costs nothing and writes nothing.
    vocab = _vocab(folder, hparams)
    blocks = _find(hparams, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
    arch_enum = getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch])
    tensor_map = gguf.get_tensor_name_map(arch_enum, blocks)
    file_type = getattr(gguf.LlamaFileType, GGUF_FILE_TYPES[dtype])

    types: dict[str, int] = {}
    with new_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch_enum])
        todo = [n for n in infos if not n.endswith(SKIPPED)
                and not (arch == "GPT2LMHeadModel" and n.endswith(GPT2_SKIPPED))]
        for k, name in enumerate(todo):
            new_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise GgufExportError(f"{name} has no GGUF name for {arch} (gguf-py's tensor map): it cannot be written")
            data = gguf_tensor(arch, name, tensor(name), hparams).numpy()
            data, qtype = quantized(data, _qtype(new_name, data.ndim, file_type, arch_enum))
            writer.add_tensor(new_name, data, raw_dtype=qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
            if progress:
                progress(k + 1, len(todo))
        # prepare_metadata: type, general.*, hyperparameters, vocabulary, quantization version.
        total = writer.get_total_parameter_count()
        writer.add_type(gguf.GGUFType.MODEL)
        meta = gguf.Metadata.load(None, folder, title, total[0])
        if meta.size_label is None and total[0] > 0:
            meta.size_label = gguf.size_label(*total)
        meta.set_gguf_meta_model(writer)
        _parameters(writer, arch, hparams, blocks, file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
        if arch == "LlamaForCausalLM":  # LlamaModel.set_vocab's additions
            config_file = folder / "tokenizer_config.json"
            if config_file.is_file():
                tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
                if "add_prefix_space" in tokenizer_config:
                    writer.add_add_space_prefix(tokenizer_config["add_prefix_space"])
            if hparams.get("vocab_size", 32000) == 49152:
                writer.add_add_bos_token(False)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufExport(title, out, gguf.MODEL_ARCH_NAMES[arch_enum], dtype, sum(types.values()), types,
                      vocab.pre, out.stat().st_size)


def read_gguf_model(path: str | os.PathLike, source: Any) -> dict[str, torch.Tensor]:
    """The weights a GGUF model file written by ``export_gguf`` for base ``source`` holds, under
    their Hugging Face names and in Hugging Face's layout (q/k permutation and GPT-2's transpose
    undone), dequantized to float32: what llama.cpp computes with, for measuring."""
    import gguf

    folder = Path(source.folder)
    arch = str(json.loads((folder / "config.json").read_text(encoding="utf-8"))["architectures"][0])
    hparams = _hparams(folder)
    blocks = _find(hparams, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
    tensor_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch]), blocks)
    by_gguf = {tensor_map.get_name(n, try_suffixes=(".weight", ".bias")): n for n in source.infos}
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        name = by_gguf.get(t.name)
        if name is None:
            raise GgufExportError(f"{path}: tensor {t.name[:120]!r} is no tensor of this base")
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
        if (heads := rope_heads(arch, name, hparams)) is not None:
            w = unpermute_rows(w, heads)
        elif arch == "GPT2LMHeadModel" and name.endswith(GPT2_CONV1D):
            w = w.transpose(1, 0)
        out[name] = w.reshape(tuple(source.infos[name].shape)).contiguous()
    return out
