//! `[http]`: the HTTP server's section, and the host names it answers to (`allowed_hosts`,
//! parsed here so that `check-config` and the server read them the same way).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The HTTP server: health, metrics, the API, snapshots and the predict endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Address and port to listen on. The default only accepts local clients.
    pub listen: String,
    /// Bearer token required on every endpoint but `/healthz` and `/readyz`.
    pub token: Option<String>,
    /// Read the token from this environment variable instead.
    pub token_env: Option<String>,
    /// Read the token from this file instead (its first line).
    pub token_file: Option<PathBuf>,
    /// Serve a listen address other than loopback without a token (refused otherwise).
    pub allow_unauthenticated: bool,
    /// The `Host` names (and origins) the server answers to; unset: the listen address,
    /// localhost, 127.0.0.1 and [::1] (and any IP address when listening on all of them).
    pub allowed_hosts: Option<Vec<String>>,
    /// Time a client has to send a request's head: from connecting (TLS handshake included),
    /// or from the first byte of its next request on a kept-alive connection.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most connections open at once; those beyond are refused.
    pub max_connections: usize,
    /// Most predict requests in progress at once (503 beyond).
    pub max_concurrent_predicts: usize,
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
    /// Largest image accepted by the predict endpoint, in pixels (width x height), checked from
    /// the image's header before it is decoded.
    pub max_image_pixels: u64,
    /// Predict requests per second allowed to each client address (and the burst above it).
    pub predict_rate: u32,
    pub predict_burst: u32,
    /// How long a predict request may wait for its result.
    #[serde(with = "humantime_serde")]
    pub predict_timeout: Duration,
    /// Events kept in memory for `/api/events`.
    pub events_kept: usize,
    /// The server's address as clients reach it (e.g. "https://nvr.local:8080"), for the
    /// snapshot URLs in event payloads. Unset: the URLs are paths ("/api/events/...").
    pub public_url: Option<String>,
    pub tls: Option<HttpTlsConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            token: None,
            token_env: None,
            token_file: None,
            allow_unauthenticated: false,
            allowed_hosts: None,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(20),
            max_connections: 256,
            max_concurrent_predicts: 4,
            max_body_bytes: 16 << 20,
            max_image_pixels: 40_000_000,
            predict_rate: 10,
            predict_burst: 20,
            predict_timeout: Duration::from_secs(10),
            events_kept: 1000,
            public_url: None,
            tls: None,
        }
    }
}

impl HttpConfig {
    /// The bearer token, from the config, the environment variable or the file it names.
    pub fn resolved_token(&self) -> Result<Option<String>, String> {
        Ok(
            crate::secrets::resolve(&self.token, &self.token_env, &self.token_file)?
                .map(|t| t.trim().to_string()),
        )
    }

    /// Whether a token is configured (any of its three keys).
    pub fn has_token(&self) -> bool {
        self.token.is_some() || self.token_env.is_some() || self.token_file.is_some()
    }

    /// Whether `listen` is reachable from other machines while there is no token (`has_token`)
    /// and no `allow_unauthenticated`: the problem to report, naming the keys.
    pub fn unauthenticated_network_listen(&self, has_token: bool) -> Option<String> {
        let addr: SocketAddr = self.listen.parse().ok()?;
        if addr.ip().is_loopback() || has_token || self.allow_unauthenticated {
            return None;
        }
        Some(format!(
            "{:?} accepts clients from other machines and no token is set: set http.token \
             (or token_env / token_file), or http.allow_unauthenticated = true to serve them \
             without one",
            self.listen
        ))
    }
}

/// HTTPS for the HTTP server.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// PEM certificate chain and private key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A host as a `Host` header, an origin or an `allowed_hosts` entry names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostName {
    Ip(IpAddr),
    /// Lower case, without a trailing dot.
    Name(String),
}

/// One `allowed_hosts` entry: a host, and the port it must come with (any when unset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    pub host: HostName,
    pub port: Option<u16>,
}

/// Parses `host`, `host:port`, `1.2.3.4[:port]` or `[::1][:port]` (an authority without user
/// info).
pub fn parse_authority(text: &str) -> Result<HostPattern, String> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: an IPv6 address needs its closing ']'"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{text:?}: expected ':<port>' after ']'"))?,
            ),
        };
        let ip: std::net::Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{text:?}: {ip:?} is not an IPv6 address"))?;
        (HostName::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        };
        (host_name(text, host)?, port)
    };
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{text:?}: {p:?} is not a port"))
        })
        .transpose()?;
    Ok(HostPattern { host, port })
}

/// A name or an IPv4 address: letters, digits, '-', '_' and '.' only.
fn host_name(text: &str, host: &str) -> Result<HostName, String> {
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Ok(HostName::Ip(IpAddr::V4(ip)));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(HostName::Name(name))
    } else {
        Err(format!(
            "{text:?} is not a host name or address (e.g. \"nvr.local\" or \"nvr.local:8080\")"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str, port: Option<u16>) -> HostPattern {
        HostPattern {
            host: HostName::Name(n.into()),
            port,
        }
    }

    #[test]
    fn authorities_parse_with_and_without_ports() {
        assert_eq!(
            parse_authority("NVR.local.").unwrap(),
            name("nvr.local", None)
        );
        assert_eq!(
            parse_authority("nvr.local:8080").unwrap(),
            name("nvr.local", Some(8080))
        );
        assert_eq!(
            parse_authority("[::1]:80").unwrap(),
            HostPattern {
                host: HostName::Ip("::1".parse().unwrap()),
                port: Some(80)
            }
        );
        assert_eq!(
            parse_authority("[0:0::1]").unwrap().host,
            HostName::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            parse_authority("10.0.0.5:1").unwrap().host,
            HostName::Ip("10.0.0.5".parse().unwrap())
        );
        for bad in [
            "", ":80", "a b", "http://x", "x/y", "x:0", "x:99999", "x:", "[::1", "[zz]", "[::1]x",
            "a:b:c",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_network_listen_without_token_or_opt_in_is_a_problem() {
        let with = |listen: &str, edit: fn(&mut HttpConfig)| {
            let mut c = HttpConfig {
                listen: listen.into(),
                ..HttpConfig::default()
            };
            edit(&mut c);
            c.unauthenticated_network_listen(c.has_token())
        };
        let problem = with("0.0.0.0:8080", |_| {}).unwrap();
        assert!(problem.contains("http.token"), "{problem}");
        assert!(problem.contains("http.allow_unauthenticated"), "{problem}");
        assert!(with("[::]:8080", |_| {}).is_some());
        assert!(with("192.168.1.5:8080", |_| {}).is_some());
        assert!(with("127.0.0.1:8080", |_| {}).is_none());
        assert!(with("[::1]:8080", |_| {}).is_none());
        assert!(with("0.0.0.0:8080", |c| c.token = Some("t".into())).is_none());
        assert!(with("0.0.0.0:8080", |c| c.token_env = Some("T".into())).is_none());
        assert!(with("0.0.0.0:8080", |c| c.allow_unauthenticated = true).is_none());
    }
}
