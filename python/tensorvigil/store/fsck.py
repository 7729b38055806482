"""Checking and repairing a run directory (``tensorvigil fsck``).

:func:`fsck` checks the manifest, the side files and every shard of every rank: each frame's
header, meta and (unless ``verify_values=False``) payload checksums and codec, and a sealed
shard's index against the frames on disk. With ``repair=True`` it rebuilds the index of every
shard that lacks a valid one (unsealed after a crash, damaged footer or index), so that strict
readers open it with two reads again. A repair never destroys bytes: the repaired shard keeps
the original bytes up to the end of its last COMMIT (or END) frame verbatim, everything after
that point is saved to ``shard-NNNNNNNN.tvs.tail-OFFSET`` beside it, and the new file replaces
the old one atomically (temporary file, fsync, rename). A rank whose writer is alive
(``writer.lock`` held) is only checked (its open shard is reported as ``live``), never
repaired; while repairing a rank fsck holds its lock shared, so no writer can start on it
meanwhile. A sealed shard's tensor index (``shard-NNNNNNNN.tvt``, FORMAT.md §3.8) is compared
byte for byte with what the shard's index gives; a damaged or stale one is rewritten by a
repair (a missing one is not a problem: readers do without it). See docs/RELIABILITY.md.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .. import _core
from ..errors import NotFoundError, StoreIOError, TensorVigilError
from .writer import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME

_RANK_RE = re.compile(r"^rank-(\d{5})$")
_SHARD_RE = re.compile(r"^shard-(\d{8})\.tvs$")
_MAX_MANIFEST = 1 << 20
#: Index states that a repair fixes (see :func:`tensorvigil._core.fsck_check_shard`).
_REPAIRABLE = ("absent", "footer_damaged", "index_corrupt")


@dataclass
class ShardReport:
    """What fsck found (and did) for one shard file.

    ``state`` is ``"ok"`` (sealed, every check passed), ``"live"`` (the open shard of a live
    writer), ``"empty"`` (shorter than a shard header: nothing was ever written),
    ``"unsealed"`` (no index: read by scanning; a repair rebuilds it), ``"damaged"`` (footer or
    index damaged, or corruption after the last commit: a repair rebuilds the index) or
    ``"corrupt"`` (committed data is damaged; fsck cannot repair that, see ``problems``).
    """

    path: str
    rank: int
    seq: int
    state: str
    index_state: str
    frames: int = 0
    tensors: int = 0
    commits: int = 0
    values_checked: int = 0
    #: Frames a repair would leave out (after the last COMMIT/END; they were never visible).
    discard_frames: int = 0
    #: Bytes a repair moves to the ``.tail-OFFSET`` file (torn tail, old index, garbage).
    discard_bytes: int = 0
    problems: list = field(default_factory=list)
    action: str = ""
    #: Whether a repair rebuilds this shard's index (it has none, or a damaged one).
    needs_repair: bool = False
    #: The tensor index beside the shard: "ok", "absent", "corrupt", "stale" (another shard's
    #: or an older one), "orphan" (the shard is not sealed) or "" (not checked: live shard).
    tensor_index: str = ""


@dataclass
class FsckReport:
    """The result of :func:`fsck`: one :class:`ShardReport` per shard, plus run-level problems."""

    run_dir: str
    shards: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    repaired: list = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when nothing needs attention (no problem, nothing to repair)."""
        return (
            not self.problems
            and not self.repaired
            and all(s.state in ("ok", "live", "empty") and not s.problems for s in self.shards)
        )

    def to_json(self) -> dict:
        """A JSON-serialisable summary."""
        return {
            "run": self.run_dir,
            "clean": self.clean,
            "problems": list(self.problems),
            "repaired": list(self.repaired),
            "shards": [
                {
                    "path": s.path,
                    "rank": s.rank,
                    "seq": s.seq,
                    "state": s.state,
                    "index_state": s.index_state,
                    "frames": s.frames,
                    "tensors": s.tensors,
                    "commits": s.commits,
                    "values_checked": s.values_checked,
                    "discard_frames": s.discard_frames,
                    "discard_bytes": s.discard_bytes,
                    "tensor_index": s.tensor_index,
                    "problems": list(s.problems),
                    "action": s.action,
                }
                for s in self.shards
            ],
        }


def _check_manifest(run_dir: str, problems: list) -> None:
    path = os.path.join(run_dir, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise NotFoundError(f"'{run_dir}' is not a tensorvigil run (no {MANIFEST_NAME})") from None
    except OSError as e:
        raise StoreIOError(f"[fsck] cannot read '{path}': {e}") from e
    if len(raw) > _MAX_MANIFEST:
        problems.append(f"{path}: larger than 1 MiB")
        return
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        problems.append(f"{path}: not valid JSON ({e})")
        return
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        problems.append(f"{path}: not a {FORMAT_NAME} manifest")
        return
    v = doc.get("format_version")
    if not (isinstance(v, list) and v and v[0] == FORMAT_VERSION[0]):
        problems.append(f"{path}: unsupported format version {v!r}")


def _check_json_object(path: str, problems: list) -> None:
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        problems.append(f"{path}: not valid JSON ({e})")
        return
    if not isinstance(doc, dict):
        problems.append(f"{path}: not a JSON object")


class _RankLock:
    """Probes (and while repairing, holds) ``writer.lock`` shared; see FORMAT.md §3.6."""

    def __init__(self, rank_dir: str, create: bool) -> None:
        import fcntl

        self.fd: Optional[int] = None
        self.live = False
        path = os.path.join(rank_dir, "writer.lock")
        flags = os.O_RDONLY | (os.O_CREAT if create else 0)
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            self.live = True
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _repair(rep: ShardReport, chk: dict) -> None:
    """Rebuilds ``rep``'s index: verbatim prefix + new index, tail saved, atomic rename."""
    path, upto, size = rep.path, chk["commit_end"], chk["file_size"]
    tmp = path + ".fsck-tmp"
    if os.path.exists(tmp):  # left by an interrupted fsck: ours, never read by readers
        os.unlink(tmp)
    _core.fsck_write_sealed_copy(path, upto, tmp)
    new = _core.fsck_check_shard(tmp, rep.rank, rep.seq, False)
    if (
        new["index_state"] != "sealed"
        or new["scan_end"] != "index"
        or new["committed_steps"] != chk["committed_steps"]
    ):
        os.unlink(tmp)
        raise StoreIOError(
            f"[fsck.repair] the rebuilt copy of '{path}' does not verify; kept the original"
        )
    tail_path = ""
    if size > upto:
        tail_path = f"{path}.tail-{upto}"
        with open(path, "rb") as src, open(tail_path, "xb") as dst:
            src.seek(upto)
            left = size - upto
            while left:
                buf = src.read(min(left, 4 << 20))
                if not buf:
                    break
                dst.write(buf)
                left -= len(buf)
            dst.flush()
            os.fsync(dst.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))
    rep.action = (
        f"rebuilt index: kept {upto} bytes ({chk['commit_frames']} frames, "
        f"{len(chk['committed_steps'])} commits)"
        + (f", moved {size - upto} bytes to {os.path.basename(tail_path)}" if tail_path else "")
    )


def fsck(run_dir: str, *, repair: bool = False, verify_values: bool = True) -> FsckReport:
    """Checks (and with ``repair``, repairs) the run at ``run_dir``.

    Args:
        run_dir: The run directory.
        repair: Rebuild the index of every unsealed or damaged shard (see the module docs).
        verify_values: Decode every stored value and check its checksums (reads everything).

    Returns:
        A :class:`FsckReport`; ``report.clean`` tells whether anything was found.

    Raises:
        NotFoundError: ``run_dir`` is not a run (no manifest).
        StoreIOError: an OS error while reading or repairing.

    Example:
        >>> rep = tv.fsck("runs/exp1", repair=True)
        >>> rep.clean, [s.action for s in rep.shards if s.action]

    """
    run_dir = os.fspath(run_dir)
    report = FsckReport(run_dir)
    _check_manifest(run_dir, report.problems)
    _check_json_object(os.path.join(run_dir, "collections.json"), report.problems)
    try:
        rank_names = sorted(n for n in os.listdir(run_dir) if _RANK_RE.match(n))
    except OSError as e:
        raise StoreIOError(f"[fsck] cannot list '{run_dir}': {e}") from e
    for rname in rank_names:
        rank = int(rname[5:])
        rdir = os.path.join(run_dir, rname)
        if not os.path.isdir(rdir):
            continue
        shards = sorted((int(m.group(1)), n) for n in os.listdir(rdir) if (m := _SHARD_RE.match(n)))
        lock = _RankLock(rdir, create=repair)
        try:
            for i, (seq, name) in enumerate(shards):
                path = os.path.join(rdir, name)
                last = i == len(shards) - 1
                try:
                    chk = _core.fsck_check_shard(path, rank, seq, verify_values)
                except TensorVigilError as e:
                    report.problems.append(str(e))
                    continue
                live = lock.live and last
                report.shards.append(_judge(path, rank, seq, chk, live=live))
                rep = report.shards[-1]
                can_repair = repair and not lock.live and lock.fd is not None
                repaired = False
                if can_repair and rep.needs_repair:
                    _repair(rep, chk)
                    repaired = True
                if rep.state not in ("live", "empty"):
                    _check_tensor_index(rep, can_repair, repaired)
                if rep.action:
                    report.repaired.append(f"{path}: {rep.action}")
        finally:
            lock.close()
    return report


def _check_tensor_index(rep: ShardReport, can_repair: bool, shard_repaired: bool) -> None:
    """Checks (and with ``can_repair``, rewrites) the shard's tensor index."""
    if shard_repaired:  # the shard changed: its tensor index is rebuilt from the new index
        if _core.fsck_rewrite_tensor_index(rep.path, rep.rank, rep.seq):
            rep.action += "; rewrote its tensor index"
        rep.tensor_index = "ok"
        return
    try:
        state, message = _core.fsck_check_tensor_index(rep.path, rep.rank, rep.seq)
    except TensorVigilError:
        return  # the shard's own index is damaged: reported above, a repair rebuilds both
    rep.tensor_index = state
    if state in ("ok", "absent"):
        return
    rep.problems.append(f"tensor index {state}: {message}")
    if rep.state == "ok":
        rep.state = "damaged"
    rep.needs_repair = True
    if can_repair:
        wrote = _core.fsck_rewrite_tensor_index(rep.path, rep.rank, rep.seq)
        rep.action = "rewrote the tensor index" if wrote else "removed the orphan tensor index"
        rep.tensor_index = "ok" if wrote else "absent"


def _judge(path: str, rank: int, seq: int, chk: dict, live: bool) -> ShardReport:
    problems = [f"offset {off}: {msg}" for off, msg in chk["problems"]]
    rep = ShardReport(
        path=path,
        rank=rank,
        seq=seq,
        state="ok",
        index_state=chk["index_state"],
        frames=chk["frames"],
        tensors=chk["tensors"],
        commits=chk["commits"],
        values_checked=chk["values_checked"],
        problems=problems,
    )
    if not chk["has_header"]:
        rep.state = "live" if live else "empty"
        return rep
    if not chk["header_ok"]:
        rep.state = "corrupt"
        return rep
    ist = chk["index_state"]
    rep.needs_repair = ist in _REPAIRABLE and not live
    rep.discard_frames = chk["after_commit"]
    rep.discard_bytes = chk["file_size"] - chk["commit_end"]
    if ist == "sealed":
        rep.discard_frames = rep.discard_bytes = 0
        rep.state = "corrupt" if problems else "ok"
    elif live and ist == "absent":
        rep.state = "live"
        rep.problems = []  # a shard being written ends anywhere; nothing is wrong with it
    elif ist == "absent" and not problems:
        rep.state = "unsealed"
    else:
        # Damage after the last commit is repaired by cutting it off; damage to a committed
        # value is not repairable (the rebuilt shard still holds it).
        value_damage = any("value of '" in m for _, m in chk["problems"])
        rep.state = "corrupt" if value_damage else "damaged"
    return rep
