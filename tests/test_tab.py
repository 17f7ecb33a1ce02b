"""The tab file (LABEL → local device): accepted forms, and `FILE:LINE: message` for every error."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsimple.core.errors import InputError
from iscsimple.core.spec import MAX_LABEL_LEN
from iscsimple.core.tab import TabEntry, TabError, check_tab_text, parse_tab, read_tab

TAB = "/etc/xen/scripts/block-iscsimple-tab.conf"


def test_realistic_file():
    text = (
        "# block-iscsimple-tab.conf: LABEL  LOCAL-DEVICE\n"
        "\n"
        "web1-root      /dev/vg0/web1-root\n"
        "web1-data\t\t/dev/mapper/vg0-web1--data   # the big one\n"
        "   db_1        /dev/vg1/db1\n"
        "# new-vm      /dev/vg0/new-vm    (commented out)\n"
        "build-cache    MISSING\n"
        "build-tmp      MISSING-lv-not-made-yet\n"
        "\n"
    )
    tab = parse_tab(text, TAB)
    assert tab.path == TAB
    assert tab.entries == {
        "web1-root": TabEntry("web1-root", "/dev/vg0/web1-root", TAB, 3),
        "web1-data": TabEntry("web1-data", "/dev/mapper/vg0-web1--data", TAB, 4),
        "db_1": TabEntry("db_1", "/dev/vg1/db1", TAB, 5),
        "build-cache": TabEntry("build-cache", None, TAB, 7),
        "build-tmp": TabEntry("build-tmp", None, TAB, 8),
    }
    assert tab.entries["db_1"].where == f"{TAB}:5"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "   \t  \n# x\n", "\r\n"])
def test_empty_files(text):
    assert parse_tab(text, TAB).entries == {}


def test_crlf_line_endings():
    tab = parse_tab("a /dev/vg0/a\r\nb MISSING\r\n", TAB)
    assert tab.entries["a"].device == "/dev/vg0/a"
    assert tab.entries["b"].device is None


def test_device_paths_are_normalised():
    assert parse_tab("a /dev/vg0//a/\n", TAB).entries["a"].device == "/dev/vg0/a"


def test_missing_twice_is_fine():
    """MISSING is not a device: several labels may lack a local leg."""
    tab = parse_tab("a MISSING\nb MISSING\n", TAB)
    assert set(tab.entries) == {"a", "b"}


# text → (line, fragments the message must hold)
INVALID = {
    "vm1\n": (1, ["two columns", "found 1", "'vm1'"]),
    "\n\nvm1 /dev/vg0/vm1 extra\n": (3, ["two columns", "found 3", "'vm1 /dev/vg0/vm1 extra'"]),
    "vm1 /dev/vg0/vm1 # ok\nvm2 /dev/vg0/vm2 /dev/vg0/other\n": (2, ["found 3"]),
    "vm.1 /dev/vg0/vm1\n": (1, ["LABEL 'vm.1'", "'.'", "letters, digits"]),
    "vm/1 /dev/vg0/vm1\n": (1, ["'/'"]),
    "vm+1 /dev/vg0/vm1\n": (1, ["'+'"]),
    "vmé /dev/vg0/vm1\n": (1, ["'é'"]),
    f"{'L' * (MAX_LABEL_LEN + 1)} /dev/vg0/x\n": (1, [f"at most {MAX_LABEL_LEN}"]),
    "vm1 /dev/vg0/a\n# comment\nvm1 /dev/vg0/b\n": (3, ["LABEL 'vm1'", "already defined on line 1"]),
    "vm1 vg0/vm1\n": (1, ["DEVICE 'vg0/vm1'", "relative path", "/dev/vg0/vm1"]),
    "vm1 dm-3\n": (1, ["relative path"]),
    "vm1 ./vm1.img\n": (1, ["relative path"]),
    "a /dev/vg0/shared\nb /dev/vg0/x\nc /dev/vg0/shared\n": (
        3,
        ["DEVICE /dev/vg0/shared", "already the local leg of 'a'", "line 1"],
    ),
    "a /dev/vg0/x\nb /dev/vg0/./x\n": (2, ["already the local leg of 'a'"]),
    # Only "\n" ends a line: a form feed inside a line does not shift the numbers.
    "a /dev/vg0/a\n# page\x0cbreak\nb\n": (3, ["two columns"]),
}


@pytest.mark.parametrize("text", sorted(INVALID))
def test_invalid_gives_file_line_message(text):
    line, fragments = INVALID[text]
    with pytest.raises(TabError) as caught:
        parse_tab(text, TAB)
    message = str(caught.value)
    assert message.startswith(f"{TAB}:{line}: "), message
    assert (caught.value.path, caught.value.line) == (TAB, line)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message


def test_every_error_is_collected():
    text = "good /dev/vg0/good\nbad.label /dev/x\nrel relative\ngood /dev/vg0/other\nthree col umns\nok MISSING\n"
    tab, errors = check_tab_text(text, TAB)
    assert [e.line for e in errors] == [2, 3, 4, 5]
    assert [str(e).split(": ", 1)[0] for e in errors] == [f"{TAB}:{n}" for n in (2, 3, 4, 5)]
    # The good lines are still there, so later checks can use them.
    assert set(tab.entries) == {"good", "ok"}
    # parse_tab raises the first of them.
    with pytest.raises(TabError, match=f"^{TAB}:2: "):
        parse_tab(text, TAB)


def test_lookup_of_unknown_label_says_what_to_add():
    tab = parse_tab("a /dev/vg0/a\n", TAB)
    with pytest.raises(TabError) as caught:
        tab.lookup("web2")
    message = str(caught.value)
    assert message.startswith(f"{TAB}: ")
    assert "no entry for LABEL 'web2'" in message
    assert "web2 /dev/VG/LV" in message


def test_read_tab(tmp_path):
    path = tmp_path / "tab.conf"
    path.write_text("# x\nvm1 /dev/vg0/vm1\n")
    assert read_tab(path).entries["vm1"] == TabEntry("vm1", "/dev/vg0/vm1", str(path), 2)


def test_read_tab_missing_file(tmp_path):
    path = tmp_path / "nope.conf"
    with pytest.raises(TabError) as caught:
        read_tab(path)
    assert str(caught.value).startswith(f"{path}: tab file not found; create it")
    assert caught.value.exit_code == 2


def test_read_tab_undecodable_file(tmp_path):
    path = tmp_path / "tab.conf"
    path.write_bytes(b"vm1 /dev/vg0/\xff\n")
    with pytest.raises(TabError, match="cannot read the tab file"):
        read_tab(path)


def test_read_tab_directory(tmp_path):
    with pytest.raises(TabError, match="cannot read the tab file"):
        read_tab(tmp_path)


# --- fuzzing -------------------------------------------------------------------------------------

WORDS = st.sampled_from(
    ["vm1", "vm2", "a-b_c", "/dev/vg0/vm1", "/dev/vg0/vm2", "/dev//vg0/vm1", "MISSING", "MISSINGx", "rel",
     "#", " ", "\t", "\n", "\r\n", "\x0c", "\u2028", "é", "x.y", "+", "L" * 40]
)  # fmt: skip
TAB_LIKE = st.lists(WORDS, max_size=30).map("".join)


@given(st.one_of(TAB_LIKE, st.text(max_size=400)))
def test_fuzz_result_or_tab_error(text):
    try:
        tab = parse_tab(text, TAB)
    except TabError as e:
        assert isinstance(e, InputError)
        assert e.line is not None and 1 <= e.line <= text.count("\n") + 1
        assert str(e).startswith(f"{TAB}:{e.line}: ")
        return
    devices = [e.device for e in tab.entries.values() if e.device is not None]
    assert len(devices) == len(set(devices))
    for label, entry in tab.entries.items():
        assert entry.label == label
        assert entry.device is None or entry.device.startswith("/")
        assert 1 <= entry.line <= text.count("\n") + 1


@given(TAB_LIKE)
def test_fuzz_check_agrees_with_parse(text):
    tab, errors = check_tab_text(text, TAB)
    if errors:
        with pytest.raises(TabError) as caught:
            parse_tab(text, TAB)
        assert str(caught.value) == str(errors[0])
        assert [e.line for e in errors] == sorted(e.line for e in errors)
    else:
        assert parse_tab(text, TAB).entries == tab.entries
