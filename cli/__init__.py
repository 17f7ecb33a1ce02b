"""`iscsimple`: the operator CLI (status, check-config, attach/detach, convert-config,
install-hook, resolve). Kept apart from `iscsimple.hotplug`, which is what xl runs, as
Xen keeps tools/xl apart from tools/hotplug/Linux."""
