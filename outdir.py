"""
What every writer into an output directory shares: one writer per out_dir (a lock)
and one atomic file write.

One writer. train.py (for the life of a run) and upcycle.py (while it writes) hold
an exclusive lock on OUT_DIR/.lock, so a second run on the same out_dir stops at
once with one line naming the pid that holds it, instead of the two runs renaming
each other's checkpoints and rotating each other's metrics. The lock is a POSIX
flock on that file. The kernel drops it when its process ends, however it ends
(kill -9 included), so the lock of a dead run is stale by construction and the
next run takes it over; the file's text (pid, host, command, start time) names the
holder, says whose lock was taken over, and tells the new holder which temp files
the dead run left (`*.tmp.<its pid>`), which it removes. The lock file is opened
without following a symbolic link and must be a regular file with one name, so a
.lock that points elsewhere is refused instead of overwritten.

    with OutDirLock(out_dir, "train.py"):   # LockError (one line) if held elsewhere
        ...

One atomic write. write_atomic(path, write) writes into `path.tmp.<pid>`, fsyncs
and renames; on any failure `path` is as it was and the temp file is gone (only
kill -9 leaves it, for the next lock holder to remove). A write error is a
one-line WriteError.
"""
import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import sys
import time

LOCK_NAME = ".lock"
TEMP_MARK = ".tmp."   # temp files are named <final><TEMP_MARK><pid>


class LockError(Exception):
    """out_dir is locked by another live process, or cannot be locked (one line)."""


class WriteError(ValueError):
    """A file could not be written (disk full, read-only, permissions...); one line
    naming the file and the fix. A ValueError, so that every command line's handler
    of bad input reports it as one line."""


# ----------------------------------------------------------------------------- one writer

class OutDirLock:
    """Exclusive lock on out_dir/.lock; acquire() / release(), or a with block.
    After acquire(), `stale` is the text a previous holder left behind when it
    died without releasing (kill -9, power loss), else None, and `removed` the
    names of that holder's temp files that acquire() deleted."""

    def __init__(self, out_dir, what=None):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.what = " ".join((what or " ".join(sys.argv) or "python").split())   # one line
        self.fd, self.stale, self.created, self.removed = None, None, False, []

    def acquire(self):
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise LockError(f"out_dir {self.out_dir} is a file, not a directory: choose another out_dir")
        self.created = not os.path.isdir(self.out_dir)
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            self.fd = lock_file(self.path, self.out_dir)
            self.stale = holder_text(self.fd) or None
            self.removed = remove_temp_files(self.out_dir, holder_pid(self.stale))
            text = f"pid {os.getpid()} on {socket.gethostname()}, {self.what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, text.encode() + b"\n", 0)
        except OSError as e:
            self.release()
            why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise LockError(f"cannot lock out_dir {self.out_dir} ({self.path}): {why}") from None
        except LockError:
            self.release()
            raise
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


def open_lock_file(path):
    """fd of `path` opened read-write (created if absent) without following a
    symbolic link; LockError for a link, a directory, a FIFO or any other
    non-regular file, or a file with other hard links (writing the holder's text
    into it would overwrite another file's content)."""
    fix = "remove it (the lock file is recreated), or choose another out_dir"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockError(f"lock file {path} is a symbolic link, not a regular file: {fix}") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):
            raise LockError(f"lock file {path} is not a regular file ({e.strerror}): {fix}") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(info.st_mode) else "is not a regular file"
        raise LockError(f"lock file {path} {what}: {fix}")
    return fd


def lock_file(path, out_dir):
    """Open and flock `path` without waiting; the fd, or LockError naming the holder.
    Between our open and our flock the holder may release and delete the file, and
    a third run create a new one: then the inode we locked is not the one at `path`,
    so we try again."""
    while True:
        fd = open_lock_file(path)
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
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def holder_text(fd):
    """What the lock file says about its holder, as one line ('' if empty)."""
    return " ".join(os.pread(fd, 4096, 0).decode(errors="replace").split())


def holder_pid(text):
    """The pid in a holder text 'pid N on HOST, ...', or None."""
    found = re.match(r"pid (\d+) on ", text or "")
    return int(found.group(1)) if found else None


def remove_temp_files(out_dir, pid):
    """Delete the `*.tmp.<pid>` files (not directories) in out_dir that the dead
    holder `pid` left; returns their names. Called only while holding the lock
    that process held, so none of them can still be in use."""
    if pid is None or pid == os.getpid():
        return []
    removed = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.endswith(f"{TEMP_MARK}{pid}") and not os.path.isdir(path):
            os.unlink(path)
            removed.append(name)
    return removed


# ----------------------------------------------------------------------------- one atomic write

def temp_name(final):
    """The temp file a process writes before renaming to `final`: per process, so
    two writers never rename each other's half-written file."""
    return f"{final}{TEMP_MARK}{os.getpid()}"


def write_problem(e, final, kept=True):
    """One line for an OSError met while writing `final` (disk full, read-only,
    permissions...). kept: end by saying that `final` itself was not touched."""
    where = os.path.dirname(os.path.abspath(final))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        what, fix = f"disk full: the filesystem holding {where} has no room for {final} ({free})", "free space"
    else:
        what, fix = f"could not write {final}: {e.strerror or e}", "check the directory"
    kept_note = f"; {os.path.basename(final)} was left as it was" if kept else ""
    return f"{what}{kept_note} ({fix}, or choose another out_dir)"


def write_atomic(final, write):
    """write(f) into a per-process temp file next to `final` (binary mode), fsync,
    rename; returns `final`. Any failure, Ctrl-C included, leaves `final` as it was
    and removes the temp file; a write error becomes a one-line WriteError.
    torch.save reports a failed write of its own as a RuntimeError whose context is
    the OSError."""
    tmp = temp_name(final)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise WriteError(write_problem(cause, final)) from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return final
