"""Worker of tests/test_distributed.py: trains tiny top-1 GPT-2 MoGE language models on 1 or 2 CPU processes.

Launch it with `python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py ...`
(gloo), or with plain `python` for one process. `--runs` is a JSON list of runs, done in order; each writes
`<out>/<name>/rank<r>.pt` holding what the tests check: the `loss` and the routing losses of every micro-batch as the
model returned them, Trainer's logged losses, the initial and final weights, and how many experts got no token on
this rank in each forward pass of each MoGE layer.

A run's `mode` is `"trainer"` (plain `transformers.Trainer`: DDP when launched on 2 processes) or `"fsdp2"` (a loop
doing what Trainer does, on a model sharded with `torch.distributed.fsdp.fully_shard` per `GPT2Block`, the unit of
scripts/accelerate_fsdp.yaml; on CPU, accelerate and Trainer fall back to DDP even when asked for FSDP). A run with
`distributed` (the arguments of transformers' `DistributedConfig`, e.g. `{"ep_size": 2, "fsdp_size": 2}`) loads the
model through transformers' distributed engine, which shards it by the config's plans (expert parallelism, FSDP2):
plain Trainer then trains it as it is. Mode `"image-forward"`: one forward and backward of an engine-sharded MoGE image
classifier (ViT or Swin); `"refused"`: a layout the MoGE models refuse to load (the error is saved).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import gpt2_config  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator  # noqa: E402

from moge_hf import GPT2MoGELMHeadModel  # noqa: E402
from moge_hf.moge_layer import MoGERouter  # noqa: E402


SEQ = 8
VOCAB = 99
# SGD with momentum rather than Adam: Adam turns a gradient that is zero in exact arithmetic but ~1e-11 of rounding
# noise in floating point (e.g. the attention key bias: softmax ignores a shift of all scores) into an update of up to
# ~lr, so a reordered sum (DDP's all-reduce) would change those weights by ~1e-4 and hide what the tests compare.
LEARNING_RATE = 0.5
MOMENTUM = 0.9
MAX_GRAD_NORM = 1.0


def model_config(router_aux_loss_coef: float, router_aux_loss_global: bool = False, tie_word_embeddings: bool = True):
    """Top-1 routing over 8 experts in both layers; 16 tokens per rank and layer leave some experts without a token.

    Hidden and expert sizes are multiples of 8 so that `grouped_mm` runs; dropout is 0 (tiny.gpt2_config).
    """
    return gpt2_config(
        n_embd=32,
        n_inner=64,
        n_positions=SEQ,
        num_experts=8,
        num_experts_per_tok=1,
        moe_layers=[0, 1],
        router_aux_loss_coef=router_aux_loss_coef,
        router_aux_loss_global=router_aux_loss_global,
        router_z_loss_coef=0.001,
        moge_loss_coef=0.1,
        tie_word_embeddings=tie_word_embeddings,
    )


def dataset(num_samples: int, unlabeled: bool = False) -> list[dict[str, torch.Tensor]]:
    """Fixed sequences `(start + step * t) mod 98 + 1`: learnable, so the loss drops within a few steps. `unlabeled`:
    prompt-only examples, every label -100."""
    generator = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, VOCAB - 1, (num_samples, 1), generator=generator)
    steps = torch.randint(1, 4, (num_samples, 1), generator=generator)
    ids = (starts + steps * torch.arange(SEQ)) % (VOCAB - 1) + 1
    return [
        {
            "input_ids": row,
            "labels": torch.full_like(row, -100) if unlabeled else row.clone(),
            "attention_mask": torch.ones_like(row),
        }
        for row in ids
    ]


def build_model(run: dict, out: Path | None = None):
    """The model of a run (the same initial weights in every process) and the lists its hooks fill.

    A run with `distributed` (the arguments of transformers' `DistributedConfig`) is sharded by transformers'
    distributed engine: rank 0 saves the initial model, and every rank loads it with
    `from_pretrained(..., distributed_config=DistributedConfig(**run["distributed"]))`.
    """
    torch.manual_seed(0)
    config = model_config(
        run["router_aux_loss_coef"], run.get("router_aux_loss_global", False), run.get("tie_word_embeddings", True)
    )
    model = GPT2MoGELMHeadModel(config)
    if run.get("distributed"):
        model = engine_load(model, run, out)
    model.set_experts_implementation(run["experts_implementation"])
    records = {"micro_losses": [], "aux_loss": [], "z_loss": [], "moge_loss": [], "empty_experts": []}

    def record_losses(module, args, output):
        # `loss` of every micro-batch as the model returned it (before Trainer's scaling by the number of processes)
        # and its unscaled routing losses.
        records["micro_losses"].append(float(output.loss.detach()))
        for name in ("aux_loss", "z_loss", "moge_loss"):
            records[name].append(float(getattr(output, name).detach()))

    model.register_forward_hook(record_losses)
    for module in model.modules():
        if isinstance(module, MoGERouter):
            module.register_forward_hook(
                lambda module, args, routing: records["empty_experts"].append(
                    int((torch.bincount(routing.top_k_index.flatten(), minlength=module.num_experts) == 0).sum())
                )
            )
    return model, records


def snapshot(state_dict: dict) -> dict[str, torch.Tensor]:
    """Full, detached CPU copies of a state dict (DTensors of an FSDP2 model are gathered)."""
    full = {}
    for name, tensor in state_dict.items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        full[name] = tensor.detach().cpu().clone()
    return full


class LossLog(TrainerCallback):
    def __init__(self):
        self.logged = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logged.append(float(logs["loss"]))


def expert_shards(model) -> dict[str, torch.Tensor]:
    """This rank's own part of every expert weight (a DTensor's local shard under expert parallelism), and under
    `"num_experts"` how many experts each MoGE layer's experts module runs (expert parallelism sets it to this rank's
    count; FSDP2 alone would leave it at the model's)."""
    shards = {
        name: (param.to_local() if hasattr(param, "to_local") else param).detach().clone()
        for name, param in model.named_parameters()
        if ".experts." in name
    }
    shards["num_experts"] = [module.num_experts for name, module in model.named_modules() if name.endswith("experts")]
    return shards


def train_with_trainer(run: dict, out: Path) -> dict:
    model, records = build_model(run, out)
    shards = expert_shards(model)
    initial = snapshot(model.state_dict())
    param_names = [name for name, _ in model.named_parameters()]
    args = TrainingArguments(
        output_dir=str(out / run["name"] / "trainer"),
        per_device_train_batch_size=run["per_device_batch"],
        gradient_accumulation_steps=run["grad_accum"],
        max_steps=run["steps"],
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        optim="sgd",
        optim_args=f"momentum={MOMENTUM}",
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        seed=42,
        data_seed=42,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    global_batch = run["per_device_batch"] * run["grad_accum"] * args.world_size
    log = LossLog()
    # Two global batches, seen in the same order every epoch: steps 3 and 4 revisit the data of steps 1 and 2.
    data = dataset(2 * global_batch, run.get("unlabeled", False))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[log])
    trainer.train()
    trained = None
    if run.get("distributed"):
        trained = out / run["name"] / "trained"
        model.save_pretrained(trained)  # every rank takes part: rank 0 writes the full weights
    return {
        "expert_shards": shards,
        "trained_dir": None if trained is None else str(trained),
        **records,
        "world_size": args.world_size,
        "rank": args.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped_model": type(trainer.model_wrapped).__name__,
        "logged_losses": log.logged,
        "param_names": param_names,
        "initial": initial,
        "final": snapshot(
            model.state_dict() if run.get("distributed") else trainer.accelerator.get_state_dict(trainer.model)
        ),
    }


def train_with_fsdp2(run: dict, out: Path) -> dict:
    """What Trainer does for a causal LM (token-count loss normalization over all ranks, loss times the number of
    processes because gradients are averaged, gradient clipping, the same optimizer), on an FSDP2-sharded model."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model, records = build_model(run)
    initial = snapshot(model.state_dict())
    param_names = [name for name, _ in model.named_parameters()]
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    sharded = type(model.transformer.h[0].mlp.experts.up_proj).__name__
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    batch_size = run["per_device_batch"]
    global_batch = batch_size * world_size
    data = dataset(2 * global_batch)
    for step in range(run["steps"]):
        start = (step % 2) * global_batch + rank * batch_size  # how accelerate shards a sequential sampler
        batch = default_data_collator(data[start : start + batch_size])
        num_items_in_batch = (batch["labels"][:, 1:] != -100).sum()
        dist.all_reduce(num_items_in_batch)
        loss = model(**batch, num_items_in_batch=num_items_in_batch).loss
        (loss * world_size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
    return {
        **records,
        "world_size": world_size,
        "rank": rank,
        "distributed_type": "FSDP2",
        "wrapped_model": type(model).__name__,
        "sharded_parameter": sharded,
        "param_names": param_names,
        "initial": initial,
        "final": snapshot(model.state_dict()),
    }


def engine_load(model, run: dict, out: Path):
    """`model` saved by rank 0 and loaded by every rank with transformers' distributed engine."""
    from transformers.distributed import DistributedConfig

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    initial = out / run["name"] / "initial"
    if dist.get_rank() == 0:
        model.save_pretrained(initial)
    dist.barrier()
    return type(model).from_pretrained(initial, distributed_config=DistributedConfig(**run["distributed"]))


def refused_load(run: dict, out: Path) -> dict:
    """A layout the MoGE models refuse: the error every rank got."""
    try:
        build_model(run, out)
    except ValueError as error:
        return {"rank": dist.get_rank(), "error": str(error)}
    return {"rank": dist.get_rank(), "error": None}


def image_model(family: str):
    """A MoGE image classifier of `family` ("vit" or "swin", the tiny configs of tests/tiny.py) with MoGE layers in
    every block, top-2 over 8 experts, every routing loss on, load balancing over the global batch (so that the ranks'
    mean loss is the loss of the whole batch)."""
    import tiny

    from moge_hf import SwinMoGEForImageClassification, ViTMoGEForImageClassification

    make_config, model_class, num_layers = {
        "vit": (tiny.vit_config, ViTMoGEForImageClassification, tiny.VIT_DENSE["num_hidden_layers"]),
        "swin": (tiny.swin_config, SwinMoGEForImageClassification, sum(tiny.SWIN_DENSE["depths"])),
    }[family]
    torch.manual_seed(0)
    config = make_config(
        moe_layers=list(range(num_layers)),
        num_experts_per_tok=2,
        router_aux_loss_coef=0.05,
        router_aux_loss_global=True,
        router_z_loss_coef=0.001,
        moge_loss_coef=0.1,
        **({"intermediate_size": 64} if family == "vit" else {}),
    )
    return model_class(config)


def image_batch():
    from tiny import pixel_values

    return pixel_values(seed=11, batch=8), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])


def image_forward(run: dict, out: Path) -> dict:
    """One training forward and backward of a MoGE image classifier (`run["family"]`) sharded by the engine: each rank
    its half of a batch of 8 images; the outputs, the losses and the full (gathered) gradients."""
    model = engine_load(image_model(run["family"]), run, out).train()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    images, labels = image_batch()
    rows = slice(rank * len(labels) // world_size, (rank + 1) * len(labels) // world_size)
    outputs = model(pixel_values=images[rows], labels=labels[rows])
    outputs.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name] = grad.detach().clone()
    return {
        "rank": rank,
        "world_size": world_size,
        "expert_shards": expert_shards(model),
        "logits": outputs.logits.detach(),
        "losses": {name: getattr(outputs, name).item() for name in ("loss", "aux_loss", "moge_loss", "z_loss")},
        "grads": grads,
        "initial": snapshot(model.state_dict()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", required=True, help="JSON list of runs")
    cli = parser.parse_args()
    torch.set_num_threads(1)  # processes share two cores: one thread each is fastest
    for run in json.loads(cli.runs):
        train = {"fsdp2": train_with_fsdp2, "image-forward": image_forward, "refused": refused_load}.get(
            run.get("mode"), train_with_trainer
        )
        result = train(run, cli.out)
        (cli.out / run["name"]).mkdir(parents=True, exist_ok=True)
        torch.save(result, cli.out / run["name"] / f"rank{result['rank']}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
