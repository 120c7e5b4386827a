"""export-lora --format gguf: a version as a GGUF LoRA file that llama.cpp and Ollama load, read
back with gguf's own GGUFReader.

What llama.cpp writes and reads, pinned from its source at ggml-org/llama.cpp commit 0b03adaa
(https://github.com/ggml-org/llama.cpp/blob/0b03adaa632b76c7651dd1f6fa3b7a0b5eda479c/convert_lora_to_gguf.py):
- LoraModel.set_type: `add_type(gguf.GGUFType.ADAPTER)` and `add_string(gguf.Keys.Adapter.TYPE,
  "lora")`; LoraModel.set_gguf_parameters: `add_float32(gguf.Keys.Adapter.LORA_ALPHA, ...)`;
  ModelBase.prepare_metadata adds general.quantization_version; general.architecture is the base
  model class's (LlamaModel -> "llama", Qwen2Model -> "qwen2", GPT2Model -> "gpt2").
- LoraModel.modify_tensors: `yield (dest_name + ".lora_a", lora_a)` and `(dest_name + ".lora_b",
  lora_b)`, PEFT's lora_A (numpy shape (r, in)) and lora_B ((out, r)), dest_name the base weight's
  GGUF name (gguf-py tensor_mapping.py: self_attn.q_proj -> blk.N.attn_q, o_proj -> attn_output,
  mlp.gate_proj -> ffn_gate, up_proj -> ffn_up, down_proj -> ffn_down, lm_head -> output;
  GPT-2 attn.c_attn -> attn_qkv, attn.c_proj -> attn_output, mlp.c_fc -> ffn_up, mlp.c_proj ->
  ffn_down).
- convert_hf_to_gguf.py GPT2Model.modify_tensors: c_attn / c_proj / c_fc weights are transposed
  to (out, in) in the base GGUF, so a GPT-2 pair must be shaped like a Linear's: lora_a (r, in),
  lora_b (out, r). (The converter would also transpose a PEFT GPT-2 pair, which PEFT already
  shapes (out, in); what is pinned here is what the loader below accepts.)
- conversion/llama.py (https://github.com/ggml-org/llama.cpp/blob/7bca1fd9ca2a681b0182e16f24f832b7be1942af/conversion/llama.py)
  LlamaModel.modify_tensors permutes q_proj by n_head and k_proj by n_kv_head (LlamaModel.permute,
  copied as `converter_permute` below); convert_lora_to_gguf.py hands it a LoraTorchTensor, whose
  reshape and swapaxes act on lora_B's rows only (lora_A is (1, 1, r, in) throughout): the pair
  written is (A, permute(B)), so B @ A is the permuted delta. Qwen2Model and GPT2Model permute nothing.
- src/llama-adapter.cpp, llama_adapter_lora_init_impl, in GGUF's ne order (numpy's reversed):
  W.ne[0] == a.ne[0] (in), W.ne[1] == b.ne[1] (out), a.ne[1] == b.ne[0] (r), else "lora_a tensor
  is not transposed"; each pair is scaled by alpha / r, r its own rank.
- --outtype f32, f16, bf16 or q8_0; ModelBase.prepare_tensors falls back to F16 where
  gguf.quants.quantize raises QuantError (a q8_0 row that is not whole blocks of 32).
"""

import json

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from click.testing import CliRunner  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader  # noqa: E402

from cli.main import cli  # noqa: E402
from deltastore.exports.gguf_lora import UnsupportedArchitecture, export_gguf_lora, read_gguf_lora  # noqa: E402
from deltastore.weights.models import open_model  # noqa: E402
from tiny_lm import committed, llama  # noqa: E402

HIDDEN, FFN, LAYERS = 64, 128, 2
LLAMA_PAIRS = {  # GGUF weight -> (in, out) of the base weight, from the converter's naming
    **{f"blk.{i}.{n}.weight": shape for i in range(LAYERS) for n, shape in [
        ("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (HIDDEN, HIDDEN // 2)), ("attn_v", (HIDDEN, HIDDEN // 2)),
        ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (HIDDEN, FFN)), ("ffn_up", (HIDDEN, FFN)),
        ("ffn_down", (FFN, HIDDEN))]},
    "output.weight": (HIDDEN, 48),
}
GPT2_PAIRS = {
    f"blk.{i}.{n}.weight": shape for i in range(LAYERS) for n, shape in [
        ("attn_qkv", (HIDDEN, 3 * HIDDEN)), ("attn_output", (HIDDEN, HIDDEN)),
        ("ffn_up", (HIDDEN, 4 * HIDDEN)), ("ffn_down", (4 * HIDDEN, HIDDEN))]
}
# Hugging Face name of each GGUF weight, and whether HF stores it (in, out) (GPT-2's Conv1D).
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
GPT2_HF = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def qwen2():
    import transformers

    torch.manual_seed(1)
    config = transformers.Qwen2Config(vocab_size=48, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config).eval()


def gpt2():
    import transformers

    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=48, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def gpt_neox():
    import transformers

    torch.manual_seed(3)
    config = transformers.GPTNeoXConfig(vocab_size=48, hidden_size=HIDDEN, intermediate_size=FFN,
                                        num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64)
    return transformers.GPTNeoXForCausalLM(config).eval()


def fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def pairs(reader):
    """GGUF weight -> (A, B) in numpy order, dequantized, and the types of the two."""
    out = {}
    for t in reader.tensors:
        weight, _, part = t.name.rpartition(".")
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        out.setdefault(weight, {})[part] = (data, t.tensor_type, [int(n) for n in t.shape])
    return out


def truncated(delta, rank):
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def converter_permute(weights, n_head, n_head_kv):
    """llama.cpp's LlamaModel.permute, as the converter has it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def converter_layout(arch, name, delta):
    """A delta (out, in) as the converter's modify_tensors hands it on: a Llama's q and k rows
    permuted (tiny_lm.llama: 4 heads, 2 of them for k and v)."""
    if arch == "llama" and name.endswith("q_proj.weight"):
        return converter_permute(delta, 4, 4)
    if arch == "llama" and name.endswith("k_proj.weight"):
        return converter_permute(delta, 4, 2)
    return delta


def check_reconstruction(reader, base, ft, hf_name, tolerance, arch="llama"):
    alpha = fields(reader)["adapter.lora.alpha"]
    for weight, parts in pairs(reader).items():
        (a, _, _), (b, _, _) = parts["lora_a"], parts["lora_b"]
        rank = a.shape[0]
        name, conv1d = hf_name(weight)
        delta = ft[name].double() - base[name].double()
        expected = converter_layout(arch, name, truncated(delta.T if conv1d else delta, rank))  # GGUF: (out, in)
        got = (b.double() @ a.double()) * (alpha / rank)
        assert float((got - expected).norm() / expected.norm()) < tolerance, weight


def llama_hf(weight):
    if weight == "output.weight":
        return "lm_head.weight", False
    _, layer, kind, _ = weight.split(".")
    return f"model.layers.{layer}.{HF_NAMES[kind]}.weight", False


def gpt2_hf(weight):
    _, layer, kind, _ = weight.split(".")
    return f"transformer.h.{layer}.{GPT2_HF[kind]}.weight", True


@pytest.mark.parametrize("arch, build, expected, hf_name", [
    ("llama", lambda: llama(0, hidden=HIDDEN, layers=LAYERS), LLAMA_PAIRS, llama_hf),
    ("qwen2", qwen2, LLAMA_PAIRS, llama_hf),
    ("gpt2", gpt2, GPT2_PAIRS, gpt2_hf),
])
def test_gguf_lora_reads_back_as_the_converter_writes_it(tmp_path, arch, build, expected, hf_name):
    store, _, base, ft = committed(tmp_path, build())
    out = export_gguf_lora(store, "s", tmp_path / "s.gguf", rank=4, dtype="f32")
    reader = GGUFReader(out.out)
    assert fields(reader) == {"general.architecture": arch, "general.type": "adapter", "adapter.type": "lora",
                              "adapter.lora.alpha": 4.0, "general.quantization_version": 2}
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    found = pairs(reader)
    assert set(found) == set(expected)
    for weight, (n_in, n_out) in expected.items():
        (_, type_a, ne_a), (_, type_b, ne_b) = found[weight]["lora_a"], found[weight]["lora_b"]
        assert (ne_a, ne_b) == ([n_in, 4], [4, n_out]), weight  # GGUF ne order: numpy (4, in), (out, 4)
        assert type_a == type_b == Q.F32
    check_reconstruction(reader, base, ft, hf_name, 1e-5, arch)
    # Read back, each delta is the truncated SVD of the stored delta in Hugging Face's layout.
    back = read_gguf_lora(out.out, open_model(tmp_path / "base"))
    assert set(back) == {hf_name(w)[0] for w in expected}
    for name, delta in back.items():
        want = truncated(ft[name].double() - base[name].double(), 4)
        assert float((delta.double() - want).norm() / want.norm()) < 1e-5, name

    # What a GGUF LoRA cannot carry is listed, with its share of the squared delta.
    dropped = set(out.dropped)
    if arch == "gpt2":
        assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.h.0.attn.c_attn.bias"} <= dropped
    else:
        assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"} <= dropped
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in dropped
    assert not any(n.endswith(".weight") and n.rpartition(".")[0].rpartition(".")[2] in
                   {"q_proj", "o_proj", "down_proj", "c_attn", "c_fc", "lm_head"} for n in dropped)
    assert 0 < out.dropped_energy_fraction < 1 and out.warning and "cannot hold" in out.warning


@pytest.mark.parametrize("dtype, qtype, tolerance", [
    ("f16", Q.F16, 2e-3), ("bf16", Q.BF16, 2e-2), ("q8_0", Q.Q8_0, 2e-2)])
def test_gguf_lora_types_and_per_matrix_ranks(tmp_path, dtype, qtype, tolerance):
    store, _, base, ft = committed(tmp_path, llama(0, hidden=HIDDEN, layers=LAYERS))
    out = export_gguf_lora(store, "s", tmp_path / "s.gguf", energy=0.6, rank=16, dtype=dtype)
    reader = GGUFReader(out.out)
    assert len(set(out.ranks.values())) > 1 and fields(reader)["adapter.lora.alpha"] == max(out.ranks.values())
    for weight, parts in pairs(reader).items():
        assert parts["lora_a"][1] == qtype, weight  # rows of 64 or 128: whole q8_0 blocks
        # lora_b's rows are r long: not a whole q8_0 block, so f16, as the converter falls back.
        assert parts["lora_b"][1] == (Q.F16 if qtype == Q.Q8_0 else qtype), weight
        assert parts["lora_a"][2][1] == parts["lora_b"][2][0] == out.ranks[weight]
    # One alpha for pairs of different ranks: each still stands for its own truncated SVD.
    check_reconstruction(reader, base, ft, llama_hf, tolerance)


def test_cli_writes_gguf_and_refuses_other_architectures(tmp_path):
    store, *_ = committed(tmp_path, llama(0, hidden=HIDDEN, layers=LAYERS))
    runner = CliRunner()
    target = tmp_path / "stance.gguf"
    result = runner.invoke(cli, ["--store", str(tmp_path / "store"), "export-lora", "s", "--rank", "2",
                                 "--format", "gguf", "--dtype", "fp16", "--out", str(target), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["architecture"] == "llama" and report["dtype"] == "f16" and report["rank"] == 2
    assert report["bytes"] == target.stat().st_size and "model.embed_tokens.weight" in report["dropped"]
    again = runner.invoke(cli, ["--store", str(tmp_path / "store"), "export-lora", "s", "--rank", "2",
                                "--format", "gguf", "--out", str(target)])
    assert again.exit_code == 1 and "exists" in again.stderr and "Traceback" not in again.output

    other = tmp_path / "neox"
    other.mkdir()
    neox_store, *_ = committed(other, gpt_neox())
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel"):
        export_gguf_lora(neox_store, "s", other / "s.gguf", rank=2)
    refused = runner.invoke(cli, ["--store", str(other / "store"), "export-lora", "s", "--rank", "2",
                                  "--format", "gguf", "--out", str(other / "s.gguf")])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert len(refused.stderr.strip().splitlines()) == 1 and "GPTNeoXForCausalLM" in refused.stderr
    assert not (other / "s.gguf").exists() and not list(other.glob(".s.gguf.*"))
