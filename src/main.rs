//! `lb` binary: parse the command line, start logging, load the config,
//! bind, and hand over to [`lb::run`].

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lb::config::Config;
use lb::reload::WatchSettings;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// A live-reconfigurable HTTP load balancer driven by one config.yaml.
#[derive(Debug, Parser)]
#[command(version = lb::VERSION, about)]
struct Cli {
    /// The config file; edits to it are applied while lb runs.
    #[arg(long, short, env = "LB_CONFIG", default_value = "config.yaml")]
    config: PathBuf,
    /// Validate the config, print a summary and exit (0 valid, 1 invalid).
    #[arg(long)]
    check: bool,
    /// Do not watch or poll the config file; reload only on SIGHUP.
    #[arg(long)]
    no_watch: bool,
    /// How often the file is re-hashed as a backstop to file events.
    #[arg(long, default_value = "2s", value_parser = positive_duration)]
    poll_interval: Duration,
    /// How long open connections may finish their requests on SIGTERM/SIGINT.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Worker threads serving clients, each with its own listening socket
    /// and upstream pools [default: one per core].
    #[arg(long, value_parser = worker_count)]
    workers: Option<NonZeroUsize>,
    /// Which code serves HTTP/1: `fast` (lb's own, hyper for the rest) or
    /// `hyper` (everything through hyper, for comparison and debugging).
    #[arg(long, value_enum, default_value_t = Http1Arg::Fast)]
    http1: Http1Arg,
    /// On SIGTERM/SIGINT, keep accepting and serving this long with /readyz
    /// answering 503 (so Kubernetes withdraws the endpoint first), then drain.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    shutdown_delay: Duration,
    /// How lb's log lines (on stderr) and the access log (on stdout) are
    /// written: `text`, or `json` for one JSON object per line.
    #[arg(long, env = "LB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (`info`, `lb=debug,notify=warn`, …); RUST_LOG is used
    /// when absent, and `info,notify=error` when both are.
    #[arg(long, env = "LB_LOG_LEVEL", value_parser = log_filter)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a shell completion script (`lb completions bash > /etc/bash_completion.d/lb`).
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Http1Arg {
    Fast,
    Hyper,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// mimalloc: a proxy allocates and frees small buffers and header maps on
/// every request, across threads; glibc's malloc was ~5 % of lb's profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// After the shutdown grace period, how long blocking threads (a config read
/// stuck on a hung filesystem) may delay the exit.
const BLOCKING_SHUTDOWN: Duration = Duration::from_millis(500);

/// At exit, how long the last log lines may take to reach stderr.
const LOG_FLUSH: Duration = Duration::from_millis(200);

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Completions { shell }) = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "lb", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if cli.check {
        for warning in lb::config::env_warnings() {
            eprintln!("warning: {warning}");
        }
        return match Config::check(&cli.config) {
            Ok(lb::config::Loaded {
                config,
                hash,
                warnings,
            }) => {
                for warning in warnings {
                    eprintln!("warning: {warning}");
                }
                println!(
                    "{}: ok ({hash}): {}",
                    cli.config.display(),
                    config.summary()
                );
                print!("{}", config.route_table());
                for warning in config.warnings() {
                    eprintln!("warning: {}: {warning}", cli.config.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}", load_error(&cli.config, &e));
                ExitCode::FAILURE
            }
        };
    }
    let log_format = match cli.log_format {
        LogFormat::Text => lb::obs::logging::Format::Text,
        LogFormat::Json => lb::obs::logging::Format::Json,
    };
    let logging = lb::obs::logging::init(cli.log_level.as_deref(), log_format);
    // Clients are served on the worker threads; this runtime only runs
    // signals, health checks and the reloader.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(serve(cli, logging.dropped_lines()));
    // Dropping the runtime would wait for every blocking task, for ever if
    // one is stuck; the exit must come within the grace period.
    runtime.shutdown_timeout(BLOCKING_SHUTDOWN);
    logging.flush(LOG_FLUSH);
    code
}

async fn serve(cli: Cli, log_lines_dropped: lb::obs::logging::DroppedLines) -> ExitCode {
    // First, before anything can take time: SIGHUP's default action kills the process.
    let (mut hangup, terminate, interrupt) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(h), Ok(t), Ok(i)) => (h, t, i),
        _ => {
            eprintln!("lb: cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    for warning in lb::config::env_warnings() {
        tracing::warn!("{warning}");
    }
    let (config, hash) = match Config::load_with_warnings(&cli.config) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                tracing::warn!("{warning}");
            }
            (loaded.config, loaded.hash)
        }
        Err(e) => {
            tracing::error!("{}", load_error(&cli.config, &e));
            return ExitCode::FAILURE;
        }
    };
    let listener = match lb::net::listen::bind_alone(config.listen) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let mut settings = lb::Settings::new(
        cli.config.clone(),
        WatchSettings {
            watch: !cli.no_watch,
            poll_interval: cli.poll_interval,
        },
    );
    if let Some(n) = cli.workers {
        settings.workers = n;
    }
    settings.log_lines_dropped = log_lines_dropped;
    settings.http1 = match cli.http1 {
        Http1Arg::Fast => lb::http::server::Http1::Fast,
        Http1Arg::Hyper => lb::http::server::Http1::Hyper,
    };
    let admin = config.admin;
    let mode = config.mode;
    let access_log = match cli.log_format {
        LogFormat::Text => lb::obs::access_log::Format::Text,
        LogFormat::Json => lb::obs::access_log::Format::Json,
    };
    let stdout: Box<dyn std::io::Write + Send> = Box::new(std::io::stdout());
    let lb = match lb::Lb::start_logging_to(
        listener,
        config,
        hash,
        settings,
        Some((access_log, stdout)),
    ) {
        Ok(lb) => lb,
        Err(e) => {
            tracing::error!("cannot start the worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let (Some(addr), None) = (admin, lb.admin_addr()) {
        tracing::error!("cannot serve the admin listener on {addr}");
        return ExitCode::FAILURE;
    }
    tracing::info!(
        "lb {} started: proxy {}://{}{} (pid {})",
        lb::VERSION,
        mode.name(),
        lb.local_addr(),
        lb.admin_addr()
            .map(|a| format!(", admin http://{a}"))
            .unwrap_or_default(),
        std::process::id()
    );
    let reload = lb.reload_handle();
    let (mut terminate, mut interrupt) = (terminate, interrupt);
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading {}", cli.config.display());
                reload.reload();
            }
            () = stop_signal(&mut terminate, &mut interrupt) => break,
        }
    }
    // From here a second SIGTERM/SIGINT exits at once.
    lb.begin_shutdown();
    if !cli.shutdown_delay.is_zero() {
        tracing::info!(
            "shutting down: /readyz answers 503; still serving for {:?} (--shutdown-delay)",
            cli.shutdown_delay
        );
        tokio::select! {
            () = tokio::time::sleep(cli.shutdown_delay) => {}
            () = stop_signal(&mut terminate, &mut interrupt) => return exit_now(),
        }
    }
    tracing::info!("shutting down");
    tokio::select! {
        () = lb.shutdown(cli.shutdown_grace) => {
            tracing::info!("lb stopped");
            ExitCode::SUCCESS
        }
        () = stop_signal(&mut terminate, &mut interrupt) => exit_now(),
    }
}

/// Why the config could not be loaded. A missing file is the newcomer's
/// error (lb run outside the directory holding `config.yaml`): it is named
/// by its absolute path, with how to point lb at the right one.
fn load_error(path: &Path, error: &lb::config::ConfigError) -> String {
    let missing =
        std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
    if !missing {
        return error.to_string();
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    format!(
        "{}: cannot read: no such file; lb reads ./config.yaml unless --config PATH (or LB_CONFIG) names another",
        absolute.display()
    )
}

fn exit_now() -> ExitCode {
    tracing::warn!("second stop signal: exiting now");
    ExitCode::FAILURE
}

async fn stop_signal(terminate: &mut Signal, interrupt: &mut Signal) {
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}

/// `--poll-interval`: a duration greater than zero (zero would spin).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be greater than zero".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// `--workers`: a thread count of at least one (clap's own parser for
/// `NonZeroUsize` says `number would be zero for non-zero type`).
fn worker_count(s: &str) -> Result<NonZeroUsize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) => NonZeroUsize::new(n)
            .ok_or_else(|| "must be at least 1 (leave it out for one per core)".to_owned()),
        Err(_) => Err(format!("`{s}` is not a number of threads")),
    }
}

/// The level names a directive may use, bare or after `target=`.
const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// `--log-level`: a tracing filter whose every directive names a level.
/// EnvFilter alone would take `verbose` as "everything from target
/// `verbose`", which silently turns all of lb's logs off.
fn log_filter(s: &str) -> Result<String, String> {
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((_, level)) => level,
            None => directive,
        };
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(format!(
                "`{directive}` names no level: use one of {} alone or as TARGET=LEVEL (e.g. `info,lb=debug`)",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::try_new(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}
