"""Every Redis key, stream, consumer group and channel name, built in one place.

Layout (``P`` is the configurable prefix, ``magi`` by default)::

    P:s:{SID}:log        stream   the session's durable message log, entry id 0-SEQ
    P:s:{SID}:seq        string   last allocated seq
    P:s:{SID}:meta       hash     appid, owner (opening) instance, agents, deadline, completed
    P:s:{SID}:viewers    zset     "INSTANCE CONNECTION" of each viewer -> lease expiry (ms)
    P:s:{SID}:pending    set      agents that still owe a final
    P:s:{SID}:results    hash     agent -> {"result_code", "decision"} (for the verdict)
    P:idem:LEN:APPID:RID string   request_id -> session id (idempotency; LEN = len(APPID))
    {P}:a:AGENT:q:LEN:APPID  stream  one appid's requests for one agent, group ``workers``
    {P}:a:AGENT:apps     zset     appids that queued requests for the agent, score = last (ms)
    {P}:a:AGENT:workers  zset     live worker ids, score = heartbeat expiry (ms)
    {P}:agents           zset     agents with a live worker, score = expiry (ms)
    {P}:deadlines        zset     session id -> deadline (ms), swept by every gateway
    {P}:unqueued         hash     session id -> requests not yet queued (the intake mark)
    {P}:app:LEN:APPID:running  zset  the appid's running sessions, score = deadline (ms)
    {P}:app:LEN:APPID:rate     string  sessions the appid opened this second
    {P}:unqueued:due     zset     session id -> when the repair sweep queues them (ms)
    P:gw:INSTANCE        channel  notifications for a gateway instance with viewers of a session
    P:cancel             channel  session ids whose agents workers must stop
    P:admin              channel  signed admin commands, for every gateway instance
    P:ready:INSTANCE     string   written by /readyz to prove Redis takes writes (5 s expiry)
    P:admin:reply:NONCE  channel  the instances' answers to one admin command
    P:admin:nonce:NONCE  string   when an admin command was first seen (ms, Redis clock)

The original system's lists, used by ``LegacyBridge`` (``L`` is ``LEGACY_LIST_PREFIX``,
empty by default: the original backends know these names as they are, unprefixed)::

    Lqueue_agent_judgement                         list  requests for legacy backends
    Lqueue_agent_judgement_stream                  list  their thinking chunks
    Lqueue_agent_judgement_final                   list  their finals
    Lqueue_agent_judgement:bridge:processing       list  responses taken, not yet logged
    Lqueue_agent_judgement:bridge:lease            string  the bridge relaying responses

The original system's pub/sub channels, used by ``PubSubBridge`` (``C`` is
``PUBSUB_CHANNEL_PREFIX``, empty by default)::

    Cgateway:requests:SID                          channel  a request, for the backends' PSUBSCRIBE
    Cgateway:responses:SID                         channel  the backends' answers (PSUBSCRIBEd)

Session keys carry the ``{SID}`` hash tag so one session lives on one Redis Cluster
shard and the Lua scripts touching them stay single-slot; sessions, and with them the
per-chunk traffic, spread over the shards. The per-deployment keys (request streams,
registries, deadlines) share the ``{P}`` hash tag: a worker reads the streams of all
its agents in one ``XREADGROUP``, which a cluster allows only within one slot. They
carry one command per request or heartbeat, not per chunk. Everything written has an
expiry (session keys, idempotency keys, registries) or a trim (request streams). The
legacy lists are one set per Redis, shared by every deployment on it (give each its own
``L``); their names carry no hash tag, so the bridge needs a non-cluster Redis, as the
original system did (its gateway popped two of them in one ``BLPOP``).
"""

from __future__ import annotations

from dataclasses import dataclass

from magi_gateway.core.ids import AgentId, AppId, InstanceId, SessionId

__all__ = ["WORKER_GROUP", "Keys", "LegacyKeys", "PubSubKeys", "SessionKeys"]

#: Consumer group every worker of an agent joins.
WORKER_GROUP = "workers"


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The keys of one session, all in the same hash slot."""

    log: str
    seq: str
    meta: str
    pending: str
    results: str
    viewers: str

    def all(self) -> list[str]:
        """All keys, in the order the Lua scripts expect them."""
        return [self.log, self.seq, self.meta, self.pending, self.results, self.viewers]


@dataclass(frozen=True, slots=True)
class LegacyKeys:
    """The original system's list names, and the state of the bridge that drains them."""

    requests: str
    stream_responses: str
    final_responses: str
    processing: str
    lease: str


@dataclass(frozen=True, slots=True)
class PubSubKeys:
    """The original system's pub/sub channel names (its gateway published, its backends answered)."""

    prefix: str = ""

    def request_channel(self, session_id: SessionId) -> str:
        """Where a session's request is published for the backends."""
        return f"{self.prefix}gateway:requests:{session_id}"

    @property
    def responses_pattern(self) -> str:
        """The pattern matching every session's response channel."""
        return f"{self.prefix}gateway:responses:*"

    def session_of(self, channel: str) -> str | None:
        """The session id a response channel names (None: not a response channel)."""
        head = f"{self.prefix}gateway:responses:"
        return channel[len(head) :] if channel.startswith(head) else None


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder bound to a prefix, so several deployments can share one Redis."""

    prefix: str = "magi"

    def session(self, session_id: SessionId) -> SessionKeys:
        """Keys of one session."""
        base = f"{self.prefix}:s:{{{session_id}}}"
        return SessionKeys(
            log=f"{base}:log",
            seq=f"{base}:seq",
            meta=f"{base}:meta",
            pending=f"{base}:pending",
            results=f"{base}:results",
            viewers=f"{base}:viewers",
        )

    def idempotency(self, appid: AppId, request_id: str) -> str:
        """Maps a client's request_id to the session it started.

        The appid is length-prefixed: both parts may hold ``:``, and ``appA`` + ``x:r9``
        must not name the key of ``appA:x`` + ``r9``.
        """
        return f"{self.prefix}:idem:{len(appid)}:{appid}:{request_id}"

    def requests(self, agent_id: AgentId, appid: AppId) -> str:
        """Request stream of one agent for one appid (workers read the appids in turn).

        The appid is length-prefixed, as in ``idempotency``.
        """
        return f"{{{self.prefix}}}:a:{agent_id}:q:{len(appid)}:{appid}"

    def request_apps(self, agent_id: AgentId) -> str:
        """The appids with requests for ``agent_id`` lately, score = last queued (ms)."""
        return f"{{{self.prefix}}}:a:{agent_id}:apps"

    def workers(self, agent_id: AgentId) -> str:
        """Live workers of one agent."""
        return f"{{{self.prefix}}}:a:{agent_id}:workers"

    @property
    def agents(self) -> str:
        """Agents with at least one live worker."""
        return f"{{{self.prefix}}}:agents"

    @property
    def agent_aliases(self) -> str:
        """Aliases workers declare for their agents: field = the alias, value = JSON
        ``{"agent", "expires_ms"}`` (refreshed by each heartbeat)."""
        return f"{{{self.prefix}}}:aliases"

    @property
    def deadlines(self) -> str:
        """Deadlines of running sessions, for the timeout sweep."""
        return f"{{{self.prefix}}}:deadlines"

    def app_running(self, appid: AppId) -> str:
        """Running sessions of one appid, across every instance (its quota)."""
        return f"{{{self.prefix}}}:app:{len(appid)}:{appid}:running"

    def app_rate(self, appid: AppId) -> str:
        """Sessions one appid opened in the current second (its creation rate)."""
        return f"{{{self.prefix}}}:app:{len(appid)}:{appid}:rate"

    @property
    def unqueued(self) -> str:
        """Requests of sessions being opened, until they are queued (``redis.intake``)."""
        return f"{{{self.prefix}}}:unqueued"

    @property
    def unqueued_due(self) -> str:
        """When the repair sweep queues a session's requests if nobody did."""
        return f"{{{self.prefix}}}:unqueued:due"

    @property
    def cancel_channel(self) -> str:
        """Where gateways announce cancelled sessions to workers."""
        return f"{self.prefix}:cancel"

    def ready_probe(self, instance_id: InstanceId) -> str:
        """The key ``/readyz`` writes, to prove Redis accepts writes."""
        return f"{self.prefix}:ready:{instance_id}"

    @property
    def admin_channel(self) -> str:
        """Where ``magi-gateway admin`` publishes signed commands to every gateway."""
        return f"{self.prefix}:admin"

    def admin_reply_channel(self, nonce: str) -> str:
        """Where gateway instances answer the admin command ``nonce``."""
        return f"{self.prefix}:admin:reply:{nonce}"

    def admin_nonce(self, nonce: str) -> str:
        """When the admin command ``nonce`` was first seen by any instance (replay guard)."""
        return f"{self.prefix}:admin:nonce:{nonce}"

    @property
    def gateway_channel_prefix(self) -> str:
        """Prefix the Lua scripts complete with the id of each instance with viewers."""
        return f"{self.prefix}:gw:"

    def gateway_channel(self, instance_id: InstanceId) -> str:
        """Notification channel of one gateway instance."""
        return f"{self.gateway_channel_prefix}{instance_id}"

    @staticmethod
    def pubsub(channel_prefix: str = "") -> PubSubKeys:
        """The original pub/sub channels, ``channel_prefix`` prepended (empty: the original names)."""
        return PubSubKeys(channel_prefix)

    @staticmethod
    def legacy(list_prefix: str = "") -> LegacyKeys:
        """The original lists, ``list_prefix`` prepended (empty: exactly the original names).

        Not under ``prefix``: the legacy backends use these names as they are.
        """
        requests = f"{list_prefix}queue_agent_judgement"
        return LegacyKeys(
            requests=requests,
            stream_responses=f"{requests}_stream",
            final_responses=f"{requests}_final",
            processing=f"{requests}:bridge:processing",
            lease=f"{requests}:bridge:lease",
        )
