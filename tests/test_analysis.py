import math

import pytest
import torch

from deltastore.metrics.analysis import (
    AnalysisError,
    Location,
    energy_fraction,
    locate,
    lora_bytes,
    lowrank_energy,
    rank_for,
    singular_values,
    summarize,
    tensor_change,
    tensor_changes,
)
from deltastore.analysis.plots import heatmap


@pytest.mark.parametrize(
    ("name", "layer", "module"),
    [
        # Llama / Qwen2 / Mistral / SmolLM
        ("model.embed_tokens.weight", None, "embed"),
        ("model.layers.0.self_attn.q_proj.weight", 0, "q"),
        ("model.layers.3.self_attn.k_proj.bias", 3, "k"),
        ("model.layers.15.self_attn.v_proj.weight", 15, "v"),
        ("model.layers.15.self_attn.o_proj.weight", 15, "o"),
        ("model.layers.2.mlp.gate_proj.weight", 2, "gate"),
        ("model.layers.2.mlp.up_proj.weight", 2, "up"),
        ("model.layers.2.mlp.down_proj.weight", 2, "down"),
        ("model.layers.2.input_layernorm.weight", 2, "norm"),
        ("model.layers.2.post_attention_layernorm.weight", 2, "norm"),
        ("model.norm.weight", None, "norm"),
        ("lm_head.weight", None, "lm_head"),
        # GPT-2
        ("transformer.wte.weight", None, "embed"),
        ("transformer.wpe.weight", None, "embed"),
        ("transformer.h.4.attn.c_attn.weight", 4, "qkv"),
        ("transformer.h.4.attn.c_proj.bias", 4, "o"),
        ("transformer.h.4.mlp.c_fc.weight", 4, "mlp_in"),
        ("transformer.h.4.mlp.c_proj.weight", 4, "mlp_out"),
        ("transformer.h.4.ln_1.weight", 4, "norm"),
        ("transformer.h.11.ln_2.bias", 11, "norm"),
        ("transformer.ln_f.weight", None, "norm"),
        ("transformer.h.4.attn.bias", 4, "other"),
        # GPT-NeoX / Pythia
        ("gpt_neox.embed_in.weight", None, "embed"),
        ("gpt_neox.layers.7.attention.query_key_value.weight", 7, "qkv"),
        ("gpt_neox.layers.7.attention.dense.weight", 7, "o"),
        ("gpt_neox.layers.7.mlp.dense_h_to_4h.weight", 7, "mlp_in"),
        ("gpt_neox.layers.7.mlp.dense_4h_to_h.bias", 7, "mlp_out"),
        ("gpt_neox.layers.7.input_layernorm.weight", 7, "norm"),
        ("gpt_neox.final_layer_norm.weight", None, "norm"),
        ("embed_out.weight", None, "lm_head"),
        # Phi
        ("model.layers.1.self_attn.dense.weight", 1, "o"),
        ("model.layers.1.mlp.fc1.weight", 1, "mlp_in"),
        ("model.layers.1.mlp.fc2.weight", 1, "mlp_out"),
        ("model.final_layernorm.weight", None, "norm"),
        # OPT, Falcon, Phi-3, Mixtral
        ("model.decoder.layers.5.self_attn.out_proj.weight", 5, "o"),
        ("model.decoder.layers.5.self_attn_layer_norm.weight", 5, "norm"),
        ("model.decoder.layers.5.fc1.weight", 5, "mlp_in"),
        ("model.decoder.embed_positions.weight", None, "embed"),
        ("transformer.h.2.self_attention.query_key_value.weight", 2, "qkv"),
        ("transformer.h.2.self_attention.dense.weight", 2, "o"),
        ("transformer.word_embeddings.weight", None, "embed"),
        ("model.layers.0.self_attn.qkv_proj.weight", 0, "qkv"),
        ("model.layers.0.mlp.gate_up_proj.weight", 0, "mlp_in"),
        ("model.layers.6.block_sparse_moe.experts.3.w1.weight", 6, "gate"),
        ("model.layers.6.block_sparse_moe.experts.3.w2.weight", 6, "down"),
        ("model.layers.6.block_sparse_moe.gate.weight", 6, "other"),
        ("something.else", None, "other"),
    ],
)
def test_locate(name, layer, module):
    assert locate(name) == Location(layer, module)


def low_rank(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, rank, generator=generator)
    right = torch.randn(rank, cols, generator=generator)
    return left @ right


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_an_exactly_rank_4_delta(shape):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator)
    delta = low_rank(*shape, rank=4, seed=1)

    change = tensor_change(base, base + delta)
    energy = lowrank_energy(delta, [1, 2, 4, 8])

    assert energy[4] == pytest.approx(1.0, abs=1e-9)
    assert energy[8] == pytest.approx(1.0, abs=1e-9)
    assert energy[1] < energy[2] < 0.9999
    assert change.rank90 <= 4 and change.rank99 <= 4
    assert change.energy_at(4) == pytest.approx(1.0, abs=1e-9)
    assert len(change.singular_values) == 4 or change.singular_values[4] < 1e-3
    assert lora_bytes(shape, 4, 2) == 4 * (shape[0] + shape[1]) * 2
    assert lora_bytes(shape, 4, 4) == 4 * sum(shape) * 4


def test_all_zero_delta_one_answer():
    # compare's LoRA energy, export-lora's ranks and analyze's rank90/rank99 all come from these
    # two: an all-zero delta is held whole at rank 0, from a list or a tensor alike.
    zeros = torch.zeros(6, dtype=torch.float64)
    for spectrum in (zeros, zeros.tolist(), ()):
        assert rank_for(spectrum, 0.9) == 0 and rank_for(spectrum, 1.0) == 0
        assert energy_fraction(spectrum, 0) == 1.0 and energy_fraction(spectrum, 3) == 1.0
    base = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    unchanged = tensor_change(base, base.clone())
    assert unchanged.rank90 == 0 and unchanged.rank99 == 0 and unchanged.energy_at(2) == 1.0
    spectrum = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert rank_for(spectrum, 0.9) == rank_for(spectrum.tolist(), 0.9) == 2
    assert energy_fraction(spectrum, 1) == energy_fraction([3.0, 2.0, 1.0], 1) == pytest.approx(9 / 14)


def test_tensor_change_measures_the_delta():
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(64, 48, generator=generator)
    target = base + 0.01 * torch.randn(64, 48, generator=generator)
    delta = target - base

    change = tensor_change(base, target, top=3)

    assert change.shape == (64, 48)
    assert change.rel_change == pytest.approx(float(delta.norm() / base.norm()), rel=1e-5)
    assert change.energy == pytest.approx(float(delta.norm() ** 2), rel=1e-5)
    expected = torch.linalg.svdvals(delta.double())[:3]
    assert torch.allclose(torch.tensor(change.singular_values, dtype=torch.float64), expected,
                          rtol=1e-5)
    # A dense random delta needs most of its rank.
    assert 20 < change.rank90 < change.rank99 <= 48


def test_tensor_change_of_vectors_bfloat16_and_zeros():
    base = torch.ones(10, dtype=torch.bfloat16)
    change = tensor_change(base, base * 2)
    assert change.rel_change == pytest.approx(1.0)
    assert change.rank90 is None and change.rank99 is None and change.singular_values == ()

    unchanged = tensor_change(torch.ones(8, 4), torch.ones(8, 4))
    assert unchanged.rel_change == 0.0 and unchanged.energy == 0.0 and unchanged.rank90 == 0

    from_zero = tensor_change(torch.zeros(3), torch.ones(3))
    assert from_zero.rel_change == math.inf

    with pytest.raises(AnalysisError, match="shapes differ"):
        tensor_change(torch.zeros(3, 2), torch.zeros(2, 3))


def test_singular_values_match_svd_on_a_tall_matrix_processed_in_blocks():
    matrix = torch.randn(5000, 33, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(singular_values(matrix), torch.linalg.svdvals(matrix.double()),
                          rtol=1e-7)


def test_lora_and_lowrank_refuse_non_matrices():
    with pytest.raises(AnalysisError):
        lora_bytes((10,), 4, 2)
    with pytest.raises(AnalysisError):
        lowrank_energy(torch.zeros(10), [4])


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A two-layer Llama-style state dict (names and shapes as transformers writes them)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (128, 64), "model.norm.weight": (64,),
              "lm_head.weight": (128, 64)}
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (64, 64),
            prefix + "self_attn.k_proj.weight": (32, 64),
            prefix + "self_attn.v_proj.weight": (32, 64),
            prefix + "self_attn.o_proj.weight": (64, 64),
            prefix + "mlp.gate_proj.weight": (128, 64),
            prefix + "mlp.up_proj.weight": (128, 64),
            prefix + "mlp.down_proj.weight": (64, 128),
            prefix + "input_layernorm.weight": (64,),
            prefix + "post_attention_layernorm.weight": (64,),
        }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def test_a_fine_tune_of_one_tensor_shows_as_exactly_one_cell():
    base = tiny_state()
    target = {name: tensor.clone() for name, tensor in base.items()}
    target["model.layers.1.self_attn.v_proj.weight"] += 0.01 * low_rank(32, 64, 2, seed=4)

    rows = summarize(tensor_changes(base, target))

    changed = [row for row in rows if row.energy > 0.0]
    assert [(row.layer, row.module) for row in changed] == [(1, "v")]
    assert changed[0].energy_share == 1.0 and changed[0].rank99 <= 2
    assert all(row.rel_change == 0.0 for row in rows if row is not changed[0])
    # Every (layer, module) appears once, outside-the-blocks rows first, then layers in order.
    keys = [(row.layer, row.module) for row in rows]
    assert len(keys) == len(set(keys)) == 3 + 2 * 8
    assert keys[:3] == [(None, "embed"), (None, "norm"), (None, "lm_head")]
    assert keys[3:] == sorted(keys[3:], key=lambda key: key[0])


def test_summarize_pools_a_weight_and_its_bias():
    changes = {
        "transformer.h.0.attn.c_attn.weight": tensor_change(torch.ones(4, 12), torch.ones(4, 12)),
        "transformer.h.0.attn.c_attn.bias": tensor_change(torch.full((12,), 2.0),
                                                          torch.full((12,), 3.0)),
    }
    (row,) = summarize(changes)
    assert (row.layer, row.module, row.tensors, row.numel) == (0, "qkv", 2, 60)
    assert row.energy == pytest.approx(12.0)
    assert row.rel_change == pytest.approx(math.sqrt(12.0 / (48.0 + 48.0)))
    assert row.rank90 == 0


def test_tensor_changes_refuses_different_names():
    with pytest.raises(AnalysisError, match="different tensors"):
        tensor_changes({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_heatmap_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    base = tiny_state()
    generator = torch.Generator().manual_seed(5)
    dense = {name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
             for name, tensor in base.items()}
    surgical = dict(base)
    surgical["model.layers.1.self_attn.v_proj.weight"] = dense[
        "model.layers.1.self_attn.v_proj.weight"]

    path = heatmap({"dense@1": tensor_changes(base, dense),
                    "surgical@1": tensor_changes(base, surgical)}, tmp_path / "map.png")

    assert path == tmp_path / "map.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000

    with pytest.raises(AnalysisError, match="unknown heatmap value"):
        heatmap({"a": {}}, tmp_path / "x.png", value="alpha")
