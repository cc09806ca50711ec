//! Route matching: first route in config order whose path pattern and method list match.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use crate::config::{PathPattern, Route};

/// The configured routes, indexed by path so that matching costs a few hash lookups (one per
/// `/` in the path) however many routes there are, with the first-match-in-config-order rule
/// of a plain scan.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
    /// Exact path → indices of its routes, ascending.
    exact: HashMap<String, Vec<usize>, RandomState>,
    /// Prefix (always ending in `/`) → indices of its routes, ascending.
    prefix: HashMap<String, Vec<usize>, RandomState>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        let mut exact: HashMap<String, Vec<usize>, RandomState> = HashMap::default();
        let mut prefix: HashMap<String, Vec<usize>, RandomState> = HashMap::default();
        for (i, r) in routes.iter().enumerate() {
            match &r.path {
                PathPattern::Exact(p) => exact.entry(p.clone()).or_default().push(i),
                PathPattern::Prefix(p) => prefix.entry(p.clone()).or_default().push(i),
            }
        }
        Self {
            routes,
            exact,
            prefix,
        }
    }

    /// The index of the first route matching `method` and `path` (path without query).
    pub fn find(&self, method: &http::Method, path: &str) -> Option<usize> {
        let first = |candidates: Option<&Vec<usize>>| {
            candidates?.iter().copied().find(|&i| {
                let methods = &self.routes[i].methods;
                methods.is_empty() || methods.contains(method)
            })
        };
        let mut best = first(self.exact.get(path));
        // Every prefix pattern a path can match ends at one of its slashes, short of its end.
        for (at, _) in path.match_indices('/') {
            if at + 1 < path.len() {
                if let Some(i) = first(self.prefix.get(&path[..=at])) {
                    best = Some(best.map_or(i, |b| b.min(i)));
                }
            }
        }
        best
    }

    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn first_match_wins_and_methods_filter() {
        let cfg = Config::from_toml(
            r#"
[[upstreams]]
name = "u"
endpoints = ["127.0.0.1:1"]

[[routes]]
path = "/v1/payments"
methods = ["POST"]
upstream = "u"

[[routes]]
path = "/v1/payments/*"
methods = ["GET", "delete"]
upstream = "u"

[[routes]]
path = "/v1/*"
upstream = "u"
"#,
        )
        .unwrap();
        let r = Router::new(cfg.routes);
        assert_eq!(r.find(&http::Method::POST, "/v1/payments"), Some(0));
        assert_eq!(r.find(&http::Method::GET, "/v1/payments"), Some(2));
        assert_eq!(r.find(&http::Method::GET, "/v1/payments/p1"), Some(1));
        assert_eq!(r.find(&http::Method::DELETE, "/v1/payments/p1"), Some(1));
        assert_eq!(r.find(&http::Method::PUT, "/v1/payments/p1"), Some(2));
        assert_eq!(r.find(&http::Method::GET, "/v2/x"), None);
        assert_eq!(r.find(&http::Method::GET, "/v1"), None);
    }

    /// The index answers what a scan in config order answers, on overlapping patterns.
    #[test]
    fn the_index_agrees_with_a_scan() {
        let patterns = [
            "/*", "/a/*", "/a", "/a/b", "/a/b/*", "/a/b/c", "/a/*", "/b/*", "/a/b/c/*", "/",
        ];
        let mut toml = String::from("[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n");
        for (i, p) in patterns.iter().enumerate() {
            let methods = if i % 3 == 0 { "[\"GET\"]" } else { "[]" };
            toml.push_str(&format!(
                "[[routes]]\npath = \"{p}\"\nmethods = {methods}\nupstream = \"u\"\n"
            ));
        }
        let cfg = Config::from_toml(&toml).unwrap();
        let scan = |m: &http::Method, path: &str| {
            cfg.routes.iter().position(|r| {
                r.path.matches(path) && (r.methods.is_empty() || r.methods.contains(m))
            })
        };
        let r = Router::new(cfg.routes.clone());
        for path in [
            "/", "/a", "/a/", "/a/b", "/a/b/", "/a/b/c", "/a/b/c/", "/a/b/c/d", "/b", "/b/x", "/c",
            "/a//b", "//", "/a/bc",
        ] {
            for m in [http::Method::GET, http::Method::POST] {
                assert_eq!(r.find(&m, path), scan(&m, path), "{m} {path}");
            }
        }
    }
}
