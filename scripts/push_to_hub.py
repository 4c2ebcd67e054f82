"""Push a saved MoGE model to the Hugging Face Hub, with its code and a MoGE model card, so that it loads anywhere
with `trust_remote_code=True` and no moge_hf installed.

    python scripts/push_to_hub.py --model-dir out/gpt2-moge --repo-id me/gpt2-moge --dataset karpathy/tiny_shakespeare
    python scripts/push_to_hub.py --model-dir out/gpt2-moge --repo-id me/gpt2-moge --dry-run /tmp/upload  # no upload

The folder uploaded holds the safetensors weights, `config.json` (with its `auto_map`), the code files, the tokenizer
or image processor files if the model folder has them, and `README.md` (the card). The card's metrics come from
`--results` (default: the `all_results.json` or `eval_results.json` that Trainer saved in the model folder, if any);
without results the card says that none were measured. Pushing needs a token: `hf auth login`, or `HF_TOKEN`.
"""

import argparse
import sys
from pathlib import Path

from moge_hf.hub import HubTokenError, find_results_file, prepare_upload_folder, push_model_dir


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
    parser.add_argument("--dataset", action="append", help="Hub id of the training / evaluation dataset (repeatable)")
    parser.add_argument("--dataset-config", help="config name of the (first) dataset")
    parser.add_argument(
        "--eval-split",
        default="validation",
        help="the split of --dataset the eval_* metrics were measured on, whole; 'none' when they were measured on "
        "anything else (a held-out part of the train split, local files, a subset): the card then has no model-index",
    )
    parser.add_argument("--eval-data", help="what the eval_* metrics were measured on, in words, for the card's text")
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
    card_kwargs = dict(
        results=results,
        dataset=args.dataset[0] if args.dataset and len(args.dataset) == 1 else args.dataset,
        dataset_config=args.dataset_config,
        eval_split=None if args.eval_split.lower() == "none" else args.eval_split,
        eval_data=args.eval_data,
        base_model=args.base_model,
        license=args.license,
        language=args.language,
        tags=args.tags,
    )
    try:
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
    except (ValueError, FileNotFoundError, HubTokenError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.model_dir} to https://huggingface.co/{args.repo_id} ({commit.commit_url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
