"""Milvus vector store behind :class:`~densekit.retrieval.segment_index.SegmentIndex` (``backend="milvus"``).

The segment index keeps all metadata *and every descriptor* in SQLite (``DIR/meta.sqlite``); Milvus holds
only the searchable copy of the descriptors, one row per segment in a collection with an ``INT64`` primary
key ``id`` (the segment id) and a ``FLOAT_VECTOR`` field ``vector``, searched with the inner-product
metric (``IP``: descriptors are unit vectors, so this is cosine similarity).

Where the vectors live:

- ``uri=None``: milvus-lite embedded in this process, data in ``DIR/milvus.db`` (a folder, despite the
  name: pymilvus hands any URI ending in ``.db`` to milvus-lite, which starts an in-process gRPC server on a
  free local port). milvus-lite takes an exclusive lock on that folder: one process at a time.
- ``uri="http://host:19530"`` (or https): a Milvus server or cluster; the token comes from ``token=`` or
  ``$DENSEKIT_MILVUS_TOKEN`` and is never written to SQLite (credentials in the URI are stripped before it
  is stored, so they too must be given again when the index is opened).

Factory strings map to Milvus index types (:func:`milvus_index_params`):

=======================  ========================================================================
``Flat``                 ``FLAT`` (exact)
``HNSW{M}[,Flat]``       ``HNSW`` with ``M`` and ``efConstruction = 40`` (FAISS's ``IndexHNSW``
                         default, so both backends build comparable graphs); search ``ef``
                         = ``max(ef_search, k)`` (Milvus rejects ``ef < k``)
``IVF{n},Flat``          ``IVF_FLAT`` with ``nlist = n``; search ``nprobe = min(nprobe, n)``
``IVF{n},SQ8``           ``IVF_SQ8`` with ``nlist = n``
``IVF{n},PQ{m}[x{b}]``   ``IVF_PQ`` with ``nlist = n, m, nbits = b (8)``: Milvus servers only;
                         milvus-lite 3.2 accepts the index but never builds it (it logs
                         ``NotImplementedError`` and searches brute force), so it is refused there
=======================  ========================================================================

Milvus trains IVF indexes itself, per sealed segment, so FAISS's "exact search until trained" stage
does not exist here.

Crash consistency mirrors the FAISS backend: SQLite is committed last. A mutation runs as::

    1. info.milvus_pending = 1                                   (committed on its own)
    2. BEGIN; write (or delete) the SQLite rows                    (not committed)
    3. insert (or delete) the vectors in the collection
    4. info.milvus_pending = 0; COMMIT

A crash before 4 leaves ``milvus_pending = 1`` and possibly orphans (vectors SQLite does not know) or
holes (vectors SQLite still has but the collection lost). :meth:`MilvusStore.load` (run by ``open``)
compares the collection's ``count(*)`` with SQLite's segment count and, when they differ or a mutation was
pending, lists the collection's ids and deletes orphans and re-inserts missing vectors from the descriptors
kept in SQLite. A collection that is missing altogether (a deleted ``milvus.db``, a wiped server) is
recreated and refilled the same way.

Only the holder of the index's writer lock (``DIR/.writer.lock``, see segment_index) reconciles; a reader
of an index another process is writing (possible with a server) searches the collection as it is.

pymilvus is imported lazily (only when this backend is used) and a missing package is a one-line
:class:`~densekit.serve.errors.DensekitError`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from densekit.serve.errors import DensekitError

log = logging.getLogger(__name__)

LITE_NAME = "milvus.db"
ID_FIELD = "id"
VECTOR_FIELD = "vector"
TOKEN_ENV = "DENSEKIT_MILVUS_TOKEN"
HNSW_EF_CONSTRUCTION = 40  # faiss IndexHNSW's default efConstruction
CONNECT_TIMEOUT_S = 30.0
INSERT_BATCH_BYTES = 16 << 20  # well under gRPC's / Milvus' default 64 MiB message limit
DELETE_BATCH = 8192
PENDING_KEY = "milvus_pending"

# milvus-lite runs one in-process server per data folder (pymilvus starts it on the first client);
# it is stopped when the last SegmentIndex using that folder closes, which releases the folder's lock
_lite_users: dict[str, int] = {}
_lite_lock = threading.Lock()


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise DensekitError(
            "the milvus backend needs pymilvus: pip install 'pymilvus>=3,<4' (and 'milvus-lite>=3' for the "
            "embedded store)"
        ) from None
    return pymilvus


def milvus_index_params(factory: str) -> tuple[str, dict[str, int]]:
    """FAISS factory string -> (Milvus index type, build params); see the module table."""
    f = re.sub(r"^IDMap2?,", "", factory.strip().replace(" ", ""))
    if f == "Flat":
        return "FLAT", {}
    if m := re.fullmatch(r"HNSW(\d+)(?:,Flat)?", f):
        return "HNSW", {"M": int(m.group(1)), "efConstruction": HNSW_EF_CONSTRUCTION}
    if m := re.fullmatch(r"IVF(\d+),Flat", f):
        return "IVF_FLAT", {"nlist": int(m.group(1))}
    if m := re.fullmatch(r"IVF(\d+),SQ8", f):
        return "IVF_SQ8", {"nlist": int(m.group(1))}
    if m := re.fullmatch(r"IVF(\d+),PQ(\d+)(?:x(\d+))?", f):
        return "IVF_PQ", {"nlist": int(m.group(1)), "m": int(m.group(2)), "nbits": int(m.group(3) or 8)}
    raise DensekitError(
        f"factory {factory!r} has no Milvus index type here; use Flat, HNSW<M>, IVF<n>,Flat, IVF<n>,SQ8 "
        "or IVF<n>,PQ<m>"
    )


def redact_uri(uri: str) -> str:
    """``uri`` without user:password, so it can be stored in the index info."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _message(exc: BaseException) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence library loggers that print tracebacks for conditions we report ourselves."""
    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in loggers)]
    for lg, _ in saved:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _lite_is_locked(folder: Path) -> bool:
    """True when another process holds milvus-lite's flock on ``folder/LOCK``."""
    lock = folder / "LOCK"
    if not lock.exists():
        return False
    try:
        import fcntl
    except ImportError:  # Windows: let milvus-lite report it
        return False
    with open(lock, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


class MilvusStore:
    """The Milvus side of a segment index (see the module docstring).

    ``owner`` is the :class:`SegmentIndex`: its ``root``, ``info``, ``dim``, ``ef_search``, ``nprobe``,
    SQLite connection ``_conn`` and ``_all_descriptors`` / ``_descriptors_for`` are used.
    """

    name = "milvus"

    def __init__(self, owner: Any, uri: str | None = None, token: str | None = None) -> None:
        self.o = owner
        stored = owner.info.get("milvus_uri", "")
        self.server_uri = uri or stored or None  # None = embedded milvus-lite in DIR
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.collection = owner.info["milvus_collection"]
        self.index_type, self.build_params = json.loads(owner.info["milvus_index"])
        self._client: Any = None
        self._lite_path: str | None = None

    # ------------------------------------------------------------------------------ set-up
    @staticmethod
    def info_for(factory: str, uri: str | None, collection: str | None) -> dict[str, str]:
        """The index-info entries of a new Milvus-backed index (validates the factory)."""
        index_type, params = milvus_index_params(factory)
        if uri is None and index_type == "IVF_PQ":
            raise DensekitError(
                f"milvus-lite cannot build IVF_PQ (factory {factory!r}); use a Milvus server (--uri) or "
                "IVF<n>,Flat / IVF<n>,SQ8 / HNSW<M>"
            )
        if uri is not None and not re.match(r"^(https?|tcp)://", uri):
            raise DensekitError(f"Milvus uri must start with http://, https:// or tcp://, got {redact_uri(uri)!r}")
        if collection is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", collection):
            raise DensekitError(f"bad Milvus collection name {collection!r} (letters, digits, _; not first digit)")
        if collection is None:
            collection = "densekit_segments_" + os.urandom(6).hex()  # unique on a shared server
        return {
            "milvus_uri": redact_uri(uri) if uri else "",
            "milvus_collection": collection,
            "milvus_index": json.dumps([index_type, params]),
            PENDING_KEY: "0",
        }

    @property
    def where(self) -> str:
        return str(self.o.root / LITE_NAME) if self.server_uri is None else redact_uri(self.server_uri)

    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        pymilvus = _pymilvus()
        if self.server_uri is None:
            if importlib.util.find_spec("milvus_lite") is None:
                raise DensekitError("the embedded Milvus store needs milvus-lite: pip install 'milvus-lite>=3'")
            folder = (self.o.root / LITE_NAME).resolve()
            path = str(folder)
            with _lite_lock:
                if not _lite_users.get(path) and _lite_is_locked(folder):
                    raise DensekitError(
                        f"{folder} is in use by another process (milvus-lite allows one process at a time; "
                        "use a Milvus server for shared access)"
                    )
                try:
                    with _quiet("milvus_lite.server_manager"):
                        self._client = pymilvus.MilvusClient(uri=path, timeout=CONNECT_TIMEOUT_S)
                except pymilvus.MilvusException as exc:
                    raise DensekitError(f"cannot open the embedded Milvus store {folder}: {_message(exc)}") from None
                _lite_users[path] = _lite_users.get(path, 0) + 1
                self._lite_path = path
        else:
            try:
                with _quiet("pymilvus"):
                    self._client = pymilvus.MilvusClient(
                        uri=self.server_uri, token=self.token, timeout=CONNECT_TIMEOUT_S
                    )
            except pymilvus.MilvusException as exc:
                raise DensekitError(f"cannot connect to Milvus at {self.where}: {_message(exc)}") from None
        return self._client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a client call, turning Milvus errors into one-line DensekitErrors."""
        pymilvus = _pymilvus()
        try:
            # grpc._server: milvus-lite's in-process server logs a traceback for RPCs it does not implement
            # (pymilvus calls AllocTimestamp while waiting for an index build and copes with the refusal)
            with _quiet("pymilvus", "grpc._server"):
                return fn(*args, **kwargs)
        except pymilvus.MilvusException as exc:
            raise DensekitError(f"Milvus {what} failed ({self.where}, {self.collection}): {_message(exc)}") from None

    def _create_collection(self) -> None:
        pymilvus = _pymilvus()
        client = self._connect()
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, pymilvus.DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, pymilvus.DataType.FLOAT_VECTOR, dim=int(self.o.dim))
        index = client.prepare_index_params()
        # build params nested under "params" (sent as one JSON key/value): the Milvus proxy merges that key
        # into the flat form (internal/proxy/task_index.go parseIndexParams), while milvus-lite 3.2 reads
        # only that key and silently drops flat ones (nlist/M would fall back to its defaults)
        index.add_index(
            field_name=VECTOR_FIELD, index_type=self.index_type, index_name=VECTOR_FIELD, metric_type="IP",
            params={"params": dict(self.build_params)},
        )
        # Strong consistency: a search right after an insert or delete sees it (the default "Bounded"
        # level may not, on a server)
        self._call(
            "create_collection", client.create_collection, self.collection, schema=schema, index_params=index,
            consistency_level="Strong",
        )
        self.o.kill_point("write")

    def create(self) -> None:
        """Create the collection for a new index (DensekitError if the name is taken)."""
        client = self._connect()
        if self._call("has_collection", client.has_collection, self.collection):
            raise DensekitError(f"Milvus collection {self.collection!r} already exists at {self.where}")
        self._create_collection()

    def drop(self) -> None:
        """Drop the collection (undoes :meth:`create` when the rest of an index creation fails)."""
        client = self._connect()
        self._call("drop_collection", client.drop_collection, self.collection)

    def load(self, repair: bool = True) -> None:
        """Connect, make sure the collection exists and is loaded, then reconcile it with SQLite.

        Without ``repair`` (a reader while another process holds the index's writer lock: a Milvus server
        shared with a writer) the collection is searched as it is, neither reconciled nor marked."""
        client = self._connect()
        if not self._call("has_collection", client.has_collection, self.collection):
            log.warning("Milvus collection %s missing at %s; recreating it from SQLite", self.collection, self.where)
            self._create_collection()
        state = self._call("get_load_state", client.get_load_state, self.collection)
        if "NotLoad" in str(state.get("state")):
            self._call("load_collection", client.load_collection, self.collection)
        if not repair:
            return
        pending = self._pending()
        self.reconcile(full=pending)
        if pending:
            self.o._conn.execute(f"UPDATE info SET value='0' WHERE key='{PENDING_KEY}'")

    def _pending(self) -> bool:
        row = self.o._conn.execute("SELECT value FROM info WHERE key=?", (PENDING_KEY,)).fetchone()
        return bool(row) and row[0] == "1"

    # ----------------------------------------------------------------------------- consistency
    def count(self) -> int:
        client = self._connect()
        res = self._call("count", client.query, self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def ids(self) -> np.ndarray:
        """Every primary key in the collection (paged with pymilvus' query iterator)."""
        client = self._connect()
        out: list[int] = []
        # the iterator warns (and falls back to a client-side timestamp) against milvus-lite
        with _quiet("pymilvus", "grpc._server"):
            it = self._call(
                "query_iterator", client.query_iterator, self.collection, batch_size=8192, output_fields=[ID_FIELD]
            )
            try:
                while batch := self._call("query_iterator", it.next):
                    out.extend(int(r[ID_FIELD]) for r in batch)
            finally:
                it.close()
        return np.array(sorted(set(out)), dtype=np.int64)

    def reconcile(self, full: bool = True) -> tuple[int, int]:
        """Make the collection hold exactly SQLite's segments -> (orphans deleted, vectors re-inserted).

        Without ``full`` this is one ``count(*)`` when the counts agree.
        """
        n_sql = self.o.n_segments
        if not full and self.count() == n_sql:
            return 0, 0
        have = self.ids()
        want = np.array(
            [r[0] for r in self.o._conn.execute("SELECT id FROM segments ORDER BY id")], dtype=np.int64
        )
        orphans = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(orphans) or len(missing):
            log.warning(
                "Milvus collection %s out of step with SQLite: deleting %d orphans, re-inserting %d",
                self.collection, len(orphans), len(missing),
            )
        if len(orphans):
            self.remove(orphans)
        for start in range(0, len(missing), DELETE_BATCH):
            chunk = missing[start : start + DELETE_BATCH]
            self.add(chunk, self.o._descriptors_for(chunk))
        return int(len(orphans)), int(len(missing))

    # --------------------------------------------------------------------------------- mutation
    def begin(self) -> None:
        """Step 1 of a mutation: mark it pending, committed before anything else changes."""
        self.o.kill_point("commit")
        self.o._conn.execute(f"UPDATE info SET value='1' WHERE key='{PENDING_KEY}'")

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        client = self._connect()
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = max(1, INSERT_BATCH_BYTES // max(1, 4 * x.shape[1]))
        for start in range(0, len(ids), step):
            rows = [
                {ID_FIELD: int(i), VECTOR_FIELD: v}
                for i, v in zip(ids[start : start + step], x[start : start + step])
            ]
            self._call("insert", client.insert, self.collection, rows)
            self.o.kill_point("write")

    def remove(self, ids: np.ndarray) -> None:
        client = self._connect()
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), DELETE_BATCH):
            self._call("delete", client.delete, self.collection, ids=ids[start : start + DELETE_BATCH])

    def commit(self) -> None:
        """Step 4: clear the pending mark in the open SQLite transaction and commit it."""
        self.o._conn.execute(f"UPDATE info SET value='0' WHERE key='{PENDING_KEY}'")
        self.o.kill_point("commit")
        self.o._conn.commit()

    # ---------------------------------------------------------------------------------- search
    def search_params(self, k: int) -> dict[str, int]:
        if self.index_type == "HNSW":
            return {"ef": max(int(self.o.ef_search), int(k))}
        if self.index_type.startswith("IVF"):
            return {"nprobe": max(1, min(int(self.o.nprobe), int(self.build_params["nlist"])))}
        return {}

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, D) unit queries -> (scores, ids), each (nq, k), best first; missing hits have id -1."""
        client = self._connect()
        q = np.ascontiguousarray(q, dtype=np.float32)
        res = self._call(
            "search", client.search, self.collection, data=[v for v in q], limit=int(k), anns_field=VECTOR_FIELD,
            output_fields=[ID_FIELD], search_params={"metric_type": "IP", "params": self.search_params(k)},
        )
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for row, hits in enumerate(res):
            for col, hit in enumerate(list(hits)[:k]):
                scores[row, col] = float(hit["distance"])
                ids[row, col] = int(hit[ID_FIELD] if ID_FIELD in hit else hit["entity"][ID_FIELD])
        return scores, ids

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not mask the caller's error
                pass
        path, self._lite_path = self._lite_path, None
        if path is not None:
            with _lite_lock:
                _lite_users[path] -= 1
                last = _lite_users[path] == 0
                if last:
                    del _lite_users[path]
            if last:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(path)
