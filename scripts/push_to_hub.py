"""Push a saved MoGE model to the Hugging Face Hub, with its code and a MoGE model card, so that it loads anywhere
with `trust_remote_code=True` and no moge_hf installed.

    python scripts/push_to_hub.py --model-dir out/gpt2-moge --repo-id me/gpt2-moge
    python scripts/push_to_hub.py --model-dir out/gpt2-moge --repo-id me/gpt2-moge --dry-run /tmp/upload  # no upload

The folder uploaded holds the safetensors weights, `config.json` (with its `auto_map`), the code files, the tokenizer
or image processor files if the model folder has them, the run record and `README.md` (the card). The card's metrics
come from `--results` (default: the `all_results.json` or `eval_results.json` that Trainer saved in the model folder,
if any); without results the card says that none were measured. What the model was trained and evaluated on comes
from the run record that the training scripts write into the model folder (`run_record.json`): its data sets, splits
and numbers of examples, and the card's `model-index` (only for a Hub split evaluated on whole). `--dataset`,
`--dataset-config` and `--eval-split` that contradict the record are refused; for a folder without a record they
state the data instead (no `--eval-split`: no Hub split is claimed). Pushing needs a token: `hf auth login`, or
`HF_TOKEN`.
"""

import argparse
import sys
from pathlib import Path

from moge_hf.hub import HubTokenError, find_results_file, prepare_upload_folder, push_model_dir
from moge_hf.run_record import check_against_run_record, find_run_record, load_run_record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model-dir", required=True, help="folder the MoGE model was saved to (save_pretrained)")
    parser.add_argument("--repo-id", required=True, help="Hub repo to push to, e.g. me/gpt2-moge")
    parser.add_argument("--private", action="store_true", help="create the repo private (no effect if it exists)")
    parser.add_argument(
        "--dry-run", metavar="OUT", help="write the folder that would be uploaded to OUT; upload nothing"
    )
    results = parser.add_mutually_exclusive_group()
    results.add_argument(
        "--results",
        metavar="JSON",
        help="metrics of the run for the card (default: all_results.json / eval_results.json in --model-dir)",
    )
    results.add_argument("--no-results", action="store_true", help="card without results, even if the folder has some")
    data = parser.add_argument_group(
        "data",
        "What the model was trained and evaluated on, for a model folder without a run record (run_record.json, "
        "which the training scripts write); with one, these must agree with it.",
    )
    data.add_argument("--dataset", action="append", help="Hub id of the training dataset (repeatable)")
    data.add_argument("--dataset-config", help="config name of the (first) dataset")
    data.add_argument(
        "--eval-split",
        help="the split of the (first) --dataset that the eval_* metrics were measured on, whole (default: none is "
        "claimed, and the card has no model-index); 'none': they were measured on anything else",
    )
    data.add_argument("--eval-data", help="what the eval_* metrics were measured on, in words, for the card's text")
    parser.add_argument("--base-model", help="Hub id of the model this one was initialized from (e.g. upcycled)")
    parser.add_argument("--license", default="apache-2.0", help="license id of the weights (default: apache-2.0)")
    parser.add_argument("--language", action="append", help="language code of the training text (repeatable)")
    parser.add_argument("--tag", action="append", dest="tags", help="extra tag for the card (repeatable)")
    parser.add_argument("--commit-message", default="Upload MoGE model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_results:
        results = None
    elif args.results is not None:
        results = args.results
    else:
        results = find_results_file(args.model_dir) if Path(args.model_dir).is_dir() else None
    if results is not None:
        print(f"results for the card: {results}")
    else:
        print("no results given: the card will say that results were not measured")
    data_arguments = dict(
        dataset=args.dataset[0] if args.dataset and len(args.dataset) == 1 else args.dataset,
        dataset_config=args.dataset_config,
        eval_split=args.eval_split,
        eval_data=args.eval_data,
    )
    card_kwargs = dict(
        results=results,
        **data_arguments,
        base_model=args.base_model,
        license=args.license,
        language=args.language,
        tags=args.tags,
    )
    try:
        record_path = find_run_record(args.model_dir) if Path(args.model_dir).is_dir() else None
        if record_path is not None:
            print(f"run record for the card: {record_path}")
            flags = {name: "--" + name.replace("_", "-") for name in data_arguments}  # the flags, for the message
            check_against_run_record(
                load_run_record(record_path), **data_arguments, names=flags, source=f"the run record {record_path}"
            )
        elif args.dataset or args.eval_data:
            print("no run record in the model folder: the card states the data given by --dataset / --eval-data")
        else:
            print("no run record in the model folder: the card will say that the data were not recorded")
        if args.dry_run:
            files = prepare_upload_folder(args.model_dir, args.dry_run, repo_id=args.repo_id, **card_kwargs)
            print(f"dry run, nothing uploaded: the {len(files)} files to upload are in {args.dry_run}:")
            for name in files:
                print(f"  {name}")
            return 0
        commit = push_model_dir(
            args.model_dir,
            args.repo_id,
            private=True if args.private else None,
            commit_message=args.commit_message,
            **card_kwargs,
        )
    except (ValueError, OSError, HubTokenError) as error:  # OSError: a missing file, the Hub unreachable or refusing
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.model_dir} to https://huggingface.co/{args.repo_id} ({commit.commit_url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
