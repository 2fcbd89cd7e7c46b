//! Pipeline templates: gst-launch descriptions in `pipelines/`, with integers as the only text
//! substituted into them (`{width}`, `{height}`, `{fps}`, `{latency_ms}`). Strings from the config
//! (URLs, paths, credentials, `properties`) are set as properties on named elements after the
//! description is parsed (see `spec.rs`), so a value can never add elements to a pipeline.

use std::path::{Path, PathBuf};

/// The values a template may use, all integers.
const PLACEHOLDERS: &[&str] = &["width", "height", "fps", "latency_ms"];

/// Fills a template's `{placeholders}` with integers and drops `#` comment lines.
pub fn render_template(text: &str, values: &[(&str, u64)]) -> Result<String, String> {
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = String::with_capacity(body.len());
    let mut rest = body.as_str();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| "unclosed '{'".to_string())?;
        let name = &rest[open + 1..open + close];
        let value = values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                format!(
                    "unknown placeholder {{{name}}} (known: {})",
                    PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            })?;
        out.push_str(&value.to_string());
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out.trim().to_string())
}

/// The templates shipped in `pipelines/`, built in so that vigil runs from any directory; a file
/// `pipelines/<name>.gst` takes precedence.
const BUILTIN_TEMPLATES: &[(&str, &str)] = &[
    ("rtsp-h264", include_str!("../../pipelines/rtsp-h264.gst")),
    ("rtsp-h265", include_str!("../../pipelines/rtsp-h265.gst")),
    ("file", include_str!("../../pipelines/file.gst")),
    ("test", include_str!("../../pipelines/test.gst")),
];

/// Reads template `name` from `dir`, or the built-in one of that name.
pub fn load_template(dir: &Path, name: &str) -> Result<(String, PathBuf), String> {
    let path = dir.join(format!("{name}.gst"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((text, path)),
        Err(e) => match BUILTIN_TEMPLATES.iter().find(|(n, _)| *n == name) {
            Some((_, text)) => Ok((
                text.to_string(),
                PathBuf::from(format!("(built-in) {name}.gst")),
            )),
            None => Err(format!("template {} cannot be read: {e}", path.display())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_take_integers_and_reject_unknown_placeholders() {
        let t = "# comment\nvideotestsrc name=src ! video/x-raw,width={width},height={height} !\n appsink name=sink";
        let out = render_template(t, &[("width", 640), ("height", 480)]).unwrap();
        assert_eq!(
            out,
            "videotestsrc name=src ! video/x-raw,width=640,height=480 !  appsink name=sink"
        );
        let e = render_template("filesrc location={path}", &[("width", 1)]).unwrap_err();
        assert!(e.contains("unknown placeholder {path}"), "{e}");
        assert!(render_template("a {width", &[("width", 1)]).is_err());
    }

    #[test]
    fn a_file_in_the_templates_dir_wins_over_the_built_in_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("test.gst"),
            "videotestsrc name=src ! appsink name=sink",
        )
        .unwrap();
        let (text, path) = load_template(dir.path(), "test").unwrap();
        assert!(text.starts_with("videotestsrc"), "{text}");
        assert_eq!(path, dir.path().join("test.gst"));
        let (_, path) = load_template(dir.path(), "rtsp-h264").unwrap();
        assert!(
            path.display().to_string().contains("built-in"),
            "{}",
            path.display()
        );
        assert!(load_template(dir.path(), "nope").is_err());
    }
}
