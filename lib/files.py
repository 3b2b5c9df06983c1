"""Writing outputs so that a failed or interrupted write never leaves a half-written file under the final name.

`atomic_path` hands out a temporary file in the target's folder and renames it over the target only once the
write has succeeded (rename is atomic within one filesystem), so a reader finds the old file or the new one.
A write that fails (disk full, I/O error, permission lost) raises `WriteError`, one line naming the file, the
cause and what to do. Temporary files carry PARTIAL_PREFIX; a SIGKILL can leave one behind, which
lib.checkpoint.remove_partial_writes deletes when a run resumes.
"""
import contextlib
import os
import tempfile

from lib.config import ConfigError

PARTIAL_PREFIX = ".partial-"


class WriteError(Exception):
    """A file could not be written; the message is one line naming the file, the cause and what to do."""


def reason(err):
    """The cause of an OSError in a few words (its strerror, e.g. 'No space left on device')."""
    return err.strerror or str(err) or type(err).__name__


def cannot_write(path, err, hint):
    return WriteError(f"cannot write {path} ({reason(err)}); {hint}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`, with the same extension (writers such as savefig and PIL pick the
    format from it); when the block succeeds the file is fsynced and renamed over `path`, otherwise removed.
    OSError propagates (callers name the final path in their message)."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f"{PARTIAL_PREFIX}{stem}-", suffix=ext, dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # the data reach the disk before the rename makes them the file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_text(path, text):
    """Replace the file at `path` by `text`, atomically (OSError on failure, the old file untouched)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


def check_writable_file(path, flag):
    """Refuse, before any work, an output file that cannot be created: ConfigError naming the flag."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is a folder; give a file name")
    try:
        fd, probe = tempfile.mkstemp(prefix=PARTIAL_PREFIX, dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"{flag}={path} cannot be written ({reason(err)}); give a file in a folder you can "
                          "write to") from None
