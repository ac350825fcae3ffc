"""The one way mer compiles C: a cffi builder per kernel, used at install and at first use.

Every compiled kernel is a pair of files in this folder, `NAME.h` (plain
declarations, which are also the cffi `cdef`) and `NAME.c`, listed once in
`KERNELS`. The same `builder()` serves both build paths:

- install: setup.py names `mer/native/build.py:<name>_builder` in `cffi_modules`,
  so `pip install` compiles `mer.native._<name>` (optional: a failure only warns);
- first use: `mer.native.load(name)` compiles into the user cache when the
  installed module is missing or was built from other sources.

Each build embeds `mer_native_key()`, a hash of the header, the source, the
flags and the Python ABI, so a module is loaded only if it was built from the
code in this folder: an edited kernel is never run from a stale binary.
"""

# No `from __future__ import annotations`: cffi runs this file with exec (setup.py), outside
# sys.modules, where dataclasses cannot resolve string annotations.
import hashlib
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
BASE_FLAGS = ("-O3", "-std=gnu11", "-fno-strict-aliasing")


@dataclass(frozen=True)
class Kernel:
    """One compiled module: its files, flags and where it can be built at all."""

    name: str
    what: str  # what it is, for notes ("the io_uring reader")
    fallback: str  # what runs instead when it is unavailable
    extra_flags: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    linux_only: bool = False
    depends: tuple[str, ...] = field(default=())  # further headers #included by NAME.c

    @property
    def header(self) -> Path:
        return HERE / f"{self.name}.h"

    @property
    def source(self) -> Path:
        return HERE / f"{self.name}.c"

    @property
    def flags(self) -> list[str]:
        return [*BASE_FLAGS, *self.extra_flags]

    def key(self) -> str:
        """Hash of everything the binary depends on: sources, flags, Python ABI, platform."""
        h = hashlib.sha256()
        for path in (self.header, self.source, *(HERE / d for d in self.depends)):
            h.update(path.read_bytes())
        h.update(" ".join(self.flags + list(self.libraries)).encode())
        h.update((sys.implementation.cache_tag or "").encode())
        h.update(sysconfig.get_platform().encode())
        return h.hexdigest()[:16]


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel(
            "stackdist",
            "the one-pass LRU and OPT stack-distance loops",
            "the pure-Python stack loops (mer.sim.mrc)",
        ),
        Kernel(
            "replay",
            "the compiled policy replays",
            "the Python policies in the core's lean replay loop",
            # floating point as Python evaluates it (no fused multiply-adds), in every
            # driver instance a policy's hooks are inlined into
            extra_flags=("-ffp-contract=off",),
            libraries=("m",),
        ),
        Kernel(
            "simstep",
            "the compiled prefetch-on simulation step",
            "the fast engine's Python step loop (mer.sim.model)",
            libraries=("m",),
            depends=("replay.c", "replay.h"),
        ),
        Kernel(
            "uring",
            "the io_uring reader",
            "a thread pool of preadv",
            linux_only=True,
        ),
        Kernel(
            "q4_0",
            "the q4_0/q8_0 matmul and expert FFN kernel",
            "the numpy q4_0 FFN (mer.engine.ffn)",
            # exact IEEE steps as written (the numpy emulation's contract); threads for the pool
            extra_flags=("-ffp-contract=off", "-pthread"),
            libraries=("m", "pthread"),
        ),
    )
}

_KEY_DECL = "const char *mer_native_key(void);"


def builder(name: str, module_name: str | None = None) -> FFI:
    """The cffi builder of kernel `name`, as module `module_name` (default mer.native._NAME)."""
    k = KERNELS[name]
    ffi = FFI()
    ffi.cdef(k.header.read_text() + "\n" + _KEY_DECL)
    key_fn = f'const char *mer_native_key(void) {{ return "{k.key()}"; }}\n'
    ffi.set_source(
        module_name or f"mer.native._{name}",
        f'#include "{k.source.name}"\n{key_fn}',
        include_dirs=[str(HERE)],
        extra_compile_args=k.flags,
        libraries=list(k.libraries),
    )
    return ffi


def _install_builder(name: str) -> FFI | None:
    k = KERNELS[name]
    if k.linux_only and not sys.platform.startswith("linux"):
        return None
    return builder(name)


# setup.py's cffi_modules entries: "mer/native/build.py:<name>_builder"
stackdist_builder = _install_builder("stackdist")
replay_builder = _install_builder("replay")
simstep_builder = _install_builder("simstep")
uring_builder = _install_builder("uring")
q4_0_builder = _install_builder("q4_0")

if __name__ == "__main__":  # build every kernel in place: python mer/native/build.py
    for kname in KERNELS:
        b = _install_builder(kname)
        if b is not None:
            print(b.compile(tmpdir=str(HERE.parent.parent), verbose=True))
