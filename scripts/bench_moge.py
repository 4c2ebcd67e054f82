"""Benchmark MoGE blocks and training steps side by side, as ratios to a dense MLP with the same active FLOPs.

Block mode (default) times one whole MoGE block (router, experts, load-balancing loss and the MoGE regularizer) per
experts implementation, forward or forward+backward, against the dense-equivalent MLP (`d -> k*f -> d`, bias, GELU:
the FLOPs of one token's k experts). Every number is the median of `--reps` runs after `--warmup` runs, timed with
CUDA events on a GPU and `time.perf_counter` on CPU, all in one process so that the ratios compare like with like.

Step mode (`--step`) times a whole GPT-2 MoGE training step (forward, backward, AdamW) with `moge_loss_coef` 0 and
> 0, and reports tokens/s and peak memory of both: the cost of the regularizer in a real model. Both run on one model
whose weights stay put (AdamW at learning rate 0), so that both route alike and differ only by the regularizer.

transformers step mode (`--hf_step FAMILY ...`) does the same for transformers' own MoE causal LMs (`qwen3_moe`:
softmax router with a load-balancing loss; `deepseek_v3`: sigmoid router with a correction bias, no auxiliary loss),
built from a config at the `--step_*` sizes for each `--num_experts`: the plain model (`output_router_logits=True`, so
its own aux loss trains) against a deep copy of it given `moge_hf.add_moge_regularizer(moge_loss_coef=...)`, sigma
annealed every step as `add_moge_callback` does. Both copies start from the same weights, which stay put (AdamW at
learning rate 0 for each), so both route alike; their steps are timed interleaved, eager (no `torch.compile`).

    python scripts/bench_moge.py                       # GPU: GPT-2 small shape, E=16, k=2, 16k tokens, bf16
    python scripts/bench_moge.py --sweep               # GPU: GPT-2 S/M, ViT-S/B shapes, E 8..64, k 1/2, 4k..64k
    python scripts/bench_moge.py --step                # GPU: GPT-2 small training step, lambda 0 vs 0.01
    python scripts/bench_moge.py --hf_step qwen3_moe deepseek_v3 --num_experts 8 16 32 64
                                                       # transformers MoE training step, plain vs regularized
    python scripts/bench_moge.py --device cpu          # CPU: a small shape in float32

Implementations ("paths"):
    dense          the dense-equivalent MLP (the bar)
    hf_loop        transformers' per-expert eager loop (one-hot mask, a `where` per expert, `index_add_`), the
                   pattern of transformers' MoE models' own eager forwards, for non-gated experts with bias
    grouped_mm     transformers' `grouped_mm` experts
    eager          moge_hf's eager experts (sort once, gather once, per-expert slices)
    moge_triton    moge_hf's fused Triton experts (GPU)
Each is timed in eager mode and, with `--compile` (default on GPU), under `torch.compile` (suffix `+compile`).
"""

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moge_hf import GPT2MoGEConfig, GPT2MoGELMHeadModel, add_moge_regularizer
from moge_hf.losses import _group_sparsity_from_matrix, default_map_shape, gaussian_window, group_window_matrix
from moge_hf.moge_layer import MoGESparseMoeBlock, routing_losses, set_moge_sigma
from moge_hf.routing import RoutingRecorder, moge_routers
from moge_hf.training import annealed_sigma


SHAPES = {"gpt2-small": (768, 3072), "gpt2-medium": (1024, 4096), "vit-s": (384, 1536), "vit-b": (768, 3072)}
PATHS = ("dense", "hf_loop", "grouped_mm", "eager", "moge_triton")


def hf_loop_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' per-expert eager loop (its MoE models' own `forward`), for non-gated experts with bias."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, T)
        experts_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in experts_hit:
        expert = expert[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        hidden = F.linear(hidden_states[token_idx], self.up_proj[expert], self.up_proj_bias[expert])
        hidden = F.linear(self.act_fn(hidden), self.down_proj[expert], self.down_proj_bias[expert])
        hidden = hidden * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, hidden.to(final_hidden_states.dtype))
    return final_hidden_states


ALL_EXPERTS_FUNCTIONS["hf_loop"] = hf_loop_experts_forward  # local to this process: the benchmark's baseline


@dataclass
class Case:
    shape: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    tokens: int
    backward: bool
    ms: dict = field(default_factory=dict)  # path -> median milliseconds
    peak_mib: dict = field(default_factory=dict)  # path -> peak memory above the inputs, MiB
    errors: dict = field(default_factory=dict)  # path -> why it did not run


class Timer:
    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, steps: dict) -> dict:
        """Median milliseconds of each closure in `steps`, timed interleaved (one run of each in turn, `reps`
        rounds) so that drifting clocks or a shared machine affect every closure alike."""
        for step in steps.values():
            for _ in range(self.warmup):
                step()
        self.sync()
        cuda = self.device.type == "cuda"
        times = {name: [] for name in steps}
        for _ in range(self.reps):
            for name, step in steps.items():
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step()
                    end.record()
                    times[name].append((start, end))
                else:
                    start = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - start) * 1e3)
        self.sync()
        if cuda:
            times = {name: [start.elapsed_time(end) for start, end in events] for name, events in times.items()}
        return {name: statistics.median(values) for name, values in times.items()}

    def peak_mib(self, fn) -> float | None:
        if self.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


def block_config(case: Case, moge_loss_coef: float, implementation: str) -> GPT2MoGEConfig:
    config = GPT2MoGEConfig(
        n_embd=case.hidden,
        n_inner=case.intermediate,
        n_head=max(1, case.hidden // 64),
        n_layer=2,
        num_experts=case.num_experts,
        num_experts_per_tok=case.top_k,
        moge_loss_coef=moge_loss_coef,
        moge_window=min(3, *default_map_shape(case.num_experts)),
    )
    config._experts_implementation = implementation
    return config


def make_block_step(case: Case, path: str, dtype: torch.dtype, device: torch.device, moge_loss_coef: float, compile_):
    """A closure running one forward (and backward) of the block for `path`, on fresh random data."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(case.tokens, case.hidden, generator=generator) * 0.5).to(device=device, dtype=dtype)
    grad_out = torch.randn(case.tokens, case.hidden, generator=generator).to(device=device, dtype=dtype)
    x.requires_grad_(case.backward)
    if path == "dense":
        hidden = case.top_k * case.intermediate
        module = nn.Sequential(
            nn.Linear(case.hidden, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, case.hidden)
        )
        module = module.to(device=device, dtype=dtype)

        def forward():
            return (module(x) * grad_out).sum()

    else:
        config = block_config(case, moge_loss_coef, path)
        module = MoGESparseMoeBlock(config, case.hidden, case.intermediate, "gelu_new", dropout=0.0)
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                parameter.normal_(0.0, 0.02 if "bias" not in name else 0.0)
        module = module.to(device=device, dtype=dtype)
        coefs = (config.router_aux_loss_coef, moge_loss_coef)
        differentiable = frozenset(name for name, coef in zip(("aux_loss", "moge_loss"), coefs) if coef)

        recorder = RoutingRecorder(moge_routers(module))  # what a MoGE model reads its layers' routing with

        def forward():
            recorder.begin()
            out = module(x)
            routing = recorder.end()[0].output
            losses = routing_losses(routing, module.regularizer, None, None, differentiable)
            return (out * grad_out).sum() + coefs[0] * losses["aux_loss"] + coefs[1] * losses["moge_loss"]

    if compile_:
        forward = torch.compile(forward)
    parameters = list(module.parameters())

    def step():
        if not case.backward:
            with torch.no_grad():
                return forward()
        for parameter in parameters:
            parameter.grad = None
        x.grad = None
        forward().backward()

    return step


def run_block_case(case: Case, paths, timer: Timer, dtype, device, moge_loss_coef: float, compile_modes):
    """Build every path's block step, check it runs (and measure its peak memory), then time them interleaved."""
    # Every case compiles the same closure's code again; without a reset dynamo would stop at its recompile limit
    # and silently run later cases eagerly.
    torch._dynamo.reset()
    steps = {}
    for path in paths:
        for compile_ in compile_modes:
            name = path + ("+compile" if compile_ else "")
            try:
                step = make_block_step(case, path, dtype, device, moge_loss_coef, compile_)
                step()  # compiles, autotunes, or fails here
                peak = timer.peak_mib(step)
                if peak is not None:
                    case.peak_mib[name] = peak
                steps[name] = step
            except Exception as error:  # a path that cannot run here (no Triton, out of memory): report, go on
                case.errors[name] = f"{type(error).__name__}: {_first_line(error)}"
    case.ms.update(timer.median_ms(steps))
    steps.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_block_table(cases: list[Case]) -> None:
    names = sorted({name for case in cases for name in (*case.ms, *case.errors)}, key=_path_order)
    header = f"{'shape':<12}{'E':>4}{'k':>3}{'tokens':>8} {'pass':<8}{'dense ms':>10} " + " ".join(
        f"{name:>18}" for name in names if name != "dense"
    )
    print(header)
    for case in cases:
        dense = case.ms.get("dense")
        cells = []
        for name in names:
            if name == "dense":
                continue
            if name in case.ms and dense:
                cells.append(f"{case.ms[name] / dense:>17.2f}x")
            else:
                cells.append(f"{'-' if name not in case.errors else 'error':>18}")
        pass_name = "fwd+bwd" if case.backward else "fwd"
        dense_cell = f"{dense:>10.3f}" if dense else f"{'-':>10}"
        print(
            f"{case.shape:<12}{case.num_experts:>4}{case.top_k:>3}{case.tokens:>8} {pass_name:<8}{dense_cell} "
            + " ".join(cells)
        )
    errors = {(name, error) for case in cases for name, error in case.errors.items()}
    for name, error in sorted(errors):
        print(f"  {name}: {error}")
    if any(case.peak_mib for case in cases):
        print("\npeak memory above the inputs, MiB")
        for case in cases:
            cells = " ".join(f"{name}={case.peak_mib[name]:.0f}" for name in names if name in case.peak_mib)
            pass_name = "fwd+bwd" if case.backward else "fwd"
            print(f"  {case.shape} E={case.num_experts} k={case.top_k} T={case.tokens} {pass_name}: {cells}")


def _path_order(name: str):
    base, _, suffix = name.partition("+")
    return (PATHS.index(base) if base in PATHS else len(PATHS), suffix)


# ---- training step -------------------------------------------------------------------------------------------------


def make_train_steps(args, device: torch.device, dtype: torch.dtype, path: str, compile_: bool, coefs):
    """`(model, {lambda: step})`: GPT-2 MoGE training steps (sigma schedule, autocast forward, backward, AdamW) as
    closures, one per lambda in `coefs`, on one shared model; each closure sets `config.moge_loss_coef` first.

    AdamW runs with learning rate 0 (every kernel of a real step runs; the weights stay put), so every step of every
    lambda routes the same tokens to the same experts and the steps differ only by the regularizer. Two separately
    trained models would drift apart in routing (and expert loads, and so in time), which would blur a 2% difference.
    """
    torch.manual_seed(0)
    config = GPT2MoGEConfig(
        n_embd=args.step_hidden,
        n_layer=args.step_layers,
        n_head=args.step_hidden // 64,
        n_positions=args.step_seq,
        vocab_size=args.step_vocab,
        bos_token_id=args.step_vocab - 1,
        eos_token_id=args.step_vocab - 1,
        num_experts=args.num_experts[0],
        num_experts_per_tok=args.top_k[0],
        moge_window=min(3, *default_map_shape(args.num_experts[0])),
        moge_sigma_schedule=[10.0, 1.0, 0.2],
        attn_implementation="sdpa",
    )
    model = GPT2MoGELMHeadModel(config).to(device).train()
    model.config._experts_implementation = path  # read at each call; `hf_loop` is this script's, not a model option
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_ else model
    ids = torch.randint(0, config.vocab_size, (args.step_batch, args.step_seq), device=device)
    state = {"step": 0}

    def make_step(coef: float):
        def step():
            model.config.moge_loss_coef = coef
            model.set_moge_sigma(10.0 - 9.0 * min(1.0, state["step"] / 100) ** 0.2)  # what MoGESigmaCallback does
            state["step"] += 1
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return model, {coef: make_step(coef) for coef in coefs}


def run_step(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """GPT-2 MoGE training steps, lambda = 0 against lambda > 0 (paired on one model, timed interleaved), per experts
    implementation."""
    results = []
    tokens = args.step_batch * args.step_seq
    timer = Timer(device, args.warmup, args.reps)
    for path in args.paths:
        if path == "dense":
            continue
        for compile_ in args.compile_modes:
            torch._dynamo.reset()  # see run_block_case
            label = f"{path}{'+compile' if compile_ else ''}"
            try:
                _, steps = make_train_steps(args, device, dtype, path, compile_, (0.0, args.moge_loss_coef))
                named = {f"{label} lambda={coef:g}": step for coef, step in steps.items()}
                peaks = {}
                for name, step in named.items():
                    step()
                    peaks[name] = timer.peak_mib(step)
            except Exception as error:
                results.append({"name": label, "error": f"{type(error).__name__}: {_first_line(error)}"})
                continue
            for name, ms in timer.median_ms(named).items():
                results.append({"name": name, "ms": ms, "tokens_per_s": tokens / ms * 1e3, "peak_mib": peaks[name]})
            del steps, named
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(
        f"GPT-2 MoGE training step: {args.step_layers} layers, d={args.step_hidden}, MoE every other layer, "
        f"E={args.num_experts[0]}, k={args.top_k[0]}, batch {args.step_batch} x {args.step_seq} tokens, {dtype}"
    )
    reference = {}
    for result in results:
        if "error" in result:
            print(f"  {result['name']:<32} error: {result['error']}")
            continue
        base = result["name"].rsplit(" ", 1)[0]
        reference.setdefault(base, result["ms"])
        peak = f"{result['peak_mib']:.0f} MiB" if result["peak_mib"] is not None else "-"
        print(
            f"  {result['name']:<32} {result['ms']:9.2f} ms  {result['tokens_per_s']:>10.0f} tok/s  peak {peak:>10}"
            f"  {result['ms'] / reference[base]:.3f}x lambda=0"
        )
    return results


# ---- a transformers MoE model's training step, plain against regularized -------------------------------------------

HF_FAMILIES = ("qwen3_moe", "deepseek_v3")
SIGMA_SCHEDULE = [10.0, 1.0, 0.2]  # the paper's, annealed over 100 steps in both step modes


def hf_moe_model(args, family: str, num_experts: int):
    """A transformers MoE causal LM of `family` at the `--step_*` sizes with `num_experts` experts in every layer,
    random weights (seeded), `output_router_logits=True` (Qwen3-MoE's load-balancing loss joins its loss)."""
    hidden, heads = args.step_hidden, max(1, args.step_hidden // 64)
    common = dict(
        vocab_size=args.step_vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,  # dense MLPs: none here, every layer is an MoE layer
        moe_intermediate_size=args.step_expert_size or hidden,
        num_hidden_layers=args.step_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_experts_per_tok=args.top_k[0],
        max_position_embeddings=args.step_seq,
        output_router_logits=True,
        bos_token_id=args.step_vocab - 1,
        eos_token_id=args.step_vocab - 1,
        pad_token_id=None,
    )
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, head_dim=64, num_experts=num_experts, decoder_sparse_step=1, mlp_only_layers=[]
        )
        model_class = transformers.Qwen3MoeForCausalLM
    elif family == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **common,
            n_routed_experts=num_experts,
            n_shared_experts=1,
            n_group=1,  # plain top-k over all experts (no group-limited routing)
            topk_group=1,
            first_k_dense_replace=0,
            q_lora_rank=max(16, hidden // 2),
            kv_lora_rank=max(16, hidden // 4),
            qk_nope_head_dim=48,
            qk_rope_head_dim=16,
            v_head_dim=64,
        )
        model_class = transformers.DeepseekV3ForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}; known: {HF_FAMILIES}")
    if args.hf_experts_implementation:
        config._experts_implementation = args.hf_experts_implementation
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_class(config)


def make_hf_train_steps(args, device: torch.device, dtype: torch.dtype, family: str, num_experts: int):
    """`(models, steps, record)`: a transformers MoE model ("plain") and a deep copy of it given the regularizer
    ("moge", lambda = `--moge_loss_coef`, sigma annealed every step as `add_moge_callback` does), each with its own
    AdamW at learning rate 0; `steps` holds one training-step closure (forward with labels, backward, AdamW) per
    model; `record["runs"]` counts each closure's steps and `record["output"]` keeps the losses of its last one
    (`loss`, `aux_loss`, `moge_loss`: None where the output has no such field).

    The copy is taken before the regularizer is added, so both models start with the same weights, and the learning
    rate 0 keeps them there (every kernel of a real step runs): both route the same tokens to the same experts in every
    step, and the two steps differ only by the regularizer.
    """
    plain = hf_moe_model(args, family, num_experts).to(device).train()
    regularized = add_moge_regularizer(
        copy.deepcopy(plain), moge_loss_coef=args.moge_loss_coef, moge_sigma_schedule=SIGMA_SCHEDULE
    )
    models = {"plain": plain, "moge": regularized}
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, args.step_vocab, (args.step_batch, args.step_seq), generator=generator).to(device)
    record = {"runs": dict.fromkeys(models, 0), "output": {}}

    def make_step(name: str, model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda")

        def step():
            if name == "moge":  # what add_moge_callback does at every step
                set_moge_sigma(model, annealed_sigma(record["runs"][name] / 100, SIGMA_SCHEDULE))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                output = model(input_ids=ids, labels=ids)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record["runs"][name] += 1
            # The losses only (detached, no host sync): the whole output would keep the logits alive between steps.
            record["output"][name] = {
                key: None if getattr(output, key, None) is None else getattr(output, key).detach()
                for key in ("loss", "aux_loss", "moge_loss")
            }

        return step

    return models, {name: make_step(name, model) for name, model in models.items()}, record


def run_hf_step(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """transformers MoE training steps, plain against regularized (paired, timed interleaved), per family and E."""
    results = []
    tokens = args.step_batch * args.step_seq
    timer = Timer(device, args.warmup, args.reps)
    for family in args.hf_step:
        for num_experts in args.num_experts:
            result = {"family": family, "num_experts": num_experts, "top_k": args.top_k[0]}
            results.append(result)
            try:
                models, steps, record = make_hf_train_steps(args, device, dtype, family, num_experts)
                result["experts_implementation"] = models["plain"].config._experts_implementation
                peaks = {}
                for name, step in steps.items():
                    step()
                    peaks[name] = timer.peak_mib(step)
                ms = timer.median_ms(steps)
            except Exception as error:  # a family this transformers cannot build or run: report, go on
                result["error"] = f"{type(error).__name__}: {_first_line(error)}"
                print(f"  {family} E={num_experts}: error: {result['error']}", file=sys.stderr)
                continue
            for name in steps:
                losses = {key: None if loss is None else loss.item() for key, loss in record["output"][name].items()}
                result[name] = {
                    "ms": ms[name],
                    "tokens_per_s": tokens / ms[name] * 1e3,
                    "peak_mib": peaks[name],
                    "steps_run": record["runs"][name],
                    **losses,
                }
            result["ratio"] = ms["moge"] / ms["plain"]
            print(f"  done {family} E={num_experts}", file=sys.stderr)
            del models, steps, record
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(
        f"transformers MoE training step: {args.step_layers} layers, d={args.step_hidden}, expert size "
        f"{args.step_expert_size or args.step_hidden}, MoE in every layer, k={args.top_k[0]}, batch {args.step_batch} "
        f"x {args.step_seq} tokens, {dtype}; plain (its own aux loss) vs + MoGE regularizer "
        f"(lambda {args.moge_loss_coef:g}); ratio = moge / plain step time"
    )
    print(
        f"  {'family':<12}{'E':>4} {'experts':<11}{'plain ms':>10}{'moge ms':>10}{'plain tok/s':>13}{'moge tok/s':>12}"
        f"{'ratio':>8}  peak MiB plain / moge"
    )
    for result in results:
        head = f"  {result['family']:<12}{result['num_experts']:>4} "
        if "error" in result:
            print(f"{head}error: {result['error']}")
            continue
        plain, moge = result["plain"], result["moge"]
        peaks = "-" if plain["peak_mib"] is None else f"{plain['peak_mib']:.0f} / {moge['peak_mib']:.0f}"
        print(
            f"{head}{result['experts_implementation']:<11}{plain['ms']:>10.2f}{moge['ms']:>10.2f}"
            f"{plain['tokens_per_s']:>13.0f}{moge['tokens_per_s']:>12.0f}{result['ratio']:>7.3f}x  {peaks}"
        )
    return results


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0][:200]


# ---- the regularizer alone ---------------------------------------------------------------------------------------


def naive_group_sparsity(logits: torch.Tensor, map_shape, window: int, sigma: float) -> torch.Tensor:
    """The regularizer as the method reads: softmax, square, a Gaussian conv2d over the map, sqrt, mean."""
    rows, cols = map_shape
    squared = logits.float().softmax(-1).square().view(-1, 1, rows, cols)
    kernel = gaussian_window(window, sigma, device=logits.device).view(1, 1, window, window)
    return torch.sqrt(F.conv2d(squared, kernel) + 1e-8).mean()


def run_regularizer(args, device: torch.device) -> list[dict]:
    """fwd+bwd of the regularizer from router logits: the naive conv2d form against moge_hf's one-GEMM form."""
    timer = Timer(device, args.warmup, args.reps)
    results = []
    for num_experts in args.num_experts:
        map_shape = default_map_shape(num_experts)
        window = min(3, *map_shape)
        matrix = group_window_matrix(map_shape, window, 1.0, device=device)
        for tokens in args.tokens:
            logits = torch.randn(tokens, num_experts, device=device, dtype=args.dtype, requires_grad=True)

            def naive(logits=logits, map_shape=map_shape, window=window):
                naive_group_sparsity(logits, map_shape, window, 1.0).backward()

            def gemm(logits=logits, matrix=matrix, window=window):
                probs = logits.float().softmax(-1)  # the router computes these anyway; counted here all the same
                _group_sparsity_from_matrix(probs, matrix, window, "mean", None).backward()

            with torch.no_grad():  # the two forms compute the same loss
                want = naive_group_sparsity(logits, map_shape, window, 1.0)
                got = _group_sparsity_from_matrix(logits.float().softmax(-1), matrix, window, "mean", None)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            ms = timer.median_ms({"naive conv2d": naive, "moge_hf GEMM": gemm})
            results.append({"num_experts": num_experts, "tokens": tokens, **ms})
            print(
                f"  E={num_experts:<3} map {map_shape[0]}x{map_shape[1]} h={window} T={tokens:<6} naive conv2d "
                f"{ms['naive conv2d']:8.3f} ms   moge_hf GEMM {ms['moge_hf GEMM']:8.3f} ms   "
                f"{ms['naive conv2d'] / ms['moge_hf GEMM']:.1f}x faster"
            )
    return results


# ---- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: gpt2-small (GPU), see --sweep")
    parser.add_argument("--hidden", type=int, help="custom shape: hidden size (with --intermediate)")
    parser.add_argument("--intermediate", type=int, help="custom shape: expert size")
    parser.add_argument("--num_experts", type=int, nargs="+", default=[16])
    parser.add_argument("--top_k", type=int, nargs="+", default=[2])
    parser.add_argument("--tokens", type=int, nargs="+", help="default: 16384 on GPU, 2048 on CPU")
    parser.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument(
        "--compile",
        dest="compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time every path under torch.compile (default: on GPU only)",
    )
    parser.add_argument("--moge_loss_coef", type=float, default=0.01, help="lambda of the regularizer (> 0)")
    parser.add_argument("--sweep", action="store_true", help="all shapes, E in 8 16 32 64, k in 1 2, 4k to 64k tokens")
    parser.add_argument("--step", action="store_true", help="time GPT-2 MoGE training steps instead of blocks")
    parser.add_argument(
        "--regularizer", action="store_true", help="time the regularizer alone (fwd+bwd): naive conv2d vs one GEMM"
    )
    parser.add_argument("--step_hidden", type=int, default=768)
    parser.add_argument("--step_layers", type=int, default=12)
    parser.add_argument("--step_batch", type=int, default=16)
    parser.add_argument("--step_seq", type=int, default=1024)
    parser.add_argument("--step_vocab", type=int, default=50257)
    parser.add_argument(
        "--hf_step",
        nargs="+",
        choices=HF_FAMILIES,
        metavar="FAMILY",
        help=f"time transformers MoE training steps ({', '.join(HF_FAMILIES)}), plain vs regularized, per "
        "--num_experts, at the --step_* sizes",
    )
    parser.add_argument("--step_expert_size", type=int, help="--hf_step: the experts' hidden size (default: d)")
    parser.add_argument(
        "--hf_experts_implementation",
        help="--hf_step: transformers' experts implementation (default: the model's own, grouped_mm where it runs)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="default: 10 on GPU, 2 on CPU")
    parser.add_argument("--reps", type=int, default=None, help="default: 50 on GPU, 5 on CPU")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json", help="write every number to this JSON file")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    args.compile_modes = (False, True) if (gpu if args.compile is None else args.compile) else (False,)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.reps = args.reps if args.reps is not None else (50 if gpu else 5)
    if args.sweep:
        args.shapes, args.num_experts, args.top_k = sorted(SHAPES), [8, 16, 32, 64], [1, 2]
        args.tokens = args.tokens or [4096, 16384, 65536]
    if (args.hidden is None) != (args.intermediate is None):
        parser.error("--hidden and --intermediate go together")
    if args.hidden is not None:
        SHAPES["custom"] = (args.hidden, args.intermediate)
        args.shapes = ["custom"]
    args.shapes = args.shapes or (["gpt2-small"] if gpu else ["cpu-small"])
    SHAPES.setdefault("cpu-small", (256, 1024))
    args.tokens = args.tokens or ([16384] if gpu else [2048])
    if args.moge_loss_coef <= 0:
        parser.error("--moge_loss_coef must be > 0 (lambda = 0 is what it is compared with)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    timing = f"median of {args.reps} after {args.warmup} warm-up"
    print(f"device: {name}; torch {torch.__version__}; dtype {args.dtype}; {timing}")
    if args.hf_step:
        report = {"device": name, "hf_step": run_hf_step(args, device, args.dtype)}
    elif args.step:
        report = {"device": name, "step": run_step(args, device, args.dtype)}
    elif args.regularizer:
        print("MoGE regularizer from router logits, forward + backward")
        report = {"device": name, "regularizer": run_regularizer(args, device)}
    else:
        cases = []
        timer = Timer(device, args.warmup, args.reps)
        for shape in args.shapes:
            hidden, intermediate = SHAPES[shape]
            for num_experts in args.num_experts:
                for top_k in args.top_k:
                    for tokens in args.tokens:
                        for pass_name in args.passes:
                            case = Case(
                                shape, hidden, intermediate, num_experts, top_k, tokens, pass_name == "fwd+bwd"
                            )
                            run_block_case(
                                case, args.paths, timer, args.dtype, device, args.moge_loss_coef, args.compile_modes
                            )
                            cases.append(case)
                            print(f"  done {shape} E={num_experts} k={top_k} T={tokens} {pass_name}", file=sys.stderr)
        print(
            "MoGE block (router + experts + load-balancing loss + regularizer, lambda "
            f"{args.moge_loss_coef:g}), time as a ratio to the dense-equivalent MLP"
        )
        print_block_table(cases)
        report = {"device": name, "blocks": [asdict(case) for case in cases]}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {
                    **report,
                    "argv": sys.argv,
                    "dtype": str(args.dtype),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
                file,
                indent=1,
            )


if __name__ == "__main__":
    main()
