//! Secrets: read from where the config says, and kept out of logs, payloads and error messages.

use std::path::PathBuf;

/// A secret given in the config as a value, or by the environment variable or the file (its
/// first line) it names.
pub fn resolve(
    value: &Option<String>,
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, String> {
    if let Some(var) = env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| format!("environment variable {var} is not set"));
    }
    if let Some(file) = file {
        return std::fs::read_to_string(file)
            .map(|t| Some(t.lines().next().unwrap_or("").to_string()))
            .map_err(|e| format!("cannot read {}: {e}", file.display()));
    }
    Ok(value.clone())
}

/// Replaces the password (and user) of a URL with `***`, e.g. for logging.
/// `rtsp://admin:hunter2@cam/stream` becomes `rtsp://***@cam/stream`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..scheme_end + 3], &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The password in a URL's user information (`rtsp://user:password@host/...`), if any.
pub fn rtsp_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// Removes every occurrence of each secret from a message (GStreamer errors may quote a URL).
pub fn scrub(message: &str, secrets: &[&str]) -> String {
    let mut out = message.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "***");
    }
    out
}

/// Checks that a camera URL is an RTSP URL that vigil can hand to rtspsrc as one opaque value.
pub fn check_rtsp_url(url: &str) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    if !(lower.starts_with("rtsp://")
        || lower.starts_with("rtsps://")
        || lower.starts_with("rtspt://"))
    {
        return Err(format!("{:?} is not an rtsp:// URL", redact_url(url)));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters (percent-encode them)".into());
    }
    let host_part = &url[url.find("://").map(|i| i + 3).unwrap_or(0)..];
    let authority = host_part.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() {
        return Err("has no host".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_hidden() {
        assert_eq!(
            redact_url("rtsp://admin:hunter2@10.0.0.5:554/live?x=1"),
            "rtsp://***@10.0.0.5:554/live?x=1"
        );
        assert_eq!(redact_url("rtsp://cam/live"), "rtsp://cam/live");
        // An '@' in the path is not a credential.
        assert_eq!(redact_url("rtsp://cam/a@b"), "rtsp://cam/a@b");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn secrets_are_scrubbed_from_messages() {
        assert_eq!(
            scrub("could not open rtsp://u:pw@h/x: pw rejected", &["pw", ""]),
            "could not open rtsp://u:***@h/x: *** rejected"
        );
    }

    #[test]
    fn only_rtsp_urls_with_a_host_pass() {
        assert!(check_rtsp_url("rtsp://cam:554/stream").is_ok());
        assert!(check_rtsp_url("http://cam/stream").is_err());
        assert!(check_rtsp_url("rtsp:///stream").is_err());
        assert!(check_rtsp_url("rtsp://cam/x ! filesink location=/tmp/x").is_err());
        let e = check_rtsp_url("file://u:secret@h/").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
