"""The rule engine: evaluates rules over a run's committed steps, in order, incrementally.

The same engine runs offline (``tensorvigil check``), in a watcher process (``tensorvigil
watch``) and inside a training process (the hook's background thread). Each call of
:meth:`RuleEngine.poll` reads what the writers appended since the last call and evaluates only
the newly completed steps; statistics for all of them come from the shard indexes in one
columnar query, so no old step is ever rescanned and no payload is decompressed unless a rule
asks for values.

Consecutive steps of one mode whose records have the same layout (the same tensors and ranks, in
the same order: the usual case) form a :class:`StepBlock` whose statistics are 2-D columns
(steps x tensors). A rule may implement :meth:`Rule.fast_forward` to skip, with a few vectorised
operations over the whole block, the steps at which it can find nothing; the engine then calls
:meth:`Rule.evaluate` only at the steps it returns. Findings come out in the same order as with
step-by-step evaluation (by step, then by rule).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidArgumentError
from ..modes import Mode
from ..store.reader import _compile
from .base import STAT_COLUMNS, Finding, Rule, StepBlock, StepView

logger = logging.getLogger("tensorvigil")

FINDINGS_NAME = "findings.jsonl"

Action = Callable[[Finding], Any]


class RuleEngine:
    """Evaluates rules over the committed steps of a run.

    Args:
        run: A :class:`tensorvigil.Run` or a run directory.
        rules: Rule objects (each keeps its state between steps).
        actions: Called with every finding (fired, not applicable or rule error), after it is
            recorded. An action that raises is logged and otherwise ignored.
        record: Append findings to the run's ``findings.jsonl``.
        start_step: Evaluate steps from this one (default: the first).
        rank_timeout: Stop waiting for ranks dead or stalled this many seconds
            (:meth:`tensorvigil.Run.rank_status`); each is reported once (``lost_ranks``).

    Example:
        >>> engine = RuleEngine("runs/exp1", tv.rules.defaults())
        >>> for f in engine.poll():
        ...     print(f)

    """

    def __init__(
        self,
        run: Any,
        rules: Sequence[Rule],
        *,
        actions: Sequence[Action] = (),
        record: bool = True,
        start_step: int = 0,
        rank_timeout: Optional[float] = None,
    ) -> None:
        from ..store.reader import Run

        self.run = run if isinstance(run, Run) else Run(run)
        rules = list(rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise InvalidArgumentError(f"rules must be tv.Rule objects, got {r!r}")
        self.rules = rules
        self.actions = list(actions)
        self.record = record
        self.last_step = start_step - 1
        self.findings: list[Finding] = []
        self.steps_evaluated = 0
        self._disabled: set[int] = set()
        self._unmet_reported: set[int] = set()
        self._collections: dict[str, set[str]] = {}
        self._collections_mtime: Optional[float] = None
        self._masks: dict = {}
        self._names: list[str] = []
        self._layouts: dict = {}
        self._met: dict[int, bool] = {}
        self._commit_pos = 0
        self._commit_carry: Optional[dict] = None
        self._lock = threading.Lock()
        self.rank_timeout = rank_timeout
        #: Ranks found dead or stalled (with ``rank_timeout``): rank -> its status.
        self.lost_ranks: dict[int, dict] = {}

    # -- collections ---------------------------------------------------------------------------

    def collection_names(self, collection: Union[str, Sequence[str]]) -> set[str]:
        """Names of the tensors of one collection or several (union)."""
        if isinstance(collection, str):
            return self._collections.get(collection, set())
        out: set[str] = set()
        for c in collection:
            out |= self._collections.get(c, set())
        return out

    def name_mask(
        self, collection: Union[str, Sequence[str], None] = None, regex: Optional[str] = None
    ) -> np.ndarray:
        """Boolean mask over the run's name ids: names in ``collection`` and matching ``regex``.

        Cached; extended incrementally as new names appear.
        """
        key = (
            collection if isinstance(collection, (str, type(None))) else tuple(collection),
            regex,
        )
        names = self._names
        m = self._masks.get(key)
        if m is not None and len(m) == len(names):
            return m
        start = 0 if m is None else len(m)
        allowed = None if collection is None else self.collection_names(collection)
        pat = None if regex is None else _compile(regex)
        ext = np.fromiter(
            (
                (allowed is None or n in allowed) and (pat is None or pat.search(n) is not None)
                for n in names[start:]
            ),
            dtype=bool,
            count=len(names) - start,
        )
        m = ext if m is None else np.concatenate([m, ext])
        self._masks[key] = m
        return m

    def _refresh_collections(self) -> None:
        path = os.path.join(self.run.path, "collections.json")
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._collections_mtime:
            return
        self._collections = {k: set(v) for k, v in self.run.collections().items()}
        self._collections_mtime = mtime
        self._masks.clear()

    def _needs_met(self, rule: Rule) -> bool:
        needs = rule.needs
        if not needs.collections and needs.regex is None:
            return True
        if needs.collections and self.collection_names(needs.collections):
            return True
        if needs.regex is not None:
            return bool(self.name_mask(regex=needs.regex).any())
        return False

    # -- evaluation ----------------------------------------------------------------------------

    #: Rows (records) read per statistics query: bounds the memory of a large catch-up.
    chunk_rows = 1 << 18
    #: Fewer steps than this left in a block are evaluated one by one (``fast_forward`` costs
    #: more than it saves on a step or two, as in a live run polled after every step).
    fast_forward_min = 2

    def poll(self) -> list[Finding]:
        """Evaluates the steps completed since the last call; returns their findings."""
        with self._lock:
            self.run.refresh()
            steps, modes, rows = self._new_steps()
            if not steps:
                return []
            self._refresh_collections()
            self._names = self.run._r.names()
            self._met = {}
            out: list[Finding] = []
            per_step = max(1, rows // len(steps))
            chunk = max(1, self.chunk_rows // per_step)
            for i in range(0, len(steps), chunk):
                for block in self._blocks(steps[i : i + chunk], modes):
                    out.extend(self._evaluate_block(block))
                    self.last_step = int(block.steps[-1])
                    self.steps_evaluated += len(block)
            return out

    def _new_steps(self) -> tuple[list[int], dict, int]:
        """Steps after :attr:`last_step` committed by every rank.

        Returns the steps, their (mode, mode step) columns, and the number of records committed
        with them (an estimate for chunking).
        """
        r = self.run._r
        try:
            new = r.commits(self._commit_pos)  # only the commits read since the last poll
        except TypeError:  # an older extension: every commit
            c = r.commits()
        else:
            self._commit_pos += len(new["step"])
            carry = self._commit_carry
            c = new if carry is None else {k: np.concatenate([carry[k], new[k]]) for k in new}
        sel = c["step"] > self.last_step
        # Commits of steps not evaluated yet are looked at again next time (a step waits for
        # every rank; a failed poll is retried).
        self._commit_carry = {k: v[sel] for k, v in c.items()}
        if not sel.any():
            return [], {}, 0
        ranks = r.ranks()
        if self.rank_timeout is not None and len(ranks) > 1:
            ranks = self._live_ranks(ranks)
            sel &= np.isin(c["rank"], ranks)
            if not sel.any():
                return [], {}, 0
        step, rank = c["step"][sel], c["rank"][sel]
        if len(ranks) <= 1:
            done = np.unique(step)
        else:
            pairs = np.unique(np.stack([step, rank.astype(np.int64)]), axis=1)
            uniq, counts = np.unique(pairs[0], return_counts=True)
            done = uniq[counts >= len(ranks)]
        # A step is taken only when all earlier ones are complete, so order is kept.
        if len(ranks) > 1:
            pending = np.setdiff1d(np.unique(step), done)
            if len(pending):
                done = done[done < pending.min()]
        # (mode, mode step) of each step: the first commit of the step wins.
        first = np.unique(step, return_index=True)[1]
        modes = (step[first], c["mode"][sel][first], c["mode_step"][sel][first])
        return done.tolist(), modes, int(c["num_tensors"][sel].sum())

    def _live_ranks(self, ranks: Sequence[int]) -> list[int]:
        """Ranks still to wait for; reports each rank found dead or stalled once."""
        status = self.run.rank_status(self.rank_timeout)
        for r, st in status.items():
            if st["state"] in ("dead", "stalled") and r not in self.lost_ranks:
                self.lost_ranks[r] = st
                logger.warning(
                    "tensorvigil: rank %d is %s (last committed step %d, idle %.0f s); its "
                    "steps are no longer waited for",
                    r,
                    st["state"],
                    st["last_step"],
                    st["idle_s"],
                )
        return [r for r in ranks if r not in self.lost_ranks]

    def _blocks(self, steps: list[int], modes: tuple) -> Iterator[StepBlock]:
        """The statistics of ``steps`` (ascending) as blocks of steps of one layout and mode."""
        r = self.run._r
        cols: Mapping[str, np.ndarray]
        if hasattr(r, "select_rows"):
            # Columns are read from the record table when a rule first asks for them.
            rows = r.select_rows(step_min=steps[0], step_max=steps[-1])
            # A few rows (a live run polled every step): every column in one call.
            few = len(rows) <= 4096
            loaded = r.row_columns(rows, [] if few else ["step"])
            step_col = loaded["step"]
            if len(step_col) > 1 and not (step_col[1:] >= step_col[:-1]).all():
                order = np.argsort(step_col, kind="stable")
                rows = rows[order]
                loaded = {k: v[order] for k, v in loaded.items()}
                step_col = loaded["step"]
            cols = _LazyColumns(r, rows, loaded)
        else:  # an older extension
            cols = r.stats_columns(step_min=steps[0], step_max=steps[-1])
            step_col = cols["step"]
            if len(step_col) > 1 and not (step_col[1:] >= step_col[:-1]).all():
                order = np.argsort(step_col, kind="stable")
                cols = {k: v[order] for k, v in cols.items()}
                step_col = cols["step"]
        wanted = np.asarray(steps, dtype=np.int64)
        lo = np.searchsorted(step_col, wanted, side="left")
        hi = np.searchsorted(step_col, wanted, side="right")
        mstep, mmode, mms = modes
        at = np.minimum(np.searchsorted(mstep, wanted), len(mstep) - 1)
        known = mstep[at] == wanted
        mode = np.where(known, mmode[at], 0).astype(np.int64)
        mode_step = np.where(known, mms[at], wanted)
        count = hi - lo
        # A block breaks where the row count or the mode changes or rows are not contiguous.
        brk = np.flatnonzero(
            (count[1:] != count[:-1]) | (mode[1:] != mode[:-1]) | (lo[1:] != hi[:-1])
        )
        starts = [0] + (brk + 1).tolist()
        ends = starts[1:] + [len(steps)]
        nid, rank = cols["name_id"], cols["rank"]
        for a, b in zip(starts, ends):
            width = int(count[a])
            base = int(lo[a])
            while a < b:
                n = b - a
                first = slice(base, base + width)
                if n > 1 and width:
                    ids = nid[base : base + n * width].reshape(n, width)
                    rks = rank[base : base + n * width].reshape(n, width)
                    same = (ids == ids[0]).all(axis=1) & (rks == rks[0]).all(axis=1)
                    if not same.all():
                        n = int(np.argmin(same))  # the first step with another layout
                names = self._layout(nid[first], rank[first])
                yield StepBlock(
                    self,
                    cols,
                    base,
                    width,
                    wanted[a : a + n],
                    Mode(int(mode[a])),
                    mode_step[a : a + n],
                    names,
                )
                a += n
                base += n * width

    def _layout(self, name_ids: np.ndarray, ranks: np.ndarray) -> list[str]:
        """The names of a step's rows; one shared list per layout (rules cache on its identity)."""
        key = (name_ids.tobytes(), ranks.tobytes())
        names = self._layouts.get(key)
        if names is None:
            if len(self._layouts) > 256:
                self._layouts.clear()
            table = self._names
            names = self._layouts[key] = [table[i] for i in name_ids.tolist()]
        return names

    def _evaluate_block(self, block: StepBlock) -> list[Finding]:
        """Evaluates every rule over a block; findings in (step, rule) order."""
        events: list[tuple[int, int, list[Finding]]] = []
        n = len(block)
        for i, rule in enumerate(self.rules):
            if i in self._disabled:
                continue
            needs = rule.needs
            if needs.modes is not None and block.mode not in needs.modes:
                continue
            met = self._met.get(i)
            if met is None:
                met = self._met[i] = self._needs_met(rule)
            if not met:
                if i not in self._unmet_reported:
                    self._unmet_reported.add(i)
                    what = ", ".join(needs.collections) if needs.collections else needs.regex
                    msg = f"not applicable: the run has no tensors of {what}"
                    note = self._note(rule, block.view(0), "not_applicable", msg, {"needs": what})
                    events.append((0, i, [note]))
                continue
            pos = 0
            while pos < n:
                k = pos
                try:
                    if n - pos > self.fast_forward_min:
                        nxt = rule.fast_forward(block, pos)
                        k = n if nxt is None else max(pos, int(nxt))
                    if k >= n:
                        break
                    view = block.view(k)
                    res = rule.evaluate(view)
                except Exception as e:  # noqa: BLE001 - a broken rule must not stop the others
                    self._disabled.add(i)
                    tb = traceback.format_exception_only(type(e), e)[-1].strip()
                    msg = f"rule raised and was disabled: {tb}"
                    at = min(k, n - 1)
                    note = self._note(
                        rule, block.view(at), "error", msg, {"exception": type(e).__name__}
                    )
                    events.append((at, i, [note]))
                    break
                if res is not None:
                    found = [res] if isinstance(res, Finding) else list(res)
                    if found:
                        events.append((k, i, found))
                pos = k + 1
        events.sort(key=lambda e: (e[0], e[1]))
        return [self._emit(f) for _, _, fs in events for f in fs]

    def _note(self, rule: Rule, view: StepView, kind: str, message: str, evidence: dict) -> Finding:
        """Builds a finding about the rule itself (not applicable, or broken)."""
        return Finding(
            rule=rule.name,
            step=view.step,
            mode=str(view.mode),
            mode_step=view.mode_step,
            severity="error" if kind == "error" else "info",
            kind=kind,
            message=message,
            evidence=evidence,
        )

    def _emit(self, f: Finding) -> Finding:
        self.findings.append(f)
        if self.record:
            mirror = getattr(self.run, "_mirror", None)
            if mirror is not None:  # object storage: this watcher's own findings object
                import json

                mirror.append_findings([json.dumps(f.to_json(), allow_nan=False)])
            else:
                append_finding(self.run.path, f)
        for action in self.actions:
            try:
                action(f)
            except Exception:  # noqa: BLE001 - actions never break evaluation
                logger.exception("tensorvigil: rule action %r failed", action)
        return f

    def check_idle(self, now: Optional[float] = None) -> list[Finding]:
        """Lets rules that watch time (``check_idle(now)``) report while no step arrives."""
        now = time.time() if now is None else now
        out: list[Finding] = []
        with self._lock:
            for i, rule in enumerate(self.rules):
                fn = getattr(rule, "check_idle", None)
                if fn is None or i in self._disabled:
                    continue
                try:
                    res = fn(now)
                except Exception as e:  # noqa: BLE001 - same isolation as evaluate()
                    self._disabled.add(i)
                    res = Finding(
                        rule=rule.name,
                        step=max(self.last_step, 0),
                        severity="error",
                        kind="error",
                        message=f"rule raised and was disabled: {type(e).__name__}: {e}",
                    )
                if res is not None:
                    for f in [res] if isinstance(res, Finding) else list(res):
                        out.append(self._emit(f))
        return out

    # -- loops ---------------------------------------------------------------------------------

    def watch(
        self,
        *,
        timeout: Optional[float] = None,
        poll_interval: float = 0.2,
        stop: Optional[threading.Event] = None,
    ) -> Iterator[Finding]:
        """Evaluates new steps as they are committed, yielding findings.

        Returns when every rank's writer closed its stream, when ``stop`` is set, or after
        ``timeout`` seconds without a new step.
        """
        last_new = time.monotonic()
        while True:
            before = self.last_step
            yield from self.poll()
            if self.last_step != before:
                last_new = time.monotonic()
            else:
                yield from self.check_idle()
            ranks = self.run.ranks()
            if ranks and all(self.run._r.ended(r) for r in ranks):
                yield from self.poll()
                return
            if stop is not None and stop.is_set():
                return
            if timeout is not None and time.monotonic() - last_new > timeout:
                return
            if stop is not None:
                stop.wait(poll_interval)
            else:
                time.sleep(poll_interval)


#: Columns of the reader's ``stats_columns`` / ``row_columns``, in their order.
_COLUMNS = (
    "name_id",
    "rank",
    "step",
    "mode",
    "mode_step",
    "has_value",
    *STAT_COLUMNS,
    "wall_time",
)
_COLUMN_SET = frozenset(_COLUMNS)


class _LazyColumns(Mapping):
    """The statistics columns of a set of record-table rows, each read on first access."""

    def __init__(self, reader: Any, rows: np.ndarray, loaded: dict) -> None:
        self._r = reader
        self._rows = rows
        self._d = loaded

    def __getitem__(self, key: str) -> np.ndarray:
        v = self._d.get(key)
        if v is None:
            if key not in _COLUMN_SET:
                raise KeyError(key)
            v = self._d[key] = self._r.row_columns(self._rows, [key])[key]
        return v

    def __contains__(self, key: object) -> bool:
        return key in _COLUMN_SET

    def __iter__(self) -> Iterator[str]:
        return iter(_COLUMNS)

    def __len__(self) -> int:
        return len(_COLUMNS)


def append_finding(run_dir: str, f: Finding) -> None:
    """Appends one finding to ``findings.jsonl`` (one write call per line)."""
    import json

    line = json.dumps(f.to_json(), allow_nan=False) + "\n"
    fd = os.open(
        os.path.join(run_dir, FINDINGS_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
    )
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def evaluate_run(
    run: Any, rules: Iterable[Rule], *, record: bool = True, actions: Sequence[Action] = ()
) -> list[Finding]:
    """Evaluates ``rules`` over every committed step of ``run`` (offline check)."""
    return RuleEngine(run, list(rules), record=record, actions=actions).poll()
