"""Build hook for the optional io_uring cffi extension (see mer/engine/uring_build.py).

The extension is compiled at install time against the kernel's UAPI header
<linux/io_uring.h> (no liburing). If no compiler or header is available the
install still succeeds: at run time mer.engine.uring tries to build it into a
user cache directory, and failing that the engine falls back to a thread pool
of preadv, saying so once.
"""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the io_uring extension is optional."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no header, no Python.h ...
            self._skip(exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        print(
            f"WARNING: the optional io_uring extension was not built ({exc}); mer will try "
            "to build it at run time, else read with a preadv thread pool.",
            file=sys.stderr,
        )


kwargs = {}
if sys.platform.startswith("linux"):
    kwargs["cffi_modules"] = ["mer/engine/uring_build.py:ffibuilder"]

setup(cmdclass={"build_ext": OptionalBuildExt}, **kwargs)
