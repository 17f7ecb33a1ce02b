"""Work done in a child process while this one does something else: the agent's start reads
the md arrays there while it reads the registry and the iSCSI sessions itself.

Reading sysfs is a few syscalls per attribute file, tens of thousands of them on a big host;
threads do not help (each syscall gives the interpreter lock back and forth), a second process
on a second core does. The child is a fork: it has every module and the function to call, and
sends the result back pickled through a pipe, then exits without running anything else of this
process (`os._exit`: no atexit handler, no buffered output written twice).

Whenever a child cannot be used the function runs here, in the caller's `result()`: when this
process runs other threads (a fork copies only the calling thread, and a lock another thread
holds would stay held in the child), when fork or the pipe fails, when the child fails, is
killed or its answer does not unpickle.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: the child writes its answer and exits without waiting for us
_F_SETPIPE_SZ = 1031


class Aside(Generic[T]):
    """`function()` started in a child process at once; `result()` waits for it."""

    def __init__(self, function: Callable[[], T]):
        self.function = function
        self.pid: int | None = None
        self._fd: int | None = None
        if threading.active_count() != 1:
            return
        try:
            read_fd, write_fd = os.pipe()
        except OSError:
            return
        try:
            pid = os.fork()
        except OSError as e:
            os.close(read_fd)
            os.close(write_fd)
            log.debug("no child process for %r: %s", function, e)
            return
        if pid == 0:  # the child
            status = 1
            try:
                os.close(read_fd)
                _answer(write_fd, function())
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        self.pid, self._fd = pid, read_fd

    def result(self) -> T:
        """The child's result, or the function's here when the child gave none."""
        if self.pid is None or self._fd is None:
            return self.function()
        fd, self._fd = self._fd, None
        # Unpickled as it is read, through a small buffer: no buffer of the whole answer (a
        # large block, once freed, raises glibc's mmap threshold and later ones stay in the heap).
        answer: object = _NONE
        try:
            with os.fdopen(fd, "rb", buffering=_BUFFER) as pipe:
                answer = pickle.load(pipe)
                if pipe.read(1):
                    answer = _NONE  # more than one pickle: not what the child writes
        except Exception as e:  # the child died, or a truncated or garbled answer: do the work here
            log.debug("the answer of child process %d cannot be read: %s", self.pid, e)
        status = _reap(self.pid)
        if status == 0 and answer is not _NONE:
            return answer  # type: ignore[return-value]
        log.warning("child process %d gave no answer (wait status %d); reading here", self.pid, status)
        return self.function()


_NONE = object()
_BUFFER = 64 * 1024


def _answer(fd: int, result: object) -> None:
    data = memoryview(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, min(max(len(data), 4096), _PIPE_SIZE))
    except OSError:
        pass  # a smaller pipe: the writes below wait for the reader
    while data:
        data = data[os.write(fd, data) :]
    os.close(fd)


def _reap(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return -1
