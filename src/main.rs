//! `lb` binary: parse the command line, start logging, and hand over to
//! [`lb::process`] (`--check`, or run until stopped).

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lb::process::RunOptions;
use lb::reload::WatchSettings;
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
        return lb::process::check(&cli.config);
    }
    let log_format = match cli.log_format {
        LogFormat::Text => lb::obs::logging::Format::Text,
        LogFormat::Json => lb::obs::logging::Format::Json,
    };
    let logging = lb::obs::logging::init(cli.log_level.as_deref(), log_format);
    let options = RunOptions {
        config: cli.config,
        watch: WatchSettings {
            watch: !cli.no_watch,
            poll_interval: cli.poll_interval,
        },
        workers: cli.workers,
        http1: match cli.http1 {
            Http1Arg::Fast => lb::http::server::Http1::Fast,
            Http1Arg::Hyper => lb::http::server::Http1::Hyper,
        },
        shutdown_delay: cli.shutdown_delay,
        shutdown_grace: cli.shutdown_grace,
        access_log: match cli.log_format {
            LogFormat::Text => lb::obs::access_log::Format::Text,
            LogFormat::Json => lb::obs::access_log::Format::Json,
        },
        log_lines_dropped: logging.dropped_lines(),
    };
    let code = lb::process::main(options);
    logging.flush(LOG_FLUSH);
    code
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
