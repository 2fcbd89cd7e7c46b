//! Bare inference throughput of a model, per batch size: reference A of vigil's benchmarks, and
//! the GPU check (`benches/gpu.sh`). Links only ONNX Runtime: runs where GStreamer and OpenCV are
//! absent.
//!
//! ```text
//! engine-bench --manifest models/efficientnet-lite0.toml --variant fp32 --variant int8 \
//!              --batches 1,4,8,16,32 --seconds 3 [--provider cuda --compare-cpu]
//! engine-bench --provider remote --remote grpc://localhost:8001 --in-flight 2 --compare-cpu
//! ```
//!
//! With `--in-flight K`, K threads each run batches back to back (like `inference.sessions`, or
//! the requests a remote provider keeps in flight).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use vigil_engine::infer::{Engine, InferenceConfig, Provider, RemoteConfig};
use vigil_engine::model::Manifest;

#[derive(Parser)]
#[command(about = "Images per second of a model per batch size, on one execution provider")]
struct Args {
    /// The model manifest.
    #[arg(long, default_value = "models/efficientnet-lite0.toml")]
    manifest: PathBuf,
    /// Variants of the manifest to measure (repeat the flag).
    #[arg(long = "variant", default_values = ["fp32"])]
    variants: Vec<String>,
    #[arg(long, value_delimiter = ',', default_values = ["1", "4", "8", "16", "32"])]
    batches: Vec<usize>,
    /// Seconds of measurement per batch size (after a warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// cpu, cuda, tensorrt or remote.
    #[arg(long, default_value = "cpu")]
    provider: String,
    /// The inference server for `--provider remote` (grpc://host:port).
    #[arg(long)]
    remote: Option<String>,
    /// The model's name on the server (default: the manifest's name).
    #[arg(long, default_value = "")]
    remote_model: String,
    /// Threads running batches side by side, each with its own engine.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// ONNX Runtime threads per operator (0: its default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Let idle ONNX Runtime threads spin (as bare ONNX Runtime does by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    spinning: bool,
    /// Also run each variant on the CPU and compare the scores.
    #[arg(long)]
    compare_cpu: bool,
    /// Path of libonnxruntime.so (default: $ORT_DYLIB_PATH, then .deps/onnxruntime/).
    #[arg(long)]
    library: Option<PathBuf>,
}

/// The same pseudo-random input every run, in the normalised range the model expects.
fn input(len: usize) -> Vec<f32> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn softmax_rows(scores: &[f32], classes: usize) -> Vec<f32> {
    let mut out = scores.to_vec();
    for row in out.chunks_mut(classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row
            .iter_mut()
            .map(|v| {
                *v = (*v - max).exp();
                *v
            })
            .sum();
        row.iter_mut().for_each(|v| *v /= sum);
    }
    out
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let provider = match args.provider.as_str() {
        "cpu" => Provider::Cpu,
        "cuda" => Provider::Cuda,
        "tensorrt" => Provider::Tensorrt,
        "remote" => Provider::Remote,
        other => return Err(format!("unknown provider {other:?}").into()),
    };
    let manifest = Manifest::load(&args.manifest)?;
    let here = std::env::current_dir()?;
    println!(
        "model {} {} | provider {} | threads {}",
        manifest.name,
        manifest.version,
        args.provider,
        if args.threads == 0 {
            "default".to_string()
        } else {
            args.threads.to_string()
        }
    );
    println!(
        "{:<8} {:>6} {:>9} {:>12} {:>12} {:>10} {:>10} {:>12}",
        "variant", "batch", "in-flight", "images/s", "ms/batch", "p50 ms", "p99 ms", "bytes/image"
    );
    for variant in &args.variants {
        bench_variant(&args, &manifest, variant, provider, &here)?;
    }
    Ok(())
}

/// The engine settings for `provider` from the command line.
fn engine_config(args: &Args, provider: Provider) -> InferenceConfig {
    InferenceConfig {
        provider,
        require_provider: true,
        device_id: args.device_id,
        intra_threads: args.threads,
        inter_threads: 0,
        sessions: 1,
        spinning: args.spinning,
        library: args.library.clone(),
        remote: args.remote.as_ref().map(|url| RemoteConfig {
            url: url.clone(),
            model: args.remote_model.clone(),
            timeout: Duration::from_secs(10),
            ..RemoteConfig::default()
        }),
    }
}

/// One variant: a table row per batch size, then the comparison with the CPU if asked.
fn bench_variant(
    args: &Args,
    manifest: &Manifest,
    variant: &str,
    provider: Provider,
    here: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut engines = (0..args.in_flight.max(1))
        .map(|_| Engine::load(manifest, variant, &engine_config(args, provider), here))
        .collect::<Result<Vec<_>, _>>()?;
    let max = args.batches.iter().copied().max().unwrap_or(1);
    let data = input(manifest.input.len() * max);
    for &batch in &args.batches {
        let m = measure(
            &mut engines,
            &data[..manifest.input.len() * batch],
            batch,
            args.seconds,
        )?;
        let bytes = match m.bytes_sent {
            0 => "-".to_string(),
            b => format!("{:.0}", b as f64 / m.images as f64),
        };
        println!(
            "{:<8} {:>6} {:>9} {:>12.1} {:>12.2} {:>10.2} {:>10.2} {:>12}",
            variant,
            batch,
            engines.len(),
            m.images_per_second,
            m.ms_per_batch,
            m.p50_ms,
            m.p99_ms,
            bytes
        );
    }
    if args.compare_cpu && provider != Provider::Cpu {
        let batch = 8.min(max);
        let cpu_config = engine_config(args, Provider::Cpu);
        let mut cpu = Engine::load(manifest, variant, &cpu_config, here)?;
        let (worst, same_top1) = compare(
            &mut engines[0],
            &mut cpu,
            &data[..manifest.input.len() * batch],
            batch,
        )?;
        println!(
            "{variant}: {} vs cpu on the same batch of {batch}: max |probability difference| {worst:.2e}, same top-1 {same_top1}/{batch}",
            args.provider
        );
    }
    Ok(())
}

/// Bytes the remote links sent so far (0 without one).
fn bytes_sent() -> u64 {
    vigil_engine::remote::links()
        .iter()
        .map(|l| l.bytes_sent)
        .sum()
}

/// What one batch size gave.
struct Measure {
    images: u64,
    images_per_second: f64,
    /// Wall time per batch over all engines (1 / batches per second).
    ms_per_batch: f64,
    /// Latency of one batch, from its start to its answer.
    p50_ms: f64,
    p99_ms: f64,
    /// Bytes sent to an inference server (0 for a local engine).
    bytes_sent: u64,
}

/// Runs `batch` images back to back on every engine at once (one thread each), after a
/// warm-up, for `seconds`.
fn measure(
    engines: &mut [Engine],
    slice: &[f32],
    batch: usize,
    seconds: f64,
) -> Result<Measure, Box<dyn std::error::Error>> {
    for engine in engines.iter_mut() {
        for _ in 0..3 {
            engine.run(slice, batch)?;
        }
    }
    let sent_before = bytes_sent();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let latencies = std::thread::scope(|scope| {
        let threads: Vec<_> = engines
            .iter_mut()
            .map(|engine| {
                scope.spawn(move || -> Result<Vec<f64>, String> {
                    let mut own = Vec::new();
                    while Instant::now() < until {
                        let t = Instant::now();
                        engine.run(slice, batch).map_err(|e| e.to_string())?;
                        own.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok(own)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| "a bench thread panicked".to_string())?
            })
            .collect::<Result<Vec<_>, String>>()
    })?;
    let secs = started.elapsed().as_secs_f64();
    let mut all: Vec<f64> = latencies.into_iter().flatten().collect();
    all.sort_by(f64::total_cmp);
    let runs = all.len().max(1);
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Ok(Measure {
        images: (runs * batch) as u64,
        images_per_second: (runs * batch) as f64 / secs,
        ms_per_batch: secs * 1000.0 / runs as f64,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        bytes_sent: bytes_sent() - sent_before,
    })
}

/// The largest probability difference between two engines on the same batch, and how many
/// images have the same top-1.
fn compare(
    a: &mut Engine,
    b: &mut Engine,
    slice: &[f32],
    batch: usize,
) -> Result<(f32, usize), Box<dyn std::error::Error>> {
    let classes = a.num_classes;
    let a = softmax_rows(&a.run(slice, batch)?, classes);
    let b = softmax_rows(&b.run(slice, batch)?, classes);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let same_top1 = a
        .chunks(classes)
        .zip(b.chunks(classes))
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    Ok((worst, same_top1))
}
