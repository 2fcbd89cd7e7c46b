//! Which `Host` and `Origin` the server answers to. A web page that points its own name at
//! vigil's address (DNS rebinding) sends that name as `Host`: refused (421). A page elsewhere
//! that makes the browser post to vigil sends its `Origin`: a state-changing request from an
//! origin that is not one of vigil's names is refused (403).
//!
//! The names are `http.allowed_hosts`, or by default: localhost, 127.0.0.1, [::1], the listen
//! address, the host of `http.public_url`, and any IP address when vigil listens on all of
//! them. A rebinding page can only send a name it owns, never one of these, so their port is not
//! compared (a reverse proxy on another port keeps working).

use std::net::{IpAddr, SocketAddr};

use axum::extract::Request;
use axum::http::Method;
use axum::http::header::{HOST, ORIGIN};

use crate::config::{HostName, HostPattern, HttpConfig, parse_authority};
use crate::ops::api::ApiError;

#[derive(Debug, Clone)]
pub(super) struct AllowedHosts {
    /// `"*"`: no check.
    any: bool,
    /// Listening on every address: any IP address is one of ours.
    any_ip: bool,
    patterns: Vec<HostPattern>,
    /// The port a `Host` without one means: 80, or 443 with TLS.
    default_port: u16,
}

impl AllowedHosts {
    /// The names of a server configured by `config` and listening on `local`.
    pub fn new(config: &HttpConfig, local: SocketAddr) -> Result<AllowedHosts, String> {
        let default_port = if config.tls.is_some() { 443 } else { 80 };
        let any_port = |host| HostPattern { host, port: None };
        let mut hosts = AllowedHosts {
            any: false,
            any_ip: false,
            patterns: Vec::new(),
            default_port,
        };
        let Some(entries) = &config.allowed_hosts else {
            hosts.any_ip = local.ip().is_unspecified();
            hosts.patterns = vec![
                any_port(HostName::Name("localhost".into())),
                any_port(HostName::Ip(IpAddr::from([127, 0, 0, 1]))),
                any_port(HostName::Ip(std::net::Ipv6Addr::LOCALHOST.into())),
                any_port(HostName::Ip(local.ip())),
            ];
            // The name clients use for snapshot URLs (when it has one).
            let public = config.public_url.as_deref().and_then(public_url_authority);
            if let Some(p) = public.and_then(|a| parse_authority(a).ok()) {
                hosts.patterns.push(any_port(p.host));
            }
            return Ok(hosts);
        };
        for (i, entry) in entries.iter().enumerate() {
            if entry.trim() == "*" {
                hosts.any = true;
            } else {
                let pattern =
                    parse_authority(entry).map_err(|e| format!("http.allowed_hosts[{i}]: {e}"))?;
                hosts.patterns.push(pattern);
            }
        }
        Ok(hosts)
    }

    /// Whether `authority` (`host[:port]`) is one of ours; a missing port is `default_port`.
    fn allows(&self, authority: &str, default_port: u16) -> bool {
        if self.any {
            return true;
        }
        let Ok(given) = parse_authority(authority) else {
            return false;
        };
        if self.any_ip && matches!(given.host, HostName::Ip(_)) {
            return true;
        }
        let port = given.port.unwrap_or(default_port);
        self.patterns
            .iter()
            .any(|p| p.host == given.host && p.port.is_none_or(|want| want == port))
    }

    /// Refuses a request whose `Host` is not ours (421), or a state-changing one whose
    /// `Origin` is not ours (403). Requests without these headers are not from browsers.
    pub fn check(&self, req: &Request) -> Result<(), ApiError> {
        let host = match req.headers().get(HOST) {
            Some(h) => Some(h.to_str().unwrap_or("(not text)")),
            None => req.uri().authority().map(|a| a.as_str()),
        };
        if let Some(host) = host
            && !self.allows(host, self.default_port)
        {
            return Err(ApiError::new(
                421,
                "host_not_allowed",
                format!(
                    "Host {host:?} is not a name of this server; if clients reach vigil by it, \
                     add it to http.allowed_hosts"
                ),
            ));
        }
        let method = req.method();
        let safe = [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(method);
        let Some(origin) = req.headers().get(ORIGIN).filter(|_| !safe) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("(not text)");
        match origin_authority(origin) {
            Some((authority, port)) if self.allows(authority, port) => Ok(()),
            _ => Err(ApiError::new(
                403,
                "origin_not_allowed",
                format!(
                    "{method} from the web page of origin {origin:?} is refused: it is not one \
                     of this server's names (http.allowed_hosts)"
                ),
            )),
        }
    }
}

/// `https://nvr.local:8080/x` → `nvr.local:8080`.
fn public_url_authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    (!authority.is_empty()).then_some(authority)
}

/// An `Origin` (`http://host[:port]`): its authority and the port its scheme implies.
fn origin_authority(origin: &str) -> Option<(&str, u16)> {
    let (scheme, authority) = origin.split_once("://")?;
    let port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    (!authority.is_empty() && !authority.contains('/')).then_some((authority, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(listen: &str, edit: impl FnOnce(&mut HttpConfig)) -> AllowedHosts {
        let mut config = HttpConfig {
            listen: listen.into(),
            ..HttpConfig::default()
        };
        edit(&mut config);
        AllowedHosts::new(&config, listen.parse().unwrap()).unwrap()
    }

    fn request(method: &str, host: Option<&str>, origin: Option<&str>) -> Request {
        let mut r = axum::http::Request::builder()
            .method(method)
            .uri("/api/reload");
        if let Some(h) = host {
            r = r.header("host", h);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.body(axum::body::Body::empty()).unwrap()
    }

    fn status(h: &AllowedHosts, method: &str, host: Option<&str>, origin: Option<&str>) -> u16 {
        h.check(&request(method, host, origin))
            .map_or_else(|e| e.status, |()| 200)
    }

    #[test]
    fn the_default_names_are_local_ones_and_the_listen_address() {
        let h = hosts("192.168.1.5:8080", |_| {});
        for ok in [
            "localhost:8080",
            "LOCALHOST",
            "127.0.0.1:8080",
            "[::1]:8080",
            "192.168.1.5:8080",
            "192.168.1.5",
        ] {
            assert_eq!(status(&h, "GET", Some(ok), None), 200, "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "",
            "a b",
        ] {
            let e = h.check(&request("GET", Some(bad), None)).unwrap_err();
            assert_eq!((e.status, e.code), (421, "host_not_allowed"), "{bad}");
            assert!(e.message.contains("http.allowed_hosts"), "{}", e.message);
        }
        assert_eq!(status(&h, "GET", None, None), 200, "no Host: not a browser");
    }

    #[test]
    fn listening_on_every_address_allows_any_ip_but_no_other_name() {
        let h = hosts("0.0.0.0:8080", |c| {
            c.public_url = Some("https://nvr.local:8443/vigil".into())
        });
        assert_eq!(status(&h, "GET", Some("10.0.0.1:8080"), None), 200);
        assert_eq!(status(&h, "GET", Some("[fe80::1]:8080"), None), 200);
        assert_eq!(status(&h, "GET", Some("nvr.local:8443"), None), 200);
        assert_eq!(status(&h, "GET", Some("evil.example:8080"), None), 421);
    }

    #[test]
    fn an_explicit_list_replaces_the_defaults() {
        let h = hosts("127.0.0.1:8080", |c| {
            c.allowed_hosts = Some(vec!["nvr.local:8080".into(), "cam-box".into()])
        });
        assert_eq!(status(&h, "GET", Some("nvr.local:8080"), None), 200);
        assert_eq!(status(&h, "GET", Some("nvr.local"), None), 421, "port 80");
        assert_eq!(status(&h, "GET", Some("cam-box:1234"), None), 200);
        assert_eq!(status(&h, "GET", Some("localhost:8080"), None), 421);
        let any = hosts("127.0.0.1:8080", |c| {
            c.allowed_hosts = Some(vec!["*".into()])
        });
        assert_eq!(status(&any, "GET", Some("evil.example"), None), 200);
        assert_eq!(
            status(&any, "POST", Some("x"), Some("http://evil.example")),
            200
        );
    }

    #[test]
    fn a_foreign_origin_may_not_post() {
        let h = hosts("127.0.0.1:8080", |_| {});
        let local = Some("127.0.0.1:8080");
        assert_eq!(
            status(&h, "POST", local, None),
            200,
            "no Origin: no browser"
        );
        assert_eq!(
            status(&h, "POST", local, Some("http://localhost:8080")),
            200
        );
        assert_eq!(
            status(&h, "GET", local, Some("http://evil.example")),
            200,
            "reads are the Host check's"
        );
        for bad in [
            "http://evil.example",
            "https://evil.example:8080",
            "null",
            "file://",
            "http://127.0.0.1.evil.example",
        ] {
            let e = h.check(&request("POST", local, Some(bad))).unwrap_err();
            assert_eq!((e.status, e.code), (403, "origin_not_allowed"), "{bad}");
            assert!(e.message.contains(bad), "{}", e.message);
        }
        assert_eq!(
            status(&h, "DELETE", local, Some("http://evil.example")),
            403
        );
    }

    #[test]
    fn public_url_authority_takes_the_host_part() {
        assert_eq!(
            public_url_authority("https://u:p@nvr.local:8080/x?y"),
            Some("nvr.local:8080")
        );
        assert_eq!(public_url_authority("nvr.local"), Some("nvr.local"));
        assert_eq!(public_url_authority("https:///x"), None);
    }
}
