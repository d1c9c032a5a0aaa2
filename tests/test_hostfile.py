"""DeepSpeed hostfiles (launch/hostfile.py): good files (comments, blank lines, trailing comments,
addresses) parse to the hand-listed hosts; bad ones (no slots, a host twice, slots=0, garbage) are
rejected with an error that names the file, the line number and the offending value; the CLI's
`check` and `get` and the check of a config against the hostfile's world size."""

from __future__ import annotations

import pytest

from launch.hostfile import Host, HostfileError, main, master_addr, parse_hostfile, read_hostfile, world_size
from pretrain.cli import run
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


# ------------------------------------------------------------------------------ good files


def test_plain_two_nodes():
    hosts = parse_hostfile("node01 slots=8\nnode02 slots=8\n")
    assert hosts == [Host("node01", 8, 1), Host("node02", 8, 2)]
    assert world_size(hosts) == 16
    assert master_addr(hosts) == "node01"


def test_comments_blank_lines_and_trailing_comments():
    text = (
        "# two H100 nodes\n"
        "\n"
        "   \n"
        "node01 slots=8\n"
        "\t# indented comment\n"
        "node02.cluster.local   slots=4   # rack 2\n"
        "\n"
        "10.0.0.7 slots=2\n"
    )
    hosts = parse_hostfile(text, "hosts.txt")
    # line numbers are the file's (1-based, counting comments and blanks)
    assert hosts == [Host("node01", 8, 4), Host("node02.cluster.local", 4, 6), Host("10.0.0.7", 2, 8)]
    assert world_size(hosts) == 8 + 4 + 2


def test_local_host_rendezvous_on_loopback():
    assert master_addr(parse_hostfile("localhost slots=2\n")) == "127.0.0.1"


def test_read_from_disk(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("a slots=1\nb slots=3\n")
    assert [(h.name, h.slots) for h in read_hostfile(f)] == [("a", 1), ("b", 3)]


# ------------------------------------------------------------------------------- bad files

BAD = [
    # (text, line named in the error, fragments the message must contain)
    ("node01 slots=8\nnode02\n", 2, ["'node02' has no slots", "node02 slots=N"]),
    ("node01 slots=8\n# c\nnode01 slots=8\n", 3, ["'node01' is listed again", "first on line 1"]),
    ("node01 slots=0\n", 1, ["slots=0 for node01", "at least 1 slot"]),
    ("node01 slots=eight\n", 1, ["slots='eight'", "not a whole number"]),
    ("node01 slots=-2\n", 1, ["slots='-2'", "not a whole number"]),
    ("node01 slots=2.5\n", 1, ["slots='2.5'", "not a whole number"]),
    ("node01 gpus=8\n", 1, ["'gpus=8' is not slots=N"]),
    ("node01 slots=8 max_slots=8\n", 1, ["unexpected 'max_slots=8'"]),
    ("slots=8\n", 1, ["starts with slots="]),
    ("node01 slots=4\n!!garbage!! slots=2\n", 2, ["'!!garbage!!' is not a host name"]),
    ("node01:8\n", 1, ["'node01:8' is not a host name"]),  # MPI's host:N form is not DeepSpeed's
]


@pytest.mark.parametrize("text, line, fragments", BAD, ids=[b[0].strip().splitlines()[-1] for b in BAD])
def test_bad_hostfile_names_the_line(text, line, fragments):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(text, "hosts.txt")
    msg = str(e.value)
    assert msg.startswith(f"hosts.txt:{line}: "), msg
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # and another\n"])
def test_no_hosts(text):
    with pytest.raises(HostfileError, match="no hosts"):
        parse_hostfile(text, "hosts.txt")


def test_missing_file(tmp_path):
    with pytest.raises(HostfileError, match="does not exist"):
        read_hostfile(tmp_path / "nope")


# ------------------------------------------------------------------------------------ CLI
# `run(main, argv)` is what `python -m launch.hostfile` does: errors become `error: ...` and exit codes.


def test_cli_get(tmp_path, capsys):
    f = tmp_path / "hosts"
    f.write_text("# cluster\nnode01 slots=8\nnode02 slots=8  # second\n")
    for what, want in [
        ("master", "node01"),
        ("world", "16"),
        ("hosts", "node01 node02"),
        ("slots", "8 8"),
        ("local", "0"),
    ]:
        assert run(main, ["get", str(f), what]) == 0
        assert capsys.readouterr().out.strip() == want


def test_cli_check_bad_file_exit_2(tmp_path, capsys):
    f = tmp_path / "hosts"
    f.write_text("node01 slots=8\nnode02 slots=0\n")
    assert run(main, ["check", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}:2: slots=0 for node02" in err


def test_cli_check_config_world_size(tmp_path, capsys):
    """tiny: global batch 8, micro 4. 2 slots -> dp 2, 4 x 2 = 8 divides; 3 slots -> 4 x 3 = 12 does
    not, and the error lists batch sizes that would (multiples of 12)."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("localhost slots=2\n")
    bad.write_text("localhost slots=3\n")
    assert run(main, ["check", str(good), "--config", TINY, "--vocab-size", "2048"]) == 0
    capsys.readouterr()
    assert run(main, ["check", str(bad), "--config", TINY, "--vocab-size", "2048"]) == 2
    err = capsys.readouterr().err
    assert "3 slots" in err and "global_batch_size: 8" in err and "4 x 3 = 12" in err
    assert "12, 24, 36" in err
