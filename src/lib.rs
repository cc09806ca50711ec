//! keygate: an authenticating reverse proxy for payment APIs.
//!
//! A request flows `proxy` (pingora adapter: route, bound and read the body) →
//! `auth` (pure checks in SPEC §3.4 order) with keys from `cache` (moka) over a
//! `keys::KeyStore` (embedded redb now) → forwarded upstream with the caller's identity, or
//! refused with a `problem` (problem+json). `lifecycle` owns every change to keys and who may
//! make it; `admin` (axum, its own listener) and self-service on the proxy are adapters over
//! it. `metrics` is scraped on a third listener. `config` turns the TOML file into a typed
//! runtime config; `server` wires it all into one pingora `Server`; `usage` counts requests per
//! key; `cli` holds `demo`, `sign` and `keys`.

pub mod admin;
pub mod assertion;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod maintenance;
pub mod metrics;
pub mod otlp;
pub mod problem;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod sizing;
pub mod usage;

pub use config::Config;
pub use server::App;
