"""Every method name, and what it runs on each objective: one name is one algorithm, whichever objective runs it.

The Fisher objective's selections (SELECTION[+UPDATE]) and the layer-wise objective's methods share this one
vocabulary. A name that once meant two algorithms is kept only as a deprecated alias that warns and names the
algorithm it now runs on the objective at hand. `method_table()` is the README's table of them (a test keeps the
two equal)."""

from ..errors import warn_deprecated
from .alps import AlpsLayer
from .joint import JointSelection
from .layerwise import LAYER_METHODS as BASIC_LAYER_METHODS
from .selection import SELECTIONS as BASIC_SELECTIONS
from .update import UPDATES

FISHER_SELECTIONS = {**BASIC_SELECTIONS, JointSelection.name: JointSelection}
LAYER_METHODS = {**BASIC_LAYER_METHODS, AlpsLayer.name: AlpsLayer}
OBJECTIVES = {"fisher": FISHER_SELECTIONS, "layer": LAYER_METHODS}

# Old name -> the name of the algorithm it ran, per objective ('joint' was IHT plus swaps on the Fisher objective
# and ADMM on the layer one).
RENAMED = {"joint": {"fisher": "swaps", "layer": "admm"}}


def current_name(name: str, objective: str) -> str:
    """The name `name` goes by now on `objective` (itself unless it is a deprecated alias), without a warning."""
    return RENAMED[name][objective] if name in RENAMED else name


def canonical(name: str, objective: str) -> str:
    """`name`, or for a deprecated alias the name it now goes by on `objective`, with a FutureWarning."""
    if name in RENAMED:
        new = RENAMED[name][objective]
        others = ", ".join(f"'{alias}' on the {where} objective" for where, alias in RENAMED[name].items())
        warn_deprecated(f"method '{name}' is deprecated: it ran {others}; running '{new}' (pass '{new}' to "
                        "silence this)")
        return new
    return name


def summary(cls) -> str:
    """The first line of a method class's docstring: what it chooses."""
    return (cls.__doc__ or "").strip().splitlines()[0].rstrip(".").replace("|", "\\|")


def method_table() -> str:
    """The README's markdown table: every method name and what it does on each objective."""
    names = sorted(set(FISHER_SELECTIONS) | set(LAYER_METHODS))
    lines = ["| method | on the Fisher objective (`prune`) | on the layer-wise objective (`objective=\"layer\"`) |",
             "|---|---|---|"]
    for name in names:
        cells = [summary(methods[name]) if name in methods else "-" for methods in OBJECTIVES.values()]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += [f"| `{old}` | deprecated: runs " + " | deprecated: runs ".join(f"`{new}`" for new in table.values())
              + " |" for old, table in RENAMED.items()]
    return "\n".join(lines)


__all__ = ["FISHER_SELECTIONS", "LAYER_METHODS", "UPDATES", "RENAMED", "canonical", "method_table"]
