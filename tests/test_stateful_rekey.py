"""Model-based test of `kms-migrate rekey`: the state machine of tests/test_stateful.py
(application writes, migrate, rollback, verify, finalize, interruptions, changes between
runs), extended with three KMS keys of the tool (K0 = alias/coinflip-master-key, K1, K2),
the application's key (AWS_KMS_KEY_ID, which the operator switches; the CLI's default
--key-id and --from-key too), USE_AWS_KMS (the application writes Fernet while it is off,
KMS under its key, with or without the encryption context, while it is on) and rekey runs
to another key and/or context, interrupted, resumed or started anew (--new-run).

The model adds, for every journal layer (the migrate runs' one, and one per rekey run),
the rewrites it holds (cell, original, migrated), recorded from what each command changed;
after every step:

1. every cell holds the application's latest write, or a ciphertext of its plaintext under
   one of the tool's keys (with or without the encryption context);
2. the journal's unreplayed entries are, layer by layer, the model's, and they chain each
   rewritten cell from the application's write (or what a finalize verified) to its value;
3. no plaintext of the application's writes is in any bookkeeping table (checked after each
   command that writes).

And per command: a rekey is refused (exit 2, nothing written) while a migrate, retry,
rollback or finalize is unfinished, when an unfinished rekey has other settings (unless
--new-run), or when it would change nothing; a migrate is refused while a rekey is
unfinished; a completed rekey exits 0 only when every value of the targets is under the
destination key and context, but for values the application wrote since the run started
(written behind its cursor, which a rekey does not record: see migration/settle.py), and
exit 1 names every other value left; a rollback undoes the newest rekey layer with entries
(abandoning an unfinished rekey), else the migrate layer, each entry's compare-and-swap
against the value it wrote.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, note
from hypothesis import settings as _hs
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule
from sqlalchemy import inspect, text, update

from migration.codec import ValueKind, classify, decode_kms, encryption_context
from migration.refusals import REKEY_SAMPLE
from tests.conftest import ALIAS, KmsHandle, _make_key
from tests.test_stateful import (
    BATCH,
    COLUMNS,
    INT_KEYS,
    PLAINTEXTS,
    STATS,
    STOP,
    TABLE_A,
    TABLE_B,
    TARGET_SETS,
    TEXT_KEYS,
    WRITES,
    Cell,
    KmsMigrateMachine,
    World,
    Written,
    _other_key,
    _run_fresh,
    is_fernet,
    pk_text,
)

KEY_IDS = (ALIAS, "alias/coinflip-next-key", "alias/coinflip-third-key")
TENANT = {"tenant": "7"}  # the context of the base machine's kms_with_context writes
OUTCOMES: Counter[str] = Counter()  # what the rules saw, for STATEFUL_STATS
Layer = int | str  # a rekey run's id, or "migrate" (the migrate and retry runs)
JRow = tuple[str, str, str, str | None, str | None]  # table, pk text, column, orig, migrated


class Tracked(dict[Cell, Written]):
    """The model's `written`: each application write also reaches `on_write`."""

    on_write: Callable[[Cell], None]

    def __setitem__(self, cell: Cell, w: Written) -> None:
        super().__setitem__(cell, w)
        self.on_write(cell)


@dataclass(frozen=True)
class RekeySettings:
    source: int  # index into KEY_IDS
    dest: int
    from_ctx: bool
    to_ctx: bool
    targets: str


@dataclass(frozen=True)
class Entry:
    """One rewrite a layer of the journal holds."""

    cell: Cell
    original: str | None
    migrated: str | None

    def row(self) -> JRow:
        t, ident, c = self.cell
        return (t, pk_text(ident), c, self.original, self.migrated)


class RekeyMachine(KmsMigrateMachine):
    """The base machine plus keys K0..K2, the application's key and rekey runs."""

    KEY_ARNS: tuple[str, str, str]  # set by the test, for KEY_IDS

    def __init__(self) -> None:
        super().__init__()
        written = Tracked()
        written.on_write = self._app_wrote
        self.written = written
        self.app_key = 0  # AWS_KMS_KEY_ID: the application's key, and the CLI's default
        self.use_kms = False  # USE_AWS_KMS
        self.layers: dict[Layer, list[Entry]] = {}
        self.open_rekey: RekeySettings | None = None  # the unfinished rekey run's settings
        self.open_rekey_id: int | None = None
        self.behind: set[Cell] = set()  # written by the application since that run started
        self.rolling: Layer | None = None  # the layer an unfinished rollback undoes
        self.finalize_done = False
        self.last_dest: int | None = None  # the destination of the last completed rekey
        self.values_ctx = False  # whether the values carry the context (its to_ctx)
        self.check_ctx = False  # the context verify and finalize decrypt with
        self.last: tuple[int, str, str] = (0, "", "")
        self.opened_as: dict[tuple[str, Cell], tuple[bytes, str, str | None] | None] = {}
        self.sample_may_miss = False  # see sample_opens_nothing

    def _app_wrote(self, cell: Cell) -> None:
        self.behind.add(cell)

    # -- the model's view of a stored value -------------------------------------------------

    def open_as(self, stored: object, cell: Cell) -> tuple[bytes, str, str | None] | None:
        """(plaintext, key ARN, context: None, "tool" or "tenant") of a stored KMS value."""
        if not isinstance(stored, str) or stored == "" or is_fernet(stored):
            return None
        if (stored, cell) not in self.opened_as:
            self.opened_as[(stored, cell)] = self._open(stored, cell)
        return self.opened_as[(stored, cell)]

    def _open(self, stored: str, cell: Cell) -> tuple[bytes, str, str | None] | None:
        try:
            blob = base64.b64decode(stored.encode("ascii"), validate=True)
        except Exception:
            return None
        t, ident, c = cell
        for kind, ctx in ((None, None), ("tool", encryption_context(t, c, pk_text(ident))),
                          ("tenant", TENANT)):
            extra: dict[str, Any] = {"EncryptionContext": ctx} if ctx else {}
            try:
                out = self.world.kms.client.decrypt(CiphertextBlob=blob, **extra)
            except Exception:
                continue
            return bytes(out["Plaintext"]), str(out["KeyId"]), kind
        return None

    def under(self, stored: object, cell: Cell, key: int, ctx: bool) -> bool:
        opened = self.open_as(stored, cell)
        return (opened is not None and opened[1] == self.KEY_ARNS[key]
                and opened[2] == ("tool" if ctx else None))

    def problem_cells(self, tables: tuple[str, ...], db: dict[Cell, Any]) -> list[Cell]:
        """What verify (and finalize) with the application's key must report."""
        return [c for c in db if c[0] in tables and db[c] not in (None, "")
                and not self.under(db[c], c, self.app_key, self.check_ctx)]

    # -- reading the bookkeeping ------------------------------------------------------------

    def journal_layers(self) -> dict[Layer, Counter[JRow]]:
        """The journal's unreplayed entries, by layer."""
        if not inspect(self.engine).has_table("kms_migrate_journal"):
            return {}
        out: dict[Layer, Counter[JRow]] = {}
        with self.engine.connect() as conn:
            for run_id, kind, *row in conn.execute(text(
                    "SELECT j.run_id, r.kind, j.table_name, j.pk, j.column_name, j.original, "
                    "j.migrated FROM kms_migrate_journal j JOIN kms_migrate_runs r "
                    "ON r.id = j.run_id WHERE j.status = 'migrated'")):
                layer: Layer = int(run_id) if kind == "rekey" else "migrate"
                out.setdefault(layer, Counter())[tuple(row)] += 1  # type: ignore[index]
        return out

    def model_layers(self) -> dict[Layer, Counter[JRow]]:
        return {k: Counter(e.row() for e in v) for k, v in self.layers.items() if v}

    def unfinished_kinds(self) -> set[str]:
        return {kind for kind, _ in self.unfinished_runs()}

    def max_rekey_id(self) -> int:
        if not inspect(self.engine).has_table("kms_migrate_runs"):
            return 0
        with self.engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT coalesce(max(id), 0) FROM kms_migrate_runs WHERE kind = 'rekey'")
            ).scalar_one())

    def writes_of_data(self) -> tuple[dict[Cell, Any], dict[Layer, Counter[JRow]]]:
        """What "nothing was written" compares: the target cells and the journal."""
        return self.read_cells(), self.journal_layers()

    def no_plaintext_in_bookkeeping(self) -> None:
        """Invariant 3: no plaintext the application wrote is in a bookkeeping table."""
        plains = {w.plain.decode("utf-8", "ignore") for w in self.written.values()
                  if w.plain is not None}
        plains = {p for p in plains if len(p) >= 8}
        if not plains:
            return
        rows = [r for r in self.dump() if r.startswith("kms_migrate_")]
        for p in plains:
            for r in rows:
                assert p not in r, f"invariant 3: a plaintext is in the bookkeeping: {r[:80]}"

    # -- running the CLI --------------------------------------------------------------------

    def cli(self, *args: str, batch_size: int = 3, stop_after: int | None = None,
            targets: bool = True) -> tuple[int, str, str]:
        os.environ["AWS_KMS_KEY_ID"] = KEY_IDS[self.app_key]
        note(f"[AWS_KMS_KEY_ID K{self.app_key}]")
        if args[0] == "rekey":
            args = (*args, "--batch-size", str(batch_size))
        self.last = super().cli(*args, batch_size=batch_size, stop_after=stop_after,
                                targets=targets)
        return self.last

    def run_level_causes(self, *, retry: bool = False) -> list[str]:
        causes = super().run_level_causes(retry=retry)
        if not retry and inspect(self.engine).has_table("kms_migrate_runs"):
            with self.engine.connect() as conn:
                arns = conn.execute(text(
                    "SELECT key_arn FROM kms_migrate_runs WHERE kind = 'migrate' AND state "
                    "IN ('running', 'interrupted', 'stopped')")).scalars().all()
            if any(a != self.KEY_ARNS[self.app_key] for a in arns):
                causes.append("unfinished migrate under another KMS key")
        return causes

    def record(self, layer: Layer, before: dict[Cell, Any], after: dict[Cell, Any]) -> None:
        """What a command rewrote, as the entries of `layer`."""
        for cell, value in after.items():
            if cell in before and before[cell] != value:
                self.layers.setdefault(layer, []).append(Entry(cell, before[cell], value))

    # -- application writes ------------------------------------------------------------------

    @initialize(a=st.lists(st.tuples(st.sampled_from(TEXT_KEYS), WRITES, WRITES), max_size=6),
                b=st.lists(st.tuples(st.sampled_from(INT_KEYS), WRITES), max_size=4),
                migrate_first=st.sampled_from([True, True, False]))
    def fill(self, a: list[Any], b: list[Any], migrate_first: bool) -> None:
        """The base machine's data; most sequences start with a migrate, so that a rekey
        has values to move."""
        super().fill(a, b)
        if migrate_first:
            self._migrate(5, None, retry=False)

    def app_insert_null_key(self, w1: tuple[str, bytes], w2: tuple[str, bytes]) -> None:
        """Not a rule here: a NULL key refuses every run (the base machine covers it)."""
        raise AssertionError("not a rule of the rekey machine")

    @rule(follow=st.booleans())
    def switch_app_key(self, follow: bool) -> None:
        """The operator points AWS_KMS_KEY_ID at the last rekey's destination, or at the
        next key."""
        if follow and self.last_dest is not None:
            self.app_key = self.last_dest
        else:
            self.app_key = (self.app_key + 1) % len(KEY_IDS)
        note(f"AWS_KMS_KEY_ID now K{self.app_key}")

    @rule()
    def toggle_use_kms(self) -> None:
        self.use_kms = not self.use_kms
        note(f"USE_AWS_KMS {'on' if self.use_kms else 'off'}")

    @rule(table=st.sampled_from([TABLE_A, TABLE_B]), index=st.integers(0, 20),
          column=st.integers(0, 1), plain=PLAINTEXTS, ctx=st.booleans())
    def app_write(self, table: str, index: int, column: int, plain: bytes, ctx: bool) -> None:
        """The application's encrypt_secret: KMS under its key (with the context, or
        not) while USE_AWS_KMS is on, a Fernet token under ENCRYPTION_KEY while off."""
        ident = self._pick(table, index)
        if ident is None:
            return
        col = COLUMNS[table][column % len(COLUMNS[table])]
        if self.use_kms:
            plain = plain if 1 <= len(plain) <= 4096 else b"kms"
            extra: dict[str, Any] = (
                {"EncryptionContext": encryption_context(table, col, pk_text(ident))}
                if ctx else {})
            blob = self.world.kms.client.encrypt(KeyId=KEY_IDS[self.app_key], Plaintext=plain,
                                                 **extra)["CiphertextBlob"]
            new = Written(base64.b64encode(blob).decode(), "kms_app", plain)
        else:
            new = self.make_value("fernet_current", plain)
        note(f"app write {table} {ident!r} {col}={new.kind} K{self.app_key} ctx={ctx}")
        with self.engine.begin() as conn:
            conn.execute(update(self.tables[table]).where(self._where(table, ident))
                         .values(**{col: new.value}))
        self.written[(table, ident, col)] = new
        self.finalized.pop((table, ident, col), None)
        self.recorded_failed.discard((table, ident, col))

    # -- runs --------------------------------------------------------------------------------

    def _migrate(self, batch_size: int, stop_after: int | None, *, retry: bool) -> None:
        blockers = self.unfinished_kinds() & {"rekey", "rollback", "finalize"}
        before, journal = self.writes_of_data()
        super()._migrate(batch_size, stop_after, retry=retry)
        code = self.last[0]
        after = self.read_cells()
        if blockers:
            assert code == 2 and self.writes_of_data() == (before, journal), (
                f"a migrate must be refused (exit 2, nothing written) while a {blockers} run "
                f"is unfinished; got exit {code}: {self.last[2].strip()[-300:]}")
        if code != 2:
            self.record("migrate", before, after)
            for cell, value in after.items():
                if before.get(cell) != value:
                    assert self.under(value, cell, self.app_key, False), (
                        f"migrate wrote {cell} under another key than AWS_KMS_KEY_ID")
            self.no_plaintext_in_bookkeeping()

    def planned(self, step: int, to_ctx: bool, from_last: bool) -> RekeySettings:
        """The rekey an operator would run: from the application's key (or, `from_last`,
        the last rekey's destination: --from-key), with the context the values carry (the
        last completed rekey's), to another key (`step` 1 or 2)."""
        source = self.last_dest if from_last and self.last_dest is not None else self.app_key
        return RekeySettings(source, (source + step) % len(KEY_IDS), self.values_ctx, to_ctx,
                             self.targets)

    @rule(step=st.integers(1, 2), to_ctx=st.booleans(), batch_size=BATCH,
          from_last=st.booleans())
    def rekey(self, step: int, to_ctx: bool, batch_size: int, from_last: bool) -> None:
        self._rekey(self.planned(step, to_ctx, from_last), batch_size, None, new_run=False)

    @rule(step=st.integers(1, 2), to_ctx=st.booleans(), batch_size=BATCH,
          stop_after=st.integers(1, 3), new_run=st.booleans(), from_last=st.booleans())
    def rekey_interrupted(self, step: int, to_ctx: bool, batch_size: int, stop_after: int,
                          new_run: bool, from_last: bool) -> None:
        self._rekey(self.planned(step, to_ctx, from_last), batch_size, stop_after,
                    new_run=new_run)

    @rule(batch_size=BATCH, stop_after=STOP)
    def rekey_resumed(self, batch_size: int, stop_after: int | None) -> None:
        """The operator runs the unfinished rekey again with its own options (as the
        refusals tell them to); with the application's key switched since, --from-key."""
        s = self.open_rekey
        if s is None:
            return
        self.targets = s.targets
        self._rekey(s, batch_size, stop_after, new_run=False)

    @rule(to=st.integers(0, 2), from_ctx=st.booleans(), to_ctx=st.booleans(),
          batch_size=BATCH)
    def rekey_new_run(self, to: int, from_ctx: bool, to_ctx: bool, batch_size: int) -> None:
        self._rekey(RekeySettings(self.app_key, to, from_ctx, to_ctx, self.targets),
                    batch_size, None, new_run=True)

    def rekey_causes(self, s: RekeySettings, new_run: bool) -> list[str]:
        """Why this rekey must be refused as a whole (exit 2, nothing written)."""
        causes = [f"unfinished {k}" for k in self.unfinished_kinds()
                  & {"migrate", "retry", "rollback", "finalize"}]
        if self.null_key_tables(self.target_tables()):
            causes.append("NULL keys")
        if s.source == s.dest and s.from_ctx == s.to_ctx:
            causes.append("the same key and context")
        if "rekey" in self.unfinished_kinds() and not new_run and s != self.open_rekey:
            causes.append(f"an unfinished rekey with other settings ({self.open_rekey})")
        if self.sample_opens_nothing(s):
            causes.append("no sampled KMS value opens under the source nor the destination")
        return causes

    def sample_opens_nothing(self, s: RekeySettings) -> bool:
        """The rekey's start-up check (refusals.check_source_opens_something): KMS-shaped
        values in the targets, and none under the source key and context nor under the
        destination's. The machine's tables are small, so its spread sample reads every
        row, and tries up to ten KMS-shaped values a column (`sample_may_miss` when a
        column holds more: a value that would do may then go untried)."""
        db = self.read_cells()
        shaped = [c for c in self.target_cells() if classify(db.get(c)) is ValueKind.KMS]
        per_column = Counter((c[0], c[2]) for c in shaped)
        self.sample_may_miss = any(n > REKEY_SAMPLE for n in per_column.values())
        return bool(shaped) and not any(
            self.under(db[c], c, s.source, s.from_ctx) or self.under(db[c], c, s.dest, s.to_ctx)
            for c in shaped)

    def _rekey(self, s: RekeySettings, batch_size: int, stop_after: int | None, *,
               new_run: bool) -> None:
        causes = self.rekey_causes(s, new_run)
        before, journal = self.writes_of_data()
        newest = self.max_rekey_id()
        flags = ([*(["--from-key", KEY_IDS[s.source]] if s.source != self.app_key else [])]
                 + (["--from-encryption-context"] if s.from_ctx else [])
                 + (["--to-encryption-context"] if s.to_ctx else [])
                 + (["--new-run"] if new_run else []))
        code, out, err = self.cli("rekey", "--to-key", KEY_IDS[s.dest], "--yes", "--no-backup",
                                  "--no-progress", "--concurrency", "2", "--max-kms-rps", "0",
                                  *flags, batch_size=batch_size, stop_after=stop_after)
        after = self.read_cells()
        OUTCOMES[f"rekey exit {code}"] += 1
        OUTCOMES[f"rekey moved {sum(before[c] != after[c] for c in after) > 0}"] += 1
        for cause in causes:
            OUTCOMES[f"rekey refused: {cause[:30]}"] += 1
        if code == 2:
            # moto answers a ReEncrypt of base64 that is no ciphertext with AccessDenied, as
            # KMS answers one under a key of another account: before any value of the run
            # re-encrypted, the run cannot tell that from its own permissions and stops
            # (migration/rewrap.py, `Rekey._denied`).
            denied = "denied" in err.lower() and any(
                isinstance(before[c], str) and not is_fernet(before[c])
                and decode_kms(before[c]) is not None and self.open_as(before[c], c) is None
                for c in self.target_cells())
            missed = self.sample_may_miss and "opens none of the" in err
            assert causes or denied or missed, (
                f"rekey exit 2 with no run-level cause: {err.strip()[-300:]}")
            if missed and not causes:
                assert self.writes_of_data() == (before, journal), "a refused rekey wrote"
                return
            if causes:
                assert self.writes_of_data() == (before, journal), "a refused rekey wrote"
                return
            # Stopped by the denial, not refused: what earlier batches committed stays
            # (checked below as any run's rewrites), and the run, to be resumed.
            if after != before:
                OUTCOMES[f"rekey stopped by a denial after writing: {err.strip()[:110]}"] += 1
                note(f"stopped after writing: {err.strip()[-300:]}")
        else:
            assert not causes, f"rekey must be refused ({causes}); got exit {code}"
        run_id = self.max_rekey_id()
        resumed = not new_run and self.open_rekey is not None
        if resumed:
            assert run_id == self.open_rekey_id and ("(resumed)" in out or code in (2, 130)), (
                f"rekey should have resumed run {self.open_rekey_id}; ran {run_id}")
        else:
            assert run_id > newest, f"rekey should have started a new run; ran {run_id}"
            self.behind = set()
        self.record(run_id, before, after)
        for cell, value in after.items():
            if before.get(cell) != value:
                src, dst = self.open_as(before[cell], cell), self.open_as(value, cell)
                assert self.under(before[cell], cell, s.source, s.from_ctx) and self.under(
                    value, cell, s.dest, s.to_ctx) and src and dst and src[0] == dst[0], (
                    f"rekey rewrote {cell} from {src and src[1:]} to {dst and dst[1:]}, not "
                    f"K{s.source}/{s.from_ctx} -> K{s.dest}/{s.to_ctx}")
        self.no_plaintext_in_bookkeeping()
        if code in (2, 130):
            self.open_rekey, self.open_rekey_id = s, run_id
            return
        self.open_rekey = self.open_rekey_id = None
        self.last_dest, self.values_ctx = s.dest, s.to_ctx
        self._check_rekey_end(s, code, out, after)

    def _check_rekey_end(self, s: RekeySettings, code: int, out: str,
                         db: dict[Cell, Any]) -> None:
        """A completed rekey: exit 0 only when every value (but those written behind it) is
        under the destination; exit 1 names each one that is not; none left at the source."""
        tables = TARGET_SETS[s.targets]
        left = [c for c in db if c[0] in tables and db[c] not in (None, "")
                and c not in self.behind and not self.under(db[c], c, s.dest, s.to_ctx)]
        at_source = [c for c in left if self.under(db[c], c, s.source, s.from_ctx)]
        assert not at_source, (
            f"a completed rekey left values under its source: {self._describe(at_source, db)}")
        if code == 0:
            assert not left, (
                f"rekey exit 0 with values not under the destination: "
                f"{self._describe(left, db)}")
        else:
            assert code == 1, code
            unnamed = [c for c in left if not self.named(out, c)]
            named = [c for c in db if c[0] in tables and self.named(out, c)]
            assert (left or named) and not unnamed, (
                f"rekey exit 1 must name every value left; not named "
                f"{self._describe(unnamed, db)}")

    @rule(batch_size=BATCH, stop_after=STOP)
    def rollback(self, batch_size: int, stop_after: int | None) -> None:
        had_schema = inspect(self.engine).has_table("kms_migrate_runs")
        unfinished = self.unfinished_kinds()
        pending = any(self.layers.values())
        refuse = (not had_schema or "finalize" in unfinished
                  or (self.finalize_done and not pending))
        layer: Layer = self.rolling if self.rolling is not None else max(
            (k for k, v in self.layers.items() if isinstance(k, int) and v), default="migrate")
        before, journal = self.writes_of_data()
        code, out, err = self.cli("rollback", "--yes", "--no-backup", "--no-progress",
                                  batch_size=batch_size, stop_after=stop_after, targets=False)
        after = self.read_cells()
        if code == 2:
            assert refuse, f"rollback exit 2 with nothing to refuse for: {err.strip()}"
            assert self.writes_of_data() == (before, journal), "a refused rollback wrote"
            return
        assert not refuse, f"rollback must be refused; got exit {code}"
        self.open_rekey = self.open_rekey_id = None  # abandoned
        expect = dict(before)
        entries = self.layers.get(layer, [])
        for e in entries:
            if expect.get(e.cell) == e.migrated:
                expect[e.cell] = e.original
        OUTCOMES[f"rollback of a {'rekey' if isinstance(layer, int) else 'migrate'} layer "
                 f"exit {code}"] += 1
        if isinstance(layer, int) and code != 130:  # an interrupted command prints no summary
            assert f"undid rekey run {layer}" in out, (
                f"rollback should have undone rekey run {layer}: {out[-300:]}")
        if code == 130:
            # Each entry is replayed or not yet: resynchronised with the journal's layer.
            for cell, value in after.items():
                assert value in (before[cell], expect[cell]), (
                    f"an interrupted rollback put {cell} neither back nor left it")
            still = self.journal_layers().get(layer, Counter())
            self.layers[layer] = [e for e in entries if still[e.row()] > 0]
            self.rolling = layer
            return
        changed = {c: (before[c], after[c], expect[c]) for c in after if after[c] != expect[c]}
        assert not changed, (
            f"rollback exit {code} of layer {layer}: cells not as the layer's journal says: "
            f"{list(changed)[:5]}")
        self.layers.pop(layer, None)
        self.rolling = None

    @rule(batch_size=BATCH, ctx=st.booleans())
    def verify(self, batch_size: int, ctx: bool) -> None:
        census = ("kms_migrate_census",)
        before = self.dump(skip=census)
        self.check_ctx = ctx
        extra = ["--encryption-context"] if ctx else []
        code, out, err = self.cli("verify", *extra, batch_size=batch_size)
        assert self.dump(skip=census) == before, "invariant 5: verify changed the database"
        db = self.read_cells()
        problems = self.problem_cells(self.target_tables(), db)
        if code == 0:
            assert not problems, ("verify exit 0 though these values are not under "
                                  f"AWS_KMS_KEY_ID: {self._describe(problems, db)}")
        elif code == 1:
            unnamed = [c for c in problems if not self.named(out, c)]
            assert problems and not unnamed, (
                f"verify exit 1 must name each problem; not named {unnamed[:5]}")
        else:
            assert self.null_key_tables(self.target_tables()), (
                f"verify exit 2 with no run-level cause: {err.strip()}")

    @rule(batch_size=BATCH, stop_after=STOP, ctx=st.booleans())
    def finalize(self, batch_size: int, stop_after: int | None, ctx: bool) -> None:
        journalled = tuple(sorted({r[0] for layer in self.journal_layers().values()
                                   for r in layer}))
        self.check_ctx = ctx
        extra = ["--encryption-context"] if ctx else []
        code, _out, _err = self.cli("finalize", "--yes", *extra, batch_size=batch_size,
                                    stop_after=stop_after)
        if code not in (0, 130):
            return
        db = self.read_cells()
        covered = tuple(sorted(set(self.target_tables()) | set(journalled)))
        problems = self.problem_cells(covered, db)
        assert not problems, (
            f"finalize exit {code} though the journalled or targeted values "
            f"{self._describe(problems, db)} do not verify")
        for c in self.written:
            if c[0] in covered and db.get(c) != self.written[c].value:
                self.finalized[c] = db[c]
        left = self.journal_layers()
        for layer, entries in list(self.layers.items()):
            self.layers[layer] = [e for e in entries if left.get(layer, Counter())[e.row()]]
        if code == 0:
            assert not any(r[0] in covered for v in left.values() for r in v), (
                "finalize exit 0 left journal entries of the columns it verified")
            self.finalize_done = True

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def values_are_writes_or_their_kms_ciphertexts(self) -> None:
        """Invariant 1."""
        STATS["steps"] += 1
        db = self.read_cells()
        assert set(db) == set(self.written), (
            f"rows appeared or vanished: {set(db) ^ set(self.written)}")
        for cell, stored in db.items():
            w = self.written[cell]
            if stored == w.value:
                continue
            opened = self.open_as(stored, cell)
            ok = (w.plain is not None and (w.kind.startswith(("fernet_", "kms")))
                  and opened is not None and opened[0] == w.plain
                  and opened[1] in self.KEY_ARNS)
            assert ok, (f"invariant 1: {cell} ({w.kind}) holds neither the application's "
                        "latest write nor a ciphertext of its plaintext under a tool's key")

    @invariant()
    def rewritten_values_keep_their_journal(self) -> None:
        """Invariant 2: the journal is the model's, layer by layer, and chains each
        rewritten value back to the application's write (or what a finalize verified)."""
        journal = self.journal_layers()
        model = self.model_layers()
        assert journal == model, (
            f"invariant 2: journal layers {sorted(journal, key=str)} "
            f"({ {k: sum(v.values()) for k, v in journal.items()} }) differ from the model's "
            f"({ {k: sum(v.values()) for k, v in model.items()} })")
        db = self.read_cells()
        for cell, stored in db.items():
            w = self.written[cell]
            reach = {w.value, self.finalized.get(cell, w.value)}
            if stored in reach:
                continue
            edges = [(e.original, e.migrated) for v in self.layers.values() for e in v
                     if e.cell == cell]
            grown = True
            while grown:
                new = {m for o, m in edges if o in reach} - reach
                reach |= new
                grown = bool(new)
            assert stored in reach, (
                f"invariant 2: {cell} was rewritten and no chain of journal entries leads "
                "to it from the application's write")


def _machine(kms: KmsHandle) -> type[RekeyMachine]:
    arns = (kms.arn, *(_make_key(kms.client, alias).arn for alias in KEY_IDS[1:]))

    class Machine(RekeyMachine):
        KEY_ARNS = arns  # type: ignore[assignment]

    return Machine


def _run(base: World, monkeypatch: pytest.MonkeyPatch, new_url: Callable[[], str]) -> None:
    # setenv, not delenv: delenv of an unset variable records nothing to restore, and the
    # machine's `cli` sets AWS_KMS_KEY_ID by hand, so it would outlive the test.
    monkeypatch.setenv("AWS_KMS_KEY_ID", KEY_IDS[0])
    if os.environ.get("REKEY_DEBUG"):
        monkeypatch.setenv("HYPOTHESIS_PROFILE", os.environ["REKEY_DEBUG"])
    OUTCOMES.clear()
    _run_fresh(base, monkeypatch, new_url, _machine(base.kms))
    if os.environ.get("STATEFUL_STATS"):
        with open(os.environ["STATEFUL_STATS"], "a") as f:
            f.write(f"  rekey outcomes: {dict(sorted(OUTCOMES.items()))}\n")


def test_rekey_state_machine_sqlite(
    kms: KmsHandle, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    urls = iter(range(10**9))
    base = World("", kms, _other_key(kms), tmp_path, capsys, postgres=False)
    _run(base, monkeypatch, lambda: f"sqlite:///{tmp_path / f'db{next(urls)}.sqlite'}")


@pytest.mark.postgres
def test_rekey_state_machine_postgres(
    kms: KmsHandle, pg_server: Any, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    base = World("", kms, _other_key(kms), tmp_path, capsys, postgres=True)
    _run(base, monkeypatch, pg_server.new_database)


# REKEY_DEBUG=rekey_debug (or rekey_debug_long): the same runs without shrinking, whose
# sequences of commands can take minutes to shrink.
_hs.register_profile("rekey_debug", parent=_hs.get_profile("stateful"),
                     phases=[Phase.explicit, Phase.reuse, Phase.generate])
_hs.register_profile("rekey_debug_long", parent=_hs.get_profile("long"), max_examples=60,
                     stateful_step_count=25,
                     phases=[Phase.explicit, Phase.reuse, Phase.generate])
