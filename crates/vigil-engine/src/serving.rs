//! The model being served, and seamless switches to a new version.
//!
//! The batcher takes [`ModelSlot::current`] for each batch it makes, so a switch happens between
//! two batches: every frame is classified once, by exactly one version, and its result says which.
//! The old version's sessions are freed when the last batch that uses them is done.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::infer::{Engine, InferError, InferenceConfig};
use crate::model::{InputSpec, Manifest, ManifestError, ModelInfo};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error(
        "model {name} version {version} cannot replace the running one without a restart: {reason}"
    )]
    Incompatible {
        name: String,
        version: String,
        reason: String,
    },
}

/// What identifies a loaded model: enough to decide and to label results (no sessions).
#[derive(Debug)]
pub struct ModelVersion {
    pub info: Arc<ModelInfo>,
    pub manifest: Manifest,
    pub variant: String,
    pub precision: String,
    /// The execution provider that runs it.
    pub provider: String,
    pub loaded_at: SystemTime,
    /// The manifest and model files with their modification times when loaded (for the watch).
    pub files: ModelFiles,
}

impl ModelVersion {
    /// A version for `manifest` with no session (tests and benches).
    pub fn of(manifest: &Manifest) -> Arc<ModelVersion> {
        Arc::new(ModelVersion {
            info: Arc::new(ModelInfo::of(manifest)),
            manifest: manifest.clone(),
            variant: String::new(),
            precision: String::new(),
            provider: "none".into(),
            loaded_at: SystemTime::now(),
            files: Vec::new(),
        })
    }
}

/// A model version with its inference sessions.
pub struct LoadedModel {
    pub version: Arc<ModelVersion>,
    sessions: Vec<Mutex<Engine>>,
    pub num_classes: usize,
    pub max_batch: usize,
    /// Floats per image of the model's embedding output; None when its manifest names none.
    pub embedding_dim: Option<usize>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("version", &self.version.info.version)
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Files with their modification times.
pub type ModelFiles = Vec<(PathBuf, Option<SystemTime>)>;

/// Which model to load, and how.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// The manifest, `<dir>/<name>.toml`.
    pub manifest: PathBuf,
    /// Which of its variants.
    pub variant: String,
    pub inference: InferenceConfig,
    /// What a relative `inference.library` is resolved against.
    pub base_dir: PathBuf,
}

impl ModelSource {
    /// The manifest and the variant's model file, with their modification times now.
    pub fn files(&self) -> ModelFiles {
        let mut files = vec![(self.manifest.clone(), modified(&self.manifest))];
        if let Ok(m) = Manifest::load(&self.manifest)
            && let Ok(v) = m.variant(&self.variant)
        {
            files.push((v.file.clone(), modified(&v.file)));
        }
        files
    }
}

/// A mutex's guard, also after a thread panicked while holding it (the data are counters and
/// handles that stay valid).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LoadedModel {
    /// Loads `inference.sessions` sessions of the model, checks their shapes and runs each once
    /// (so the first real batch does not pay for the warm-up).
    pub fn load(source: &ModelSource) -> Result<LoadedModel, ModelError> {
        let files = source.files();
        let manifest = Manifest::load(&source.manifest)?;
        let sessions = (0..source.inference.engines())
            .map(|_| {
                Engine::load(
                    &manifest,
                    &source.variant,
                    &source.inference,
                    &source.base_dir,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let first = &sessions[0];
        let first_description = first.provider_description.clone();
        let version = Arc::new(ModelVersion {
            info: Arc::new(ModelInfo::of(&first.manifest)),
            manifest: first.manifest.clone(),
            variant: first.variant.name.clone(),
            precision: first.variant.precision.clone(),
            provider: first.provider.to_string(),
            loaded_at: SystemTime::now(),
            files,
        });
        let model = LoadedModel {
            num_classes: first.num_classes,
            max_batch: first.max_batch,
            embedding_dim: first.embedding_dim,
            version,
            sessions: sessions.into_iter().map(Mutex::new).collect(),
        };
        tracing::info!(
            model = %model.version.info.name,
            version = %model.version.info.version,
            variant = %model.version.variant,
            precision = %model.version.precision,
            provider = %model.version.provider,
            requested = %source.inference.provider,
            sessions = model.sessions.len(),
            embedding_dim = ?model.embedding_dim,
            "model loaded; execution provider: {}",
            first_description
        );
        Ok(model)
    }

    pub fn spec(&self) -> &InputSpec {
        &self.version.manifest.input
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Runs `n` images on session `session` (modulo the session count).
    pub fn run(&self, session: usize, data: &[f32], n: usize) -> Result<Vec<f32>, InferError> {
        let mut engine = lock(&self.sessions[session % self.sessions.len()]);
        engine.run(data, n)
    }

    /// Like [`LoadedModel::run`], handing each image's scores and embedding (empty when the
    /// model has none) to `each` without a copy.
    pub fn run_each(
        &self,
        session: usize,
        data: &[f32],
        n: usize,
        each: impl FnMut(usize, &[f32], &[f32]),
    ) -> Result<(), InferError> {
        let mut engine = lock(&self.sessions[session % self.sessions.len()]);
        engine.run_each(data, n, each)
    }

    /// Hands back to the system the CPU memory session `session`'s arena holds for runs and no
    /// longer uses, by running one image with the arena shrinking at its end.
    pub fn release_unused_memory(&self, session: usize) -> Result<(), InferError> {
        lock(&self.sessions[session % self.sessions.len()]).release_unused_memory()
    }

    /// Runs a batch of zeros of each size through every session: a model that loads but cannot
    /// run fails here, and the sessions are warm before the first real batch.
    pub fn warm_up(&self, sizes: &[usize]) -> Result<(), InferError> {
        let len = self.spec().len();
        for s in 0..self.sessions.len() {
            for &n in sizes {
                let n = n.clamp(1, self.max_batch);
                self.run(s, &vec![0.0; len * n], n)?;
            }
        }
        Ok(())
    }
}

/// One batch size's throughput, measured on this machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchMeasure {
    pub batch: usize,
    pub images_per_second: f64,
    /// Time of one batch of this size.
    pub batch_time: Duration,
}

impl BatchMeasure {
    /// A measure of `images_per_second` at batch size `batch` (its batch time follows).
    pub fn new(batch: usize, images_per_second: f64) -> BatchMeasure {
        BatchMeasure {
            batch,
            images_per_second,
            batch_time: Duration::from_secs_f64(batch as f64 / images_per_second),
        }
    }
}

/// The batch limit the pipeline uses: measured at start, or as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchTuning {
    pub chosen: usize,
    /// Empty when it was not measured (`pipeline.tune_batch = false`).
    pub measures: Vec<BatchMeasure>,
}

/// The batch sizes tried up to `max`: the powers of two, and `max` itself.
pub fn batch_candidates(max: usize) -> Vec<usize> {
    let max = max.max(1);
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|n| *n <= max)
        .collect();
    if sizes.last() != Some(&max) {
        sizes.push(max);
    }
    sizes
}

/// What a doubling of the batch limit must buy in throughput to be chosen: each frame of batch
/// holds 10-12 MiB of working memory for good (EfficientNet-Lite0, FP32), so a larger batch
/// that is only a little faster costs more than it gives (on the bench machine, 4 -> 8 bought
/// -2% to +6% in the tuner's measurements, for 37 MiB: `vigil classify` of the 720p clip at a
/// fixed limit of 4 and 8 peaked at 180 and 217 MiB).
pub const BATCH_DOUBLING_GAIN: f64 = 0.10;

/// What a doubling must buy when every frame is also decoded on the cores the model runs on
/// (`vigil classify` on the CPU provider): the model's gain, measured alone, mostly goes to the
/// decoders there. On the bench machine batch 2 measured 18% faster than batch 1 alone, while
/// `vigil classify` of the two bench clips took 1-2% less time at batch 2 than at 1 (8.66 against
/// 8.91 s, 7.23 against 7.22, 6.76 against 6.91) and peaked 14 MiB higher (196 against 182).
pub const SHARED_CORES_DOUBLING_GAIN: f64 = 0.25;

/// The batch limit to use, among the sizes whose batch time stays inside `budget`: starting
/// from the smallest, a larger size is taken when its throughput beats the one taken by
/// [`BATCH_DOUBLING_GAIN`] per doubling (10% for twice the size, 21% for four times); the
/// smallest size measured when none is inside.
pub fn choose_batch(measures: &[BatchMeasure], budget: Duration) -> usize {
    choose_batch_with(measures, budget, BATCH_DOUBLING_GAIN)
}

/// [`choose_batch`] with `gain` asked per doubling.
pub fn choose_batch_with(measures: &[BatchMeasure], budget: Duration, gain: f64) -> usize {
    let mut inside: Vec<&BatchMeasure> =
        measures.iter().filter(|m| m.batch_time <= budget).collect();
    inside.sort_by_key(|m| m.batch);
    let Some(mut taken) = inside.first().copied() else {
        return measures.iter().map(|m| m.batch).min().unwrap_or(1);
    };
    for m in &inside[1..] {
        let doublings = (m.batch as f64 / taken.batch as f64).log2();
        if m.images_per_second >= taken.images_per_second * (1.0 + gain).powf(doublings) {
            taken = m;
        }
    }
    taken.batch
}

impl LoadedModel {
    /// Measures the throughput of batches of 1, 2, 4... up to `max` on the first session (each
    /// size run once untimed, then timed over at least 3 batches and 60 ms), three times over,
    /// in turn up, down and up, keeping each size's best figure (a single pass is swayed by
    /// thread wake-ups and clock changes: batch 1 measured anywhere from 132 to 180 images/s in
    /// six starts on the bench machine), and chooses the limit with [`choose_batch`]. The
    /// memory the sizes larger than the chosen one needed is handed back.
    pub fn tune_batch(&self, max: usize, budget: Duration) -> Result<BatchTuning, InferError> {
        let len = self.spec().len();
        let sizes = batch_candidates(max.min(self.max_batch));
        let mut measures: Vec<Option<BatchMeasure>> = vec![None; sizes.len()];
        for round in 0..3 {
            let order: Vec<usize> = if round == 1 {
                (0..sizes.len()).rev().collect()
            } else {
                (0..sizes.len()).collect()
            };
            for i in order {
                let n = sizes[i];
                let data = vec![0.0; len * n];
                self.run(0, &data, n)?;
                let (start, mut runs) = (Instant::now(), 0u32);
                while runs < 3 || (start.elapsed() < Duration::from_millis(60) && runs < 50) {
                    self.run(0, &data, n)?;
                    runs += 1;
                }
                let batch_time = start.elapsed() / runs;
                let m = BatchMeasure {
                    batch: n,
                    images_per_second: n as f64 / batch_time.as_secs_f64(),
                    batch_time,
                };
                if measures[i].is_none_or(|best| m.images_per_second > best.images_per_second) {
                    measures[i] = Some(m);
                }
            }
        }
        let measures: Vec<BatchMeasure> = measures.into_iter().flatten().collect();
        // The largest size's working memory would stay reserved by the arena for good.
        self.release_unused_memory(0)?;
        Ok(BatchTuning {
            chosen: choose_batch(&measures, budget),
            measures,
        })
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        tracing::info!(
            model = %self.version.info.name,
            version = %self.version.info.version,
            "model version unloaded; its sessions are freed"
        );
    }
}

/// A version the service has served, for `GET /v1/models/<name>`.
#[derive(Debug, Clone)]
pub struct VersionRecord {
    pub version: String,
    /// "AVAILABLE" (serving) or "END" (replaced), as TensorFlow Serving says.
    pub state: &'static str,
    pub variant: String,
    pub provider: String,
    pub loaded_at: SystemTime,
}

/// The model frames are classified with now.
pub struct ModelSlot {
    current: RwLock<Arc<LoadedModel>>,
    history: Mutex<Vec<VersionRecord>>,
    /// The largest batch the graph makes: a new model must take it.
    batch: usize,
    tuning: BatchTuning,
}

impl ModelSlot {
    pub fn new(model: LoadedModel, batch: usize) -> ModelSlot {
        Self::tuned(
            model,
            BatchTuning {
                chosen: batch,
                measures: Vec::new(),
            },
        )
    }

    /// A slot whose batch limit comes from `tuning`.
    pub fn tuned(model: LoadedModel, tuning: BatchTuning) -> ModelSlot {
        let record = record(&model.version, "AVAILABLE");
        ModelSlot {
            current: RwLock::new(Arc::new(model)),
            history: Mutex::new(vec![record]),
            batch: tuning.chosen,
            tuning,
        }
    }

    /// The batch limit and how it was chosen.
    pub fn tuning(&self) -> &BatchTuning {
        &self.tuning
    }

    pub fn current(&self) -> Arc<LoadedModel> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every version served since the start, newest first.
    pub fn history(&self) -> Vec<VersionRecord> {
        let mut h = lock(&self.history).clone();
        h.reverse();
        h
    }

    /// Checks that `new` can take the running model's place (same input, batch size), warms it
    /// up, and makes it current. Batches made from now on use it; the old one is freed when the
    /// batches already made are done. Returns how long the swap itself held the slot.
    pub fn switch(&self, new: LoadedModel) -> Result<std::time::Duration, ModelError> {
        let old = self.current();
        let incompatible = |reason: String| ModelError::Incompatible {
            name: new.version.info.name.clone(),
            version: new.version.info.version.clone(),
            reason,
        };
        if new.spec() != old.spec() {
            let (a, b) = (old.spec(), new.spec());
            return Err(incompatible(format!(
                "its input differs ({}x{} {:?} {:?} mean {:?} std {:?} → {}x{} {:?} {:?} mean {:?} std {:?})",
                a.width,
                a.height,
                a.layout,
                a.color,
                a.mean,
                a.std,
                b.width,
                b.height,
                b.layout,
                b.color,
                b.mean,
                b.std
            )));
        }
        if new.max_batch < self.batch {
            return Err(incompatible(format!(
                "it takes batches of at most {} and the pipeline makes batches of {}",
                new.max_batch, self.batch
            )));
        }
        new.warm_up(&[1, self.batch])?;
        let record_new = record(&new.version, "AVAILABLE");
        let started = Instant::now();
        let previous = {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *current, Arc::new(new))
        };
        let held = started.elapsed();
        {
            let mut h = lock(&self.history);
            for r in h.iter_mut() {
                r.state = "END";
            }
            h.push(record_new);
        }
        tracing::info!(
            from = %previous.version.info.version,
            to = %self.current().version.info.version,
            swap_us = held.as_micros() as u64,
            "model switched: batches from now on use the new version"
        );
        Ok(held)
    }
}

fn record(v: &ModelVersion, state: &'static str) -> VersionRecord {
    VersionRecord {
        version: v.info.version.clone(),
        state,
        variant: v.variant.clone(),
        provider: v.provider.clone(),
        loaded_at: v.loaded_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(batch: usize, ips: f64) -> BatchMeasure {
        BatchMeasure::new(batch, ips)
    }

    #[test]
    fn a_larger_batch_is_chosen_only_when_it_pays_for_its_memory() {
        // Like one 2-core box: FP32 peaks at 4, 5% above batch 1, and falls after.
        let a = [
            m(1, 225.0),
            m(2, 230.0),
            m(4, 236.0),
            m(8, 218.0),
            m(16, 212.0),
        ];
        assert_eq!(choose_batch(&a, Duration::from_millis(100)), 1);
        // The bench machine: 2 buys 22%, 4 another 5%.
        let c = [m(1, 180.0), m(2, 219.0), m(4, 231.0), m(8, 226.0)];
        assert_eq!(choose_batch(&c, Duration::from_millis(100)), 2);
        // A gain is weighed against the size taken, not the one before: 2 alone buys too
        // little, 4 buys enough over 1.
        let d = [m(1, 100.0), m(2, 105.0), m(4, 125.0)];
        assert_eq!(choose_batch(&d, Duration::from_millis(100)), 4);
        // Like another: throughput rises to 32, but a batch of 32 takes too long.
        let b = [
            m(1, 100.0),
            m(4, 140.0),
            m(8, 170.0),
            m(16, 185.0),
            m(32, 188.0),
        ];
        // 16 is 9% above 8: not enough for twice the memory.
        assert_eq!(choose_batch(&b, Duration::from_millis(100)), 8);
        assert_eq!(choose_batch(&b, Duration::from_secs(1)), 8);
        assert_eq!(choose_batch(&b, Duration::from_millis(30)), 4);
        assert_eq!(
            choose_batch(&b, Duration::from_millis(1)),
            1,
            "none inside: the smallest"
        );
        // Decoding on the same cores (`vigil classify` on the CPU): the bench machine's 22% for
        // batch 2 is not enough; a GPU-like curve (4 times the throughput at 8) still batches.
        let shared = |m: &[BatchMeasure]| {
            choose_batch_with(m, Duration::from_millis(100), SHARED_CORES_DOUBLING_GAIN)
        };
        assert_eq!(shared(&c), 1);
        let gpu = [m(1, 200.0), m(2, 380.0), m(4, 650.0), m(8, 800.0)];
        assert_eq!(shared(&gpu), 4);
        assert_eq!(batch_candidates(8), [1, 2, 4, 8]);
        assert_eq!(batch_candidates(12), [1, 2, 4, 8, 12]);
        assert_eq!(batch_candidates(1), [1]);
    }
}
