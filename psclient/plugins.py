"""Load user code named `module:attr`, or shipped as a local cloudpickle file `@PATH`.

`@PATH` is how `transform` hands lambdas and closures to the child processes it
starts on this machine: it writes them with cloudpickle to a private temporary
file. Such files never cross the network; remote processes load `module:attr`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import cloudpickle

from psclient.errors import SpecError

SHIPPED_PREFIX = "@"


def load_object(spec: str, *, what: str) -> Any:
    """Resolve `module:attr` (dots allowed in attr) or `@PATH`; SpecError if impossible."""
    if spec.startswith(SHIPPED_PREFIX):
        path = Path(spec[len(SHIPPED_PREFIX) :])
        try:
            return cloudpickle.loads(path.read_bytes())
        except OSError as exc:
            raise SpecError(f"cannot read {what} file {path}: {exc.strerror}") from exc
        except Exception as exc:  # unpickling user code can raise anything
            raise SpecError(f"cannot load {what} from {path}: {exc}") from exc
    module_name, sep, attr_path = spec.partition(":")
    # Like other plugin loaders, find modules in the current directory too, even
    # when started through a console script whose sys.path lacks it.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not sep or not module_name or not attr_path:
        raise SpecError(f"{what} {spec!r} is not of the form module:attr")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SpecError(f"{what} {spec!r}: no module named {exc.name!r}") from exc
    except Exception as exc:
        raise SpecError(f"{what} {spec!r}: importing {module_name!r} failed: {exc}") from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise SpecError(f"{what} {spec!r}: {module_name!r} has no attribute {attr_path!r}") from None
    return obj


def load_instance(spec: str, base: type, *, what: str) -> Any:
    """The instance of `base` that `spec` names: an instance, a subclass (made with no
    arguments) or a factory of one. SpecError, one line naming the spec, otherwise."""
    obj = load_object(spec, what=what)
    if isinstance(obj, base):
        return obj
    kind = base.__name__
    if isinstance(obj, type) and not issubclass(obj, base):
        raise SpecError(f"{what} {spec!r} is not a {kind} subclass")
    if not callable(obj):
        raise SpecError(f"{what} {spec!r} is not a {kind}, a subclass of it, or a factory of one")
    try:
        made = obj()
    except Exception as exc:  # a user's constructor or factory can raise anything
        name = getattr(obj, "__qualname__", type(obj).__qualname__)
        # The traceback helps whoever debugs that code, but is not the message.
        logging.getLogger("streamps").info("traceback of %s()", name, exc_info=True)
        raise SpecError(f"{what} {spec!r}: {name}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(made, base):
        raise SpecError(
            f"{what} {spec!r} is not a {kind}, a subclass of it, or a factory of one "
            f"(calling it returned a value of type {type(made).__qualname__})"
        )
    return made


def ship(obj: Any, directory: Path, name: str) -> str:
    """Write `obj` with cloudpickle into `directory` (private) and return its `@PATH` spec."""
    path = directory / f"{name}.cloudpickle"
    path.write_bytes(cloudpickle.dumps(obj))
    path.chmod(0o600)
    return f"{SHIPPED_PREFIX}{path}"
