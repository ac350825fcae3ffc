"""mer's figures, one module per topic; every one draws through `mer.analysis.style`.

    mrc.py      hit rate (or miss ratio) vs cache size, one source or an overlay of several
    sweep.py    tokens/s and I/O share vs cache size, per policy and predictor, with bounds
    runs.py     predicted vs measured (y = x), token-latency distributions, per-layer hit rates
    routing.py  expert popularity and consecutive-token repetition of a trace

Each figure function takes tidy data and an output path and returns
`style.Written` (the PNG, SVG and PDF paths, the figure, and notes on what it
does not show). How to add one: see the docstring of `mer.analysis.style`.
"""
