"""File operations of the guest agent (standard library only).

The agent is PID 1 inside the sandbox's own mount namespace and root, so every path it
opens is already the sandbox's: ``..``, absolute paths and symlinks planted by the sandbox
resolve inside the sandbox's filesystem by construction. Paths are still checked (string,
no NUL, bounded length), normalised, and relative ones resolve against /workspace.

Bodies stream: an upload is copied from the request body to a temporary file beside the
target in 256 KiB pieces and renamed into place; a download is a generator of pieces sent
chunked. Nothing holds a whole file. Errors answer ``{"error": {"code", "message", "field"}}``.
"""

import errno
import json
import os
import stat as stat_mod
import threading
import time

from _http import HTTPError, Response, json_response

CHUNK = 256 * 1024
MAX_PATH = 4096
MAX_LIST_ENTRIES = 20000  # a listing is one JSON document: keep it a few MiB at most
MAX_DEPTH = 64
UPLOAD_IDLE_TIMEOUT = 300.0  # an upload whose body stops arriving for this long is dropped
WATCH_HEARTBEAT = 1.0  # a watch sends a heartbeat line this often (detects a gone client)
MAX_WATCHES = 64
MAX_WATCH_DIRS = 8192


class FileError(Exception):
    def __init__(self, status, code, message, field="path"):
        Exception.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def _error_response(e):
    err = {"code": e.code, "message": e.message}
    if e.field:
        err["field"] = e.field
    body = json.dumps({"error": err}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return Response(e.status, body, [("Content-Type", "application/json")])


def _os_error(e, field, path):
    """Maps an OSError to a FileError naming the input."""
    shown = path if len(path) <= 300 else path[:300] + "..."
    n = e.errno
    if n == errno.ENOENT:
        return FileError(404, "file_not_found", "%s: no such file or directory: %s" % (field, shown), field)
    if n == errno.ENOTDIR:
        return FileError(400, "not_a_directory", "%s: a component of %s is not a directory" % (field, shown), field)
    if n == errno.EISDIR:
        return FileError(400, "is_a_directory", "%s: %s is a directory" % (field, shown), field)
    if n == errno.EEXIST:
        return FileError(409, "file_exists", "%s: %s already exists" % (field, shown), field)
    if n == errno.ENOTEMPTY:
        return FileError(409, "directory_not_empty", "%s: directory %s is not empty (use recursive)" % (field, shown), field)
    if n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FileError(413, "no_space", "%s: no space left in the sandbox writing %s" % (field, shown), field)
    if n in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EBUSY, errno.ETXTBSY):
        return FileError(403, "permission_denied", "%s: not permitted on %s: %s" % (field, shown, e.strerror), field)
    if n in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.EXDEV):
        return FileError(400, "invalid_path", "%s: %s: %s" % (field, shown, e.strerror), field)
    return FileError(500, "file_error", "%s: %s: %s" % (field, shown, e.strerror or e), field)


def _bool(q, name, default=False):
    v = q.get(name)
    if v is None or v == "":
        return default
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        low = v.lower()
        if low in ("1", "true", "yes"):
            return True
        if low in ("0", "false", "no"):
            return False
    raise FileError(400, "invalid_value", "%s: must be true or false" % name, name)


def _mode(v, name="mode"):
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        v = None
    elif isinstance(v, str):
        try:
            v = int(v, 8)
        except ValueError:
            v = None
    elif not isinstance(v, int):
        v = None
    if v is None or not 0 <= v <= 0o7777:
        raise FileError(400, "invalid_value", "%s: must be an octal string from 0 to 7777" % name, name)
    return v


def _type_of(st_mode):
    if stat_mod.S_ISREG(st_mode):
        return "file"
    if stat_mod.S_ISDIR(st_mode):
        return "dir"
    if stat_mod.S_ISLNK(st_mode):
        return "symlink"
    return "other"


def _info(path, name=None, st=None):
    if st is None:
        st = os.lstat(path)
    info = {
        "name": name if name is not None else (os.path.basename(path) or "/"),
        "path": path,
        "type": _type_of(st.st_mode),
        "size": st.st_size,
        "mode": "%04o" % stat_mod.S_IMODE(st.st_mode),
        "mtime": _iso(st.st_mtime_ns),
    }
    if info["type"] == "symlink":
        try:
            info["target"] = os.readlink(path)
        except OSError:
            info["target"] = None
    return info


def _iso(ns):
    s, frac = divmod(ns // 1000, 1000000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + ".%06dZ" % frac


def _norm_member(name):
    """A tar member name -> its relative parts, or None if it would escape the directory."""
    if not name or "\0" in name or name.startswith("/") or len(name) > MAX_PATH:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    return parts


def _inside(root_real, path):
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip("/") + "/")


class _Body:
    """A file-like view of a request body for tarfile (stream mode)."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = b""

    def read(self, n=-1):
        if n is None or n < 0:
            out = [self.buf]
            self.buf = b""
            while True:
                d = self.stream.read(CHUNK)
                if not d:
                    return b"".join(out)
                out.append(d)
        while len(self.buf) < n:
            d = self.stream.read(max(n - len(self.buf), 65536))
            if not d:
                break
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class Files:
    def __init__(self, agent):
        self.agent = agent
        self.workspace = agent.workspace
        self.lock = threading.Lock()
        self.transfers = 0
        self.watches = 0

    def routes(self):
        def wrap(fn, streams=False):
            def handler(req):
                try:
                    return fn(req)
                except FileError as e:
                    return _error_response(e)

            if streams:
                handler.streams_request_body = True
            return handler

        return {
            "/files": {"GET": wrap(self.h_download), "PUT": wrap(self.h_upload, True)},
            "/files/list": {"GET": wrap(self.h_list)},
            "/files/stat": {"GET": wrap(self.h_stat)},
            "/files/mkdir": {"POST": wrap(self.h_mkdir)},
            "/files/remove": {"POST": wrap(self.h_remove)},
            "/files/rename": {"POST": wrap(self.h_rename)},
            "/files/upload-tar": {"POST": wrap(self.h_upload_tar, True)},
            "/files/download-tar": {"GET": wrap(self.h_download_tar)},
            "/files/watch": {"GET": wrap(self.h_watch)},
        }

    def status(self):
        with self.lock:
            return {"file_transfers": self.transfers, "file_watches": self.watches}

    def _count(self, kind, delta):
        with self.lock:
            setattr(self, kind, getattr(self, kind) + delta)

    # -- inputs ------------------------------------------------------------------------
    def resolve(self, value, field="path"):
        if value is None or value == "":
            raise FileError(400, "missing_field", "%s: required" % field, field)
        if not isinstance(value, str):
            raise FileError(400, "invalid_type", "%s: must be a string" % field, field)
        if len(value) > MAX_PATH:
            raise FileError(400, "invalid_path", "%s: longer than %d characters" % (field, MAX_PATH), field)
        if "\0" in value:
            raise FileError(400, "invalid_path", "%s: must not contain NUL" % field, field)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FileError(400, "invalid_path", "%s: must be valid UTF-8" % field, field) from None
        path = os.path.normpath(os.path.join(self.workspace, value))
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
        return path

    @staticmethod
    def _body(req):
        try:
            return req.json()
        except HTTPError as e:
            raise FileError(400, e.code, e.message, None) from None

    # -- single files ------------------------------------------------------------------
    def h_download(self, req):
        path = self.resolve(req.query.get("path"))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise _os_error(e, "path", path) from None
        try:
            st = os.fstat(fd)
            if stat_mod.S_ISDIR(st.st_mode):
                raise FileError(400, "is_a_directory", "path: %s is a directory (use download-tar)" % path[:300])
            if not stat_mod.S_ISREG(st.st_mode):
                raise FileError(400, "not_a_regular_file", "path: %s is not a regular file" % path[:300])
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        headers = [("Content-Type", "application/octet-stream"), ("X-File-Size", str(st.st_size)),
                   ("X-File-Mode", "%04o" % stat_mod.S_IMODE(st.st_mode)),
                   ("X-File-Mtime", _iso(st.st_mtime_ns))]
        self._count("transfers", 1)
        return Response(200, self._read_chunks(fd), headers)

    def _read_chunks(self, fd):
        try:
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    return
                yield data
        finally:
            os.close(fd)
            self._count("transfers", -1)

    def h_upload(self, req):
        q = req.query
        path = self.resolve(q.get("path"))
        mode = _mode(q.get("mode"))
        parents = _bool(q, "parents")
        overwrite = _bool(q, "overwrite", True)
        parent = os.path.dirname(path)
        if path == "/":
            raise FileError(400, "is_a_directory", "path: / is a directory")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            if e.errno != errno.ENOTDIR or not parents:
                raise _os_error(e, "path", path) from None
            raise FileError(400, "not_a_directory", "path: a component of %s is not a directory" % path[:300]) from None
        if st is not None:
            if stat_mod.S_ISDIR(st.st_mode):
                raise FileError(400, "is_a_directory", "path: %s is a directory" % path[:300])
            if not overwrite:
                raise FileError(409, "file_exists", "path: %s already exists" % path[:300])
            if mode is None:
                mode = stat_mod.S_IMODE(st.st_mode)
        if mode is None:
            mode = 0o644
        if parents:
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise _os_error(e, "path", parent) from None
        elif not os.path.isdir(parent):
            if os.path.lexists(parent):
                raise FileError(400, "not_a_directory", "path: %s is not a directory" % parent[:300])
            raise FileError(404, "file_not_found", "path: parent directory %s does not exist (use parents=true)" % parent[:300])
        tmp = os.path.join(parent, ".%s.sandboxd-upload-%s" % (os.path.basename(path)[:100], os.urandom(6).hex()))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise _os_error(e, "path", path) from None
        self._count("transfers", 1)
        done = False
        size = 0
        try:
            try:
                req.stream._conn.sock.settimeout(UPLOAD_IDLE_TIMEOUT)
            except (AttributeError, OSError):
                pass
            stream = req.stream
            while True:
                try:
                    data = stream.read(CHUNK)
                except (EOFError, OSError):
                    raise FileError(400, "incomplete_body", "body: the upload ended early", "body") from None
                if not data:
                    break
                size += len(data)
                view = memoryview(data)
                while view:
                    try:
                        n = os.write(fd, view)
                    except OSError as e:
                        raise _os_error(e, "path", path) from None
                    view = view[n:]
            try:
                os.fchmod(fd, mode)
                os.close(fd)
                fd = -1
                os.replace(tmp, path)
            except OSError as e:
                raise _os_error(e, "path", path) from None
            done = True
        finally:
            if fd >= 0:
                os.close(fd)
            if not done:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            self._count("transfers", -1)
        return json_response(_info(path), 201 if st is None else 200)

    # -- metadata ------------------------------------------------------------------------
    def h_stat(self, req):
        path = self.resolve(req.query.get("path"))
        try:
            info = _info(path)
        except OSError as e:
            raise _os_error(e, "path", path) from None
        return json_response(info)

    def h_list(self, req):
        q = req.query
        path = self.resolve(q.get("path") or ".")
        depth = q.get("depth")
        if depth is None or depth == "":
            depth = 1
        else:
            try:
                depth = int(depth)
            except ValueError:
                depth = -1
            if not 1 <= depth <= MAX_DEPTH:
                raise FileError(400, "invalid_value", "depth: must be an integer from 1 to %d" % MAX_DEPTH, "depth")
        try:
            st = os.stat(path)
        except OSError as e:
            raise _os_error(e, "path", path) from None
        if not stat_mod.S_ISDIR(st.st_mode):
            raise FileError(400, "not_a_directory", "path: %s is not a directory" % path[:300])
        entries = []
        truncated = False
        stack = [(path, 1)]
        while stack:
            d, level = stack.pop()
            try:
                it = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError as e:
                if d == path:
                    raise _os_error(e, "path", path) from None
                continue
            subdirs = []
            for e in it:
                if len(entries) >= MAX_LIST_ENTRIES:
                    truncated = True
                    break
                try:
                    info = _info(e.path, e.name, e.stat(follow_symlinks=False))
                except OSError:
                    continue
                if d != path:
                    info["name"] = os.path.relpath(e.path, path)
                entries.append(info)
                if info["type"] == "dir" and level < depth:
                    subdirs.append((e.path, level + 1))
            if truncated:
                break
            stack.extend(reversed(subdirs))
        entries.sort(key=lambda i: i["name"])
        return json_response({"path": path, "entries": entries, "truncated": truncated})

    def h_mkdir(self, req):
        body = self._body(req)
        path = self.resolve(body.get("path"))
        parents = _bool(body, "parents")
        mode = _mode(body.get("mode"))
        if mode is None:
            mode = 0o755
        exist_ok = _bool(body, "exist_ok", parents)
        try:
            if parents:
                os.makedirs(path, mode, exist_ok=exist_ok)
            else:
                os.mkdir(path, mode)
            os.chmod(path, mode)
        except OSError as e:
            if e.errno == errno.EEXIST and exist_ok and os.path.isdir(path):
                pass
            else:
                raise _os_error(e, "path", path) from None
        return json_response(_info(path), 201)

    def h_remove(self, req):
        body = self._body(req)
        path = self.resolve(body.get("path"))
        recursive = _bool(body, "recursive")
        if path == "/":
            raise FileError(400, "invalid_path", "path: refusing to remove /")
        try:
            st = os.lstat(path)
            if stat_mod.S_ISDIR(st.st_mode):
                if recursive:
                    import shutil

                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as e:
            raise _os_error(e, "path", path) from None
        return json_response({"path": path, "removed": True})

    def h_rename(self, req):
        body = self._body(req)
        src = self.resolve(body.get("from"), "from")
        dst = self.resolve(body.get("to"), "to")
        overwrite = _bool(body, "overwrite")
        try:
            os.lstat(src)
        except OSError as e:
            raise _os_error(e, "from", src) from None
        if src == "/" or dst == "/":
            raise FileError(400, "invalid_path", "from: cannot rename /", "from")
        if (dst + "/").startswith(src.rstrip("/") + "/") and dst != src:
            raise FileError(400, "invalid_path", "to: cannot move a directory into itself", "to")
        try:
            if overwrite:
                os.replace(src, dst)
            else:
                # renameat2(RENAME_NOREPLACE) via link+unlink is not atomic for dirs; check then rename
                if os.path.lexists(dst):
                    raise FileError(409, "file_exists", "to: %s already exists (use overwrite)" % dst[:300], "to")
                os.rename(src, dst)
        except OSError as e:
            field = "to" if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR) or \
                (e.errno == errno.ENOENT and os.path.lexists(src)) else "from"
            raise _os_error(e, field, dst if field == "to" else src) from None
        return json_response(_info(dst))

    # -- tar ---------------------------------------------------------------------------
    def _dir_arg(self, req, create=False):
        path = self.resolve(req.query.get("path"))
        if create and _bool(req.query, "parents"):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise _os_error(e, "path", path) from None
        try:
            st = os.stat(path)
        except OSError as e:
            raise _os_error(e, "path", path) from None
        if not stat_mod.S_ISDIR(st.st_mode):
            raise FileError(400, "not_a_directory", "path: %s is not a directory" % path[:300])
        return path

    def h_upload_tar(self, req):
        import tarfile

        root = self._dir_arg(req, create=True)
        root_real = os.path.realpath(root)
        try:
            req.stream._conn.sock.settimeout(UPLOAD_IDLE_TIMEOUT)
        except (AttributeError, OSError):
            pass
        self._count("transfers", 1)
        files = dirs = links = 0
        total = 0
        try:
            try:
                tar = tarfile.open(fileobj=_Body(req.stream), mode="r|*")
            except tarfile.TarError as e:
                raise FileError(400, "invalid_tar", "body: not a tar stream: %s" % e, "body") from None
            except (EOFError, OSError):
                raise FileError(400, "incomplete_body", "body: the upload ended early", "body") from None
            try:
                for m in tar:
                    parts = _norm_member(m.name)
                    if parts is None:
                        raise FileError(400, "unsafe_tar_member", "body: member %r escapes the target directory" % m.name[:300], "body")
                    if not parts:
                        continue
                    dest = os.path.join(root, *parts)
                    if not _inside(root_real, os.path.dirname(dest)):
                        raise FileError(400, "unsafe_tar_member", "body: member %r goes through a link outside the target" % m.name[:300], "body")
                    if m.isdir():
                        os.makedirs(dest, exist_ok=True)
                        os.chmod(dest, (m.mode & 0o777) or 0o755)  # no setuid/setgid/sticky from a tar
                        dirs += 1
                        continue
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    if os.path.isdir(dest) and not os.path.islink(dest):
                        raise FileError(409, "file_exists", "body: member %r would replace a directory" % m.name[:300], "body")
                    if m.issym():
                        target = m.linkname
                        if not target or "\0" in target or target.startswith("/") or \
                                not _inside(root_real, os.path.join(os.path.dirname(dest), target)):
                            raise FileError(400, "unsafe_tar_member", "body: symlink %r points outside the target" % m.name[:300], "body")
                        if os.path.lexists(dest):
                            os.unlink(dest)
                        os.symlink(target, dest)
                        links += 1
                    elif m.islnk():
                        tparts = _norm_member(m.linkname)
                        if not tparts:
                            raise FileError(400, "unsafe_tar_member", "body: hard link %r points outside the target" % m.name[:300], "body")
                        target = os.path.join(root, *tparts)
                        if not _inside(root_real, target):
                            raise FileError(400, "unsafe_tar_member", "body: hard link %r points outside the target" % m.name[:300], "body")
                        if os.path.lexists(dest):
                            os.unlink(dest)
                        os.link(target, dest, follow_symlinks=False)
                        links += 1
                    elif m.isreg():
                        src = tar.extractfile(m)
                        tmp = os.path.join(os.path.dirname(dest), ".%s.sandboxd-tar-%s" % (parts[-1][:100], os.urandom(6).hex()))
                        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                        ok = False
                        try:
                            while True:
                                data = src.read(CHUNK)
                                if not data:
                                    break
                                total += len(data)
                                view = memoryview(data)
                                while view:
                                    view = view[os.write(fd, view):]
                            os.fchmod(fd, (m.mode & 0o777) or 0o644)
                            ok = True
                        finally:
                            os.close(fd)
                            if not ok:
                                try:
                                    os.unlink(tmp)
                                except OSError:
                                    pass
                        os.replace(tmp, dest)
                        try:
                            os.utime(dest, (m.mtime, m.mtime))
                        except (OSError, OverflowError, ValueError):
                            pass
                        files += 1
                    else:
                        raise FileError(400, "unsafe_tar_member", "body: member %r is a device, FIFO or other special file" % m.name[:300], "body")
            except tarfile.TarError as e:
                raise FileError(400, "invalid_tar", "body: malformed tar stream: %s" % e, "body") from None
            except (EOFError, HTTPError):
                raise FileError(400, "incomplete_body", "body: the upload ended early", "body") from None
            except OSError as e:
                if e.errno is None:
                    raise FileError(400, "incomplete_body", "body: the upload ended early", "body") from None
                raise _os_error(e, "path", root) from None
            # drain what tarfile did not read (end-of-archive padding)
            while req.stream.read(CHUNK):
                pass
        finally:
            self._count("transfers", -1)
        return json_response({"path": root, "files": files, "dirs": dirs, "links": links, "bytes": total}, 201)

    def h_download_tar(self, req):
        root = self._dir_arg(req)
        self._count("transfers", 1)
        return Response(200, self._tar_chunks(root), [("Content-Type", "application/x-tar")])

    def _tar_chunks(self, root):
        import tarfile

        try:
            stack = [("", root)]
            while stack:
                rel, d = stack.pop()
                try:
                    entries = sorted(os.scandir(d), key=lambda e: e.name)
                except OSError:
                    continue
                subdirs = []
                for e in entries:
                    name = rel + e.name
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    ti = tarfile.TarInfo(name)
                    ti.mode = stat_mod.S_IMODE(st.st_mode)
                    ti.mtime = int(st.st_mtime)
                    ti.uid, ti.gid = st.st_uid, st.st_gid
                    if stat_mod.S_ISDIR(st.st_mode):
                        ti.type = tarfile.DIRTYPE
                        yield ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                        subdirs.append((name + "/", e.path))
                    elif stat_mod.S_ISLNK(st.st_mode):
                        try:
                            ti.linkname = os.readlink(e.path)
                        except OSError:
                            continue
                        ti.type = tarfile.SYMTYPE
                        yield ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                    elif stat_mod.S_ISREG(st.st_mode):
                        try:
                            fd = os.open(e.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
                        except OSError:
                            continue
                        try:
                            os.set_blocking(fd, True)
                            size = os.fstat(fd).st_size
                            ti.size = size
                            yield ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                            left = size
                            while left > 0:
                                data = os.read(fd, min(CHUNK, left))
                                if not data:  # shrank while we read: pad to the declared size
                                    data = bytes(min(CHUNK, left))
                                left -= len(data)
                                yield data
                            if size % 512:
                                yield bytes(512 - size % 512)
                        finally:
                            os.close(fd)
                stack.extend(reversed(subdirs))
            yield bytes(1024)  # end-of-archive marker
        finally:
            self._count("transfers", -1)

    # -- watch -------------------------------------------------------------------------
    def h_watch(self, req):
        path = self._dir_arg(req)
        recursive = _bool(req.query, "recursive")
        with self.lock:
            if self.watches >= MAX_WATCHES:
                raise FileError(409, "too_many_watches", "path: at most %d watches per sandbox" % MAX_WATCHES)
            self.watches += 1
        try:
            w = _Inotify(path, recursive)
        except OSError as e:
            self._count("watches", -1)
            raise _os_error(e, "path", path) from None
        return Response(200, self._watch_lines(w), [("Content-Type", "application/x-ndjson")])

    def _watch_lines(self, w):
        try:
            yield b'{"type":"ready"}\n'
            while True:
                events = w.read(WATCH_HEARTBEAT)
                if events is None:
                    yield b'{"type":"ping"}\n'
                    continue
                if not events:
                    continue
                out = []
                for ev in events:
                    out.append(json.dumps(ev, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
                yield b"".join(out)
                if w.gone:
                    return
        finally:
            w.close()
            self._count("watches", -1)


# inotify constants (linux/inotify.h)
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_Q_OVERFLOW = 0x4000
IN_ONLYDIR = 0x1000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCH_MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | \
    IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR


class _Inotify:
    def __init__(self, root, recursive):
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.ctypes = ctypes
        self.root = root
        self.recursive = recursive
        self.wds = {}
        self.gone = False
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            n = ctypes.get_errno()
            raise OSError(n, os.strerror(n))
        try:
            self._add(root)
            if recursive:
                self._add_tree(root)
        except BaseException:
            os.close(self.fd)
            raise

    def _add(self, path):
        if len(self.wds) >= MAX_WATCH_DIRS:
            return
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            n = self.ctypes.get_errno()
            if path == self.root:
                raise OSError(n, os.strerror(n))
            return
        self.wds[wd] = path

    def _add_tree(self, top):
        for dirpath, dirnames, _files in os.walk(top):
            for name in dirnames:
                self._add(os.path.join(dirpath, name))

    def read(self, timeout):
        """A list of events, or None after `timeout` seconds without any."""
        import select

        p = select.poll()
        p.register(self.fd, select.POLLIN)
        if not p.poll(int(timeout * 1000)):
            return None
        try:
            buf = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        events = []
        seen_modified = set()
        i = 0
        while i + 16 <= len(buf):
            wd = int.from_bytes(buf[i:i + 4], "little", signed=True)
            mask = int.from_bytes(buf[i + 4:i + 8], "little")
            ln = int.from_bytes(buf[i + 12:i + 16], "little")
            name = buf[i + 16:i + 16 + ln].rstrip(b"\0")
            i += 16 + ln
            if mask & IN_Q_OVERFLOW:
                events.append({"type": "overflow", "path": self.root})
                continue
            base = self.wds.get(wd)
            if base is None:
                continue
            full = os.path.join(base, os.fsdecode(name)) if name else base
            is_dir = bool(mask & IN_ISDIR)
            kind = None
            if mask & (IN_CREATE | IN_MOVED_TO):
                kind = "created"
                if is_dir and self.recursive:
                    self._add(full)
                    self._add_tree(full)
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                kind = "removed"
            elif mask & (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE):
                if not name and base != self.root:
                    continue  # a subdirectory's own attributes: reported by its parent
                if full in seen_modified:
                    continue
                seen_modified.add(full)
                kind = "modified"
            elif mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                if base == self.root:
                    events.append({"type": "removed", "path": base, "is_dir": True})
                    self.gone = True
                continue
            elif mask & IN_IGNORED:
                self.wds.pop(wd, None)
                continue
            if kind is None:
                continue
            if kind != "modified":
                seen_modified.discard(full)
            events.append({"type": kind, "path": full, "is_dir": is_dir})
        return events

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
