"""What the hotplug reads from and writes to xenstore under XENBUS_PATH.

Keys follow Xen's tools/hotplug/Linux/block-common.sh and xen-hotplug-common.sh:
`physical-device` (hex major:minor), `physical-device-path`, `hotplug-status`
(connected | error), `hotplug-error` (a sentence libxl shows the operator). Our own
key: `iscsimple-id`, the registry entry `remove` undoes.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass

from iscsimple.core.errors import IscsimpleError, one_line
from iscsimple.core.registry import attachment_id_for_xenbus
from iscsimple.core.xenstore import XenStore

from .devices import BlockDevice

log = logging.getLogger(__name__)

ID_KEY = "iscsimple-id"
_ID = re.compile(r"[A-Za-z0-9_.-]+")  # what the registry accepts as a file name


MAX_SHOWN = 128  # a VM name or guest device as status, metrics and logs show it


def _shown(value: str | None) -> str | None:
    """A xenstore value that is only shown (the VM's name, the guest's device): printable, one
    line, bounded; None when nothing printable is left. The domain's tools may have set it."""
    if value is None:
        return None
    text = "".join(c if c.isprintable() and c != "\t" else "?" for c in value.strip())
    text = text[:MAX_SHOWN]
    return text if text.strip("?") else None


@dataclass(frozen=True)
class XenContext:
    store: XenStore
    xenbus_path: str  # backend/vbd/<domid>/<devid>

    def key(self, name: str) -> str:
        return f"{self.xenbus_path.rstrip('/')}/{name}"

    @property
    def attachment_id(self) -> str:
        return attachment_id_for_xenbus(self.xenbus_path)

    @property
    def domain_id(self) -> int | None:
        parts = self.xenbus_path.strip("/").split("/")
        try:
            return int(parts[-2])
        except (IndexError, ValueError):
            return None

    def params(self) -> str | None:
        return self.store.read(self.key("params"))

    def recorded_id(self) -> str | None:
        """The registry id `add` wrote (`iscsimple-id`), if it got that far."""
        value = self._read_quietly(self.key(ID_KEY))
        return value if value and _ID.fullmatch(value) else None

    def domain_name(self) -> str | None:
        if self.domain_id is None:
            return None
        return _shown(self._read_quietly(f"/local/domain/{self.domain_id}/name"))

    def vbd(self) -> str | None:
        """The guest's device name (xvda2), which libxl writes as `dev`."""
        return _shown(self._read_quietly(self.key("dev")))

    def publish(self, device: BlockDevice, attachment_id: str) -> None:
        self.store.write_many(
            [
                (self.key(ID_KEY), attachment_id),
                (self.key("physical-device"), device.xen_physical_device),
                (self.key("physical-device-path"), device.path),
                # Last: libxl proceeds as soon as it sees "connected".
                (self.key("hotplug-status"), "connected"),
            ]
        )

    def unpublish(self) -> None:
        for name in ("hotplug-status", "physical-device", "physical-device-path", ID_KEY):
            self.store.rm(self.key(name))

    def fail(self, message: str) -> None:
        """Like xen-hotplug-common.sh's fatal(): hotplug-error first, then hotplug-status=error."""
        try:
            self.store.write_many(
                [(self.key("hotplug-error"), one_line(message)), (self.key("hotplug-status"), "error")]
            )
        except IscsimpleError as e:
            log.error("could not report the error to xenstore: %s", e)

    def _read_quietly(self, key: str) -> str | None:
        with contextlib.suppress(IscsimpleError):
            return self.store.read(key)
        return None
