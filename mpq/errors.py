"""The one exception type that means "the user gave us something wrong", and `blame`, which tells
a user's mistake from mpq's own bug when running a user's model fails.

Scripts catch `UsageError`, print its message on one line and exit with code 2, so every
bad-input path looks the same to a user and to a test. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from dataclasses import dataclass

__all__ = ["Blame", "UsageError", "blame"]


class UsageError(ValueError):
    """Bad input: a wrong path, recipe value, checkpoint or flag. The message says how to fix it."""


# Code that runs on the way to a user's model but is neither the user's nor mpq's: an
# exception whose innermost frame outside these is the user's is the user's to fix.
_LIBRARIES = ("torch", "functorch", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "sympy",
              "mpmath", "numpy", "typing_extensions", "optree", "triton")


@dataclass(frozen=True)
class Blame:
    """Whose code an exception came from (`blame`).

    `owner` is "mpq" (a bug in mpq: let its traceback through), "user" (the user's code, at
    `where`), or "library" (torch or another library refused the model with no user frame on
    the way). `error` is the exception the frame belongs to, which may be the cause of the one
    caught; `raised_there` says whether the user's frame raised it itself rather than a library
    it called.
    """

    owner: str
    error: BaseException
    where: str | None = None      # "path/to/file.py:12"
    function: str | None = None   # "Gate.forward"
    raised_there: bool = False

    def describe(self) -> str:
        """The error as `Type: first line of its message`."""
        text = str(self.error).strip()
        first = text.splitlines()[0] if text else ""
        return f"{type(self.error).__name__}: {first[:300]}" if first else type(self.error).__name__


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _roots() -> tuple[list[str], ...]:
    """mpq's folder, library folders, the standard library's, and site-packages (which lies
    inside the standard library's folder in some installs)."""
    mpq_root = os.path.dirname(os.path.abspath(__file__))
    libraries = []
    for name in _LIBRARIES:
        module = sys.modules.get(name)  # a library not imported has no frames to classify
        if module is not None and getattr(module, "__file__", None):
            libraries.append(os.path.dirname(os.path.abspath(module.__file__)))
    paths = sysconfig.get_paths()
    site = [paths["purelib"], paths["platlib"], *(p for p in sys.path if "-packages" in p)]
    stdlib = [paths["stdlib"], paths["platstdlib"]]
    return [mpq_root], libraries, [s for s in stdlib if s], site


def _origin(filename: str, roots) -> str:
    if filename.startswith("<"):  # generated code: fx's forward, exec'd strings
        return "library"
    mpq_roots, libraries, stdlib, site = roots
    path = os.path.abspath(filename)
    if any(_under(path, r) for r in mpq_roots):
        return "mpq"
    if any(_under(path, r) for r in libraries):
        return "library"
    if any(_under(path, r) for r in stdlib) and not any(_under(path, s) for s in site):
        return "library"
    return "user"


def _function_name(frame) -> str:
    code = frame.f_code
    if hasattr(code, "co_qualname"):  # Python 3.11+
        return code.co_qualname
    owner = frame.f_locals.get("self")
    return f"{type(owner).__name__}.{code.co_name}" if owner is not None else code.co_name


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chain


def blame(exc: BaseException) -> Blame:
    """Whose code `exc`, just caught by mpq, came from: the innermost frame that is neither
    torch's nor another library's (`_LIBRARIES`, the standard library, generated code), in it or
    else in the exceptions it chains to (an exporter wraps the original error in its own).

    Each traceback's first frame is the code that caught the exception; it is blamed only when
    the exception was raised right there, so an exception raised in mpq's own `try` block is
    mpq's.
    """
    roots = _roots()
    for error in _chain(exc):
        frames = []
        tb = error.__traceback__
        while tb is not None:
            frames.append((tb.tb_frame, tb.tb_lineno))
            tb = tb.tb_next
        for frame, line in reversed(frames[1:] or frames):  # frames[0]: the catching code
            owner = _origin(frame.f_code.co_filename, roots)
            if owner == "mpq":
                return Blame("mpq", error)
            if owner == "user":
                return Blame("user", error, where=f"{frame.f_code.co_filename}:{line}",
                             function=_function_name(frame),
                             raised_there=frame is frames[-1][0])
    return Blame("library", exc)
