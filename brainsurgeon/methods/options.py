"""Method options: every method declares its options as a frozen dataclass in its own file (its `Options`), with
defaults, one line of help each, and the checks of `checked`. They are built once from what the caller gave:
a key the method does not declare is an error naming the ones it does, in the API, the CLI and bench alike (the
CLI's flags and their help are generated from these declarations)."""
from dataclasses import MISSING, dataclass, field, fields

from ..errors import BrainSurgeonError


def option(default, help: str, parse=None):
    """A declared option: its default, its one-line help, and how the command line reads it from text where its
    default's type does not say (`parse`: text -> value; a bool is a --flag/--no-flag pair)."""
    return field(default=default, metadata={"help": help, "parse": parse})


@dataclass(frozen=True)
class MethodOptions:
    """A method without options."""

    def __post_init__(self):
        for name, value in self.checked().items():
            object.__setattr__(self, name, value)

    def checked(self) -> dict:
        """The fields' values validated and normalised (validation.*), by name; refuse a bad one."""
        return {}

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def declared(cls) -> list:
        """[(name, default, help, parse)] of every option."""
        return [(f.name, None if f.default is MISSING else f.default, f.metadata.get("help", ""),
                 f.metadata.get("parse")) for f in fields(cls)]

    @classmethod
    def build(cls, given: dict, owner: str) -> "MethodOptions":
        """The options from `given`; a key that is not declared is refused, with the declared ones named."""
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            valid = ", ".join(cls.names()) or "none"
            raise BrainSurgeonError(f"{owner} takes no option {', '.join(map(repr, unknown))}; its options are: "
                                    f"{valid}")
        return cls(**given)

    def as_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


class Configurable:
    """A method built from its declared `Options`: `Method(options)` or `Method(**given)`. The options' fields are
    also the method's attributes, and `settings()` (the report's record of them) is the options as a dict."""

    name: str
    Options = MethodOptions

    def __init__(self, options: MethodOptions | None = None, **given):
        if options is None:
            options = self.Options.build(given, f"method '{self.name}'")
        elif given or not isinstance(options, self.Options):
            raise BrainSurgeonError(f"{type(self).__name__} takes one {self.Options.__name__} or keyword options "
                                    f"({', '.join(self.Options.names()) or 'none'}), got {options!r}")
        self.options = options
        for name in options.names():
            setattr(self, name, getattr(options, name))

    def settings(self) -> dict:
        return self.options.as_dict()
