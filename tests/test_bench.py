"""scripts/bench_moge.py runs every mode end to end on tiny shapes (what it measures is not checked here: timings
do not belong in tests; docs/PERFORMANCE.md has the numbers)."""

import importlib.util
import json
import pathlib

import pytest
import torch
import transformers


SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_moge.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_moge", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# DeepSeek-V3 only where the installed transformers records its router logits (5.17 declares none for it).
HF_FAMILIES = ["qwen3_moe"]
if "router_logits" in (getattr(transformers.DeepseekV3ForCausalLM, "_can_record_outputs", None) or {}):
    HF_FAMILIES.append("deepseek_v3")
TINY = ["--device", "cpu", "--warmup", "0", "--reps", "2", "--num_experts", "4", "--top_k", "2", "--tokens", "40"]


def test_block_mode_times_every_path_or_says_why_not(bench, tmp_path, capsys):
    out = tmp_path / "blocks.json"
    bench.main([*TINY, "--hidden", "32", "--intermediate", "64", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [case["backward"] for case in report["blocks"]] == [False, True]
    for case in report["blocks"]:
        assert set(case["ms"]) | set(case["errors"]) == set(bench.PATHS)
        assert all(ms > 0 for ms in case["ms"].values())
        assert {"dense", "hf_loop", "grouped_mm", "eager"} <= set(case["ms"]), case["errors"]
    printed = capsys.readouterr().out
    assert "ratio to the dense-equivalent MLP" in printed and "custom" in printed


def test_step_mode_compares_lambda_zero_with_lambda_positive(bench, tmp_path, capsys):
    out = tmp_path / "step.json"
    step = ["--step", "--step_hidden", "64", "--step_layers", "2", "--step_batch", "2", "--step_seq", "16"]
    bench.main([*TINY, *step, "--step_vocab", "50", "--paths", "hf_loop", "eager", "--json", str(out)])
    results = json.loads(out.read_text())["step"]
    names = ["hf_loop lambda=0", "hf_loop lambda=0.01", "eager lambda=0", "eager lambda=0.01"]
    assert [result["name"] for result in results] == names
    assert all(result["tokens_per_s"] > 0 for result in results)
    assert "1.000x lambda=0" in capsys.readouterr().out


def test_step_mode_pairs_both_lambdas_on_one_model_whose_weights_stay_put(bench):
    args = bench.parse_args([*TINY, "--step", "--step_hidden", "64", "--step_layers", "2", "--step_vocab", "50"])
    args.step_batch, args.step_seq = 2, 16
    model, steps = bench.make_train_steps(args, torch.device("cpu"), torch.float32, "eager", False, (0.0, 0.01))
    before = [p.detach().clone() for p in model.parameters()]
    for coef, step in steps.items():
        step()
        assert model.config.moge_loss_coef == coef
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # so both lambdas route the same tokens alike


HF_TINY = ["--step_hidden", "64", "--step_layers", "2", "--step_batch", "2", "--step_seq", "16", "--step_vocab", "50"]


def test_hf_step_mode_times_plain_and_regularized_steps_per_family_and_num_experts(bench, tmp_path, capsys):
    out = tmp_path / "hf_step.json"
    families = HF_FAMILIES
    bench.main([*TINY, "--hf_step", *families, "--num_experts", "4", "8", *HF_TINY, "--json", str(out)])
    results = json.loads(out.read_text())["hf_step"]
    assert [(result["family"], result["num_experts"]) for result in results] == [
        (family, num_experts) for family in families for num_experts in (4, 8)
    ]
    for result in results:
        assert "error" not in result, result["error"]
        plain, moge = result["plain"], result["moge"]
        assert plain["steps_run"] == moge["steps_run"] == 1 + 0 + 2  # a first step, no warm-up, 2 timed rounds
        assert plain["tokens_per_s"] > 0 and moge["tokens_per_s"] > 0
        assert result["ratio"] == pytest.approx(moge["ms"] / plain["ms"])
        assert plain["moge_loss"] is None and moge["moge_loss"] > 0  # only the regularized copy has the regularizer
        has_aux = result["family"] == "qwen3_moe"  # DeepSeek-V3 balances with a bias, not a loss
        assert (plain["aux_loss"] is not None) == (moge["aux_loss"] is not None) == has_aux
    printed = capsys.readouterr().out
    assert "plain (its own aux loss) vs + MoGE regularizer (lambda 0.01)" in printed
    assert printed.count("x  -") == 2 * len(HF_FAMILIES)  # a ratio per row (no peak memory on CPU)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_step_pairs_two_copies_that_differ_only_by_the_regularizer(bench, family):
    args = bench.parse_args([*TINY, "--hf_step", family, *HF_TINY])
    models, steps, record = bench.make_hf_train_steps(args, torch.device("cpu"), torch.float32, family, 8)
    plain, regularized = models["plain"], models["moge"]
    assert not hasattr(plain, "moge_regularizer") and plain.config.output_router_logits
    assert regularized.config.moge_loss_coef == 0.01
    before = [p.detach().clone() for p in plain.parameters()]
    for _ in range(2):
        for step in steps.values():
            step()
    assert record["runs"] == {"plain": 2, "moge": 2}
    for p, q, r in zip(before, plain.parameters(), regularized.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)  # AdamW at lr 0: the weights stay put, in both copies
        torch.testing.assert_close(r, p, rtol=0, atol=0)  # ... and equal, so both copies route alike
    plain_losses, moge_losses = record["output"]["plain"], record["output"]["moge"]
    assert plain_losses["moge_loss"] is None
    # The regularized loss is the plain one (its own aux loss included) plus lambda times the regularizer.
    want = plain_losses["loss"] + 0.01 * moge_losses["moge_loss"]
    torch.testing.assert_close(moge_losses["loss"], want, rtol=1e-5, atol=1e-6)


def test_regularizer_mode_checks_both_forms_agree(bench, tmp_path):
    out = tmp_path / "regularizer.json"
    bench.main([*TINY, "--regularizer", "--num_experts", "16", "32", "--json", str(out)])
    results = json.loads(out.read_text())["regularizer"]
    assert [result["num_experts"] for result in results] == [16, 32]


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--hidden", "32"])  # without --intermediate
    with pytest.raises(SystemExit):
        bench.parse_args(["--moge_loss_coef", "0"])
