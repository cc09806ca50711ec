//! Pingora's zero-downtime binary upgrade through the real binary: a second keygate started
//! with `serve --upgrade` takes the listening proxy socket over from the running one (which
//! gets SIGQUIT), while clients keep opening connections or keep theirs alive — none refused,
//! none failed; a SIGQUIT nobody receives leaves the gateway serving; a `--upgrade` nobody
//! hands over to gives up after `server.upgrade_wait` with exit code 75.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Echo, Gateway, Key, Options, ADMIN_TOKEN};

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

/// Starts `keygate serve --upgrade` on `old`'s config, its output in `log`.
fn spawn_upgrade(old: &Gateway, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--upgrade", "--config"])
        .arg(old.dir.join("keygate.toml"))
        .env("KEYGATE_MASTER_KEY", &old.master_key)
        .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the process being started has bound the upgrade socket.
async fn wait_for_socket(sock: &Path, new: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no {}", sock.display());
        assert!(
            new.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // pingora binds, then listens: give it the moment in between.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// SIGQUIT to `pid`, then how long until it exits (`None`: still running after `within`).
async fn quit_and_time(pid: u32, exited: impl Fn() -> bool, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let status = Command::new("kill")
        .args(["-QUIT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while t0.elapsed() < within {
        if exited() {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Clients that each keep one connection alive and send signed requests back to back.
struct KeepAliveLoad {
    stop: Arc<AtomicBool>,
    /// Requests sent so far, all clients together.
    sent: Arc<std::sync::atomic::AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<(usize, usize)>>,
}

impl KeepAliveLoad {
    /// `clients` HTTP/1.1 clients and `h2c_clients` HTTP/2 (prior knowledge) ones.
    fn start(proxy: std::net::SocketAddr, key: &Key, clients: usize, h2c_clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let clients = (0..clients + h2c_clients)
            .map(|i| {
                let (stop, key) = (Arc::clone(&stop), key.clone());
                let total = Arc::clone(&total);
                tokio::spawn(async move {
                    // One connection, reused; a new one only after the server closed it (after
                    // a `Connection: close` answer, or an HTTP/2 GOAWAY), which is what any
                    // client does.
                    let builder = reqwest::Client::builder().pool_max_idle_per_host(1);
                    let http = if i < clients {
                        builder.http1_only()
                    } else {
                        builder.http2_prior_knowledge()
                    }
                    .build()
                    .unwrap();
                    let url = format!("http://{proxy}/v1/payments");
                    let (mut sent, mut failed) = (0, 0);
                    while !stop.load(Ordering::Relaxed) {
                        let headers = support::v1_headers(
                            &key,
                            "POST",
                            "/v1/payments",
                            b"{}",
                            support::now(),
                            &uuid::Uuid::new_v4().to_string(),
                        );
                        let mut req = http.post(&url).body("{}");
                        for (k, v) in &headers {
                            req = req.header(k.as_str(), v.as_str());
                        }
                        sent += 1;
                        total.fetch_add(1, Ordering::Relaxed);
                        let ok = match req.send().await {
                            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                            Ok(r) => {
                                let status = r.status();
                                let body = r.text().await.unwrap_or_default();
                                eprintln!("client {i}: {status} {body}");
                                false
                            }
                            Err(e) => {
                                eprintln!("client {i}: {e:?}");
                                false
                            }
                        };
                        if !ok {
                            failed += 1;
                        }
                    }
                    (sent, failed)
                })
            })
            .collect();
        Self {
            stop,
            sent: total,
            clients,
        }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let mut totals = (0, 0);
        for c in self.clients {
            let (s, f) = c.await.unwrap();
            totals = (totals.0 + s, totals.1 + f);
        }
        totals
    }
}

fn redis_options(echo: &Echo, redis: &support::redis::RedisServer, dir: &Path) -> Options {
    let mut opts = Options::new(echo);
    opts.store_toml = Some(format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"",
        redis.url()
    ));
    opts.server_extra = format!(
        "pid_file = {:?}\nh2c = true",
        dir.join("keygate.pid").display().to_string()
    );
    opts.shutdown_grace = "5s";
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_upgrades_under_keep_alive_load_lose_no_request() {
    let redis = support::redis::RedisServer::start();
    let echo = Echo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sock: PathBuf = dir.path().join("keygate-upgrade").join("upgrade.sock");
    let mut first = Gateway::start(redis_options(&echo, &redis, dir.path())).await;
    let key = first.mint(json!({})).await;
    // HTTP/1.1 connections are drained with `Connection: close`, HTTP/2 ones with GOAWAY.
    let load = KeepAliveLoad::start(first.proxy, &key, 4, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut exits = Vec::new();
    let mut current: Option<Child> = None;
    let started = Instant::now();
    for round in 1..=3 {
        println!(
            "before upgrade {round}: {} requests in {:?}",
            load.sent.load(Ordering::Relaxed),
            started.elapsed()
        );
        let log = dir.path().join(format!("new{round}.log"));
        let mut new = spawn_upgrade(&first, &log);
        wait_for_socket(&sock, &mut new, &log).await;
        let took = match current.as_mut() {
            None => {
                let pid = first.pid();
                let t = quit_and_time(
                    pid,
                    || !Path::new(&format!("/proc/{pid}")).exists() || first_exited(pid),
                    Duration::from_secs(20),
                )
                .await;
                first.kill();
                t
            }
            Some(old) => {
                let pid = old.id();
                let cell = std::sync::Mutex::new(old);
                let t = quit_and_time(
                    pid,
                    || cell.lock().unwrap().try_wait().unwrap().is_some(),
                    Duration::from_secs(20),
                )
                .await;
                let old = cell.into_inner().unwrap();
                let _ = old.kill();
                let _ = old.wait();
                t
            }
        };
        let took = took
            .unwrap_or_else(|| panic!("upgrade {round}: the old keygate did not exit within 20 s"));
        println!("upgrade {round}: old process exited {took:?} after SIGQUIT");
        exits.push(took);
        current = Some(new);
        // The new one serves on its own before the next round.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let (sent, failed) = load.finish().await;
    println!(
        "3 upgrades under keep-alive load: {sent} requests, {failed} failed; old-process exit times {exits:?}"
    );
    if let Some(mut last) = current {
        let _ = Command::new("kill")
            .args(["-TERM", &last.id().to_string()])
            .status();
        let _ = last.wait();
    }
    assert!(sent > 300, "{sent}");
    assert_eq!(failed, 0, "requests failed across the upgrades");
}

/// The harness owns the first gateway's child: a zombie still has its /proc entry, so read
/// its state there.
fn first_exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_without_a_receiver_leaves_the_gateway_serving() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({})).await;
    let load = KeepAliveLoad::start(gw.proxy, &key, 2, 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No `serve --upgrade` runs: the hand-over cannot happen.
    gw.signal("QUIT");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !gw.log().contains("upgrade hand-over failed") {
        assert!(
            Instant::now() < deadline,
            "no hand-over failure logged:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still serving afterwards, on the connections it had and on new ones.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sent, failed) = load.finish().await;
    println!("SIGQUIT without a receiver: {sent} requests, {failed} failed");
    assert!(
        Path::new(&format!("/proc/{}", gw.pid())).exists() && !first_exited(gw.pid()),
        "the gateway stopped:\n{}",
        gw.log()
    );
    let r = gw.send_v1(&key, "POST", "/v1/payments", b"{}").await;
    assert_eq!(r.status(), 200);
    assert!(sent > 50, "{sent}");
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_no_running_keygate_gives_up_after_upgrade_wait() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "upgrade_wait = \"2s\"".into();
    let mut gw = Gateway::start(opts).await;
    // Its config stays; the gateway goes: nobody will hand a socket over.
    let _ = gw.signal_and_wait("INT", Duration::from_secs(10));
    let log = gw.dir.join("upgrade.log");
    let t0 = Instant::now();
    let mut new = spawn_upgrade(&gw, &log);
    let status = loop {
        if let Some(s) = new.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still waiting after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = t0.elapsed();
    let out = std::fs::read_to_string(&log).unwrap();
    println!("serve --upgrade with nobody to hand over: exit {status} after {took:?}");
    assert_eq!(status.code(), Some(75), "{out}");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(
        out.contains("no running keygate handed its listening socket over")
            && out.contains("server.upgrade_wait"),
        "{out}"
    );
    assert!(out.contains("waiting up to"), "{out}");
    // Waiting is not an emergency: the one ERROR is the final give-up.
    let errors = out.lines().filter(|l| l.contains("ERROR")).count();
    assert!(errors <= 1, "{out}");
}
