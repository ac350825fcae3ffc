"""Package layout and the compiled kernels (everything else is in pyproject.toml).

Layout: the repository keeps sim/, traces/ and analysis/ at the top level and
installs them as mer.sim, mer.traces and mer.analysis, so no generic top-level
names (`sim`, `traces`, `analysis`) are installed.

Kernels: every C source is in mer/native/ and is built by the one builder in
mer/native/build.py, listed here as cffi modules. They are optional: without a
compiler or a header the install still succeeds, `mer.native.load` tries again
at first use (into the user cache), and failing that each kernel's Python
reference runs, which mer says once.
"""

import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

MAPPED = ("sim", "traces", "analysis")


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: every compiled kernel has a Python fallback."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no header, no Python.h ...
            self._skip("the compiled kernels", exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(ext.name, exc)

    @staticmethod
    def _skip(what: str, exc: Exception) -> None:
        print(
            f"WARNING: {what} not built ({exc}); mer will try to build it at first use, "
            "else run its Python reference.",
            file=sys.stderr,
        )


packages = find_packages(include=["mer", "mer.*"])
package_dir = {"mer": "mer"}
for top in MAPPED:
    packages += [f"mer.{p}" for p in find_packages(include=[top, f"{top}.*"])]
    package_dir[f"mer.{top}"] = top

kernels = ["stackdist", "replay", "simstep", "q4_0"] + (
    ["uring"] if sys.platform.startswith("linux") else []
)

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"mer.native": ["*.c", "*.h"]},
    include_package_data=False,
    cffi_modules=[f"mer/native/build.py:{k}_builder" for k in kernels],
    cmdclass={"build_ext": OptionalBuildExt},
)
