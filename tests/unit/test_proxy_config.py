"""The reverse proxy's routing as tables: which process answers which request, in which order,
with which instances down; and that the rendered nginx config has the same blocks in the same
order as the table `route_for` reads."""

from __future__ import annotations

import json
import re

import pytest

from supervisor import catalogue, stackfile
from supervisor import proxy_config as pc
from tests.unit.conftest import edit_yaml

C3 = "/_matrix/client/v3"
FED = "/_matrix/federation/v1"

FULL = {"sync": 2, "client_reader": 2, "event_creator": 1, "federation_reader": 2,
        "media_repository": 1, "typing": 1, "account_data": 1, "receipts": 1, "push_rules": 1,
        "device_lists": 1, "user_dir": 1, "event_persister": 1, "federation_sender": 1}


def load_stack(stack_dir, workers):
    edit_yaml(stack_dir / "stack.yaml", lambda d: d.update(workers=workers))
    return stackfile.load(stack_dir / "stack.yaml")


@pytest.fixture
def full(stack_dir):
    return load_stack(stack_dir, FULL)


@pytest.fixture
def bare(stack_dir):
    """Workers that serve no URL: every route goes to main."""
    return load_stack(stack_dir, {"event_persister": 1, "federation_sender": 1})


# (method, path, who answers) with every instance of the FULL stack up.
ROUTES = [
    ("GET", f"{C3}/sync?since=s72_1&timeout=30000", "sync"),
    ("GET", "/_matrix/client/r0/sync", "sync"),
    ("GET", f"{C3}/events?from=s1", "sync"),
    ("GET", f"{C3}/rooms/!r:example.test/initialSync", "sync"),
    ("GET", "/_MATRIX/CLIENT/V3/SYNC", "sync"),  # nginx `~*`: case-insensitive
    ("GET", f"{C3}/rooms/!r:example.test/messages?dir=b&limit=10", "client_reader"),
    ("GET", f"{C3}/rooms/%21r%3Aexample.test/messages", "client_reader"),  # decoded first
    ("GET", f"{C3}/rooms/!r:example.test/state", "client_reader"),
    ("GET", f"{C3}/rooms/!r:example.test/members", "client_reader"),
    ("POST", f"{C3}/login", "client_reader"),
    ("GET", "/_matrix/client/versions", "client_reader"),
    ("POST", f"{C3}/keys/query", "client_reader"),
    ("POST", f"{C3}/createRoom", "client_reader"),
    ("PUT", f"{C3}/rooms/!r:example.test/send/m.room.message/txn1", "event_creator"),
    ("PUT", f"{C3}/rooms/!r:example.test/state/m.room.name/", "event_creator"),
    ("PUT", f"{C3}/rooms/!r:example.test/state/m.room.name", "event_creator"),
    ("POST", f"{C3}/join/%23room:example.test", "event_creator"),
    ("PUT", f"{C3}/profile/@u:example.test/displayname", "event_creator"),
    ("PUT", f"{C3}/rooms/!r:example.test/typing/@u:example.test", "typing"),
    ("PUT", f"{C3}/user/@u:example.test/account_data/m.direct", "account_data"),
    ("PUT", f"{C3}/user/@u:example.test/rooms/!r:example.test/tags/u.work", "account_data"),
    ("POST", f"{C3}/rooms/!r:example.test/receipt/m.read/$ev", "receipts"),
    ("POST", f"{C3}/rooms/!r:example.test/read_markers", "receipts"),
    ("PUT", f"{C3}/pushrules/global/override/x", "push_rules"),
    ("GET", f"{C3}/pushrules/", "push_rules"),
    ("POST", f"{C3}/keys/upload", "device_lists"),  # the writer wins
    ("GET", f"{C3}/devices", "device_lists"),
    ("POST", f"{C3}/delete_devices", "device_lists"),
    ("POST", f"{C3}/user_directory/search", "user_dir"),
    ("GET", "/_matrix/media/v3/download/example.test/abc", "media_repository"),
    ("POST", "/_matrix/media/v3/upload?filename=a.png", "media_repository"),
    ("GET", "/_matrix/client/v1/media/download/example.test/abc", "media_repository"),
    ("GET", "/_matrix/client/v1/media/thumbnail/example.test/abc?width=32", "media_repository"),
    ("POST", "/_synapse/admin/v1/purge_media_cache", "media_repository"),
    ("POST", "/_synapse/admin/v1/media/quarantine/example.test/abc", "media_repository"),
    ("PUT", f"{FED}/send/1700000000", "federation_reader"),
    ("GET", f"{FED}/event/$ev", "federation_reader"),
    ("GET", f"{FED}/make_join/!r:example.test/@u:remote.test", "federation_reader"),
    ("GET", f"{FED}/version", "federation_reader"),
    ("POST", "/_matrix/key/v2/query", "federation_reader"),
    ("GET", f"{FED}/media/download/abc", "media_repository"),
    # main: routes no worker type serves, paths no route matches
    ("GET", "/_matrix/key/v2/server", "main"),
    ("GET", f"{FED}/openid/userinfo", "main"),
    ("GET", f"{C3}/login/sso/redirect", "main"),  # SSO must stay on one process
    ("PUT", f"{C3}/sendToDevice/m.room_key/t1", "main"),  # to_device not declared
    ("PUT", f"{C3}/presence/@u:example.test/status", "main"),  # presence not declared
    ("GET", "/_synapse/admin/v2/users/@u:example.test", "main"),
    ("GET", "/.well-known/matrix/client", "main"),
    ("GET", "/", "main"),
    ("GET", "/unknown/path", "main"),
    # the proxy itself
    ("GET", "/health", "200"),
    ("POST", "/_synapse/replication/send_event/x", "404"),
]


@pytest.mark.parametrize("method,path,expected", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_route_for_full_stack(full, method, path, expected):
    assert pc.route_for(full, method, path) == expected


def test_route_for_names_live_instances(full):
    sync = pc.resolve(full, "GET", f"{C3}/sync")
    assert sync.target.instances == ("sync-1", "sync-2")
    assert sync.target.upstream == "sync_by_user"
    assert sync.route.sticky == pc.USER
    send = pc.resolve(full, "PUT", f"{FED}/send/1")
    assert send.server == pc.FEDERATION
    assert send.target.upstream == "federation_reader_by_source_ip"
    other = pc.resolve(full, "GET", f"{FED}/event/$e")
    assert other.target.upstream == "federation_reader" and other.route.sticky is None
    messages = pc.resolve(full, "GET", f"{C3}/rooms/!r:x/messages")
    assert messages.target.upstream == "client_reader_by_room"


# (workers down, method, path, who answers)
DOWN = [
    ({"sync-1"}, "GET", f"{C3}/sync", "sync"),
    ({"sync-1", "sync-2"}, "GET", f"{C3}/sync", "main"),
    ({"client-reader-1", "client-reader-2"}, "GET", f"{C3}/rooms/!r:x/messages", "main"),
    ({"event-creator-1"}, "PUT", f"{C3}/rooms/!r:x/send/m.room.message/t", "main"),
    ({"user-dir-1"}, "POST", f"{C3}/user_directory/search", "main"),
    ({"federation-reader-1", "federation-reader-2"}, "PUT", f"{FED}/send/1", "main"),
    ({"federation-reader-1", "federation-reader-2"}, "POST", "/_matrix/key/v2/query", "main"),
    # media: nobody else serves it (main has enable_media_repo false once media workers exist)
    ({"media-repository-1"}, "GET", "/_matrix/media/v3/download/x/y", "503"),
    ({"media-repository-1"}, "POST", "/_matrix/media/v3/upload", "503"),
    ({"media-repository-1"}, "GET", "/_matrix/client/v1/media/download/x/y", "503"),
    ({"media-repository-1"}, "GET", f"{FED}/media/download/y", "503"),
    # stream writers: reads fall back to main, writes get 503
    ({"typing-1"}, "PUT", f"{C3}/rooms/!r:x/typing/@u:x", "503"),
    ({"account-data-1"}, "GET", f"{C3}/user/@u:x/account_data/m.direct", "main"),
    ({"account-data-1"}, "PUT", f"{C3}/user/@u:x/account_data/m.direct", "503"),
    ({"push-rules-1"}, "GET", f"{C3}/pushrules/", "main"),
    ({"push-rules-1"}, "HEAD", f"{C3}/pushrules/", "main"),
    ({"push-rules-1"}, "DELETE", f"{C3}/pushrules/global/override/x", "503"),
    ({"device-lists-1"}, "GET", f"{C3}/devices", "main"),
    ({"device-lists-1"}, "POST", f"{C3}/keys/upload", "503"),
    ({"receipts-1"}, "POST", f"{C3}/rooms/!r:x/receipt/m.read/$e", "503"),
    # a writer down does not capture what others serve
    ({"typing-1"}, "GET", f"{C3}/rooms/!r:x/messages", "client_reader"),
    # main down: what only main serves gets 503; workers keep serving
    ({"main"}, "GET", "/unknown", "503"),
    ({"main"}, "GET", f"{C3}/sync", "sync"),
    ({"main", "sync-1", "sync-2"}, "GET", f"{C3}/sync", "503"),
    ({"main", "account-data-1"}, "GET", f"{C3}/user/@u:x/account_data/m.direct", "503"),
    ({"main"}, "GET", "/_matrix/key/v2/server", "503"),
    # health reflects the stack
    ({"event-persister-1"}, "GET", "/health", "503"),
    (set(), "GET", "/health", "200"),
]


@pytest.mark.parametrize("down,method,path,expected", DOWN,
                         ids=[f"{sorted(d)} {m} {p}" for d, m, p, _ in DOWN])
def test_route_for_with_instances_down(full, down, method, path, expected):
    assert pc.route_for(full, method, path, down=frozenset(down)) == expected


def test_partial_outage_uses_the_rest(full):
    decision = pc.resolve(full, "GET", f"{C3}/sync", down={"sync-1"})
    assert decision.target.instances == ("sync-2",)
    assert decision.target.upstream == "sync"  # one instance: no hashing


def test_federation_fallback_uses_mains_federation_listener(full):
    down = {"federation-reader-1", "federation-reader-2"}
    assert pc.resolve(full, "PUT", f"{FED}/send/1", down=down).target.upstream == \
        "main_federation"


def test_503_reason_names_what_is_restarting(full):
    t = pc.resolve(full, "PUT", f"{C3}/rooms/!r:x/typing/@u:x", down={"typing-1"}).target
    assert not t.proxied and "typing" in t.reason and "restarting" in t.reason
    h = pc.resolve(full, "GET", "/health", down={"typing-1", "sync-2"}).target
    assert h.reason == "down: sync-2, typing-1"


NONE_DECLARED = [
    ("GET", f"{C3}/sync", "main"),
    ("GET", f"{C3}/rooms/!r:x/messages", "main"),
    ("PUT", f"{C3}/rooms/!r:x/typing/@u:x", "main"),
    ("GET", "/_matrix/media/v3/download/x/y", "main"),
    ("PUT", f"{FED}/send/1", "main"),
    ("GET", f"{FED}/media/download/y", "main"),
]


@pytest.mark.parametrize("method,path,expected", NONE_DECLARED,
                         ids=[f"{m} {p}" for m, p, _ in NONE_DECLARED])
def test_no_worker_of_a_type_declared_goes_to_main(bare, method, path, expected):
    assert pc.route_for(bare, method, path) == expected


def test_no_media_worker_legacy_media_on_federation_port_goes_to_mains_client_listener(bare):
    # main's 8448 listener has only the federation resource; media is on its 8008 listener
    d = pc.resolve(bare, "GET", "/_matrix/media/v3/download/x/y", server=pc.FEDERATION)
    assert d.target.upstream == "main"
    assert pc.resolve(bare, "PUT", f"{FED}/send/1").target.upstream == "main_federation"
    assert pc.resolve(bare, "GET", "/anything").target.upstream == "main"


def test_bare_stack_renders_only_main_upstreams(bare):
    conf = pc.render_nginx(bare)
    assert re.findall(r"upstream (\w+) \{", conf) == ["main", "main_federation"]
    patterns = pc.location_patterns(conf)
    assert patterns == {pc.CLIENT: [], pc.FEDERATION: [pc.LEGACY_MEDIA_ROUTE]}


# --- ordering ---------------------------------------------------------------------------------


def test_every_routed_type_has_a_precedence():
    routed = {t.name for t in catalogue.WORKER_TYPES.values() if t.routes}
    assert routed <= set(pc.PRECEDENCE), "add new routed types to PRECEDENCE"


def test_table_order_follows_precedence_then_catalogue(full):
    table = pc.routing_table(full)
    client = [r for r in table.of(pc.CLIENT)]
    types = [r.worker_type for r in client]
    assert types[0] == "media_repository"
    assert types.index("client_reader") > max(types.index(t) for t in (
        "typing", "account_data", "receipts", "push_rules", "device_lists", "sync",
        "event_creator", "user_dir"))
    sync = [r.pattern for r in client if r.worker_type == "sync"]
    assert sync == [p for p in catalogue.WORKER_TYPES["sync"].routes]
    fed = [r.worker_type for r in table.of(pc.FEDERATION)]
    assert fed[:2] == ["media_repository", "media_repository"]
    assert set(fed[2:]) == {"federation_reader"}


@pytest.mark.parametrize("down", [set(), {"sync-1"}, {"media-repository-1", "typing-1"},
                                  {"client-reader-1", "client-reader-2", "main"}],
                         ids=["all up", "one sync down", "media and typing down",
                              "client readers and main down"])
def test_rendered_locations_are_the_table_in_the_same_order(full, down):
    conf = pc.render_nginx(full, down)
    table = pc.routing_table(full, down)
    found = pc.location_patterns(conf)
    for server in pc.SERVERS:
        assert found[server] == [r.pattern for r in table.of(server)]


def test_route_for_agrees_with_a_first_match_scan_of_the_rendered_config(full):
    """Independent of the table: read the locations back from the nginx text, take the first
    that matches, and check it leads to the upstream route_for names."""
    down = {"sync-1"}
    conf = pc.render_nginx(full, down)
    blocks = re.findall(r'location ~\* "([^\n]*)" \{\n(.*?)\n        \}', conf, re.S)
    client_blocks = blocks[:len(pc.routing_table(full, down).of(pc.CLIENT))]
    for method, path, _ in ROUTES:
        if pc.server_of_path(path) != pc.CLIENT or path in ("/health",) or \
                path.startswith("/_synapse/replication"):
            continue
        uri = pc._normalise(path)
        body = next((b for p, b in client_blocks if re.search(p, uri, re.I)), None)
        decision = pc.resolve(full, method, path, down)
        if body is None:
            assert decision.route is None
            continue
        m = re.search(r"proxy_pass http://(\w+);", body)
        assert m and m.group(1) == decision.target.upstream, path


# --- the nginx text ----------------------------------------------------------------------------


def test_upstreams_name_instances_by_alias_and_port(full):
    conf = pc.render_nginx(full)
    ups = dict(re.findall(r"upstream (\w+) \{\n(.*?)\n    \}", conf, re.S))
    assert re.findall(r"server (\S+) ", ups["sync_by_user"]) == ["sync-1:8008", "sync-2:8008"]
    assert "hash $synapse_sticky_user consistent;" in ups["sync_by_user"]
    assert re.findall(r"server (\S+) ", ups["federation_reader"]) == [
        "federation-reader-1:8448", "federation-reader-2:8448"]
    assert "hash $remote_addr consistent;" in ups["federation_reader_by_source_ip"]
    assert "hash" not in ups["federation_reader"] and "hash" not in ups["client_reader"]
    assert "hash $synapse_sticky_room consistent;" in ups["client_reader_by_room"]
    assert re.findall(r"server (\S+) ", ups["media_repository"]) == ["media-repository-1:8008"]
    assert re.findall(r"server (\S+) ", ups["main"]) == ["main:8008"]
    assert re.findall(r"server (\S+) ", ups["main_federation"]) == ["main:8448"]
    for body in ups.values():
        assert "keepalive 16;" in body


def test_down_instances_are_left_out(full):
    conf = pc.render_nginx(full, {"sync-1", "media-repository-1"})
    assert "sync-1:" not in conf and "media-repository-1:" not in conf
    assert "upstream media_repository" not in conf
    assert "sync-2:8008" in conf
    assert "@unavailable_media_repository" in conf


def test_proxy_pass_never_has_a_uri_part(full):
    conf = pc.render_nginx(full, {"typing-1"})
    passes = re.findall(r"proxy_pass (\S+);", conf)
    assert passes and all(re.fullmatch(r"http://\w+", p) for p in passes), passes


def test_proxy_headers_body_size_timeouts_keepalive(full):
    conf = pc.render_nginx(full)
    for line in ("proxy_set_header X-Forwarded-For $remote_addr;",
                 "proxy_set_header X-Forwarded-Proto $scheme;",
                 "proxy_set_header Host $host;",
                 "proxy_http_version 1.1;",
                 'proxy_set_header Connection "";',
                 "client_max_body_size 50M;",
                 "pid /tmp/nginx.pid;",
                 "listen 8008 default_server;",
                 "listen 8448 default_server;"):
        assert line in conf, line
    sync_block = conf.split('location ~* "^/_matrix/client/(v2_alpha|r0|v3)/sync$" {')[1]
    assert "proxy_read_timeout 600s;" in sync_block.split("}")[0]
    # `-g 'daemon off;'` is on the command line; no `user`: the master is not root
    assert not re.search(r"^\s*(daemon|user) ", conf, re.M)
    custom = pc.render_nginx(full, settings=pc.ProxySettings(client_max_body_size="100M",
                                                             sync_read_timeout=900))
    assert "client_max_body_size 100M;" in custom and "proxy_read_timeout 900s;" in custom


def test_health_location(full):
    ok = pc.render_nginx(full)
    assert 'location = /health {' in ok and 'return 200 "OK";' in ok
    down = pc.render_nginx(full, {"sync-2", "typing-1"})
    assert 'return 503 "down: sync-2, typing-1";' in down


def test_503_is_a_matrix_error_with_retry_after(full):
    conf = pc.render_nginx(full, {"media-repository-1"})
    block = conf.split("location @unavailable_media_repository {")[1].split("\n        }")[0]
    assert "default_type application/json;" in block
    assert "add_header Retry-After 5 always;" in block
    body = re.search(r"return 503 '(.*)';", block).group(1)
    err = json.loads(body)
    assert err["errcode"] == "M_UNKNOWN" and "restarting" in err["error"]


def test_writer_down_reads_go_to_main_writes_get_503(full):
    conf = pc.render_nginx(full, {"push-rules-1"})
    block = conf.split('location ~* "^/_matrix/client/(api/v1|r0|v3|unstable)/pushrules/" {')[1]
    block = block.split("\n        }")[0]
    assert 'if ($request_method !~ "^(GET|HEAD)$") { return 503; }' in block
    assert "error_page 503 @unavailable_push_rules;" in block
    assert "proxy_pass http://main;" in block


def test_admin_restriction(full):
    assert "synapse_admin" not in pc.render_nginx(full)
    conf = pc.render_nginx(full, settings=pc.ProxySettings(admin_allow=("10.0.0.0/8",)))
    assert "10.0.0.0/8 1;" in conf and "if ($synapse_admin_refused)" in conf
    # only on the client server
    fed = conf.split("# federation server")[1]
    assert "synapse_admin_refused" not in fed


def test_settings_for_takes_the_stacks_body_size():
    from types import SimpleNamespace
    stack = SimpleNamespace(proxy=SimpleNamespace(client_max_body_size="200M"))
    assert pc.settings_for(stack).client_max_body_size == "200M"
    assert pc.settings_for(SimpleNamespace()) == pc.DEFAULT_SETTINGS


@pytest.mark.parametrize("kwargs", [{"client_max_body_size": "50 M; evil"},
                                    {"admin_allow": ("10.0.0.0/8; deny all",)}])
def test_settings_refuse_what_would_inject_config(kwargs):
    with pytest.raises(ValueError):
        pc.ProxySettings(**kwargs)


def test_sticky_key_regexes_extract_the_localpart():
    header = pc.TOKEN_IN_HEADER.removeprefix("~*")
    query = pc.TOKEN_IN_QUERY.removeprefix("~*")
    src = "Bearer syt_YWxpY2U_AbCdEfGhIjKlMnOp_0aBcDe "
    assert re.search(header, src, re.I).group(1) == "YWxpY2U"
    assert re.search(query, " syt_Ym9i_Random_1x2y3z", re.I).group(1) == "Ym9i"
    assert re.search(header, "Bearer MDAxOGxvY2F0aW9u ", re.I) is None
    room = pc.ROOM_IN_PATH.removeprefix("~*")
    assert re.search(room, f"{C3}/rooms/!abc:example.test/messages").group(1) == \
        "!abc:example.test"


def test_catalogue_regexes_render_safely():
    for wtype in catalogue.WORKER_TYPES.values():
        for pattern in wtype.routes:
            re.compile(pattern)
            assert '"' not in pattern and "\n" not in pattern


# --- plain data and text -----------------------------------------------------------------------


def test_routes_table_is_plain_data_ending_with_main(full):
    rows = pc.routes_table(full, {"typing-1"})
    json.dumps(rows)
    for server in pc.SERVERS:
        mine = [r for r in rows if r["server"] == server]
        assert [r["order"] for r in mine] == list(range(1, len(mine) + 1))
        assert mine[-1]["pattern"] is None and mine[-1]["serves"] == "main"
    sync = next(r for r in rows if r["worker_type"] == "sync")
    assert sync["instances"] == ["sync-1", "sync-2"] and sync["sticky"] == "user"
    typing = next(r for r in rows if r["worker_type"] == "typing")
    assert typing["serves"] == "main" and typing["writes"]["serves"] == "503"


def test_describe(full):
    text = pc.describe(full, {"media-repository-1"})
    assert text.startswith("down: media-repository-1")
    assert "client server (:8008), first match wins:" in text
    assert "federation server (:8448), first match wins:" in text
    assert "sync [sync-1, sync-2]  sticky: user" in text
    assert "(everything else)" in text
    assert "503 (media_repository (media-repository-1) is restarting)" in text
