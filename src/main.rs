//! The `vigil` command line: parses arguments, sets up logging, calls into the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vigil::app;
use vigil::config::{Config, ConfigError};

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
    },
    /// Validate a config file (and load its model); print every problem; exit 1 if any.
    CheckConfig {
        #[arg(default_value = "config.toml")]
        file: PathBuf,
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
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
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
        Command::Run { config } => run(config),
        Command::CheckConfig { file } => check_config(&file),
        Command::Classify {
            config,
            top_k,
            paths,
        } => classify(config, top_k, &paths),
    }
}

/// `vigil run`: SIGINT and SIGTERM stop vigil; SIGHUP re-reads the config file.
fn run(path: PathBuf) -> anyhow::Result<ExitCode> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let config = Config::load(&path)?;
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
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `vigil check-config`: every problem of the file, then its model loaded.
fn check_config(file: &Path) -> anyhow::Result<ExitCode> {
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

/// `vigil classify`: the config given, else `config.toml` if there is one, else the defaults.
fn classify(
    config: Option<PathBuf>,
    top_k: Option<usize>,
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
    let failures = app::classify(&config, paths, &mut stdout)?;
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
