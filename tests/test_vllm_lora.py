"""export-lora --for vllm: a PEFT adapter folder within vLLM's rules, that PEFT loads too.

vLLM's rules, pinned from its source (vllm-project/vllm):
- PEFTHelper (https://github.com/vllm-project/vllm/blob/e745bafffc44744aa601169f8c6f325e47ca7cd5/vllm/lora/peft_helper.py#L44-L60):
  `_validate_features` refuses `modules_to_save` ("vLLM only supports modules_to_save being None")
  and `use_dora`; `__post_init__` sets ONE scaling, `lora_alpha / r` (rank_pattern and
  alpha_pattern are not fields: `from_dict` drops them); `validate_legal` refuses
  `r > max_lora_rank` ("LoRA rank 32 is greater than max_lora_rank 16") and `bias != "none"`
  without bias_enabled.
- LoRAModel.from_lora_tensors / from_local_checkpoint
  (https://github.com/vllm-project/vllm/blob/0306474e9d1f26d8717aad457b9511f0c9e57d60/vllm/lora/lora_model.py):
  each module's weights get `LoRALayerWeights.from_config(module_name, peft_helper)`, the
  adapter-wide r and scaling; `check_unexpected_modules` refuses a tensor whose module's last
  name part is not among the model's LoRA modules.
- BaseLinearLayerWithLoRA.set_lora (vllm/lora/layers/base_linear.py):
  `lora_a_stacked[0][index, 0, : lora_a.shape[0], : lora_a.shape[1]].copy_(lora_a)`: a pair of a
  rank below `max_lora_rank` fills the first rows of its slot, so per-matrix ranks load.
- vllm/model_executor/models/llama.py: `LlamaForCausalLM(nn.Module, SupportsLoRA, ...)`,
  packed_modules_mapping qkv_proj = q/k/v_proj, gate_up_proj = gate/up_proj (Qwen2 the same);
  vllm/model_executor/models/gpt2.py: `GPT2LMHeadModel(nn.Module, SupportsPP)`: no LoRA.
"""

import json
import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from cli.main import cli  # noqa: E402
from deltastore.exports.lora import LoraError  # noqa: E402
from deltastore.exports.vllm_lora import export_vllm_lora  # noqa: E402
from tiny_lm import committed, llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# The projections vLLM's Llama and Qwen2 apply a LoRA to (the parts of qkv_proj, o_proj,
# gate_up_proj, down_proj); embed_tokens and lm_head are left out of the profile.
VLLM_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def qwen2():
    import transformers

    torch.manual_seed(1)
    config = transformers.Qwen2Config(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config).eval()


def gpt2():
    import transformers

    torch.manual_seed(2)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=48, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64)).eval()


def truncated(delta, rank):
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


@pytest.mark.parametrize("build", [lambda: llama(0, hidden=64, layers=2), qwen2], ids=["llama", "qwen2"])
def test_vllm_profile_within_vllms_rules_and_peft_merges_it(tmp_path, build):
    store, base_dir, base, ft = committed(tmp_path, build())
    e = export_vllm_lora(store, "s", tmp_path / "adapter", max_rank=8, energy=0.25, dtype="fp32")
    config = json.loads((e.out / "adapter_config.json").read_text())
    tensors = load_file(e.out / "adapter_model.safetensors")

    # PEFTHelper.validate_legal / _validate_features with --max-lora-rank 8:
    assert config["r"] <= 8 and not config["modules_to_save"] and config["use_dora"] is False
    assert config["bias"] == "none" and config["use_rslora"] is False
    assert config["lora_alpha"] == config["r"]  # vLLM's one scaling, lora_alpha / r, is 1
    assert set(config["target_modules"]) <= VLLM_PROJECTIONS
    # check_unexpected_modules: every tensor a pair of a projection; the rank within r.
    modules = set()
    for key, t in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
        assert match, key
        modules.add(match.group(1))
        assert match.group(1).rpartition(".")[2] in VLLM_PROJECTIONS, key
        rank = t.shape[0] if match.group(2) == "lora_A" else t.shape[1]
        assert 1 <= rank <= config["r"], key
    assert len({min(t.shape) for t in tensors.values()}) > 1  # per-matrix ranks, by energy
    # What was left out is listed, with the share of the squared delta each holds.
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(e.dropped)
    assert set(e.dropped_shares) == set(e.dropped) and all(0 < v < 1 for v in e.dropped_shares.values())
    assert sum(e.dropped_shares.values()) == pytest.approx(e.dropped_energy_fraction)

    # PEFT loads it (rank_pattern and alpha_pattern as it reads them), and its merged weights are
    # the export's reconstruction: base + the truncated SVD of each delta at its pair's rank.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft.PeftModel.from_pretrained(model, e.out).merge_and_unload().state_dict()
    scaling = config["lora_alpha"] / config["r"]  # vLLM's, the same for every pair
    for module in modules:
        name = f"{module}.weight"
        expected = base[name] + truncated(ft[name] - base[name], e.ranks[module])
        torch.testing.assert_close(merged[name], expected, rtol=1e-4, atol=1e-5)
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        torch.testing.assert_close(base[name] + scaling * (b @ a), merged[name], rtol=1e-5, atol=1e-6)
    for name in e.dropped:  # left at the base
        if name in merged:
            assert torch.equal(merged[name], base[name]), name


def test_rank_is_capped_at_max_rank(tmp_path):
    store, *_ = committed(tmp_path, llama(0, hidden=64, layers=2))
    e = export_vllm_lora(store, "s", tmp_path / "adapter", max_rank=4, rank=32)
    config = json.loads((e.out / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(e.ranks.values()) == {4} and not config["rank_pattern"]


def test_gpt2_is_refused_in_one_line(tmp_path):
    store, *_ = committed(tmp_path, gpt2())
    with pytest.raises(LoraError, match="LlamaForCausalLM, Qwen2ForCausalLM bases only; this base is "
                                        "'GPT2LMHeadModel'"):
        export_vllm_lora(store, "s", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_cli_for_vllm(tmp_path):
    committed(tmp_path, llama(0, hidden=64, layers=2))
    runner = CliRunner()
    args = ["--store", str(tmp_path / "store"), "export-lora", "s", "--for", "vllm"]
    result = runner.invoke(cli, [*args, "--max-rank", "8", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "--max-lora-rank 8" in result.output and "model.embed_tokens.weight" in result.output
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 8
    result = runner.invoke(cli, [*args, "--format", "gguf", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--for vllm writes a PEFT adapter" in result.output
    result = runner.invoke(cli, [*args, "--max-rank", "0", "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "--max-rank must be a whole number of at least 1" in result.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
