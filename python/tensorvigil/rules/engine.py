"""The rule engine: evaluates rules over a run's committed steps, in order, incrementally.

The same engine runs offline (``tensorvigil check``), in a watcher process (``tensorvigil
watch``) and inside a training process (the hook's background thread). Each call of
:meth:`RuleEngine.poll` reads what the writers appended since the last call and evaluates only
the newly completed steps; statistics for all of them come from the shard indexes in one
columnar query, so no old step is ever rescanned and no payload is decompressed unless a rule
asks for values.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidArgumentError
from ..modes import Mode
from ..store.reader import _compile
from .base import Finding, Rule, StatsBatch, StepView

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
        self._lock = threading.Lock()

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

    def poll(self) -> list[Finding]:
        """Evaluates the steps completed since the last call; returns their findings."""
        with self._lock:
            self.run.refresh()
            steps, modes = self._new_steps()
            if not steps:
                return []
            self._refresh_collections()
            self._names = self.run._r.names()
            out: list[Finding] = []
            for view in self._views(steps, modes):
                out.extend(self._evaluate(view))
                self.last_step = view.step
                self.steps_evaluated += 1
            return out

    def _new_steps(self) -> tuple[list[int], dict]:
        """Steps after :attr:`last_step` committed by every rank, with their (mode, mode step)."""
        r = self.run._r
        c = r.commits()
        sel = c["step"] > self.last_step
        if not sel.any():
            return [], {}
        step, rank = c["step"][sel], c["rank"][sel]
        ranks = r.ranks()
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
        modes: dict = {}
        m, ms = c["mode"][sel], c["mode_step"][sel]
        for s, mm, mss in zip(step.tolist(), m.tolist(), ms.tolist()):
            modes.setdefault(s, (mm, mss))
        return done.tolist(), modes

    def _views(self, steps: list[int], modes: dict) -> Iterator[StepView]:
        r = self.run._r
        names = self._names
        cols = r.stats_columns(
            name_ids=[], ranks=[], step_min=steps[0], step_max=steps[-1], mode=-1
        )
        step_col = cols["step"]
        if len(step_col) > 1 and not (np.diff(step_col) >= 0).all():
            order = np.argsort(step_col, kind="stable")
            cols = {k: v[order] for k, v in cols.items()}
            step_col = cols["step"]
        wanted = np.asarray(steps, dtype=np.int64)
        lo = np.searchsorted(step_col, wanted, side="left")
        hi = np.searchsorted(step_col, wanted, side="right")
        for s, a, b in zip(steps, lo.tolist(), hi.tolist()):
            batch = StatsBatch(None, cols, a, b, names)
            m, ms = modes.get(s, (0, s))
            yield StepView(self.run, s, Mode(m), ms, batch, self)

    def _evaluate(self, view: StepView) -> list[Finding]:
        out: list[Finding] = []
        for i, rule in enumerate(self.rules):
            if i in self._disabled:
                continue
            needs = rule.needs
            if needs.modes is not None and view.mode not in needs.modes:
                continue
            if not self._needs_met(rule):
                if i not in self._unmet_reported:
                    self._unmet_reported.add(i)
                    what = ", ".join(needs.collections) if needs.collections else needs.regex
                    msg = f"not applicable: the run has no tensors of {what}"
                    out.append(self._note(rule, view, "not_applicable", msg, {"needs": what}))
                continue
            try:
                res = rule.evaluate(view)
            except Exception as e:  # noqa: BLE001 - a broken rule must not stop the others
                self._disabled.add(i)
                tb = traceback.format_exception_only(type(e), e)[-1].strip()
                msg = f"rule raised and was disabled: {tb}"
                out.append(self._note(rule, view, "error", msg, {"exception": type(e).__name__}))
                continue
            if res is None:
                continue
            for f in [res] if isinstance(res, Finding) else list(res):
                out.append(self._emit(f))
        return out

    def _note(self, rule: Rule, view: StepView, kind: str, message: str, evidence: dict) -> Finding:
        """Emits a finding about the rule itself (not applicable, or broken)."""
        return self._emit(
            Finding(
                rule=rule.name,
                step=view.step,
                mode=str(view.mode),
                mode_step=view.mode_step,
                severity="error" if kind == "error" else "info",
                kind=kind,
                message=message,
                evidence=evidence,
            )
        )

    def _emit(self, f: Finding) -> Finding:
        self.findings.append(f)
        if self.record:
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
