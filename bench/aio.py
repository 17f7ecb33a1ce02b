"""One write at a time through Linux native AIO (io_submit, io_getevents), by raw syscalls.

This is how Xen's blkback and qemu's aio hand a VM's writes to the block layer: the bio is
submitted inside a plug that is released before the submitter sleeps. md's raid1 then, when the
array has a bitmap, writes the dirty bitmap pages and submits the write in the submitter's own
context. A synchronous pwrite() instead sleeps inside its plug, and md hands every write to the
array's raid1d thread (raid1_unplug with from_schedule): the cost of a wakeup and a context switch
per write that a VM's writes do not pay.
"""

from __future__ import annotations

import ctypes
import os

# x86_64 syscall numbers (the bench's guest is x86_64)
SYS_IO_SETUP, SYS_IO_DESTROY, SYS_IO_GETEVENTS, SYS_IO_SUBMIT = 206, 207, 208, 209
IOCB_CMD_PWRITE = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class Iocb(ctypes.Structure):
    """struct iocb (include/uapi/linux/aio_abi.h), little-endian layout."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


def _syscall(number: int, *args) -> int:
    rc = _libc.syscall(number, *args)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


class AioWriter:
    """Writes `buf` (a writable buffer, e.g. an mmap: page-aligned for O_DIRECT) at offsets of `fd`."""

    def __init__(self, fd: int, buf) -> None:
        self.fd, self.buf = fd, buf
        self.ctx = ctypes.c_ulong(0)
        _syscall(SYS_IO_SETUP, 1, ctypes.byref(self.ctx))
        self.iocb = Iocb(opcode=IOCB_CMD_PWRITE, fildes=fd, nbytes=len(buf))
        self.iocb.buf = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        self.iocbs = (ctypes.POINTER(Iocb) * 1)(ctypes.pointer(self.iocb))
        self.event = IoEvent()

    def pwrite(self, offset: int) -> None:
        self.iocb.offset = offset
        _syscall(SYS_IO_SUBMIT, self.ctx, 1, self.iocbs)
        while _syscall(SYS_IO_GETEVENTS, self.ctx, 1, 1, ctypes.byref(self.event), None) < 1:
            pass
        if self.event.res != len(self.buf):
            err = -self.event.res if self.event.res < 0 else 0
            raise OSError(
                err,
                f"aio write of {len(self.buf)} bytes at {offset}: {os.strerror(err) if err else f'{self.event.res} bytes written'}",
            )

    def close(self) -> None:
        if self.ctx.value:
            _syscall(SYS_IO_DESTROY, self.ctx)
            self.ctx = ctypes.c_ulong(0)
