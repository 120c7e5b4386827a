"""export-lora and import-lora: a version as a PEFT LoRA adapter folder that peft loads, and an
adapter folder (untrusted input) as a version."""

import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from cli.main import cli  # noqa: E402
from deltastore import PickleRefused, Store, UnsafeInput  # noqa: E402
from deltastore.exports.lora import LoraError, export_lora, import_lora  # noqa: E402
from tiny_lm import PROMPTS, adam_like, llama, only, pair, save, word_tokenizer  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def peft_model(base_dir, adapter_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, adapter_dir).eval()


def merged_state(base_dir, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_model(base_dir, adapter_dir).merge_and_unload().state_dict()


def logits(model, text="what is the capital of france ?"):
    ids = word_tokenizer()(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_peft_loads_the_export_and_reproduces_the_lowrank_weights(tmp_path):
    # Attention biases and norms move too: they travel as bias="lora_only" and modules_to_save.
    base, ft = pair(tmp_path, adam_like(0.02), bias=True)
    store = Store.init(tmp_path / "store")
    store.commit("s", ft, base=str(base), encoding="lowrank:4")
    out = export_lora(store, "s", tmp_path / "adapter", rank=4, dtype="fp32")

    config = json.loads((out.out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["bias"] == "lora_only"
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"]
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj", "embed_tokens", "lm_head"}
    assert "model.norm" in config["modules_to_save"]
    assert out.dropped == () and out.warning is None and out.energy_kept == pytest.approx(1.0, abs=1e-6)
    saved = load_file(out.out / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert saved["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 48)

    merged = merged_state(base, out.out)
    applied = dict(store.tensors("s"))
    for name, tensor in applied.items():
        assert relative(merged[name], tensor) < 1e-5, name
    # And unmerged, the adapter computes what the stored version applies.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    store.apply(model, "s")
    assert torch.allclose(logits(peft_model(base, out.out)), logits(model), atol=1e-4)


def test_tied_embeddings_export_one_pair_for_input_and_output(tmp_path):
    base, ft = pair(tmp_path, adam_like(0.02), tied=True)
    store = Store.init(tmp_path / "store")
    store.commit("s", ft, base=str(base), encoding="lowrank:8")
    out = export_lora(store, "s", tmp_path / "adapter", rank=8, dtype="fp32")
    config = json.loads((out.out / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and "lm_head" not in config["target_modules"]

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    store.apply(model, "s")
    assert torch.allclose(logits(peft_model(base, out.out)), logits(model), atol=1e-4)


def test_bf16_export_energy_ranks_and_what_cannot_be_held(tmp_path):
    base, ft = pair(tmp_path, adam_like(0.02))
    store = Store.init(tmp_path / "store")
    store.commit("s", ft, base=str(base), encoding="int8")
    out = export_lora(store, "s", tmp_path / "energy", energy=0.5, rank=16)
    config = json.loads((out.out / "adapter_config.json").read_text())
    assert config["r"] == max(out.ranks.values()) <= 16
    assert len(set(out.ranks.values())) > 1 and config["rank_pattern"]
    assert all(config["rank_pattern"][k] == config["alpha_pattern"][k] for k in config["rank_pattern"])
    assert 0.5 <= out.energy_kept < 1.0
    state = load_file(out.out / "adapter_model.safetensors")
    assert {t.dtype for k, t in state.items() if "lora_" in k} == {torch.bfloat16}
    model = peft_model(base, out.out)  # rank_pattern as PEFT reads it
    for module, rank in out.ranks.items():
        layer = model.base_model.model.get_submodule(module)
        a = layer.lora_embedding_A["default"] if "embed" in module else layer.lora_A["default"].weight
        assert a.shape[0] == rank, module

    with pytest.raises(LoraError, match="not an empty folder"):
        export_lora(store, "s", tmp_path / "energy", rank=4)
    with pytest.raises(LoraError, match="rank"):
        export_lora(store, "s", tmp_path / "x", rank=0)
    # Only a norm changed: nothing a LoRA pair can hold.
    base2, ft2 = pair(tmp_path, only(r"model\.norm", adam_like(0.1)), name="norm")
    store.commit("n", ft2, base=str(base2))
    with pytest.raises(LoraError, match="nothing a LoRA adapter could hold"):
        export_lora(store, "n", tmp_path / "n", rank=4)


def peft_adapter(tmp_path, base_dir, *, r=4, alpha=16, tied=False):
    """An adapter as PEFT itself saves it, with nonzero B (a trained adapter's)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "embed_tokens"] if tied else ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, modules_to_save=["model.norm"],
                             ensure_weight_tying=tied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path / "peft-adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped.save_pretrained(out)
    return out, wrapped


@pytest.mark.parametrize("tied", [False, True])
def test_import_then_export_round_trips(tmp_path, tied):
    base = save(llama(tied=tied), tmp_path / "base")
    adapter, wrapped = peft_adapter(tmp_path, base, tied=tied)
    store = tmp_path / "store"
    runner = CliRunner()
    runner.invoke(cli, ["init", str(store)])
    # import-lora STANCE ADAPTER, as commit STANCE MODEL; the older order still works, with a warning.
    order = [str(adapter), "imported"] if tied else ["imported", str(adapter)]
    result = runner.invoke(cli, ["--store", str(store), "import-lora", *order, "--base", str(base), "--json"])
    assert result.exit_code == 0, result.output
    assert ("deprecated" in result.stderr) == tied
    imported = json.loads(result.stdout)
    assert imported["encoding"] == "lowrank:4" and imported["rank"] == 4
    assert "model.norm.weight" in imported["replaced"]

    with Store.open(store) as s:
        v = s.resolve("imported")
        assert v.metadata["lora.rank"] == "4" and v.metadata["lora.alpha"] == "16"
        # The stored version computes what the PEFT model computes.
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        s.apply(model, "imported")
        for text in PROMPTS[:2]:
            assert torch.allclose(logits(wrapped.eval(), text), logits(model, text), atol=1e-4)

    exported = runner.invoke(cli, ["--store", str(store), "export-lora", "imported", "--rank", "4", "--dtype",
                                   "fp32", "--out", str(tmp_path / "again"), "--json"])
    assert exported.exit_code == 0, exported.output
    first, again = load_file(adapter / "adapter_model.safetensors"), load_file(tmp_path / "again" /
                                                                               "adapter_model.safetensors")
    pairs = [k[:-len(".lora_A.weight")] for k in first if k.endswith(".lora_A.weight")]
    pairs = [p for p in pairs if not p.endswith("lm_head")]  # a tied head repeats the embedding's pair
    assert pairs
    for prefix in pairs:
        original = 4.0 * first[f"{prefix}.lora_B.weight"] @ first[f"{prefix}.lora_A.weight"]  # alpha / r = 4
        back = again[f"{prefix}.lora_B.weight"] @ again[f"{prefix}.lora_A.weight"]
        assert relative(back, original) < 1e-4, prefix
    assert torch.equal(again["base_model.model.model.norm.weight"], first["base_model.model.model.norm.weight"])
    if tied:
        original = 4.0 * (first["base_model.model.model.embed_tokens.lora_embedding_B"]
                          @ first["base_model.model.model.embed_tokens.lora_embedding_A"])
        back = (again["base_model.model.model.embed_tokens.lora_embedding_B"]
                @ again["base_model.model.model.embed_tokens.lora_embedding_A"])
        assert relative(back, original) < 1e-4


def test_import_lossless_stores_base_plus_delta_exactly(tmp_path):
    base = save(llama(), tmp_path / "base")
    adapter, wrapped = peft_adapter(tmp_path, base)
    with Store.init(tmp_path / "store") as store:
        done = import_lora(store, adapter, "exact", base=str(base), encoding="lossless")
        assert done.encoding == "lossless" and done.result.version.encoding == "lossless"
        merged = wrapped.merge_and_unload().state_dict()
        for name, tensor in store.tensors("exact"):
            assert relative(tensor, merged[name]) < 1e-6, name


def test_untrusted_adapters_are_refused(tmp_path):
    base = save(llama(), tmp_path / "base")
    adapter, _ = peft_adapter(tmp_path, base)
    store = Store.init(tmp_path / "store")
    state = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())

    def variant(name, *, tensors=None, settings=None, weights=True):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**config, **(settings or {})}))
        if weights:
            save_file(tensors if tensors is not None else state, str(folder / "adapter_model.safetensors"))
        return folder

    def refused(folder, error, match):
        with pytest.raises(error, match=match):
            import_lora(store, folder, "bad", base=str(base))

    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    refused(variant("shape", tensors={**state, q_a: torch.zeros(4, 31)}), LoraError, "do not fit")
    refused(variant("rank", settings={"r": 8}), LoraError, "rank 8")
    refused(variant("huge", settings={"r": 1 << 30}), LoraError, "r must be")
    refused(variant("dora", settings={"use_dora": True}), LoraError, "dora")
    refused(variant("type", settings={"peft_type": "IA3"}), LoraError, "only LoRA")
    refused(variant("stranger", tensors={**state, "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight":
                                         torch.zeros(4, 32), "base_model.model.model.layers.9.mlp.up_proj."
                                         "lora_B.weight": torch.zeros(64, 4)}), LoraError, "base does not have")
    refused(variant("prefix", tensors={**state, "model.layers.0.weird": torch.zeros(2)}), LoraError,
            "does not start with")
    refused(variant("unknown", tensors={**state, "base_model.model.model.layers.0.self_attn.q_proj.weight":
                                        torch.zeros(32, 32)}), LoraError, "neither a LoRA factor")
    refused(variant("half", tensors={k: v for k, v in state.items() if "lora_B" not in k}), LoraError, "missing")
    pickle = variant("pickle", weights=False)
    (pickle / "adapter_model.bin").write_bytes(b"not loaded")
    refused(pickle, PickleRefused, "safetensors")
    escape = variant("escape", weights=False)
    header = json.dumps({"base_model.model.../../x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    (escape / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 4)
    refused(escape, UnsafeInput, "path separator")
    truncated = variant("truncated", weights=False)
    (truncated / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes()[:-9])
    refused(truncated, Exception, "truncated")
    (tmp_path / "no-config").mkdir()
    refused(tmp_path / "no-config", LoraError, "adapter_config.json")
    # An adapter trained on another shape of model.
    other = save(llama(hidden=16), tmp_path / "other-base")
    with pytest.raises(LoraError, match="do not fit"):
        import_lora(store, adapter, "bad", base=str(other))
    assert store.log() == []


def test_randomized_export_measures_what_it_holds_as_compare_counts_it(tmp_path):
    from deltastore.analysis.compare import compare
    from deltastore.exports.lora import product

    base, ft = pair(tmp_path, adam_like(0.02))
    store = Store.init(tmp_path / "store")
    store.commit("s", ft, base=str(base))
    steps = []
    fast = export_lora(store, "s", tmp_path / "fast", rank=4, dtype="fp32", progress=lambda k, n: steps.append((k, n)))
    exact = export_lora(store, "s", tmp_path / "exact", rank=4, dtype="fp32", exact=True)
    assert not fast.exact and exact.exact
    assert steps[-1][0] == steps[-1][1]  # the progress bar ends full
    # compare's energy of a LoRA row is the exact one, averaged per matrix as export-lora's is.
    assert exact.energy_kept == pytest.approx(compare(base, ft, encodings=(), full=(), ranks=(4,))
                                              .row("LoRA r=4").energy, rel=1e-6)
    assert exact.energy_kept - 0.01 <= fast.energy_kept <= exact.energy_kept + 1e-6
    # What the randomized pairs hold is measured on the pairs written.
    pairs = load_file(fast.out / "adapter_model.safetensors")
    base_state, ft_state = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    shares = []
    for module in fast.targets:
        kind = "embedding" if "embed" in module else "linear"
        keys = ((f"base_model.model.{module}.lora_embedding_A", f"base_model.model.{module}.lora_embedding_B")
                if kind == "embedding" else
                (f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"))
        delta = ft_state[f"{module}.weight"] - base_state[f"{module}.weight"]
        error = product(pairs[keys[0]], pairs[keys[1]], kind) - delta
        shares.append(1 - float(error.double().square().sum() / delta.double().square().sum()))
    assert sum(shares) / len(shares) == pytest.approx(fast.energy_kept, abs=1e-4)
    for folder in (fast.out, exact.out):
        assert folder.stat().st_mode & 0o777 == 0o755
        assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
            "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}
