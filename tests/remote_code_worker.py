"""Child process of tests/test_remote_code.py, run by whichever Python (and so transformers) a test names.

    python remote_code_worker.py save <case> <folder> <result.pt>       # with moge_hf: build, save_pretrained, compute
    python remote_code_worker.py load <auto_class> <folder> <result.pt> # without moge_hf: trust_remote_code, compute

`save` writes a tiny seeded model of `<case>` (see CASES) and the inputs (`<folder>/inputs.pt`); `load` blocks
`import moge_hf` and loads the folder through `transformers.<auto_class>` with `trust_remote_code=True`. Both run the
inputs through the model (and, for a causal LM, greedy generation with the KV cache) and save what they computed.
"""

import sys


def compute(model, inputs: dict) -> dict:
    import torch
    import transformers

    with torch.no_grad():
        outputs = model(**inputs)
        result = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "transformers": transformers.__version__,
            "outputs": {name: value for name, value in outputs.items() if isinstance(value, torch.Tensor)},
        }
        if model.can_generate():
            ids = inputs["input_ids"]
            result["generated"] = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
            )
    return result


def save(case: str, folder: str, result_path: str) -> None:
    import torch
    from tiny import gpt2_config, input_ids, pixel_values, vit_config

    from moge_hf import GPT2MoGELMHeadModel, ViTMoGEForImageClassification

    model_class, config, inputs = {
        "gpt2-lm": (GPT2MoGELMHeadModel, gpt2_config, lambda: {"input_ids": input_ids(seed=3, batch=2, seq=6)}),
        "vit-cls": (ViTMoGEForImageClassification, vit_config, lambda: {"pixel_values": pixel_values(seed=3)}),
    }[case]
    torch.manual_seed(0)
    model = model_class(config()).eval()
    model.save_pretrained(folder)
    inputs = inputs()
    torch.save(inputs, f"{folder}/inputs.pt")
    torch.save(compute(model, inputs), result_path)


def load(auto_class: str, folder: str, result_path: str) -> None:
    sys.modules["moge_hf"] = None  # any `import moge_hf` now raises ImportError
    import torch
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    torch.save(compute(model, torch.load(f"{folder}/inputs.pt")), result_path)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"save": save, "load": load}[command](*args)
