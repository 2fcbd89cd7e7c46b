//! Remote inference: batches classified by an inference server that speaks the Open Inference
//! Protocol (KServe v2) over gRPC, such as NVIDIA Triton, KServe or Seldon MLServer.
//!
//! A [`Link`] is one server and model, shared by every engine that uses them (one HTTP/2
//! connection carries their requests side by side). The engines' threads stay synchronous: each
//! request runs on a small tokio runtime of its own and the thread waits for its answer, at most
//! `timeout`. A server that fails is marked down; until its next attempt, due after a backoff
//! that doubles up to `max_backoff`, requests fail at once (no queue builds up) and the engine
//! drops their frames or classifies them locally. The attempt checks the server's readiness and
//! the model's metadata again before any frame goes back to it: a server restarted with another
//! model is refused by name.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{Fallback, RemoteConfig};
use crate::infer::{InferError, Shapes, TensorInfo, check_tensors};
use crate::model::Manifest;

/// The client generated from `proto/inference.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_client::GrpcInferenceServiceClient as Client;
use proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use proto::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelReadyRequest,
    ServerReadyRequest,
};

// The protocol's raw tensors are little-endian; the input is sent as the engine holds it.
#[cfg(target_endian = "big")]
compile_error!(
    "remote inference sends tensors in the machine's byte order, which must be little-endian"
);

/// The first wait after a failure; it doubles up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The runtime the requests run on: two threads, shared by every link.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vigil-remote")
            .enable_all()
            .build()
            .expect("a tokio runtime for remote inference")
    })
}

/// Every link opened in this process (they are few and small, and their counters must keep
/// counting across model reloads).
static LINKS: Mutex<Vec<Arc<Link>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of one link, for `/metrics`.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// ModelInfer requests sent, and those that failed (timeouts, errors, refusals).
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// Frames the server classified.
    pub frames: AtomicU64,
    /// Frames classified by the local model while the server was down (`fallback = "local"`).
    pub fallback_frames: AtomicU64,
    /// Encoded request and response message bytes.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Time spent waiting for answers, in microseconds.
    pub wait_micros: AtomicU64,
    /// Times the server came back after being down.
    pub recoveries: AtomicU64,
}

/// Whether the server answers.
#[derive(Debug)]
struct Health {
    up: bool,
    /// When it went down (or up).
    since: SystemTime,
    backoff: Duration,
    /// When a request may try the server again.
    retry_at: Instant,
    last_error: String,
}

/// One inference server and model.
pub struct Link {
    /// `[inference.remote]` as configured: engines with the same share this link.
    config: RemoteConfig,
    /// The model's name on the server (`config.model`, or the manifest's name).
    pub model: String,
    client: Client<Channel>,
    health: Mutex<Health>,
    pub stats: LinkStats,
}

/// A link's state, for `/metrics`, `/readyz` and the camera status.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub url: String,
    pub model: String,
    pub up: bool,
    pub since: SystemTime,
    /// Why it is down (empty when up).
    pub last_error: String,
    pub fallback: Fallback,
    pub requests: u64,
    pub failures: u64,
    pub frames: u64,
    pub fallback_frames: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub wait_seconds: f64,
    pub recoveries: u64,
}

/// The state of every link this process opened.
pub fn links() -> Vec<LinkStatus> {
    lock(&LINKS).iter().map(|l| l.status()).collect()
}

/// The images' scores and embeddings as the server sent them.
pub(crate) struct Outputs {
    scores: Vec<f32>,
    embeddings: Vec<f32>,
}

impl Outputs {
    /// Hands each image's scores and embedding (empty without one) to `each`.
    pub(crate) fn each(&self, shapes: &Shapes, mut each: impl FnMut(usize, &[f32], &[f32])) {
        let dim = shapes.embedding_dim.unwrap_or(0);
        for (i, chunk) in self.scores.chunks(shapes.num_classes).enumerate() {
            let embedding = self.embeddings.get(i * dim..(i + 1) * dim).unwrap_or(&[]);
            each(i, chunk, embedding);
        }
    }
}

/// Checks `inference.remote.url` without connecting (for `vigil check-config`).
pub fn check_url(cfg: &RemoteConfig) -> Result<(), String> {
    endpoint(cfg).map(|_| ())
}

/// `grpc://host:port` → the endpoint, with TLS for `grpcs://`.
fn endpoint(cfg: &RemoteConfig) -> Result<Endpoint, String> {
    let (tls, rest) = if let Some(rest) = cfg.url.strip_prefix("grpc://") {
        (false, rest)
    } else if let Some(rest) = cfg.url.strip_prefix("grpcs://") {
        (true, rest)
    } else if cfg.url.starts_with("http://") || cfg.url.starts_with("https://") {
        return Err("vigil speaks the protocol's gRPC binding: write grpc://host:port (grpcs:// for TLS), the server's gRPC port (Triton: 8001)".into());
    } else {
        return Err(
            "must start with grpc:// (or grpcs:// for TLS), e.g. grpc://triton:8001".into(),
        );
    };
    let host_port = rest.trim_end_matches('/');
    if host_port.is_empty() || host_port.contains(['/', '@', '?', '#']) {
        return Err("must be grpc://host:port with nothing after the port".into());
    }
    let scheme = if tls { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{host_port}"))
        .map_err(|e| format!("not a valid address: {e}"))?
        .connect_timeout(cfg.timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(cfg.timeout)
        .keep_alive_while_idle(true);
    if tls {
        let mut tls = ClientTlsConfig::new();
        tls = match &cfg.ca_file {
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        ep = ep.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
    }
    Ok(ep)
}

/// Whether a failed call says the server is down or overloaded (retry later), rather than
/// that this request was wrong.
fn server_fault(code: Code) -> bool {
    !matches!(code, Code::InvalidArgument | Code::OutOfRange)
}

impl Link {
    /// The link to `cfg`'s server and model (the manifest's name when none is given), shared
    /// with the engines already using it. Nothing is sent yet.
    pub fn open(cfg: &RemoteConfig, manifest_name: &str) -> Result<Arc<Link>, InferError> {
        let model = if cfg.model.is_empty() {
            manifest_name.to_string()
        } else {
            cfg.model.clone()
        };
        let mut links = lock(&LINKS);
        if let Some(l) = links.iter().find(|l| l.config == *cfg && l.model == model) {
            return Ok(l.clone());
        }
        let unavailable = |message: String| InferError::RemoteUnavailable {
            url: cfg.url.clone(),
            message,
        };
        let ep = endpoint(cfg).map_err(|m| unavailable(format!("inference.remote.url {m}")))?;
        let channel = {
            let _entered = runtime().enter();
            ep.connect_lazy()
        };
        let link = Arc::new(Link {
            config: cfg.clone(),
            model,
            client: Client::new(channel).max_decoding_message_size(256 << 20),
            health: Mutex::new(Health {
                up: true,
                since: SystemTime::now(),
                backoff: FIRST_BACKOFF,
                retry_at: Instant::now(),
                last_error: String::new(),
            }),
            stats: LinkStats::default(),
        });
        links.push(link.clone());
        Ok(link)
    }

    /// The longest wait between two attempts (at least the first one).
    fn max_backoff(&self) -> Duration {
        self.config.max_backoff.max(FIRST_BACKOFF)
    }

    /// "remote (grpc://host:8001, model m)", for the log.
    pub fn describe(&self) -> String {
        format!(
            "remote ({}, model {}{})",
            self.config.url,
            self.model,
            self.versioned()
        )
    }

    /// " version v" when one is configured, else nothing.
    fn versioned(&self) -> String {
        if self.config.version.is_empty() {
            String::new()
        } else {
            format!(" version {}", self.config.version)
        }
    }

    pub fn status(&self) -> LinkStatus {
        let h = lock(&self.health);
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LinkStatus {
            url: self.config.url.clone(),
            model: self.model.clone(),
            up: h.up,
            since: h.since,
            last_error: h.last_error.clone(),
            fallback: self.config.fallback,
            requests: get(&s.requests),
            failures: get(&s.failures),
            frames: get(&s.frames),
            fallback_frames: get(&s.fallback_frames),
            bytes_sent: get(&s.bytes_sent),
            bytes_received: get(&s.bytes_received),
            wait_seconds: get(&s.wait_micros) as f64 / 1e6,
            recoveries: get(&s.recoveries),
        }
    }

    /// Runs `call` on the link's runtime and waits for it, at most `timeout`.
    fn call<T: Send + 'static>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timeout = self.config.timeout;
        runtime().spawn(async move {
            let answer = match tokio::time::timeout(timeout, call).await {
                Ok(answer) => answer.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                ))),
            };
            let _ = tx.send(answer);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(tonic::Status::cancelled("the request was abandoned")))
    }

    fn unavailable(&self, message: impl Into<String>) -> InferError {
        InferError::RemoteUnavailable {
            url: self.config.url.clone(),
            message: message.into(),
        }
    }

    fn status_error(&self, what: &str, s: &tonic::Status) -> InferError {
        let message = if s.message().is_empty() {
            format!("{what}: {}", s.code())
        } else {
            format!("{what}: {} ({})", s.message(), s.code())
        };
        if server_fault(s.code()) {
            self.unavailable(message)
        } else {
            InferError::Run(format!("inference server {}: {message}", self.config.url))
        }
    }

    /// Checks that the server and the model are ready and that the model's metadata match the
    /// manifest; returns the shapes they were checked to have.
    pub(crate) fn verify(&self, manifest: &Manifest) -> Result<Shapes, InferError> {
        let mut client = self.client.clone();
        let ready = self
            .call(async move { client.server_ready(ServerReadyRequest {}).await })
            .map_err(|s| self.status_error("server readiness", &s))?;
        if !ready.ready {
            return Err(self.unavailable("the server says it is not ready"));
        }
        let (name, version) = (self.model.clone(), self.config.version.clone());
        let mut client = self.client.clone();
        let request = ModelReadyRequest { name, version };
        let ready = self
            .call(async move { client.model_ready(request).await })
            .map_err(|s| self.status_error(&format!("model {:?} readiness", self.model), &s))?;
        if !ready.ready {
            return Err(self.unavailable(format!(
                "the server has no ready model named {:?}{} (inference.remote.model)",
                self.model,
                self.versioned()
            )));
        }
        let (name, version) = (self.model.clone(), self.config.version.clone());
        let mut client = self.client.clone();
        let request = ModelMetadataRequest { name, version };
        let meta = self
            .call(async move { client.model_metadata(request).await })
            .map_err(|s| self.status_error(&format!("model {:?} metadata", self.model), &s))?;
        let tensors =
            |list: Vec<proto::model_metadata_response::TensorMetadata>| -> Vec<TensorInfo> {
                list.into_iter()
                    .map(|t| TensorInfo {
                        name: t.name,
                        datatype: t.datatype,
                        dims: t.shape,
                    })
                    .collect()
            };
        check_tensors(&tensors(meta.inputs), &tensors(meta.outputs), manifest).map_err(|message| {
            InferError::RemoteMismatch {
                url: self.config.url.clone(),
                model: self.model.clone(),
                message,
            }
        })
    }

    /// Marks the server down after `error`: requests fail at once until the next attempt, due
    /// after the backoff (doubled since the last failure). The first failure is logged.
    pub(crate) fn mark_down(&self, error: &str, at_start: bool) {
        let mut h = lock(&self.health);
        if h.up {
            h.up = false;
            h.since = SystemTime::now();
            h.backoff = FIRST_BACKOFF;
            let frames = match self.config.fallback {
                Fallback::Local => "frames are classified by the local model",
                Fallback::None => "frames are dropped and counted",
            };
            tracing::warn!(
                url = %self.config.url,
                model = %self.model,
                error = %error,
                "INFERENCE SERVER UNAVAILABLE{}: {frames} until it answers again (retrying with backoff up to {})",
                if at_start { " at start" } else { "" },
                humantime::format_duration(self.max_backoff())
            );
        } else {
            h.backoff = (h.backoff * 2).min(self.max_backoff());
        }
        h.retry_at = Instant::now() + h.backoff;
        h.last_error = error.to_string();
    }

    fn mark_up(&self) {
        let mut h = lock(&self.health);
        if !h.up {
            let down_for = h.since.elapsed().unwrap_or_default();
            h.up = true;
            h.since = SystemTime::now();
            h.last_error.clear();
            self.stats.recoveries.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                url = %self.config.url,
                model = %self.model,
                down_for = %humantime::format_duration(Duration::from_millis(down_for.as_millis() as u64)),
                "inference server answers again: frames go to it"
            );
        }
    }

    /// Ok when requests may go to the server: it is up, or its next attempt is due and the
    /// server passes [`Link::verify`] again. While it is down and not due, fails at once.
    fn gate(&self, manifest: &Manifest) -> Result<(), InferError> {
        {
            let mut h = lock(&self.health);
            if h.up {
                return Ok(());
            }
            if Instant::now() < h.retry_at {
                return Err(self.unavailable(format!("down: {}", h.last_error)));
            }
            // This request makes the attempt; the others keep failing at once meanwhile.
            h.retry_at = Instant::now() + h.backoff.max(self.config.timeout);
        }
        match self.verify(manifest) {
            Ok(_) => {
                self.mark_up();
                Ok(())
            }
            Err(e) => {
                if let InferError::RemoteMismatch { .. } = e {
                    tracing::error!(url = %self.config.url, error = %e, "inference server refused");
                }
                self.mark_down(&e.to_string(), false);
                Err(e)
            }
        }
    }

    /// Classifies `n` images laid out in `data` on the server.
    pub(crate) fn infer(
        &self,
        manifest: &Manifest,
        shapes: &Shapes,
        data: &[f32],
        n: usize,
    ) -> Result<Outputs, InferError> {
        self.gate(manifest)?;
        let mut outputs = vec![InferRequestedOutputTensor {
            name: manifest.output_name.clone(),
        }];
        if let Some(name) = &manifest.embedding_name {
            outputs.push(InferRequestedOutputTensor { name: name.clone() });
        }
        let request = ModelInferRequest {
            model_name: self.model.clone(),
            model_version: self.config.version.clone(),
            id: String::new(),
            inputs: vec![InferInputTensor {
                name: manifest.input.name.clone(),
                datatype: "FP32".into(),
                shape: manifest.input.shape(n).iter().map(|d| *d as i64).collect(),
                contents: None,
            }],
            outputs,
            raw_input_contents: vec![Bytes::copy_from_slice(bytemuck::cast_slice(data))],
        };
        let s = &self.stats;
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.bytes_sent.fetch_add(
            prost::Message::encoded_len(&request) as u64,
            Ordering::Relaxed,
        );
        let started = Instant::now();
        let mut client = self.client.clone();
        let answer = self.call(async move { client.model_infer(request).await });
        s.wait_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let result = answer
            .map_err(|st| self.status_error("inference", &st))
            .and_then(|response| {
                s.bytes_received.fetch_add(
                    prost::Message::encoded_len(&response) as u64,
                    Ordering::Relaxed,
                );
                self.read(manifest, shapes, response, n)
            });
        match &result {
            Ok(_) => {
                s.frames.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                s.failures.fetch_add(1, Ordering::Relaxed);
                if let InferError::RemoteUnavailable { message, .. } = e {
                    self.mark_down(message, false);
                }
            }
        }
        result
    }

    /// The scores and embeddings in the server's answer, checked for size.
    fn read(
        &self,
        manifest: &Manifest,
        shapes: &Shapes,
        mut response: ModelInferResponse,
        n: usize,
    ) -> Result<Outputs, InferError> {
        let scores = take_output(&mut response, &manifest.output_name, n * shapes.num_classes);
        let embeddings = match (&manifest.embedding_name, shapes.embedding_dim) {
            (Some(name), Some(dim)) => take_output(&mut response, name, n * dim),
            _ => Ok(Vec::new()),
        };
        let bad = |m: String| InferError::Run(format!("inference server {}: {m}", self.config.url));
        Ok(Outputs {
            scores: scores.map_err(bad)?,
            embeddings: embeddings.map_err(bad)?,
        })
    }
}

/// The float32 output `name` of the answer, which must hold `len` values: from the raw
/// contents when the server sent them, else from the typed ones.
fn take_output(
    response: &mut ModelInferResponse,
    name: &str,
    len: usize,
) -> Result<Vec<f32>, String> {
    let i = response
        .outputs
        .iter()
        .position(|o| o.name == name)
        .ok_or_else(|| format!("the answer has no output {name:?}"))?;
    let output = &mut response.outputs[i];
    if output.datatype != "FP32" {
        return Err(format!("output {name:?} is {}, not FP32", output.datatype));
    }
    let values: Vec<f32> = match response.raw_output_contents.get(i) {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        None => output
            .contents
            .take()
            .map(|c| c.fp32_contents)
            .unwrap_or_default(),
    };
    if values.len() != len {
        return Err(format!(
            "output {name:?} has {} values (shape {:?}); expected {len}",
            values.len(),
            output.shape
        ));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> RemoteConfig {
        RemoteConfig {
            url: url.into(),
            ..RemoteConfig::default()
        }
    }

    #[test]
    fn urls_other_than_grpc_host_port_are_refused_with_the_form_to_write() {
        assert!(endpoint(&cfg("grpc://triton:8001")).is_ok());
        assert!(endpoint(&cfg("grpcs://triton.example:443")).is_ok());
        let http = endpoint(&cfg("http://triton:8000")).unwrap_err();
        assert!(http.contains("gRPC binding"), "{http}");
        let bare = endpoint(&cfg("triton:8001")).unwrap_err();
        assert!(bare.contains("grpc://"), "{bare}");
        let path = endpoint(&cfg("grpc://user:pw@triton:8001")).unwrap_err();
        assert!(path.contains("nothing after the port"), "{path}");
        assert!(!path.contains("pw"), "no secret in the message: {path}");
    }

    #[test]
    fn only_request_shaped_errors_leave_the_server_up() {
        assert!(server_fault(Code::Unavailable));
        assert!(server_fault(Code::DeadlineExceeded));
        assert!(server_fault(Code::NotFound));
        assert!(!server_fault(Code::InvalidArgument));
    }

    #[test]
    fn raw_outputs_are_read_little_endian_and_checked_for_size() {
        let mut r = ModelInferResponse {
            outputs: vec![proto::model_infer_response::InferOutputTensor {
                name: "logits".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                contents: None,
            }],
            raw_output_contents: vec![Bytes::from(
                [1.5f32, -2.0]
                    .iter()
                    .flat_map(|f| f.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )],
            ..Default::default()
        };
        assert_eq!(
            take_output(&mut r.clone(), "logits", 2).unwrap(),
            [1.5, -2.0]
        );
        let short = take_output(&mut r.clone(), "logits", 3).unwrap_err();
        assert!(short.contains("has 2 values"), "{short}");
        assert!(
            take_output(&mut r, "embedding", 2)
                .unwrap_err()
                .contains("no output")
        );
    }
}
