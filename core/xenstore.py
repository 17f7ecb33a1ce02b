"""xenstore, through one thin interface.

Production talks to xenstored with the `xenstore-*` tools, as Xen's own hotplug
scripts do. Tests (and the real-kernel test bed, which has no Xen) replace it by
a JSON-file double, selected with ISCSIMPLE_XENSTORE_FILE.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from .atomic import write_atomic
from .errors import OperationError
from .files import open_lock_file, read_file
from .run import CommandError, run

XENSTORE_TIMEOUT = 5.0


class XenStoreError(OperationError):
    pass


class XenStore(Protocol):
    def read(self, key: str) -> str | None: ...
    def write(self, key: str, value: str) -> None: ...
    def write_many(self, items: Sequence[tuple[str, str]]) -> None: ...
    def rm(self, key: str) -> None: ...


class CommandXenStore:
    def read(self, key: str) -> str | None:
        result = run(["xenstore-read", key], timeout=XENSTORE_TIMEOUT, check=False)
        if result.returncode != 0:
            return None
        return result.stdout.rstrip("\n")

    def write(self, key: str, value: str) -> None:
        run(["xenstore-write", key, value], timeout=XENSTORE_TIMEOUT)

    def write_many(self, items: Sequence[tuple[str, str]]) -> None:
        """Several keys in one xenstore-write, in order (as xen-hotplug-common.sh's fatal() does)."""
        run(["xenstore-write", *(x for item in items for x in item)], timeout=XENSTORE_TIMEOUT)

    def rm(self, key: str) -> None:
        # Already gone is fine: removal is idempotent.
        with contextlib.suppress(CommandError):
            run(["xenstore-rm", key], timeout=XENSTORE_TIMEOUT)


class FileXenStore:
    """A JSON file of key → value, for tests and for hosts without Xen. `rm` removes subtrees too."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @contextmanager
    def _locked(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = open_lock_file(self.path.with_suffix(self.path.suffix + ".lock"))
        except (OSError, ValueError) as e:
            raise XenStoreError(f"xenstore file {self.path}: cannot lock it: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        except OSError as e:
            raise XenStoreError(f"xenstore file {self.path}: {e}") from None
        finally:
            os.close(fd)

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(read_file(self.path) or b"{}")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as e:
            raise XenStoreError(f"xenstore file {self.path} is unreadable: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise XenStoreError(f"xenstore file {self.path} is not a JSON object of strings")
        return data

    def read(self, key: str) -> str | None:
        with self._locked():
            return self._load().get(key)

    def write(self, key: str, value: str) -> None:
        self.write_many([(key, value)])

    def write_many(self, items: Sequence[tuple[str, str]]) -> None:
        with self._locked():
            data = self._load()
            data.update(items)
            write_atomic(
                self.path, json.dumps(data, indent=1, sort_keys=True), fsync=False, private_dir=False
            )

    def rm(self, key: str) -> None:
        with self._locked():
            data = self._load()
            kept = {k: v for k, v in data.items() if k != key and not k.startswith(key + "/")}
            if kept != data:
                write_atomic(
                    self.path, json.dumps(kept, indent=1, sort_keys=True), fsync=False, private_dir=False
                )


def open_xenstore(env: Mapping[str, str] | None = None) -> XenStore:
    env = os.environ if env is None else env
    path = env.get("ISCSIMPLE_XENSTORE_FILE")
    return FileXenStore(path) if path else CommandXenStore()
