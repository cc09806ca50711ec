//! Config validation tests: defaults, key paths in errors, every problem reported.

use super::*;

const MINIMAL: &str = r#"
[[upstreams]]
name = "payments"
endpoints = ["127.0.0.1:9000"]

[[routes]]
path = "/v1/payments"
methods = ["POST"]
scope = "payments.create"
upstream = "payments"
"#;

#[test]
fn defaults_follow_the_spec() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.server.threads, 2);
    assert_eq!(c.server.max_body_bytes, 1_048_576);
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(10));
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
    assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:9902");
    assert!(
        matches!(&c.store, StoreConfig::Embedded { path } if path == Path::new("data/keygate.db"))
    );
    assert_eq!(c.cache.capacity, 100_000);
    assert_eq!(c.cache.ttl, Duration::from_secs(30));
    assert_eq!(c.cache.negative_ttl, Duration::from_secs(5));
    assert_eq!(c.cache.stale_if_error, Duration::from_secs(600));
    assert_eq!(c.signing.clock_skew, Duration::from_secs(300));
    assert_eq!(c.signing.body_nonce_retention, Duration::from_secs(86_400));
    assert_eq!(c.routes[0].name, "/v1/payments");
    assert_eq!(c.routes[0].auth, AuthKinds::ALL);
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let text = format!("{MINIMAL}\n[server]\nlisten = \"0.0.0.0:1\"\nlisten_port = 3\n");
    let err = Config::from_toml(&text).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(err.0[0].path.starts_with("server"), "{err}");
    assert!(err.0[0].message.contains("listen_port"), "{err}");
}

#[test]
fn every_problem_is_reported_with_its_key_path() {
    let text = r#"
[server]
listen = "nope"
shutdown_grace = "ten seconds"
trusted_proxies = ["10.0.0.0/8", "bad"]

[admin]
token_sha256 = ["abc"]

[[upstreams]]
name = "payments"
endpoints = ["127.0.0.1:9000"]

[[routes]]
path = "/v1/a"
upstream = "payments"

[[routes]]
path = "/v1/b"
upstream = "payments"
auth = ["hmac-v2"]

[[routes]]
path = "v1/c*"
upstream = "pay"
scope = "Payments"
methods = ["P OST"]
"#;
    let err = Config::from_toml(text).unwrap_err();
    let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
    for want in [
        "server.listen: ",
        "server.shutdown_grace: ",
        "server.trusted_proxies[1]: ",
        "admin.token_sha256[0]: ",
        "routes[1].auth[0]: ",
        "routes[2].path: ",
        "routes[2].upstream: no upstream named \"pay\"",
        "routes[2].scope: ",
        "routes[2].methods[0]: ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "missing {want:?} in {lines:#?}"
        );
    }
    assert_eq!(lines.len(), 9, "{lines:#?}");
}

#[test]
fn prefix_paths_and_public_routes() {
    let text = r#"
[[upstreams]]
name = "u"
endpoints = ["127.0.0.1:9000"]

[[routes]]
name = "all-payments"
path = "/v1/payments/*"
upstream = "u"

[[routes]]
path = "/health"
upstream = "u"
public = true
"#;
    let c = Config::from_toml(text).unwrap();
    let p = &c.routes[0].path;
    assert!(p.matches("/v1/payments/pay_1"));
    assert!(p.matches("/v1/payments/a/b"));
    assert!(!p.matches("/v1/payments"));
    assert!(!p.matches("/v1/paymentsX"));
    assert!(c.routes[1].public);
    assert_eq!(c.routes[0].name, "all-payments");
}

#[test]
fn public_route_with_scope_is_an_error() {
    let text = r#"
[[upstreams]]
name = "u"
endpoints = ["127.0.0.1:9000"]

[[routes]]
path = "/health"
upstream = "u"
public = true
scope = "x"
"#;
    let err = Config::from_toml(text).unwrap_err();
    assert_eq!(err.0[0].path, "routes[0].public");
}

#[test]
fn upgrade_is_websocket_only_and_never_on_a_public_route() {
    let route = |extra: &str| {
        format!(
            "[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:9000\"]\n\n[[routes]]\npath = \"/ws/*\"\nupstream = \"u\"\n{extra}\n"
        )
    };
    let c = Config::from_toml(&route("upgrade = [\"websocket\"]")).unwrap();
    assert!(c.routes[0].upgrade_websocket);
    assert!(!Config::from_toml(&route("")).unwrap().routes[0].upgrade_websocket);
    let err = Config::from_toml(&route("upgrade = [\"h2c\"]")).unwrap_err();
    assert_eq!(err.0[0].path, "routes[0].upgrade[0]");
    let err = Config::from_toml(&route("public = true\nupgrade = [\"websocket\"]")).unwrap_err();
    assert_eq!(err.0[0].path, "routes[0].upgrade");
    assert!(err.0[0].message.contains("public"), "{}", err.0[0].message);
    let c = Config::from_toml(&route("forward_method_override = true")).unwrap();
    assert!(c.routes[0].forward_method_override);
}

#[test]
fn shipped_example_config_is_valid() {
    let text = include_str!("../../config/keygate.toml");
    if let Err(e) = Config::from_toml(text) {
        panic!("config/keygate.toml: {e}");
    }
}

fn with_store(store: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml(&format!("{MINIMAL}\n[store]\nkind = \"redis\"\n{store}"))
}

#[test]
fn redis_urls_name_one_server_or_a_cluster() {
    let target = |store: &str| match with_store(store).map(|c| c.store) {
        Ok(StoreConfig::Redis { target, .. }) => target,
        other => panic!("{store}: {other:?}"),
    };
    assert_eq!(
        target(r#"url = "rediss://:pw@h:6380""#),
        RedisTarget::Single("rediss://:pw@h:6380".into())
    );
    assert_eq!(
        target(r#"url = "redis+cluster://:pw@a:7000,b:7001""#),
        RedisTarget::Cluster(vec![
            "redis://:pw@a:7000".into(),
            "redis://:pw@b:7001".into()
        ])
    );
    assert_eq!(
        target(r#"url = "rediss+cluster://a:7000""#),
        RedisTarget::Cluster(vec!["rediss://a:7000".into()])
    );
    assert_eq!(
        target(r#"url = ["redis://a:7000", "redis://b:7001"]"#),
        RedisTarget::Cluster(vec!["redis://a:7000".into(), "redis://b:7001".into()])
    );
}

#[test]
fn sentinels_and_a_master_name_make_a_sentinel_target() {
    let store = "sentinels = [\"10.0.0.5:26379\", \"[::1]:26380\"]\nsentinel_master = \"kg\"\n\
                 password_file = \"/run/pw\"";
    match with_store(store).map(|c| c.store) {
        Ok(StoreConfig::Redis {
            target: RedisTarget::Sentinel(s),
            ..
        }) => {
            assert_eq!(
                s.sentinels,
                vec![("10.0.0.5".to_owned(), 26379), ("::1".to_owned(), 26380)]
            );
            assert_eq!(s.master, "kg");
            assert_eq!(s.password_file, Some(std::path::PathBuf::from("/run/pw")));
            assert_eq!(s.sentinel_password_file, None);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_redis_settings_are_refused_without_repeating_a_password() {
    for (store, path) in [
        (r#"url = "http://:hunter2@h:1""#, "store.url"),
        (r#"url = "redis+cluster://:hunter2@""#, "store.url"),
        (
            r#"url = ["redis+cluster://:hunter2@a:1", "redis://b:2"]"#,
            "store.url",
        ),
        (r#"url = []"#, "store.url"),
        (
            "url = \"redis://:hunter2@h:1\"\ntls_ca_file = \"ca.pem\"",
            "store.tls_ca_file",
        ),
    ] {
        let errors = with_store(store).expect_err(store).to_string();
        assert!(errors.contains(path), "{store}: {errors}");
        assert!(
            !errors.contains("hunter2"),
            "{store}: password echoed in {errors}"
        );
    }
}

#[test]
fn a_host_name_endpoint_resolves_to_the_preferred_family_only() {
    let addrs = crate::config::resolve_endpoint("localhost:8443").unwrap_or_else(|e| panic!("{e}"));
    assert!(!addrs.is_empty());
    assert!(addrs
        .iter()
        .all(|a| a.port() == 8443 && a.ip().is_loopback()));
    assert!(addrs.iter().all(|a| a.is_ipv4() == addrs[0].is_ipv4()));
    let c = Config::from_toml(
        "[server]\nallow_no_routes = true\n[[upstreams]]\nname = \"u\"\nendpoints = [\"localhost:8443\", \"127.0.0.1:9\"]\nresolve_interval = \"5s\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(c.upstreams[0].has_host_names());
    assert_eq!(
        c.upstreams[0].resolve_interval,
        std::time::Duration::from_secs(5)
    );
}

#[test]
fn every_problem_of_the_file_is_reported_in_one_run() {
    let text = r#"
[server]
listen = "127.0.0.1:8080"
colour = "blue"

[cache]
ttl = 30

[[upstreams]]
name = "broken"
endpoints = "not-a-list"

[[upstreams]]
name = "payments"
endpoints = ["127.0.0.1:9000"]

[[routes]]
path = "/v1/a"
upstream = "missing"

[[routes]]
path = "/v1/b"
upstream = "broken"
bogus = 1

[[routes]]
path = "/v1/c"
upstream = "broken"

[[routes]]
path = "no-slash"
upstream = "payments"

[extra]
x = 1
"#;
    let errs = Config::from_toml(text).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "server.colour",
        "cache.ttl",
        "upstreams[0].endpoints",
        "routes[1].bogus",
        "extra",
        "routes[0].upstream",
        "routes[3].path",
    ] {
        assert!(paths.contains(&want), "{want} missing from {errs:#?}");
    }
    // A route naming the upstream that could not be read is not told twice.
    assert!(!paths.contains(&"routes[2].upstream"), "{errs:#?}");
    assert_eq!(errs.len(), 7, "{errs:#?}");
}

#[test]
fn offline_checks_take_host_names_on_their_shape() {
    let with = |endpoint: &str| MINIMAL.replace("127.0.0.1:9000", endpoint);
    let name = with("payments.invalid:443");
    assert!(
        Config::from_toml(&name).is_err(),
        "looked up: does not resolve"
    );
    assert!(Config::parse(&name, Lookup::ShapeOnly).is_ok());
    for bad in [
        "payments.invalid",
        "pay ments:443",
        ":443",
        "payments:99999",
    ] {
        let errors = Config::parse(&with(bad), Lookup::ShapeOnly).unwrap_err();
        assert_eq!(errors.0[0].path, "upstreams[0].endpoints[0]", "{bad}");
    }
    let ip = Config::parse(&with("10.0.0.7:9000"), Lookup::ShapeOnly).unwrap();
    assert_eq!(ip.upstreams[0].endpoints[0].to_string(), "10.0.0.7:9000");
}

/// Issue 24: `10.9.9.9/0` was read as `0.0.0.0/0` — a trusted proxy or never-blocked range of
/// every address. A CIDR with host bits set is refused, naming the key and the entry.
#[test]
fn a_cidr_with_host_bits_set_is_a_config_error() {
    let text = format!(
        "[server]\ntrusted_proxies = [\"10.9.9.9/0\", \"10.0.0.0/8\", \"10.0.0.1\", \"10.0.0.1/32\"]\n\n\
         [abuse]\nnever_block = [\"127.0.0.1/8\", \"::1/128\"]\n{MINIMAL}"
    );
    let errors = Config::from_toml(&text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        errors.contains("server.trusted_proxies[0]: \"10.9.9.9/0\" has host bits set"),
        "{errors}"
    );
    assert!(
        errors.contains("abuse.never_block[0]: \"127.0.0.1/8\" has host bits set"),
        "{errors}"
    );
    assert!(
        !errors.contains("trusted_proxies[1]") && !errors.contains("never_block[1]"),
        "{errors}"
    );
}

/// Issue 24: the default upgrade socket was `/tmp/keygate_upgrade.sock`, in a directory any
/// user can write. Now a private directory under systemd's runtime directory, else beside the
/// pid file, else beside the embedded store; an explicit setting is kept as given.
#[test]
fn the_default_upgrade_sock_is_in_a_private_directory_never_tmp() {
    use std::ffi::OsStr;
    let p = Path::new;
    let sock = |rt: Option<&str>, pid: Option<&str>, store: Option<&str>| {
        default_upgrade_sock(rt.map(OsStr::new), pid.map(p), store.map(p))
    };
    assert_eq!(
        sock(
            Some("/run/keygate:/run/other"),
            Some("/var/run/k.pid"),
            Some("/var/lib/keygate/keygate.db")
        ),
        p("/run/keygate/keygate-upgrade/upgrade.sock")
    );
    assert_eq!(
        sock(
            None,
            Some("/run/keygate/keygate.pid"),
            Some("/var/lib/keygate/keygate.db")
        ),
        p("/run/keygate/keygate-upgrade/upgrade.sock")
    );
    assert_eq!(
        sock(Some(""), None, Some("/var/lib/keygate/keygate.db")),
        p("/var/lib/keygate/keygate-upgrade/upgrade.sock")
    );
    assert_eq!(
        sock(None, None, Some("keygate.db")),
        p("./keygate-upgrade/upgrade.sock")
    );
    assert_eq!(sock(None, None, None), p("./keygate-upgrade/upgrade.sock"));

    // Through the config: the embedded store's default path, unless systemd gives a runtime
    // directory (this test's environment may have one).
    let c = Config::from_toml(MINIMAL).unwrap();
    assert!(
        !c.server.upgrade_sock.starts_with("/tmp"),
        "{:?}",
        c.server.upgrade_sock
    );
    assert!(c
        .server
        .upgrade_sock
        .ends_with("keygate-upgrade/upgrade.sock"));
    if std::env::var_os("RUNTIME_DIRECTORY").is_none() {
        assert_eq!(
            c.server.upgrade_sock,
            p("data/keygate-upgrade/upgrade.sock")
        );
    }
    let set = Config::from_toml(&format!(
        "[server]\nupgrade_sock = \"/srv/k/up.sock\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(set.server.upgrade_sock, p("/srv/k/up.sock"));
}

/// Issue 25: an empty or cut-short file was a valid config with no routes, and a reload of it
/// answered every request 404 no_route. A config without routes is refused unless it says so.
#[test]
fn a_config_without_routes_is_refused_unless_it_says_so() {
    for text in ["", "[server]\nlisten = \"127.0.0.1:8080\"\n"] {
        let errors = Config::from_toml(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            errors.contains("routes: no [[routes]]"),
            "{text:?}: {errors}"
        );
    }
    assert!(Config::from_toml("[server]\nallow_no_routes = true\n").is_ok());
    assert!(Config::from_toml(MINIMAL).is_ok());
}

#[test]
fn nonce_durability_is_async_by_default_and_replicated_needs_redis() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.nonce_durability, NonceDurability::Async);
    let c = with_store("url = \"redis://h:1\"\nnonce_durability = \"replicated\"").unwrap();
    assert_eq!(
        c.nonce_durability,
        NonceDurability::Replicated {
            timeout: Duration::from_millis(50)
        }
    );
    let c = with_store(
        "url = \"redis://h:1\"\nnonce_durability = \"replicated\"\nreplication_timeout = \"200ms\"",
    )
    .unwrap();
    assert_eq!(
        c.nonce_durability,
        NonceDurability::Replicated {
            timeout: Duration::from_millis(200)
        }
    );
    for (store, path) in [
        ("url = \"redis://h:1\"\nnonce_durability = \"sync\"", "store.nonce_durability"),
        (
            "url = \"redis://h:1\"\nnonce_durability = \"replicated\"\nreplication_timeout = \"0s\"",
            "store.replication_timeout",
        ),
        (
            "url = \"redis://h:1\"\nreplication_timeout = \"2s\"",
            "store.replication_timeout",
        ),
    ] {
        let errors = with_store(store).expect_err(store).to_string();
        assert!(errors.contains(path), "{store}: {errors}");
    }
    // The embedded store has no replica to wait for: refused, not silently ignored.
    let errors = Config::from_toml(&format!(
        "{MINIMAL}\n[store]\nnonce_durability = \"replicated\""
    ))
    .expect_err("embedded + replicated")
    .to_string();
    assert!(errors.contains("store.nonce_durability"), "{errors}");
}
