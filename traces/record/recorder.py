"""Hook machinery: observe every MoE router during a batch-size-1 generation.

Why hooks on the router module: in transformers 5.x the router returns the
exact (logits, weights, indices) the experts are run with, so a forward hook
records what the model did with its own numerics, for every family, without
re-implementing any routing rule.

Lookahead ("the next layer's router applied to the current layer's hidden
state", the signal speculative-prefetch systems use) is defined per MoE layer:

    lookahead[token, L, r] = rank-r expert of router L applied to the hidden
                             state that entered router L-1 (the post-attention
                             norm output of MoE layer L-1)
    lookahead[token, 0, r] = rank-r expert of router 0 applied to the residual
                             stream entering the decoder layer of MoE layer 0
                             (the embedding output when that is decoder layer 0)

so a prefetcher at MoE layer L-1 could have issued exactly these reads. Layer 0
gets a real one-layer-early prediction too, so the column is never partly null.
The router is called through its own `forward` (its full rule: linear, softmax,
top-k), which bypasses the hooks, so lookahead calls are never recorded as
routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mer.errors import RuntimeFailure
from mer.traces.record.families import Family


@dataclass
class StepRouting:
    """Routing of the positions one forward pass added (batch size 1)."""

    experts: np.ndarray  # int16 (T, L, k), rank order
    weights: np.ndarray  # float32 (T, L, k), normalised over the top-k
    logits: np.ndarray | None  # float32 (T, L, E)
    lookahead: np.ndarray | None  # int16 (T, L, k)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import torch

    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise RuntimeFailure("router hook: could not find the hidden-state tensor in the call.")


def _ranked(scores: Any, indices: Any) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights) as numpy, weights normalised over the top-k, rank 0 = highest.

    topk already returns descending order; PhiMoE's sparsemixer need not, and
    format v1 defines rank 0 as the highest gate weight.
    """
    idx = indices.detach().to("cpu").numpy().astype(np.int64).reshape(-1, indices.shape[-1])
    w = scores.detach().to("cpu").double().numpy().reshape(len(idx), -1)
    if w.shape != idx.shape:
        # Some routers return a dense (T, E) weight matrix: gather the top-k.
        w = np.take_along_axis(w, idx, axis=1)
    w = w / w.sum(axis=1, keepdims=True)
    order = np.argsort(-w, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(w, order, axis=1)


class RouterTap:
    """Context manager installing forward hooks on every router of `family`.

    Use `begin()` before a forward pass and `end()` after it to get that pass's
    routing. All hooks are removed on exit, also when the run fails.
    """

    def __init__(self, family: Family, *, logits: bool = False, lookahead: bool = False) -> None:
        self.family = family
        self.want_logits = logits
        self.want_lookahead = lookahead
        self._handles: list[Any] = []
        self._slots: list[dict[str, Any] | None] = []
        self._prev_input: Any = None  # router input of the previous MoE layer (lookahead)
        self._decoder0_input: Any = None

    # -- hook lifecycle ---------------------------------------------------------
    def __enter__(self) -> RouterTap:
        for site in self.family.sites:
            self._handles.append(
                site.router.register_forward_hook(self._make_hook(site.moe_layer), with_kwargs=True)
            )
        if self.want_lookahead:
            self._handles.append(
                self.family.sites[0].decoder.register_forward_pre_hook(
                    self._decoder0_hook, with_kwargs=True
                )
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._prev_input = None
        self._decoder0_input = None

    # -- per pass -----------------------------------------------------------------
    def begin(self) -> None:
        self._slots = [None] * self.family.n_layers
        self._prev_input = None
        self._decoder0_input = None

    def end(self) -> StepRouting:
        missing = [i for i, s in enumerate(self._slots) if s is None]
        if missing:
            raise RuntimeFailure(
                f"router hooks saw no call for MoE layer(s) {missing[:5]} in this forward pass; "
                "the model did not route through its router modules (unsupported kernel path?)."
            )
        slots: list[dict[str, Any]] = [s for s in self._slots if s is not None]
        n = {s["experts"].shape[0] for s in slots}
        if len(n) != 1:
            raise RuntimeFailure(f"routers saw different token counts in one pass: {sorted(n)}.")
        experts = np.stack([s["experts"] for s in slots], axis=1).astype(np.int16)
        weights = np.stack([s["weights"] for s in slots], axis=1).astype(np.float32)
        logits = (
            np.stack([s["logits"] for s in slots], axis=1).astype(np.float32)
            if self.want_logits
            else None
        )
        look = (
            np.stack([s["lookahead"] for s in slots], axis=1).astype(np.int16)
            if self.want_lookahead
            else None
        )
        self._prev_input = None
        self._decoder0_input = None
        return StepRouting(experts, weights, logits, look)

    # -- hooks --------------------------------------------------------------------
    def _decoder0_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._decoder0_input = _first_tensor(args, kwargs).detach()

    def _apply_router(self, layer: int, hidden: Any) -> np.ndarray:
        """Indices (T, k) of MoE layer `layer`'s router applied to `hidden`."""
        import torch

        router = self.family.sites[layer].router
        weight = next(router.parameters())
        h = hidden.reshape(-1, hidden.shape[-1]).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            out = router.forward(h)
        return _ranked(out[1], out[2])[0]

    def _make_hook(self, layer: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not isinstance(output, tuple) or len(output) < 3:
                raise RuntimeFailure(
                    f"router {self.family.sites[layer].name} returned {type(output).__name__}, "
                    "expected (logits, weights, indices); this family is not supported."
                )
            logits, scores, indices = output[0], output[1], output[2]
            hidden = _first_tensor(args, kwargs).detach()
            hidden = hidden.reshape(-1, hidden.shape[-1])
            idx, w = _ranked(scores, indices)
            slot: dict[str, Any] = {"experts": idx, "weights": w}
            if self.want_logits:
                slot["logits"] = logits.detach().to("cpu").float().numpy().reshape(len(idx), -1)
            if self.want_lookahead:
                source = self._decoder0_input if layer == 0 else self._prev_input
                if source is None:
                    raise RuntimeFailure(
                        f"lookahead for MoE layer {layer}: the previous hidden state was not seen."
                    )
                slot["lookahead"] = self._apply_router(layer, source)
                self._prev_input = hidden
            self._slots[layer] = slot

        return hook
