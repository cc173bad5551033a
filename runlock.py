"""
One writer per output directory. train.py (for the life of a run) and upcycle.py
(while it writes) hold an exclusive lock on OUT_DIR/.lock, so a second run on the
same out_dir stops at once with one line naming the pid that holds it, instead of
the two runs renaming each other's checkpoints and rotating each other's metrics.

The lock is a POSIX flock on that file. The kernel drops it when its process
ends, however it ends (kill -9 included), so the lock of a dead run is stale by
construction and the next run takes it over; the file's text (pid, host, command,
start time) is only there to name the holder, and to say whose lock was taken over.

    with OutDirLock(out_dir, "train.py"):   # LockError (one line) if held elsewhere
        ...
"""
import errno
import fcntl
import os
import socket
import sys
import time

LOCK_NAME = ".lock"


class LockError(Exception):
    """out_dir is locked by another live process, or cannot be locked (one line)."""


class OutDirLock:
    """Exclusive lock on out_dir/.lock; acquire() / release(), or a with block.
    After acquire(), `stale` is the text a previous holder left behind when it
    died without releasing (kill -9, power loss), else None."""

    def __init__(self, out_dir, what=None):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.what = " ".join((what or " ".join(sys.argv) or "python").split())   # one line
        self.fd, self.stale, self.created = None, None, False

    def acquire(self):
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise LockError(f"out_dir {self.out_dir} is a file, not a directory: choose another out_dir")
        self.created = not os.path.isdir(self.out_dir)
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            self.fd = lock_file(self.path, self.out_dir)
            self.stale = holder_text(self.fd) or None
            text = f"pid {os.getpid()} on {socket.gethostname()}, {self.what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, text.encode() + b"\n", 0)
        except OSError as e:
            self.release()
            why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise LockError(f"cannot lock out_dir {self.out_dir} ({self.path}): {why}") from None
        return self

    def release(self):
        """Remove the file while still holding the lock, then unlock (lock_file
        notices if it locked the removed file and retries on the new one). An
        out_dir that acquire() created and nothing else wrote to goes too, so a
        run that fails while starting leaves no empty folder."""
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        if self.created:
            try:
                os.rmdir(self.out_dir)
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_file(path, out_dir):
    """Open and flock `path` without waiting; the fd, or LockError naming the holder.
    Between our open and our flock the holder may release and delete the file, and
    a third run create a new one: then the inode we locked is not the one at `path`,
    so we try again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_text(fd) or "a process that is starting"
            os.close(fd)
            raise LockError(f"out_dir {out_dir} is in use by another run ({holder}): wait for it to finish, "
                            f"stop it, or choose another out_dir") from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def holder_text(fd):
    """What the lock file says about its holder, as one line ('' if empty)."""
    return " ".join(os.pread(fd, 4096, 0).decode(errors="replace").split())
