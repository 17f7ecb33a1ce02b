"""The Xen block hotplug script (block-iscsimple) and the operator CLI (iscsimple)."""
