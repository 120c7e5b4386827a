"""How much of a fine-tune's behaviour a model still has: next-token KL and top-1 agreement.

This module owns the fidelity measurement (docs/fidelity.md, "What a fine-tune costs, and what a cheap form
of it keeps"): a ``FidelityProbe`` keeps the fine-tuned model's next-token log-probabilities at
every position of every prompt, then measures KL(fine-tuned || current) and top-1 agreement for
whatever weights the model holds when asked. It also reads a prompts file and loads a Hugging Face model folder for it.

It never changes a model's weights and leaves a model in the train/eval mode it found it in;
it never loads a pickle (``.bin``/``.pt`` checkpoints), never reaches the network and never
prints. It does not know the store: the caller puts weights into the model between
measurements.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import DeltastoreError

# transformers (optional, seconds to import) is imported inside the functions that load a
# tokenizer or a model: measuring a model loaded by the caller needs none of it.

__all__ = [
    "Fidelity",
    "FidelityError",
    "FidelityProbe",
    "load_causal_lm",
    "load_tokenizer",
    "read_prompts",
]


class FidelityError(DeltastoreError, ValueError):
    """Fidelity cannot be measured: no prompts, no transformers, no model folder, ..."""


def read_prompts(path: str | Path) -> list[str]:
    """The prompts in a text file, one per line; blank lines are skipped."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FidelityError(f"prompts file {file} does not exist") from None
    except UnicodeDecodeError as error:
        raise FidelityError(f"prompts file {file} is not UTF-8 text: {error}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise FidelityError(f"prompts file {file} holds no prompts: write one prompt per line")
    return prompts


@dataclass(frozen=True)
class Fidelity:
    """Mean KL(reference || current) over all positions, top-1 agreement, positions counted."""

    kl: float
    top1: float
    positions: int


#: Padded positions per forward pass: the logits of a batch are this times the vocabulary
#: float32 values (100 MB for SmolLM2's 49152 tokens).
BATCH_TOKENS = 512


def _takes_attention_mask(model: torch.nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


class FidelityProbe:
    """The reference next-token distributions of a model, to measure later weights against.

    Construct it while ``model`` holds the reference (fine-tuned) weights. ``prompts`` are
    strings (then ``tokenizer`` is required) or sequences of token ids. Prompts run together,
    a batch of up to ``BATCH_TOKENS`` padded positions per forward pass (on a CPU, a share of
    the prompts per core, each on its own thread), padded on the right:
    in a causal model a position never sees a later one, so padding cannot change a prompt's
    own positions (which alone are kept); one pass instead of one per prompt is 2-3x faster
    on a CPU (SmolLM2-135M, 8 chat prompts). ``max_tokens`` caps each
    prompt's length: the reference keeps positions x vocabulary float32 values. With ``chat``,
    each text prompt is a user message put through the tokenizer's chat template, up to where
    the assistant's reply starts: what a chat fine-tune (a stance) changes most.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        tokenizer: Any = None,
        max_tokens: int = 256,
        chat: bool = False,
    ) -> None:
        if max_tokens < 1:
            raise FidelityError(f"max_tokens must be at least 1, got {max_tokens}")
        if not prompts:
            raise FidelityError("fidelity needs at least one prompt")
        if chat and not getattr(tokenizer, "chat_template", None):
            raise FidelityError("the tokenizer has no chat template: measure the prompts as plain text "
                                "(without --chat)")
        self.model = model
        self._inputs = [self._tokenize(self._chat(prompt, tokenizer) if chat else prompt, tokenizer, max_tokens)
                        for prompt in prompts]
        self._reference = self._log_probs(model)
        self._reference_top1 = [log_probs.argmax(dim=-1) for log_probs in self._reference]
        self.positions = sum(ids.shape[-1] for ids in self._inputs)

    @staticmethod
    def _chat(prompt: str | Sequence[int], tokenizer: Any) -> str | Sequence[int]:
        if not isinstance(prompt, str):
            return prompt
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(ids)

    @staticmethod
    def _tokenize(prompt: str | Sequence[int], tokenizer: Any, max_tokens: int) -> torch.Tensor:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise FidelityError("text prompts need a tokenizer: pass tokenizer=...")
            ids = tokenizer(prompt)["input_ids"]
        else:
            ids = prompt
        ids = torch.as_tensor(list(ids), dtype=torch.long)[:max_tokens]
        if ids.ndim != 1 or ids.numel() == 0:
            raise FidelityError(f"prompt {prompt!r} gives no tokens")
        return ids.unsqueeze(0)

    def _batches(self, prompts: Sequence[int]) -> list[list[int]]:
        # Prompts of similar length together, so that little is padding; the order of the
        # results is the prompts' own.
        order = sorted(prompts, key=lambda i: self._inputs[i].shape[-1])
        batches: list[list[int]] = []
        for i in order:
            length = self._inputs[i].shape[-1]
            if batches and (len(batches[-1]) + 1) * length <= BATCH_TOKENS:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _lanes(self, device: torch.device) -> list[list[list[int]]]:
        """The batches of each thread. On a CPU, one thread per core, each running its own
        share of the prompts with one intra-op thread: torch's intra-op threads meet at every
        operation, and a model's many small ones made a pass of 8 chat prompts on SmolLM2-135M
        cost 1.7 CPU-s on two idle cores and 3-6 on a busy machine, where one thread costs 1.1
        (the numbers are the same: each prompt's positions do not depend on the others). The
        model's forward is called from several threads at once, which a Hugging Face model
        allows (its output capture is per thread); a model that keeps state between calls
        would not."""
        count = len(self._inputs)
        lanes = 1 if device.type != "cpu" else max(1, min(torch.get_num_threads(), count))
        by_length = sorted(range(count), key=lambda i: self._inputs[i].shape[-1])
        # Dealt in turn, so that each lane gets prompts of every length.
        return [self._batches(by_length[lane::lanes]) for lane in range(lanes)]

    def _log_probs(self, model: torch.nn.Module) -> list[torch.Tensor]:
        was_training = model.training
        device = _model_device(model)
        masked = _takes_attention_mask(model)
        out: list[torch.Tensor | None] = [None] * len(self._inputs)

        def run(batches: list[list[int]]) -> None:
            with torch.inference_mode():  # thread-local: entered in the thread that runs the model
                for batch in batches:
                    lengths = [self._inputs[i].shape[-1] for i in batch]
                    ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
                    mask = torch.zeros(len(batch), max(lengths), dtype=torch.long)
                    for row, (i, length) in enumerate(zip(batch, lengths)):
                        ids[row, :length] = self._inputs[i][0]
                        mask[row, :length] = 1
                    kwargs = {"attention_mask": mask.to(device)} if masked else {}
                    logits = model(input_ids=ids.to(device), use_cache=False, **kwargs).logits
                    for row, (i, length) in enumerate(zip(batch, lengths)):
                        out[i] = torch.log_softmax(logits[row, :length].float(), dim=-1)

        lanes = self._lanes(device)
        model.eval()  # dropout off: the same weights must always give the same numbers
        try:
            if len(lanes) == 1:
                run(lanes[0])
            else:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
                        for done in [pool.submit(run, lane) for lane in lanes]:
                            done.result()
                finally:
                    torch.set_num_threads(threads)
            return out  # type: ignore[return-value]
        finally:
            model.train(was_training)

    @property
    def token_ids(self) -> list[list[int]]:
        """Each prompt's token ids, as measured (chat template applied, capped at max_tokens)."""
        return [ids[0].tolist() for ids in self._inputs]

    def measure(self, model: torch.nn.Module | None = None) -> Fidelity:
        """Compare the weights ``model`` (default: the probe's own model) holds now."""
        return self.compare(self._log_probs(self.model if model is None else model))

    def compare(self, current: Sequence[torch.Tensor]) -> Fidelity:
        """Compare next-token log-probabilities computed elsewhere (another runtime, on
        ``token_ids``): one (positions, vocabulary) tensor per prompt."""
        kl_sum = 0.0
        agree = 0
        for reference, log_probs, top1 in zip(self._reference, current, self._reference_top1):
            if log_probs.shape != reference.shape:
                raise FidelityError(
                    f"the model gives next-token distributions of shape {tuple(log_probs.shape)}, "
                    f"the reference {tuple(reference.shape)}: is it the same architecture?"
                )
            log_probs = log_probs.to(reference.device)
            probs = reference.exp()
            # A token the reference gives probability 0 adds nothing, even where the current
            # model also gives it 0 (where the plain formula would give 0 * nan).
            terms = torch.where(probs > 0, probs * (reference - log_probs), 0.0)
            per_position = terms.sum(dim=-1)
            # Rounding can leave an identical distribution a hair below zero; KL never is.
            kl_sum += math.fsum(per_position.clamp_min(0.0).double().tolist())
            agree += int((log_probs.argmax(dim=-1) == top1).sum())
        return Fidelity(
            kl=kl_sum / self.positions,
            top1=agree / self.positions,
            positions=self.positions,
        )


#: Files a tokenizer is loaded from; a folder holding none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from a folder (tokenizer.json, tokenizer_config.json, ...) or a tokenizer.json
    file, local only; a ``FidelityError`` of one line where there is none."""
    path = Path(path)
    hint = "pass --tokenizer PATH_OR_FOLDER (a tokenizer.json, or a folder holding one)"
    if path.is_file():
        try:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        except ImportError:
            raise FidelityError("measuring fidelity needs transformers: pip install transformers") from None
        except Exception as error:  # the tokenizers library raises its own exception types
            raise FidelityError(f"{path} is not a tokenizer.json that can be read ({_first_line(error)}); "
                                f"{hint}") from None
    if not path.is_dir():
        raise FidelityError(f"tokenizer {path} does not exist; {hint}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FidelityError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}, ...); {hint}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers raises many kinds, several lines long
        raise FidelityError(f"cannot load a tokenizer from {path} ({_first_line(error)}); {hint}") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_causal_lm(folder: str | Path, *, tokenizer: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """Load a Hugging Face causal LM folder for fidelity: float32, CPU, eval mode, local only.

    Only safetensors weights are read; a folder with ``.bin`` weights only is refused. The
    tokenizer comes from ``tokenizer`` (a folder or a tokenizer.json) if given, else from the
    folder.
    """
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FidelityError(
            f"{path} is not a Hugging Face model folder (no config.json): fidelity needs one"
        )
    if not any(path.glob("*.safetensors")):
        # .bin/.pt checkpoints are pickles, which can run code when loaded: never read them.
        raise FidelityError(
            f"{path} holds no .safetensors weights; .bin/.pt checkpoints are never loaded: "
            "save the model with safetensors (save_pretrained does by default)"
        )
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise FidelityError(
            "measuring fidelity needs transformers: pip install transformers"
        ) from None
    from transformers.utils import logging as hf_logging

    # Before the weights: a missing tokenizer is said at once, not after loading the model.
    tokenizer = load_tokenizer(path if tokenizer is None else tokenizer)

    # transformers draws its own loading bar; deltastore's callers decide what the terminal shows.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, local_files_only=True, use_safetensors=True,
            device_map=None,
        )
    except (OSError, ValueError) as error:
        raise FidelityError(
            f"cannot load {path} as a causal LM from safetensors weights: {error}"
        ) from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    # Older transformers ignore dtype= and newer ones may default to the checkpoint's dtype:
    # the reference distributions must be float32 either way (bf16 -> fp32 is exact).
    model.to(torch.float32)
    model.eval()
    return model, tokenizer
