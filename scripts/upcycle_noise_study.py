#!/usr/bin/env python
"""Does laying the upcycling noise out on the MoGE map help? A paired study on a text file.

A dense Llama (bytes as tokens, vocabulary 256) is trained on the text once; then, for each seed, it is upcycled twice
with `moge_hf.upcycle_to_moe` into a Mixtral with the same seed: with independent noise per expert
(`expert_noise_layout="independent"`) and with the same noise mixed between neighbours on the expert map (`"map"`).
Both arms share the router initialization, the noise draw, the data order and every setting; they are fine-tuned with
`Trainer`, Mixtral's load-balancing loss and the MoGE regularizer (`add_moge_regularizer`, sigma annealed by
`add_moge_callback`), and evaluated on the held-out end of the text (language-model loss alone, in nats per byte).
The script prints each seed's pair, the mean paired difference (map - independent) and its 95% t-interval, and writes
`<output_dir>/results.json`.

    python scripts/upcycle_noise_study.py --train_file data/tinyshakespeare/input.txt --output_dir runs/noise_study
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

from moge_hf import add_moge_callback, add_moge_regularizer, default_map_shape, upcycle_to_moe


# 97.5% quantiles of Student's t for 1..9 degrees of freedom (two-sided 95% intervals).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
LAYOUTS = ("independent", "map")


def byte_blocks(text: bytes, seq: int) -> list[dict]:
    ids = torch.tensor(list(text), dtype=torch.long)
    blocks = ids[: len(ids) // seq * seq].view(-1, seq)
    return [{"input_ids": block, "labels": block} for block in blocks]


def training_arguments(args, output_dir: str, steps: int, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 10,
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )


def neighbour_mix(map_shape: tuple[int, int]) -> torch.Tensor:
    """`(E, E)`: row i mixes the experts around expert i on the map (Gaussian weights, sigma 1 cell, distances wrapping
    around), each row of unit L2 norm, so that mixing independent unit noise keeps its variance."""
    rows, cols = map_shape
    cell = torch.arange(rows * cols)
    row, col = cell // cols, cell % cols
    drow, dcol = (row[:, None] - row[None]).abs(), (col[:, None] - col[None]).abs()
    drow, dcol = torch.minimum(drow, rows - drow), torch.minimum(dcol, cols - dcol)
    weights = torch.exp(-(drow**2 + dcol**2).float() / 2)
    return weights / weights.norm(dim=1, keepdim=True)


@torch.no_grad()
def upcycle(dense: LlamaForCausalLM, args, layout: str):
    """`dense` upcycled into a Mixtral (exact), then every expert's weights given Gaussian noise of `--noise` times
    the std of the dense weight (torch's global generator): independent per expert, or (`"map"`) mixed between
    neighbours on the MoGE expert map (the most square, as `add_moge_regularizer`'s), with the same variance."""
    moe = upcycle_to_moe(
        dense,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        output_router_logits=True,
        router_aux_loss_coef=args.router_aux_loss_coef,
    )
    mix = neighbour_mix(default_map_shape(args.num_experts)) if layout == "map" else None
    for dense_layer, layer in zip(dense.model.layers, moe.model.layers):
        mlp, experts = dense_layer.mlp, layer.mlp.experts
        dense_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        for target, source in ((experts.gate_up_proj, dense_gate_up), (experts.down_proj, mlp.down_proj.weight)):
            noise = torch.randn(target.shape, device=target.device) * (args.noise * source.float().std())
            if mix is not None:
                noise = torch.einsum("ij,j...->i...", mix.to(noise.device), noise)
            target.add_(noise.to(target.dtype))
    return moe


@torch.no_grad()
def lm_loss(model, blocks: list[dict], batch: int) -> float:
    """Mean next-byte cross-entropy over the blocks (no routing loss)."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(blocks), batch):
        ids = torch.stack([block["input_ids"] for block in blocks[start : start + batch]]).to(device)
        logits = model(input_ids=ids, output_router_logits=False).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        total, count = total + loss.item(), count + ids[:, 1:].numel()
    model.train()
    return total / count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True, help="a text file; its last --validation_fraction is held out")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--validation_fraction", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dense_steps", type=int, default=300, help="training steps of the dense model")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps of each upcycled arm")
    parser.add_argument("--num_experts", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.1, help="expert_noise_std (relative)")
    parser.add_argument("--moge_loss_coef", type=float, default=0.01)
    parser.add_argument("--router_aux_loss_coef", type=float, default=0.01)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(args.train_file):
        raise FileNotFoundError(f"--train_file {args.train_file!r} does not exist")
    if not 0 < args.validation_fraction < 1:
        raise ValueError(f"--validation_fraction must be in (0, 1), got {args.validation_fraction}")
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        raise ValueError("--seeds: at least two distinct seeds (the interval needs pairs to vary)")
    os.makedirs(args.output_dir, exist_ok=True)
    started = time.time()

    with open(args.train_file, "rb") as file:
        text = file.read()
    cut = int(len(text) * (1 - args.validation_fraction))
    train, validation = byte_blocks(text[:cut], args.seq), byte_blocks(text[cut:], args.seq)
    if not train or not validation:
        raise ValueError(f"--train_file holds fewer than --seq {args.seq} bytes on one side of the split")

    # The dense model, trained once: the starting point of every arm.
    set_seed(0)
    dense_config = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    dense = LlamaForCausalLM(dense_config)
    dense_dir = os.path.join(args.output_dir, "dense")
    Trainer(model=dense, args=training_arguments(args, dense_dir, args.dense_steps, 0), train_dataset=train).train()
    dense_loss = lm_loss(dense, validation, args.batch)
    print(f"dense Llama after {args.dense_steps} steps: validation loss {dense_loss:.4f} nats/byte", flush=True)

    runs = []
    for seed in args.seeds:
        pair = {"seed": seed}
        for layout in LAYOUTS:
            set_seed(seed)  # the same router initialization and noise draw in both arms
            moe = upcycle(dense, args, layout)
            add_moge_regularizer(moe, moge_loss_coef=args.moge_loss_coef, moge_sigma_schedule=[10.0, 1.0, 0.2])
            at_start = lm_loss(moe, validation, args.batch)
            arm_dir = os.path.join(args.output_dir, f"seed{seed}-{layout}")
            trainer = Trainer(model=moe, args=training_arguments(args, arm_dir, args.steps, seed), train_dataset=train)
            add_moge_callback(trainer)
            trainer.train()
            pair[layout] = {
                "validation_loss_at_start": at_start,
                "validation_loss": lm_loss(moe, validation, args.batch),
            }
            print(f"seed {seed} {layout:<11}: validation loss {at_start:.4f} -> {pair[layout]['validation_loss']:.4f}")
        pair["difference"] = pair["map"]["validation_loss"] - pair["independent"]["validation_loss"]
        runs.append(pair)

    differences = [run["difference"] for run in runs]
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    half = T_975.get(len(differences) - 1, 1.96) * sd / math.sqrt(len(differences))
    lines = ["| seed | independent noise | map noise | map - independent |", "| --- | --- | --- | --- |"]
    for run in runs:
        lines.append(
            f"| {run['seed']} | {run['independent']['validation_loss']:.4f} | {run['map']['validation_loss']:.4f} "
            f"| {run['difference']:+.4f} |"
        )
    lines.append(f"| mean (95% t-interval) | | | {mean:+.4f} ({mean - half:+.4f}, {mean + half:+.4f}) |")
    print("\n" + "\n".join(lines), flush=True)
    result = {
        "args": vars(args),
        "dense_validation_loss": dense_loss,
        "runs": runs,
        "mean_difference": mean,
        "interval_95": [mean - half, mean + half],
        "wall_seconds": time.time() - started,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "machine": platform.processor() or platform.machine(),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as file:
        json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
