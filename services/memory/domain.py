"""Memory rules, free of Redis, Kafka and gRPC: what a valid request is, where
each kind of memory lives (key naming), how a memory write is interpreted,
what erasing a data subject touches, and how the knowledge base is shaped.

Key layout (``aios:{tenant}:...``; the braces are a Redis Cluster hash tag, so
one tenant's keys share a slot and the Lua scripts may touch several of them):

* ``vs:{collection}``          vector set of the collection's items (element = item id)
* ``item:{collection}:{id}``   hash: text, metadata_json, subject, provenance_json
* ``subject:{subject}``        set of erasure members (see ``member_*``) tagged with the subject
* ``fact:{key}``               hash: value_json, version, provenance_json, subject, updated_at_ms
* ``facthist:{key}``           list of the last versions, newest first, each with its provenance
* ``episodes``                 stream of episodes, trimmed to the retention
* ``wm:{key}``                 working memory, a string with a TTL
* ``seen:{event_id}``          dedupe marker of a consumed memory write; its layout and lifetime
                               are the unit of work's (``services.common.uow.marker_key``)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from services.common.errors import BadRecord, InvalidArgument

EMBED_DIM = 384
MAX_K = 50
MAX_ITEMS_PER_REMEMBER = 256
MAX_TEXT_CHARS = 2000  # the inference service embeds at most 2000 characters per text
MAX_QUERY_CHARS = 2000
MAX_EPISODE_LIMIT = 1000
DEFAULT_EPISODE_LIMIT = 50
FACT_HISTORY_KEPT = 20
LATENCY_CLASSES = ("interactive", "bulk")
DEFAULT_LATENCY_CLASS = "interactive"
KB_COLLECTION = "kb"
EPISODE_OUTCOMES = ("completed", "failed", "cancelled", "compensation_failed")  # the RunOutcome enum

# Tenants and collections become part of Redis keys: no braces (they would
# move the hash tag) and no colons (they would make key names ambiguous).
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ITEM_ID = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")
_FACT_KEY = re.compile(r"^[A-Za-z0-9_.:@/-]{1,256}$")


# -- key naming ------------------------------------------------------------------
def _base(tenant: str) -> str:
    return f"aios:{{{tenant}}}"


def vector_set_key(tenant: str, collection: str) -> str:
    return f"{_base(tenant)}:vs:{collection}"


def item_key(tenant: str, collection: str, item_id: str) -> str:
    return f"{_base(tenant)}:item:{collection}:{item_id}"


def subject_key(tenant: str, subject: str) -> str:
    return f"{_base(tenant)}:subject:{subject}"


def fact_key(tenant: str, key: str) -> str:
    return f"{_base(tenant)}:fact:{key}"


def fact_history_key(tenant: str, key: str) -> str:
    return f"{_base(tenant)}:facthist:{key}"


def episodes_key(tenant: str) -> str:
    return f"{_base(tenant)}:episodes"


def working_key(tenant: str, key: str) -> str:
    return f"{_base(tenant)}:wm:{key}"


# Members of a subject set name what to erase; collection names hold no colon,
# so the first two colons of an item member are unambiguous.
def member_item(collection: str, item_id: str) -> str:
    return f"item:{collection}:{item_id}"


def member_fact(key: str) -> str:
    return f"fact:{key}"


def member_episode(stream_id: str) -> str:
    return f"episode:{stream_id}"


def member_working(key: str) -> str:
    return f"wm:{key}"


# -- validation ------------------------------------------------------------------
def require_name(value: str, what: str) -> str:
    """A tenant or collection name, or InvalidArgument saying what to send."""
    if not value:
        raise InvalidArgument(f"{what} is required: send a non-empty {what} (letters, digits, '_', '.', '-')")
    if not _NAME.match(value):
        raise InvalidArgument(f"{what} {value!r} is invalid: use 1-64 of letters, digits, '_', '.', '-'")
    return value


def require_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise InvalidArgument(f"k={k} is out of range: send k between 1 and {MAX_K}")
    return k


def require_query(query: str) -> str:
    if not query.strip():
        raise InvalidArgument("query is required: send the text to search for")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidArgument(f"query has {len(query)} characters: send at most {MAX_QUERY_CHARS}")
    return query


def latency_class_or_default(value: str) -> str:
    if not value:
        return DEFAULT_LATENCY_CLASS
    if value not in LATENCY_CLASSES:
        raise InvalidArgument(f"latency_class {value!r} is unknown: send one of {', '.join(LATENCY_CLASSES)}")
    return value


def require_fact_key(key: str) -> str:
    if not key:
        raise InvalidArgument("key is required: send the fact's key, e.g. 'customer:42:address'")
    if not _FACT_KEY.match(key):
        raise InvalidArgument(f"key {key!r} is invalid: use 1-256 of letters, digits and _ . : @ / -")
    return key


def require_expected_version(version: int) -> int:
    if version < -1:
        raise InvalidArgument(f"expected_version={version} is invalid: send -1 (unconditional), "
                              "0 (must not exist) or the current version N")
    return version


def require_subject(subject: str) -> str:
    if not subject.strip():
        raise InvalidArgument("subject is required: send the data subject's identifier, e.g. 'customer:42'")
    if len(subject) > 256 or any(ch.isspace() for ch in subject):
        raise InvalidArgument("subject is invalid: send at most 256 characters without whitespace")
    return subject


def episode_limit_or_default(limit: int) -> int:
    if limit == 0:
        return DEFAULT_EPISODE_LIMIT
    if not 1 <= limit <= MAX_EPISODE_LIMIT:
        raise InvalidArgument(f"limit={limit} is out of range: send 1..{MAX_EPISODE_LIMIT} (0 means "
                              f"{DEFAULT_EPISODE_LIMIT})")
    return limit


def parse_json_field(name: str, text: str, *, want_object: bool = True,
                     error: type[Exception] = InvalidArgument) -> Any:
    """Parse a ``*_json`` field; empty means ``{}``. Objects only unless ``want_object`` is false."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise error(f"{name} is not valid JSON ({exc}): send a JSON "
                    f"{'object' if want_object else 'value'}, e.g. {{\"source\": \"crm\"}}") from None
    if want_object and not isinstance(value, dict):
        raise error(f"{name} must be a JSON object, got {type(value).__name__}: send e.g. {{\"source\": \"crm\"}}")
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# -- semantic items --------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One item to remember, validated; ``embed_text`` is what gets embedded."""

    id: str
    text: str
    metadata_json: str
    subject: str
    provenance_json: str
    embed_text: str


def prepare_item(item_id: str, text: str, metadata_json: str, subject: str, provenance_json: str,
                 *, new_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> Item:
    """Validate one item; an empty id gets a fresh one."""
    item_id = item_id or new_id()
    if not _ITEM_ID.match(item_id):
        raise InvalidArgument(f"item id {item_id!r} is invalid: use 1-128 of letters, digits and _ . : @ / -, "
                              "or leave it empty to get a generated id")
    if not text.strip():
        raise InvalidArgument(f"item {item_id}: text is required: send the text to remember")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"item {item_id}: text has {len(text)} characters, send at most {MAX_TEXT_CHARS}")
    meta = parse_json_field(f"item {item_id}: metadata_json", metadata_json)
    prov = parse_json_field(f"item {item_id}: provenance_json", provenance_json)
    if subject:
        require_subject(subject)
    return Item(id=item_id, text=text, metadata_json=canonical_json(meta), subject=subject,
                provenance_json=canonical_json(prov), embed_text=text)


def require_item_count(n: int) -> None:
    if n == 0:
        raise InvalidArgument("items is empty: send at least one item to remember")
    if n > MAX_ITEMS_PER_REMEMBER:
        raise InvalidArgument(f"{n} items in one call: send at most {MAX_ITEMS_PER_REMEMBER} per Remember")


def require_unique_ids(items: Sequence[Item]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise InvalidArgument(f"item id {item.id!r} appears twice in one call: send each id once")
        seen.add(item.id)


def check_vectors(vectors: Sequence[Sequence[float]], expected: int) -> None:
    """The embedder's answer must fit the vector sets (384 dims, one per text)."""
    if len(vectors) != expected:
        raise ValueError(f"embedder returned {len(vectors)} vectors for {expected} texts")
    for vec in vectors:
        if len(vec) != EMBED_DIM:
            raise ValueError(f"embedder returned a {len(vec)}-dim vector; vector sets here are {EMBED_DIM}-dim")


def vector_attributes(item: Item) -> str:
    """Attributes stored on the vector-set element, for VSIM FILTER within one tenant's set."""
    attrs: dict[str, Any] = json.loads(item.metadata_json)
    if item.subject:
        attrs["subject"] = item.subject
    return canonical_json(attrs)


# -- memory writes (Kafka) -------------------------------------------------------
# A MemoryWrite's ``body`` is a union (Episode | FactWrite | WorkingWrite); the codec
# hands it over as ``(full record name, fields)``. Subject and provenance are typed
# fields of the record itself.
@dataclass(frozen=True)
class Failure:
    """Why a run or step failed: the shared ``Failure`` record (type, message, retryable)."""

    type: str
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class EpisodeStep:
    step_id: str
    status: str
    attempts: int
    failure: Failure | None = None
    cost: float = 0.0


@dataclass(frozen=True)
class Provenance:
    """Who wrote a memory write, from which run and step."""

    service: str
    run_id: str = ""
    step_id: str = ""

    def to_json(self) -> str:
        return canonical_json({k: v for k, v in asdict(self).items() if v})


@dataclass(frozen=True)
class Episode:
    """A finished run as later runs learn from it (never its input)."""

    run_id: str
    workflow: str
    outcome: str
    recorded_at_ms: int
    workflow_version: int = 0
    failure: Failure | None = None
    steps: tuple[EpisodeStep, ...] = ()
    cost: float = 0.0
    duration_ms: int = 0
    trigger: str = ""
    provenance: Provenance = Provenance("unknown")
    subject: str = ""

    @property
    def failure_reason(self) -> str:
        """The run's failure message, else the first failed step's; "" for a run that did not fail."""
        if self.failure is not None and self.failure.message:
            return self.failure.message
        failed = [s.failure.message for s in self.steps if s.status == "failed" and s.failure is not None]
        return failed[0] if failed else ""

    @property
    def content_json(self) -> str:
        """The stored episode, as ListEpisodes serves it: the typed fields plus ``failure_reason``
        (the flat field episode readers used before the typed contract)."""
        body = asdict(self)
        for gone in ("recorded_at_ms", "provenance", "subject"):  # stored next to the content
            del body[gone]
        return canonical_json({**body, "failure_reason": self.failure_reason})


@dataclass(frozen=True)
class FactWrite:
    key: str
    value_json: str
    provenance_json: str
    subject: str = ""


@dataclass(frozen=True)
class WorkingWrite:
    key: str
    value_json: str
    subject: str = ""


MemoryWrite = Episode | FactWrite | WorkingWrite


def interpret_write(record: dict[str, Any]) -> MemoryWrite:
    """Turn one MemoryWrite record into what it asks for, or BadRecord saying why not."""
    tenant = record.get("tenant") or ""
    if not _NAME.match(tenant):
        raise BadRecord(f"memory write has invalid tenant {tenant!r}; send 1-64 of letters, digits, _ . -")
    kind, body = _union(record.get("body"), "body")
    subject = _subject(record.get("subject"))
    provenance = _provenance(record.get("provenance"))
    if kind == "Episode":
        return shape_episode(record, body, provenance, subject)
    if kind not in ("FactWrite", "WorkingWrite"):
        raise BadRecord(f"memory write body {kind!r} is unknown: send Episode, FactWrite or WorkingWrite")
    key = str(body.get("key") or "")
    if not _FACT_KEY.match(key):
        raise BadRecord(f"{kind} needs a key (1-256 of letters, digits, _ . : @ / -), got {key!r}")
    value = parse_json_field(f"{kind}.value_json", str(body.get("value_json") or ""), want_object=False,
                             error=BadRecord)
    if kind == "FactWrite":
        return FactWrite(key=key, value_json=canonical_json(value), provenance_json=provenance.to_json(),
                         subject=subject)
    return WorkingWrite(key=key, value_json=canonical_json(value), subject=subject)


def shape_episode(record: dict[str, Any], body: dict[str, Any], provenance: Provenance,
                  subject: str = "") -> Episode:
    """An episode keeps what a later run can learn from: workflow, outcome, steps, failure and cost."""
    run_id = str(body.get("run_id") or record.get("run_id") or "")
    workflow = str(body.get("workflow") or "")
    if not run_id or not workflow:
        raise BadRecord("an Episode needs run_id and workflow")
    steps = body.get("steps") or []
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise BadRecord("Episode.steps must be a list of EpisodeStep records")
    return Episode(
        run_id=run_id, workflow=workflow, outcome=str(body.get("outcome") or "unknown"),
        recorded_at_ms=int(record.get("occurred_at") or 0), workflow_version=int(body.get("workflow_version") or 0),
        failure=_failure(body.get("failure"), "Episode.failure"),
        steps=tuple(EpisodeStep(step_id=str(s.get("step_id") or ""), status=str(s.get("status") or ""),
                                attempts=int(s.get("attempts") or 0),
                                failure=_failure(s.get("failure"), f"steps[{i}].failure"),
                                cost=float(s.get("cost") or 0.0)) for i, s in enumerate(steps)),
        cost=float(body.get("cost") or 0.0), duration_ms=int(body.get("duration_ms") or 0),
        trigger=str(body.get("trigger") or ""), provenance=provenance, subject=subject)


def _union(value: Any, what: str) -> tuple[str, dict[str, Any]]:
    """A decoded union value ``(full record name, fields)`` as (short name, fields)."""
    if not (isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], dict)):
        raise BadRecord(f"memory write {what} is not a (record name, fields) pair: encode it with the "
                        "aios codec's union form, e.g. ('aiosmesh.v1.FactWrite', {...})")
    return value[0].rsplit(".", 1)[-1], value[1]


def _failure(raw: Any, what: str) -> Failure | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRecord(f"{what} must be a Failure record (type, message, retryable) or null")
    return Failure(type=str(raw.get("type") or "Error"), message=str(raw.get("message") or ""),
                   retryable=bool(raw.get("retryable")))


def _provenance(raw: Any) -> Provenance:
    if not isinstance(raw, dict) or not raw.get("service"):
        raise BadRecord("memory write needs provenance.service: the service that wrote it")
    return Provenance(service=str(raw["service"]), run_id=str(raw.get("run_id") or ""),
                      step_id=str(raw.get("step_id") or ""))


def _subject(raw: Any) -> str:
    """The data subject (tagged for erasure); it becomes part of a key, so it must be well formed."""
    if not raw:
        return ""
    try:
        return require_subject(str(raw))
    except InvalidArgument as exc:
        raise BadRecord(f"memory write {exc}") from None


def outcome_label(outcome: str) -> str:
    """Bounded label values for metrics, whatever writers send."""
    return outcome if outcome in EPISODE_OUTCOMES else "other"


# -- erasure ---------------------------------------------------------------------
@dataclass(frozen=True)
class ErasureStep:
    """The commands that erase one member; it counts as erased if any of them removed something."""

    member: str
    kind: str
    commands: tuple[tuple[str, ...], ...]


def erasure_plan(tenant: str, members: Sequence[str]) -> list[ErasureStep]:
    """What to delete for each member of a subject set; unknown members are skipped."""
    steps = []
    for member in sorted(members):
        kind, _, rest = member.partition(":")
        if kind == "item" and ":" in rest:
            collection, _, item_id = rest.partition(":")
            cmds: tuple[tuple[str, ...], ...] = (
                ("VREM", vector_set_key(tenant, collection), item_id),
                ("DEL", item_key(tenant, collection, item_id)))
        elif kind == "fact" and rest:
            cmds = (("DEL", fact_key(tenant, rest), fact_history_key(tenant, rest)),)
        elif kind == "episode" and rest:
            cmds = (("XDEL", episodes_key(tenant), rest),)
        elif kind == "wm" and rest:
            cmds = (("DEL", working_key(tenant, rest)),)
        else:
            continue
        steps.append(ErasureStep(member=member, kind=kind, commands=cmds))
    return steps


@dataclass
class ErasureResult:
    erased: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def count_erased(steps: Sequence[ErasureStep], replies: Sequence[Any]) -> ErasureResult:
    """Fold the command replies (in plan order) into counts per kind."""
    result = ErasureResult()
    it = iter(replies)
    for step in steps:
        removed = [bool(next(it)) for _ in step.commands]
        if any(removed):
            result.erased += 1
            result.by_kind[step.kind] = result.by_kind.get(step.kind, 0) + 1
    return result


# -- knowledge base --------------------------------------------------------------
def kb_items(doc: Any, source: str) -> list[Item]:
    """Articles of a knowledge-base file (``articles: [{id, title, body, tags}]``) as items."""
    articles = doc.get("articles") if isinstance(doc, dict) else None
    if not isinstance(articles, list) or not articles:
        raise ValueError(f"{source}: expected a mapping with a non-empty 'articles' list")
    items = []
    for i, art in enumerate(articles):
        where = f"{source}: articles[{i}]"
        if not isinstance(art, dict) or not all(isinstance(art.get(f), str) and art[f].strip()
                                                 for f in ("id", "title", "body")):
            raise ValueError(f"{where}: each article needs non-empty string id, title and body")
        tags = art.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"{where}: tags must be a list of strings")
        title, body = art["title"].strip(), " ".join(art["body"].split())
        item = prepare_item(art["id"], body, canonical_json({"title": title, "tags": tags, "kind": "article"}),
                            "", canonical_json({"source": source, "writer": "memory.seed"}))
        # The title carries most of the intent ("Card not arrived yet"), so embed it with the body.
        items.append(Item(id=item.id, text=item.text, metadata_json=item.metadata_json, subject="",
                          provenance_json=item.provenance_json, embed_text=f"{title}. {body}"))
    require_unique_ids(items)
    return items
