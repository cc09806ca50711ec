//! Upstream pools through the real binary: active health checks take a killed endpoint out
//! and put it back (no failed request meanwhile), and a request that could not connect is
//! tried on another endpoint only when it is idempotent — never a POST.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{free_port, Echo, Gateway, Options};

/// An upstream on a fixed port that can be stopped and started again; counts what it served
/// (health checks apart).
struct Endpoint {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Endpoint {
    async fn start(port: u16) -> Self {
        let mut e = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            served: Arc::default(),
            stop: None,
            task: None,
        };
        e.up().await;
        e
    }

    async fn up(&mut self) {
        let served = Arc::clone(&self.served);
        let app = axum::Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .fallback(move || {
                let served = Arc::clone(&served);
                async move {
                    served.fetch_add(1, Ordering::Relaxed);
                    "served"
                }
            });
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        }));
    }

    /// Stops listening and drops open connections.
    async fn down(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }
}

fn pool_routes(endpoints: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
[[upstreams]]
name = "pool"
endpoints = [{}]
connect_timeout = "500ms"
{extra}

[[routes]]
name = "pool"
path = "/pool/*"
upstream = "pool"
public = true
"#,
        list.join(", ")
    )
}

async fn healthy(gw: &Gateway, endpoint: SocketAddr) -> f64 {
    gw.metric(&format!(
        "keygate_upstream_healthy{{endpoint=\"{endpoint}\",upstream=\"pool\"}}"
    ))
    .await
}

async fn wait_healthy(gw: &Gateway, endpoint: SocketAddr, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while healthy(gw, endpoint).await != want {
        assert!(Instant::now() < deadline, "{endpoint} never became {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_killed_endpoint_out_and_put_it_back() {
    let echo = Echo::start().await;
    let mut a = Endpoint::start(free_port()).await;
    let b = Endpoint::start(free_port()).await;
    let mut opts = Options::new(&echo);
    opts.routes = pool_routes(
        &[a.addr, b.addr],
        r#"health_check = { path = "/health", interval = "200ms", unhealthy_after = 2, healthy_after = 2, timeout = "300ms" }"#,
    );
    let gw = Gateway::start(opts).await;
    assert_eq!(healthy(&gw, a.addr).await, 1.0);
    assert_eq!(healthy(&gw, b.addr).await, 1.0);

    // GETs all along: none may fail, whatever happens to A.
    let traffic = support::Traffic::gets(gw.url("/pool/x"), false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.served() > 0 && b.served() > 0, "round-robin reaches both");

    a.down().await;
    wait_healthy(&gw, a.addr, 0.0).await;
    let a_before = a.served();
    let b_before = b.served();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.served(), a_before);
    assert!(b.served() > b_before, "B takes the traffic");

    a.up().await;
    wait_healthy(&gw, a.addr, 1.0).await;
    let a_back = a.served();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.served() > a_back, "A takes traffic again");

    let (sent, failed) = traffic.finish().await;
    println!("pool: {sent} GETs while an endpoint was killed and restarted, {failed} failed");
    assert!(sent > 50, "{sent}");
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_to_a_dead_endpoint_is_never_retried_but_a_get_is() {
    let echo = Echo::start().await;
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let alive = Endpoint::start(free_port()).await;
    let mut opts = Options::new(&echo);
    opts.routes = pool_routes(&[dead, alive.addr], "");
    let gw = Gateway::start(opts).await;

    // Round-robin sends every other fresh request to the dead endpoint until passive counting
    // takes it out (3 failures): those POSTs fail, and none is sent to the live one too.
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..6 {
        let r = gw.send("POST", "/pool/pay", &[], b"{}").await;
        match r.status().as_u16() {
            200 => ok += 1,
            502 => {
                refused += 1;
                support::assert_problem(r, 502, "upstream_unavailable").await;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused >= 1, "no POST met the dead endpoint");
    assert_eq!(
        alive.served(),
        ok,
        "a refused POST was never sent to the live endpoint"
    );

    // GETs: a failed connection is tried on the other endpoint.
    let restart = Gateway::start({
        let mut o = Options::new(&echo);
        o.routes = pool_routes(&[dead, alive.addr], "");
        o
    })
    .await;
    for _ in 0..6 {
        assert_eq!(restart.send("GET", "/pool/x", &[], b"").await.status(), 200);
    }
}
