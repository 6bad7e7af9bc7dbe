"""Strict keyword arguments for everything built from a config group (models, losses, dataset adapters, planner
settings): a key the builder does not take is a :class:`~medseg.errors.ConfigError` naming the key, what it was
given to, the config group to fix, and the keys that are accepted; a misspelled key never silently trains
defaults."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable

from medseg.errors import ConfigError

__all__ = ["accepted_keys", "check_keys"]


def accepted_keys(factory: Callable, exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """The keyword arguments ``factory`` takes, less ``exclude`` (those its caller passes itself). A factory
    taking ``**kwargs`` cannot be checked and is refused (TypeError): it must list its arguments."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"{getattr(factory, '__qualname__', factory)} takes **kwargs: a factory built from a config "
                        "must list its keyword arguments, so that a misspelled key is an error")
    skip = set(exclude)
    return tuple(n for n, p in params.items() if n not in skip
                 and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def check_keys(given: Iterable[str], accepted: Iterable[str], what: str, group: str, option: str | None = None) -> None:
    """Raise ConfigError if ``given`` holds keys outside ``accepted``.

    what: what the keys were given to ("model 'vilu_net'"); group: the config group they come from ("model");
    option: the group's option (its YAML file's name, "vilu_net"), where known.
    """
    accepted = sorted(set(accepted))
    unknown = sorted(set(given) - set(accepted))
    if not unknown:
        return
    source = f"{group}/{option}.yaml" if option else f"the {group} config"
    described = []
    for key in unknown:
        close = difflib.get_close_matches(key, accepted, n=1)
        described.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    plural = "s" if len(unknown) > 1 else ""
    raise ConfigError(f"{what}: unknown key{plural} {', '.join(described)}; accepted keys: "
                      f"{', '.join(accepted) if accepted else '(none)'}. Fix it in config group '{group}' ({source} "
                      f"or a {group}.{unknown[0]} override)")
