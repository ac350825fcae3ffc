"""Build hook for the optional io_uring cffi extension (see mer/engine/uring_build.py).

The extension is compiled at install time against the kernel's UAPI header. If
no compiler or header is available the install still succeeds and the engine
falls back to a thread pool of preadv, saying so once at run time.
"""

from setuptools import setup

setup()
