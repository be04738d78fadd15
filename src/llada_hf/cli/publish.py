"""`llada-hf publish PATH REPO_ID`: upload a saved model or adapter folder to the Hub in one commit."""

import argparse

from ..hub_card import publish_folder


def run(args: argparse.Namespace) -> None:
    """Upload (or, with `--dry-run`, only list) the folder's files and its rendered card."""
    result = publish_folder(args.path, args.repo_id, base_model=args.base_model,
                            private=True if args.private else None, dry_run=args.dry_run)
    print("\n".join(result.files))
    print(result.commit_url or "dry run: nothing was uploaded")
