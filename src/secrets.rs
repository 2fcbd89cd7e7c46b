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

/// Replaces the user information (user and password) of a URL with `***`, e.g. for logging.
/// `rtsp://admin:hunter2@cam/stream` becomes `rtsp://***@cam/stream`. Everything up to the last
/// `@` goes, whatever the password holds: validation refuses an `@` anywhere else in a camera
/// URL, so this is exact for a valid URL and errs on the safe side for any other.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    match rest.rfind('@') {
        Some(at) => format!("{head}***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The secrets a URL's user information may hold (everything up to its last `@`, and the
/// password after the first `:`), as written and percent-decoded: to scrub from messages that
/// quote them.
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some((_, rest)) = url.split_once("://")
        && let Some((userinfo, _)) = rest.rsplit_once('@')
    {
        let password = userinfo.split_once(':').map(|(_, p)| p);
        for written in [Some(userinfo), password].into_iter().flatten() {
            out.push(written.to_string());
            let decoded = percent_encoding::percent_decode_str(written).decode_utf8_lossy();
            out.push(decoded.into_owned());
        }
    }
    out.retain(|s| !s.is_empty());
    out.sort();
    out.dedup();
    out
}

/// Removes every occurrence of each secret from a message (GStreamer errors may quote a URL).
pub fn scrub(message: &str, secrets: &[&str]) -> String {
    let mut out = message.to_string();
    // The longest first: a secret that contains another is removed whole.
    let mut secrets: Vec<&str> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in secrets {
        out = out.replace(s, "***");
    }
    out
}

/// Checks that a camera URL is an RTSP URL that vigil can hand to rtspsrc as one opaque value:
/// a URL the parser takes, credentials percent-encoded. Messages never quote the credentials.
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
    const ENCODE: &str = "percent-encode '/', '?', '#', '@' and '%' in a user name or password \
        (%2F, %3F, %23, %40, %25), or give the password in `password`";
    let rest = &url[url.find("://").map(|i| i + 3).unwrap_or(0)..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let (userinfo, host) = authority.rsplit_once('@').unwrap_or(("", authority));
    // An '@' past the host (a password with a raw '/' before it, say) would leave the password
    // where redaction cannot tell it apart.
    if userinfo.contains('@') || rest[authority_end..].contains('@') {
        return Err(format!(
            "{:?}: an '@' outside the user information; {ENCODE}",
            redact_url(url)
        ));
    }
    if !valid_percent_escapes(userinfo) {
        return Err(format!("{:?}: {ENCODE}", redact_url(url)));
    }
    if host.is_empty() {
        return Err("has no host".into());
    }
    match url::Url::parse(url) {
        Ok(u) if u.host().is_some() => Ok(()),
        Ok(_) => Err("has no host".into()),
        Err(e) => Err(format!(
            "{:?} is not a valid URL ({e}); {ENCODE}",
            redact_url(url)
        )),
    }
}

/// Every '%' starts an escape of two hex digits.
fn valid_percent_escapes(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || (i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit())
    })
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
        // An '@' past the host could end a password holding a '/': redacted to be safe (and
        // refused by validation, see below).
        assert_eq!(redact_url("rtsp://cam/a@b"), "rtsp://***@b");
        assert!(check_rtsp_url("rtsp://cam/a@b").is_err());
        assert!(check_rtsp_url("rtsp://cam/a%40b").is_ok());
        assert_eq!(redact_url("not a url"), "not a url");
    }

    /// A password holding `c`, raw and percent-encoded.
    fn passwords_with(c: char) -> [(String, String); 2] {
        let raw = format!("Sx{c}qz{c}v9");
        let encoded: String =
            percent_encoding::utf8_percent_encode(&raw, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        [
            (
                raw.clone(),
                format!("rtsp://viewer:{raw}@cam.local:554/live"),
            ),
            (raw, format!("rtsp://viewer:{encoded}@cam.local:554/live")),
        ]
    }

    #[test]
    fn no_character_in_a_password_shows_through_redaction() {
        for c in ['/', '?', '#', '@', '%', ':', ' '] {
            for (password, url) in passwords_with(c) {
                let shown = redact_url(&url);
                assert!(!shown.contains("qz"), "{c:?}: {url} -> {shown}");
                assert!(!shown.contains(&password), "{c:?}: {url} -> {shown}");
                let message = format!("could not open {url}: {password} rejected");
                let secrets = url_secrets(&url);
                let scrubbed = scrub(
                    &message,
                    &secrets.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                );
                assert!(!scrubbed.contains("qz"), "{c:?}: {scrubbed}");
            }
        }
    }

    #[test]
    fn a_password_with_reserved_characters_must_be_percent_encoded() {
        for c in ['/', '?', '#', '@', '%'] {
            let [(password, raw), (_, encoded)] = passwords_with(c);
            let e = check_rtsp_url(&raw).expect_err(&raw);
            assert!(e.contains("percent-encode"), "{c:?}: {e}");
            assert!(!e.contains(&password) && !e.contains("qz"), "{c:?}: {e}");
            assert_eq!(check_rtsp_url(&encoded), Ok(()), "{encoded}");
        }
    }

    #[test]
    fn secrets_are_scrubbed_from_messages() {
        assert_eq!(
            scrub("could not open rtsp://u:pw@h/x: pw rejected", &["pw", ""]),
            "could not open rtsp://u:***@h/x: *** rejected"
        );
        assert_eq!(
            url_secrets("rtsp://u:a%2Fb@h/x"),
            ["a%2Fb", "a/b", "u:a%2Fb", "u:a/b"]
        );
        assert!(url_secrets("rtsp://h/x").is_empty());
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
