"""Where the node (the socket twin of ``/dev/dxg``) lives by default, and whose it may be."""

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

NODE_ENV = "DXG_NODE"
SOCKET_NAME = "dxg.sock"
SYSTEM_NODE_PATH = Path("/run/pydxg") / SOCKET_NAME  # root's node, reachable by every user


def tmp_fallback_dir(uid: int | None = None) -> Path:
    """``/tmp/pydxg-<uid>``: the node directory when neither root nor ``XDG_RUNTIME_DIR``
    applies. It sits in a directory everyone may write, so the node creates it private (0700)
    and both sides insist that it belongs to its user."""
    return Path(f"/tmp/pydxg-{os.geteuid() if uid is None else uid}")


def default_node_path() -> Path:
    """The node path a client connects to and ``dxg up`` serves, in this order:

    1. ``$DXG_NODE`` when set and non-empty;
    2. ``/run/pydxg/dxg.sock`` when running as root;
    3. ``$XDG_RUNTIME_DIR/pydxg/dxg.sock`` when ``XDG_RUNTIME_DIR`` is set;
    4. ``/tmp/pydxg-<uid>/dxg.sock``.
    """
    explicit = os.environ.get(NODE_ENV)
    if explicit:
        return Path(explicit)
    uid = os.geteuid()
    if uid == 0:
        return SYSTEM_NODE_PATH
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "pydxg" / SOCKET_NAME
    return tmp_fallback_dir(uid) / SOCKET_NAME


def client_node_paths() -> tuple[Path, ...]:
    """Where a client looks for the node when it is given no path: ``$DXG_NODE`` alone when
    set; else this user's default path (:func:`default_node_path`) and then, for a user other
    than root, the system node ``/run/pydxg/dxg.sock`` that a root daemon serves (so that
    ``dxg ls`` as any user finds the machine's node)."""
    first = default_node_path()
    if os.environ.get(NODE_ENV) or first == SYSTEM_NODE_PATH:
        return (first,)
    return (first, SYSTEM_NODE_PATH)


def private_node_dir(directory: Path) -> bool:
    """Whether ``directory`` is one of this user's own default node directories (created
    private: 0700), rather than a shared one such as root's ``/run/pydxg``."""
    if os.geteuid() == 0:
        return False
    mine = [tmp_fallback_dir()]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        mine.append(Path(runtime) / "pydxg")
    return any(Path(os.path.abspath(directory)) == Path(os.path.abspath(d)) for d in mine)


def node_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be trusted to hold this user's node, or None when it can.

    Trusted: a directory (or a link to one, the link included) owned by this effective user or
    by root, and not writable by everyone unless sticky. Anyone else who owns the directory, or
    may write to it freely, could swap the socket for one of their own. Group-writable is
    allowed (a group of node operators is the administrator's choice). A missing directory is
    no problem here (there is nothing to connect to, or it is about to be created)."""
    trusted = (os.geteuid(), 0)
    try:
        lst = os.lstat(directory)
        st = os.stat(directory) if stat.S_ISLNK(lst.st_mode) else lst
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    owners = [("owned by", st.st_uid)]
    if st is not lst:
        owners.insert(0, ("a link owned by", lst.st_uid))
    for what, owner in owners:
        if owner not in trusted:
            return f"{directory} is {what} uid {owner}, neither this user nor root"
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        return f"{directory} is writable by everyone and not sticky"
    return None


def trusted_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why someone other than this user or root could change what ``path`` names, or None.

    Every directory above ``path`` must pass :func:`node_dir_problem` (owned by this user or
    root, not writable by everyone unless sticky), and so must every directory above where the
    parent really is once symbolic links are resolved: whoever may rename or replace any of them
    could swap the file at ``path`` for one of their choosing. ``path`` itself is not checked
    here (a caller that will open it checks it with ``lstat``/``O_NOFOLLOW``). Missing
    directories are no problem (they are about to be created, by this user)."""
    p = Path(os.path.abspath(path))
    chains: list[Sequence[Path]] = [p.parents]
    real = Path(os.path.realpath(p.parent))
    if real != p.parent:
        chains.append((real, *real.parents))
    for chain in chains:
        for directory in chain:
            problem = node_dir_problem(directory)
            if problem is not None:
                return problem
    return None


class UntrustedPath(PermissionError):
    """A directory on the way to the node could be changed by someone else."""


def _dir_problem(st: os.stat_result, where: str) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return f"{where} is not a directory"
    if st.st_uid not in (os.geteuid(), 0):
        return f"{where} is owned by uid {st.st_uid}, neither this user nor root"
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        return f"{where} is writable by everyone and not sticky"
    return None


def open_trusted_dir(directory: str | os.PathLike[str], *, _depth: int = 0) -> int:
    """An ``O_PATH`` descriptor of ``directory``, reached one component at a time from ``/``
    without following anything another user controls: each directory on the way must be owned by
    this user or root and not writable by everyone unless sticky, and a symbolic link is
    followed only when this user or root owns it. The node is then reached as
    ``/proc/self/fd/<fd>/<name>``, so nothing can swap a directory between the check and the
    use. Raises :class:`UntrustedPath` saying which component is wrong, FileNotFoundError when
    one is missing. The caller closes the descriptor."""
    if _depth > 40:
        raise UntrustedPath(errno.ELOOP, f"too many symbolic links under {directory}")
    path = os.path.abspath(directory)
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags | os.O_DIRECTORY)
    try:
        problem = _dir_problem(os.fstat(fd), "/")
        if problem is not None:
            raise UntrustedPath(errno.EPERM, problem)
        done = "/"
        parts = [part for part in path.split("/") if part]
        for i, part in enumerate(parts):
            where = os.path.join(done, part)
            nfd = os.open(part, flags, dir_fd=fd)
            st = os.fstat(nfd)
            if stat.S_ISLNK(st.st_mode):
                os.close(nfd)
                link = os.lstat(where)
                if link.st_uid not in (os.geteuid(), 0):
                    raise UntrustedPath(errno.EPERM, f"{where} is a link owned by uid "
                                                     f"{link.st_uid}, neither this user nor root")
                target = os.readlink(part, dir_fd=fd)
                rest = os.path.join(os.path.join(done, target), *parts[i + 1:])
                os.close(fd)
                fd = -1
                return open_trusted_dir(os.path.normpath(rest), _depth=_depth + 1)
            problem = _dir_problem(st, where)
            if problem is not None:
                os.close(nfd)
                raise UntrustedPath(errno.EPERM, problem)
            os.close(fd)
            fd, done = nfd, where
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def proc_fd_path(dir_fd: int, name: str) -> str:
    """The path that names ``name`` inside the directory open as ``dir_fd``."""
    return f"/proc/self/fd/{dir_fd}/{name}"
