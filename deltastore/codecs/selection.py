"""Selection: which of a fine-tune's changed tensors a version stores, and by which encoding.

Pure: it sees tensor names and two numbers per tensor, never a tensor, a file or the store.
Tensors left out apply as the base. Every refusal is a `SelectionError` that says what is
allowed, raised before any work is done.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import encodings
from ..core.errors import EncodingError, SelectionError

REGEX_HELP = "a Python regular expression, searched for (re.search) in each tensor name"


@dataclass(frozen=True)
class TensorDelta:
    """How much one tensor changed: ||dW|| / ||W|| and ||dW||^2."""

    rel_change: float
    energy: float

    @classmethod
    def of(cls, rel_change: float | None, energy: float) -> "TensorDelta":
        """The record selection ranks a tensor by; a tensor with no relative change (no base
        tensor of its shape, or a base of norm 0) ranks as changed the most."""
        return cls(math.inf if rel_change is None else rel_change, energy)


@dataclass(frozen=True)
class Selector:
    """What a user asks a version to keep of the changed tensors: ``--include`` and
    ``--exclude`` (regexes, or lists of them), ``--top-k``, ``--min-rel-change`` and
    ``--energy``. The empty ``Selector()`` keeps every changed tensor. ``select`` applies it."""

    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    top_k: int | None = None
    min_rel_change: float | None = None
    energy: float | None = None

    @classmethod
    def of(cls, selector: "Selector | None" = None, **options: Any) -> "Selector":
        """`selector` (or the empty one) with the options given that are not None put in."""
        given = {k: v for k, v in options.items() if v is not None}
        base = selector if selector is not None else cls()
        return dataclasses.replace(base, **given) if given else base

    def __bool__(self) -> bool:
        return any(x is not None for x in (self.include, self.exclude, self.top_k, self.min_rel_change,
                                            self.energy))

    @property
    def by_stats(self) -> bool:
        """Whether it needs every tensor's change before it can keep any (top-k, energy, min-rel-change)."""
        return any(x is not None for x in (self.top_k, self.min_rel_change, self.energy))

    def by_name(self) -> "Callable[[str], bool]":
        """name -> whether ``--include``/``--exclude`` let it through (the whole choice when
        ``by_stats`` is False)."""
        includes, excludes = _patterns("include", self.include), _patterns("exclude", self.exclude)
        return lambda name: ((not includes or any(p.search(name) for p in includes))
                             and not any(p.search(name) for p in excludes))


@dataclass(frozen=True)
class Selection:
    """The tensors kept and left out (each in the order of the changes given), the share of
    the total squared delta left out, and the options as recorded in a version's manifest."""

    kept: list[str]
    left_out: list[str]
    left_out_energy_fraction: float
    policy: dict[str, Any]


def select(changes: Mapping[str, TensorDelta], selector: Selector | None = None, **options: Any) -> Selection:
    """Pick from `changes` (the tensors that differ from the base) what `selector` (or the
    same options given as keywords) keeps.

    Without options, every changed tensor. The options narrow it in this order, each acting on
    what the one before kept: `include` (a name must match one of them), `exclude` (it must
    match none), `min_rel_change` (rel_change at least this), `top_k` (the k largest
    rel_change), `energy` F (the fewest tensors, largest energy first, that hold fraction F of
    the energy of those still in the running). Ties go by name, so the result is the same
    whatever the order of `changes`. Each regex must match at least one changed tensor.
    """
    selector = Selector.of(selector, **options)
    include, exclude, top_k = selector.include, selector.exclude, selector.top_k
    min_rel_change, energy = selector.min_rel_change, selector.energy
    includes, excludes = _patterns("include", include), _patterns("exclude", exclude)
    names = list(changes)
    policy: dict[str, Any] = {}
    for option, compiled in (("include", includes), ("exclude", excludes)):
        for pattern in compiled:
            if not any(pattern.search(n) for n in names):
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                raise SelectionError(f"--{option} {pattern.pattern!r} matches none of the "
                                     f"{len(names)} changed tensors ({shown or 'none'}); it must be {REGEX_HELP}")
        if compiled:
            policy[option] = [p.pattern for p in compiled]

    if min_rel_change is not None:
        if isinstance(min_rel_change, bool) or not isinstance(min_rel_change, (int, float)) \
                or not math.isfinite(min_rel_change) or min_rel_change < 0:
            raise SelectionError(f"--min-rel-change must be a number of at least 0 (a fraction: 0.001 "
                                 f"is 0.1%), got {min_rel_change!r}")
        policy["min_rel_change"] = float(min_rel_change)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise SelectionError(f"--top-k must be a whole number of at least 1, got {top_k!r}")
        policy["top_k"] = top_k
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) \
                or not math.isfinite(energy) or not 0 < energy <= 1:
            raise SelectionError(f"--energy must be a fraction above 0 and at most 1 (0.9 keeps the "
                                 f"fewest tensors holding 90% of the squared delta), got {energy!r}")
        policy["energy"] = float(energy)

    kept = [n for n in names
            if (not includes or any(p.search(n) for p in includes))
            and not any(p.search(n) for p in excludes)]
    if min_rel_change is not None:
        kept = [n for n in kept if changes[n].rel_change >= min_rel_change]
    if top_k is not None:
        top = set(sorted(kept, key=lambda n: (-changes[n].rel_change, n))[:top_k])
        kept = [n for n in kept if n in top]
    if energy is not None:
        share = _energy_share(changes, kept, energy)
        kept = [n for n in kept if n in share]

    keep = set(kept)
    left_out = [n for n in names if n not in keep]
    total = math.fsum(d.energy for d in changes.values())
    fraction = math.fsum(changes[n].energy for n in left_out) / total if total > 0 else 0.0
    return Selection(kept, left_out, fraction, policy)


def _energy_share(changes: Mapping[str, TensorDelta], names: Iterable[str], share: float) -> set[str]:
    order = sorted(names, key=lambda n: (-changes[n].energy, n))
    # The same order of summation for the total and the running sum: at share 1 the running
    # sum reaches exactly the total, and tensors with no energy are left out.
    total = 0.0
    for name in order:
        total += changes[name].energy
    goal = share * total
    kept: set[str] = set()
    running = 0.0
    for name in order:
        if running >= goal:
            break
        kept.add(name)
        running += changes[name].energy
    return kept


def _patterns(option: str, value: str | Sequence[str] | None) -> list[re.Pattern[str]]:
    if value is None:
        return []
    compiled = []
    for text in [value] if isinstance(value, str) else list(value):
        try:
            compiled.append(re.compile(text))
        except (re.error, TypeError) as e:
            raise SelectionError(f"--{option} {text!r} is not a valid regular expression ({e}); "
                                 f"it must be {REGEX_HELP}") from None
    return compiled


# -- per-tensor encodings ------------------------------------------------------------------

@dataclass(frozen=True)
class EncodingRules:
    """`--encoding-for REGEX=SPEC` rules: the first rule whose regex matches a tensor name
    gives its encoding spec, `default` where none does. Call it with a name for the spec."""

    default: str
    rules: tuple[tuple[str, str], ...] = ()

    def __call__(self, name: str) -> str:
        for pattern, spec in self.rules:
            if re.search(pattern, name):
                return spec
        return self.default


def parse_encoding_rules(rules: Iterable[str], *, default: str = "lossless",
                         names: Iterable[str] | None = None, **options: Any) -> EncodingRules:
    """Parse `REGEX=SPEC` texts (split at the last `=`: a spec never holds one, a regex may).

    Each spec is checked through `encodings.get` with `options`; where `names` is given, each
    regex must match at least one of them.
    """
    known = list(names) if names is not None else None
    _check_spec(default, "--encoding", options)
    parsed = []
    for text in rules:
        pattern, eq, spec = text.rpartition("=")
        if not eq or not pattern or not spec:
            raise SelectionError(f"--encoding-for {text!r} must be REGEX=SPEC, e.g. '.*embed.*=lossless'")
        regex = _patterns("encoding-for", pattern)[0]
        _check_spec(spec, f"--encoding-for {text!r}", options)
        if known is not None and not any(regex.search(n) for n in known):
            raise SelectionError(f"--encoding-for {text!r}: {pattern!r} matches none of the {len(known)} "
                                 f"tensors; it must be {REGEX_HELP}")
        parsed.append((pattern, spec))
    return EncodingRules(default, tuple(parsed))


def _check_spec(spec: str, where: str, options: Mapping[str, Any]) -> None:
    try:
        encodings.get(spec, **options)
    except EncodingError as e:
        raise EncodingError(f"{where}: {e}") from None
