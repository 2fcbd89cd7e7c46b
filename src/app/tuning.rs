//! The batch sizes measured at start (`pipeline.tune_batch`), kept in a file per machine and
//! model when `pipeline.tuning_cache` names one: a later start of the same model on the same
//! machine takes them instead of measuring again. Off by default: figures measured while the
//! machine was busy (a boot, a test suite beside it) would stay, and choose a worse batch limit
//! until the file is deleted. Seen here: measured beside a full test run, batch 1 gave 83
//! images/s where the same machine idle gives 129. Measuring takes about a second (1.3-2.5 s on the bench
//! machine) and, while the largest batch runs, that batch's working memory: `vigil classify`
//! of the 720p bench clip peaked at 153 MiB measuring, against 144 MiB decoding and
//! classifying. Every `vigil classify` of a folder, every restart of the service paid both.
//!
//! An entry is found by what its figures depend on: the CPU (its model name and the cores vigil
//! may use), the ONNX Runtime library, the model's files (path, size, modification time),
//! variant and provider, and the inference settings. Anything else changed, the sizes are
//! measured again and the entry replaced; deleting the file measures everything again.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use vigil_engine::serving::{BatchMeasure, LoadedModel};

use crate::config::Config;

/// Entries kept in the file, the most recently measured first: several models, variants or
/// machines (a file on a shared disk) each keep theirs.
const MOST_ENTRIES: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    key: String,
    measured_at: String,
    measures: Vec<Measure>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Measure {
    batch: usize,
    images_per_second: f64,
    batch_time_us: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    entries: Vec<Entry>,
}

/// Where the measures of this config's model are kept, and under which key.
pub struct TuningCache {
    path: PathBuf,
    key: String,
}

/// Measures found in the cache, and when they were taken.
pub struct Cached {
    pub measures: Vec<BatchMeasure>,
    pub measured_at: String,
}

impl TuningCache {
    /// The cache for `model` as `config` runs it with batches up to `max_batch`; None when
    /// `pipeline.tuning_cache` is not set, and for an inference server (its speed is the
    /// server's and its other clients', not this machine's).
    pub fn new(config: &Config, model: &LoadedModel, max_batch: usize) -> Option<TuningCache> {
        if model.version.provider == "remote" {
            return None;
        }
        let path = config.tuning_cache()?;
        Some(TuningCache {
            path,
            key: key(config, model, max_batch),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The measures kept for this key, if any (an unreadable file counts as empty).
    pub fn get(&self) -> Option<Cached> {
        let entry = read(&self.path)
            .entries
            .into_iter()
            .find(|e| e.key == self.key)?;
        let measures: Vec<BatchMeasure> = entry
            .measures
            .iter()
            .map(|m| BatchMeasure {
                batch: m.batch,
                images_per_second: m.images_per_second,
                batch_time: Duration::from_micros(m.batch_time_us),
            })
            .collect();
        (!measures.is_empty()).then_some(Cached {
            measures,
            measured_at: entry.measured_at,
        })
    }

    /// Keeps `measures` under this key (replacing an older entry), the most recent first.
    pub fn put(&self, measures: &[BatchMeasure]) -> std::io::Result<()> {
        let mut file = read(&self.path);
        file.entries.retain(|e| e.key != self.key);
        file.entries.insert(
            0,
            Entry {
                key: self.key.clone(),
                measured_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                measures: measures
                    .iter()
                    .map(|m| Measure {
                        batch: m.batch,
                        images_per_second: m.images_per_second,
                        batch_time_us: m.batch_time.as_micros() as u64,
                    })
                    .collect(),
            },
        );
        file.entries.truncate(MOST_ENTRIES);
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        crate::sync::write_atomic(&self.path, &text)
    }
}

fn read(path: &Path) -> File {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// What the figures depend on, as one line.
fn key(config: &Config, model: &LoadedModel, max_batch: usize) -> String {
    let inference = &config.inference;
    let library = vigil_engine::infer::find_library(inference.library.as_deref(), &config.base_dir)
        .map(|p| file_identity(&p))
        .unwrap_or_default();
    let version = &model.version;
    let files: Vec<String> = version
        .files
        .iter()
        .map(|(path, _)| file_identity(path))
        .collect();
    format!(
        "cpu={} cores={} ort={library} model={} variant={} provider={} intra={} inter={} \
         sessions={} spinning={} device={} max_batch={max_batch}",
        cpu_model(),
        crate::source::spec::cores(),
        files.join(","),
        version.variant,
        version.provider,
        inference.intra_threads,
        inference.inter_threads,
        inference.sessions,
        inference.spinning,
        inference.device_id,
    )
}

/// A file's real path (symbolic links followed), size and modification time.
fn file_identity(path: &Path) -> String {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let meta = std::fs::metadata(&real).ok();
    let size = meta.as_ref().map_or(0, |m| m.len());
    let modified = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}:{size}:{modified}", real.display())
}

/// The CPU's model name (`/proc/cpuinfo`), "unknown" where there is none.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measure(batch: usize, ips: f64) -> BatchMeasure {
        BatchMeasure::new(batch, ips)
    }

    #[test]
    fn entries_are_found_by_key_replaced_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tuning.json");
        let cache = |key: &str| TuningCache {
            path: path.clone(),
            key: key.into(),
        };
        assert!(cache("a").get().is_none(), "no file yet");
        cache("a")
            .put(&[measure(1, 200.0), measure(2, 230.0)])
            .unwrap();
        cache("b").put(&[measure(1, 90.0)]).unwrap();
        let a = cache("a").get().unwrap();
        assert_eq!(a.measures.len(), 2);
        assert_eq!(a.measures[1].batch, 2);
        assert!((a.measures[1].images_per_second - 230.0).abs() < 1e-9);
        assert_eq!(
            a.measures[1].batch_time.as_micros(),
            measure(2, 230.0).batch_time.as_micros()
        );
        cache("a").put(&[measure(1, 250.0)]).unwrap();
        let a = cache("a").get().unwrap();
        assert_eq!(a.measures.len(), 1, "the older entry is replaced");
        assert_eq!(cache("b").get().unwrap().measures[0].batch, 1);
        for i in 0..MOST_ENTRIES + 5 {
            cache(&format!("k{i}")).put(&[measure(1, 1.0)]).unwrap();
        }
        assert_eq!(read(&path).entries.len(), MOST_ENTRIES);
        assert!(cache("a").get().is_none(), "the oldest entries go first");
        std::fs::write(&path, "not json").unwrap();
        assert!(
            cache("k40").get().is_none(),
            "a broken file counts as empty"
        );
        cache("c").put(&[measure(4, 300.0)]).unwrap();
        assert_eq!(cache("c").get().unwrap().measures[0].batch, 4);
    }
}
