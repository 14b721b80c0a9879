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
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from psclient.errors import SpecError
from psclient.partition import Id
from psclient.plugins import load_object

IdBatch = Sequence[Id] | np.ndarray  # ids as a list, or int ids as an int64 array
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


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
    always given Python ints and strs.
    """

    def __init__(self, spec: str, batch: Callable[[IdBatch], list[Any] | np.ndarray], vectorized: bool = True):
        self.spec = spec
        self.batch = batch
        self.vectorized = vectorized


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


def _parse_dim(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SpecError(f"dimension {text!r} is not an int or AxB") from None
    if not dims or any(d < 0 for d in dims):
        raise SpecError(f"dimension {text!r} must be non-negative")
    return dims


def _parse_options(parts: list[str], allowed: dict[str, Callable[[str], Any]], spec: str) -> dict:
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise SpecError(f"init {spec!r}: unknown option {part!r} (allowed: {', '.join(allowed)})")
        try:
            options[key] = allowed[key](raw.strip())
        except ValueError:
            raise SpecError(f"init {spec!r}: bad value for {key}: {raw!r}") from None
    return options


def _parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def make_init(spec: str | Callable[[Id], Any]) -> InitFn:
    if callable(spec):
        user: Callable[[Id], Any] = spec
        return InitFn(getattr(spec, "__name__", "callable"), lambda ids: [user(i) for i in ids], vectorized=False)
    name, _, rest = spec.partition(":")
    args = [a for a in rest.split(",")] if rest else []
    if name == "zeros" and args:
        shape = _parse_dim(args[0])
        _parse_options(args[1:], {}, spec)
        return InitFn(spec, lambda ids: np.zeros((len(ids), *shape), dtype=np.float32))
    if name == "normal" and args:
        shape = _parse_dim(args[0])
        opts = _parse_options(args[1:], {"std": float, "seed": int}, spec)
        std, seed = opts.get("std", 0.01), opts.get("seed", 0)
        size = int(np.prod(shape))

        def normal(ids: IdBatch) -> np.ndarray:
            u = _uniform01(ids, 2 * size, seed)
            z = np.sqrt(-2.0 * np.log(u[:, :size])) * np.cos(2.0 * np.pi * u[:, size:])
            return (std * z).astype(np.float32).reshape(len(ids), *shape)

        return InitFn(spec, normal)
    if name == "uniform" and args:
        shape = _parse_dim(args[0])
        opts = _parse_options(args[1:], {"low": float, "high": float, "seed": int}, spec)
        low, high, seed = opts.get("low", 0.0), opts.get("high", 1.0), opts.get("seed", 0)
        size = int(np.prod(shape))

        def uniform(ids: IdBatch) -> np.ndarray:
            u = _uniform01(ids, size, seed)
            return (low + (high - low) * u).astype(np.float32).reshape(len(ids), *shape)

        return InitFn(spec, uniform)
    if name == "const" and args and len(args) == 1:
        try:
            value = _parse_number(args[0])
        except ValueError:
            raise SpecError(f"init {spec!r}: {args[0]!r} is not a number") from None
        return InitFn(spec, lambda ids: [value] * len(ids))
    if (":" in spec and name not in {"zeros", "normal", "uniform", "const"}) or spec.startswith("@"):
        fn = load_object(spec, what="init")
        if not callable(fn):
            raise SpecError(f"init {spec!r} is not callable")
        init = make_init(fn)
        init.spec = spec
        return init
    raise SpecError(
        f"unknown init {spec!r}: use zeros:DIM, normal:DIM[,std=S][,seed=N], "
        "uniform:DIM[,low=A][,high=B][,seed=N], const:V or module:attr"
    )


_BUILTIN_UPDATES = {
    "add": UpdateFn("add", ufunc=np.add),
    "max": UpdateFn("max", ufunc=np.maximum),
    "min": UpdateFn("min", ufunc=np.minimum),
    "replace": UpdateFn("replace", replace=True),
}


def make_update(spec: str | Callable[[Any, Any], Any]) -> UpdateFn:
    if callable(spec):
        return UpdateFn(getattr(spec, "__name__", "callable"), scalar=spec)
    if spec in _BUILTIN_UPDATES:
        return _BUILTIN_UPDATES[spec]
    if ":" in spec or spec.startswith("@"):
        fn = load_object(spec, what="update")
        if not callable(fn):
            raise SpecError(f"update {spec!r} is not callable")
        return UpdateFn(spec, scalar=fn)
    raise SpecError(f"unknown update {spec!r}: use add, replace, max, min or module:attr")
