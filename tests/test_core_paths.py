"""HostPaths: every root can be pointed elsewhere through the environment."""

from pathlib import Path

from iscsimple.core.paths import DEFAULT_LOCKS, HostPaths


def test_defaults_are_the_real_host():
    paths = HostPaths.from_env({})
    assert (paths.sysfs, paths.procfs, paths.devfs) == (Path("/sys"), Path("/proc"), Path("/dev"))
    assert paths.locks == DEFAULT_LOCKS == Path("/var/run/xen-hotplug")


def test_environment_overrides_each_root(tmp_path):
    env = {
        var: str(tmp_path / var.lower())
        for var in (
            "ISCSIMPLE_CONFIG",
            "ISCSIMPLE_TAB",
            "ISCSIMPLE_STATE",
            "ISCSIMPLE_RECORDS",
            "ISCSIMPLE_PROCFS",
            "ISCSIMPLE_SYSFS",
            "ISCSIMPLE_DEVFS",
            "ISCSIMPLE_LOCKS",
        )
    }
    paths = HostPaths.from_env(env)
    assert paths.sysfs == tmp_path / "iscsimple_sysfs"
    assert paths.devfs == tmp_path / "iscsimple_devfs"
    assert paths.procfs == tmp_path / "iscsimple_procfs"
    assert paths.locks == tmp_path / "iscsimple_locks"
    assert paths.config == tmp_path / "iscsimple_config"
