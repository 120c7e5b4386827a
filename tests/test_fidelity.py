import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deltastore.metrics.fidelity import (  # noqa: E402
    Fidelity,
    FidelityError,
    FidelityProbe,
    load_causal_lm,
    read_prompts,
)

VOCAB = 128
WORDS = ["[UNK]", "what", "is", "the", "capital", "of", "france", "i", "am", "not", "sure",
         "paris", "a", "cat", "sat", "on", "mat", "?", "."]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: index for index, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def id_prompts(count: int = 4, length: int = 12) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (length,), generator=generator).tolist() for _ in range(count)]


def fine_tune(model: torch.nn.Module, scale: float = 0.02) -> tuple[dict, dict]:
    """Put a dense seeded delta on every tensor (like an Adam fine-tune): (base, fine-tuned)."""
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    tuned = {name: tensor + scale * torch.randn(tensor.shape, generator=generator)
             for name, tensor in base.items()}
    model.load_state_dict(tuned)
    return base, tuned


def quantised(delta: torch.Tensor, levels: int) -> torch.Tensor:
    scale = delta.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
    return (delta / scale).round() * scale


def sign_only(delta: torch.Tensor) -> torch.Tensor:
    return delta.sign() * delta.abs().mean(dim=-1, keepdim=True)


def test_reference_weights_give_zero_kl_and_full_agreement():
    model = tiny_llama()
    fine_tune(model)
    probe = FidelityProbe(model, id_prompts())
    assert probe.measure() == Fidelity(kl=0.0, top1=1.0, positions=48)


def test_kl_grows_as_the_stored_delta_gets_coarser():
    model = tiny_llama()
    base, tuned = fine_tune(model)
    probe = FidelityProbe(model, id_prompts())

    def stored_as(encode) -> Fidelity:
        model.load_state_dict({name: base[name] + encode(tuned[name] - base[name])
                               for name in base})
        return probe.measure()

    int8 = stored_as(lambda delta: quantised(delta, 127))
    int4 = stored_as(lambda delta: quantised(delta, 7))
    one_bit = stored_as(sign_only)
    nothing = stored_as(torch.zeros_like)

    assert 0.0 < int8.kl < int4.kl < one_bit.kl < nothing.kl
    assert int8.top1 >= one_bit.top1 >= nothing.top1
    assert nothing.top1 < 1.0
    # Putting the fine-tune back gives the reference exactly.
    model.load_state_dict(tuned)
    assert probe.measure() == Fidelity(kl=0.0, top1=1.0, positions=48)


def test_measure_is_deterministic_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    base, tuned = fine_tune(model)
    probe = FidelityProbe(model, id_prompts())
    model.load_state_dict(base)
    model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    first, second = probe.measure(), probe.measure()

    assert first == second and first.kl > 0.0
    assert model.training
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_measure_another_model_instance():
    model = tiny_llama()
    base, tuned = fine_tune(model)
    probe = FidelityProbe(model, id_prompts())
    other = tiny_llama(seed=3)
    other.load_state_dict(tuned)
    assert probe.measure(other) == Fidelity(kl=0.0, top1=1.0, positions=48)

    other.load_state_dict(base)
    model.load_state_dict(base)
    assert probe.measure(other) == probe.measure(model)


def test_a_model_with_another_vocabulary_is_refused():
    model = tiny_llama()
    probe = FidelityProbe(model, id_prompts())
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB * 2, max_position_embeddings=64,
    )
    with pytest.raises(FidelityError, match="same architecture"):
        probe.measure(transformers.LlamaForCausalLM(config))


def test_text_prompts_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("what is the capital of france ?\n\n   \ni am not sure .\n", encoding="utf-8")
    prompts = read_prompts(path)
    assert prompts == ["what is the capital of france ?", "i am not sure ."]

    model = tiny_llama()
    probe = FidelityProbe(model, prompts, tokenizer=word_tokenizer())
    assert probe.positions == 7 + 5
    assert probe.measure() == Fidelity(kl=0.0, top1=1.0, positions=12)


def test_max_tokens_caps_each_prompt():
    probe = FidelityProbe(tiny_llama(), id_prompts(count=2, length=20), max_tokens=5)
    assert probe.positions == 10


def test_bad_prompts_are_refused(tmp_path):
    model = tiny_llama()
    with pytest.raises(FidelityError, match="tokenizer"):
        FidelityProbe(model, ["a prompt"])
    with pytest.raises(FidelityError, match="at least one prompt"):
        FidelityProbe(model, [])
    with pytest.raises(FidelityError, match="no tokens"):
        FidelityProbe(model, [[1, 2], []])

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(FidelityError, match="no prompts"):
        read_prompts(empty)
    with pytest.raises(FidelityError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_load_causal_lm_reads_a_model_folder(tmp_path):
    model = tiny_llama()
    fine_tune(model)
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)

    loaded, tokenizer = load_causal_lm(tmp_path)

    assert not loaded.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
    prompts = ["the cat sat on the mat ."]
    probe = FidelityProbe(model, prompts, tokenizer=tokenizer)
    assert probe.measure(loaded) == Fidelity(kl=0.0, top1=1.0, positions=7)


def test_load_causal_lm_refuses_what_it_cannot_load(tmp_path, monkeypatch):
    with pytest.raises(FidelityError, match="config.json"):
        load_causal_lm(tmp_path)

    tiny_llama().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle that must never be loaded")
    with pytest.raises(FidelityError, match="safetensors"):
        load_causal_lm(tmp_path)

    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(FidelityError, match="pip install transformers"):
        load_causal_lm(tmp_path)


def test_prompts_shared_between_threads_give_the_numbers_of_one_thread() -> None:
    model = tiny_llama()
    base, tuned = fine_tune(model)
    prompts = [p[:n] for p, n in zip(id_prompts(count=7, length=20), (5, 20, 9, 14, 3, 17, 11))]
    threads = torch.get_num_threads()
    results = {}
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            model.load_state_dict(tuned)
            probe = FidelityProbe(model, prompts)
            assert len(probe._lanes(torch.device("cpu"))) == count
            model.load_state_dict(base)
            results[count] = probe.measure()
            assert torch.get_num_threads() == count  # restored after the lanes ran
    finally:
        torch.set_num_threads(threads)
    assert results[3].positions == results[1].positions == 79
    assert results[3].kl == pytest.approx(results[1].kl, rel=1e-6)
    assert results[3].top1 == results[1].top1
    assert results[1].kl > 0
