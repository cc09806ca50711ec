//! The Redis store, for a fleet of gateways sharing one Redis or one Redis Cluster.
//!
//! Layout. Everything about key records carries the one hash tag `{kg}`, so a whole write
//! (record, indexes, audit entry) is one atomic Lua script even on a cluster, where a script
//! may only touch one slot:
//! - `{kg}:k:<id>` — the record as JSON (usage counters live apart, below)
//! - `{kg}:pk:<public_key>`, `{kg}:h:<sha256 hex>` — id indexes (bearer hashes, current and
//!   previous)
//! - `{kg}:all`, `{kg}:o:<owner>` — sorted sets of ids, all scores 0: lexicographic order is
//!   creation order (UUIDv7), so newest-first paging is `ZREVRANGEBYLEX` from the cursor
//! - `{kg}:u:<id>` — hash `total` (requests), `last` (Unix µs of the last use)
//! - `{kg}:a:<audit id>` — audit entry JSON; `{kg}:aa`, `{kg}:ak:<key id>`, `{kg}:ao:<owner>`
//! - `{kg}:t` — set of the public keys of every key ever revoked (tombstones; a delete keeps
//!   them), so a revoked pair cannot be imported again unnoticed
//! - `{kg}:th` — set of the SHA-256 hex of every revoked bearer key's secrets (current and in
//!   grace): a bearer secret authenticates alone, so it cannot come back under a new public key
//! - `kg:n:<id>:<nonce>` — used nonces, `SET NX PX`; untagged, so on a cluster the per-request
//!   traffic spreads over every master
//! - channel `kg:changes` — every write publishes the public keys and hashes it touched
//!
//! The price of the one tag: on a cluster all records sit on one master (about 1 KiB per key).
//! Records are read only on cache misses and written by admins; the nonces, one write per
//! request, are what needs the cluster's spread.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, RedisFuture, Script, TlsCertificates, Value};

use super::audit::{AuditEntry, AuditPage};

mod breaker;
mod durability;
use super::model::KeyRecord;
use super::store::{
    ChangeSink, KeyStore, Page, SigningKeyStore, StoreError, Usage, Versioned, Write,
};
pub use durability::{NonceDurability, MAX_REPLICATION_TIMEOUT};

mod sentinel;
pub use sentinel::SentinelTarget;

const WRITE_SCRIPT: &str = r#"
local op, id = ARGV[1], ARGV[2]
local rk = '{kg}:k:' .. id
local old = redis.call('GET', rk)
if op == 'insert' and old then return 'conflict' end
if op == 'update' and not old then return 'not_found' end
if op == 'delete' and not old then return 'absent' end
local o = old and cjson.decode(old)
if op == 'update' then
  -- Compare-and-set on the record version, inside the script: nothing lands in between.
  if (tonumber(o['version']) or 0) + 1 ~= tonumber(ARGV[11]) then return 'version_conflict' end
  if o['revoked_at'] ~= nil and o['revoked_at'] ~= cjson.null and ARGV[12] ~= '1' then
    return 'revoked'
  end
end
local function hashes_of(rec)
  local out = {}
  local c = rec['credential']
  if type(c) == 'table' and c['kind'] == 'sha256' then table.insert(out, c['hash']) end
  local p = rec['previous']
  if type(p) == 'table' and type(p['credential']) == 'table' and p['credential']['kind'] == 'sha256' then
    table.insert(out, p['credential']['hash'])
  end
  return out
end
local newhashes = {}
for h in string.gmatch(ARGV[6], '%S+') do table.insert(newhashes, h) end
if op ~= 'delete' then
  local holder = redis.call('GET', '{kg}:pk:' .. ARGV[4])
  if holder and holder ~= id then return 'conflict' end
  for _, h in ipairs(newhashes) do
    local hh = redis.call('GET', '{kg}:h:' .. h)
    if hh and hh ~= id then return 'conflict' end
  end
end
-- The server's clock, so each gateway can measure how long the change took to reach it.
local now = redis.call('TIME')
local changed = {'t:' .. now[1] .. string.format('%06d', tonumber(now[2]))}
if o then
  redis.call('DEL', '{kg}:pk:' .. o['public_key'])
  table.insert(changed, 'pk:' .. o['public_key'])
  for _, h in ipairs(hashes_of(o)) do
    redis.call('DEL', '{kg}:h:' .. h)
    table.insert(changed, 'h:' .. h)
  end
  redis.call('ZREM', '{kg}:o:' .. o['owner'], id)
end
if op ~= 'delete' then
  table.insert(changed, 'pk:' .. ARGV[4])
  for _, h in ipairs(newhashes) do table.insert(changed, 'h:' .. h) end
end
if op == 'delete' then
  redis.call('DEL', rk, '{kg}:u:' .. id)
  redis.call('ZREM', '{kg}:all', id)
else
  redis.call('SET', rk, ARGV[3])
  redis.call('SET', '{kg}:pk:' .. ARGV[4], id)
  for _, h in ipairs(newhashes) do redis.call('SET', '{kg}:h:' .. h, id) end
  redis.call('ZADD', '{kg}:o:' .. ARGV[5], 0, id)
  redis.call('ZADD', '{kg}:all', 0, id)
end
if ARGV[7] ~= '' then
  local aid = ARGV[8]
  redis.call('SET', '{kg}:a:' .. aid, ARGV[7])
  redis.call('ZADD', '{kg}:aa', 0, aid)
  redis.call('ZADD', '{kg}:ak:' .. ARGV[9], 0, aid)
  redis.call('ZADD', '{kg}:ao:' .. ARGV[10], 0, aid)
end
-- Tombstones: every public key ever revoked, and a revoked bearer key's secret hashes, kept
-- after its record is deleted.
if op ~= 'delete' and ARGV[12] == '1' then
  redis.call('SADD', '{kg}:t', ARGV[4])
  for _, h in ipairs(newhashes) do redis.call('SADD', '{kg}:th', h) end
end
if op == 'delete' and o['revoked_at'] ~= nil and o['revoked_at'] ~= cjson.null then
  redis.call('SADD', '{kg}:t', o['public_key'])
  for _, h in ipairs(hashes_of(o)) do redis.call('SADD', '{kg}:th', h) end
end
redis.call('PUBLISH', 'kg:changes', table.concat(changed, ' '))
return 'ok'
"#;

const USAGE_SCRIPT: &str = r#"
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('EXISTS', '{kg}:k:' .. id) == 1 then
    local k = '{kg}:u:' .. id
    redis.call('HINCRBY', k, 'total', ARGV[i + 1])
    local last = tonumber(redis.call('HGET', k, 'last') or '0')
    if tonumber(ARGV[i + 2]) > last then redis.call('HSET', k, 'last', ARGV[i + 2]) end
  end
end
return 'ok'
"#;

const LOOKUP_SCRIPT: &str = r#"
local id = ARGV[2]
if ARGV[1] == 'index' then
  id = redis.call('GET', '{kg}:' .. ARGV[2])
  if not id then return false end
end
local rec = redis.call('GET', '{kg}:k:' .. id)
if not rec then return false end
local u = redis.call('HMGET', '{kg}:u:' .. id, 'total', 'last')
return {rec, u[1] or '', u[2] or ''}
"#;

const AUDIT_IMPORT_SCRIPT: &str = r#"
local aid = ARGV[1]
if redis.call('SET', '{kg}:a:' .. aid, ARGV[2], 'NX') == false then return 0 end
redis.call('ZADD', '{kg}:aa', 0, aid)
redis.call('ZADD', '{kg}:ak:' .. ARGV[3], 0, aid)
redis.call('ZADD', '{kg}:ao:' .. ARGV[4], 0, aid)
return 1
"#;

/// The tombstone set (see the layout above): tagged like the records, so on a cluster it
/// sits with them and the write script can add to it atomically.
const TOMBSTONES: &str = "{kg}:t";
/// The bearer secret tombstones (hex SHA-256), beside the public key ones for the same reason.
const SECRET_TOMBSTONES: &str = "{kg}:th";

/// Every script names this key, so a cluster client sends it to the master holding `{kg}`.
/// The keys a script builds itself share the tag, hence the slot.
const ANCHOR: &str = "{kg}:all";

/// The assertion keyring: hash `v` (version), `b` (the sealed document).
const SIGNING_KEYS: &str = "{kg}:signing_keys";

const SIGNING_KEYS_SCRIPT: &str = r#"
local at = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if at + 1 ~= tonumber(ARGV[1]) then return 'version_conflict' end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'b', ARGV[2])
return 'ok'
"#;

/// Where every write announces the public keys and bearer hashes it touched.
const CHANGES_CHANNEL: &str = "kg:changes";

/// Where the store's Redis is. `Debug` hides passwords.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server: `redis://` or `rediss://`.
    Single(String),
    /// Seed nodes of a Redis Cluster, each `redis://host:port` or `rediss://…`.
    Cluster(Vec<String>),
    /// The primary that Redis Sentinel names (`store.sentinels`).
    Sentinel(SentinelTarget),
}

impl RedisTarget {
    /// Reads `store.url`: one `redis://`/`rediss://` URL is one server; one
    /// `redis+cluster://[user:password@]host:port,host:port…` (or `rediss+cluster://`), or
    /// several plain URLs, name the seed nodes of a cluster. Errors never repeat a password.
    pub fn parse(urls: &[String]) -> Result<Self, String> {
        let target = match urls {
            [] => return Err("no URL given".into()),
            [one] => match cluster_seeds(one)? {
                Some(seeds) => Self::Cluster(seeds),
                None => Self::Single(one.clone()),
            },
            many => {
                for u in many {
                    if cluster_seeds(u)?.is_some() {
                        return Err(format!(
                            "{}: a cluster URL cannot be combined with others; list plain \
                             redis:// URLs of the seed nodes, or one redis+cluster:// URL",
                            redact(u)
                        ));
                    }
                }
                Self::Cluster(many.to_vec())
            }
        };
        for u in target.urls() {
            redis::IntoConnectionInfo::into_connection_info(u.as_str())
                .map_err(|e| format!("{}: {}", redact(u), e.detail().unwrap_or("invalid URL")))?;
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                return Err(format!(
                    "{} must start with redis://, rediss://, redis+cluster:// or \
                     rediss+cluster://",
                    redact(u)
                ));
            }
        }
        Ok(target)
    }

    fn urls(&self) -> &[String] {
        match self {
            Self::Single(u) => std::slice::from_ref(u),
            Self::Cluster(us) => us,
            Self::Sentinel(_) => &[],
        }
    }

    pub fn uses_tls(&self) -> bool {
        self.urls().iter().any(|u| u.starts_with("rediss://"))
    }
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls().iter().map(|u| redact(u)).collect();
        match self {
            Self::Single(_) => f.debug_tuple("Single").field(&urls[0]).finish(),
            Self::Cluster(_) => f.debug_tuple("Cluster").field(&urls).finish(),
            Self::Sentinel(s) => f.debug_tuple("Sentinel").field(s).finish(),
        }
    }
}

/// The seed URLs of a `redis+cluster://` / `rediss+cluster://` URL; `None` for other schemes.
fn cluster_seeds(url: &str) -> Result<Option<Vec<String>>, String> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Ok(None);
    };
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let (hosts, path) = match hosts.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (hosts, String::new()),
    };
    let seeds: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{auth}{h}{path}"))
        .collect();
    if seeds.is_empty() {
        return Err(format!("{}: names no host", redact(url)));
    }
    Ok(Some(seeds))
}

/// The URL with any user and password replaced by `***`, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, hosts)) => format!("{scheme}://***@{hosts}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// A connection to one server, a cluster or Sentinel's primary; all drive commands the same
/// way.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(sentinel::SentinelConn),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Self::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Sentinel(c) => c.get_db(),
        }
    }
}

/// Keys in one Redis (or one Redis Cluster) shared by every gateway of a fleet.
pub struct RedisStore {
    /// Where the change feed subscribes: the server, or each cluster seed in turn (a classic
    /// `PUBLISH` reaches every node of a cluster).
    feed: Vec<redis::Client>,
    conn: Conn,
    /// Every call through [`Self::conn`] and the nonce pool passes it (breaker.rs).
    breaker: Arc<breaker::Breaker>,
    /// `store.nonce_durability = "replicated"`: nonces go through their own connections.
    nonces: Option<durability::NoncePool>,
    write: Script,
    usage: Script,
    lookup: Script,
    audit_import: Script,
    signing_keys: Script,
    rate_limits: Script,
    release: Script,
    abuse: Script,
    credits: Script,
    /// The connection's driver task lives here, so the store works from any runtime —
    /// pingora's per-service runtimes, and the small one that runs the final flush after they
    /// are gone. Shut down in the background on drop (dropping it in async code would panic).
    runtime: Option<tokio::runtime::Runtime>,
}

/// GCRA over all of a request's limits, all or nothing, with an optional lease —
/// `crate::limits::gcra_lease` line for line, on Redis' clock so every gateway reads one time.
/// KEYS: one per limit (one hash slot). ARGV: epoch (s), slack (µs), cost, lease, then per
/// limit its interval and window (µs). Returns {refused limit (1-based, 0: none), seconds to
/// wait, now, units leased, TAT per limit}; numbers as strings, since Redis would truncate a
/// Lua float to an integer. A TAT key expires when the TAT passes: absent then reads as 0,
/// the same as idle.
const RATE_LIMIT_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = (tonumber(t[1]) - tonumber(ARGV[1])) * 1000000 + tonumber(t[2])
local slack = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local tats, nexts = {}, {}
local refused, wait = 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 + 2 * i])
  local window = tonumber(ARGV[4 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  tats[i] = tat
  local new = math.max(tat, now) + cost * interval
  nexts[i] = new
  local over = new - now - window
  if over > slack then
    local w = math.max(1, math.ceil(over / 1000000))
    if refused == 0 or w > wait then
      refused = i
      wait = w
    end
  end
end
local granted = 0
if refused == 0 and lease > 0 then
  local room = true
  for i = 1, #KEYS do
    local interval = tonumber(ARGV[3 + 2 * i])
    local window = tonumber(ARGV[4 + 2 * i])
    if nexts[i] + lease * interval - now > window / 2 then
      room = false
    end
  end
  if room then
    granted = lease
    for i = 1, #KEYS do
      nexts[i] = nexts[i] + lease * tonumber(ARGV[3 + 2 * i])
    end
  end
end
local out = {tostring(refused), tostring(wait), string.format('%.3f', now), tostring(granted)}
for i = 1, #KEYS do
  local tat = tats[i]
  if refused == 0 then
    tat = nexts[i]
    redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
  out[#out + 1] = string.format('%.3f', tat)
end
return out
"#;

/// Gives back a lease's unspent units: every limit's TAT moves back by `units` intervals.
/// KEYS: the limits. ARGV: units, then per limit its interval (µs).
const RELEASE_SCRIPT: &str = r#"
for i = 1, #KEYS do
  local tat = redis.call('GET', KEYS[i])
  if tat then
    local back = tonumber(tat) - tonumber(ARGV[1]) * tonumber(ARGV[1 + i])
    redis.call('SET', KEYS[i], string.format('%.3f', back), 'KEEPTTL')
  end
end
return 0
"#;

/// One failed authentication of an address: KEYS[1] counts failures in a fixed window,
/// KEYS[2] is the block. ARGV: window (ms), max, block (ms), the subject. Returns {the block's
/// ms left (0: not blocked), the window's ms left}. Counting and blocking are one atomic step,
/// so the fleet's `max`-th failure is the one that blocks. A block is set once per crossing
/// (NX), so failures during a block do not extend it, and that one SET announces it on the
/// change feed (`b:<subject>:<ms>`), so every gateway refuses the address without waiting for
/// a failure of its own.
const ABUSE_SCRIPT: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
if n >= tonumber(ARGV[2]) then
  if redis.call('SET', KEYS[2], '1', 'PX', ARGV[3], 'NX') then
    redis.call('PUBLISH', 'kg:changes', 'b:' .. ARGV[4] .. ':' .. ARGV[3])
  end
end
local left = redis.call('PTTL', KEYS[2])
if left < 0 then
  left = 0
end
local window = redis.call('PTTL', KEYS[1])
if window < 0 then
  window = 0
end
return {left, window}
"#;

/// One credit operation — `crate::limits::credits::apply` line for line. KEYS[1]: the key's
/// counter (hash: `r` remaining, `p` refill period). ARGV: mode (spend, add, set, get), n,
/// current period, refill amount (-1: no refill), cap. Returns {ok (1/0), remaining}.
const CREDITS_SCRIPT: &str = r#"
local r = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
local p = tonumber(redis.call('HGET', KEYS[1], 'p') or '0')
local mode, n = ARGV[1], tonumber(ARGV[2])
local period, amount, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local before_r, before_p = r, p
if amount >= 0 and p < period then
  r = amount
  p = period
end
local ok = 1
if mode == 'spend' then
  if r >= n then r = r - n else ok = 0 end
elseif mode == 'add' then
  r = math.min(r + n, cap)
elseif mode == 'set' then
  r = math.min(n, cap)
end
if ok == 1 and mode ~= 'get' and (r ~= before_r or p ~= before_p) then
  redis.call('HSET', KEYS[1], 'r', string.format('%d', r), 'p', string.format('%d', p))
end
return {ok, string.format('%d', r)}
"#;

fn unavailable(e: &redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl RedisStore {
    /// Connects to one server or a cluster (see [`RedisTarget::parse`]), trusting the
    /// system's CA certificates for `rediss://`.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let target = RedisTarget::parse(&[url.to_owned()]).map_err(StoreError::Unavailable)?;
        Self::connect(&target, None)
    }

    /// Connects to `target`; `ca_pem` replaces the system's CA certificates for `rediss://`.
    pub fn connect(target: &RedisTarget, ca_pem: Option<&[u8]>) -> Result<Self, StoreError> {
        if target.uses_tls() {
            // Fails only when a provider is already installed, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let certs = || TlsCertificates {
            client_tls: None,
            root_cert: ca_pem.map(<[u8]>::to_vec),
        };
        let client_for = |url: &str| -> Result<redis::Client, StoreError> {
            let client = if ca_pem.is_some() && url.starts_with("rediss://") {
                redis::Client::build_with_tls(url, certs())
            } else {
                redis::Client::open(url)
            };
            client.map_err(|e| StoreError::Unavailable(format!("{}: {e}", redact(url))))
        };
        let feed = target
            .urls()
            .iter()
            .map(|u| client_for(u))
            .collect::<Result<Vec<_>, _>>()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keygate-redis")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start the Redis runtime: {e}")))?;
        let connecting = connect_conn(target, &feed, ca_pem);
        let connected = std::thread::scope(|s| {
            // block_on must not run on a thread that is already inside a runtime.
            s.spawn(|| runtime.block_on(connecting))
                .join()
                .map_err(|_| StoreError::Unavailable("Redis connect panicked".into()))
        })
        .and_then(|c| c);
        let conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                // Dropping a runtime inside async code (a caller's) would panic.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        let breaker = Arc::new(breaker::Breaker::new(matches!(conn, Conn::Cluster(_))));
        runtime.spawn(breaker::probe(Arc::clone(&breaker), {
            let conn = conn.clone();
            move || breaker::ping(conn.clone())
        }));
        Ok(Self {
            feed,
            conn,
            breaker,
            nonces: None,
            write: Script::new(WRITE_SCRIPT),
            usage: Script::new(USAGE_SCRIPT),
            lookup: Script::new(LOOKUP_SCRIPT),
            audit_import: Script::new(AUDIT_IMPORT_SCRIPT),
            signing_keys: Script::new(SIGNING_KEYS_SCRIPT),
            rate_limits: Script::new(RATE_LIMIT_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            abuse: Script::new(ABUSE_SCRIPT),
            credits: Script::new(CREDITS_SCRIPT),
            runtime: Some(runtime),
        })
    }

    /// The store's connection, behind its circuit breaker.
    fn conn(&self) -> breaker::Guarded<Conn> {
        breaker::Guarded {
            inner: self.conn.clone(),
            breaker: Arc::clone(&self.breaker),
        }
    }

    /// The connection for an admin write: with `nonce_durability = "replicated"` one of the
    /// nonce pool's, which a `WAIT` after the write may hold (durability.rs).
    fn admin_conn(&self) -> breaker::Guarded<Conn> {
        match self.admin_durability() {
            Some(pool) => pool.next_conn(),
            None => self.conn(),
        }
    }

    /// The pool whose `WAIT` makes an admin write durable. Not on a cluster yet: a bare `WAIT`
    /// there goes to every master, and any master without a replica would refuse every admin
    /// write; it needs routing to the `{kg}` slot's master.
    fn admin_durability(&self) -> Option<&durability::NoncePool> {
        match self.conn {
            Conn::Cluster(_) => None,
            _ => self.nonces.as_ref(),
        }
    }

    /// One record with its usage counters, in one round trip: by id (`how = "id"`) or through
    /// an index key below `{kg}:` (`how = "index"`, e.g. `pk:<public key>`).
    async fn lookup(&self, how: &str, what: &str) -> Result<Option<KeyRecord>, StoreError> {
        let found: Option<(String, String, String)> = self
            .lookup
            .key(ANCHOR)
            .arg(how)
            .arg(what)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let Some((json, total, last)) = found else {
            return Ok(None);
        };
        let mut record = KeyRecord::decode(json.as_bytes())?;
        record.set_usage(&total, &last);
        Ok(Some(record))
    }

    /// Up to `limit + 1` members of a lexicographic sorted set, newest first, below `cursor`.
    async fn page_ids(
        &self,
        set: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let max = cursor.map_or_else(|| "+".to_owned(), |c| format!("({c}"));
        redis::cmd("ZREVRANGEBYLEX")
            .arg(set)
            .arg(max)
            .arg("-")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))
    }
}

/// Bounds on every Redis call. Without them a call on a dead connection waits for ever; with
/// them an outage answers `store_unavailable` within about a second.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1000);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(RESPONSE_TIMEOUT)
        .set_connection_timeout(CONNECT_TIMEOUT)
        // One reconnect attempt per connection loss, no retry inside it: redis-rs waits its
        // fixed first backoff (1 s, plus up to 1 s of jitter; `max_delay` does not bound it)
        // before a retry, which held every call during an outage and delayed recovery. The
        // next call, or the circuit breaker's probe every 250 ms, tries again instead.
        .set_number_of_retries(0)
        .set_max_delay(200)
}

/// One connection to `target`, bounded like every store call: the store's own, and each of
/// the nonce pool's (`durability.rs`). `feed` holds the single server's client.
async fn connect_conn(
    target: &RedisTarget,
    feed: &[redis::Client],
    ca_pem: Option<&[u8]>,
) -> Result<Conn, StoreError> {
    match target {
        RedisTarget::Single(url) => {
            let client = feed
                .first()
                .ok_or_else(|| StoreError::Unavailable(format!("{}: no client", redact(url))))?;
            ConnectionManager::new_with_config(client.clone(), manager_config())
                .await
                .map(Conn::Single)
                .map_err(|e| unavailable(&e))
        }
        RedisTarget::Cluster(seeds) => {
            let mut builder = ClusterClient::builder(seeds.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                // Redirections during a failover need a few tries; each is bounded.
                .retries(3)
                .max_retry_wait(200);
            if let Some(ca) = ca_pem {
                builder = builder.certs(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.to_vec()),
                });
            }
            builder
                .build()
                .map_err(|e| unavailable(&e))?
                .get_async_connection()
                .await
                .map(Conn::Cluster)
                .map_err(|e| unavailable(&e))
        }
        // Each connection follows the sentinels' primary on its own.
        RedisTarget::Sentinel(s) => sentinel::SentinelConn::connect(s).await.map(Conn::Sentinel),
    }
}

fn hashes_arg(record: &KeyRecord) -> String {
    record
        .indexed_hashes()
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join(" ")
}

#[async_trait]
impl crate::limits::store::RateLimitStore for RedisStore {
    async fn acquire_lease(
        &self,
        buckets: &[crate::limits::store::Bucket<'_>],
        cost: u64,
        lease: u64,
    ) -> Result<(crate::limits::Decision, u64), StoreError> {
        use crate::limits::store::{states, EPOCH_SECS};
        let mut inv = self.rate_limits.prepare_invoke();
        inv.arg(EPOCH_SECS)
            .arg(crate::limits::SLACK_US)
            .arg(cost)
            .arg(lease);
        for b in buckets {
            inv.key(b.key.as_str())
                .arg(b.limit.interval_us())
                .arg(b.limit.window_us());
        }
        let out: Vec<String> = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let num = |i: usize| -> Result<f64, StoreError> {
            out.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| corrupt(format!("rate limit script answered {out:?}")))
        };
        let (refused, wait, now) = (num(0)? as usize, num(1)? as u64, num(2)?);
        let granted = num(3)? as u64;
        let tats = (0..buckets.len())
            .map(|i| num(4 + i))
            .collect::<Result<Vec<f64>, _>>()?;
        let limits: Vec<_> = buckets.iter().map(|b| b.limit).collect();
        Ok((
            crate::limits::Decision {
                allowed: refused == 0,
                states: states(&limits, &tats, now),
                refused_by: refused.checked_sub(1).map(|i| (i, wait)),
            },
            granted,
        ))
    }

    async fn release(
        &self,
        buckets: &[crate::limits::store::Bucket<'_>],
        units: u64,
    ) -> Result<(), StoreError> {
        let mut inv = self.release.prepare_invoke();
        inv.arg(units);
        for b in buckets {
            inv.key(b.key.as_str()).arg(b.limit.interval_us());
        }
        let _: i64 = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }
}

#[async_trait]
impl crate::limits::credits::CreditStore for RedisStore {
    async fn credit(
        &self,
        key_id: &str,
        refill: Option<crate::limits::credits::RefillNow>,
        op: crate::limits::credits::Op,
    ) -> Result<(u64, bool), StoreError> {
        let (mode, n) = op.wire();
        let (period, amount) = refill.map_or((0, -1), |r| {
            (r.period, i64::try_from(r.amount).unwrap_or(i64::MAX))
        });
        let (ok, remaining): (u8, String) = self
            .credits
            .key(format!("{{kgcr:{key_id}}}"))
            .arg(mode)
            .arg(n)
            .arg(period)
            .arg(amount)
            .arg(crate::limits::credits::MAX_CREDITS)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let remaining = remaining
            .parse()
            .map_err(|_| corrupt(format!("credits script answered {remaining:?}")))?;
        Ok((remaining, ok == 1))
    }

    async fn forget(&self, key_id: &str) -> Result<(), StoreError> {
        let _: u64 = self
            .conn()
            .del(format!("{{kgcr:{key_id}}}"))
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }
}

#[async_trait]
impl crate::limits::abuse::AbuseStore for RedisStore {
    async fn record_failure(
        &self,
        subject: &str,
        window: Duration,
        max: u32,
        block_for: Duration,
    ) -> Result<crate::limits::abuse::Recorded, StoreError> {
        let (left, window_left): (u64, u64) = self
            .abuse
            .key(format!("{{kgab:{subject}}}:f"))
            .key(format!("{{kgab:{subject}}}:b"))
            .arg(window.as_millis().max(1) as u64)
            .arg(max)
            .arg(block_for.as_millis().max(1) as u64)
            .arg(subject)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(crate::limits::abuse::Recorded {
            blocked_for: Duration::from_millis(left),
            window_left: Duration::from_millis(window_left),
        })
    }
}

#[async_trait]
impl SigningKeyStore for RedisStore {
    async fn load_signing_keys(&self) -> Result<Option<Versioned>, StoreError> {
        let (version, body): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(SIGNING_KEYS)
            .arg("v")
            .arg("b")
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        match (version, body) {
            (Some(version), Some(body)) => Ok(Some(Versioned { version, body })),
            (None, None) => Ok(None),
            _ => Err(StoreError::Corrupt("signing keys: half a document".into())),
        }
    }

    async fn save_signing_keys(&self, doc: &Versioned) -> Result<(), StoreError> {
        let mut conn = self.admin_conn();
        let outcome: String = self
            .signing_keys
            .key(SIGNING_KEYS)
            .arg(doc.version)
            .arg(doc.body.as_slice())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if let Some(pool) = self.admin_durability() {
            pool.acknowledged(&mut conn, "signing keys").await?;
        }
        match outcome.as_str() {
            "ok" => Ok(()),
            "version_conflict" => Err(StoreError::VersionConflict),
            other => Err(StoreError::Corrupt(format!(
                "signing keys script answered {other:?}"
            ))),
        }
    }
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn write(
        &self,
        change: Write<'_>,
        audit: Option<&AuditEntry>,
    ) -> Result<bool, StoreError> {
        let mut inv = self.write.prepare_invoke();
        inv.key(ANCHOR);
        match change {
            Write::Insert(r) | Write::Update(r) => {
                let op = if matches!(change, Write::Insert(_)) {
                    "insert"
                } else {
                    "update"
                };
                // Usage is stored apart; the record's own counters are not written.
                let mut stored = r.clone();
                stored.total_requests = 0;
                stored.last_used_at = None;
                let json = serde_json::to_string(&stored).map_err(corrupt)?;
                inv.arg(op)
                    .arg(&r.id)
                    .arg(json)
                    .arg(&r.public_key)
                    .arg(&r.owner)
                    .arg(hashes_arg(r));
            }
            Write::Delete(id) => {
                inv.arg("delete").arg(id).arg("").arg("").arg("").arg("");
            }
        }
        match audit {
            Some(a) => {
                let json = serde_json::to_string(a).map_err(corrupt)?;
                inv.arg(json).arg(&a.id).arg(&a.key_id).arg(&a.owner);
            }
            None => {
                inv.arg("").arg("").arg("").arg("");
            }
        }
        // ARGV[11], ARGV[12]: the version written and whether it is revoked (compare-and-set).
        match change {
            Write::Insert(r) | Write::Update(r) => {
                inv.arg(r.version)
                    .arg(if r.revoked_at.is_some() { "1" } else { "0" });
            }
            Write::Delete(_) => {
                inv.arg(0).arg("0");
            }
        }
        let mut conn = self.admin_conn();
        let outcome: String = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if let Some(pool) = self.admin_durability() {
            pool.acknowledged(&mut conn, "key record").await?;
        }
        match outcome.as_str() {
            "ok" => Ok(true),
            "absent" => Ok(false),
            "conflict" => Err(StoreError::Conflict),
            "version_conflict" => Err(StoreError::VersionConflict),
            "revoked" => Err(StoreError::RevokedFinal),
            "not_found" => Err(StoreError::NotFound),
            other => Err(StoreError::Corrupt(format!(
                "write script answered {other:?}"
            ))),
        }
    }

    async fn list_audit(
        &self,
        key_id: Option<&str>,
        owner: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<AuditPage, StoreError> {
        let set = match (key_id, owner) {
            (Some(k), _) => format!("{{kg}}:ak:{k}"),
            (None, Some(o)) => format!("{{kg}}:ao:{o}"),
            (None, None) => "{kg}:aa".to_owned(),
        };
        let mut items = Vec::with_capacity(limit + 1);
        let mut cursor = cursor.map(str::to_owned);
        // With both filters, entries of other owners are skipped: keep reading pages.
        'pages: loop {
            let ids = self.page_ids(&set, cursor.as_deref(), limit).await?;
            let exhausted = ids.len() <= limit;
            for id in &ids {
                let json: Option<String> = self
                    .conn()
                    .get(format!("{{kg}}:a:{id}"))
                    .await
                    .map_err(|e| unavailable(&e))?;
                cursor = Some(id.clone());
                let Some(json) = json else { continue };
                let entry: AuditEntry = serde_json::from_str(&json).map_err(corrupt)?;
                if owner.is_some_and(|o| entry.owner != o) {
                    continue;
                }
                items.push(entry);
                if items.len() > limit {
                    break 'pages;
                }
            }
            if exhausted {
                break;
            }
        }
        let more = items.len() > limit;
        items.truncate(limit);
        let next_cursor = if more {
            items.last().map(|e| e.id.clone())
        } else {
            None
        };
        Ok(AuditPage { items, next_cursor })
    }

    async fn import_audit(&self, entry: &AuditEntry) -> Result<bool, StoreError> {
        let json = serde_json::to_string(entry).map_err(corrupt)?;
        let added: i64 = self
            .audit_import
            .key(ANCHOR)
            .arg(&entry.id)
            .arg(json)
            .arg(&entry.key_id)
            .arg(&entry.owner)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(added == 1)
    }

    async fn add_usage(&self, usage: &[(String, Usage)]) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        let mut inv = self.usage.prepare_invoke();
        inv.key(ANCHOR);
        for (id, u) in usage {
            let micros =
                i64::try_from(u.last_used_at.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX);
            inv.arg(id).arg(u.requests).arg(micros);
        }
        let _: String = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }

    async fn was_revoked(&self, public_key: &str) -> Result<bool, StoreError> {
        self.conn()
            .sismember(TOMBSTONES, public_key)
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn tombstones(&self) -> Result<Vec<String>, StoreError> {
        self.conn()
            .smembers(TOMBSTONES)
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn add_tombstone(&self, public_key: &str) -> Result<(), StoreError> {
        self.conn()
            .sadd::<_, _, ()>(TOMBSTONES, public_key)
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn secret_was_revoked(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        self.conn()
            .sismember(SECRET_TOMBSTONES, hex::encode(hash))
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn secret_tombstones(&self) -> Result<Vec<[u8; 32]>, StoreError> {
        let all: Vec<String> = self
            .conn()
            .smembers(SECRET_TOMBSTONES)
            .await
            .map_err(|e| unavailable(&e))?;
        all.iter()
            .map(|h| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(h, &mut out)
                    .map(|()| out)
                    .map_err(|e| StoreError::Corrupt(format!("secret tombstone: {e}")))
            })
            .collect()
    }

    async fn add_secret_tombstone(&self, hash: &[u8; 32]) -> Result<(), StoreError> {
        self.conn()
            .sadd::<_, _, ()>(SECRET_TOMBSTONES, hex::encode(hash))
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn get_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.lookup("id", id).await
    }

    async fn get_by_public_key(&self, public_key: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.lookup("index", &format!("pk:{public_key}")).await
    }

    async fn get_by_secret_hash(&self, hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        self.lookup("index", &format!("h:{}", hex::encode(hash)))
            .await
    }

    async fn list(
        &self,
        owner: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let set = owner.map_or_else(|| "{kg}:all".to_owned(), |o| format!("{{kg}}:o:{o}"));
        let mut ids = self.page_ids(&set, cursor, limit).await?;
        let more = ids.len() > limit;
        ids.truncate(limit);
        let mut items = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(r) = self.get_by_id(id).await? {
                items.push(r);
            }
        }
        let next_cursor = if more { ids.last().cloned() } else { None };
        Ok(Page { items, next_cursor })
    }

    async fn use_nonce(
        &self,
        key_id: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = format!("kg:n:{key_id}:{nonce}");
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        if let Some(pool) = &self.nonces {
            return pool.use_nonce(&key, ttl_ms).await;
        }
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(set.is_some())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn())
            .await
            .map(drop)
            .map_err(|e| unavailable(&e))
    }

    /// Every write is synchronous: nothing is pending.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn report_circuit(&self, open: prometheus::IntGauge, fast_failed: prometheus::IntCounter) {
        self.breaker.report_to(open, fast_failed);
    }

    fn watch(&self, sink: Arc<dyn ChangeSink>) {
        let Some(rt) = &self.runtime else { return };
        match &self.conn {
            Conn::Sentinel(c) => rt.spawn(c.clone().follow_changes(sink, deliver)),
            _ => rt.spawn(follow_changes(self.feed.clone(), sink)),
        };
    }
}

/// Subscribes to the change channel for as long as the store lives, reconnecting with
/// backoff. Each (re)subscription first drops the whole cache: while unsubscribed, any key
/// may have changed unseen.
async fn follow_changes(feed: Vec<redis::Client>, sink: Arc<dyn ChangeSink>) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_millis(100);
    for client in feed.iter().cycle() {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(CHANGES_CHANNEL).await {
                Ok(()) => {
                    sink.everything_may_have_changed();
                    backoff = Duration::from_millis(100);
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let payload: String = msg.get_payload().unwrap_or_default();
                        deliver(payload, Arc::clone(&sink)).await;
                    }
                    tracing::warn!("lost the Redis change feed; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to Redis changes"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot reach Redis for changes"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Hands one change-feed message to `sink`.
async fn deliver(payload: String, sink: Arc<dyn ChangeSink>) {
    let change = parse_change(&payload);
    for (subject, for_) in &change.blocks {
        sink.blocked(subject, *for_);
    }
    // A block announcement alone changes no key: the cache is left alone.
    let blocks_only =
        !change.blocks.is_empty() && change.public_keys.is_empty() && change.hashes.is_empty();
    if !blocks_only {
        sink.changed(&change.public_keys, &change.hashes).await;
    }
    if let Some(at) = change.written_at_micros {
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
        let lag_us = u64::try_from(now - i128::from(at)).unwrap_or(0);
        sink.delivered_after(Duration::from_micros(lag_us));
    }
}

/// One message of the change feed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Change {
    public_keys: Vec<String>,
    hashes: Vec<[u8; 32]>,
    /// When Redis applied the write (its clock, Unix µs).
    written_at_micros: Option<i64>,
    /// Addresses blocked by `[abuse]` (their subject text), and for how long.
    blocks: Vec<(String, Duration)>,
}

/// `pk:<public key>`, `h:<sha256 hex>`, `t:<Unix µs>` and `b:<abuse subject>:<ms>` tokens,
/// space-separated; others (from a newer keygate) are skipped. A subject may hold colons
/// (IPv6): the duration is after the last one.
fn parse_change(payload: &str) -> Change {
    let mut change = Change::default();
    for token in payload.split_whitespace() {
        if let Some(pk) = token.strip_prefix("pk:") {
            change.public_keys.push(pk.to_owned());
        } else if let Some(h) = token.strip_prefix("h:") {
            let mut out = [0u8; 32];
            if hex::decode_to_slice(h, &mut out).is_ok() {
                change.hashes.push(out);
            }
        } else if let Some(t) = token.strip_prefix("t:") {
            change.written_at_micros = t.parse().ok();
        } else if let Some(b) = token.strip_prefix("b:") {
            if let Some((subject, ms)) = b.rsplit_once(':') {
                if let Ok(ms) = ms.parse() {
                    change
                        .blocks
                        .push((subject.to_owned(), Duration::from_millis(ms)));
                }
            }
        }
    }
    change
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_message_names_keys_hashes_and_when_it_was_written() {
        let h = "ab".repeat(32);
        let got = parse_change(&format!(
            "t:1764700000123456 pk:pk_test_a h:{h} x:future h:zz"
        ));
        assert_eq!(
            got,
            Change {
                public_keys: vec!["pk_test_a".into()],
                hashes: vec![[0xab; 32]],
                written_at_micros: Some(1_764_700_000_123_456),
                blocks: Vec::new(),
            }
        );
        // Messages of an older keygate carry no time.
        assert_eq!(parse_change("pk:pk_test_b").written_at_micros, None);
        // Abuse blocks: an IPv6 subject keeps its colons; a mangled duration is skipped.
        assert_eq!(
            parse_change("b:203.0.113.7:60000 b:2001:db8:1:2::/64:1500 b:10.0.0.1:x b:junk").blocks,
            [
                ("203.0.113.7".to_owned(), Duration::from_millis(60_000)),
                ("2001:db8:1:2::/64".to_owned(), Duration::from_millis(1_500)),
            ]
        );
    }
}
