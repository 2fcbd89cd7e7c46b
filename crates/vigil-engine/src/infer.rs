//! Model loading and checking, execution providers, and running batches.
//!
//! The model's real input and output shapes are checked against its manifest at load time, so a
//! wrong model is refused at start-up with a clear error instead of failing on the first frame.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorElementType, TensorRef, ValueType};

pub use crate::config::{Fallback, InferenceConfig, Provider, RemoteConfig};
use crate::model::{Layout, Manifest, Variant};
use crate::remote::Link;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(
        "ONNX Runtime library not found (looked at {looked}); run `make setup`, set ORT_DYLIB_PATH or inference.library"
    )]
    LibraryNotFound { looked: String },
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    Library { path: PathBuf, message: String },
    #[error("model file {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("model {path} does not match its manifest: {message}")]
    Mismatch { path: PathBuf, message: String },
    #[error(
        "execution provider {provider} is required (inference.require_provider) but unavailable: {message}"
    )]
    ProviderUnavailable { provider: Provider, message: String },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("inference server {url} unavailable: {message}")]
    RemoteUnavailable { url: String, message: String },
    #[error("model {model:?} on the inference server {url} does not match its manifest: {message}")]
    RemoteMismatch {
        url: String,
        model: String,
        message: String,
    },
    #[error(
        "provider = \"remote\" needs an [inference.remote] section with the server's url, e.g. url = \"grpc://triton:8001\""
    )]
    RemoteNotConfigured,
}

/// The ONNX Runtime environment, created once per process from the shared library.
static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// Finds `libonnxruntime.so`: the config's path, then `$ORT_DYLIB_PATH`, then the copy
/// `make setup` puts in `.deps/onnxruntime/` (beside the config, or in the working directory).
pub fn find_library(configured: Option<&Path>, base_dir: &Path) -> Result<PathBuf, InferError> {
    let mut candidates = Vec::new();
    if let Some(p) = configured {
        candidates.push(if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        });
    } else {
        if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
            candidates.push(PathBuf::from(p));
        }
        candidates.push(base_dir.join(".deps/onnxruntime/libonnxruntime.so"));
        candidates.push(PathBuf::from(".deps/onnxruntime/libonnxruntime.so"));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| InferError::LibraryNotFound {
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Loads ONNX Runtime from `library` (once per process; later calls reuse the first).
pub fn environment(library: &Path) -> Result<&'static ort::environment::Environment, InferError> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let fail = |message: String| InferError::Library {
        path: library.to_path_buf(),
        message,
    };
    let env = ort::init_from(library)
        .map_err(|e| fail(e.to_string()))?
        .with_name("vigil")
        .build()
        .map_err(|e| fail(e.to_string()))?;
    Ok(ENVIRONMENT.get_or_init(|| env))
}

/// Where an engine's batches run.
enum Backend {
    /// An ONNX Runtime session in this process.
    Local(Session),
    /// An inference server, with the local session that stands in while it is down
    /// (`fallback = "local"`).
    Remote {
        link: Arc<Link>,
        fallback: Option<Session>,
    },
}

/// A loaded, checked model, ready to classify batches.
pub struct Engine {
    backend: Backend,
    pub manifest: Manifest,
    pub variant: Variant,
    /// The provider that actually runs the model.
    pub provider: Provider,
    /// The provider in words for the log: "cpu", or "remote (grpc://host:8001, model m)".
    pub provider_description: String,
    /// Largest batch the model accepts (`usize::MAX` for a dynamic batch axis).
    pub max_batch: usize,
    pub num_classes: usize,
    /// Floats per image of the embedding output, when the manifest names one.
    pub embedding_dim: Option<usize>,
}

/// The shapes a model was checked to have.
pub(crate) struct Shapes {
    pub max_batch: usize,
    pub num_classes: usize,
    pub embedding_dim: Option<usize>,
}

impl Engine {
    /// Loads the manifest's `variant` with the configured execution provider and checks it.
    pub fn load(
        manifest: &Manifest,
        variant: &str,
        cfg: &InferenceConfig,
        base_dir: &Path,
    ) -> Result<Engine, InferError> {
        let variant = manifest
            .variant(variant)
            .map_err(|e| InferError::Load {
                path: manifest.path.clone(),
                message: e.to_string(),
            })?
            .clone();
        if cfg.provider == Provider::Remote {
            return Self::load_remote(manifest, variant, cfg, base_dir);
        }
        let (session, provider) = open_local(&variant, cfg, base_dir)?;
        let shapes = check_shapes(&session, manifest, &variant.file)?;
        Ok(Engine::new(
            Backend::Local(session),
            manifest,
            variant,
            provider,
            provider.to_string(),
            shapes,
        ))
    }

    /// A model served by an inference server: its readiness and metadata are checked against
    /// the manifest. A server that cannot be reached is an error, unless `fallback = "local"`,
    /// where the local model stands in until the server answers; a server whose model does not
    /// match is always refused.
    fn load_remote(
        manifest: &Manifest,
        variant: Variant,
        cfg: &InferenceConfig,
        base_dir: &Path,
    ) -> Result<Engine, InferError> {
        let remote = cfg.remote.as_ref().ok_or(InferError::RemoteNotConfigured)?;
        let link = Link::open(remote, &manifest.name)?;
        let fallback = match remote.fallback {
            Fallback::Local => {
                let cpu = InferenceConfig {
                    provider: Provider::Cpu,
                    ..cfg.clone()
                };
                let (session, _) = open_local(&variant, &cpu, base_dir)?;
                Some(session)
            }
            Fallback::None => None,
        };
        let shapes = match (link.verify(manifest), &fallback) {
            (Ok(shapes), _) => shapes,
            (Err(e @ InferError::RemoteMismatch { .. }), _) | (Err(e), None) => return Err(e),
            (Err(e), Some(session)) => {
                link.mark_down(&e.to_string(), true);
                check_shapes(session, manifest, &variant.file)?
            }
        };
        let description = link.describe();
        Ok(Engine::new(
            Backend::Remote { link, fallback },
            manifest,
            variant,
            Provider::Remote,
            description,
            shapes,
        ))
    }

    fn new(
        backend: Backend,
        manifest: &Manifest,
        variant: Variant,
        provider: Provider,
        provider_description: String,
        shapes: Shapes,
    ) -> Engine {
        Engine {
            backend,
            manifest: manifest.clone(),
            variant,
            provider,
            provider_description,
            max_batch: shapes.max_batch,
            num_classes: shapes.num_classes,
            embedding_dim: shapes.embedding_dim,
        }
    }

    /// Classifies `n` images laid out one after the other in `data`; returns `n * num_classes`
    /// scores, image after image.
    pub fn run(&mut self, data: &[f32], n: usize) -> Result<Vec<f32>, InferError> {
        let mut out = Vec::with_capacity(n * self.num_classes);
        self.run_each(data, n, |_, scores, _| out.extend_from_slice(scores))?;
        Ok(out)
    }

    /// Like [`Engine::run`], handing each image's scores and embedding to `each` (image index,
    /// scores, embedding) straight from ONNX Runtime's outputs, without copying them into new
    /// vectors. The embedding is empty when the manifest names no embedding output.
    pub fn run_each(
        &mut self,
        data: &[f32],
        n: usize,
        each: impl FnMut(usize, &[f32], &[f32]),
    ) -> Result<(), InferError> {
        let shapes = Shapes {
            max_batch: self.max_batch,
            num_classes: self.num_classes,
            embedding_dim: self.embedding_dim,
        };
        match &mut self.backend {
            Backend::Local(session) => run_local(session, &self.manifest, &shapes, data, n, each),
            Backend::Remote { link, fallback } => {
                match link.infer(&self.manifest, &shapes, data, n) {
                    Ok(out) => {
                        out.each(&shapes, each);
                        Ok(())
                    }
                    Err(e @ InferError::RemoteUnavailable { .. }) => match fallback {
                        Some(session) => {
                            link.stats
                                .fallback_frames
                                .fetch_add(n as u64, Ordering::Relaxed);
                            run_local(session, &self.manifest, &shapes, data, n, each)
                        }
                        None => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
        }
    }
}

impl Engine {
    /// Hands back to the system the memory ONNX Runtime's CPU arena keeps for batches larger
    /// than those run from now on (after measuring batch sizes, the largest would otherwise stay
    /// reserved for good): runs one image with the arena shrinking at the end of the run.
    pub fn release_unused_memory(&mut self) -> Result<(), InferError> {
        let session = match &mut self.backend {
            Backend::Local(session) => session,
            Backend::Remote {
                fallback: Some(session),
                ..
            } => session,
            Backend::Remote { fallback: None, .. } => return Ok(()),
        };
        let run_err = |e: ort::Error| InferError::Run(e.to_string());
        let mut options = ort::session::RunOptions::new().map_err(run_err)?;
        options
            .set("memory.enable_memory_arena_shrinkage", "cpu:0")
            .map_err(run_err)?;
        let shape = self.manifest.input.shape(1);
        let data = vec![0.0f32; shape.iter().product::<usize>()];
        let input = TensorRef::from_array_view((shape, &data[..])).map_err(run_err)?;
        session
            .run_with_options(
                ort::inputs![self.manifest.input.name.as_str() => input],
                &options,
            )
            .map_err(run_err)?;
        Ok(())
    }
}

/// Runs `n` images through an ONNX Runtime session, handing each image's scores and embedding
/// to `each` straight from the session's outputs.
fn run_local(
    session: &mut Session,
    manifest: &Manifest,
    shapes: &Shapes,
    data: &[f32],
    n: usize,
    mut each: impl FnMut(usize, &[f32], &[f32]),
) -> Result<(), InferError> {
    let shape = manifest.input.shape(n);
    debug_assert_eq!(data.len(), shape.iter().product::<usize>());
    let input =
        TensorRef::from_array_view((shape, data)).map_err(|e| InferError::Run(e.to_string()))?;
    let outputs = session
        .run(ort::inputs![manifest.input.name.as_str() => input])
        .map_err(|e| InferError::Run(e.to_string()))?;
    let (out_shape, scores) = outputs[manifest.output_name.as_str()]
        .try_extract_tensor::<f32>()
        .map_err(|e| InferError::Run(e.to_string()))?;
    if scores.len() != n * shapes.num_classes {
        return Err(InferError::Run(format!(
            "model returned shape {out_shape:?} for a batch of {n}"
        )));
    }
    let (dim, embeddings) = match (&manifest.embedding_name, shapes.embedding_dim) {
        (Some(name), Some(dim)) => {
            let (shape, values) = outputs[name.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(|e| InferError::Run(e.to_string()))?;
            if values.len() != n * dim {
                return Err(InferError::Run(format!(
                    "model returned an embedding of shape {shape:?} for a batch of {n}"
                )));
            }
            (dim, values)
        }
        _ => (0, &[][..]),
    };
    for (i, chunk) in scores.chunks(shapes.num_classes).enumerate() {
        each(i, chunk, &embeddings[i * dim..(i + 1) * dim]);
    }
    Ok(())
}

/// A tensor as a model describes it: its name, element type in the Open Inference Protocol's
/// spelling ("FP32", ...) and dimensions, -1 for a variable one. Local sessions and remote
/// servers are checked against the manifest from the same description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub datatype: String,
    pub dims: Vec<i64>,
}

/// The session's inputs and outputs as [`TensorInfo`]s.
fn session_tensors(session: &Session) -> (Vec<TensorInfo>, Vec<TensorInfo>) {
    let info = |name: &str, dtype: &ValueType| match dtype {
        ValueType::Tensor { ty, shape, .. } => TensorInfo {
            name: name.to_string(),
            datatype: match ty {
                TensorElementType::Float32 => "FP32".to_string(),
                other => format!("{other:?}"),
            },
            dims: shape.iter().copied().collect(),
        },
        _ => TensorInfo {
            name: name.to_string(),
            datatype: "not a tensor".into(),
            dims: Vec::new(),
        },
    };
    (
        session
            .inputs()
            .iter()
            .map(|i| info(i.name(), i.dtype()))
            .collect(),
        session
            .outputs()
            .iter()
            .map(|o| info(o.name(), o.dtype()))
            .collect(),
    )
}

/// Checks a model's inputs and outputs against the manifest.
pub(crate) fn check_tensors(
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
    manifest: &Manifest,
) -> Result<Shapes, String> {
    let max_batch = check_input(inputs, &manifest.input)?;
    let num_classes = manifest.labels.len();
    check_output(outputs, &manifest.output_name, num_classes)?;
    let embedding_dim = manifest
        .embedding_name
        .as_deref()
        .map(|name| check_embedding(outputs, name))
        .transpose()?;
    Ok(Shapes {
        max_batch,
        num_classes,
        embedding_dim,
    })
}

/// Checks the session's input and outputs against the manifest.
fn check_shapes(session: &Session, manifest: &Manifest, path: &Path) -> Result<Shapes, InferError> {
    let (inputs, outputs) = session_tensors(session);
    check_tensors(&inputs, &outputs, manifest).map_err(|message| InferError::Mismatch {
        path: path.to_path_buf(),
        message,
    })
}

/// The one float32 input, shaped as the manifest says; returns the largest batch it takes.
fn check_input(inputs: &[TensorInfo], spec: &crate::model::InputSpec) -> Result<usize, String> {
    let input = inputs.iter().find(|i| i.name == spec.name).ok_or_else(|| {
        format!(
            "no input named {:?} (the model's inputs: {})",
            spec.name,
            names(inputs.iter().map(|i| i.name.as_str()))
        )
    })?;
    if inputs.len() != 1 {
        return Err(format!(
            "vigil feeds models with exactly one input; this one has {}",
            inputs.len()
        ));
    }
    if input.datatype != "FP32" {
        return Err(format!(
            "input {:?} is {}; vigil feeds float32 (FP32)",
            spec.name, input.datatype
        ));
    }
    let expected = spec.shape(1);
    let dims = &input.dims;
    let layout = match spec.layout {
        Layout::Nchw => "NCHW",
        Layout::Nhwc => "NHWC",
    };
    let shape_ok = dims.len() == 4
        && dims[1..]
            .iter()
            .zip(&expected[1..])
            .all(|(d, e)| *d == -1 || *d == *e as i64);
    if !shape_ok {
        return Err(format!(
            "input {:?} has shape {dims:?}; the manifest says {layout} [batch, {}]",
            spec.name,
            expected[1..]
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(if dims[0] <= 0 {
        usize::MAX
    } else {
        dims[0] as usize
    })
}

/// The float32 output `name`, shaped [batch, classes].
fn check_output(outputs: &[TensorInfo], name: &str, classes: usize) -> Result<(), String> {
    let dims = float_output(outputs, name, "output")?;
    if dims.len() != 2 || dims[1] != classes as i64 {
        return Err(format!(
            "output {name:?} has shape {dims:?}; expected [batch, {classes}] (one score per label in {classes} labels)"
        ));
    }
    Ok(())
}

/// The float32 embedding output `name`, shaped [batch, D] with D fixed; returns D.
fn check_embedding(outputs: &[TensorInfo], name: &str) -> Result<usize, String> {
    let what = "embedding output";
    let dims = float_output(outputs, name, what)?;
    if dims.len() != 2 || dims[1] <= 0 {
        return Err(format!(
            "{what} {name:?} has shape {dims:?}; expected [batch, D] (one vector of a fixed size D per image)"
        ));
    }
    Ok(dims[1] as usize)
}

/// The dimensions of the float32 output `name` (`what` names it in errors: "output").
fn float_output<'a>(
    outputs: &'a [TensorInfo],
    name: &str,
    what: &str,
) -> Result<&'a [i64], String> {
    let output = outputs.iter().find(|o| o.name == name).ok_or_else(|| {
        format!(
            "no {what} named {name:?} (the model's outputs: {})",
            names(outputs.iter().map(|o| o.name.as_str()))
        )
    })?;
    if output.datatype != "FP32" {
        return Err(format!(
            "{what} {name:?} is {}; vigil reads float32 (FP32)",
            output.datatype
        ));
    }
    Ok(&output.dims)
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
}

/// The variant's model in a local ONNX Runtime session, on the configured provider.
fn open_local(
    variant: &Variant,
    cfg: &InferenceConfig,
    base_dir: &Path,
) -> Result<(Session, Provider), InferError> {
    let path = &variant.file;
    if !path.is_file() {
        return Err(InferError::Load {
            path: path.clone(),
            message: "file does not exist".into(),
        });
    }
    let env = environment(&find_library(cfg.library.as_deref(), base_dir)?)?;
    open_session(env, cfg, path)
}

/// A session builder with vigil's threading settings.
fn session_builder(
    env: &'static ort::environment::Environment,
    cfg: &InferenceConfig,
    path: &Path,
) -> Result<ort::session::builder::SessionBuilder, InferError> {
    let load_err = |e: ort::Error| InferError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut b = Session::builder(env)
        .map_err(load_err)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| load_err(e.into()))?
        // A memory pattern is planned per input shape and held beside the arena: with batches
        // of every size up to the limit it held more than it saved (`vigil classify` of the
        // 720p clip peaked 7 MiB higher at batch 4 with it, 14 MiB at batch 8; without it,
        // engine-bench measured the same images/s at batch 1, 1% fewer at 4, 3% fewer at 8).
        .with_memory_pattern(false)
        .map_err(|e| load_err(e.into()))?;
    if !cfg.spinning {
        // Idle ONNX Runtime threads would otherwise spin on the cores the decoders need.
        b = b
            .with_intra_op_spinning(false)
            .map_err(|e| load_err(e.into()))?
            .with_inter_op_spinning(false)
            .map_err(|e| load_err(e.into()))?;
    }
    if cfg.inter_threads > 0 {
        b = b
            .with_parallel_execution(true)
            .map_err(|e| load_err(e.into()))?
            .with_inter_threads(cfg.inter_threads)
            .map_err(|e| load_err(e.into()))?;
    }
    if cfg.intra_threads > 0 {
        b = b
            .with_intra_threads(cfg.intra_threads)
            .map_err(|e| load_err(e.into()))?;
    }
    Ok(b)
}

/// The model's session on the configured provider; a GPU provider that cannot be had is an
/// error (`require_provider`) or a loud fall back to the CPU.
fn open_session(
    env: &'static ort::environment::Environment,
    cfg: &InferenceConfig,
    path: &Path,
) -> Result<(Session, Provider), InferError> {
    let load_err = |e: ort::Error| InferError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let on_cpu = || -> Result<(Session, Provider), InferError> {
        let session = session_builder(env, cfg, path)?
            .commit_from_file(path)
            .map_err(load_err)?;
        Ok((session, Provider::Cpu))
    };
    let wanted = cfg.provider;
    let ep = match wanted {
        Provider::Cpu | Provider::Remote => return on_cpu(),
        Provider::Cuda => ort::ep::CUDA::default()
            .with_device_id(cfg.device_id)
            .build()
            .error_on_failure(),
        Provider::Tensorrt => ort::ep::TensorRT::default()
            .with_device_id(cfg.device_id)
            .build()
            .error_on_failure(),
    };
    let attempt = session_builder(env, cfg, path)?
        .with_execution_providers([ep])
        .map_err(|e| e.to_string())
        .and_then(|mut b| b.commit_from_file(path).map_err(|e| e.to_string()));
    match attempt {
        Ok(s) => Ok((s, wanted)),
        Err(message) if cfg.require_provider => Err(InferError::ProviderUnavailable {
            provider: wanted,
            message,
        }),
        Err(message) => {
            tracing::warn!(
                wanted = %wanted,
                reason = %message,
                "EXECUTION PROVIDER UNAVAILABLE: falling back to CPU (set inference.require_provider = true to fail instead)"
            );
            on_cpu()
        }
    }
}
