//! Pingora's zero-downtime binary upgrade through the real binary: a second keygate started
//! with `serve --upgrade` takes the listening proxy socket over from the running one (which
//! gets SIGQUIT), while a client keeps opening connections — none refused, none failed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Echo, Gateway, Options, ADMIN_TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_upgrade_takes_the_listener_over_without_a_failed_request() {
    let redis = support::redis::RedisServer::start();
    let echo = Echo::start().await;
    let dir = tempfile::tempdir().unwrap();
    // No upgrade_sock set: the default, a private directory beside the pid file.
    let (pid_file, sock) = (
        dir.path().join("keygate.pid"),
        dir.path().join("keygate-upgrade").join("upgrade.sock"),
    );
    let mut opts = Options::new(&echo);
    opts.store_toml = Some(format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"",
        redis.url()
    ));
    opts.server_extra = format!("pid_file = {:?}", pid_file.display().to_string());
    let mut old = Gateway::start(opts).await;
    let key = old.mint(json!({})).await;
    let old_pid = old.pid();

    // A fresh connection per request, all along.
    let traffic = support::Traffic::gets(old.url("/public/x"), true);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = std::fs::File::create(dir.path().join("new.log")).unwrap();
    let mut new = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--upgrade", "--config"])
        .arg(old.dir.join("keygate.toml"))
        .env("KEYGATE_MASTER_KEY", &old.master_key)
        .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // The new process waits on the upgrade socket; then the old one hands over and stops.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the new keygate never opened {}",
            sock.display()
        );
        assert!(
            new.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(dir.path().join("new.log")).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Only keygate's user can reach the socket (issue 24: it was 0666 in /tmp).
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sock), 0o600, "the upgrade socket's mode");
        assert_eq!(mode(sock.parent().unwrap()), 0o700, "its directory's mode");
    }
    let status = old.signal_and_wait("QUIT", Duration::from_secs(15));
    assert!(
        status.is_some(),
        "the old keygate did not stop after SIGQUIT"
    );

    // The new process serves: the same key (shared store), the pid file names it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = old.send_v1(&key, "POST", "/v1/payments", b"{}").await;
    assert_eq!(r.status(), 200);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, new.id());
    assert_ne!(pid, old_pid);
    let ready = reqwest::get(format!("http://{}/readyz", old.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "the new admin listener answers");

    let (sent, failed) = traffic.finish().await;
    println!("upgrade: {sent} requests on fresh connections across the hand-over, {failed} failed");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(new.id().to_string())
        .status();
    let _ = new.wait();
    assert!(sent > 50, "{sent}");
    assert_eq!(failed, 0);
}
