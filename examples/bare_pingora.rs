//! The floor under keygate's proxy rows in `benches/load/run.sh`: a pingora proxy with the
//! same server settings (`threads`, mimalloc, pooled upstream connections with timeouts) and
//! no filters at all. The distance from this to nginx is pingora's; the distance from this to
//! keygate's public route is keygate's own per-request work.
//!
//! ```text
//! bare_pingora LISTEN UPSTREAM [THREADS]     e.g. bare_pingora 127.0.0.1:8080 127.0.0.1:9000 1
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::{HttpPeer, ProxyHttp, Result, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // The same peer options keygate sets, so both pay for the same timers.
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        peer.options.read_timeout = Some(Duration::from_secs(30));
        peer.options.write_timeout = Some(Duration::from_secs(30));
        peer.options.idle_timeout = Some(Duration::from_secs(4));
        Ok(Box::new(peer))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (listen, upstream, threads) = match args.as_slice() {
        [_, l, u] => (l, u, 1),
        [_, l, u, t] => (l, u, t.parse().expect("THREADS is a number")),
        _ => {
            eprintln!("usage: bare_pingora LISTEN UPSTREAM [THREADS]");
            std::process::exit(2);
        }
    };
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM is host:port");
    let conf = ServerConf {
        threads,
        daemon: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Bare { upstream },
        "bare",
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
