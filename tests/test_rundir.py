"""id_folder: user and anchor ids as folder names, one per id, inside their parent."""

import json
import os
import random
import re

import pytest

from mta.files import write_json
from mta.run.rundir import RunDir, id_folder

IDS = [
    # typical, and what escapes or aliases a folder, hides a file or looks like our temp
    "news_headline-a310", "310", "..", ".", "...", ".hidden", "x.tmp", ".x.json.ab.tmp",
    "/", "\\", "\x00", "a/b", "a\\b", "a\x00b", "/etc/passwd", "../../x", "..\\..\\x",
    "C:\\x", "con", "nul", "\n", "\t", "a\nb",
    # the old mapping sent these to one folder; case folding would too
    "a_b", "a b", "A_B", "a_B", "A_b", "ab", "AB", "A", "a",
    # the escape characters themselves
    "a%2fb", "a%2Fb", "%2da", "%", "+", "+a", "a+", "+A", "~", "a~b",
    "-", "--", "-a", "_",
    # non-ASCII: composed and decomposed, CJK, emoji, a lone surrogate
    "ü", "u\u0308", "Ü", "用户", "用户42", "🙂", "👩\u200d💻", "\ud800",
    # long: 300 characters, sharing a 299-character prefix, around the 120 bound
    "u" * 300, "u" * 299 + "v", "u" * 299 + "U", "ü" * 300, "用" * 300, "a/" * 150,
    "." * 300, "%" * 121, "%" * 120 + "~", "x" * 120, "x" * 121, "A" * 60, "A" * 61,
    "x" * 96 + "~" + "0" * 16, "x" * 95 + "A" * 20, "x" * 94 + "ü" * 10,
    "x" * 95 + "ü" * 10,
]
NAME = re.compile(r"[a-z0-9_+%~][a-z0-9_+%~-]*")


def _decode(name: str) -> bytes:
    """The UTF-8 bytes of the id an escape (without `~hash`) stands for."""
    out, i = bytearray(), 0
    while i < len(name):
        if name[i] == "+":
            out += name[i + 1].upper().encode()
            i += 2
        elif name[i] == "%":
            out.append(int(name[i + 1:i + 3], 16))
            i += 3
        else:
            out += name[i].encode()
            i += 1
    return bytes(out)


def test_typical_ids_keep_their_name():
    assert id_folder("news_headline-a310") == "news_headline-a310"
    assert id_folder("310") == "310"
    assert id_folder("News_Headline-A310") == "+news_+headline-+a310"
    assert id_folder("user 42/x.json") == "user%2042%2fx%2ejson"
    assert id_folder("..") == "%2e%2e" and id_folder(".") == "%2e"
    assert id_folder("-rf") == "%2drf" and id_folder("a-") == "a-"  # not an option


def test_the_test_ids_are_distinct():
    assert len(IDS) == len(set(IDS))


@pytest.mark.parametrize("uid", IDS, ids=range(len(IDS)))
def test_name_is_safe(uid):
    name = id_folder(uid)
    assert NAME.fullmatch(name), name
    assert name not in (".", "..") and not name.startswith((".", "-"))
    assert not name.endswith(".tmp")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert len(name.encode()) <= 120
    assert name == id_folder(uid)


def test_names_are_distinct_even_when_case_folded():
    names = [id_folder(u) for u in IDS]
    assert len(set(names)) == len(IDS)
    assert len({n.casefold() for n in names}) == len(IDS)


def test_random_ids_are_distinct():
    rng = random.Random(0)
    chars = "aA_-+. /\\%~\x00üÜ用🙂"
    uids = {"".join(rng.choices(chars, k=rng.randint(1, 8))) for _ in range(20_000)}
    assert len({id_folder(u).casefold() for u in uids}) == len(uids)


def test_short_names_decode_back_to_the_id():
    short = [u for u in IDS if "~" not in id_folder(u)]
    assert len(short) > 50
    for uid in short:
        assert _decode(id_folder(uid)).decode("utf-8", "surrogatepass") == uid


def test_long_names_start_with_whole_escapes_of_the_id():
    long = [u for u in IDS if "~" in id_folder(u)]
    assert len(long) == 14
    for uid in long:
        head, digest = id_folder(uid).split("~")
        assert len(head) >= 94 and re.fullmatch("[0-9a-f]{16}", digest)
        assert uid.encode("utf-8", "surrogatepass").startswith(_decode(head))


def test_long_ids_are_bounded_and_distinct():
    a, b = "k" * 299 + "a", "k" * 299 + "b"
    assert id_folder(a) != id_folder(b)
    assert id_folder(a).startswith("k" * 96 + "~")
    assert len(id_folder("🙂" * 300)) <= 120
    assert id_folder("x" * 120) == "x" * 120 and "~" in id_folder("x" * 121)
    assert id_folder("A" * 60) == "+a" * 60


def test_hash_is_sha256():  # not hash(): the same name on every machine and Python
    assert id_folder("x" * 200) == "x" * 96 + "~aa20c23e32018340"


def test_empty_and_non_str_are_refused():
    with pytest.raises(ValueError):
        id_folder("")
    with pytest.raises(TypeError):
        id_folder(310)  # type: ignore[arg-type]


def test_paths_stay_inside_and_one_file_per_id(tmp_path):
    run = RunDir(tmp_path)
    users, bank = (tmp_path / "users").resolve(), (tmp_path / "bank").resolve()
    for i, uid in enumerate(IDS):
        result, adapter = run.user_result(uid, "mta"), run.adapter(uid)
        assert result.resolve().parent.parent == users and result.name == "mta.json"
        assert adapter.resolve().parent == bank
        write_json(result, {"i": i})
        write_json(adapter / "train_log.json", {"i": i})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "users"]
    for folder, leaf in ((users, "mta.json"), (bank, "train_log.json")):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert len(files) == len(IDS)
        assert all(p.name == leaf and p.parent.parent == folder for p in files)
        assert len(list(folder.iterdir())) == len(IDS)
    for i, uid in enumerate(IDS):
        assert json.loads(run.user_result(uid, "mta").read_text()) == {"i": i}
        assert json.loads((run.adapter(uid) / "train_log.json").read_text()) == {"i": i}


def test_stale_temporaries_are_removed_without_following_links(tmp_path):
    """A killed run's temporaries go, a `.tmp` link goes without its target, and nothing outside the run
    directory is touched, even under a linked folder."""
    outside = tmp_path / "outside"
    (outside / "linked").mkdir(parents=True)
    (outside / "keep.txt").write_text("keep")
    (outside / "linked" / ".x.json.ab.tmp").write_text("not ours")
    root = tmp_path / "run"
    (root / "users" / "u").mkdir(parents=True)
    (root / ".to-folder.tmp").symlink_to(outside, target_is_directory=True)
    (root / "users" / ".to-file.tmp").symlink_to(outside / "keep.txt")
    (root / "users" / ".dangling.tmp").symlink_to(tmp_path / "missing")
    (root / "bank" / ".a.cd.tmp").mkdir(parents=True)
    (root / "bank" / ".a.cd.tmp" / "link").symlink_to(outside / "keep.txt")
    (root / "users" / "u" / ".mta.json.ef.tmp").write_text("{")
    (root / "users" / "u" / "mta.json").write_text("{}")
    (root / "shared").symlink_to(outside / "linked", target_is_directory=True)
    removed = RunDir(root).remove_stale_temporaries()
    assert {p.relative_to(root).as_posix() for p in removed} == {
        ".to-folder.tmp", "users/.to-file.tmp", "users/.dangling.tmp", "bank/.a.cd.tmp", "users/u/.mta.json.ef.tmp"}
    assert not any(os.path.lexists(p) for p in removed)
    assert (outside / "keep.txt").read_text() == "keep" and (outside / "linked" / ".x.json.ab.tmp").exists()
    assert (root / "users" / "u" / "mta.json").exists() and (root / "shared").is_symlink()
