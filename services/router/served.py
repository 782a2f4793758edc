"""The names the router serves its one model under, and the one check of a request's `model` against them, which
both public APIs make (http_api.py: the `model` field; grpc_api.py: GenerateRequest.model).

The names are --served-model-name (vLLM's flag), or by default the --model value as given plus, when the model
is on this machine (a directory, or the embedded model's converted copy), that directory's name. The first is
the one responses report when a request names none. A request may name any served name (responses report the
name it asked for, as vLLM's do) or none (absent or empty: the model); any other name is refused with
ModelNotFound: HTTP 404 with code `model_not_found` (as OpenAI and vLLM answer), gRPC NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from baton.errors import ModelNotFound
from baton.flags import env_default

SHOWN_CHARS = 60  # a refusal quotes a name cut to this many characters (an error never echoes a whole input)


@dataclass(frozen=True)
class ServedModels:
    names: tuple[str, ...]  # the first is the default

    def __post_init__(self) -> None:
        names = tuple(dict.fromkeys(self.names))  # without repeats, in order
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"served model names must be non-empty strings, got {list(self.names)!r}")
        object.__setattr__(self, "names", names)

    @classmethod
    def of(cls, names: Iterable[str]) -> ServedModels:
        return cls(tuple(names))

    @classmethod
    def for_model(cls, model: str, local_dir: Path | None = None) -> ServedModels:
        """The default names: `model` as given (smollm2-135m, Org/Name, a path) and the name of `local_dir`, the
        directory the model is loaded from when it is on this machine (None for a model fetched from the Hub)."""
        names = [model]
        if local_dir is not None and local_dir.name:
            names.append(local_dir.name)
        return cls(tuple(names))

    @property
    def default(self) -> str:
        return self.names[0]

    def resolve(self, requested: str | None) -> str:
        """The name a request for `requested` is answered under: that name when it is served, the default when
        it is None or empty. Raises ModelNotFound for any other name."""
        if not requested:
            return self.default
        if requested in self.names:
            return requested
        raise ModelNotFound(f"The model `{_shown(requested)}` does not exist.")


def _shown(name: str) -> str:
    """A name as a refusal quotes it: as given when short and printable, else its repr, cut short."""
    text = name if name.isprintable() else repr(name)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def names_from_env() -> list[str] | None:
    """The default of --served-model-name from its environment twin, BATON_SERVED_MODEL_NAME="name,other-name"
    (None when unset or empty: the names come from --model)."""
    names = [n.strip() for n in (env_default("served_model_name") or "").split(",") if n.strip()]
    return names or None
