"""Routing diagnostics (`moge_hf.diagnostics`) on hand-made routings with known answers, and a smoke run of
`scripts/compare_moe_moge.py` on tiny synthetic data."""

import contextlib
import fcntl
import gzip
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import CASES, case_names, gpt2_config, input_ids, pixel_values, vit_config

from moge_hf import GPT2MoGELMHeadModel, ViTMoGEForImageClassification, add_moge_regularizer
from moge_hf import diagnostics as diag
from moge_hf.moge_layer import MoGERouting
from moge_hf.routing import moge_routers


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- load, entropy -------------------------------------------------------------------------------------------------


def test_expert_load_counts_slots_and_skips_masked_tokens():
    top_k = np.array([[0, 1], [0, 2], [3, 0]])
    np.testing.assert_allclose(diag.expert_load(top_k, 4), [3 / 6, 1 / 6, 1 / 6, 1 / 6])
    np.testing.assert_allclose(diag.expert_load(top_k, 4, mask=[True, True, False]), [2 / 4, 1 / 4, 1 / 4, 0])
    np.testing.assert_allclose(diag.expert_load(torch.tensor([2, 2]), 3), [0, 0, 1])


def test_entropies():
    uniform = np.full((5, 8), 1 / 8)
    one_hot = np.eye(8)[:5]
    assert diag.routing_entropy(uniform) == pytest.approx(math.log(8))
    assert diag.routing_entropy(one_hot) == pytest.approx(0.0)
    assert diag.routing_entropy(np.concatenate([uniform, one_hot]), mask=[True] * 5 + [False] * 5) == pytest.approx(
        math.log(8)
    )
    assert diag.normalized_entropy([0.25] * 4) == pytest.approx(1.0)
    assert diag.normalized_entropy([1, 0, 0, 0]) == pytest.approx(0.0)
    np.testing.assert_allclose(diag.mean_routing_probs(one_hot[:2]), [0.5, 0.5, 0, 0, 0, 0, 0, 0])


# ---- the map -------------------------------------------------------------------------------------------------------


def test_grid_distances_valid_and_torus():
    valid = diag.grid_distance_matrix((4, 8))
    torus = diag.grid_distance_matrix((4, 8), circular=True)
    # expert 0 = (0, 0), 7 = (0, 7), 31 = (3, 7), 10 = (1, 2)
    assert valid[0, 7] == 7 and torus[0, 7] == 1
    assert valid[0, 31] == 7 and torus[0, 31] == 1
    assert valid[0, 10] == 2 and torus[0, 10] == 2
    assert (np.diag(valid) == 0).all() and (valid == valid.T).all() and (torus <= valid).all()
    # window 3: within one window <=> Chebyshev distance <= 1
    assert diag.within_window([0, 0, 0, 0], [9, 7, 31, 10], (4, 8), 3).tolist() == [True, False, False, False]
    assert diag.within_window([0, 0, 0, 0], [9, 7, 31, 10], (4, 8), 3, circular=True).tolist() == [
        True,
        True,
        True,
        False,
    ]
    assert diag.within_window([0], [10], (4, 8), 5).tolist() == [True]  # window 5: distance <= 2
    assert diag.within_window([5], [5], (4, 8), 1).tolist() == [True]


def test_mean_by_distance():
    distances = diag.grid_distance_matrix((2, 2)).astype(float)
    assert diag.mean_by_distance(distances, (2, 2)) == {1: 1.0}
    assert diag.mean_by_distance(np.ones((6, 6)), (2, 3)) == {1: 1.0, 2: 1.0}


# ---- mutual information --------------------------------------------------------------------------------------------


def test_mutual_information_known_answers():
    classes = np.repeat(np.arange(10), 50)
    perfect = classes * 3  # one expert per class
    assert diag.mutual_information(classes, perfect) == pytest.approx(math.log2(10))
    # every (class, expert) pair equally often: independent, MI exactly 0
    grid_classes, grid_experts = np.meshgrid(np.arange(10), np.arange(4), indexing="ij")
    assert diag.mutual_information(grid_classes.ravel(), grid_experts.ravel()) == pytest.approx(0.0, abs=1e-12)
    # two classes sharing one expert: I = H(expert) = log2(5)
    assert diag.mutual_information(classes, classes // 2) == pytest.approx(math.log2(5))
    assert diag.miller_madow_bias(classes, perfect) == pytest.approx(9 * 9 / (2 * 500 * math.log(2)))


def test_shuffled_mutual_information_is_a_null():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 10, 4000)
    experts = rng.integers(0, 8, 4000)
    null = diag.shuffled_mutual_information(classes, experts, num_shuffles=5)
    assert 0 < null < 0.05
    # grouped shuffle: tokens of an image share its class; a perfect map stays far above the null
    groups = np.repeat(np.arange(400), 10)
    image_class = rng.integers(0, 10, 400)[groups]
    mi = diag.mutual_information(image_class, image_class)
    assert diag.shuffled_mutual_information(image_class, image_class, groups=groups) < 0.5 * mi


def test_frequent_token_buckets():
    ids = np.array([5, 5, 5, 7, 7, 9, 1, 2])
    buckets, frequent = diag.frequent_token_buckets(ids, num_buckets=3)
    assert frequent.tolist() == [5, 7]
    assert buckets.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


# ---- invariance bookkeeping ----------------------------------------------------------------------------------------


def test_routing_agreement():
    a = np.array([[0, 1], [2, 3], [7, 6], [4, 5]])
    b = np.array([[0, 1], [3, 2], [0, 6], [12, 13]])
    result = diag.routing_agreement(a, b, (4, 4), window=3, circular=False)
    assert result["num_tokens"] == 4
    assert result["same_top1"] == pytest.approx(1 / 4)
    assert result["same_set"] == pytest.approx(2 / 4)
    # top-1 pairs: (0,0) same; (2,3) adjacent; (7,0): (1,3)-(0,0) distance 3; (4,12): (1,0)-(3,0) distance 2
    assert result["within_window"] == pytest.approx(2 / 4)
    assert result["jaccard"] == pytest.approx((1 + 1 + 1 / 3 + 0) / 4)
    torus = diag.routing_agreement(a, b, (4, 4), window=3, circular=True, chance_seed=None)
    assert torus["within_window"] == pytest.approx(3 / 4)  # on the 4x4 torus (7, 0) are neighbours, (4, 12) not
    assert "chance_same_top1" not in torus and "chance_same_top1" in result


def patch_id_images(rows: int, cols: int, patch: int) -> torch.Tensor:
    """One image whose patch (i, j) is filled with the value i * cols + j."""
    ids = torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)
    return ids.repeat_interleave(patch, 0).repeat_interleave(patch, 1).expand(1, 3, -1, -1).clone()


@pytest.mark.parametrize("shift", [(0, 1), (1, 0), (0, -1), (-1, 1)])
def test_shift_correspondence_matches_rolled_images(shift):
    rows, cols, patch = 3, 4, 2
    image = patch_id_images(rows, cols, patch)
    shifted = diag.shift_images(image, patch, shift)
    source, target = diag.shift_correspondence((rows, cols), shift, num_prefix_tokens=1)
    patch_value = shifted[0, 0, ::patch, ::patch].reshape(-1)  # value of every patch after the shift
    assert torch.equal(patch_value[torch.as_tensor(target - 1)], torch.as_tensor(source - 1, dtype=torch.float32))
    dy, dx = shift
    assert len(source) == (rows - abs(dy)) * (cols - abs(dx))  # wrapped patches left out


def test_flip_correspondence_matches_flipped_images():
    rows, cols, patch = 2, 4, 2
    image = patch_id_images(rows, cols, patch)
    flipped = diag.flip_images(image)
    source, target = diag.flip_correspondence((rows, cols), num_prefix_tokens=0)
    patch_value = flipped[0, 0, ::patch, ::patch].reshape(-1)
    assert torch.equal(patch_value[torch.as_tensor(target)], torch.as_tensor(source, dtype=torch.float32))


# ---- models --------------------------------------------------------------------------------------------------------


def constant_routing(model, expert: int = 3):
    """Make every router of `model` ignore its input: all tokens go to `expert` (then its neighbours)."""

    def hook(module, args, routing):
        tokens = routing.probs.shape[0]
        logits = torch.zeros_like(routing.logits)
        logits[:, expert] = 5.0
        logits[:, (expert + 1) % logits.shape[1]] = 2.0
        probs = logits.float().softmax(-1)
        weights, index = torch.topk(probs, module.top_k, dim=-1)
        assert index.shape[0] == tokens
        return MoGERouting(logits, logits, probs, weights, index)

    # The block reports the routing it used, after this hook: the diagnostics see the replaced routing.
    return [block.router.register_forward_hook(hook) for block in model.moge_blocks()]


def vit_batches(count: int = 2, batch: int = 6):
    generator = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": pixel_values(seed, batch=batch), "labels": torch.randint(0, 5, (batch,), generator=generator)}
        for seed in range(count)
    ]


def test_invariance_is_one_when_routing_ignores_the_input():
    torch.manual_seed(0)
    vit = ViTMoGEForImageClassification(vit_config(moge_map_shape=[2, 4], moge_window=2))
    gpt = GPT2MoGELMHeadModel(gpt2_config())
    handles = constant_routing(vit) + constant_routing(gpt)
    image = diag.image_routing_invariance(vit, vit_batches())
    text = diag.text_routing_invariance(gpt, [{"input_ids": input_ids(0)}], replacement_ids=[1, 2, 3])
    for handle in handles:
        handle.remove()
    assert set(image) == {"shift_right", "shift_down", "flip"}
    for result in (*image.values(), *text.values()):
        for layer in result["layers"]:
            assert layer["same_top1"] == layer["same_set"] == layer["within_window"] == layer["jaccard"] == 1.0
    # 16x16 images, patch 4: a 4x4 grid; a shift by one patch leaves 3 x 4 patches per image, a flip all 16
    assert image["shift_right"]["layers"][0]["num_tokens"] == 12 * 12
    assert image["flip"]["layers"][0]["num_tokens"] == 12 * 16
    assert text["next_token"]["layers"][0]["num_tokens"] == input_ids(0).shape[0]


def content_routing(model, patch_size: int, layouts: list[tuple[int, int]]):
    """Make every router of an image model route each token by the mean colour of the pixels it covers, a function of
    the content alone that a shift by whole tokens moves with the token and a flip leaves as it is. `layouts`: per
    MoGE block, the patches per side of one token and the tokens before the grid (ViT's [CLS], routed to expert 0)."""
    seen = {}
    handles = [model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)]
    num_experts = model.config.num_experts
    projection = torch.randn(3, num_experts, generator=torch.Generator().manual_seed(0))

    def hook(module, args, routing, step, prefix):
        colours = torch.nn.functional.avg_pool2d(seen["pixel_values"], patch_size * step)  # (B, 3, rows, cols)
        cells = 10 * colours.flatten(2).transpose(1, 2) @ projection  # (B, rows * cols, E)
        logits = torch.zeros(cells.shape[0], prefix + cells.shape[1], num_experts)
        logits[:, prefix:], logits[:, :prefix, 0] = cells, 10.0
        logits = logits.reshape(-1, num_experts)
        assert logits.shape == routing.logits.shape
        probs = logits.softmax(-1)
        weights, index = torch.topk(probs, module.top_k, dim=-1)
        return MoGERouting(logits, logits, probs, weights, index)

    for block, (step, prefix) in zip(model.moge_blocks(), layouts, strict=True):
        handles.append(block.router.register_forward_hook(lambda *a, step=step, prefix=prefix: hook(*a, step, prefix)))
    return handles


def _stage_of(config, layer: int) -> int:
    return int(np.searchsorted(np.cumsum(config.depths), layer, side="right"))


# Per image family: (patches per side of a token, tokens before the grid) of the MoGE layer `layer` of `config`.
TOKEN_LAYOUTS = {"vit": lambda config, layer: (1, 1), "swin": lambda config, layer: (2 ** _stage_of(config, layer), 0)}


@pytest.mark.parametrize("case", case_names(moge_hf=True, task="image-classification"))
def test_image_invariance_compares_the_tokens_that_see_the_same_content(case):
    """A routing that follows the content (each token's mean colour) agrees perfectly under every shift and the flip,
    in every MoGE layer: the tokens compared are those that see the same content, on each layer's own grid (a Swin
    stage that merges 2 x 2 patches per token is shifted by two patches)."""
    model = CASES[case].build()
    config = model.config
    layouts = [TOKEN_LAYOUTS[CASES[case].family](config, layer) for layer in sorted(config.moe_layers)]
    handles = content_routing(model, config.patch_size, layouts)
    try:
        result = diag.image_routing_invariance(model, vit_batches(), transforms=(*diag.IMAGE_SHIFTS, "flip"))
    finally:
        for handle in handles:
            handle.remove()
    rows = config.image_size // config.patch_size
    for name, outcome in result.items():
        for (step, _), layer in zip(layouts, outcome["layers"], strict=True):
            side = rows // step
            per_image = side * side if name == "flip" else side * (side - 1)  # a shift: one row or column wraps
            assert layer["num_tokens"] == 2 * 6 * per_image, (name, step)
            assert layer["same_top1"] == layer["same_set"] == layer["jaccard"] == 1.0, (name, step, layer)


def test_invariance_of_a_real_model_is_a_fraction():
    torch.manual_seed(0)
    gpt = GPT2MoGELMHeadModel(gpt2_config(moge_padding="circular"))
    ids = input_ids(1)
    text = diag.text_routing_invariance(gpt, [{"input_ids": ids}], replacement_ids=list(range(1, 30)), seed=3)
    batch, seq = ids.shape
    for layer in text["context_replacement"]["layers"]:
        assert batch <= layer["num_tokens"] <= batch * (seq - 1)
        assert 0.0 <= layer["same_set"] <= layer["same_top1"] or layer["same_set"] <= 1.0
        assert layer["same_top1"] <= layer["within_window"] <= 1.0
    json.dumps(text)


def test_routing_diagnostics_vit_and_gpt2_are_json_and_consistent():
    torch.manual_seed(0)
    vit = ViTMoGEForImageClassification(vit_config())
    result = diag.routing_diagnostics(vit, vit_batches(), hidden_tokens_per_batch=16)
    json.dumps(result)
    assert result["num_tokens"] == 2 * 6 * 17  # 16 patches + [CLS]
    for layer in result["layers"]:
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert sum(layer["mean_prob"]) == pytest.approx(1.0)
        assert 0 <= layer["mi_label_bits"] <= math.log2(5)
        assert -1 <= layer["output_cosine_mean"] <= 1 and "prob_correlation_neighbors" in layer

    gpt = GPT2MoGELMHeadModel(gpt2_config())
    ids = input_ids(0)
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": ids}]  # LM labels are not class labels
    data = diag.collect_routing(gpt, batches)
    assert data.labels is None and data.token_mask.sum() == ids.shape[0] * (ids.shape[1] - 2)
    result = diag.routing_diagnostics(gpt, data, num_token_buckets=8)
    json.dumps(result)
    assert result["num_tokens"] == int(mask.sum())
    assert "mi_token_bits" in result["layers"][0] and "mi_label_bits" not in result["layers"][0]
    expected_load = diag.expert_load(data.top_k_index[0][data.token_mask], 8)
    np.testing.assert_allclose(result["layers"][0]["load"], expected_load)


def test_collector_records_routing_in_token_order():
    torch.manual_seed(0)
    gpt = GPT2MoGELMHeadModel(gpt2_config())
    ids = input_ids(0)
    out = gpt(ids, output_router_logits=True)
    data = diag.collect_routing(gpt, [{"input_ids": ids}], hidden_tokens_per_batch=5)
    for layer, logits in enumerate(out.router_logits):
        np.testing.assert_allclose(data.probs[layer], logits.softmax(-1).detach().numpy(), atol=1e-6)
    assert data.hidden[0].shape == (5, 32)
    assert data.position.tolist()[: ids.shape[1]] == list(range(ids.shape[1]))


def test_padding_is_left_out_everywhere_also_when_only_some_batches_carry_a_mask():
    torch.manual_seed(0)
    gpt = GPT2MoGELMHeadModel(gpt2_config())
    ids = input_ids(0)
    mask = torch.zeros_like(ids)
    mask[0, :3] = 1  # 3 real tokens in the second batch
    batches = [{"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}]
    data = diag.collect_routing(gpt, batches, hidden_tokens_per_batch=200)
    assert data.token_mask.shape == (2 * ids.numel(),)  # the unmasked first batch keeps all its tokens
    assert data.token_mask.sum() == ids.numel() + 3
    assert data.hidden[0].shape[0] == ids.numel() + 3  # output similarity sees no padding either
    # A batch of padding only: every diagnostic is empty, none crashes.
    empty = diag.routing_diagnostics(gpt, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])
    assert empty["num_tokens"] == 0 and sum(empty["layers"][0]["load"]) == 0
    assert diag.expert_load(np.zeros((0, 2), dtype=np.int64), 8).tolist() == [0.0] * 8
    agreement = diag.routing_agreement(np.zeros((0, 2)), np.zeros((0, 2)), (2, 4), window=2, circular=False)
    assert agreement["num_tokens"] == 0 and agreement["same_top1"] == 0.0


def test_redundancy_of_copied_and_negated_experts():
    torch.manual_seed(0)
    gpt = GPT2MoGELMHeadModel(gpt2_config())
    experts = gpt.moge_blocks()[0].experts
    with torch.no_grad():
        for name in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"):
            getattr(experts, name)[1:] = getattr(experts, name)[0]
        experts.down_proj[1] *= -1
        experts.down_proj_bias[1] *= -1
    weights = diag.weight_cosine_similarity(experts)
    assert weights[0, 2] == pytest.approx(1.0) and weights[2, 7] == pytest.approx(1.0)
    hidden = torch.randn(20, 32)
    outputs = diag.output_cosine_similarity(experts, hidden)
    assert outputs[0, 2] == pytest.approx(1.0, abs=1e-6)
    assert outputs[0, 1] == pytest.approx(-1.0, abs=1e-6)
    per_token = diag.all_expert_outputs(experts, hidden)
    assert per_token.shape == (8, 20, 32)


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    layers = [{"layer": 1, "load": [1 / 8] * 8, "mean_prob": list(np.linspace(0, 0.25, 8))}]
    maps = diag.plot_expert_maps({"moe": layers, "moge": layers}, (2, 4), str(tmp_path / "maps.png"))
    curve = {"train_steps": [1, 2], "train_loss": [2.0, 1.5], "eval_steps": [2], "eval_metric": [0.3]}
    curves = diag.plot_learning_curves({"moe": [curve, curve]}, str(tmp_path / "curves.png"))
    bars = diag.plot_diagnostics({"moe": {"a": [1.0, 2.0]}, "moge": {"a": [1.5]}}, ["a", "b"], str(tmp_path / "d.png"))
    for path in (maps, curves, bars):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the comparison script -----------------------------------------------------------------------------------------


def load_script():
    spec = importlib.util.spec_from_file_location("compare_moe_moge", ROOT / "scripts" / "compare_moe_moge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_parquet(path: Path, count: int, seed: int) -> str:
    datasets = pytest.importorskip("datasets")
    Image = pytest.importorskip("PIL.Image")  # decoding image data sets needs Pillow

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]
    data = datasets.Dataset.from_dict({"img": images, "label": rng.integers(0, 3, count).tolist()})
    data.cast_column("img", datasets.Image()).to_parquet(str(path))
    return str(path)


SMALL = "--max_steps 3 --eval_every 2 --eval_examples 8 --diagnostic_examples 8 --batch_size 8 --eval_batch_size 8"
SMALL = [*SMALL.split(), "--seeds", "0", "--do_test", "--logging_steps", "1"]


def check_outputs(results: dict, out: Path, arms: list[str]):
    saved = json.loads((out / "results.json").read_text())
    assert [run["arm"] for run in saved["runs"]] == arms
    assert set(saved["summary"]) == set(arms)
    for run in saved["runs"]:
        assert run["curve"]["eval_steps"] == [2, 3] and len(run["curve"]["train_loss"]) == 3
        assert run["diagnostics"]["layers"] and run["invariance"]
        assert "test" in run and "validation" in run
    assert results["table_markdown"].count("\n") == 2 * len(arms) + 1 + (len(arms) - 1 if "moe" in arms else 0)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("expert_maps_seed0.png", "learning_curves.png", "diagnostics.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_compare_script_vision_smoke(tmp_path):
    script = load_script()
    train = tiny_parquet(tmp_path / "train.parquet", 48, 0)
    test = tiny_parquet(tmp_path / "test.parquet", 16, 1)
    out = tmp_path / "vision"
    args = ["--task", "vision", "--train_file", train, "--test_file", test, "--output_dir", str(out)]
    args += ["--validation_size", "8", "--train_size", "32", "--hidden_size", "32", "--num_layers", "2"]
    results = script.main(args + SMALL)
    check_outputs(results, out, ["moe", "moge-valid", "moge-circular"])
    moe, valid, circular = results["runs"]
    assert moe["diagnostics"]["padding"] == "valid" and circular["diagnostics"]["padding"] == "circular"
    assert len(circular["diagnostics"]["layers"][0]["load"]) == 32  # the paper setup: 32 experts on a 4x8 map
    assert results["data_sizes"] == {"train": 32, "validation": 8, "test": 16}


def test_compare_script_takes_the_number_of_experts_and_reports_how_sharp_the_routing_is(tmp_path):
    script = load_script()
    train = tiny_parquet(tmp_path / "train.parquet", 48, 0)
    test = tiny_parquet(tmp_path / "test.parquet", 16, 1)
    args = ["--task", "vision", "--train_file", train, "--test_file", test, "--output_dir", str(tmp_path / "v")]
    args += ["--validation_size", "8", "--train_size", "32", "--hidden_size", "32", "--num_layers", "2"]
    args += ["--num_experts", "8", "--num_experts_per_tok", "2", "--moge_window", "2"]
    results = script.main(args + SMALL)
    for run in results["runs"]:
        layers = run["diagnostics"]["layers"]
        assert len(layers[0]["load"]) == 8 and run["diagnostics"]["map_shape"] == [2, 4]  # the most square map
        scalars = script.run_scalars(script.StudyArguments(task="vision"), run)
        assert 1 / 8 <= scalars["top1_prob"] <= 1.0
        assert scalars["top1_prob"] == pytest.approx(np.mean([layer["top1_prob"] for layer in layers]))


def test_compare_script_language_smoke(tmp_path):
    script = load_script()
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 80)
    out = tmp_path / "language"
    args = ["--task", "language", "--train_file", str(text), "--output_dir", str(out), "--block_size", "16"]
    args += ["--moge_loss_coefs", "0.001", "0.01", "--paddings", "valid", "--hidden_size", "32", "--num_layers", "2"]
    results = script.main(args + SMALL)
    check_outputs(results, out, ["moe", "moge-l0.001-valid", "moge-l0.01-valid"])
    assert results["runs"][1]["log_history"][0]["moge/sigma"] == pytest.approx(10.0)  # the sigma schedule is on
    assert "context_replacement" in results["runs"][0]["invariance"]


def test_compare_script_sizes_the_classifier_from_training_labels_and_builds_one_layer_models(tmp_path):
    script = load_script()
    train = tiny_parquet(tmp_path / "train.parquet", 48, 0)  # labels 0..2
    test = tmp_path / "test.parquet"
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_parquet(tiny_parquet(tmp_path / "t.parquet", 8, 1))
    table.map(lambda row: {"label": 7}).to_parquet(str(test))  # a label the training data never has
    args = ["--task", "vision", "--train_file", train, "--test_file", str(test), "--output_dir", str(tmp_path / "o")]
    args += ["--validation_size", "8", "--train_size", "32", "--hidden_size", "32", "--num_layers", "1"]
    with pytest.raises(ValueError, match="the test file has label 7"):
        script.main(args + SMALL)
    parser = script.HfArgumentParser((script.StudyArguments, script.TrainArguments, script.ModelArguments))
    for task, setup in (("vision", "paper"), ("vision", "top2"), ("language", "paper")):
        study, train_args, model_args = parser.parse_args_into_dataclasses(args=[*args, "--vision_setup", setup])
        study.task = task
        script.apply_preset(study, train_args, model_args)
        arm = script.Arm(name="moge", moge_loss_coef=0.01, padding="circular", sigma_schedule=None)
        model = script.build_model(study, model_args, arm, {"num_labels": 3, "vocab_size": 50})
        assert model.config.moe_layers == [0]


def test_compare_script_rejects_bad_arms():
    script = load_script()
    with pytest.raises(ValueError, match="lambdas"):
        script.main(["--task", "language", "--train_file", "x", "--moge_loss_coefs", "0"])


def test_compare_script_trains_the_moe_baseline_alone_or_refuses_no_arm():
    script = load_script()
    study = script.StudyArguments(task="language", moge_loss_coefs=["0.001"], paddings=["valid"], include_moge=False)
    study.sigma_schedules = ["10,1,0.2"]
    assert [arm.name for arm in script.build_arms(study)] == ["moe"]
    study.include_moe = False
    with pytest.raises(ValueError, match="no arm"):
        script.build_arms(study)


def test_compare_script_merges_seeds_run_apart_like_one_run(tmp_path):
    script = load_script()
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 80)
    args = ["--task", "language", "--train_file", str(text), "--block_size", "16", "--moge_loss_coefs", "0.01"]
    args += ["--paddings", "valid", "--hidden_size", "32", "--num_layers", "2", "--no_write_plots"]
    args += [*SMALL[: SMALL.index("--seeds")], "--logging_steps", "1"]
    together = script.main([*args, "--seeds", "0", "1", "--output_dir", str(tmp_path / "both")])
    for seed in ("0", "1"):
        script.main([*args, "--seeds", seed, "--output_dir", str(tmp_path / seed)])
    files = [str(tmp_path / seed / "results.json") for seed in ("0", "1")]
    merged = script.main(["--merge_from", *files, "--output_dir", str(tmp_path / "merged"), "--no_write_plots"])
    assert json.loads((tmp_path / "merged" / "results.json").read_text())["merged_from"] == files
    assert merged["study"]["seeds"] == [0, 1]
    for arm in ("moe", "moge-valid"):
        for key in ("val_loss", "load_entropy"):
            want, got = together["summary"][arm].get(key), merged["summary"][arm].get(key)
            assert want is not None and got["values"] == pytest.approx(want["values"], rel=1e-5)
    with pytest.raises(ValueError, match="seed 0 is in both"):
        script.main(["--merge_from", files[0], files[0], "--output_dir", str(tmp_path / "bad")])
    other = script.main([*args, "--seeds", "2", "--learning_rate", "0.5", "--output_dir", str(tmp_path / "other")])
    assert other["runs"]
    with pytest.raises(ValueError, match="learning_rate"):
        script.main(
            ["--merge_from", files[0], str(tmp_path / "other" / "results.json"), "--output_dir", str(tmp_path / "x")]
        )


def test_student_t_quantiles_match_the_tables():
    script = load_script()
    table = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 9: 2.262157, 29: 2.045230, 1000: 1.962339}
    for dof, value in table.items():
        assert script.student_t_quantile(0.975, dof) == pytest.approx(value, abs=2e-6)
    assert script.student_t_quantile(0.995, 2) == pytest.approx(9.924843, abs=2e-6)
    with pytest.raises(ValueError, match="dof"):
        script.student_t_quantile(0.975, 0)


def load_gap_script():
    spec = importlib.util.spec_from_file_location("gap_vs_experts", ROOT / "scripts" / "gap_vs_experts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gap_study_chooses_on_validation_tests_other_seeds_resumes_and_reports_paired_intervals(tmp_path, capsys):
    gap = load_gap_script()
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 80)
    out = tmp_path / "study"
    tiny = ["--train_file", str(text), "--block_size", "16", "--hidden_size", "32", "--num_layers", "2"]
    tiny += ["--moge_window", "2", "--max_steps", "4", "--eval_every", "2", "--eval_examples", "8"]
    tiny += ["--diagnostic_examples", "8", "--batch_size", "8", "--eval_batch_size", "8", "--learning_rate", "0.01"]
    tiny += ["--logging_steps", "1"]
    # The candidates come in an order where the first is not the best on these data (the default aux is 0.01).
    study = ["--task", "language", "--num_experts", "4", "--num_experts_per_tok", "2", "--moe_aux_coefs", "2.0"]
    study += ["0.02", "--moge_loss_coefs", "3.0", "0.01", "--final_seeds", "1", "2", "--output_dir", str(out)]
    gap.main([*study, "--", *tiny])

    def job(name):
        return json.loads((out / "e4" / name / "results.json").read_text())

    def validation(name):
        (run,) = job(name)["runs"]
        assert "test" not in run and run["seed"] == 0  # probes: the probe seed, validation only
        return run["validation"]["loss"]

    aux = min((2.0, 0.02), key=lambda c: validation(f"probe_moe_aux{c:g}"))
    coef = min((3.0, 0.01), key=lambda c: validation(f"probe_moge_l{c:g}"))
    assert (aux, coef) == (0.02, 0.01)  # so a choice of the first candidate would be caught
    selection = json.loads((out / "e4" / "selection.json").read_text())
    assert (selection["aux"], selection["moge_loss_coef"]) == (aux, coef)
    for name in ("probe_moge_l3", "probe_moge_l0.01", "final_moe_seed1", "final_moge_seed2"):
        assert job(name)["model"]["router_aux_loss_coef"] == aux  # MoGE probes and finals: the chosen baseline
    merged = json.loads((out / "e4" / "final" / "results.json").read_text())
    assert {(run["arm"], run["seed"]) for run in merged["runs"]} == {
        (a, s) for a in ("moe", "moge-circular") for s in (1, 2)
    }
    assert [arm["moge_loss_coef"] for arm in merged["arms"]] == [0.0, coef]
    assert all(run["diagnostics"]["padding"] == "circular" for run in merged["runs"])
    want = []
    for seed in (1, 2):
        (moe,) = job(f"final_moe_seed{seed}")["runs"]
        (moge,) = job(f"final_moge_seed{seed}")["runs"]
        assert moe["test"]["loss"] != moge["test"]["loss"]
        want.append(moge["test"]["loss"] - moe["test"]["loss"])
    paired = merged["paired"]["moge-circular"]["test_loss"]
    assert paired["seeds"] == [1, 2] and paired["differences"] == pytest.approx(want)
    half = 12.706205 * np.std(want, ddof=1) / math.sqrt(2)
    assert paired["ci95"] == pytest.approx([np.mean(want) - half, np.mean(want) + half])

    # Running the same command again resumes: nothing is trained twice.
    stamps = {path: path.stat().st_mtime for path in out.glob("e4/*/job.json")}
    assert len(stamps) == 2 + 2 + 4
    capsys.readouterr()
    gap.main([*study, "--", *tiny])
    assert "start" not in capsys.readouterr().out
    assert {path: path.stat().st_mtime for path in out.glob("e4/*/job.json")} == stamps
    other = list(study)
    other[other.index("--moge_loss_coefs") + 1] = "0.02"
    with pytest.raises(ValueError, match="moge_loss_coefs"):
        gap.main([*other, "--", *tiny])

    report = gap.main(["--report", str(out), "--output_dir", str(tmp_path / "report")])
    (entry,) = report["studies"][0]["settings"]
    assert entry["complete"] and entry["paired"]["test_loss"]["differences"] == pytest.approx(want)
    assert set(entry["wall_seconds"]) == {path.parent.name for path in stamps}
    assert "| language | 2 | 4 |" in report["table_markdown"]
    assert report["studies"][0]["trend"] == {"val": None, "test": None}  # one E: no slope
    moe_mi = np.mean(
        [run_["diagnostics"]["layers"][0]["mi_token_bits"] for run_ in merged["runs"] if run_["arm"] == "moe"]
    )
    assert f"| language | 2 | 4 | mi_token_bits | {moe_mi:.4f} |" in report["diagnostics_markdown"]
    saved = json.loads((tmp_path / "report" / "gap.json").read_text())
    assert saved["studies"][0]["settings"][0]["moge_loss_coef"] == coef
    curve = entry["entropy_curves"]["moe"]
    assert curve["steps"] == [1, 2, 3, 4] and all(0 < value <= 1 for value in curve["entropy_over_log_e"])
    if importlib.util.find_spec("matplotlib"):
        for name in ("gap_vs_experts.png", "routing_entropy_vs_step.png"):
            assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"

    # The archived copy (results.json gzipped, as in docs/) reports the same.
    archive = tmp_path / "archive"
    (out / "e4" / "running_job").mkdir()
    (out / "e4" / "running_job" / "results.json").write_text('{"runs": []}')  # no table yet: not finished
    gap.main(["--archive", str(out), "--output_dir", str(archive)])
    assert not (archive / "e4" / "running_job").exists()
    assert not list(archive.rglob("results.json")) and not list(archive.rglob("log.txt"))
    assert len(list(archive.glob("e4/*/results.json.gz"))) == 2 + 2 + 4 + 1
    assert json.loads(gzip.decompress((archive / "e4/final/results.json.gz").read_bytes())) == merged
    again = gap.main(["--report", str(archive), "--output_dir", str(tmp_path / "report2")])
    assert again["studies"][0]["settings"][0]["paired"] == entry["paired"]

    # A job that fails stops the study with the path of its log.
    with pytest.raises(RuntimeError, match="log.txt"):
        gap.main([*study[:-1], str(tmp_path / "broken"), "--", *tiny, "--tokenizer", "nope"])
    # One driver per study folder.
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another gap_vs_experts.py"):
            gap.main([*study, "--", *tiny])


def test_gap_study_stopped_with_kill_stops_its_jobs(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 80)
    out = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "scripts" / "gap_vs_experts.py"), "--task", "language", "--num_experts", "4"]
    command += ["--num_experts_per_tok", "2", "--output_dir", str(out), "--", "--train_file", str(text)]
    command += ["--block_size", "16", "--hidden_size", "32", "--num_layers", "2", "--moge_window", "2"]
    command += ["--max_steps", "100000", "--batch_size", "8"]  # runs until stopped
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "start" in driver.stdout.readline()
    time.sleep(1)
    driver.terminate()
    output = driver.communicate(timeout=60)[0]
    assert driver.returncode == 128 + signal.SIGTERM and "stopped" in output
    time.sleep(1)
    jobs = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert jobs == [], f"jobs left running: {jobs}"


def test_gap_study_refuses_unfair_or_ambiguous_settings_and_never_chooses_a_diverged_probe(tmp_path):
    gap = load_gap_script()
    study = ["--task", "vision", "--num_experts", "8", "--num_experts_per_tok", "1", "--output_dir", str(tmp_path)]
    for extra, message in [
        (["--moe_aux_coefs", "0.01", "0.1"], "as many"),  # 2 MoE probes against 3 MoGE ones
        (["--moe_aux_coefs", "0.01", "0.01", "0.1"], "repeated"),
        (["--moge_loss_coefs", "0.001", "0.0010000001", "0.1"], "repeated"),  # one folder name for two lambdas
        (["--final_seeds", "1", "1", "2"], "repeated"),
        (["--final_seeds", "0", "1", "2"], "probe_seed"),
        (["--workers", "0"], "workers"),
        (["--", "--seeds", "1"], "--seeds"),  # would override the probe seed
        (["--", "--do_test=True"], "--do_test"),  # would put the test split into the probes
        (["--", "--router_aux_loss_coef", "0.5"], "--router_aux_loss_coef"),
    ]:
        assert message in refusal(gap, [*study, *extra])

    def probe(loss):
        return {"study": {"task": "language"}, "runs": [{"validation": {"loss": loss}}]}

    assert gap.best([(0.001, probe(float("nan"))), (0.01, probe(2.5)), (0.1, probe(2.0))])[0] == 0.1
    assert gap.best([(0.01, probe(2.0)), (0.1, probe(2.0))])[0] == 0.01  # a tie: the first
    with pytest.raises(ValueError, match="diverged"):
        gap.best([(0.01, probe(float("inf"))), (0.1, probe(float("nan")))])
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "results.json").write_text('{"table_markdown": "half wri')  # being written
    assert gap.finished(str(tmp_path / "job")) is None


def test_gap_trend_is_the_least_squares_slope_per_doubling_of_experts_with_its_t_interval():
    gap = load_gap_script()
    differences = {8: [-0.009, -0.003, -0.0005], 32: [0.0067, -0.0033, -0.005], 128: [0.0001, 0.0003, 0.004]}

    def setting(num_experts, values, complete=True):
        paired = {"test_accuracy": {"differences": values}} if complete else {}
        return {"num_experts": num_experts, "complete": complete, "metric": "accuracy", "paired": paired}

    study = {"settings": [setting(e, v) for e, v in differences.items()] + [setting(512, [], complete=False)]}
    x = np.repeat(np.log2(list(differences)), 3)
    y = np.concatenate(list(differences.values()))
    (slope, _), cov = np.polyfit(x, y, 1, cov=True)  # cov scaled by the residual variance over n - 2
    half = 2.364624 * math.sqrt(cov[0, 0])  # Student's t, 97.5%, 7 degrees of freedom (tables)
    got = gap.trend(study, "test")
    assert got["pairs"] == 9 and got["dof"] == 7
    assert got["slope_per_doubling"] == pytest.approx(slope, rel=1e-9)
    assert got["ci95"] == pytest.approx([slope - half, slope + half], rel=1e-5)
    assert gap.trend(study, "val") is None  # no validation differences recorded
    assert gap.trend({"settings": [setting(8, [0.1, 0.2, 0.3])]}, "test") is None  # one E: no slope


def refusal(gap, argv: list[str]) -> str:
    """What `parse_args` prints to stderr as it refuses `argv` (it must)."""
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream), pytest.raises(SystemExit):
        gap.parse_args(argv)
    return stream.getvalue()


@pytest.mark.parametrize("case", list(CASES))
def test_diagnostics_and_expert_maps_read_every_model_of_the_table(case, tmp_path):
    """moge_hf's models and transformers' MoE models (given `add_moge_regularizer`) alike: the collected routing is
    the model's own, the diagnostics cover every MoE layer, and each expert's output comes from the experts'
    forward."""
    spec = CASES[case]
    moge = dict(moge_map_shape=[2, 4], moge_window=2)
    model = (spec.build(**moge) if spec.moge_hf else add_moge_regularizer(spec.build(), **moge)).eval()
    inputs = spec.batch(seed=5)
    data = diag.collect_routing(model, [inputs], hidden_tokens_per_batch=6)
    with torch.no_grad():
        own = model(**{k: v for k, v in inputs.items() if k != "labels"}, output_router_logits=True)
    taps = moge_routers(model)
    top_k = model.config.num_experts_per_tok
    assert data.layers == [int(tap.name.removeprefix("layer")) for tap in taps] and len(data.layers) >= 1
    assert data.map_shape == (2, 4) and data.num_experts == 8 and data.top_k == top_k
    if "attention_mask" in inputs:
        assert data.token_mask.tolist() == (inputs["attention_mask"].reshape(-1) != 0).tolist()
    assert len(own.router_logits) == len(taps)
    for layer, logits in enumerate(own.router_logits):
        probs = logits.float().softmax(-1)
        torch.testing.assert_close(torch.from_numpy(data.probs[layer]), probs)
        assert (data.top_k_index[layer] == probs.topk(top_k, dim=-1).indices.numpy()).all()
        assert data.hidden[layer].shape == (6, taps[layer].module.weight.shape[-1])  # the router's input width
    widths = [tap.module.weight.shape[-1] for tap in taps]
    assert [hidden.shape for hidden in diag.collect_routing(model, [inputs]).hidden] == [(0, w) for w in widths]
    stats = diag.routing_diagnostics(model, data)
    assert [entry["layer"] for entry in stats["layers"]] == data.layers
    for entry in stats["layers"]:
        assert sum(entry["load"]) == pytest.approx(1.0)
        assert "output_cosine_mean" in entry and "weight_cosine_mean" in entry

    # Each expert's output, from the experts' own forward: the routed combination is what the layer computes.
    experts = taps[0].experts
    hidden = torch.randn(5, taps[0].module.weight.shape[-1])
    per_expert = diag.all_expert_outputs(experts, hidden)  # (E, T, d)
    index = torch.tensor([[0, 3], [1, 2], [7, 4], [5, 6], [2, 0]])
    weights = torch.rand(5, 2)
    combined = (per_expert[index.T, torch.arange(5)] * weights.T[..., None]).sum(0)
    with torch.no_grad():
        torch.testing.assert_close(combined, experts(hidden, index, weights).float(), rtol=1e-5, atol=1e-6)
    if importlib.util.find_spec("matplotlib"):
        path = diag.plot_expert_maps({"MoGE": stats["layers"]}, stats["map_shape"], str(tmp_path / "maps.png"))
        assert os.path.getsize(path) > 0
