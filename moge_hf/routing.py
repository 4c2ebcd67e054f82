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
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from .moge_layer import MoGERouting, MoGESparseMoeBlock


__all__ = [
    "SCORING_FUNCTIONS",
    "RecordedForward",
    "RecordedRouting",
    "RouterTap",
    "RoutingRecorder",
    "moge_routers",
    "routing_recorder",
    "scores",
]

# How a router turns its logits into expert scores: the softmax of the paper and of most MoE models; an elementwise
# sigmoid (DeepSeek-V3 and the models that copy its router); the square root of a softplus (DeepSeek-V4).
SCORING_FUNCTIONS = {
    "softmax": lambda logits: logits.softmax(-1),
    "sigmoid": torch.sigmoid,
    "sqrt_softplus": lambda logits: nn.functional.softplus(logits).sqrt(),
}


def scores(logits: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """`(T, E)` float32 distribution over the experts that a router of `scoring` gives its logits: the scores,
    normalized to sum to 1 per token (the softmax is one already). It is the distribution the router's top-k weights
    are a renormalized part of, whichever function scores."""
    values = SCORING_FUNCTIONS[scoring](logits.float())
    return values if scoring == "softmax" else values / values.sum(-1, keepdim=True).clamp_min(1e-20)


# Where transformers' MoE configs keep the number of routed experts and the top-k (the first name found wins; a
# nested text or FFN config is searched too).
NUM_EXPERTS_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_NAMES = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "top_k_experts")


def config_value(config, names: tuple[str, ...]) -> int | None:
    """The first positive integer among `config`'s fields `names`, else in its nested configs (`text_config`, ...)."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for value in vars(config).values():
        if value is not config and hasattr(value, "to_dict") and hasattr(value, "model_type"):
            found = config_value(value, names)
            if found is not None:
                return found
    return None


@dataclasses.dataclass
class RouterTap:
    """One router of a model, and how to read what it returns (a `MoGERouting`, or transformers' router tuple)."""

    name: str  # e.g. "layer3"
    module: nn.Module
    top_k: int
    index: int | None = 0  # where transformers' router output holds the logits (`OutputRecorder.index`)
    experts: nn.Module | None = None  # the layer's experts (3-D weights, `forward(hidden, top_k_index, weights)`)
    block: nn.Module | None = None  # a MoGE layer's block, which reports the routing it used (`routing_observer`)
    # A transformers router: how it scores its logits (`SCORING_FUNCTIONS`), and how many of them are routed experts
    # (the first `num_experts`; None: all). Logits past them (LongCat-Flash's zero-computation experts, ZAYA's skip
    # expert) are left out of the distribution. `add_moge_regularizer` sets both from what the model computes.
    scoring: str = "softmax"
    num_experts: int | None = None

    def logits(self, output) -> torch.Tensor:
        """`(T, W)` routing logits as the router returns them (for a MoGE router: before jitter noise, what the
        regularizer takes)."""
        if isinstance(output, MoGERouting):
            return output.clean_logits
        # As transformers' `OutputRecorder`: the index picks from a tuple output; a tensor output is the logits.
        logits = output[self.index] if self.index is not None and isinstance(output, (tuple, list)) else output
        return logits.reshape(-1, logits.shape[-1])

    def scores(self, output) -> torch.Tensor:
        """`(T, E)` float32 distribution over the routed experts: `scores` of the routed experts' logits, with the
        router's own scoring function. What the MoGE regularizer takes."""
        if isinstance(output, MoGERouting):
            return output.probs
        logits = self.logits(output)
        return scores(logits if self.num_experts is None else logits[:, : self.num_experts], self.scoring)

    def routing(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        """`(T, E)` float32 routing probabilities and the `(T, k)` chosen experts, as the model routed (for a
        transformers router: the top-k of those probabilities, without any selection bias or expert groups)."""
        if isinstance(output, MoGERouting):
            return output.probs, output.top_k_index
        probs = self.scores(output)
        return probs, probs.topk(self.top_k, dim=-1).indices


def _layer_name(module_name: str, position: int) -> str:
    match = re.search(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.", module_name)
    return f"layer{match.group(1)}" if match else f"router{position}"


def _router_spec(model: nn.Module):
    """The `router_logits` entry of the `_can_record_outputs` of `model`, or of the first submodule that declares one
    (a multimodal model's or a `*ForCausalLM`'s inner text model: Gemma4, Llama4)."""
    for module in model.modules():
        spec = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        if spec is not None:
            return spec
    return None


def _recorded_routers(model: nn.Module) -> list[RouterTap]:
    """The routers transformers records `router_logits` from (`_can_record_outputs`, of the model or of its inner
    model; one recorder or a list of them, as JetMoE's attention and MLP routers), matched as transformers does."""
    spec = _router_spec(model)
    if spec is None:
        return []
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    taps = []
    for module_name, module in model.named_modules():
        for recorder in specs:
            target_class = getattr(recorder, "target_class", recorder if isinstance(recorder, type) else None)
            class_name = getattr(recorder, "class_name", recorder if isinstance(recorder, str) else None)
            layer_name = getattr(recorder, "layer_name", None)
            matched = (target_class is not None and isinstance(module, target_class)) or (
                class_name is not None and module_name.endswith(class_name)
            )
            if matched and layer_name is not None:
                matched = f".{layer_name.strip('.')}." in f".{module_name}."
            if not matched:
                continue
            top_k = getattr(module, "top_k", None) or config_value(model.config, TOP_K_NAMES) or 1
            parent = model.get_submodule(module_name.rpartition(".")[0]) if "." in module_name else model
            name = _layer_name(module_name, len(taps))
            if len(specs) > 1:  # several routers per layer: named by their module too
                name = f"{name}.{module_name.rpartition('.')[2]}"
            index = getattr(recorder, "index", 0)
            taps.append(RouterTap(name, module, top_k, index, getattr(parent, "experts", None)))
            break
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
        self.records: list[RecordedRouting] = []
        self.training = training  # whether the model was in training mode
        self.token_mask = token_mask  # `(T,)` bools of the real (not padding) tokens, or None: all count
        # A forward begun by the recorder's hooks on the model (a transformers MoE model): the module, and the frame
        # that runs the model's hooks and forward (None in a compiled graph), to tell an interrupted forward.
        self.module: nn.Module | None = None
        self.caller = None


def _thread_key() -> int:
    # Forwards in flight are kept per thread (`nn.DataParallel` runs its replicas, which share the recorder, in
    # threads). A compiled graph cannot ask for its thread: it uses key 0 (DataParallel with torch.compile is not
    # supported: use DDP).
    return 0 if torch.compiler.is_compiling() else threading.get_ident()


def _running_frames() -> set[int]:
    """The ids of the frames this thread is running now (the caller's and every frame below it)."""
    frames, frame = set(), sys._getframe(1)
    while frame is not None:
        frames.add(id(frame))
        frame = frame.f_back
    return frames


class RoutingRecorder:
    """Records what every router of one model decided in each forward of the model.

    Made once per model by [`routing_recorder`], when the model is built (before any `torch.compile`): a MoGE layer's
    block reports the routing it used (its `routing_observer`, after any hook on its router), and a transformers router
    gets a forward hook. A forward is recorded between `begin()` and `end()`: the MoGE models call them in their own
    forward; for a transformers MoE model, hooks on the model do. Router calls outside a recorded forward, such as
    gradient checkpointing's recomputation during backward, are not recorded. Forwards in flight are kept per thread,
    so `nn.DataParallel` replicas (which share the recorder) record apart; and per thread as a stack, so a forward of
    the model run inside one of its own forwards (by a hook on a layer, say) records its own routing, and the outer
    forward's record resumes after it.

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
        self._forwards: dict[int, list[RecordedForward]] = {}  # thread key -> its forwards in flight, innermost last
        for layer, tap in enumerate(taps):
            if tap.block is not None:
                tap.block.routing_observer = functools.partial(self._record, layer)
            else:
                tap.module.register_forward_hook(functools.partial(self._record, layer))

    def __getstate__(self) -> dict:
        # A copy of the model records for itself: no listeners (they read the original), nothing in flight.
        return {**self.__dict__, "listeners": [], "keep_inputs": 0, "_forwards": {}}

    def _current(self) -> RecordedForward | None:
        """This thread's innermost forward in flight; or one begun in a compiled graph (key 0) from eager code; or, in
        a compiled graph, the innermost forward an eager caller began."""
        if not torch.compiler.is_compiling():
            stack = self._forwards.get(threading.get_ident()) or self._forwards.get(0)
            return stack[-1] if stack else None
        stack = self._forwards.get(0)
        if not stack and self._forwards:
            if len(self._forwards) > 1:
                raise RuntimeError(
                    "Several threads are in a forward of this MoGE model while torch.compile traces one (nn."
                    "DataParallel with torch.compile): the routing cannot be told apart; use DDP (torchrun)"
                )
            stack = next(iter(self._forwards.values()))
        return stack[-1] if stack else None

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

    def begin(self, training: bool = False, token_mask: torch.Tensor | None = None) -> RecordedForward:
        """Start recording a forward of this thread (`training`: the model's mode; `token_mask`: `(T,)` of the real
        tokens, for the listeners); return it, for `end`/`abort`. A `begin` while a forward of this thread is in
        flight (a forward of the model inside one of its own) starts a forward of its own, innermost."""
        key = _thread_key()
        forward = RecordedForward(key, training, token_mask)
        self._forwards.setdefault(key, []).append(forward)
        return forward

    def _pop(self, forward: RecordedForward | None) -> RecordedForward | None:
        """Take `forward` (default: this thread's innermost) off its stack, with any forward begun inside it that
        never ended; return it, or None if it is not in flight."""
        forward = self._current() if forward is None else forward
        stack = None if forward is None else self._forwards.get(forward.key)
        if not stack:
            return None
        if stack[-1] is forward:
            stack.pop()
        else:
            index = next((i for i, other in enumerate(stack) if other is forward), None)
            if index is None:
                return None
            del stack[index:]
        if not stack:
            del self._forwards[forward.key]
        if forward.caller is not None:  # a listener may keep the forward: not the frame (the model's inputs)
            forward.caller = None
        return forward

    def end(self, forward: RecordedForward | None = None) -> list[RecordedRouting]:
        """Stop recording `forward` (what `begin` returned; default: this thread's innermost); tell the listeners and
        return its records."""
        forward = self._pop(forward)
        if forward is None:
            raise RuntimeError("RoutingRecorder.end() without begin()")
        for listener in self.listeners:
            listener(forward)
        return forward.records

    def abort(self, forward: RecordedForward | None = None) -> None:
        """The forward raised: drop it (default: this thread's innermost), no listener called."""
        self._pop(forward)

    def records(self) -> list[RecordedRouting]:
        """The records so far of this thread's innermost forward in flight (it goes on recording)."""
        forward = self._current()
        if forward is None:
            raise RuntimeError("RoutingRecorder.records() outside a recorded forward")
        return forward.records

    # For models whose forward does not call `begin`/`end` (transformers' MoE models): hooks on the model.
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        caller = None
        if torch.compiler.is_compiling():  # no frames to tell: forwards of the model do not nest in a compiled graph
            self._forwards.pop(_thread_key(), None)
        else:
            caller = sys._getframe(1)  # runs the model's hooks and forward: it returns when the forward does
            stack = self._forwards.get(_thread_key())
            if stack:
                # Forwards of this thread still in flight: outer ones (this forward runs inside them), or interrupted
                # ones, whose frame has returned (torch runs the always-called hooks on `Exception` only, not on a
                # KeyboardInterrupt): drop those.
                running = _running_frames()
                stack[:] = [forward for forward in stack if forward.caller is None or id(forward.caller) in running]
                if not stack:
                    del self._forwards[_thread_key()]
        mask = kwargs.get("attention_mask")
        token_mask = mask.reshape(-1) != 0 if torch.is_tensor(mask) and mask.dim() == 2 else None
        forward = self.begin(module.training, token_mask)
        forward.module, forward.caller = module, caller

    def _model_post_hook(self, module: nn.Module, args: tuple, output) -> None:
        forward = self._current()
        if forward is None or forward.module is not module:  # not this hook's (its `begin` did not run)
            return
        if output is None:  # the forward raised: the hook is always called
            self.abort(forward)
        else:
            self.end(forward)


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
