//! Spin's HTTP routing: exact routes beat wildcards, the longest wildcard prefix wins, and
//! private routes are never matched from outside.

use crate::manifest::{normalise_route, Route};

#[derive(Debug, Clone)]
struct Entry {
    /// The route as written in spin.toml (`spin-raw-component-route`).
    raw: String,
    /// For `/a/...`, `/a`; for `/...`, the empty string; for an exact route, the route itself.
    prefix: String,
    wildcard: bool,
    component: String,
}

#[derive(Debug, Clone, Default)]
pub struct Router {
    entries: Vec<Entry>,
}

/// The result of routing one request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    pub component: String,
    pub raw_route: String,
    /// `spin-component-route`: the route without its trailing `/...`.
    pub component_route: String,
    /// `spin-path-info`: what the wildcard matched (empty for exact routes).
    pub path_info: String,
}

impl Router {
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a Route, &'a str)>) -> Self {
        let mut entries = Vec::new();
        for (route, component) in routes {
            let Route::Public(raw) = route else { continue };
            let norm = normalise_route(raw);
            let (prefix, wildcard) = match norm.strip_suffix("/...") {
                Some(p) => (p.to_string(), true),
                None => (norm.clone(), false),
            };
            entries.push(Entry { raw: raw.clone(), prefix, wildcard, component: component.to_string() });
        }
        Router { entries }
    }

    pub fn route(&self, path: &str) -> Option<RouteMatch> {
        let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
        let path = if path.is_empty() { "/" } else { path };
        if let Some(e) = self.entries.iter().find(|e| !e.wildcard && e.prefix == path) {
            return Some(self.matched(e, String::new()));
        }
        self.entries
            .iter()
            .filter(|e| {
                e.wildcard && (path == e.prefix || e.prefix.is_empty() || path.starts_with(&format!("{}/", e.prefix)))
            })
            .max_by_key(|e| e.prefix.len())
            .map(|e| {
                let info = path.strip_prefix(e.prefix.as_str()).unwrap_or("");
                let info = if info == "/" && e.prefix.is_empty() && path == "/" { "/" } else { info };
                self.matched(e, info.to_string())
            })
    }

    fn matched(&self, e: &Entry, path_info: String) -> RouteMatch {
        RouteMatch {
            component: e.component.clone(),
            raw_route: e.raw.clone(),
            component_route: e.prefix.clone(),
            path_info,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let routes = [
            (Route::Public("/...".into()), "fallback"),
            (Route::Public("/api/...".into()), "api"),
            (Route::Public("/api/users/...".into()), "users"),
            (Route::Public("/api/users/me".into()), "me"),
            (Route::Private, "hidden"),
        ];
        Router::new(routes.iter().map(|(r, c)| (r, *c)))
    }

    #[test]
    fn exact_beats_wildcard_and_longest_prefix_wins() {
        let r = router();
        assert_eq!(r.route("/api/users/me").unwrap().component, "me");
        assert_eq!(r.route("/api/users/42").unwrap().component, "users");
        assert_eq!(r.route("/api/other").unwrap().component, "api");
        assert_eq!(r.route("/elsewhere").unwrap().component, "fallback");
    }

    #[test]
    fn wildcard_matches_on_segment_boundaries() {
        let r = router();
        assert_eq!(r.route("/apix").unwrap().component, "fallback");
        assert_eq!(r.route("/api").unwrap().component, "api");
    }

    #[test]
    fn path_info_and_component_route() {
        let m = router().route("/api/users/42/photos").unwrap();
        assert_eq!(m.path_info, "/42/photos");
        assert_eq!(m.component_route, "/api/users");
        assert_eq!(m.raw_route, "/api/users/...");
        let exact = router().route("/api/users/me").unwrap();
        assert_eq!(exact.path_info, "");
    }

    #[test]
    fn private_routes_are_not_routable() {
        let routes = [(Route::Private, "hidden")];
        let r = Router::new(routes.iter().map(|(r, c)| (r, *c)));
        assert!(r.route("/").is_none());
    }
}
