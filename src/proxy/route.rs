//! Route matching: first route in config order whose path pattern and method list match.

use crate::config::Route;

/// The configured routes, in the order they are tried.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    /// The index of the first route matching `method` and `path` (path without query).
    pub fn find(&self, method: &http::Method, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| {
            r.path.matches(path) && (r.methods.is_empty() || r.methods.contains(method))
        })
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
}
