"""Where a model routes its tokens, and the one recorder of what its routers decide.

- [`moge_routers`] finds the routers of a model, in layer order: the MoGE layers' own, or the routers of a
  transformers MoE model (the modules its `_can_record_outputs["router_logits"]` names, matched as transformers does).
  Each comes as a [`RouterTap`], which reads what that router returns the same way for both kinds.
- [`routing_recorder`] gives the model's [`RoutingRecorder`]: one per model, fed by hooks on its routers. It serves
  every reader of the routing: the MoGE models' routing losses, `add_moge_regularizer`, the Trainer callback's
  metrics and the diagnostics.

This module is imported by the MoGE models, so it only imports `torch`, `transformers` and siblings (folders written
by `save_pretrained` must load with `trust_remote_code=True`).
"""

import dataclasses
import functools
import re
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from .moge_layer import MoGERouting, MoGESparseMoeBlock


__all__ = ["RecordedForward", "RecordedRouting", "RouterTap", "RoutingRecorder", "moge_routers", "routing_recorder"]


@dataclasses.dataclass
class RouterTap:
    """One router of a model, and how to read what it returns (a `MoGERouting`, or transformers' router tuple)."""

    name: str  # e.g. "layer3"
    module: nn.Module
    top_k: int
    index: int | None = 0  # where transformers' router output holds the logits (`OutputRecorder.index`)
    experts: nn.Module | None = None  # the layer's experts (3-D weights, `forward(hidden, top_k_index, weights)`)
    block: nn.Module | None = None  # a MoGE layer's block, which reports the routing it used (`routing_observer`)

    def logits(self, output) -> torch.Tensor:
        """`(T, E)` routing logits (for a MoGE router: before jitter noise, what the regularizer takes)."""
        if isinstance(output, MoGERouting):
            return output.clean_logits
        logits = output if self.index is None else output[self.index]
        return logits.reshape(-1, logits.shape[-1])

    def routing(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        """`(T, E)` float32 routing probabilities and the `(T, k)` chosen experts, as the model routed."""
        if isinstance(output, MoGERouting):
            return output.probs, output.top_k_index
        probs = self.logits(output).float().softmax(-1)
        return probs, probs.topk(self.top_k, dim=-1).indices


def _layer_name(module_name: str, position: int) -> str:
    match = re.search(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.", module_name)
    return f"layer{match.group(1)}" if match else f"router{position}"


def _recorded_routers(model: nn.Module) -> list[RouterTap]:
    """The routers transformers records `router_logits` from (`_can_record_outputs`), matched as transformers does."""
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    if spec is None:
        return []
    target_class = getattr(spec, "target_class", spec if isinstance(spec, type) else None)
    class_name = getattr(spec, "class_name", spec if isinstance(spec, str) else None)
    layer_name = getattr(spec, "layer_name", None)
    index = getattr(spec, "index", 0)
    taps = []
    for module_name, module in model.named_modules():
        matched = (target_class is not None and isinstance(module, target_class)) or (
            class_name is not None and module_name.endswith(class_name)
        )
        if matched and layer_name is not None:
            matched = f".{layer_name.strip('.')}." in f".{module_name}."
        if matched:
            top_k = getattr(module, "top_k", None) or model.config.num_experts_per_tok
            parent = model.get_submodule(module_name.rpartition(".")[0]) if "." in module_name else model
            experts = getattr(parent, "experts", None)
            taps.append(RouterTap(_layer_name(module_name, len(taps)), module, top_k, index, experts))
    return taps


def moge_routers(model: nn.Module) -> list[RouterTap]:
    """Every router of `model`, in layer order: the MoGE layers' of a moge_hf model, or the routers of a transformers
    MoE model."""
    blocks = [module for module in model.modules() if isinstance(module, MoGESparseMoeBlock)]
    if blocks:
        layers = [getattr(block, "layer_index", None) for block in blocks]
        layers = layers if None not in layers else list(range(len(blocks)))
        return [
            RouterTap(f"layer{i}", block.router, block.router.top_k, None, block.experts, block)
            for i, block in zip(layers, blocks)
        ]
    return _recorded_routers(model)


class RecordedRouting(NamedTuple):
    """What one router did in a recorded forward."""

    layer: int  # position of the router in `RoutingRecorder.taps`
    output: Any  # what the router returned (read it with `taps[layer].routing(output)` / `.logits(output)`)
    hidden_states: torch.Tensor | None  # `(T, d)` router input, kept only while a reader asks (`keep_inputs`)


class RecordedForward:
    """One recorded forward of a model: what its routers did, and what the listeners need to read it."""

    def __init__(self, key: int, training: bool, token_mask: torch.Tensor | None):
        self.key = key  # the thread that runs it (0 for a forward begun in a compiled graph)
        self.depth = 0
        self.records: list[RecordedRouting] = []
        self.training = training  # whether the model was in training mode
        self.token_mask = token_mask  # `(T,)` bools of the real (not padding) tokens, or None: all count


def _thread_key() -> int:
    # Forwards in flight are kept per thread (`nn.DataParallel` runs its replicas, which share the recorder, in
    # threads). A compiled graph cannot ask for its thread: it uses key 0 (DataParallel with torch.compile is not
    # supported: use DDP).
    return 0 if torch.compiler.is_compiling() else threading.get_ident()


class RoutingRecorder:
    """Records what every router of one model decided in each forward of the model.

    Made once per model by [`routing_recorder`], when the model is built (before any `torch.compile`): a MoGE layer's
    block reports the routing it used (its `routing_observer`, after any hook on its router), and a transformers router
    gets a forward hook. A forward is recorded between `begin()` and `end()`: the MoGE models call them in their own
    forward; for a transformers MoE model, hooks on the model do. Router calls outside a recorded forward, such as
    gradient checkpointing's recomputation during backward, are not recorded. Forwards in flight are kept per thread,
    so `nn.DataParallel` replicas (which share the recorder) record apart.

    Readers: `end()` returns the forward's records (the MoGE models turn them into their routing losses, as
    `add_moge_regularizer` does for other models) and calls each function in `listeners` with the
    [`RecordedForward`] (records, training mode, token mask: the Trainer callback's metrics, the diagnostics); the
    recorder keeps nothing after that. A listener that needs the routers' inputs raises `keep_inputs` while it listens.
    The observers and hooks are bound to the recorder, so a deep copy (or a pickle) of the model has its own recorder,
    with no listeners. A hook of your own that replaces a transformers router's output must be registered with
    `prepend=True` for the recorder to see the replacement (a MoGE block reports what it used in any case).
    """

    def __init__(self, taps: list[RouterTap]):
        self.taps = taps
        self.listeners: list[Callable[[RecordedForward], None]] = []
        self.keep_inputs = 0
        self._forwards: dict[int, RecordedForward] = {}
        for layer, tap in enumerate(taps):
            if tap.block is not None:
                tap.block.routing_observer = functools.partial(self._record, layer)
            else:
                tap.module.register_forward_hook(functools.partial(self._record, layer))

    def __getstate__(self) -> dict:
        # A copy of the model records for itself: no listeners (they read the original), nothing in flight.
        return {**self.__dict__, "listeners": [], "keep_inputs": 0, "_forwards": {}}

    def _current(self) -> RecordedForward | None:
        """This thread's forward in flight; or one begun in a compiled graph (key 0) from eager code; or, in a compiled
        graph, the one forward an eager caller began."""
        if not torch.compiler.is_compiling():
            return self._forwards.get(threading.get_ident()) or self._forwards.get(0)
        forward = self._forwards.get(0)
        if forward is None and self._forwards:
            if len(self._forwards) > 1:
                raise RuntimeError(
                    "Several threads are in a forward of this MoGE model while torch.compile traces one (nn."
                    "DataParallel with torch.compile): the routing cannot be told apart; use DDP (torchrun)"
                )
            forward = next(iter(self._forwards.values()))
        return forward

    @property
    def recording(self) -> bool:
        return self._current() is not None

    def _record(self, layer: int, module: nn.Module, args: tuple, output) -> None:
        forward = self._current()
        if forward is None:
            return
        hidden = None
        if self.keep_inputs > 0 and args and torch.is_tensor(args[0]):
            hidden = args[0].reshape(-1, args[0].shape[-1])
        forward.records.append(RecordedRouting(layer, output, hidden))

    def begin(self, training: bool = False, token_mask: torch.Tensor | None = None) -> None:
        """Start recording a forward of this thread (`training`: the model's mode; `token_mask`: `(T,)` of the real
        tokens, for the listeners). A nested `begin` records into the same forward."""
        key = _thread_key()
        forward = self._forwards.get(key)
        if forward is None:
            forward = self._forwards[key] = RecordedForward(key, training, token_mask)
        forward.depth += 1

    def end(self) -> list[RecordedRouting]:
        """Stop recording; return the forward's records (and tell the listeners) when the outermost call ends."""
        forward = self._current()
        if forward is None:
            raise RuntimeError("RoutingRecorder.end() without begin()")
        forward.depth -= 1
        if forward.depth > 0:
            return forward.records
        del self._forwards[forward.key]
        for listener in self.listeners:
            listener(forward)
        return forward.records

    def abort(self) -> None:
        """The forward in progress raised: drop it (at its outermost level), no listener called."""
        forward = self._current()
        if forward is not None:
            forward.depth -= 1
            if forward.depth <= 0:
                del self._forwards[forward.key]

    # For models whose forward does not call `begin`/`end` (transformers' MoE models): hooks on the model.
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Model-level hooks do not nest: a forward of this thread still in flight was interrupted (torch runs the
        # always-called hooks on `Exception` only, not on a KeyboardInterrupt): drop it.
        self._forwards.pop(_thread_key(), None)
        mask = kwargs.get("attention_mask")
        token_mask = mask.reshape(-1) != 0 if torch.is_tensor(mask) and mask.dim() == 2 else None
        self.begin(module.training, token_mask)

    def _model_post_hook(self, module: nn.Module, args: tuple, output) -> None:
        if output is None:  # the forward raised: the hook is always called
            self.abort()
        elif self.recording:
            self.end()


_RECORDER_ATTRIBUTE = "_moge_routing_recorder"


def routing_recorder(model: nn.Module) -> RoutingRecorder | None:
    """The [`RoutingRecorder`] of `model` (a MoGE model, or a transformers MoE model), made on first use.

    A MoGE model has one from the start (its base model makes it); a transformers MoE model gets one here, with hooks
    on the model that record each of its forwards. Returns None if the model has no routers.
    """
    recorder = model.__dict__.get(_RECORDER_ATTRIBUTE)  # the model that owns it: no walk over the modules
    if recorder is not None:
        return recorder
    for module in model.modules():
        recorder = module.__dict__.get(_RECORDER_ATTRIBUTE)
        if recorder is not None:
            return recorder
    taps = moge_routers(model)
    if not taps:
        return None
    recorder = RoutingRecorder(taps)
    model.register_forward_pre_hook(recorder._model_pre_hook, with_kwargs=True, prepend=True)
    model.register_forward_hook(recorder._model_post_hook, always_call=True, prepend=True)
    setattr(model, _RECORDER_ATTRIBUTE, recorder)
    return recorder


def attach_routing_recorder(model: nn.Module) -> RoutingRecorder:
    """Give a MoGE base model its recorder (its forward calls `begin`/`end` itself); called when it is built."""
    recorder = RoutingRecorder(moge_routers(model))
    setattr(model, _RECORDER_ATTRIBUTE, recorder)
    return recorder
