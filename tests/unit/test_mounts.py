"""The stack file's `mounts`: host files for the paths homeserver.yaml names."""

from __future__ import annotations

import os

import pytest

from supervisor import mounts
from supervisor.containers import specs
from supervisor.errors import ConfigError
from supervisor.prepare import prepare
from tests.unit.conftest import edit_yaml

REG = "/etc/synapse-extra/appservices/bridge.yaml"


def with_mounts(stack_dir, items, registrations=None):
    edit_yaml(stack_dir / "stack.yaml", lambda d: d.update(mounts=items))
    if registrations is not None:
        edit_yaml(stack_dir / "homeserver.yaml",
                  lambda d: d.update(app_service_config_files=registrations))


def appservice_dir(stack_dir, mode=0o644, uid=991):
    d = stack_dir / "appservices"
    d.mkdir()
    f = d / "bridge.yaml"
    f.write_text("id: bridge\nas_token: a\nhs_token: h\nsender_localpart: bridge\n"
                 "url: null\nnamespaces: {users: []}\n")
    os.chown(f, uid, uid)
    f.chmod(mode)
    return d


def test_a_mount_reaches_every_synapse_container_read_only(stack_dir):
    appservice_dir(stack_dir)
    with_mounts(stack_dir, [{"source": "appservices", "target": "/etc/synapse-extra/appservices/"}],
                [REG])
    prepared = prepare(stack_dir / "stack.yaml")
    assert prepared.stack.mounts[0].source == (stack_dir / "appservices").absolute()
    assert prepared.stack.mounts[0].target == "/etc/synapse-extra/appservices"  # normalised
    assert prepared.rendered.files["shared.yaml"]["app_service_config_files"] == [REG]
    assert not [w for w in prepared.warnings if "app_service_config_files" in w]
    for inst, spec in specs(prepared).items():
        found = [m for m in spec.mounts if m.target == "/etc/synapse-extra/appservices"]
        if spec.synapse:
            assert len(found) == 1 and found[0].read_only and found[0].kind == "bind", inst
        else:
            assert found == [], inst  # PostgreSQL, Redis and the proxy do not get it


def test_a_changed_mounted_file_changes_only_the_synapse_config_hashes(stack_dir):
    d = appservice_dir(stack_dir)
    with_mounts(stack_dir, [{"source": "appservices", "target": "/etc/synapse-extra/appservices"}],
                [REG])
    before = {i: s.config_hash for i, s in specs(prepare(stack_dir / "stack.yaml")).items()}
    (d / "bridge.yaml").write_text((d / "bridge.yaml").read_text().replace("as_token: a",
                                                                            "as_token: b"))
    after_specs = specs(prepare(stack_dir / "stack.yaml"))
    after = {i: s.config_hash for i, s in after_specs.items()}
    for inst, spec in after_specs.items():
        assert (before[inst] != after[inst]) == spec.synapse, inst


@pytest.mark.parametrize("target", ["/conf", "/conf/extra", "/synapse_media", "/", "/etc", "/usr",
                                    "/usr/local/lib", "/opt/synapse", "/tmp/x", "/run",
                                    "/run/synapse-notify", "/opt/../usr", "//conf", "//etc",
                                    "///usr/lib", "//", "/etc/hosts", "/etc/resolv.conf",
                                    "/etc/passwd", "/etc/ssl/certs"])
def test_a_target_that_would_hide_what_the_containers_need_is_refused(stack_dir, target):
    appservice_dir(stack_dir)
    with_mounts(stack_dir, [{"source": "appservices", "target": target}])
    with pytest.raises(ConfigError, match=r"stack.yaml: mounts\[0\].target: .* would hide or "
                                          r"replace .*fix: mount under a directory of your own"):
        prepare(stack_dir / "stack.yaml")


@pytest.mark.parametrize("items, key, problem", [
    ([{"source": "nope", "target": "/data/x"}], r"mounts\[0\].source", "does not exist"),
    ([{"source": "appservices", "target": "/data/x"},
      {"source": "appservices", "target": "/data/x/"}], r"mounts\[1\].target",
     "already the target of another mount"),
    ([{"source": "appservices", "target": "data/x"}], r"mounts\[0\].target", "does not match"),
    ([{"source": "appservices", "target": "/data"},
      {"source": "appservices", "target": "/data/x"}], r"mounts\[1\].target",
     "/data/x is inside the target /data of another mount"),
    ([{"source": "appservices", "target": "/data/x"},
      {"source": "appservices", "target": "/data"}], r"mounts\[1\].target",
     "/data/x is inside the target /data of another mount"),
    ([{"source": "appservices"}], r"mounts\[0\].target", "is required"),
    ([{"source": "appservices", "target": "/data/x", "mode": "rw"}], r"mounts\[0\].mode",
     "unknown key"),
    ({"source": "appservices"}, "mounts", "must be a list"),
])
def test_bad_mounts_name_the_key(stack_dir, items, key, problem):
    appservice_dir(stack_dir)
    with_mounts(stack_dir, items)
    with pytest.raises(ConfigError, match=rf"stack.yaml: {key}: .*{problem}.*\(fix: "):
        prepare(stack_dir / "stack.yaml")


def test_a_file_synapse_cannot_read_is_refused_with_the_fix(stack_dir):
    appservice_dir(stack_dir, mode=0o600, uid=0)
    with_mounts(stack_dir, [{"source": "appservices", "target": "/data/as"}])
    with pytest.raises(ConfigError, match=r"mounts\[0\].source: .*bridge.yaml: file not readable "
                                          r"by uid 991 .*fix: chown 991:991 .*bridge.yaml"):
        prepare(stack_dir / "stack.yaml")
    os.chown(stack_dir / "appservices" / "bridge.yaml", 991, 991)
    prepare(stack_dir / "stack.yaml")  # the fix works
    (stack_dir / "appservices").chmod(0o700)  # root's directory: 991 cannot enter it
    with pytest.raises(ConfigError, match=r"appservices: directory not readable by uid 991"):
        prepare(stack_dir / "stack.yaml")


def test_a_symlink_out_of_the_mount_is_refused(stack_dir, tmp_path):
    d = appservice_dir(stack_dir)
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("x: 1\n")
    (d / "link.yaml").symlink_to(outside)
    with_mounts(stack_dir, [{"source": "appservices", "target": "/data/as"}])
    with pytest.raises(ConfigError, match=r"link.yaml links to .*elsewhere.yaml, outside"):
        prepare(stack_dir / "stack.yaml")


def test_a_setting_pointing_into_a_mount_at_a_missing_file_is_refused(stack_dir):
    appservice_dir(stack_dir)
    with_mounts(stack_dir, [{"source": "appservices", "target": "/etc/synapse-extra/appservices"}],
                [REG, "/etc/synapse-extra/appservices/typo.yaml"])
    with pytest.raises(ConfigError, match=r"homeserver.yaml: app_service_config_files\[1\]: "
                                          r".*typo.yaml is in the mount of .*appservices, but "
                                          r".*appservices/typo.yaml does not exist"):
        prepare(stack_dir / "stack.yaml")


def test_a_setting_no_mount_shows_is_a_warning(stack_dir):
    edit_yaml(stack_dir / "homeserver.yaml", lambda d: d.update(
        app_service_config_files=["/srv/bridge.yaml"],
        email={"template_dir": "/srv/templates"}))
    warnings = prepare(stack_dir / "stack.yaml").warnings
    found = [w for w in warnings if "in none of the stack's mounts" in w]
    assert len(found) == 2
    assert "homeserver.yaml: app_service_config_files[0]: /srv/bridge.yaml" in found[0]
    assert "email.template_dir: /srv/templates" in found[1]


def test_file_settings_finds_nested_and_listed_paths():
    config = {"app_service_config_files": ["/a.yaml", "relative.yaml"],
              "oidc_providers": [{"idp_id": "x", "client_secret_path": "/s/secret"}],
              "pid_file": "/x.pid", "macaroon_secret_key_path": "/m", "server_name": "/notafile"}
    assert list(mounts.file_settings(config)) == [
        ("app_service_config_files[0]", "/a.yaml"),
        ("oidc_providers[0].client_secret_path", "/s/secret"),
        ("macaroon_secret_key_path", "/m")]


def test_a_symlinked_source_is_followed_and_checked(stack_dir, tmp_path):
    real = appservice_dir(stack_dir, mode=0o600, uid=0)  # root's file: 991 cannot read it
    (stack_dir / "linked").symlink_to(real)
    with_mounts(stack_dir, [{"source": "linked", "target": "/data/as"}])
    with pytest.raises(ConfigError, match=r"bridge.yaml: file not readable by uid 991"):
        prepare(stack_dir / "stack.yaml")
    os.chown(real / "bridge.yaml", 991, 991)
    first = prepare(stack_dir / "stack.yaml").inputs.mounts_digest
    (real / "bridge.yaml").write_text("id: changed\n")
    assert prepare(stack_dir / "stack.yaml").inputs.mounts_digest != first


def test_a_broken_link_in_a_mount_is_a_clear_error(stack_dir, tmp_path):
    d = appservice_dir(stack_dir)
    (d / "gone.yaml").symlink_to(d / "never-there.yaml")
    with_mounts(stack_dir, [{"source": "appservices", "target": "/data/as"}])
    with pytest.raises(ConfigError, match=r"mounts\[0\].source: .*gone.yaml: No such file.*fix: "
                                          r"remove the broken link"):
        prepare(stack_dir / "stack.yaml")


def test_no_mounts_leaves_the_config_hashes_as_they_were(stack_dir):
    # a stack without mounts must not see its containers recreated by an upgrade
    before = {i: s.config_hash for i, s in specs(prepare(stack_dir / "stack.yaml")).items()}
    with_mounts(stack_dir, [])
    after = {i: s.config_hash for i, s in specs(prepare(stack_dir / "stack.yaml")).items()}
    assert after == before
    from supervisor import containers
    main = specs(prepare(stack_dir / "stack.yaml"))["main"]
    prepared = prepare(stack_dir / "stack.yaml")
    files = ["shared.yaml", "main.yaml", "log/main.yaml", "secrets/signing.key",
             "secrets/replication_secret"]
    import dataclasses
    import json
    fields = dataclasses.asdict(main)
    fields.pop("labels")
    assert main.config_hash == containers._hash(fields, [""] + [
        json.dumps(prepared.rendered.files[f], sort_keys=True) for f in files])
