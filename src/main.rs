//! The `vigil` command line: parses arguments, sets up logging, calls into the library.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vigil::app;
use vigil::config::{Config, ConfigError, replica_index};
use vigil::source::zones::{Regions, ZoneConfig};

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Classifies CCTV camera frames with an ONNX model and publishes the results to MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the configured cameras and publish to MQTT until stopped (Ctrl-C / SIGTERM).
    Run {
        #[arg(short, long, default_value = "config.toml")]
        config: PathBuf,
        /// With `[cluster] replicas = N`: which replica this process is (0..N); default:
        /// `VIGIL_REPLICA`, else a host name ending in `-<index>`.
        #[arg(long)]
        replica: Option<u32>,
    },
    /// Validate a config file (and load its model); print every problem; exit 1 if any. With
    /// `[cluster]`, the cameras each replica owns (or `--replica`'s).
    CheckConfig {
        #[arg(default_value = "config.toml")]
        file: PathBuf,
        #[arg(long)]
        replica: Option<u32>,
    },
    /// Train a head on its training set (`<teach.data>/<HEAD>/<label>/*.jpg`): its
    /// cross-validated figures as one JSON line on stdout; installed as its next version, in
    /// service unless worse than the current one.
    Train {
        #[arg(short, long, default_value = "config.toml")]
        config: PathBuf,
        /// The training sets' folder (default: teach.data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Put the new version in service even if it is worse.
        #[arg(long)]
        force: bool,
        head: String,
    },
    /// The heads and their versions (JSON); pin a version or roll back to the previous one.
    Heads {
        #[arg(short, long, default_value = "config.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: Option<HeadsAction>,
    },
    /// Classify images or video files: one JSON line per frame on stdout.
    Classify {
        /// Config for the model, thresholds and groups (default: config.toml if present, else
        /// built-in defaults).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// How many of the best classes each line lists.
        #[arg(short = 'k', long)]
        top_k: Option<usize>,
        /// A zone to classify on its own, `x0,y0,x1,y1` as fractions of the frame, optionally
        /// named (`steps=0.05,0.62,0.30,0.90`); repeatable. With zones, the whole frame is
        /// classified only with --whole-frame.
        #[arg(long = "zone", value_name = "[NAME=]X0,Y0,X1,Y1", value_parser = parse_zone)]
        zones: Vec<(String, ZoneConfig)>,
        /// Classify the whole frame too when zones are given.
        #[arg(long)]
        whole_frame: bool,
        /// Label with this head's version in service (trained with `vigil train`) instead of
        /// the model's classes.
        #[arg(long)]
        head: Option<String>,
        /// How many inputs are decoded at once, taken in the order given (default: half the
        /// cores, at least 1).
        #[arg(short, long)]
        jobs: Option<usize>,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum HeadsAction {
    /// Put a version of a head in service.
    Pin { head: String, version: u32 },
    /// Put the version before the one in service back in service.
    Rollback { head: String },
}

/// glibc gives every thread that allocates an arena of its own (up to 8 per core), and memory
/// freed in one is not reused by the others: with a few threads per camera, that is tens of
/// MiB held by half-empty arenas. Two arenas serve vigil's threads (its stages allocate nothing
/// per frame), and blocks of 256 KiB and more are mapped on their own and returned when freed,
/// instead of the threshold creeping up to 32 MiB and keeping freed frames in the heap.
/// `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` in the environment still decide when set.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        let unset = |name: &str| std::env::var_os(name).is_none();
        // SAFETY: mallopt only sets allocator parameters; it runs before any other thread.
        unsafe {
            if unset("MALLOC_ARENA_MAX") {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            if unset("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
            }
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (stderr closed) is lost, not a panic of the thread
        // that logs.
        .log_internal_errors(false)
        .init();
    // Fault injection for the tests (`FAILPOINTS=name=action;...`, see the fail crate); nothing
    // happens unless the variable is set.
    let _faults = fail::FailScenario::setup();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        exit_on_closed_pipe();
    }
    match execute(cli.command) {
        Ok(code) => code,
        Err(e) => {
            // Config errors list their problems one per line; print them as they are.
            match e.downcast_ref::<ConfigError>() {
                Some(c) => eprintln!("error: {c}"),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::from(2)
        }
    }
}

/// `--zone [NAME=]X0,Y0,X1,Y1`: a zone of the frame, as fractions; named `zone<N>` by its
/// position when unnamed.
fn parse_zone(text: &str) -> Result<(String, ZoneConfig), String> {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let (name, coords) = match text.split_once('=') {
        Some((name, coords)) => (name.to_string(), coords),
        None => (format!("zone{n}"), text),
    };
    let values: Vec<f64> = coords
        .split(',')
        .map(|v| v.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{coords:?}: four numbers x0,y0,x1,y1 expected"))?;
    let rect: [f64; 4] = values
        .try_into()
        .map_err(|_| format!("{coords:?}: four numbers x0,y0,x1,y1 expected"))?;
    vigil::config::check_rect(rect)?;
    Ok((
        name,
        ZoneConfig {
            rect: Some(rect),
            polygon: None,
            thresholds: BTreeMap::new(),
            head: None,
        },
    ))
}

/// A one-shot command behaves as a Unix tool: writing to a closed pipe (`vigil classify ... |
/// head`, on stdout or stderr) ends it at once, by SIGPIPE. (Rust ignores SIGPIPE by default;
/// `vigil run`, a service, keeps ignoring it.)
fn exit_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal before any other thread runs; no
    // handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config, replica } => run(config, replica),
        Command::CheckConfig { file, replica } => check_config(&file, replica),
        Command::Train {
            config,
            data,
            force,
            head,
        } => {
            let config = Config::load_without_cameras(&config)?;
            let report = app::train::train(&config, data, &head, force)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Heads { config, action } => heads(&config, action),
        Command::Classify {
            config,
            top_k,
            zones,
            whole_frame,
            head,
            jobs,
            paths,
        } => {
            let zones: BTreeMap<String, ZoneConfig> = zones.into_iter().collect();
            classify(
                config,
                top_k,
                (Regions::new(&zones, Some(whole_frame)), head),
                jobs.unwrap_or_else(app::default_jobs),
                &paths,
            )
        }
    }
}

/// `vigil run`: SIGINT and SIGTERM stop vigil; SIGHUP re-reads the config file.
/// This process's replica index under `[cluster]` (None: the only one).
fn this_replica(config: &Config, given: Option<u32>) -> anyhow::Result<Option<u32>> {
    let env = std::env::var("VIGIL_REPLICA").ok();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    replica_index(
        given,
        env.as_deref(),
        host.as_deref(),
        config.cluster.replicas,
    )
    .map_err(|e| anyhow::anyhow!(e))
}

fn run(path: PathBuf, replica: Option<u32>) -> anyhow::Result<ExitCode> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let config = Config::load(&path)?;
    let replica = this_replica(&config, replica)?;
    let threads_set = config.inference.intra_threads > 0;
    let config = config.for_replica(replica).for_live();
    tracing::info!(
        intra_threads = config.inference.intra_threads,
        "ONNX Runtime: {} thread(s) per operator{}",
        config.inference.intra_threads,
        if threads_set {
            " (inference.intra_threads)"
        } else {
            "; half the cores, the other half decodes (inference.intra_threads sets it)"
        }
    );
    if let Some(i) = replica {
        let cameras: Vec<&String> = config.cameras.keys().collect();
        tracing::info!(
            replica = i,
            replicas = config.cluster.replicas,
            ?cameras,
            "replica {i} of {}: {} cameras are this one's",
            config.cluster.replicas,
            cameras.len()
        );
    }
    let (stop_tx, shutdown) = crossbeam_channel::bounded(1);
    let (reload_tx, reload) = crossbeam_channel::bounded(1);
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing the signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let _ = if signal == SIGHUP {
                    reload_tx.try_send(())
                } else {
                    stop_tx.try_send(())
                };
            }
        })
        .context("starting the signal thread")?;
    app::run(
        config,
        app::RunControl {
            config_path: path,
            shutdown,
            reload,
            replica,
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `vigil heads`: list, pin, roll back.
fn heads(config: &Path, action: Option<HeadsAction>) -> anyhow::Result<ExitCode> {
    let config = Config::load_without_cameras(config)?;
    match action {
        None => println!("{}", app::train::list(&config)),
        Some(HeadsAction::Pin { head, version }) => {
            app::train::pin(&config, &head, version)?;
            println!("{head}: version {version} in service");
        }
        Some(HeadsAction::Rollback { head }) => {
            let version = app::train::rollback(&config, &head)?;
            println!("{head}: version {version} back in service");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `vigil check-config`: every problem of the file, then its model loaded.
fn check_config(file: &Path, replica: Option<u32>) -> anyhow::Result<ExitCode> {
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            println!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    gstreamer::init().context("initialising GStreamer")?;
    if let Err(e) = app::load_model(&config) {
        println!("{}: 1 problem\n  model: {e}", file.display());
        return Ok(ExitCode::from(1));
    }
    print_replicas(&config, replica)?;
    let enabled = config.cameras.values().filter(|c| c.enabled).count();
    println!(
        "{}: OK ({} cameras, {} enabled; model {} variant {})",
        file.display(),
        config.cameras.len(),
        enabled,
        config.model.name,
        config.model.variant
    );
    Ok(ExitCode::SUCCESS)
}

/// With `[cluster]`: the cameras of each replica (or of `replica` only).
fn print_replicas(config: &Config, replica: Option<u32>) -> anyhow::Result<()> {
    let n = config.cluster.replicas;
    if n <= 1 && replica.is_none() {
        return Ok(());
    }
    let only = match replica {
        Some(_) => replica_index(replica, None, None, n).map_err(|e| anyhow::anyhow!(e))?,
        None => None,
    };
    for (i, cameras) in config.cameras_by_replica().iter().enumerate() {
        if only.is_none_or(|r| r as usize == i) {
            println!(
                "replica {i} of {n}: {} ({} cameras)",
                cameras.join(", "),
                cameras.len()
            );
        }
    }
    Ok(())
}

/// `vigil classify`: the config given, else `config.toml` if there is one, else the defaults.
fn classify(
    config: Option<PathBuf>,
    top_k: Option<usize>,
    (regions, head): (Regions, Option<String>),
    jobs: usize,
    paths: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let default = PathBuf::from("config.toml");
    let mut config = match config {
        Some(path) => Config::load_without_cameras(&path)?,
        None if default.is_file() => Config::load_without_cameras(&default)?,
        None => Config::parse("", ".".into()).map_err(|problems| ConfigError {
            file: "(defaults)".into(),
            problems,
        })?,
    };
    if let Some(k) = top_k {
        config.decide.top_k = k.max(1);
    }
    let mut stdout = std::io::stdout();
    let failures = app::classify(
        &config,
        paths,
        (regions, head.as_deref()),
        jobs,
        &mut stdout,
    )?;
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
