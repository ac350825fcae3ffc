"""The real engine: expert store, io_uring reads, q4_0 FFN, executor.

The I/O entry point is `mer.engine.io.open_reader`; see mer/engine/io.py.
"""
