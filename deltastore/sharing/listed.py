"""A version as a place it is shared to lists it (a Hub repo's index, a remote's refs): the
stance and number it has there and its id; and the one rule for `pull --into` both follow."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UnsafeInput


@dataclass(frozen=True)
class ListedVersion:
    """One version as the repo or remote lists it: STANCE@NUMBER there names version `id`."""

    stance: str
    number: int
    id: str

    @property
    def ref(self) -> str:
        return f"{self.stance}@{self.number}"

    def to_json(self) -> dict:
        return {"ref": self.ref, "stance": self.stance, "number": self.number, "id": self.id}


def check_into(stances: list[str], into: str | None) -> None:
    """`into` names the one local stance a pull's versions land in: refused when they come from
    several stances (`stances`, sorted)."""
    if into is not None and len(stances) > 1:
        raise UnsafeInput(f"--into takes the versions of one stance, and this pull has {len(stances)} "
                          f"({', '.join(stances[:5])}{', ...' if len(stances) > 5 else ''}); add --stance S")
