"""Writing outputs so that a failure is one clear line and never leaves a half-written file in place, and
checking saved folders against the manifest they were written with.

Every writer of the package goes through `writing`: checkpoints and `best` of every stage, the reward
model, metrics rows, `eval --out/--json`, `tag export`, the feature cache. An I/O failure (no space, no
permission, a folder that vanished) becomes a `WriteError` whose one-line message names the path, what was
being written and the free space there; the CLI prints it without a traceback. The libraries underneath
report these failures in their own ways (safetensors and tokenizers: `... (os error 28)`; torch's zip
writer: "unexpected pos" with no reason at all), so `as_os_error` recovers the OS error from each.

`atomic_dir` and `atomic_file` write under a temporary name and rename into place, removing the temporary
on failure: what had the name before (an earlier checkpoint, `best`, an earlier export) is untouched by a
failed write, and a crash (SIGKILL) leaves only a `.tmp` that the next start removes.

A folder written by `atomic_dir` holds `manifest.json`: each file's size and SHA-256. `verify_manifest`
(`--resume`, `load_model`) names a file that is missing, truncated or changed. SHA-256 because it is the
standard (`sha256sum FILE` checks one by hand) and fast enough on CPUs with SHA instructions: on one core
of the project's machine a 0.94 GB checkpoint (weights + optimizer state) hashed in 1.0 s, against 2.0 s
to write its files and 1.6 s more to flush them to disk (bench/manifest_cost.py, bench/RESULTS.md); files
are hashed side by side. CRC32 was 2.4x faster, but is a 32-bit check.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2mm.errors import DamagedFileError, WriteError, add_hint

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt2mm-manifest/1"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error shows itself


# --- I/O failures as one line --------------------------------------------------------------------------------


def as_os_error(e: BaseException) -> OSError | None:
    """The operating-system error behind an exception raised while writing, or None for anything else (a
    bug stays a traceback): an OSError itself, one a library re-raised as its own type with the OS error's
    number in the message (safetensors, tokenizers), or one chained as the cause."""
    if isinstance(e, OSError):
        return e
    found = _RUST_OS_ERROR.search(str(e))
    if found:
        number = int(found.group(1))
        return OSError(number, os.strerror(number))
    if isinstance(e.__cause__, OSError):
        return e.__cause__
    return None


def free_space(path: str | os.PathLike) -> str:
    """'4.6 MB free on /out' for the file system that holds `path` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    return f"{human_bytes(free)} free on {p}"


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def describe_failure(path: str | os.PathLike, what: str, error: OSError) -> str:
    """The one line: what could not be written where, why (with the errno's name) and the free space."""
    target = Path(error.filename) if getattr(error, "filename", None) else Path(path)
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno in errno_codes.errorcode:
        reason += f" ({errno_codes.errorcode[error.errno]})"
    parent = Path(path).parent
    while parent.name.endswith(".tmp"):  # the space of the folder the user knows, not of our temporary
        parent = parent.parent
    gone = "" if parent.exists() else f"; the folder {parent} is gone"
    return f"cannot write {what} to {target}: {reason}{gone}; {free_space(parent)}"


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn an I/O failure in the body into a `WriteError` naming `path` (or the file the error names),
    `what` was being written (e.g. "checkpoint-20") and the free space. Other errors pass through, and so
    does a `WriteError` from an inner `writing` (which named the file more closely)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        error = as_os_error(e)
        if error is None:
            raise
        raise WriteError(describe_failure(path, what, error), error.errno) from e


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a temporary path next to `path` for the body to write; it takes the name `path` when the body
    ends without an error, and is removed when it fails (an I/O failure: a `WriteError`)."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    with writing(final, what):
        try:
            yield tmp
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def write_text(path: str | os.PathLike, text: str, what: str) -> None:
    """`path.write_text(text)`, atomically, with `writing`'s message on failure."""
    with atomic_file(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")


def append_line(path: str | os.PathLike, line: str, what: str) -> None:
    """Append `line` (and a newline) to a log file whole or not at all: a failed write is cut back off, so a
    full disk never leaves a torn last row (`metrics.jsonl`)."""
    data = (line + "\n").encode("utf-8")
    with writing(path, what):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


class _RecordingFile:
    """A file whose write errors are kept: torch's zip writer replaces them by "unexpected pos"."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, raising the OS error itself (with the file's name) when a write fails."""
    import torch

    with open(path, "wb") as f:
        recording = _RecordingFile(f)
        try:
            torch.save(obj, recording)
        except RuntimeError as e:
            if recording.error is None:
                raise
            error = recording.error
            raise OSError(error.errno, error.strerror, str(path)) from e


# --- atomic folders and their manifests -----------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """The body writes into the temporary folder it is given (`FINAL.tmp`); when it ends without an error,
    `manifest.json` is added and the folder takes the name `final` (replacing what had it). On any failure
    the temporary folder is removed and `final` is as it was; an I/O failure is a `WriteError` naming
    `what` (default: the folder's name). The parent folder must exist: one that vanished is reported, not
    silently recreated."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    created = False
    try:
        with writing(tmp, what or final.name):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            created = True
            yield tmp
            write_manifest(tmp)
            commit_dir(tmp, final)
    except BaseException as e:
        if created:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteError):
            removed = [f"the unfinished {tmp.name} was removed"] if created and not tmp.exists() else []
            kept = [f"{final.name} is as it was"] if final.exists() else []
            add_hint(e, "; ".join(removed + kept))
        raise


def commit_dir(tmp: Path, final: Path) -> None:
    """Give a written temporary folder its final name, replacing what had it (moved to `FINAL.old` first and
    put back if the rename fails; `recover_interrupted_saves` puts it back after a crash in between)."""
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None and not final.exists():
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_saves(folder: Path) -> list[str]:
    """After a crash: a `NAME.old` whose `NAME` is missing (killed between `commit_dir`'s two renames) is
    put back, other `.old` and every `.tmp` folder removed. Returns what was put back."""
    restored = []
    for old in sorted(folder.glob("*.old")):
        final = old.with_name(old.name[: -len(".old")])
        if old.is_dir() and not final.exists():
            old.rename(final)
            restored.append(final.name)
        elif old.is_dir():
            shutil.rmtree(old)
    for stale in folder.glob("*.tmp"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    return restored


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> list[str]:
    """The SHA-256 of each file, several files at once (hashlib releases the GIL: the weights and the
    optimizer state of a checkpoint hash side by side)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(folder: Path) -> dict[str, Any]:
    """`folder/manifest.json`: the size and SHA-256 of every file under `folder` (but itself)."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest}
        for p, digest in zip(paths, sha256_files(paths))
    }
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def verify_manifest(folder: str | os.PathLike) -> bool:
    """Check every file `folder/manifest.json` lists: present, of its size, of its SHA-256. True when they
    all are, False when the folder has no manifest (written before manifests: nothing to check against);
    a `DamagedFileError` naming the first file that fails (or the manifest itself) otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError(f"algorithm {manifest.get('algorithm')!r}, files {type(files).__name__}")
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedFileError(f"{path}: not a readable manifest ({type(e).__name__}: {e})") from None
    for name, size, _ in entries:  # the cheap checks first, of every file
        file = folder / name
        if not file.is_file():
            raise DamagedFileError(f"{file}: missing (its manifest lists {size:,} bytes)")
        actual = file.stat().st_size
        if actual != size:
            what = "truncated" if actual < size else "grown"
            raise DamagedFileError(f"{file}: {actual:,} bytes, its manifest says {size:,} ({what})")
    actual_digests = sha256_files([folder / name for name, _, _ in entries])
    for (name, _, digest), actual_digest in zip(entries, actual_digests):
        if actual_digest != digest:
            raise DamagedFileError(
                f"{folder / name}: its SHA-256 differs from its manifest's (the file changed after it was "
                "written: a damaged disk, copy or edit)"
            )
    return True
