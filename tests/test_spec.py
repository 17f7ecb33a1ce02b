"""The disk spec grammar `[lunN@]TARGET[+LABEL]`: what is accepted, and that every
rejection names the bad part."""

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from iscsimple.core.errors import InputError
from iscsimple.core.spec import MAX_LABEL_LEN, MAX_LUN, MAX_TARGET_LEN, DiskSpec, SpecError, parse_spec

IQN = "iqn.2001-04.com.example:storage"

VALID = {
    IQN: DiskSpec(0, IQN, None),
    f"lun0@{IQN}": DiskSpec(0, IQN, None),
    f"lun1@{IQN}+vm1-disk": DiskSpec(1, IQN, "vm1-disk"),
    f"lun{MAX_LUN}@{IQN}+a": DiskSpec(MAX_LUN, IQN, "a"),
    f"lun007@{IQN}": DiskSpec(7, IQN, None),
    f"{IQN}+Web_1-root": DiskSpec(0, IQN, "Web_1-root"),
    "iqn.2026-11.test.local:disk1": DiskSpec(0, "iqn.2026-11.test.local:disk1", None),
    # Everything after the first ':' is the target's own naming: colons, dots, dashes.
    "iqn.1992-01.com.example:storage:diskarrays-sn-a8675309": DiskSpec(
        0, "iqn.1992-01.com.example:storage:diskarrays-sn-a8675309", None
    ),
    "iqn.2001-04.com.example": DiskSpec(0, "iqn.2001-04.com.example", None),
    "eui.02004567A425678D": DiskSpec(0, "eui.02004567A425678D", None),
    "lun2@eui.02004567a425678d+x": DiskSpec(2, "eui.02004567a425678d", "x"),
    "naa.52004567BA64678D": DiskSpec(0, "naa.52004567BA64678D", None),
    "naa.62004567BA64678D0123456789ABCDEF+db": DiskSpec(0, "naa.62004567BA64678D0123456789ABCDEF", "db"),
    # MISSING: a mirror with its local leg alone.
    "MISSING+vm1": DiskSpec(0, None, "vm1"),
    "lun3@MISSING-until-the-filer-is-fixed+vm1": DiskSpec(3, None, "vm1"),
    # xl's target= keeps trailing whitespace; the spec ignores it.
    f"  lun1@{IQN}+vm1 \n": DiskSpec(1, IQN, "vm1"),
    f"{IQN}+{'L' * MAX_LABEL_LEN}": DiskSpec(0, IQN, "L" * MAX_LABEL_LEN),
}


@pytest.mark.parametrize("text", sorted(VALID))
def test_valid(text):
    assert parse_spec(text) == VALID[text]


@pytest.mark.parametrize(
    "spec",
    [
        DiskSpec(1, IQN, "vm1"),
        DiskSpec(0, IQN, None),
        DiskSpec(5, None, "x"),
        DiskSpec(0, "eui.0123456789ABCDEF", "a"),
    ],
)
def test_str_round_trips(spec):
    assert parse_spec(str(spec)) == spec


# spec → fragments that must all appear in the message (the bad part and the why).
INVALID = {
    "": ["empty", "[lunN@]TARGET[+LABEL]"],
    "   ": ["empty"],
    # MISSING only with a LABEL: there would be no device at all.
    "MISSING": ["'MISSING'", "+LABEL"],
    "lun2@MISSING-iscsi": ["'MISSING-iscsi'", "only makes sense for a mirror"],
    # LUN
    f"lux0@{IQN}": ["'lux0'", "lunN"],
    f"0@{IQN}": ["'0'", "lunN"],
    f"lun@{IQN}": ["'lun'", "decimal number"],
    f"lun-1@{IQN}": ["'lun-1'", "decimal number"],
    f"lun1a@{IQN}": ["'lun1a'", "decimal number"],
    f"lun 1@{IQN}": ["'lun 1'", "decimal number"],
    f"lun\u0661@{IQN}": ["'lun\u0661'", "decimal number"],  # an Arabic-Indic digit is not a LUN
    f"lun{MAX_LUN + 1}@{IQN}": [f"LUN {MAX_LUN + 1}", "out of range", f"0-{MAX_LUN}"],
    f"lun{'9' * 5000}@{IQN}": ["out of range"],
    f"LUN1@{IQN}": ["'LUN1'", "lunN"],
    # TARGET: kind
    "lun0@": ["TARGET is empty"],
    "+vm1": ["TARGET is empty"],
    "target1+vm1": ["'target1'", "not an iSCSI name", "'iqn.'"],
    "/dev/sda": ["'/dev/sda'", "not an iSCSI name"],
    "missing+vm1": ["'missing'", "not an iSCSI name", "MISSING"],
    # iqn.
    "iqn.2001-13.com.example:x": ["month 13", "01-12"],
    "iqn.2001-00.com.example:x": ["month 00"],
    "iqn.01-04.com.example:x": ["iqn.YYYY-MM.reversed.domain"],
    "iqn.2001-4.com.example:x": ["iqn.YYYY-MM.reversed.domain"],
    "iqn.2001-04:x": ["iqn.YYYY-MM.reversed.domain"],
    "iqn.2001-04.-com.example": ["iqn.YYYY-MM.reversed.domain"],
    "iqn.2001-04.com.example.": ["iqn.YYYY-MM.reversed.domain"],
    "IQN.2001-04.com.example:x": ["upper-case", "'I', 'N', 'Q'", "'iqn.2001-04.com.example:x'"],
    "iqn.2001-04.com.Example:Storage": ["upper-case", "'E', 'S'", "write 'iqn.2001-04.com.example:storage'"],
    "iqn.2001-04.com.example:st orage": ["' ' (space)", "lower-case letters"],
    "iqn.2001-04.com.example:st\torage": ["(tab)"],
    "iqn.2001-04.com.example:st_orage": ["'_'"],
    "iqn.2001-04.com.exämple:x": ["'ä'"],
    "iqn.2001-04.com.example:a@b": ["'iqn.2001-04.com.example:a'", "lunN"],
    f"lun0@lun1@{IQN}": [f"TARGET 'lun1@{IQN}'", "only one 'lunN@'"],
    "iqn." + "a" * MAX_TARGET_LEN: [f"{MAX_TARGET_LEN + 4} bytes long", f"at most {MAX_TARGET_LEN}"],
    # eui. / naa.
    "eui.02004567A425678": ["eui.", "exactly 16 hex digits"],
    "eui.02004567A425678DD": ["exactly 16 hex digits"],
    "eui.02004567A425678G": ["exactly 16 hex digits"],
    "naa.52004567BA64678": ["naa.", "16 or 32 hex digits"],
    "naa.52004567BA64678D00": ["16 or 32 hex digits"],
    # LABEL
    f"{IQN}+": ["LABEL after '+' is empty"],
    f"lun1@{IQN}+": ["LABEL after '+' is empty"],
    f"{IQN}+vm 1": ["LABEL 'vm 1'", "' ' (space)"],
    f"{IQN}+vm.1": ["LABEL 'vm.1'", "'.'"],
    f"{IQN}+vm/1": ["'/'"],
    f"{IQN}+a+b": ["LABEL 'a+b'", "'+'"],
    f"{IQN}+foo@bar": ["LABEL 'foo@bar'", "'@'"],
    f"{IQN}+dé": ["'é'"],
    f"{IQN}+{'L' * (MAX_LABEL_LEN + 1)}": [f"{MAX_LABEL_LEN + 1} characters", f"at most {MAX_LABEL_LEN}"],
}


@pytest.mark.parametrize("text", sorted(INVALID))
def test_invalid_names_the_bad_part(text):
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    message = str(caught.value)
    assert message.startswith("bad disk spec ")
    for fragment in INVALID[text]:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # One sentence for a person: no newline, and a long spec is not echoed in full.
    assert "\n" not in message
    assert len(message) < 600


def test_spec_error_is_input_error_exit_2():
    with pytest.raises(InputError) as caught:
        parse_spec("nonsense")
    assert caught.value.exit_code == 2
    assert caught.value.spec == "nonsense"


# --- fuzzing: any text gives a DiskSpec or a SpecError, nothing else ---------------------------

PIECES = st.sampled_from(
    ["lun", "lun0", "0", "9" * 6, "@", "+", "iqn.", "2001-04", ".", "com", "example", ":", "-", "MISSING",
     "eui.", "naa.", "0123456789ABCDEF", " ", "\t", "\n", "é", "\udcff", "_", "/", "A", "+vm1"]
)  # fmt: skip
SPEC_LIKE = st.lists(PIECES, max_size=14).map("".join)
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)


@given(st.one_of(SPEC_LIKE, ANY_TEXT))
@example("lun0@iqn.2001-04.com.example:x+\udcff")
@example("iqn.2001-04.com.example\udcff")
def test_fuzz_result_or_spec_error(text):
    try:
        spec = parse_spec(text)
    except SpecError as e:
        assert str(e).startswith("bad disk spec ")
        return
    # Whatever was accepted is well-formed and prints back to itself.
    assert 0 <= spec.lun <= MAX_LUN
    assert spec.target is not None or spec.label is not None
    assert parse_spec(str(spec)) == spec
