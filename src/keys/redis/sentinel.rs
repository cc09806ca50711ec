//! Redis Sentinel: the primary the sentinels name, followed through a failover.
//!
//! keygate asks the sentinels (`SENTINEL GET-MASTER-ADDR-BY-NAME`) for the primary, connects to
//! it and checks with `ROLE` that it is a master before sending it anything. One background
//! task re-resolves when woken — by a `+promoted-slave` or `+switch-master` notification of any
//! sentinel, by a call that failed on the connection or got `READONLY` (a demoted primary) or
//! `NOREPLICAS` (a primary whose replica left it: `min-replicas-to-write`), and every few
//! seconds as a safety net — and swaps the connection every call uses.
//!
//! Sentinel publishes `+switch-master` (and names the new primary in
//! `GET-MASTER-ADDR-BY-NAME`) only at the end of a failover, seconds after it promoted the
//! replica; writes the old primary takes in between are lost when it is reset from the new one.
//! So a `+promoted-slave` for this master switches at once to the promoted node (once its
//! `ROLE` says master), and a primary reached that way is kept while it answers as a master
//! even though the sentinels do not name it yet. A call never retries on another
//! node itself: a write sent before a connection broke may have been applied, and repeating a
//! nonce `SET NX` would refuse a valid request as a replay. It fails with `store_unavailable`;
//! the calls after the switch go to the new primary.
//!
//! redis-rs' own `sentinel` module is not used: it connects to sentinels and nodes with no
//! timeout (a black-holed sentinel stalls resolution for ever), stops at the first candidate
//! it cannot reach, and has no notification follower. This one bounds every step with the
//! store's `CONNECT_TIMEOUT`/`RESPONSE_TIMEOUT`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, RedisConnectionInfo, RedisFuture, Value,
};
use tokio::sync::{watch, Notify};

use super::{ChangeSink, StoreError, CHANGES_CHANNEL, CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use crate::keys::SecretString;

/// How often the resolver checks the primary with nothing waking it.
const RECHECK_EVERY: Duration = Duration::from_secs(5);
/// Longest pause between resolution attempts while no sentinel names a reachable master.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(1);

/// `store.sentinels` + `store.sentinel_master` (+ password files). `Debug` shows no password
/// (it holds only the files' paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelTarget {
    /// Each sentinel's host and port.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor.
    pub master: String,
    /// The data nodes' password (mode 0600).
    pub password_file: Option<PathBuf>,
    /// The sentinels' password (mode 0600).
    pub sentinel_password_file: Option<PathBuf>,
}

/// The passwords of a [`SentinelTarget`], read from its files.
#[derive(Default)]
struct Passwords {
    node: Option<SecretString>,
    sentinel: Option<SecretString>,
}

impl SentinelTarget {
    /// Reads `host:port` entries (`[v6]:port` too). Errors name the entry.
    pub fn parse_addresses(entries: &[String]) -> Result<Vec<(String, u16)>, String> {
        if entries.is_empty() {
            return Err("is empty: list at least one sentinel as \"host:port\"".into());
        }
        entries.iter().map(|e| parse_address(e)).collect()
    }

    /// What `serve` would refuse about the password files, each on its own.
    pub fn check_password_files(&self) -> Vec<String> {
        [
            ("store.password_file", &self.password_file),
            ("store.sentinel_password_file", &self.sentinel_password_file),
        ]
        .into_iter()
        .filter_map(|(what, path)| read_password(what, path.as_deref()).err())
        .collect()
    }

    fn passwords(&self) -> Result<Passwords, String> {
        Ok(Passwords {
            node: read_password("store.password_file", self.password_file.as_deref())?,
            sentinel: read_password(
                "store.sentinel_password_file",
                self.sentinel_password_file.as_deref(),
            )?,
        })
    }
}

fn parse_address(entry: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| format!("{entry:?}: {why}");
    if entry.contains("://") {
        return Err(bad(
            "give \"host:port\" without a scheme (TLS to sentinels is not supported)",
        ));
    }
    let (host, port) = entry
        .rsplit_once(':')
        .ok_or_else(|| bad("must be \"host:port\""))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(bad("names no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_owned(), p)),
        _ => Err(bad("the port must be a number from 1 to 65535")),
    }
}

/// A password file's text; `what` names the setting in the message. A file readable by group
/// or others is refused, as every other secret file of keygate.
fn read_password(
    what: &str,
    path: Option<&std::path::Path>,
) -> Result<Option<SecretString>, String> {
    let Some(path) = path else { return Ok(None) };
    let shown = path.display();
    match crate::keys::secret::read_private_file(path) {
        Ok(Some(pw)) if !pw.expose().is_empty() => Ok(Some(pw)),
        Ok(_) => Err(format!("{what} {shown}: missing or empty")),
        Err(e) => Err(format!("{what} {shown}: {e}")),
    }
}

fn connection_info(host: &str, port: u16, password: Option<&SecretString>) -> ConnectionInfo {
    ConnectionInfo {
        addr: ConnectionAddr::Tcp(host.to_owned(), port),
        redis: RedisConnectionInfo {
            password: password.map(|p| p.expose().to_owned()),
            ..RedisConnectionInfo::default()
        },
    }
}

fn bounded() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
}

/// The primary every call goes to now.
struct Primary {
    host: String,
    port: u16,
    /// For the change feed's subscriptions.
    client: redis::Client,
    conn: MultiplexedConnection,
    /// Reached through `+promoted-slave`, before the sentinels name it.
    promoted: bool,
}

struct Shared {
    target: SentinelTarget,
    passwords: Passwords,
    primary: ArcSwap<Primary>,
    /// Wakes the resolver: a call failed on its connection or got READONLY.
    wake: Notify,
    /// A sentinel announced a switch: also cuts short the resolver's backoff (failed calls,
    /// which come by the thousand during an outage, do not).
    announced: Notify,
    /// The node a `+promoted-slave` for this master named, tried first by the next resolution.
    promoted: std::sync::Mutex<Option<(String, u16)>>,
    /// Counts switches to another primary; the change feed resubscribes when it moves.
    switches: watch::Sender<u64>,
}

/// The current primary's connection, shared by every clone; one more kind of store
/// connection beside one server and a cluster.
#[derive(Clone)]
pub(super) struct SentinelConn(Arc<Shared>);

impl SentinelConn {
    /// Resolves the primary (bounded) and starts the resolver and the `+switch-master`
    /// follower on `runtime`, the store's own.
    pub(super) async fn connect(target: &SentinelTarget) -> Result<Self, StoreError> {
        let passwords = target.passwords().map_err(StoreError::Unavailable)?;
        let primary = resolve(target, &passwords)
            .await
            .map_err(StoreError::Unavailable)?;
        tracing::info!(
            master = %target.master,
            primary = %format!("{}:{}", primary.host, primary.port),
            "Redis Sentinel: connected to the primary"
        );
        let (switches, _) = watch::channel(0);
        let conn = Self(Arc::new(Shared {
            target: target.clone(),
            passwords,
            primary: ArcSwap::from_pointee(primary),
            wake: Notify::new(),
            announced: Notify::new(),
            promoted: std::sync::Mutex::new(None),
            switches,
        }));
        tokio::spawn(conn.clone().resolver());
        tokio::spawn(conn.clone().follow_switches());
        Ok(conn)
    }

    /// Whether `outcome` says the primary may have moved: the connection failed, or the node
    /// answered `READONLY` (it is a replica now) or `NOREPLICAS` (its replica left it, as when
    /// a failover promoted that replica). Wakes the resolver if so.
    fn check<T>(&self, outcome: &redis::RedisResult<T>, value: impl Fn(&T) -> bool) {
        let moved = match outcome {
            Err(e) => {
                e.kind() == redis::ErrorKind::ReadOnly
                    || e.code() == Some("NOREPLICAS")
                    || !is_reply_error(e)
            }
            Ok(v) => value(v),
        };
        if moved {
            self.0.wake.notify_one();
        }
    }

    /// Resolves on wake-ups, every few seconds otherwise, retrying with backoff while no
    /// sentinel names a reachable master.
    async fn resolver(self) {
        let mut failing = false;
        let mut wait = Duration::from_millis(50);
        loop {
            if failing {
                let _ = tokio::time::timeout(wait, self.0.announced.notified()).await;
                wait = (wait * 2).min(MAX_RETRY_WAIT);
            } else {
                let _ = tokio::time::timeout(RECHECK_EVERY, async {
                    tokio::select! {
                        () = self.0.wake.notified() => {}
                        () = self.0.announced.notified() => {}
                    }
                })
                .await;
                wait = Duration::from_millis(50);
            }
            match self.refresh().await {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(master = %self.0.target.master, error = %e, "Redis Sentinel: no reachable primary yet; retrying");
                    }
                    failing = true;
                }
            }
        }
    }

    /// Switches to the node a `+promoted-slave` named if it answers `ROLE` as a master. Else
    /// keeps the current primary when the sentinels still name it (or it was reached through a
    /// promotion the sentinels have not finished announcing) and it answers `ROLE` as a
    /// master; otherwise resolves and switches.
    async fn refresh(&self) -> Result<(), String> {
        let current = self.0.primary.load_full();
        let hint = self
            .0
            .promoted
            .lock()
            .map(|mut h| h.take())
            .unwrap_or_default();
        if let Some((host, port)) = hint {
            if host != current.host || port != current.port {
                match connect_first_master(&[(host.clone(), port)], &self.0.passwords).await {
                    Ok(mut next) => {
                        next.promoted = true;
                        self.switch(&current, next);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(promoted = %format!("{host}:{port}"), error = %e, "Redis Sentinel: the promoted replica is not a master yet; asking the sentinels");
                    }
                }
            }
        }
        let named = ask_sentinels(&self.0.target, &self.0.passwords).await?;
        if current.promoted
            || named
                .iter()
                .any(|(h, p)| *h == current.host && *p == current.port)
        {
            let mut conn = current.conn.clone();
            if is_master(&mut conn).await.unwrap_or(false) {
                return Ok(());
            }
        }
        let next = match connect_first_master(&named, &self.0.passwords).await {
            Ok(next) => next,
            // The sentinel asked may lag a failover the others have seen.
            Err(_) => resolve(&self.0.target, &self.0.passwords).await?,
        };
        self.switch(&current, next);
        Ok(())
    }

    fn switch(&self, current: &Primary, next: Primary) {
        let (from, to) = (
            format!("{}:{}", current.host, current.port),
            format!("{}:{}", next.host, next.port),
        );
        let promoted = next.promoted;
        self.0.primary.store(Arc::new(next));
        self.0.switches.send_modify(|n| *n += 1);
        tracing::warn!(master = %self.0.target.master, %from, %to, promoted, "Redis Sentinel: switched to the new primary");
    }

    /// Subscribes to `+promoted-slave` and `+switch-master` on one sentinel at a time, for as
    /// long as the store lives, and wakes the resolver on each notification for this master —
    /// and on each (re)subscription, for any it missed while unsubscribed.
    async fn follow_switches(self) {
        use futures_util::StreamExt;
        let mut backoff = Duration::from_millis(100);
        let sentinels = self.0.target.sentinels.clone();
        for (host, port) in sentinels.iter().cycle() {
            let info = connection_info(host, *port, self.0.passwords.sentinel.as_ref());
            let subscribed = async {
                let client = redis::Client::open(info)?;
                let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                    .await
                    .map_err(|_| timed_out())??;
                tokio::time::timeout(
                    RESPONSE_TIMEOUT,
                    pubsub.subscribe(&["+switch-master", "+promoted-slave"]),
                )
                .await
                .map_err(|_| timed_out())??;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match subscribed.await {
                Ok(mut pubsub) => {
                    backoff = Duration::from_millis(100);
                    self.0.wake.notify_one();
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let payload: String = msg.get_payload().unwrap_or_default();
                        let channel = msg.get_channel_name();
                        let promoted = if channel == "+promoted-slave" {
                            match promoted_replica(&payload, &self.0.target.master) {
                                Some(addr) => Some(addr),
                                None => continue,
                            }
                        } else if payload.split_whitespace().next() == Some(&self.0.target.master) {
                            // "<master name> <old ip> <old port> <new ip> <new port>"
                            None
                        } else {
                            continue;
                        };
                        tracing::info!(%payload, %channel, "Redis Sentinel: failover notification");
                        if let Some(addr) = promoted {
                            if let Ok(mut hint) = self.0.promoted.lock() {
                                *hint = Some(addr);
                            }
                        }
                        self.0.announced.notify_one();
                    }
                    tracing::warn!(sentinel = %format!("{host}:{port}"), "lost the sentinel's notifications; trying the next sentinel");
                }
                Err(e) => {
                    tracing::warn!(sentinel = %format!("{host}:{port}"), error = %e, "cannot follow the sentinel's notifications");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The change feed on the current primary, resubscribed after each switch (and after a
    /// lost subscription); `deliver` handles each message. Each subscription first drops the
    /// whole cache: while unsubscribed, any key may have changed unseen.
    pub(super) async fn follow_changes<F, Fut>(self, sink: Arc<dyn ChangeSink>, deliver: F)
    where
        F: Fn(String, Arc<dyn ChangeSink>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        use futures_util::StreamExt;
        let mut switches = self.0.switches.subscribe();
        let mut backoff = Duration::from_millis(100);
        loop {
            switches.borrow_and_update();
            let client = self.0.primary.load().client.clone();
            let subscribed = async {
                let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                    .await
                    .map_err(|_| timed_out())??;
                tokio::time::timeout(RESPONSE_TIMEOUT, pubsub.subscribe(CHANGES_CHANNEL))
                    .await
                    .map_err(|_| timed_out())??;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match subscribed.await {
                Ok(mut pubsub) => {
                    sink.everything_may_have_changed();
                    backoff = Duration::from_millis(100);
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            msg = messages.next() => match msg {
                                Some(msg) => {
                                    let payload: String = msg.get_payload().unwrap_or_default();
                                    deliver(payload, Arc::clone(&sink)).await;
                                }
                                None => {
                                    tracing::warn!("lost the Redis change feed; resubscribing");
                                    self.0.wake.notify_one();
                                    break;
                                }
                            },
                            changed = switches.changed() => {
                                if changed.is_err() {
                                    return;
                                }
                                tracing::info!("Redis primary switched; resubscribing to the change feed");
                                break;
                            }
                        }
                    }
                    // A switch resubscribes at once; a lost feed waits for one or the backoff.
                    if switches.has_changed().unwrap_or(false) {
                        continue;
                    }
                }
                Err(e) => {
                    self.0.wake.notify_one();
                    tracing::warn!(error = %e, "cannot subscribe to Redis changes on the primary");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                changed = switches.changed() => if changed.is_err() { return },
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "timed out",
    ))
}

/// A reply error (the command reached the server and was refused), as opposed to a failed
/// connection or a timeout.
fn is_reply_error(e: &redis::RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error())
}

/// The address in a `+promoted-slave` payload for `master`:
/// `slave <name> <ip> <port> @ <master> <master ip> <master port>`.
fn promoted_replica(payload: &str, master: &str) -> Option<(String, u16)> {
    let fields: Vec<&str> = payload.split_whitespace().collect();
    match fields.as_slice() {
        ["slave", _, ip, port, "@", name, ..] if *name == master => {
            Some(((*ip).to_owned(), port.parse().ok()?))
        }
        _ => None,
    }
}

/// A reply that says the node is no (writable) primary any more.
fn is_readonly(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "READONLY" || e.code() == "NOREPLICAS")
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut conn = self.0.primary.load().conn.clone();
            let outcome = conn.req_packed_command(cmd).await;
            self.check(&outcome, is_readonly);
            outcome
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut conn = self.0.primary.load().conn.clone();
            let outcome = conn.req_packed_commands(cmd, offset, count).await;
            self.check(&outcome, |vs: &Vec<Value>| vs.iter().any(is_readonly));
            outcome
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The addresses the sentinels name for the master, first answer first (each sentinel asked
/// in turn, each step bounded); duplicates removed.
async fn ask_sentinels(
    target: &SentinelTarget,
    passwords: &Passwords,
) -> Result<Vec<(String, u16)>, String> {
    let mut named: Vec<(String, u16)> = Vec::new();
    let mut last_error = String::from("no sentinel answered");
    for (host, port) in &target.sentinels {
        let info = connection_info(host, *port, passwords.sentinel.as_ref());
        let asked = async {
            let client = redis::Client::open(info)?;
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&bounded())
                .await?;
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&target.master)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await
        };
        match asked.await {
            Ok(Some(addr)) => {
                if !named.contains(&addr) {
                    named.push(addr);
                }
                // One answer is enough unless its node turns out not to be a master; the
                // others are asked only then (below), so a resolution costs one sentinel.
                break;
            }
            Ok(None) => {
                last_error = format!(
                    "sentinel {host}:{port} monitors no master named {:?}",
                    target.master
                );
            }
            Err(e) => last_error = format!("sentinel {host}:{port}: {e}"),
        }
    }
    if named.is_empty() {
        return Err(last_error);
    }
    Ok(named)
}

/// Asks the first sentinel that answers, then — if the node it names is not a reachable
/// master — every sentinel, and connects to the first named node whose `ROLE` is master.
async fn resolve(target: &SentinelTarget, passwords: &Passwords) -> Result<Primary, String> {
    let named = ask_sentinels(target, passwords).await?;
    match connect_first_master(&named, passwords).await {
        Ok(p) => Ok(p),
        Err(first) => {
            // The first sentinel may lag a failover the others have seen: ask them all.
            let mut all = Vec::new();
            for s in &target.sentinels {
                let one = SentinelTarget {
                    sentinels: vec![s.clone()],
                    ..target.clone()
                };
                if let Ok(addrs) = ask_sentinels(&one, passwords).await {
                    for a in addrs {
                        if !all.contains(&a) && !named.contains(&a) {
                            all.push(a);
                        }
                    }
                }
            }
            if all.is_empty() {
                return Err(first);
            }
            connect_first_master(&all, passwords).await
        }
    }
}

async fn connect_first_master(
    named: &[(String, u16)],
    passwords: &Passwords,
) -> Result<Primary, String> {
    let mut last_error = String::from("no candidate");
    for (host, port) in named {
        let info = connection_info(host, *port, passwords.node.as_ref());
        let attempt = async {
            let client = redis::Client::open(info)?;
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&bounded())
                .await?;
            let master = is_master(&mut conn).await?;
            Ok::<_, redis::RedisError>((client, conn, master))
        };
        match attempt.await {
            Ok((client, conn, true)) => {
                return Ok(Primary {
                    host: host.clone(),
                    port: *port,
                    client,
                    conn,
                    promoted: false,
                })
            }
            Ok((_, _, false)) => {
                last_error = format!("{host}:{port} is not a master (ROLE)");
            }
            Err(e) => last_error = format!("{host}:{port}: {e}"),
        }
    }
    Err(last_error)
}

/// `ROLE` says master.
async fn is_master(conn: &mut MultiplexedConnection) -> redis::RedisResult<bool> {
    let role: redis::Role = redis::cmd("ROLE").query_async(conn).await?;
    Ok(matches!(role, redis::Role::Primary { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_addresses_are_host_and_port() {
        assert_eq!(
            SentinelTarget::parse_addresses(&["127.0.0.1:26379".into(), "[::1]:26380".into()]),
            Ok(vec![("127.0.0.1".into(), 26379), ("::1".into(), 26380)])
        );
        for bad in [
            "127.0.0.1",
            "h:0",
            "h:x",
            ":26379",
            "redis://h:26379",
            "rediss://h:1",
        ] {
            assert!(
                SentinelTarget::parse_addresses(&[bad.into()]).is_err(),
                "{bad} accepted"
            );
        }
        assert!(SentinelTarget::parse_addresses(&[]).is_err());
    }

    #[test]
    fn a_promotion_is_read_for_its_own_master_only() {
        let payload = "slave 127.0.0.1:6380 127.0.0.1 6380 @ kg 127.0.0.1 6379";
        assert_eq!(
            promoted_replica(payload, "kg"),
            Some(("127.0.0.1".into(), 6380))
        );
        assert_eq!(promoted_replica(payload, "other"), None);
        assert_eq!(
            promoted_replica("sentinel x 127.0.0.1 26379 @ kg 127.0.0.1 6379", "kg"),
            None
        );
        assert_eq!(
            promoted_replica("slave x 127.0.0.1 notaport @ kg h 1", "kg"),
            None
        );
    }
}
