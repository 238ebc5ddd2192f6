"""Artifacts on disk: keyed by what they depend on, checksummed, committed atomically.

An *artifact* is a directory ``<root>/<kind>-<key>/`` holding payload files (tensors as
safetensors, metadata as JSON) and, written last, ``manifest.json``: the artifact's kind, its
*identity* (a JSON description of everything the result depends on: model parameters and
architecture, data content, task, options), and the size and SHA-256 of every payload file. The
key is a hash of the kind and the identity, so two computations that differ in anything that
changes the result never share a directory (docs/architecture.md §7).

* **Atomic commits.** A writer fills a private temporary directory (named after its host and
  process), writes the manifest last, syncs, and renames the directory into place. A reader
  sees the whole artifact or none of it; a crash leaves only a temporary directory, which the
  next :class:`ArtifactStore` on that directory removes once its writer is gone.
* **Concurrent writers** never mix files: each writes its own temporary directory; the first
  rename wins and a later writer discards its copy and uses the committed one.
* **Verified loads.** Loading checks the manifest, the identity and every file's size and
  checksum before any payload is read; a damaged artifact raises :class:`ArtifactError` naming
  the file, what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from infkit._version import __version__
from infkit.errors import ArtifactError, ArtifactRemovedError, InvalidInputError

#: version of the artifact layout; a different one is refused with a clear error
FORMAT = 1
MANIFEST = "manifest.json"
#: temporary directories of writers that are gone (or older than this) are removed
STALE_SECONDS = 24 * 3600
_TMP = ".tmp-"
_TRASH = ".trash-"
#: the prefixes of the store's own temporary entries (a writer's staging, a removal's)
STORE_TEMPORARY = (_TMP, _TRASH)
#: how long ``save(..., overwrite=True)`` retries reading back an artifact another writer
#: replaces at the same time (writers of one run replacing one piece: torchrun's ranks)
OVERWRITE_WAITS, OVERWRITE_WAIT_SECONDS = 100, 0.05
_T = TypeVar("_T")


def unwritable(root: Path, error: OSError) -> ArtifactError:
    """The refusal of a directory of artifacts this process cannot make or write in."""
    said = error.strerror or type(error).__name__
    return ArtifactError(
        f"cannot write in {root} ({said}): infkit commits its artifacts there (a workdir, "
        "factors_dir or save path). Give a directory this process can write in, or make it "
        "writable"
    )


# ---------------------------------------------------------------------------- single files
@functools.cache
def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less the process's umask
    (read once; ``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_target(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` to write and rename into place, with the mode a file
    written directly would have (``mkstemp`` makes it private, 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if hasattr(os, "fchmod"):  # (POSIX)
        os.fchmod(fd, _file_mode())
    return fd, tmp


def save_tensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` (safetensors) atomically."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata
        )
        # (safetensors writes a file of its own in tmp's place, private: a tester's
        # scores.safetensors was 0600 beside 0644 files)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def tensors_file(directory: Path, name: str = "tensors") -> Path:
    """The file of an artifact's tensor payload ``name`` in its ``directory``."""
    return directory / f"{name}.safetensors"


def load_tensors(path: str | Path, skip: Collection[str] = ()) -> dict[str, Tensor]:
    """Read a safetensors file (but the tensors named in ``skip``, which stay on disk); a
    damaged or missing file raises ArtifactError naming it."""
    file = TensorFile(path)
    return {name: file.get(name) for name in file.names() if name not in skip}


class TensorFile:
    """A safetensors file read one tensor at a time (:meth:`get`), refused once replaced.

    Each tensor is copied into memory of PyTorch's own allocator: the file's buffer may sit at
    any alignment, and BLAS kernels can round differently on unaligned data, so a reloaded
    answer would not be bit-identical to the saved run's. The file is opened (memory-mapped) for
    one tensor at a time: the mapped pages a copy reads stay resident until the file is closed,
    and opened once for all of them a load's peak was twice the tensors' bytes (1.59 against
    0.91 GiB for 0.68 GiB of Kronecker factors). A file replaced or rewritten after this object
    was made (another run writing the same directory) raises ArtifactError rather than mix
    tensors of two files.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._state: tuple[int, int, int, int] | None = None  # (none yet to compare with)
        self._state = self._checked(lambda: _file_state(self.path))

    def names(self) -> list[str]:
        """The names of the file's tensors."""

        def read() -> list[str]:
            with safe_open(str(self.path), framework="pt") as f:
                return list(f.keys())

        return self._checked(read)

    def get(self, name: str) -> Tensor:
        """The tensor ``name``, a copy of its own."""

        def read() -> Tensor:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(name).clone()

        return self._checked(read)

    def _checked(self, read: Callable[[], _T]) -> _T:
        try:
            value = read()
            changed = self._state is not None and _file_state(self.path) != self._state
        except FileNotFoundError as error:
            if self._state is None:  # never there: the usual message
                raise ArtifactError(
                    f"{self.path} cannot be read as tensors (it does not exist): delete its "
                    "artifact's directory (or pass overwrite=True) to recompute it"
                ) from error
            raise ArtifactRemovedError(
                f"{self.path} was removed while its tensors were read (another run sharing "
                "the directory committed what replaces it?); if it was removed by hand, delete "
                "its artifact's directory (or pass overwrite=True) to recompute it"
            ) from error
        except (SafetensorError, OSError, ValueError) as error:
            raise ArtifactError(
                f"{self.path} cannot be read as tensors ({type(error).__name__}: {error}); the "
                "file is damaged or incomplete: delete it (or pass overwrite=True) to recompute it"
            ) from error
        if changed:  # its tensors would come from two files
            raise ArtifactError(
                f"{self.path} was replaced while its tensors were read (another run writing the "
                "same directory, with overwrite=True?): run again once that run is done, or give "
                "each run a directory of its own"
            )
        return value


def _file_state(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten: device, inode, size, mtime (ns)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def save_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_csv(
    path: str | Path, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] = ()
) -> Path:
    """Write ``rows`` (mappings with the same keys) as CSV to ``path`` atomically; floats with
    every digit (``repr``). For no rows, the header of ``fieldnames`` alone, or nothing without
    them."""
    path = Path(path)
    if not rows and not fieldnames:
        return path
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else list(fieldnames))
            writer.writeheader()
            writer.writerows(
                {k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_json(path: str | Path, remedy: str = "") -> Any:
    """Read a JSON file; a damaged or missing file raises ArtifactError naming it, ended by
    ``remedy`` (default: delete it, or recompute it with ``overwrite=True``)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as error:
        remedy = remedy or "delete it (or pass overwrite=True) to recompute it"
        raise ArtifactError(
            f"{path} cannot be read as JSON ({type(error).__name__}: {error}); the file is "
            f"damaged or incomplete: {remedy[0].lower()}{remedy[1:]}"
        ) from error


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(obj: Any) -> str:
    """A canonical JSON text of an identity (sorted keys, no whitespace)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def differences(expected: Any, found: Any, prefix: str = "") -> list[str]:
    """The paths at which two identities differ, e.g. ``["data", "options.fisher"]``."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for key in sorted(set(expected) | set(found)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in expected or key not in found:
                out.append(where)
            else:
                out += differences(expected[key], found[key], where)
        return out
    return [] if canonical(expected) == canonical(found) else [prefix or "(value)"]


# ---------------------------------------------------------------------------- artifacts
@dataclass(frozen=True)
class Artifact:
    """A committed, verified artifact.

    Attributes:
        path: its directory.
        kind: what it is (``"retrain"``, ``"kronecker-factors"``, ...).
        identity: what it depends on (JSON).
        info: free JSON written with it (settings, diagnostics).
    """

    path: Path
    kind: str
    identity: dict[str, Any]
    info: dict[str, Any]

    def tensors(self, name: str = "tensors", skip: Collection[str] = ()) -> dict[str, Tensor]:
        """The tensors of payload ``name`` (verified when the artifact was loaded), but those
        named in ``skip``."""
        return load_tensors(tensors_file(self.path, name), skip)

    def json(self, name: str) -> Any:
        """The JSON of payload ``name``."""
        return load_json(self.path / f"{name}.json")


class ArtifactStore:
    """A directory of artifacts (see the module docstring).

    Args:
        root: the directory (created when missing). Opening it removes the temporary
            directories of writers that have exited (a crash's leftovers).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise InvalidInputError(f"{self.root} is a file, not a directory of artifacts")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # (a path under a file, a folder one may not write in)
            raise unwritable(self.root, error) from error
        self.clean()

    def check_writable(self) -> None:
        """Refuse a store this process cannot write in, before a computation that commits to
        it (a tester's unwritable workdir raised a raw PermissionError after the whole factor
        pass). A store one only reads (a finished run's) is not checked."""
        try:
            probe = Path(tempfile.mkdtemp(prefix=f"{_TMP}probe-", dir=self.root))
        except OSError as error:
            raise unwritable(self.root, error) from error
        shutil.rmtree(probe, ignore_errors=True)

    # ------------------------------------------------------------------ naming
    @staticmethod
    def key(kind: str, identity: Mapping[str, Any]) -> str:
        """The artifact's key: a hash of its kind, its identity and the layout format."""
        text = canonical({"kind": kind, "identity": identity, "format": FORMAT})
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, kind: str, identity: Mapping[str, Any]) -> Path:
        """Where the artifact of this kind and identity lives."""
        return self.root / f"{kind}-{self.key(kind, identity)}"

    def committed(self, kind: str) -> list[Path]:
        """The committed artifact directories of ``kind``."""
        return sorted(
            p for p in self.root.glob(f"{kind}-*") if p.is_dir() and not p.name.startswith(".")
        )

    def mark_used(self, path: Path) -> None:
        """Set the commit time of the artifact at ``path`` (its manifest's modification time,
        which orders :func:`~infkit.shards.read_scores`) to now: a call that reads it back is
        the latest run of it. Contents untouched; a read-only workdir is left as it is."""
        with contextlib.suppress(OSError):
            os.utime(path / MANIFEST)

    # ------------------------------------------------------------------ reading
    def load(self, kind: str, identity: Mapping[str, Any], remedy: str = "") -> Artifact | None:
        """The verified artifact of this kind and identity, or None when there is none.

        ``remedy``: what to do about a damaged one (:meth:`verify`'s default otherwise).

        Raises:
            ArtifactError: the directory exists but is damaged, or was made for another
                identity (it names the file, what differs and what to do).
        """
        path = self.path(kind, identity)
        if not path.exists():
            return None
        return self.verify(path, kind, dict(identity), remedy)

    def verify(
        self,
        path: Path,
        kind: str,
        identity: dict[str, Any] | None = None,
        remedy: str = "",
    ) -> Artifact:
        """Check an artifact directory: manifest, identity (when given) and every checksum.

        ``remedy`` ends the messages about a damaged artifact (default: delete the directory or
        recompute it with ``overwrite=True``, the option of the computations that write it).
        """
        remedy = remedy or f"Delete {path} or pass overwrite=True to recompute it"
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise ArtifactError(
                f"{path} has no {MANIFEST}: it was not committed (an older infkit, or files "
                "copied by hand). " + remedy
            )
        manifest = load_json(manifest_path, remedy)  # (a save's: "save it again", not overwrite)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise ArtifactError(
                f"{manifest_path} is of format {found!r}; this infkit reads format {FORMAT}. "
                + remedy
            )
        if manifest.get("kind") != kind:
            raise ArtifactError(
                f"{manifest_path} describes a {manifest.get('kind')!r} artifact, not {kind!r}"
            )
        named = self.path(kind, manifest.get("identity") or {}).name
        if identity is None and path.resolve().name != named:
            # read by its directory (a saved Influence): the name is the recorded identity's key
            raise ArtifactError(
                f"{path} is not named for the computation its manifest records (its key would be "
                f"{named}): an artifact renamed, or copied in by hand under another's name, is "
                "not read. " + remedy
            )
        if identity is not None and canonical(manifest.get("identity")) != canonical(identity):
            changed = ", ".join(differences(identity, manifest.get("identity")))
            raise ArtifactError(
                f"{path} was made for another computation (differs in: {changed}): its manifest "
                "does not match its name. " + remedy
            )
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise ArtifactError(f"{manifest_path} lists no files; delete the directory")
        for name, expected in files.items():
            file = path / name
            if not file.exists():
                raise ArtifactError(f"{file} is missing from a committed artifact. " + remedy)
            size = file.stat().st_size
            if size != expected.get("bytes"):
                raise ArtifactError(
                    f"{file} is damaged: it has {size} bytes where {MANIFEST} recorded "
                    f"{expected.get('bytes')}. " + remedy
                )
            if file_digest(file) != expected.get("sha256"):
                raise ArtifactError(
                    f"{file} is damaged: its contents changed since it was committed (its "
                    f"SHA-256 checksum differs from the one {MANIFEST} recorded; the size, "
                    f"{size} bytes, is the same). " + remedy
                )
        return Artifact(path, kind, manifest.get("identity") or {}, manifest.get("info") or {})

    def others(self, kind: str, identity: Mapping[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
        """Committed artifacts of ``kind`` made for another identity, with their identities."""
        own = self.path(kind, identity)
        out = []
        for path in self.committed(kind):
            if path == own:
                continue
            try:
                manifest = load_json(path / MANIFEST)
            except ArtifactError:
                manifest = {}
            found = manifest.get("identity") if isinstance(manifest, dict) else None
            out.append((path, found if isinstance(found, dict) else {}))
        return out

    # ------------------------------------------------------------------ writing
    def save(
        self,
        kind: str,
        identity: Mapping[str, Any],
        *,
        tensors: Mapping[str, Mapping[str, Tensor]] | None = None,
        documents: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Artifact:
        """Commit an artifact atomically; return it as loaded back (verified).

        Args:
            kind: what it is.
            identity: what it depends on (JSON).
            tensors: payload name -> tensors, each written as ``<name>.safetensors``.
            documents: payload name -> JSON, each written as ``<name>.json``.
            info: free JSON for the manifest (settings, diagnostics).
            overwrite: replace a committed artifact of the same identity.
        """
        final = self.path(kind, identity)
        tmp = self.root / f"{_TMP}{kind}-{self.key(kind, identity)}-{_writer()}"
        try:
            tmp.mkdir(parents=True)
        except OSError as error:
            raise unwritable(self.root, error) from error
        try:
            files: dict[str, dict[str, Any]] = {}
            for name, values in (tensors or {}).items():
                target = tensors_file(tmp, name)
                save_file({k: v.detach().contiguous().cpu() for k, v in values.items()}, target)
                os.chmod(target, _file_mode())  # (safetensors makes its files private, 0600)
                _sync_file(target)
                files[target.name] = _describe(target)
            for name, value in (documents or {}).items():
                target = tmp / f"{name}.json"
                _write_json(target, value)
                files[target.name] = _describe(target)
            manifest = {
                "format": FORMAT,
                "kind": kind,
                "identity": dict(identity),
                "files": files,
                "info": dict(info or {}),
                "written": {
                    "infkit": __version__,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host": socket.gethostname(),
                },
            }
            _write_json(tmp / MANIFEST, manifest)
            _sync_directory(tmp)
            self._commit(tmp, final, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _sync_directory(self.root)
        # another writer replacing it too may hold it aside for a moment: read it again
        for _ in range(OVERWRITE_WAITS - 1 if overwrite else 0):
            with contextlib.suppress(ArtifactError):
                return self.verify(final, kind, dict(identity))
            time.sleep(OVERWRITE_WAIT_SECONDS)
        return self.verify(final, kind, dict(identity))

    def _commit(self, tmp: Path, final: Path, overwrite: bool) -> None:
        trash = self.root / f"{_TRASH}{final.name}-{_writer()}"
        if final.exists() and overwrite:
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, trash)
        try:
            os.rename(tmp, final)  # atomic; fails when another writer committed first
        except OSError:
            if not final.exists():
                raise
            # another writer won the race (with overwrite: replaced it as this one would
            # have, the same computation): its artifact stands, ours is discarded
        finally:
            if overwrite:
                shutil.rmtree(trash, ignore_errors=True)

    def scratch(self, label: str) -> Path:
        """A new private directory for this writer's uncommitted working files (``label`` names
        what they are). The caller removes it when done; a crash's leftover is removed by the
        next store opened on this root once the writer is gone, as a writer's temporary
        directory is."""
        path = self.root / f"{_TMP}{label}-{_writer()}"
        path.mkdir(parents=True)
        return path

    def remove(self, path: Path) -> None:
        """Delete a committed artifact (used by ``overwrite=True`` for stale ones)."""
        trash = self.root / f"{_TRASH}{path.name}-{_writer()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def clean(self) -> list[Path]:
        """Remove the temporary and trash directories of writers that are gone."""
        removed = []
        for path in list(self.root.glob(f"{_TMP}*")) + list(self.root.glob(f"{_TRASH}*")):
            if _abandoned(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def __iter__(self) -> Iterator[Path]:
        return iter(p for p in sorted(self.root.iterdir()) if not p.name.startswith("."))


# ---------------------------------------------------------------------------- helpers
def _host() -> str:
    """This machine's name, without the dashes that separate the parts of a writer's name."""
    return socket.gethostname().replace("-", "_")


def _writer() -> str:
    """A name unique to this writer: host, process and a random part."""
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _abandoned(path: Path) -> bool:
    """Whether a temporary directory's writer is gone (same host, dead process) or it is old."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_SECONDS:
        return True
    parts = path.name.rsplit("-", 3)  # ...-<host>-<pid>-<random>
    if len(parts) < 4 or parts[1] != _host():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OSError):
        return False
    return False


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _sync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _sync_directory(path: Path) -> None:
    """fsync a directory so that renames and new files in it are durable (POSIX)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
