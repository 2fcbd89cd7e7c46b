//! The formats MQTT, HTTP and the logs share: timestamps and topic levels.

use std::time::SystemTime;

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-29T16:10:22.136Z`.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A label as one MQTT topic level: lower case, runs of anything but letters and digits become
/// one `_` ("crane (bird)" → "crane_bird", "Granny Smith" → "granny_smith").
pub fn topic_level(label: &str) -> String {
    let mut out = String::with_capacity(label.len());
    for c in label.chars() {
        if c.is_alphanumeric() || c == '-' {
            out.extend(c.to_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

/// A name made ASCII for ids and file names: letters and digits outside ASCII become `u` and
/// their code point in hex (`café` → `cafu00e9`).
pub fn ascii_id(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("u{:04x}", c as u32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_become_clean_topic_levels() {
        assert_eq!(topic_level("crane (bird)"), "crane_bird");
        assert_eq!(topic_level("Granny Smith"), "granny_smith");
        assert_eq!(topic_level("jack-o'-lantern"), "jack-o_-lantern");
        assert_eq!(topic_level("cat/dog+#"), "cat_dog");
    }

    #[test]
    fn ids_are_ascii_whatever_the_label() {
        assert_eq!(ascii_id(&topic_level("Café crème")), "cafu00e9_cru00e8me");
        assert_eq!(ascii_id("fox_squirrel"), "fox_squirrel");
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_500);
        assert_eq!(timestamp(t), "1970-01-01T00:00:01.500Z");
    }
}
