//! The configuration: one immutable, validated value built from `config.yaml`.
//!
//! # Pipeline
//!
//! ```text
//!  config.yaml
//!        │  read_file                       regular files only, ≤ 16 MiB;
//!        ▼                                  a FIFO or device never blocks it
//!  bytes
//!        │  check_nesting                   ≤ 64 levels of `[`/`{`, checked
//!        ▼                                  before the parser sees them
//!  text
//!        │  yaml_serde::from_str            syntax errors, unknown keys and bad
//!        ▼                                  leaf values keep line and column
//!  RawConfig  (raw.rs, deny_unknown_fields)
//!        │  figment: the same YAML merged   LB_LISTEN, LB_TIMEOUTS__CONNECT=2s …
//!        ▼  with LB_* environment overrides errors name the variable
//!  RawConfig
//!        │  validate()                      semantic errors name the field:
//!        ▼                                  backends[1].address, retry.attempts …
//!  Config  (Durations, SocketAddr, NonZero, one BackendAddr per backend)
//! ```
//!
//! Every error, whichever step finds it, is one [`Diagnostic`] printed as
//! `file:line:col: key.path: what is wrong` (see `error.rs`); an error found
//! after parsing gets its position from `locate.rs`, or the name of the
//! `LB_*` variable when the value came from the environment. The same text
//! is what startup, `--check`, the reload log line and `/status` show.
//!
//! Only `LB_*` variables whose first `__` segment is a top-level key are
//! overrides: Kubernetes injects `LB_PORT=tcp://…` and friends for a Service
//! named `lb`, and those must not crash-loop the pod ([`env_warnings`] names
//! the rest once at startup).
//!
//! The YAML is parsed by `yaml_serde` directly first because figment flattens
//! its input into its own value tree and loses source positions; the second
//! pass through figment exists only to apply the environment.
//!
//! A [`Config`] is never mutated: a reload builds a new one and swaps it in
//! (see [`crate::core::runtime`]).

pub mod backend_tls;
mod diff;
pub mod discovery;
mod error;
pub mod listeners;
mod locate;
pub mod pools;
mod raw;
mod route_pattern;
mod steering;
pub mod tls;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ::http::uri::PathAndQuery;
use figment::providers::{Data, Env, Format};
use figment::{Figment, Provider};
use sha2::{Digest, Sha256};

pub use diff::{Changed, ConfigDiff, ListDiff};
pub use error::{line_column, ConfigError, Diagnostic, Origin};
pub use listeners::{ListenerConfig, ListenerName};
pub use locate::Position;
pub use pools::{PoolConfig, PoolName, RouteConfig};
pub use raw::RawConfig;
pub(crate) use route_pattern::parse_ipv6;
pub use route_pattern::{check_path_prefix, HostMatch};
pub use steering::{HashKey, SessionAffinity, Steering, DEFAULT_PEAK_EWMA_DECAY};

/// A validated configuration. Cheap to share: it lives inside an `Arc`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where clients connect, each with its protocol and TLS (a file
    /// without `listeners:` has one, `default`, made of `listen`, `mode`
    /// and `tls`).
    pub listeners: Vec<ListenerConfig>,
    /// Whether the file names its listeners (`listeners:`), so messages
    /// name them too.
    pub listeners_named: bool,
    /// Connect, request and client-header limits.
    pub timeouts: Timeouts,
    /// Caps that keep one client (or many) from exhausting lb.
    pub limits: Limits,
    /// Where the admin listener (metrics, status, probes, reload) serves;
    /// `None` runs none. Never proxied.
    pub admin: Option<SocketAddr>,
    /// Log one line per proxied request on stdout.
    pub access_log: bool,
    /// tcp mode: the PROXY protocol header each backend connection starts
    /// with, so backends see the client's address; `None` sends none.
    pub send_proxy_protocol: Option<ProxyProtocol>,
    /// The pools by name (a file without `pools:` has one, `default`).
    pub pools: Vec<Arc<PoolConfig>>,
    /// Which pool serves a request on an http listener, in file order (a
    /// file without `routes:` has one catch-all route). A tcp listener's
    /// routes are its own ([`ListenerConfig::routes`]).
    pub routes: Vec<RouteConfig>,
}

/// Resource caps on the client side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections at most; accept pauses at the cap, so file
    /// descriptors and memory stay bounded whatever clients do.
    pub max_connections: usize,
    /// Largest request head (request line and headers) accepted; a bigger
    /// one gets 431. Also bounds each connection's read buffer.
    pub max_header_bytes: usize,
    /// HTTP/2 streams one client connection may have open at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`; more are refused), so one
    /// connection holds at most this many backend requests.
    pub h2_max_concurrent_streams: u32,
}

/// HAProxy's PROXY protocol versions: v1 is a text line, v2 binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    V1,
    V2,
}

/// Listener protocol. Fixed for the life of the process: a reload that
/// changes it is rejected (see [`crate::reload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// HTTP/1.1 and h2c reverse proxying, request by request.
    Http,
    /// Layer 4: each client connection is joined to one backend connection
    /// and bytes are copied both ways (see [`crate::tcp`]).
    Tcp,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The load-balancing strategies; see [`crate::core::selection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Smooth weighted round robin (nginx). `weighted_round_robin` is an alias.
    RoundRobin,
    /// Fewest in-flight requests per unit of weight.
    LeastConnections,
    /// Weighted random.
    Random,
    /// Two weighted-random picks, the less loaded one wins.
    PowerOfTwoChoices,
    /// Maglev table over the request's hash key; round robin without a key.
    ConsistentHash,
    /// Two weighted-random picks, the lower peak-EWMA latency × (in flight + 1) wins.
    PeakEwma,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastConnections => "least_connections",
            Strategy::Random => "random",
            Strategy::PowerOfTwoChoices => "power_of_two_choices",
            Strategy::ConsistentHash => "consistent_hash",
            Strategy::PeakEwma => "peak_ewma",
        }
    }
}

/// Every name `strategy:` accepts (aliases included), as the docs list them.
pub fn strategy_names() -> impl Iterator<Item = &'static str> {
    raw::STRATEGIES.iter().map(|(name, _)| *name)
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What lb speaks to a pool's backends (`protocol:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// HTTP/1.1, keep-alive pooled (the default).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP: one multiplexed
    /// connection per backend and worker. gRPC backends are served so.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`), multiplexed as h2c is.
    H2,
    /// TLS, the backend choosing by ALPN: HTTP/2 when it offers `h2`, else
    /// HTTP/1.1 (pooled as http1).
    Auto,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::H2 => "h2",
            Protocol::Auto => "auto",
        }
    }

    /// Every request goes as an HTTP/2 stream (h2c, h2).
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::H2c | Protocol::H2)
    }

    /// A request may go as an HTTP/2 stream: HTTP/2, or ALPN may choose it.
    pub fn may_be_http2(self) -> bool {
        self != Protocol::Http1
    }

    /// The ALPN protocols offered to a TLS backend, in order of preference.
    pub fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Protocol::Http1 | Protocol::H2c => &[b"http/1.1"],
            Protocol::H2 => &[b"h2"],
            Protocol::Auto => &[b"h2", b"http/1.1"],
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One pool member as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The backend's identity: runtime state is keyed by it.
    pub address: BackendAddr,
    /// Share of traffic; 0 drains the backend (no new requests).
    pub weight: u32,
}

/// A backend's `host:port`, normalised (host lower-cased). It is the key of
/// all runtime state, so a weight change never resets health or counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr(Arc<str>);

impl BackendAddr {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For tests and examples; real addresses come from `validate`.
    pub fn from_static(s: &'static str) -> Self {
        BackendAddr(Arc::from(s))
    }

    /// The backend at `addr` (one that DNS discovery found).
    pub fn from_socket(addr: SocketAddr) -> Self {
        BackendAddr(Arc::from(addr.to_string()))
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect to a backend.
    pub connect: Duration,
    /// Whole budget for getting a response head, retries included.
    pub request: Duration,
    /// How long a client may take to send its request head, counted from
    /// its first byte, and how long a new connection may wait before its
    /// first byte (slowloris guard).
    pub client_header: Duration,
    /// How long a request body may stall (no bytes from the client) before
    /// lb answers 408; the backend is not blamed.
    pub client_body: Duration,
    /// How long a keep-alive connection may sit idle between requests.
    pub client_idle: Duration,
    /// The longest a backend may send no byte of a response body it still
    /// owes (nginx's `proxy_read_timeout`): past it the response is cut and
    /// the backend charged with a failure, so a stalled backend cannot hold
    /// a client, a connection and an in-flight slot forever.
    pub backend_body: Duration,
    /// The longest lb waits for a client to take more response bytes
    /// (nginx's `send_timeout`): past it the client connection is closed
    /// and no backend is blamed, so a client that stops reading cannot hold
    /// a backend connection forever.
    pub client_send: Duration,
    /// tcp mode: a connection with no bytes either way for this long is closed.
    pub tcp_idle: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path probed on each backend with GET; `None` (always, in tcp mode)
    /// makes the probe a plain TCP connect, or the gRPC check.
    pub path: Option<PathAndQuery>,
    /// `grpc: true`: the service (`grpc_service`, "" for the whole server)
    /// whose grpc.health.v1.Health/Check must answer SERVING.
    pub grpc: Option<String>,
    /// Time between probes of one backend.
    pub interval: Duration,
    /// A probe slower than this fails.
    pub timeout: Duration,
    /// Consecutive passes that bring a down backend up.
    pub healthy_threshold: NonZeroU32,
    /// Consecutive failures that take an up backend down.
    pub unhealthy_threshold: NonZeroU32,
}

/// Passive health: ejection after consecutive failed requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Consecutive connect failures, resets, timeouts or 5xx that eject a
    /// backend; `None` turns passive detection off.
    pub consecutive_failures: Option<NonZeroU32>,
    /// How long an ejected backend sits out before it is tried again.
    pub ejection_time: Duration,
    /// Share of the pool (percent) passive detection may hold out at once;
    /// at least one backend may always be ejected (Envoy's rule).
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total tries per request, the first included.
    pub attempts: NonZeroU32,
    /// Limit for one try; `None` means only the request timeout applies.
    pub per_try_timeout: Option<Duration>,
    /// Failure classes and statuses worth another try.
    pub retry_on: RetryOn,
    /// Request bodies up to this size are buffered so a retry can replay them.
    pub buffer_body_limit: u64,
    /// Limits retries to a share of traffic.
    pub budget: RetryBudgetConfig,
}

/// Which failures are retried (subject to method idempotency).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOn {
    /// No connection could be made (nothing was sent).
    pub connect_failure: bool,
    /// The connection broke after the request was sent.
    pub reset: bool,
    /// No response head in time.
    pub timeout: bool,
    /// A trailers-only gRPC answer with `grpc-status: 14` (UNAVAILABLE).
    pub unavailable: bool,
    /// Response statuses that are retried, sorted.
    pub statuses: Vec<u16>,
}

impl RetryOn {
    pub fn status(&self, code: u16) -> bool {
        self.statuses.binary_search(&code).is_ok()
    }
}

/// Caps retries to a fraction of recent requests (Envoy / Linkerd style).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries allowed per original request, on average (0.2 = 20 %).
    pub ratio: f64,
    /// Retries always allowed per second, so a quiet proxy can still retry.
    pub min_retries_per_second: u32,
}

/// SHA-256 of the config file's bytes: equal files reload nothing, and the
/// short form in logs matches `sha256sum config.yaml`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> Self {
        ContentHash(Sha256::digest(bytes).into())
    }
}

/// `sha256:` and the first 12 hex digits, the one form lb shows (logs,
/// `--check`, `/status`, `POST /reload`).
impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `Format` plugging `yaml_serde` into figment (figment's own YAML support
/// uses the deprecated serde_yaml).
struct YamlSerde;

impl Format for YamlSerde {
    type Error = yaml_serde::Error;
    const NAME: &'static str = "YAML";

    fn from_str<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, Self::Error> {
        yaml_serde::from_str(s)
    }
}

/// A `yaml_serde` error (syntax, unknown key, wrong type) as a diagnostic:
/// its position and key path taken out of the message, serde's wording
/// replaced (see [`error::Problem`]).
fn yaml_diagnostic(err: &yaml_serde::Error, text: &str, file: &Path) -> Diagnostic {
    let mut position = err
        .location()
        .map_or(Position { line: 1, column: 1 }, |l| Position {
            line: l.line(),
            column: l.column(),
        });
    let mut message = err.to_string();
    // The position is printed by the diagnostic, in front.
    let at = format!(" at line {} column {}", position.line, position.column);
    if let Some(i) = message.find(&at) {
        message.replace_range(i..i + at.len(), "");
    }
    // `backends[0]: invalid type: …`: a path has no spaces, a message does.
    let (mut field, rest) = match message.split_once(": ") {
        Some((path, rest)) if is_key_path(path) => (path.to_owned(), rest),
        _ => (String::new(), message.as_str()),
    };
    let error::Problem { key, mut message } = error::Problem::from_serde_message(rest);
    if let Some(key) = key {
        let parent = field;
        field = join_key(&parent, &key);
        if message.starts_with("written twice") {
            // yaml_serde reports a duplicate at its mapping: point at the
            // second time the key is written, and name the first.
            if let Some(second) = locate::key_position(text, &field, 1) {
                position = second;
            }
            if let Some(first) = locate::key_position(text, &field, 0) {
                message = format!("{message} (first at line {})", first.line);
            }
        }
    }
    let at_tab = text
        .lines()
        .nth(position.line - 1)
        .and_then(|line| line.chars().nth(position.column - 1))
        == Some('\t');
    if field.is_empty() && at_tab {
        message.push_str(" (a tab: YAML is indented with spaces only)");
    }
    Diagnostic {
        file: file.to_owned(),
        origin: Origin::File(position),
        field,
        message,
    }
}

/// `retry.budget`, `backends[0]`, `.`: what yaml_serde puts before a message.
fn is_key_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']' | '?'))
}

/// `parent.key`, or `key` at the top level (yaml_serde writes the top as `.`).
fn join_key(parent: &str, key: &str) -> String {
    match parent {
        "" | "." => key.to_owned(),
        parent => format!("{parent}.{key}"),
    }
}

/// The environment-override provider: `LB_*` variables whose first `__`
/// segment is a top-level key.
fn env_overrides() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|key| is_override(key.as_str()))
        .split("__")
}

/// The `LB_*` variable that set the value at `keys` (or at the nearest
/// mapping above it: `LB_TIMEOUTS` can set `timeouts.connect`), by its name
/// as set in the environment.
fn variable_for(keys: &[&str]) -> String {
    let set: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .collect();
    (1..=keys.len())
        .rev()
        .map(|len| format!("{ENV_PREFIX}{}", keys[..len].join("__")))
        .find_map(|wanted| {
            set.iter()
                .find(|n| n.eq_ignore_ascii_case(&wanted))
                .cloned()
        })
        .unwrap_or_else(|| format!("{ENV_PREFIX}{}", keys.join("__")).to_ascii_uppercase())
}

/// Places diagnostics found once the text has parsed: at the value's line
/// and column, or at the `LB_*` variable that overrode it.
struct Placer<'a> {
    file: &'a Path,
    text: &'a str,
    figment: &'a Figment,
}

impl Placer<'_> {
    fn diagnostic(&self, field: String, message: String) -> Diagnostic {
        Diagnostic {
            file: self.file.to_owned(),
            origin: self.origin(&field),
            field,
            message,
        }
    }

    fn origin(&self, field: &str) -> Origin {
        // figment tracks mapping keys only: `backends[2].address` is asked
        // about as `backends`, which a `LB_BACKENDS` would have set whole.
        let keys: Vec<&str> = locate::segments(field)
            .into_iter()
            .map_while(|s| match s {
                locate::Segment::Key(k) => Some(k),
                locate::Segment::Index(_) => None,
            })
            .collect();
        let env = env_overrides().metadata().name;
        // The deepest key that has a value says where it came from (a
        // missing `session_affinity.cookie` belongs to whoever wrote
        // `session_affinity`).
        let source = (1..=keys.len())
            .rev()
            .find_map(|len| self.figment.find_metadata(&keys[..len].join(".")));
        match source {
            Some(m) if m.name == env => Origin::Env(variable_for(&keys)),
            _ => Origin::File(locate::value_position(self.text, field)),
        }
    }

    /// A figment extraction error: after the file alone parsed, this is an
    /// environment override that does not fit.
    fn figment_diagnostic(&self, err: &figment::Error) -> Diagnostic {
        let problem = error::Problem::from_figment(&err.kind);
        let mut keys: Vec<&str> = err.path.iter().map(String::as_str).collect();
        if let Some(key) = problem.key.as_deref() {
            if keys.last() != Some(&key) {
                keys.push(key);
            }
        }
        let mut field = String::new();
        for key in &keys {
            if key.bytes().all(|b| b.is_ascii_digit()) && !field.is_empty() {
                field.push_str(&format!("[{key}]"));
            } else {
                field = join_key(&field, key);
            }
        }
        let env = env_overrides().metadata().name;
        let origin = if err.metadata.as_ref().is_some_and(|m| m.name == env) {
            let mapping_keys: Vec<&str> = keys
                .iter()
                .copied()
                .take_while(|k| !k.bytes().all(|b| b.is_ascii_digit()))
                .collect();
            Origin::Env(variable_for(&mapping_keys))
        } else {
            self.origin(&field)
        };
        Diagnostic {
            file: self.file.to_owned(),
            origin,
            field,
            message: problem.message,
        }
    }
}

/// Line and column of byte `index` of `bytes`.
fn position_of_byte(bytes: &[u8], index: usize) -> Position {
    let before = &bytes[..index.min(bytes.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    Position {
        line: before.iter().filter(|&&b| b == b'\n').count() + 1,
        column: String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1,
    }
}

/// `LB_*` variables that belong to the command line, not to the config.
const CLI_ENV_KEYS: &[&str] = &["config", "log_format", "log_level"];

/// Prefix of environment overrides (`LB_LISTEN`, `LB_TIMEOUTS__CONNECT`).
const ENV_PREFIX: &str = "LB_";

/// The largest config file lb reads: a config is a few KiB, and anything this
/// big is a mistake (a log file, a disk image) that would only cost memory
/// and parse time.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Deepest `[`/`{` nesting accepted. A real config nests two or three levels;
/// the YAML parser takes time quadratic in nesting depth, so 100,000 `[`
/// would hold a reload for most of a minute before failing anyway.
pub const MAX_NESTING: usize = 64;

/// Reads a config file, refusing anything that is not a regular file before
/// it could block (a FIFO blocks in `open` and `read` until a writer comes;
/// a device or `/dev/zero` never ends) and anything over [`MAX_FILE_BYTES`].
///
/// The type is checked before opening, and again on the opened file: the
/// open itself is non-blocking, so a FIFO swapped in between the two is
/// refused instead of waited on.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    refuse_non_regular(&std::fs::metadata(path)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    refuse_non_regular(&meta)?;
    let too_large = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB; a config file is never that big",
                MAX_FILE_BYTES >> 20
            ),
        )
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    // `len()` is a hint only: the file may grow while it is read.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

fn refuse_non_regular(meta: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a file"
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("is {what}, not a regular file; lb reads its config only from regular files"),
    ))
}

/// Refuses `[`/`{` nesting deeper than [`MAX_NESTING`] before the YAML
/// parser sees it, with the position where the limit was crossed.
///
/// A cheap scan, not a YAML parser: brackets inside quoted scalars and
/// comments are skipped; a quote only opens a scalar where one can start.
fn check_nesting(text: &str) -> Result<(), (Position, String)> {
    #[derive(Clone, Copy, PartialEq)]
    enum In {
        Plain,
        Double,
        Single,
        Comment,
    }
    let mut state = In::Plain;
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let mut prev = '\n';
    let mut escaped = false;
    for c in text.chars() {
        column += 1;
        let at_scalar_start = prev.is_whitespace() || matches!(prev, '[' | '{' | ',');
        match (state, c) {
            (_, '\n') => {
                (line, column) = (line + 1, 0);
                if state == In::Comment {
                    state = In::Plain;
                }
            }
            (In::Plain, '#') if at_scalar_start => state = In::Comment,
            (In::Plain, '"') if at_scalar_start => state = In::Double,
            (In::Plain, '\'') if at_scalar_start => state = In::Single,
            (In::Plain, '[' | '{') => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err((
                        Position { line, column },
                        format!("nesting deeper than {MAX_NESTING} levels"),
                    ));
                }
            }
            (In::Plain, ']' | '}') => depth = depth.saturating_sub(1),
            (In::Double, '\\') => escaped = !escaped,
            (In::Double, '"') if !escaped => state = In::Plain,
            (In::Single, '\'') => state = In::Plain,
            _ => {}
        }
        if c != '\\' {
            escaped = false;
        }
        prev = c;
    }
    Ok(())
}

/// Top-level keys of `config.yaml`, read from [`RawConfig`]'s serde derive so
/// the list of accepted `LB_*` overrides follows the file format by itself.
fn top_level_keys() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    use serde::Deserialize;

    /// A deserializer that only records the field names a struct asks for.
    struct FieldNames<'a>(&'a mut &'static [&'static str]);

    impl<'de> de::Deserializer<'de> for FieldNames<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("only structs have field names"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("field names recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    static KEYS: std::sync::OnceLock<&'static [&'static str]> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let mut fields: &'static [&'static str] = &[];
        // Always an error: the deserializer stops as soon as it has the names.
        let _ = RawConfig::deserialize(FieldNames(&mut fields));
        fields
    })
}

/// Whether `key` (an environment variable name without `LB_`) overrides the
/// config: its first `__` segment must be a top-level key. Everything else
/// starting with `LB_` is someone else's: Kubernetes service links
/// (`LB_PORT=tcp://…`, `LB_SERVICE_HOST`), the CLI's own `LB_CONFIG`, or a
/// typo that [`env_warnings`] reports.
fn is_override(key: &str) -> bool {
    let first = key.split("__").next().unwrap_or_default();
    top_level_keys()
        .iter()
        .any(|k| k.eq_ignore_ascii_case(first))
}

/// Variables Kubernetes injects for every Service in the namespace
/// (`{SVC}_SERVICE_HOST`, `{SVC}_SERVICE_PORT[_{PORT_NAME}]`,
/// `{SVC}_PORT=tcp://…`, `{SVC}_PORT_{N}_{PROTO}[_PROTO|_PORT|_ADDR]`); a
/// Service named `lb` or `lb-…` makes them start with `LB_`.
fn is_service_link(name: &str, value: &str) -> bool {
    let name = name.to_ascii_uppercase();
    if name.ends_with("_SERVICE_HOST") || name.contains("_SERVICE_PORT") {
        return true;
    }
    let port_link = name.split_once("_PORT_").is_some_and(|(_, rest)| {
        let mut parts = rest.split('_');
        let number = parts.next().unwrap_or_default();
        let proto = parts.next().unwrap_or_default();
        let suffix = parts.next();
        !number.is_empty()
            && number.bytes().all(|b| b.is_ascii_digit())
            && matches!(proto, "TCP" | "UDP" | "SCTP")
            && matches!(suffix, None | Some("PROTO" | "PORT" | "ADDR"))
            && parts.next().is_none()
    });
    port_link
        || (name.ends_with("_PORT")
            && ["tcp://", "udp://", "sctp://"]
                .iter()
                .any(|scheme| value.starts_with(scheme)))
}

/// One warning per `LB_*` environment variable that is neither a config
/// override, nor lb's own CLI variable, nor a Kubernetes service link: most
/// likely a typo (`LB_STRATGY`) that would otherwise be silently ignored.
/// Meant to be logged once at startup (and by `lb --check`).
pub fn env_warnings() -> Vec<String> {
    let mut warnings = Vec::new();
    for (name, value) in std::env::vars_os() {
        let (Some(name), value) = (name.to_str(), value.to_string_lossy()) else {
            continue;
        };
        let Some(key) = name
            .get(..ENV_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
            .map(|_| &name[ENV_PREFIX.len()..])
        else {
            continue;
        };
        let cli = CLI_ENV_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key));
        if is_override(key) || cli || is_service_link(name, &value) {
            continue;
        }
        warnings.push(format!(
            "environment variable {name} is ignored: `{}` is not a config key (overrides are \
             LB_<KEY> or LB_<KEY>__<SUBKEY> with KEY one of {})",
            key.split("__")
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            top_level_keys().join(", ")
        ));
    }
    warnings.sort();
    warnings
}

/// A config as loaded, with what is worth a warning about it.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// SHA-256 of the bytes read.
    pub hash: ContentHash,
    /// Legal but probably not meant (a `per_try_timeout` the request timeout
    /// cuts short; for `--check`, a backend host name that does not resolve).
    pub warnings: Vec<Diagnostic>,
}

impl Config {
    /// Reads, parses and validates the file at `path`, applying `LB_*`
    /// environment overrides. Returns the config with the hash of the bytes read.
    pub fn load(path: &Path) -> Result<(Config, ContentHash), ConfigError> {
        let loaded = Config::load_with_warnings(path)?;
        Ok((loaded.config, loaded.hash))
    }

    /// [`Config::load`], keeping the warnings (logged at startup).
    pub fn load_with_warnings(path: &Path) -> Result<Loaded, ConfigError> {
        Config::load_inner(path, Lookups::Skip)
    }

    /// What `lb --check` reports: [`Config::load_with_warnings`], plus a
    /// warning for each backend host name that does not resolve now (as
    /// `nginx -t` fails on one). Blocks on DNS.
    pub fn check(path: &Path) -> Result<Loaded, ConfigError> {
        Config::load_inner(path, Lookups::Resolve)
    }

    fn load_inner(path: &Path, lookups: Lookups) -> Result<Loaded, ConfigError> {
        let bytes = read_file(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let hash = ContentHash::of(&bytes);
        let (config, warnings) = Config::parse_inner(&bytes, path, lookups)?;
        Ok(Loaded {
            config,
            hash,
            warnings,
        })
    }

    /// Parses and validates config text; `path` is only used in messages.
    /// CPU-bound (up to [`MAX_FILE_BYTES`] of YAML): async callers run it on
    /// a blocking thread.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Config, ConfigError> {
        Ok(Config::parse_with_warnings(bytes, path)?.0)
    }

    /// [`Config::parse`], keeping the warnings.
    pub fn parse_with_warnings(
        bytes: &[u8],
        path: &Path,
    ) -> Result<(Config, Vec<Diagnostic>), ConfigError> {
        Config::parse_inner(bytes, path, Lookups::Skip)
    }

    fn parse_inner(
        bytes: &[u8],
        path: &Path,
        lookups: Lookups,
    ) -> Result<(Config, Vec<Diagnostic>), ConfigError> {
        let invalid = |origin: Origin, message: String| {
            ConfigError::Invalid(Diagnostic {
                file: path.to_owned(),
                origin,
                field: String::new(),
                message,
            })
        };
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(invalid(
                Origin::WholeFile,
                format!(
                    "larger than {} MiB; a config file is never that big",
                    MAX_FILE_BYTES >> 20
                ),
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            invalid(
                Origin::File(position_of_byte(bytes, e.valid_up_to())),
                "not UTF-8 text; save the file as UTF-8".to_owned(),
            )
        })?;
        // A byte order mark is legal YAML and Windows editors write one, but
        // the YAML parser takes it for the start of a second document. It is
        // no column either, so positions in later errors stay right.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if text.trim().is_empty() {
            return Err(ConfigError::Empty {
                path: path.to_owned(),
            });
        }
        check_nesting(text).map_err(|(at, message)| invalid(Origin::File(at), message))?;
        // First pass keeps line/column for everything the file itself gets wrong.
        let _: RawConfig = yaml_serde::from_str(text)
            .map_err(|e| ConfigError::Invalid(yaml_diagnostic(&e, text, path)))?;
        let figment = Figment::from(Data::<YamlSerde>::string(text)).merge(env_overrides());
        let placer = Placer {
            file: path,
            text,
            figment: &figment,
        };
        let raw: RawConfig = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(placer.figment_diagnostic(&e)))?;
        let mut config = validate::validate(raw)
            .map_err(|(field, message)| ConfigError::Invalid(placer.diagnostic(field, message)))?;
        let named = config.listeners_named;
        for (i, listener) in config.listeners.iter_mut().enumerate() {
            let Some(tls) = &mut listener.tls else {
                continue;
            };
            tls.resolve_against(path.parent().unwrap_or(Path::new(".")));
            tls.check_files().map_err(|(field, message)| {
                let field = if named {
                    format!("listeners[{i}].{field}")
                } else {
                    field
                };
                ConfigError::Invalid(placer.diagnostic(field, message))
            })?;
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for pool in &mut config.pools {
            if pool.tls.is_none() {
                continue;
            }
            // `pool.tls` is Some: the loop skipped the pools without one.
            let tls = Arc::make_mut(pool).tls.as_mut().expect("checked above");
            tls.resolve_against(dir);
            tls.check_files().map_err(|(field, message)| {
                ConfigError::Invalid(placer.diagnostic(field, message))
            })?;
        }
        let mut warnings = validate::warnings(&config);
        if lookups == Lookups::Resolve {
            warnings.extend(unresolved_backends(&config));
        }
        let warnings = warnings
            .into_iter()
            .map(|(field, message)| placer.diagnostic(field, message))
            .collect();
        Ok((config, warnings))
    }

    /// The first listener's address: a file without `listeners:` listens
    /// only there.
    pub fn listen(&self) -> SocketAddr {
        // validate() refuses a config without a listener.
        self.listeners[0].address
    }

    /// The one listener of a file without `listeners:` (`listen`, `mode`,
    /// `tls` at the top level); `None` when the file names its listeners.
    pub fn sole_listener(&self) -> Option<&ListenerConfig> {
        (!self.listeners_named).then(|| &self.listeners[0])
    }

    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name.as_str() == name)
    }

    /// Every route of every listener: the http routes, then each tcp
    /// listener's own.
    pub fn all_routes(&self) -> impl Iterator<Item = &RouteConfig> + Clone {
        self.routes
            .iter()
            .chain(self.listeners.iter().flat_map(|l| l.routes.iter()))
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<PoolConfig>> {
        self.pools.iter().find(|p| p.name.as_str() == name)
    }

    /// The first pool: the only one of a file without `pools:`, and the
    /// one `mode: tcp` serves.
    pub fn first_pool(&self) -> &Arc<PoolConfig> {
        // validate() refuses a config without a pool.
        &self.pools[0]
    }

    /// Every backend of every pool, with its pool.
    pub fn all_backends(&self) -> impl Iterator<Item = (&PoolConfig, &BackendConfig)> {
        self.pools
            .iter()
            .flat_map(|p| p.backends.iter().map(move |b| (&**p, b)))
    }

    /// Pools that no route reaches (for a warning at load and in `--check`).
    pub fn warnings(&self) -> Vec<String> {
        pools::unreachable_pools(&self.pools, self.all_routes())
            .into_iter()
            .map(|name| format!("pools.{name}: no route sends requests to this pool"))
            .collect()
    }

    /// One line for `lb --check` and the startup log.
    pub fn summary(&self) -> String {
        let pools: Vec<String> = self.pools.iter().map(|p| p.summary()).collect();
        let admin = match self.admin {
            Some(addr) => format!("admin {addr}"),
            None => "admin off".to_owned(),
        };
        let access_log = if self.access_log { "on" } else { "off" };
        let served = if self.pools.len() == 1 {
            pools[0].clone()
        } else {
            format!(
                "{} pools, {} routes: {}",
                self.pools.len(),
                self.routes.len(),
                pools.join("; ")
            )
        };
        let listen = match self.sole_listener() {
            Some(l) => format!("listen {} ({})", l.address, l.mode),
            None => {
                let all: Vec<String> = self.listeners.iter().map(|l| l.summary()).collect();
                format!("listeners {}", all.join(", "))
            }
        };
        format!("{listen}, {served}, {admin}, access log {access_log}")
    }

    /// The route table, one line per route in file order, for `lb --check`;
    /// empty for a file without `pools:` (its one route takes everything).
    pub fn route_table(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, key: String, host: String, path: &str, r: &RouteConfig| {
            let on = if r.listeners.is_empty() {
                String::new()
            } else {
                let names: Vec<&str> = r.listeners.iter().map(ListenerName::as_str).collect();
                format!(" (on {})", names.join(", "))
            };
            out.push_str(&format!(
                "  {key}  {host:<29} path {path:<16} -> pool {}{}{on}\n",
                self.pools[r.pool].name,
                if r.strip_prefix {
                    " (strip prefix)"
                } else {
                    ""
                }
            ));
        };
        let pattern = |r: &RouteConfig| r.host.as_ref().map_or("*".to_owned(), |h| h.to_string());
        if self.listeners_named {
            out.push_str("listeners:\n");
            for l in &self.listeners {
                out.push_str(&format!("  {}\n", l.summary()));
            }
        } else if self.pools.len() == 1 && self.pools[0].name.as_str() == PoolName::DEFAULT {
            return out;
        }
        for (i, r) in self.routes.iter().enumerate() {
            line(
                &mut out,
                format!("routes[{i}]"),
                format!("host {}", pattern(r)),
                &r.path_prefix,
                r,
            );
        }
        for (li, l) in self.listeners.iter().enumerate() {
            for (i, r) in l.routes.iter().enumerate() {
                let key = if self.listeners_named {
                    format!("listeners[{li}].routes[{i}]")
                } else {
                    format!("routes[{i}]")
                };
                line(&mut out, key, format!("sni {}", pattern(r)), "-", r);
            }
        }
        out
    }
}

impl PoolConfig {
    /// One line about this pool, for the summary.
    pub fn summary(&self) -> String {
        let health = match &self.health_check {
            Some(HealthCheck {
                path: Some(path),
                interval,
                ..
            }) => format!("health checks {path} every {interval:?}"),
            Some(HealthCheck {
                grpc: Some(service),
                interval,
                ..
            }) => format!("health checks gRPC Health/Check {service:?} every {interval:?}"),
            Some(h) => format!("health checks tcp connect every {:?}", h.interval),
            None => "health checks off".to_owned(),
        };
        let prefix = if self.name.as_str() == PoolName::DEFAULT {
            String::new()
        } else {
            format!("pool {}: ", self.name)
        };
        let backends = match self.backends.len() {
            1 => "1 backend".to_owned(),
            n => format!("{n} backends"),
        };
        let attempts = match self.retry.attempts.get() {
            1 => "retry off (1 attempt)".to_owned(),
            n => format!("retry {n} attempts"),
        };
        // The default protocol goes unsaid: every line before it existed.
        let protocol = match self.protocol {
            Protocol::Http1 => String::new(),
            p => format!(", protocol {p}"),
        };
        let protocol = match &self.tls {
            Some(tls) => format!("{protocol}, {}", tls.describe()),
            None => protocol,
        };
        let members = match &self.discovery {
            Some(d) => format!(
                "backends from {} (every {}, resolver {})",
                d.describe(),
                humantime::format_duration(d.refresh),
                d.resolver
                    .map_or_else(|| "from /etc/resolv.conf".to_owned(), |r| r.to_string())
            ),
            None => format!("{backends} (total weight {})", self.total_weight()),
        };
        format!(
            "{prefix}strategy {}{protocol}, {members}, {health}, {attempts}",
            self.strategy,
        )
    }
}

/// Whether parsing looks backend host names up (only `--check` does: lb
/// itself resolves on every connect, and a name may appear later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookups {
    Skip,
    Resolve,
}

/// One `(field, message)` per backend whose host name does not resolve now.
/// IP addresses are not looked up; each name is looked up once.
fn unresolved_backends(config: &Config) -> Vec<(String, String)> {
    use std::net::ToSocketAddrs;
    let mut looked_up: std::collections::HashMap<&str, Option<String>> = Default::default();
    let mut warnings = Vec::new();
    let members = config.pools.iter().flat_map(|pool| {
        let prefix = validate::pool_key_prefix(config, pool);
        pool.backends
            .iter()
            .enumerate()
            .map(move |(i, b)| (format!("{prefix}backends[{i}].address"), b))
    });
    for (field, backend) in members {
        let address = backend.address.as_str();
        let Some((host, _port)) = address.rsplit_once(':') else {
            continue;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.parse::<std::net::IpAddr>().is_ok() {
            continue;
        }
        let failure = looked_up
            .entry(address)
            .or_insert_with(|| match address.to_socket_addrs() {
                Ok(addrs) if addrs.len() > 0 => None,
                Ok(_) => Some("no address".to_owned()),
                Err(e) => Some(e.to_string()),
            });
        if let Some(why) = failure {
            warnings.push((
                field,
                format!(
                    "host name {host:?} does not resolve ({why}); every connection to it fails \
                     until it does"
                ),
            ));
        }
    }
    warnings
}

#[cfg(test)]
mod tests;
