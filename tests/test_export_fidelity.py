"""export-lora --prompts FILE [--max-kl K]: the fidelity of exactly what an export wrote (the
adapter read back from its file(s) and merged into the base, dropped tensors at the base),
checked against KL computed independently: PEFT's own merge, or gguf's own reader, and the
log-softmax arithmetic written out here."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

from click.testing import CliRunner  # noqa: E402

from cli.main import cli  # noqa: E402
from deltastore import Store  # noqa: E402
from deltastore.exports.export_fidelity import KlNotReached, export_lora_measured, merged, rank_ladder  # noqa: E402
from deltastore.core.errors import DeltastoreError  # noqa: E402
from deltastore.exports.lora import adapter_weights  # noqa: E402
from deltastore.weights.models import open_model  # noqa: E402
from tiny_lm import PROMPTS, adam_like, kl_top1, pair, prompts_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def hf(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_merged(base_dir, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(hf(base_dir), adapter_dir).eval().merge_and_unload()


@pytest.fixture
def stance(tmp_path):
    # Every tensor moves (norms and embeddings too), stored lossless: the stored version is the
    # fine-tune itself, so the independent reference is the fine-tuned folder.
    base, ft = pair(tmp_path, adam_like(0.05))
    store = Store.init(tmp_path / "store")
    store.commit("s", ft, base=str(base))
    return store, base, ft, prompts_file(tmp_path)


def test_peft_export_kl_equals_peft_merged_model(tmp_path, stance):
    store, base, ft, prompts = stance
    m = export_lora_measured(store, "s", tmp_path / "adapter", prompts=prompts, rank=2, dtype="fp32")
    reference, exported = hf(ft), peft_merged(base, m.export.out)
    kl, top1 = kl_top1(reference, exported)
    assert m.fidelity.kl == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert m.fidelity.top1 == pytest.approx(top1)
    base_kl, base_top1 = kl_top1(reference, hf(base))
    assert m.fidelity.base_kl == pytest.approx(base_kl, rel=1e-3)
    assert m.fidelity.base_top1 == pytest.approx(base_top1)
    assert 0 < m.fidelity.kl < m.fidelity.base_kl  # a rank-2 export keeps part of the way
    assert m.tried == ((2, m.fidelity.kl),) and m.export.out == tmp_path / "adapter"


def test_merging_in_memory_equals_peft_merge(tmp_path, stance):
    store, base, ft, _ = stance
    from deltastore.exports.lora import export_lora

    out = export_lora(store, "s", tmp_path / "adapter", rank=3, dtype="bf16")
    ours = adapter_weights(out.out, open_model(base))
    theirs = peft_merged(base, out.out).state_dict()
    assert ours.deltas and ours.replaced  # pairs, and norms kept whole (modules_to_save)
    for name in [*ours.deltas, *ours.replaced]:
        torch.testing.assert_close(ours.target.get(name), theirs[name], rtol=1e-5, atol=1e-6)


def test_gguf_export_kl_equals_gguf_reader_merge(tmp_path, stance):
    store, base, ft, prompts = stance
    m = export_lora_measured(store, "s", tmp_path / "s.gguf", prompts=prompts, fmt="gguf", rank=4, dtype="q8_0")
    # Independently: every pair read with GGUFReader, dequantized, scaled by alpha / r and added
    # to the base weight (transformers' names from llama.cpp's: blk.N.attn_q -> ...q_proj).
    reader = gguf.GGUFReader(str(m.export.out))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    hf_of = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    parts = {}
    for t in reader.tensors:
        weight, _, part = t.name.rpartition(".")
        parts.setdefault(weight, {})[part] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    model = hf(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for weight, p in parts.items():
            if weight == "output.weight":
                name = "lm_head.weight"
            else:
                _, layer, kind, _ = weight.split(".")
                name = f"model.layers.{layer}.{hf_of[kind]}.weight"
            delta = (p["lora_b"].float() @ p["lora_a"].float()) * (alpha / p["lora_a"].shape[0])
            # llama.cpp's q/k rows (LlamaModel.permute by 4 heads for q, 2 for k) back to transformers'.
            heads = {"q_proj": 4, "k_proj": 2}.get(name.split(".")[-2])
            if heads:
                delta = delta.reshape(heads, delta.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(delta.shape)
            params[name] += delta
    kl, top1 = kl_top1(hf(ft), model)
    assert m.fidelity.kl == pytest.approx(kl, rel=1e-3)
    assert m.fidelity.top1 == pytest.approx(top1)
    # A word-level tokenizer cannot go into a GGUF model: no base for llama.cpp, and the report says so.
    assert m.fidelity.runtime == "torch" and "torch's estimate on the file's dequantised weights" in \
        m.fidelity.runtime_note
    # Norms and the embedding are dropped from a GGUF LoRA: the export keeps less than PEFT's.
    assert "model.embed_tokens.weight" in m.export.dropped


def test_max_kl_picks_the_smallest_rank_under_the_limit(tmp_path, stance):
    store, base, ft, prompts = stance
    assert rank_ladder(32) == [1, 2, 4, 8, 16, 32] and rank_ladder(12) == [1, 2, 4, 8, 12]
    full = export_lora_measured(store, "s", tmp_path / "full.gguf", prompts=prompts, fmt="gguf", rank=32,
                                dtype="f32")
    limit = (full.fidelity.kl + full.fidelity.base_kl) / 2
    m = export_lora_measured(store, "s", tmp_path / "s.gguf", prompts=prompts, fmt="gguf", rank=32, dtype="f32",
                             max_kl=limit)
    tried = dict(m.tried)
    chosen = m.export.rank
    assert m.fidelity.kl <= limit and tried[chosen] == m.fidelity.kl
    # Every smaller rank tried was above the limit, and the one just below the chosen was tried.
    ladder = rank_ladder(32)
    below = ladder[ladder.index(chosen) - 1] if chosen > 1 else None
    assert below is None or tried[below] > limit
    assert all(kl > limit for r, kl in tried.items() if r < chosen)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == ["full.gguf", "s.gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # candidates removed


def test_max_kl_out_of_reach_says_so_and_writes_nothing(tmp_path, stance):
    store, base, ft, prompts = stance
    with pytest.raises(KlNotReached, match="no export of rank up to 4 stays under --max-kl 1e-09"):
        export_lora_measured(store, "s", tmp_path / "s.gguf", prompts=prompts, fmt="gguf", rank=4, max_kl=1e-9)
    assert not [p for p in tmp_path.iterdir() if "s.gguf" in p.name]


def test_cli_prints_the_exports_fidelity_beside_the_base_and_refuses_bad_input(tmp_path, stance):
    store, base, ft, prompts = stance
    runner = CliRunner()
    args = ["--store", str(tmp_path / "store"), "export-lora", "s", "--format", "gguf", "--dtype", "fp16"]
    result = runner.invoke(cli, [*args, "--rank", "4", "--out", str(tmp_path / "a.gguf"), "--prompts", str(prompts)])
    assert result.exit_code == 0, result.output
    assert "KL" in result.output and "the base alone" in result.output
    result = runner.invoke(cli, [*args, "--rank", "2", "--max-kl", "1e-9", "--out", str(tmp_path / "b.gguf"),
                                 "--prompts", str(prompts)])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "no export of rank up to 2 stays under --max-kl" in result.output
    assert not (tmp_path / "b.gguf").exists()
    result = runner.invoke(cli, [*args, "--max-kl", "0.1", "--out", str(tmp_path / "c.gguf")])
    assert result.exit_code == 2 and "--max-kl needs --prompts" in result.output
    assert not (tmp_path / "c.gguf").exists()


def test_a_base_without_a_model_folder_is_refused(tmp_path):
    base, ft = pair(tmp_path, adam_like(0.05))
    store = Store.init(tmp_path / "store")
    bare = tmp_path / "bare"
    bare.mkdir()
    (base / "model.safetensors").rename(bare / "model.safetensors")  # weights alone: no config.json
    store.commit("s", ft / "model.safetensors", base=str(bare / "model.safetensors"))
    with pytest.raises(DeltastoreError, match="needs the base as a Hugging Face model folder"):
        export_lora_measured(store, "s", tmp_path / "a", prompts=PROMPTS, rank=2)
    assert not (tmp_path / "a").exists()


def test_merged_rounds_once_to_the_base_dtype():
    w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    out = merged(open_model({"w": w}), {"w": torch.tensor([[0.001, 0.5]])})
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], (w.float() + torch.tensor([[0.001, 0.5]])).to(torch.bfloat16))
