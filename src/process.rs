//! lb as a process: what the `lb` binary does once it has parsed its
//! command line and started logging.
//!
//! * [`check`]: `lb --check`: validate the config, print its summary and
//!   route table, exit 0 or 1.
//! * [`run`]: install the signal handlers (first: SIGHUP's default action
//!   kills the process), load the config, bind, start [`Lb`], log the start
//!   line, then reload on SIGHUP until SIGTERM or SIGINT. Shutdown:
//!   `/readyz` answers 503 at once; lb keeps serving for `--shutdown-delay`,
//!   then drains for up to `--shutdown-grace` ([`Lb::shutdown`]). A second
//!   SIGTERM/SIGINT at any point of that exits at once, with status 1.
//! * [`main`]: [`run`] on a current-thread runtime of its own (clients are
//!   served on the worker threads; this one runs signals, health checks and
//!   the reloader), whose blocking threads may delay the exit by at most
//!   [`BLOCKING_SHUTDOWN`].

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::{self, Config};
use crate::http::server::Http1;
use crate::obs;
use crate::reload::WatchSettings;
use crate::{Lb, Settings};

/// The target of the lines logged here: the binary's, `lb` (as when
/// `main.rs` logged them), not `lb::process`, so `--log-level` filters and
/// log readers see the same lines as before.
const TARGET: &str = "lb";

/// After the shutdown grace period, how long blocking threads (a config read
/// stuck on a hung filesystem) may delay the exit.
pub const BLOCKING_SHUTDOWN: Duration = Duration::from_millis(500);

/// What `lb` was asked to do, from its command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The config file (`--config`); reloads re-read it.
    pub config: PathBuf,
    /// `--no-watch` and `--poll-interval`.
    pub watch: WatchSettings,
    /// `--workers`; `None`: one per core.
    pub workers: Option<NonZeroUsize>,
    /// `--http1`.
    pub http1: Http1,
    /// `--shutdown-delay`: how long lb keeps serving, `/readyz` answering
    /// 503, after SIGTERM/SIGINT.
    pub shutdown_delay: Duration,
    /// `--shutdown-grace`: how long open connections may then finish.
    pub shutdown_grace: Duration,
    /// The access log's format on stdout (`--log-format`).
    pub access_log: obs::access_log::Format,
    /// lb's own log lines dropped so far, for `/metrics`.
    pub log_lines_dropped: obs::logging::DroppedLines,
}

/// `lb --check`: validates the config at `path` and prints its summary and
/// route table on stdout, warnings and errors on stderr.
pub fn check(path: &Path) -> ExitCode {
    for warning in config::env_warnings() {
        eprintln!("warning: {warning}");
    }
    match Config::check(path) {
        Ok(config::Loaded {
            config,
            hash,
            warnings,
        }) => {
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
            println!("{}: ok ({hash}): {}", path.display(), config.summary());
            print!("{}", config.route_table());
            for l in &config.listeners {
                if let Some(tls) = &l.tls {
                    if config.listeners_named {
                        println!("listener {}:", l.name);
                    }
                    print!("{}", certificate_table(tls));
                }
            }
            for warning in config.warnings() {
                eprintln!("warning: {}: {warning}", path.display());
            }
            for warning in crate::discovery::check_names(&config) {
                eprintln!("warning: {}: {warning}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", load_error(path, &e));
            ExitCode::FAILURE
        }
    }
}

/// `--check`'s list of the certificates a TLS listener would serve: file,
/// names, expiry (the files were read and checked by [`Config::check`]).
fn certificate_table(tls: &config::tls::TlsSettings) -> String {
    let mut out = String::from("certificates (the first is the default):\n");
    for c in &tls.certificates {
        match crate::tls::pair::CertPair::load(&c.cert, &c.key) {
            Ok(pair) => {
                let left = pair
                    .info
                    .not_after
                    .duration_since(std::time::SystemTime::now())
                    .map_or_else(
                        |_| "EXPIRED".to_owned(),
                        |d| format!("{} days left", d.as_secs() / 86_400),
                    );
                out.push_str(&format!(
                    "  {}: {} (not after {}, {left})\n",
                    c.cert.display(),
                    pair.info.names.join(", "),
                    httpdate::fmt_http_date(pair.info.not_after)
                ));
            }
            Err(e) => out.push_str(&format!("  {e}\n")),
        }
    }
    out
}

/// [`run`] on a current-thread runtime built for it, shut down within
/// [`BLOCKING_SHUTDOWN`] of `run`'s end.
pub fn main(options: RunOptions) -> ExitCode {
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
    let code = runtime.block_on(run(options));
    // Dropping the runtime would wait for every blocking task, for ever if
    // one is stuck; the exit must come within the grace period.
    runtime.shutdown_timeout(BLOCKING_SHUTDOWN);
    code
}

/// Serves until SIGTERM/SIGINT and shuts down (see the module doc): 0 after
/// a clean shutdown, 1 when lb could not start or a second stop signal cut
/// the shutdown short.
pub async fn run(options: RunOptions) -> ExitCode {
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
    for warning in config::env_warnings() {
        tracing::warn!(target: TARGET, "{warning}");
    }
    let (config, hash) = match Config::load_with_warnings(&options.config) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                tracing::warn!(target: TARGET, "{warning}");
            }
            (loaded.config, loaded.hash)
        }
        Err(e) => {
            tracing::error!(target: TARGET, "{}", load_error(&options.config, &e));
            return ExitCode::FAILURE;
        }
    };
    let mut sockets = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        match crate::net::listen::bind_alone(l.address) {
            Ok(socket) => sockets.push(socket),
            Err(e) => {
                let which = if config.listeners_named {
                    format!(" (listener {})", l.name)
                } else {
                    String::new()
                };
                tracing::error!(target: TARGET, "cannot listen on {}{which}: {e}", l.address);
                return ExitCode::FAILURE;
            }
        }
    }
    let mut settings = Settings::new(options.config.clone(), options.watch);
    if let Some(n) = options.workers {
        settings.workers = n;
    }
    settings.log_lines_dropped = options.log_lines_dropped;
    settings.http1 = options.http1;
    let admin = config.admin;
    let scheme = |l: &config::ListenerConfig| match (l.mode, &l.tls) {
        (lb_mode, None) => lb_mode.name(),
        (_, Some(_)) => "https",
    };
    let proxies: Vec<(config::ListenerName, &'static str)> = config
        .listeners
        .iter()
        .map(|l| (l.name.clone(), scheme(l)))
        .collect();
    let named = config.listeners_named;
    let stdout: Box<dyn std::io::Write + Send> = Box::new(std::io::stdout());
    let lb = match Lb::start_bound(
        sockets,
        config,
        hash,
        settings,
        Some((options.access_log, stdout)),
    ) {
        Ok(lb) => lb,
        Err(e) => {
            tracing::error!(target: TARGET, "cannot start the worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let (Some(addr), None) = (admin, lb.admin_addr()) {
        tracing::error!(target: TARGET, "cannot serve the admin listener on {addr}");
        return ExitCode::FAILURE;
    }
    let proxy: Vec<String> = proxies
        .iter()
        .map(|(name, scheme)| {
            let at = lb
                .local_addr_of(name.as_str())
                .unwrap_or_else(|| lb.local_addr());
            if named {
                format!("{name} {scheme}://{at}")
            } else {
                format!("{scheme}://{at}")
            }
        })
        .collect();
    tracing::info!(target: TARGET,
        "lb {} started: proxy {}{} (pid {})",
        crate::VERSION,
        proxy.join(", "),
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
                tracing::info!(target: TARGET, "SIGHUP: reloading {}", options.config.display());
                reload.reload();
            }
            () = stop_signal(&mut terminate, &mut interrupt) => break,
        }
    }
    // From here a second SIGTERM/SIGINT exits at once.
    lb.begin_shutdown();
    if !options.shutdown_delay.is_zero() {
        tracing::info!(target: TARGET,
            "shutting down: /readyz answers 503; still serving for {:?} (--shutdown-delay)",
            options.shutdown_delay
        );
        tokio::select! {
            () = tokio::time::sleep(options.shutdown_delay) => {}
            () = stop_signal(&mut terminate, &mut interrupt) => return exit_now(),
        }
    }
    tracing::info!(target: TARGET, "shutting down");
    tokio::select! {
        () = lb.shutdown(options.shutdown_grace) => {
            tracing::info!(target: TARGET, "lb stopped");
            ExitCode::SUCCESS
        }
        () = stop_signal(&mut terminate, &mut interrupt) => exit_now(),
    }
}

/// Why the config could not be loaded. A missing file is the newcomer's
/// error (lb run outside the directory holding `config.yaml`): it is named
/// by its absolute path, with how to point lb at the right one.
fn load_error(path: &Path, error: &config::ConfigError) -> String {
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
    tracing::warn!(target: TARGET, "second stop signal: exiting now");
    ExitCode::FAILURE
}

async fn stop_signal(terminate: &mut Signal, interrupt: &mut Signal) {
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}
