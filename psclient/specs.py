"""Parameter init and update functions: built-ins by name, or user code.

Init specs (`param_init`):
    zeros:DIM                          float32 zeros; DIM is `16` or `4x8`
    normal:DIM[,std=S][,seed=N]        float32 N(0, S^2), default S=0.01, N=0
    uniform:DIM[,low=A][,high=B][,seed=N]  float32 U[A, B), default [0, 1)
    const:V                            the scalar V (int if it parses as int)
    module:attr / @PATH                a callable id -> value

The random inits are deterministic functions of (seed, id): the same id gets the
same vector in every process and after every restart, without any state. Each
element is a SplitMix64 hash of (seed, id, element index), turned into a
uniform, and into a normal by Box-Muller; all vectorized over a batch of ids.

Update specs (`param_update`): add, replace, max, min, or a callable
(old, delta) -> new. Built-ins run vectorized over a whole push batch.

Specs are checked whole when they are made, so a shard or a job refuses a
nonsensical one at start instead of failing at the first pull.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from psclient.errors import SpecError, StreampsError
from psclient.plugins import load_object
from psclient.wire.codec import MAX_ELEMENTS
from psclient.wire.partition import Id

IdBatch = Sequence[Id] | np.ndarray  # ids as a list, or int ids as an int64 array
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_INT64_RANGE = (-(2**63), 2**63 - 1)
_SEED_RANGE = (0, 2**64 - 1)


class UserFunctionError(StreampsError):
    """A user's param_init or param_update raised, or returned a value a shard cannot store.

    The message names the function and the id: the request was well-formed, the
    user's code was not.
    """


def describe_callable(fn: Any) -> str:
    """`module:qualname` of a function, the way a spec would name it."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}:{name}" if module and name else repr(fn)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> _U64(30))) * _MIX1
        z = (z ^ (z >> _U64(27))) * _MIX2
        return z ^ (z >> _U64(31))


def id_keys(ids: IdBatch) -> np.ndarray:
    """A stable 64-bit key per id: ints as two's complement, strs by BLAKE2b."""
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64).view(_U64)
    keys = np.empty(len(ids), dtype=_U64)
    for position, param_id in enumerate(ids):
        if isinstance(param_id, str):
            digest = hashlib.blake2b(param_id.encode("utf-8"), digest_size=8).digest()
            keys[position] = int.from_bytes(digest, "little")
        else:
            keys[position] = param_id & 0xFFFFFFFFFFFFFFFF
    return keys


def _uniform01(ids: IdBatch, size: int, seed: int) -> np.ndarray:
    """Shape (len(ids), size) of uniforms in (0, 1), a pure function of (seed, id, j)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(id_keys(ids) ^ _splitmix64(np.asarray([seed], dtype=_U64)))
        cells = base[:, None] + np.arange(1, size + 1, dtype=_U64)[None, :] * _GOLDEN
        bits = _splitmix64(cells) >> _U64(11)  # 53 random bits
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)


class InitFn:
    """Creates the initial value of parameters; `batch` returns one row per id.

    A `vectorized` init also takes an int64 array of ids; a user function is
    always given Python ints and strs. `name` is what error messages call it.
    """

    def __init__(
        self,
        spec: str,
        batch: Callable[[IdBatch], list[Any] | np.ndarray],
        vectorized: bool = True,
        name: str | None = None,
    ):
        self.spec = spec
        self.batch = batch
        self.vectorized = vectorized
        self.name = name or spec


@dataclass(frozen=True)
class UpdateFn:
    """Folds deltas into parameters.

    `ufunc` is set for the vectorized built-ins (applied with `ufunc.at`, which
    handles an id repeated in one batch); `replace` assigns; otherwise `scalar`
    is the user's function, called once per (old, delta) pair in batch order.
    """

    spec: str
    ufunc: np.ufunc | None = None
    replace: bool = False
    scalar: Callable[[Any, Any], Any] | None = None
    name: str = ""

    def call(self, old: Any, delta: Any, param_id: Id) -> Any:
        """The user's function on one (old, delta) pair; UserFunctionError if it raises."""
        assert self.scalar is not None
        try:
            return self.scalar(old, delta)
        except Exception as exc:
            raise UserFunctionError(
                f"param_update {self.name or self.spec} raised {exc!r} for id {param_id!r}"
            ) from exc


def _parse_dim(text: str, spec: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SpecError(f"init {spec!r}: dimension {text!r} is not an int or AxB") from None
    if any(d < 1 for d in dims):
        raise SpecError(f"init {spec!r}: dimension {text!r} must be positive")
    if math.prod(dims) > MAX_ELEMENTS:
        raise SpecError(f"init {spec!r}: dimension {text!r} exceeds {MAX_ELEMENTS:,} elements per parameter")
    return dims


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _int_in(bounds: tuple[int, int]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not bounds[0] <= value <= bounds[1]:
            raise ValueError(text)
        return value

    return parse


def _parse_options(parts: list[str], allowed: dict[str, Callable[[str], Any]], spec: str) -> dict:
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            names = ", ".join(allowed) or "none"
            raise SpecError(f"init {spec!r}: unknown option {part!r} (allowed: {names})")
        if key in options:
            raise SpecError(f"init {spec!r}: option {key} given twice")
        try:
            options[key] = allowed[key](raw.strip())
        except ValueError:
            raise SpecError(f"init {spec!r}: bad value for {key}: {raw!r}") from None
    return options


def _parse_number(text: str) -> int | float:
    try:
        value = int(text)
    except ValueError:
        return _finite(text)
    if not _INT64_RANGE[0] <= value <= _INT64_RANGE[1]:
        raise ValueError(text)  # a parameter holds 64-bit ints: never round it into a float
    return value


def make_init(spec: str | Callable[[Id], Any]) -> InitFn:
    """The init a spec names; SpecError for anything it cannot make sense of."""
    if callable(spec):
        return _user_init(spec, describe_callable(spec))
    name, _, rest = spec.partition(":")
    args = [a for a in rest.split(",")] if rest else []
    if name == "zeros" and args:
        shape = _parse_dim(args[0], spec)
        _parse_options(args[1:], {}, spec)
        return InitFn(spec, lambda ids: np.zeros((len(ids), *shape), dtype=np.float32))
    if name == "normal" and args:
        shape = _parse_dim(args[0], spec)
        opts = _parse_options(args[1:], {"std": _finite, "seed": _int_in(_SEED_RANGE)}, spec)
        std, seed = opts.get("std", 0.01), opts.get("seed", 0)
        if std < 0:
            raise SpecError(f"init {spec!r}: std must be >= 0")
        size = math.prod(shape)

        def normal(ids: IdBatch) -> np.ndarray:
            u = _uniform01(ids, 2 * size, seed)
            z = np.sqrt(-2.0 * np.log(u[:, :size])) * np.cos(2.0 * np.pi * u[:, size:])
            return (std * z).astype(np.float32).reshape(len(ids), *shape)

        return InitFn(spec, normal)
    if name == "uniform" and args:
        shape = _parse_dim(args[0], spec)
        opts = _parse_options(args[1:], {"low": _finite, "high": _finite, "seed": _int_in(_SEED_RANGE)}, spec)
        low, high, seed = opts.get("low", 0.0), opts.get("high", 1.0), opts.get("seed", 0)
        if not low < high:
            raise SpecError(f"init {spec!r}: low must be below high")
        size = math.prod(shape)

        def uniform(ids: IdBatch) -> np.ndarray:
            u = _uniform01(ids, size, seed)
            return (low + (high - low) * u).astype(np.float32).reshape(len(ids), *shape)

        return InitFn(spec, uniform)
    if name == "const" and args:
        if len(args) != 1:
            raise SpecError(f"init {spec!r}: const takes one number")
        try:
            value = _parse_number(args[0])
        except ValueError:
            raise SpecError(f"init {spec!r}: {args[0]!r} is not a finite number (ints: 64-bit)") from None
        return InitFn(spec, lambda ids: [value] * len(ids))
    if (":" in spec and name not in {"zeros", "normal", "uniform", "const"}) or spec.startswith("@"):
        fn = load_object(spec, what="init")
        if not callable(fn):
            raise SpecError(f"init {spec!r} is not callable")
        # A shipped file's path means nothing to a user: name the function itself.
        init = _user_init(fn, describe_callable(fn) if spec.startswith("@") else spec)
        init.spec = spec
        return init
    raise SpecError(
        f"unknown init {spec!r}: use zeros:DIM, normal:DIM[,std=S][,seed=N], "
        "uniform:DIM[,low=A][,high=B][,seed=N], const:V or module:attr"
    )


def _user_init(fn: Callable[[Id], Any], name: str) -> InitFn:
    def batch(ids: IdBatch) -> list[Any]:
        values = []
        for param_id in ids:
            try:
                values.append(fn(param_id))
            except Exception as exc:
                raise UserFunctionError(f"param_init {name} raised {exc!r} for id {param_id!r}") from exc
        return values

    return InitFn(name, batch, vectorized=False, name=name)


_BUILTIN_UPDATES = {
    "add": UpdateFn("add", ufunc=np.add),
    "max": UpdateFn("max", ufunc=np.maximum),
    "min": UpdateFn("min", ufunc=np.minimum),
    "replace": UpdateFn("replace", replace=True),
}


def make_update(spec: str | Callable[[Any, Any], Any]) -> UpdateFn:
    """The update a spec names; SpecError for anything it cannot make sense of."""
    if callable(spec):
        name = describe_callable(spec)
        return UpdateFn(name, scalar=spec, name=name)
    if spec in _BUILTIN_UPDATES:
        return _BUILTIN_UPDATES[spec]
    if ":" in spec or spec.startswith("@"):
        fn = load_object(spec, what="update")
        if not callable(fn):
            raise SpecError(f"update {spec!r} is not callable")
        return UpdateFn(spec, scalar=fn, name=describe_callable(fn) if spec.startswith("@") else spec)
    raise SpecError(f"unknown update {spec!r}: use add, replace, max, min or module:attr")


def check_specs(init: str | Callable[[Id], Any], update: str | Callable[[Any, Any], Any]) -> None:
    """Raise SpecError (a ValueError) for an init or update spec a shard would refuse at start.

    For whoever starts shards (`psclient run`, a local cluster): call it before
    starting any process, so that a bad spec is one clear error, not a failed job.
    """
    make_init(init)
    make_update(update)
