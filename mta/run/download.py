"""Download the official LaMP files and build the processed layout the MTA code reads.

    mta download-lamp --tasks lamp4 lamp2 --out $LAMP_DIR
    mta download-lamp --tasks lamp1 --lamp1-citation-from abstract

1. Fetch <raw>/LaMP_<n>/<split>_{questions,outputs}.json for the user-based split
   (resumable, with progress; sha256 and size recorded in <raw>/checksums.json and
   checked on later runs).
2. Convert (mta.data.lamp_release.convert): every official question is one user;
   `--n-test` users drawn (seeded) among those with exactly 10 history items
   (LaMP-2/4), 50 (LaMP-1/5) or 100 (LaMP-3) become test users (Appendix B), all
   others bank candidates, disjoint:
       <out>/<task>/user_anchor_candidate.json
       <out>/<task>/test_100/test_100.json
   `--test-file` takes the test users from a given file instead (e.g. the authors'
   published test_100.json) and keeps their questions out of the candidates.
Nothing is written before all input is validated; outputs are written to temporary
files and renamed. Without network, put the official files under <raw> by hand
(same names) and rerun with --offline, or point LAMP_DIR at a directory already
in the processed layout.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mta.data.lamp import default_lamp_dir, get_task
from mta.data.lamp_release import CITATION_SOURCES, DEFAULT_SPLITS, FetchError, convert, fetch

CONVERTIBLE = ["movie_tagging", "product_rating", "news_headline", "scholarly_title"]
NO_CITATION = (
    "citation: official LaMP-1 profile items are papers {id, title, abstract}, but "
    "the paper's code trains on {title, citation} items (citation: the title of a "
    "paper the author cited) from the Per-Pcs/OPPU processed release, and no "
    "released code derives them from the official files. Pass "
    "--lamp1-citation-from abstract to build a stand-in from the release (not the "
    "paper's LaMP-1 data), --lamp1-citation-from keep if your copy's items already "
    "carry 'citation', or point LAMP_DIR at processed citation data instead."
)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--tasks", nargs="+", default=CONVERTIBLE, help="names or aliases lamp1..5")
    add("--out", type=Path, help="processed layout root (default: $LAMP_DIR)")
    add("--raw-dir", type=Path, help="official files (default: <out>/raw)")
    add("--splits", nargs="+", default=list(DEFAULT_SPLITS), help="with outputs")
    add("--n-test", type=int, default=100)
    add("--seed", type=int, default=0)
    add("--test-file", type=Path, help="take test users from this test_100.json")
    add(
        "--lamp1-citation-from",
        choices=[*CITATION_SOURCES, "keep"],
        help="LaMP-1: fill the items' missing 'citation' from this release field, "
        "or keep the items as they are (they must carry 'citation')",
    )
    add(
        "--keep-leaks",
        action="store_true",
        help="keep candidates whose history holds a test query's item with its gold",
    )
    add("--offline", action="store_true", help="use files under --raw-dir only")
    args = ap.parse_args(argv)
    if args.out is None and "LAMP_DIR" not in os.environ:
        ap.error("give --out DIR or set LAMP_DIR")
    out = args.out or default_lamp_dir()
    raw = args.raw_dir or out / "raw"
    names = [get_task(t).name for t in args.tasks]
    if "citation" in names and args.lamp1_citation_from is None:
        raise SystemExit(NO_CITATION)
    source = args.lamp1_citation_from
    for name in names:
        try:
            fetch(name, args.splits, raw, args.offline)
        except FetchError as e:
            raise SystemExit(str(e)) from e
        done = convert(
            name,
            raw,
            out,
            splits=args.splits,
            n_test=args.n_test,
            seed=args.seed,
            test_file=args.test_file,
            citation_from=source if name == "citation" and source != "keep" else None,
            drop_leaks=not args.keep_leaks,
        )
        print(done.summary())
