//! `allowed_outbound_hosts`: Spin's syntax and matching, for HTTP, Redis and PostgreSQL.
//!
//! A rule is `scheme://host[:port]`: scheme may be `*`; host may be `*`, `*.suffix`, a name or an
//! IP; port may be a number, a range `a..b`, or `*`, and defaults to the scheme's well-known
//! port. `http://*.spin.internal` and `http://<component>.spin.internal` allow local service
//! chaining. Templates are expanded before parsing.

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Port {
    Any,
    Range(u16, u16),
    /// No port given: the default port of the scheme being used.
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    scheme: Option<String>,
    host: String,
    port: Port,
}

#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    rules: Vec<Rule>,
}

/// The well-known port of a scheme, as Spin assumes when a rule or URL names none.
pub fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        "redis" => Some(6379),
        "rediss" => Some(6379),
        "postgres" | "postgresql" => Some(5432),
        "mysql" => Some(3306),
        "mqtt" => Some(1883),
        _ => None,
    }
}

impl AllowedHosts {
    pub fn parse(rules: &[String]) -> Result<Self> {
        let rules = rules
            .iter()
            .map(|r| parse_rule(r).with_context(|| format!("invalid allowed_outbound_hosts entry '{r}'")))
            .collect::<Result<_>>()?;
        Ok(AllowedHosts { rules })
    }

    /// Whether a connection to `scheme://host:port` is allowed.
    pub fn allows(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = port.or_else(|| default_port(scheme));
        self.rules.iter().any(|rule| {
            let scheme_ok = rule.scheme.as_deref().is_none_or(|s| s == scheme);
            let host_ok = if rule.host == "*" {
                true
            } else if let Some(suffix) = rule.host.strip_prefix("*.") {
                host.ends_with(&format!(".{suffix}"))
            } else {
                rule.host == host
            };
            // Service chaining ignores ports: the call never leaves the process.
            let port_ok = host.ends_with(".spin.internal")
                || match (&rule.port, port) {
                    (Port::Any, _) => true,
                    (Port::Range(lo, hi), Some(p)) => (*lo..=*hi).contains(&p),
                    (Port::Default, Some(p)) => Some(p) == default_port(scheme),
                    (_, None) => false,
                };
            scheme_ok && host_ok && port_ok
        })
    }

    /// Whether a URL such as `redis://host:6379/0` is allowed.
    pub fn allows_url(&self, url: &str) -> bool {
        match url::Url::parse(url) {
            Ok(u) => match u.host_str() {
                Some(h) => self.allows(u.scheme(), h, u.port()),
                None => false,
            },
            Err(_) => false,
        }
    }
}

fn parse_rule(rule: &str) -> Result<Rule> {
    let (scheme, rest) = rule.split_once("://").context("expected scheme://host[:port]")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        bail!("paths are not allowed");
    }
    let scheme = match scheme {
        "*" => None,
        s if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-') => {
            Some(s.to_string())
        }
        _ => bail!("invalid scheme '{scheme}'"),
    };
    let (host, port) = if let Some(stripped) = rest.strip_prefix('[') {
        let (h, after) = stripped.split_once(']').context("unclosed '['")?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        bail!("missing host");
    }
    if host == "self" {
        bail!("devhost does not support the 'self' host; use http://<component>.spin.internal");
    }
    let port = match port {
        None => {
            if scheme.is_none() {
                Port::Any
            } else {
                Port::Default
            }
        }
        Some("*") => Port::Any,
        Some(p) => match p.split_once("..") {
            Some((lo, hi)) => Port::Range(lo.parse().context("bad port")?, hi.parse().context("bad port")?),
            None => {
                let n: u16 = p.parse().with_context(|| format!("bad port '{p}'"))?;
                Port::Range(n, n)
            }
        },
    };
    Ok(Rule { scheme, host: host.to_ascii_lowercase(), port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(rules: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(&rules.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_host_uses_the_default_port() {
        let h = hosts(&["https://graph.facebook.com"]);
        assert!(h.allows_url("https://graph.facebook.com/v21.0/1/messages"));
        assert!(!h.allows_url("https://graph.facebook.com:8443/x"));
        assert!(!h.allows_url("http://graph.facebook.com/x"));
        assert!(!h.allows_url("https://evil.com/x"));
    }

    #[test]
    fn ports_ranges_and_wildcards() {
        let h = hosts(&["http://127.0.0.1:*", "redis://localhost:6000..6010", "*://*.example.com:443"]);
        assert!(h.allows_url("http://127.0.0.1:12345/"));
        assert!(h.allows_url("redis://localhost:6005"));
        assert!(!h.allows_url("redis://localhost:6379"));
        assert!(h.allows_url("https://api.example.com/"));
        assert!(!h.allows_url("https://example.com/"));
    }

    #[test]
    fn service_chaining_hosts() {
        let all = hosts(&["http://*.spin.internal"]);
        assert!(all.allows_url("http://backend.spin.internal/x"));
        let one = hosts(&["http://backend.spin.internal"]);
        assert!(one.allows_url("http://backend.spin.internal/x"));
        assert!(!one.allows_url("http://other.spin.internal/x"));
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        assert!(!hosts(&[]).allows_url("http://127.0.0.1/"));
    }

    #[test]
    fn invalid_rules_are_rejected() {
        for bad in ["graph.facebook.com", "https://h/path", "https://h:notaport", "http://self"] {
            assert!(AllowedHosts::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
