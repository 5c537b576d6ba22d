"""Download the official LaMP files and build the processed layout the MTA code reads.

    mta download-lamp --tasks lamp4 --out data/lamp --authors-test-users    (make data TASK=lamp4)
    mta download-lamp --tasks lamp4 lamp2 --out $LAMP_DIR
    mta download-lamp --tasks lamp1 --lamp1-citation-from abstract

1. Fetch <raw>/LaMP_<n>/<split>_{questions,outputs}.json for the user-based split,
   and with --authors-test-users (LaMP-2, LaMP-4) the paper's test users, the
   authors' data/<task>/test_100/test_100.json at a pinned commit, its sha256
   checked. The sizes are printed first; downloads show progress and resume; the
   sha256 and size of each file are recorded in <raw>/checksums.json and checked on
   later runs.
2. Convert (mta.data.lamp_release.convert): every official question is one user;
   `--n-test` users drawn (seeded) among those with exactly 10 history items
   (LaMP-2/4), 50 (LaMP-1/5) or 100 (LaMP-3) become test users (Appendix B), all
   others bank candidates, disjoint:
       <out>/<task>/user_anchor_candidate.json
       <out>/<task>/test_100/test_100.json
   `--test-file` (or --authors-test-users) takes the test users from a given file
   instead and keeps their questions out of the candidates.
Nothing is written before all input is validated; outputs are written to temporary
files and renamed. Without network, put the files under <raw> by hand (the error
names each path) and rerun, or point LAMP_DIR at a directory already in the
processed layout.

`mta reproduce` runs the same steps (`first_use`) when the project's own data folder
(data/lamp, `mta.data.lamp.DATA_DIR`) lacks the task.
"""

from __future__ import annotations

import argparse
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mta.data import lamp
from mta.data.lamp import CANDIDATES_FILE, TEST_FILE, default_lamp_dir, get_task
from mta.data.lamp_release import (
    CITATION_SOURCES,
    DEFAULT_SPLITS,
    Converted,
    FetchError,
    Remote,
    by_hand,
    convert,
    fetch,
    release_files,
    remote_size,
)

if TYPE_CHECKING:
    from mta.run.pipeline import Run

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
# The paper's test users as the authors publish them: data/<task>/test_100/test_100.json
# at this commit of github.com/zyj1214566/MTA, and the sha256 of each file.
AUTHORS_FILES = (
    "https://raw.githubusercontent.com/zyj1214566/MTA/"
    "c7235964a6ff0448d4a2e09849c0a30df09cbc24/data"
)
AUTHORS_TEST_USERS = {
    "news_headline": "9d768cbd88b986d0acfe78321ad35b6d185521fe66b9d81e91472351c0e1451a",
    "movie_tagging": "d02c0caa1d4228b788d9205b28b799db972eb258b21e699e895a36b85135ae9f",
}


def authors_test_users(task: str, raw_dir: Path) -> Remote | None:
    """The authors' test_100.json of `task` (to <raw_dir>/authors/<task>/), where published."""
    name = get_task(task).name
    if name not in AUTHORS_TEST_USERS:
        return None
    return Remote(
        f"{AUTHORS_FILES}/{name}/{TEST_FILE}",
        raw_dir / "authors" / name / "test_100.json",
        AUTHORS_TEST_USERS[name],
    )


def _mb(n: int | None) -> str:
    if n is None:
        return "size unknown"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def announce(task: str, files: Sequence[Remote]) -> None:
    """Print the size of each file still to download (HTTP HEAD), before any download;
    a server that cannot be reached ends here in one line naming every file."""
    missing = [f for f in files if not f.path.exists()]
    if not missing:
        return
    sizes = []
    for f in missing:
        try:
            sizes.append(remote_size(f.url))
        except urllib.error.HTTPError:  # no answer to HEAD; the download says why
            sizes.append(None)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise FetchError(f"cannot reach {f.url} ({reason}); {by_hand(missing, task)}") from None
    known = sum(n for n in sizes if n is not None)
    print(f"{get_task(task).name}: {len(missing)} files to download, {_mb(known)} in all:")
    for f, n in zip(missing, sizes, strict=True):
        part = f.path.with_name(f.path.name + ".part")
        resume = f" ({_mb(part.stat().st_size)} already here)" if part.exists() else ""
        print(f"  {_mb(n):>12}  {f.url} -> {f.path}{resume}")


def prepare(
    task: str,
    out: Path,
    raw_dir: Path | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    offline: bool = False,
    authors: bool = True,
    test_file: Path | None = None,
    **convert_args,
) -> Converted:
    """The data step of one task: fetch its official files (and, with `authors`, its
    published test users, used as the test file), then convert them into `out`."""
    raw_dir = raw_dir or out / "raw"
    pinned = authors_test_users(task, raw_dir) if authors and test_file is None else None
    files = ([pinned] if pinned else []) + release_files(task, splits, raw_dir)
    if not offline:
        announce(task, files)
    fetch(files, raw_dir, task, offline)
    return convert(
        task, raw_dir, out, splits=splits,
        test_file=pinned.path if pinned else test_file, **convert_args,
    )


def has_task(lamp_dir: Path, task: str) -> bool:
    name = get_task(task).name
    return (lamp_dir / name / CANDIDATES_FILE).is_file() and (lamp_dir / name / TEST_FILE).is_file()


def first_use(run: Run) -> None:
    """`mta reproduce`'s data step: when the project's own data folder
    (`mta.data.lamp.DATA_DIR`) lacks the run's task, fetch and convert it there.
    Any other LAMP_DIR is used as it is."""
    name = run.task_spec.name
    if run.lamp_dir.resolve() != lamp.DATA_DIR.resolve() or has_task(run.lamp_dir, name):
        return
    if name == "citation":
        raise SystemExit(f"error: {NO_CITATION}")
    print(f"{name}: not yet in {run.lamp_dir}; fetching it (make data TASK=... does this step alone)")
    try:
        print(prepare(name, run.lamp_dir).summary())
    except FetchError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--tasks", nargs="+", default=CONVERTIBLE, help="names or aliases lamp1..5")
    add("--out", type=Path, help="processed layout root (default: $LAMP_DIR, else data/lamp)")
    add("--raw-dir", type=Path, help="official files (default: <out>/raw)")
    add("--splits", nargs="+", default=list(DEFAULT_SPLITS), help="with outputs")
    add("--n-test", type=int, default=100)
    add("--seed", type=int, default=0)
    add("--test-file", type=Path, help="take test users from this test_100.json")
    add(
        "--authors-test-users",
        action="store_true",
        help="LaMP-2 and LaMP-4: take the test users from the authors' published "
        "test_100.json (pinned, sha256 checked); other tasks draw them",
    )
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
    out = args.out or default_lamp_dir()
    raw = args.raw_dir or out / "raw"
    names = [get_task(t).name for t in args.tasks]
    if "citation" in names and args.lamp1_citation_from is None:
        raise SystemExit(NO_CITATION)
    source = args.lamp1_citation_from
    if args.test_file is not None and args.authors_test_users:
        ap.error("give --test-file or --authors-test-users, not both")
    for name in names:
        try:
            done = prepare(
                name,
                out,
                raw,
                splits=args.splits,
                offline=args.offline,
                authors=args.authors_test_users,
                test_file=args.test_file,
                n_test=args.n_test,
                seed=args.seed,
                citation_from=source if name == "citation" and source != "keep" else None,
                drop_leaks=not args.keep_leaks,
            )
        except FetchError as e:
            raise SystemExit(f"error: {e}") from None
        print(done.summary())
