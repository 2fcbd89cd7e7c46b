//! Model loading and checking, execution providers, and running batches.
//!
//! The model's real input and output shapes are checked against its manifest at load time, so a
//! wrong model is refused at start-up with a clear error instead of failing on the first frame.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorElementType, TensorRef, ValueType};

pub use crate::config::{InferenceConfig, Provider};
use crate::model::{Layout, Manifest, Variant};

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

/// A loaded, checked model, ready to classify batches.
pub struct Engine {
    session: Session,
    pub manifest: Manifest,
    pub variant: Variant,
    /// The provider that actually runs the model.
    pub provider: Provider,
    /// Largest batch the model accepts (`usize::MAX` for a dynamic batch axis).
    pub max_batch: usize,
    pub num_classes: usize,
    /// Floats per image of the embedding output, when the manifest names one.
    pub embedding_dim: Option<usize>,
}

/// The shapes a model was checked to have.
struct Shapes {
    max_batch: usize,
    num_classes: usize,
    embedding_dim: Option<usize>,
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
        let path = variant.file.clone();
        if !path.is_file() {
            return Err(InferError::Load {
                path,
                message: "file does not exist".into(),
            });
        }
        let env = environment(&find_library(cfg.library.as_deref(), base_dir)?)?;
        let (session, provider) = open_session(env, cfg, &path)?;
        let shapes = check_shapes(&session, manifest, &path)?;
        Ok(Engine {
            session,
            manifest: manifest.clone(),
            variant,
            provider,
            max_batch: shapes.max_batch,
            num_classes: shapes.num_classes,
            embedding_dim: shapes.embedding_dim,
        })
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
        mut each: impl FnMut(usize, &[f32], &[f32]),
    ) -> Result<(), InferError> {
        let shape = self.manifest.input.shape(n);
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        let input = TensorRef::from_array_view((shape, data))
            .map_err(|e| InferError::Run(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.manifest.input.name.as_str() => input])
            .map_err(|e| InferError::Run(e.to_string()))?;
        let (out_shape, scores) = outputs[self.manifest.output_name.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| InferError::Run(e.to_string()))?;
        if scores.len() != n * self.num_classes {
            return Err(InferError::Run(format!(
                "model returned shape {out_shape:?} for a batch of {n}"
            )));
        }
        let (dim, embeddings) = match (&self.manifest.embedding_name, self.embedding_dim) {
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
        for (i, chunk) in scores.chunks(self.num_classes).enumerate() {
            each(i, chunk, &embeddings[i * dim..(i + 1) * dim]);
        }
        Ok(())
    }
}

/// Checks the session's input and outputs against the manifest.
fn check_shapes(session: &Session, manifest: &Manifest, path: &Path) -> Result<Shapes, InferError> {
    let mismatch = |message: String| InferError::Mismatch {
        path: path.to_path_buf(),
        message,
    };
    let max_batch = check_input(session, &manifest.input).map_err(mismatch)?;
    let num_classes = manifest.labels.len();
    check_output(session, &manifest.output_name, num_classes).map_err(mismatch)?;
    let embedding_dim = manifest
        .embedding_name
        .as_deref()
        .map(|name| check_embedding(session, name))
        .transpose()
        .map_err(mismatch)?;
    Ok(Shapes {
        max_batch,
        num_classes,
        embedding_dim,
    })
}

/// The one float32 input, shaped as the manifest says; returns the largest batch it takes.
fn check_input(session: &Session, spec: &crate::model::InputSpec) -> Result<usize, String> {
    let input = session
        .inputs()
        .iter()
        .find(|i| i.name() == spec.name)
        .ok_or_else(|| {
            format!(
                "no input named {:?} (the model's inputs: {})",
                spec.name,
                names(session.inputs().iter().map(|i| i.name()))
            )
        })?;
    if session.inputs().len() != 1 {
        return Err(format!(
            "vigil feeds models with exactly one input; this one has {}",
            session.inputs().len()
        ));
    }
    let ValueType::Tensor { ty, shape, .. } = input.dtype() else {
        return Err(format!("input {:?} is not a tensor", spec.name));
    };
    if *ty != TensorElementType::Float32 {
        return Err(format!(
            "input {:?} is {ty:?}; vigil feeds float32",
            spec.name
        ));
    }
    let expected = spec.shape(1);
    let dims: Vec<i64> = shape.iter().copied().collect();
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
fn check_output(session: &Session, name: &str, classes: usize) -> Result<(), String> {
    let dims = float_output(session, name, "output")?;
    if dims.len() != 2 || dims[1] != classes as i64 {
        return Err(format!(
            "output {name:?} has shape {dims:?}; expected [batch, {classes}] (one score per label in {classes} labels)"
        ));
    }
    Ok(())
}

/// The float32 embedding output `name`, shaped [batch, D] with D fixed; returns D.
fn check_embedding(session: &Session, name: &str) -> Result<usize, String> {
    let what = "embedding output";
    let dims = float_output(session, name, what)?;
    if dims.len() != 2 || dims[1] <= 0 {
        return Err(format!(
            "{what} {name:?} has shape {dims:?}; expected [batch, D] (one vector of a fixed size D per image)"
        ));
    }
    Ok(dims[1] as usize)
}

/// The dimensions of the float32 output `name` (`what` names it in errors: "output").
fn float_output(session: &Session, name: &str, what: &str) -> Result<Vec<i64>, String> {
    let output = session
        .outputs()
        .iter()
        .find(|o| o.name() == name)
        .ok_or_else(|| {
            format!(
                "no {what} named {name:?} (the model's outputs: {})",
                names(session.outputs().iter().map(|o| o.name()))
            )
        })?;
    let ValueType::Tensor { ty, shape, .. } = output.dtype() else {
        return Err(format!("{what} {name:?} is not a tensor"));
    };
    if *ty != TensorElementType::Float32 {
        return Err(format!("{what} {name:?} is {ty:?}; vigil reads float32"));
    }
    Ok(shape.iter().copied().collect())
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
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
        Provider::Cpu => return on_cpu(),
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
