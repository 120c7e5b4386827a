"""Options and arguments several commands share, and the store a command opens."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import click

from deltastore import Store
from deltastore.core.units import parse_size
from deltastore.repo.reflog import RefLog
from deltastore.store import find_store, store_at

from .output import Interrupted, echo, finishing, hold, interrupted_line, on_interrupt


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON value on stdout.")(f)


def base_path_option(f: Callable) -> Callable:
    return click.option("--base-path", type=click.Path(), help="Where the base's weights are, if they moved.")(f)


def remote_option(f: Callable) -> Callable:
    """push and pull: a remote instead of the Hub."""
    return click.option("--remote", "remote", metavar="NAME",
                        help="A remote (`remote add`) or a URL, instead of the Hub.")(f)


def top_option(f: Callable) -> Callable:
    """diff and analyze: the largest rows only (their summary still counts every row)."""
    return click.option("--top", type=click.IntRange(min=1), metavar="N",
                        help="List only the N rows with the largest squared change, largest first (the summary "
                             "above still counts them all; --json lists every row).")(f)


def out_option(f: Callable) -> Callable:
    return click.option("--out", required=True, type=click.Path(),
                        help="A new folder (--format gguf: a new .gguf file).")(f)


def export_tokenizer_option(f: Callable) -> Callable:
    """export and export-lora: the tokenizer for measuring what was written on --prompts."""
    return click.option("--tokenizer", type=click.Path(),
                        help="The tokenizer for --prompts, where the base folder has none.")(f)


#: Other spellings of a dtype that every --dtype accepts; help shows the one spelling of each.
DTYPE_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}
#: The library's spelling of each factor dtype of a PEFT adapter (lora.FACTOR_DTYPES).
PEFT_DTYPES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}


class Dtype(click.Choice):
    """A dtype as f32, f16, bf16 or q8_0 (GGUF's names), in any case; fp32, fp16, float16 and
    bfloat16 are taken as the same."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            value = DTYPE_ALIASES.get(value.lower(), value.lower())
        return super().convert(value, param, ctx)


def chat_option(f: Callable) -> Callable:
    return click.option("--chat", is_flag=True,
                        help="Each prompt is a user message, put through the model's chat template.")(f)


def prompt_options(f: Callable) -> Callable:
    """compare and commit: how --prompts are put to the model (--chat) and tokenized (--tokenizer)."""
    f = click.option("--tokenizer", type=click.Path(exists=True), metavar="PATH_OR_FOLDER",
                     help="The tokenizer for --prompts (a tokenizer.json or a folder holding one), where the base "
                          "folder has none.")(f)
    return chat_option(f)


def with_store(f: Callable | None = None, *, readonly: bool | None = None, patched: str | None = None) -> Callable:
    """Open the store the group's --store (or $DELTASTORE_DIR, or the nearest .deltastore/) names.
    `readonly=True` for commands that only read: their catalog is opened read-only, so they work
    on a full disk too. A command that writes holds its result until it ends; Ctrl-C before
    then prints one line saying what it stored instead (cli/output.py). `patched`: the argument
    naming a model folder; without --store, the store that patched it is opened, from any
    folder."""
    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        @click.pass_context
        def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
            store = Store.open(store_path(ctx, kwargs.get(patched) if patched else None), readonly=readonly)
            ctx.call_on_close(store.close)
            if not readonly:
                hold()
                on_interrupt(stored_since(store))
            try:
                result = f(store, *args, **kwargs)
            except Interrupted:
                raise
            except KeyboardInterrupt:
                # Said while the store is open: the report may read it.
                raise Interrupted(interrupted_line()) from None
            for line in store.notes:  # what the command did besides what it was asked
                echo(f"note: {line}", err=True)
            finishing()
            return result
        return wrapper
    return decorate(f) if f is not None else decorate


def stored_since(store: Store) -> Callable[[], str]:
    """What the ref log gained from now on (versions, bases, tags), said in a few words: the
    report of an interrupted command that writes to the store."""
    log = RefLog(store.root)
    start = log.whole_size()

    def report() -> str:
        said = [_record_said(r) for _, r, _ in log.records(start)]
        return f"stored {', '.join(said)}" if said else "nothing was stored"
    return report


def _record_said(r: dict) -> str:
    if r["op"] == "version":
        return f"{r['stance']}@{r['number']} {r['id'][:15]}"
    if r["op"] == "base":
        return f"base {r.get('name') or r['id'][:15]}"
    if r["op"] == "tag":
        return f"tag {r['name']} of {r['stance']}"
    return f"the {r['op']} of {r.get('stance') or r.get('old') or r.get('id', '')[:15]}"


def mix_weights(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """--mix REF=A,REF=B -> {REF: A, REF: B} (export); repeated (compare), a list of them."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return [_mix(text) for text in value]
    return _mix(value)


def _mix(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for item in text.split(","):
        ref, equals, weight = item.strip().rpartition("=")
        try:
            if not equals or not ref:
                raise ValueError
            weights[ref] = float(weight)
        except ValueError:
            raise click.BadParameter(f"{item.strip()!r} is not REF=WEIGHT (e.g. curious@2=0.5)") from None
    return weights


def store_if(ctx: click.Context, needed: bool) -> Store | None:
    """The store, read-only, for a command that needs one only with some options (compare --mix)."""
    if not needed:
        return None
    store = Store.open(store_path(ctx), readonly=True)
    ctx.call_on_close(store.close)
    return store


def store_path(ctx: click.Context, patched: str | None = None) -> Path:
    path = ctx.find_root().params.get("store")
    return store_at(path) if path else find_store(patched=patched)


ENCODINGS = "lossless, int8, int4, nf4, fp4, 1bit, lowrank:R, mixedrank:R, mixedrank-aw:R"


def byte_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A size option (16.8MB, 500kB, 2GiB, or bytes) as a number of bytes."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=param.opts[-1]) from None


def lower_case(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Encoding names in any case (`INT4` as `int4`): the manifest keeps the lower-case spec."""
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, tuple):  # REGEX=ENCODING: the regex keeps its case
        return tuple(f"{v.rpartition('=')[0]}={v.rpartition('=')[2].lower()}" if "=" in v else v for v in value)
    return value


def only_base(store: Store, base_ref: str | None) -> str:
    """--base as given, or the store's one base when it holds exactly one."""
    if base_ref is not None:
        return base_ref
    bases = store.bases()
    if len(bases) == 1:
        return bases[0].id
    if not bases:
        raise click.UsageError("--base is needed: the store holds no base yet; give --base MODEL_PATH "
                               "(a model folder or .safetensors file)")
    names = ", ".join(b.name or b.id[:19] for b in bases[:5]) + (" ..." if len(bases) > 5 else "")
    raise click.UsageError(f"--base is needed: the store holds {len(bases)} bases ({names})")


def key_values(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """KEY=VALUE options (--meta, --where) as a dict."""
    out = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE", param_hint=param.opts[-1])
        out[key] = value
    return out


def encoding_rules(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    """REGEX=ENCODING options as (regex, encoding) pairs; the encoding in any case."""
    rules = [tuple(v.rsplit("=", 1)) for v in lower_case(ctx, param, values)]
    if any(len(r) != 2 for r in rules):
        raise click.BadParameter("expected REGEX=ENCODING", param_hint=param.opts[-1])
    return rules


def hub_options(f: Callable) -> Callable:
    """--token and --endpoint, which default to what huggingface_hub reads (HF_TOKEN or the saved
    login, HF_ENDPOINT), as huggingface-cli does."""
    f = click.option("--endpoint", metavar="URL", help="The Hub's URL (default: $HF_ENDPOINT, else huggingface.co).")(f)
    return click.option("--token", metavar="TOKEN", help="A Hub access token (default: $HF_TOKEN, else the saved login).")(f)


def number_list(text: str, option: str, kind: type = str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s",
                                 param_hint=option) from None


def finite(value: Any) -> Any:
    """JSON has no inf or nan: those become null."""
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
