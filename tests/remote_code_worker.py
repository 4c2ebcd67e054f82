"""Child process of tests/test_remote_code.py, run by whichever Python (and so transformers) a test names.

    python remote_code_worker.py save <case> <folder> <result.pt>       # with moge_hf: build, save_pretrained, compute
    python remote_code_worker.py load <auto_class> <folder> <result.pt> # without moge_hf: trust_remote_code, compute

`save` writes a tiny seeded model of `<case>` (a name in the tests' table, `tiny.CASES`) and the inputs
(`<folder>/inputs.pt`); `load` blocks
`import moge_hf` and loads the folder through `transformers.<auto_class>` with `trust_remote_code=True` (a MoGE
folder's own code, or a native folder's transformers class). Both run the inputs through the model (and, for a causal
LM, greedy generation with the KV cache) and save what they computed.
"""

import json
import sys
from pathlib import Path


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
    from tiny import CASES

    model = CASES[case].build().eval()
    model.save_pretrained(folder)
    inputs = {key: value for key, value in CASES[case].inputs(seed=3).items() if key != "attention_mask"}  # no mask
    torch.save(inputs, f"{folder}/inputs.pt")
    torch.save(compute(model, inputs), result_path)


def load(auto_class: str, folder: str, result_path: str) -> None:
    sys.modules["moge_hf"] = None  # any `import moge_hf` now raises ImportError
    import torch
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
    # A MoGE folder runs its own code; a native one (an upcycled Mixtral, ...) transformers' own classes.
    native = "auto_map" not in json.loads(Path(folder, "config.json").read_text())
    expected = "transformers.models." if native else "transformers_modules."
    assert type(model).__module__.startswith(expected), type(model).__module__
    torch.save(compute(model, torch.load(f"{folder}/inputs.pt")), result_path)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"save": save, "load": load}[command](*args)
