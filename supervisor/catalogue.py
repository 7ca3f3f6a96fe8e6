"""The worker catalogue: every Synapse worker type an operator can declare, as plain data.

Each `WorkerType` says which listener resources the process needs, which shared Synapse keys it
contributes to (stream writers, duty instance lists), whether more than one may exist, and which
URL paths it serves (the routing table a reverse proxy uses). Facts are from Synapse 1.163's
docs/workers.md and the official Docker worker generator (see shared/synapse-workers.md §7, §11).
Legacy names from the original worker image (`synapse.app.synchrotron`, ...) map onto these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Path prefixes, written out (A/ R/ C/ in synapse-workers.md).
A = r"^/_matrix/client/(api/v1|r0|v3|unstable)/"
R = r"^/_matrix/client/(r0|v3|unstable)/"
C = r"^/_matrix/client/"
F = r"^/_matrix/federation/(v1|v2)/"


@dataclass(frozen=True)
class WorkerType:
    name: str
    summary: str
    resources: tuple[str, ...] = ()  # resources on the 8008 http listener ("client", "media")
    federation_listener: bool = False  # an 8448 listener with the federation resource
    replication_listener: bool = False  # a 9093 listener; required for stream writers
    stream_writer: str | None = None  # the stream key in `stream_writers`
    duty_list: str | None = None  # a shared key holding the list of instances
    duty_single: str | None = None  # a shared key naming the one instance
    singleton: bool = False
    media: bool = False  # enable_media_repo in the worker file
    routes: tuple[str, ...] = ()
    sticky: str | None = None  # "user" or "source-ip": how a proxy should pin requests
    legacy_names: tuple[str, ...] = field(default=())

    @property
    def instance_prefix(self) -> str:
        return self.name.replace("_", "-")


SYNC_ROUTES = (
    C + r"(v2_alpha|r0|v3)/sync$",
    C + r"(api/v1|v2_alpha|r0|v3)/events$",
    C + r"(api/v1|r0|v3)/initialSync$",
    C + r"(api/v1|r0|v3)/rooms/[^/]+/initialSync$",
)

CLIENT_READER_ROUTES = (
    A + r"publicRooms$", A + r"rooms/.*/joined_members$", A + r"rooms/.*/context/.*$",
    A + r"rooms/.*/members$", A + r"rooms/.*/state$", C + r"v1/rooms/.*/hierarchy$",
    C + r"(v1|unstable)/rooms/.*/relations/", C + r"v1/rooms/.*/threads$", A + r"login$",
    A + r"account/3pid$", A + r"account/whoami$", A + r"account/deactivate$",
    C + r"versions$", A + r"voip/turnServer$", R + r"register$", R + r"register/available$",
    R + r"auth/.*/fallback/web$", A + r"rooms/.*/messages$", A + r"rooms/.*/event",
    A + r"joined_rooms", C + r"(api/v1|r0|v3|unstable/.*)/rooms/.*/aliases",
    C + r"v1/rooms/.*/timestamp_to_event$", A + r"search", R + r"user/.*/filter(/|$)",
    R + r"password_policy$", A + r"directory/room/.*$", R + r"capabilities$",
    R + r"notifications$", A + r"createRoom$", C + r"v1/room_summary/.*$",
    R + r"keys/(query|changes|claim)$", R + r"room_keys/",
    C + r"unstable/org.matrix.msc4140/delayed_events(/[^/]+(/restart)?)?$",
)

EVENT_CREATOR_ROUTES = (
    A + r"rooms/.*/redact", A + r"rooms/.*/send", A + r"rooms/.*/state/",
    A + r"rooms/.*/(join|invite|leave|ban|unban|kick)$", A + r"join/", A + r"knock/",
    A + r"profile/",
)

FEDERATION_READER_ROUTES = (
    r"^/_matrix/federation/v1/version$",
    F + r"(event|state|state_ids|backfill|get_missing_events|make_join|make_leave|send_join"
    r"|send_leave|invite|query_auth|event_auth|exchange_third_party_invite|user/devices|query)/",
    F + r"publicRooms",
    r"^/_matrix/federation/v1/(make_knock|send_knock|timestamp_to_event|hierarchy)/",
    r"^/_matrix/key/v2/query",
    r"/_matrix/federation/(v1|v2)/send/",
)

MEDIA_ROUTES = (
    r"^/_matrix/media/", C + r"v1/media/.*$", r"^/_matrix/federation/v1/media/.*$",
    r"^/_synapse/admin/v1/(purge_media_cache$|room/.*/media.*$|user/.*/media.*$|media/.*$"
    r"|quarantine_media/.*$)",
)

DEVICE_LISTS_ROUTES = (
    C + r"(r0|v3)/delete_devices$", A + r"devices(/|$)", R + r"keys/upload",
    A + r"keys/device_signing/upload$", A + r"keys/signatures/upload$",
)

WORKER_TYPES: dict[str, WorkerType] = {
    t.name: t
    for t in (
        WorkerType("sync", "serves /sync, /events and initialSync", resources=("client",),
                   routes=SYNC_ROUTES, sticky="user",
                   legacy_names=("synchrotron", "synapse.app.synchrotron")),
        WorkerType("client_reader", "serves read-mostly client APIs", resources=("client",),
                   routes=CLIENT_READER_ROUTES,
                   legacy_names=("synapse.app.client_reader", "frontend_proxy",
                                 "synapse.app.frontend_proxy")),
        WorkerType("event_creator", "serves event-sending client APIs", resources=("client",),
                   routes=EVENT_CREATOR_ROUTES, legacy_names=("synapse.app.event_creator",)),
        WorkerType("federation_reader", "serves inbound federation", federation_listener=True,
                   routes=FEDERATION_READER_ROUTES, sticky="source-ip",
                   legacy_names=("federation_inbound", "synapse.app.federation_reader")),
        WorkerType("federation_sender", "sends outbound federation",
                   duty_list="federation_sender_instances",
                   legacy_names=("synapse.app.federation_sender",)),
        WorkerType("event_persister", "writes events (sharded by room)", replication_listener=True,
                   stream_writer="events"),
        WorkerType("typing", "typing stream writer", resources=("client",),
                   replication_listener=True, stream_writer="typing", singleton=True,
                   routes=(A + r"rooms/.*/typing",)),
        WorkerType("to_device", "to-device stream writer", resources=("client",),
                   replication_listener=True, stream_writer="to_device", singleton=True,
                   routes=(R + r"sendToDevice/",)),
        WorkerType("account_data", "account data stream writer", resources=("client",),
                   replication_listener=True, stream_writer="account_data", singleton=True,
                   routes=(R + r".*/tags", R + r".*/account_data")),
        WorkerType("receipts", "receipts stream writer", resources=("client",),
                   replication_listener=True, stream_writer="receipts",
                   routes=(R + r"rooms/.*/receipt", R + r"rooms/.*/read_markers")),
        WorkerType("presence", "presence stream writer", resources=("client",),
                   replication_listener=True, stream_writer="presence", singleton=True,
                   routes=(A + r"presence/",)),
        WorkerType("push_rules", "push rules stream writer", resources=("client",),
                   replication_listener=True, stream_writer="push_rules", singleton=True,
                   routes=(A + r"pushrules/",)),
        WorkerType("device_lists", "device lists stream writer", resources=("client",),
                   replication_listener=True, stream_writer="device_lists",
                   routes=DEVICE_LISTS_ROUTES),
        WorkerType("media_repository", "serves and stores media", resources=("client", "media"),
                   replication_listener=True, stream_writer="quarantined_media_changes",
                   media=True, routes=MEDIA_ROUTES,
                   legacy_names=("synapse.app.media_repository",)),
        WorkerType("pusher", "sends push notifications", duty_list="pusher_instances",
                   legacy_names=("synapse.app.pusher",)),
        WorkerType("appservice", "sends traffic to application services",
                   duty_single="notify_appservices_from_worker", singleton=True,
                   legacy_names=("synapse.app.appservice",)),
        WorkerType("user_dir", "maintains and searches the user directory",
                   resources=("client",), duty_single="update_user_directory_from_worker",
                   singleton=True, routes=(A + r"user_directory/search$",),
                   legacy_names=("user_directory", "synapse.app.user_dir")),
        WorkerType("background_worker", "runs background tasks",
                   duty_single="run_background_tasks_on", singleton=True),
    )
}

LEGACY_NAMES: dict[str, str] = {
    legacy: t.name for t in WORKER_TYPES.values() for legacy in t.legacy_names
}

# Streams whose writer count Synapse checks at startup to be exactly one.
SINGLE_WRITER_STREAMS = ("typing", "to_device", "account_data", "presence", "push_rules")


def resolve(name: str) -> WorkerType | None:
    """The worker type for a name, a legacy app name or None."""
    key = LEGACY_NAMES.get(name, name)
    return WORKER_TYPES.get(key)


def known_names() -> list[str]:
    return sorted(WORKER_TYPES)
