//! TLS termination on a listener: the handshake (bounded by
//! `timeouts.client_header`), and the certificates, which follow their
//! files while lb runs; the same follower re-reads the CA and client
//! certificate of every pool's HTTPS to its backends.
//!
//! A [`Terminator`] is built from the config's `tls:` (a reload that edits
//! it builds a new one; a reload that cannot load its files is refused and
//! the old one serves on). Its certificates are re-read whenever their
//! files change, however they change: written in place, renamed over,
//! deleted and recreated, or a Kubernetes Secret's `..data` symlink swapped
//! ([`follow`] watches the files' directories, with a once-a-second look
//! as a backstop), and on every reload (SIGHUP, `POST /reload`). A pair is
//! applied only when both its files parse and the key is the certificate's;
//! until then the pair that served keeps serving, and a line says which
//! file and why, once per state of the files. Applying swaps the store the
//! handshake resolver reads: new handshakes get the new pair, open
//! connections keep their session.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::tls::{TlsSettings, TlsVersion};
use crate::config::{ListenerName, PoolName};
use crate::core::runtime::Runtime;
use crate::net::listen::Listeners;
use crate::obs::tls::CertStatus;
use crate::tls::client::{ClientTls, Rechecked};
use crate::tls::pair::{self, CertPair, PairError};
use crate::tls::store::{CertStore, LiveResolver};

/// How often the certificate files are looked at without an event: the
/// backstop for a watch that missed one (a directory replaced whole).
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// After an event, how long to wait for its siblings (a rotation writes
/// two files) before reading.
const SETTLE: Duration = Duration::from_millis(20);

/// TLS for the listener: its settings, its acceptor and its live store.
pub struct Terminator {
    /// The listener it terminates for (its certificates are shown under
    /// this name).
    listener: ListenerName,
    settings: TlsSettings,
    acceptor: TlsAcceptor,
    resolver: Arc<LiveResolver>,
    /// Per configured pair, when its files are not what serves.
    judged: Mutex<Vec<Judged>>,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Terminator {
    /// Loads every pair of `settings`; any that cannot serve is an error
    /// naming its file.
    pub fn new(settings: &TlsSettings, listener: ListenerName) -> Result<Terminator, String> {
        let pairs = settings
            .certificates
            .iter()
            .map(|c| CertPair::load(&c.cert, &c.key))
            .collect::<Result<Vec<_>, PairError>>()
            .map_err(|e| e.to_string())?;
        let judged = vec![Judged::default(); pairs.len()];
        let store = CertStore::new(pairs).ok_or("tls.certificates is empty")?;
        let resolver = Arc::new(LiveResolver::new(store));
        let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let builder = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(versions)
            .map_err(|e| format!("tls: {e}"))?;
        let builder = match &settings.client_auth {
            None => builder.with_no_client_auth(),
            Some(auth) => {
                let roots = pair::read_ca(&auth.ca).map_err(|e| e.to_string())?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    crate::tls::provider(),
                );
                let verifier = if auth.required {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", auth.ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(Arc::clone(&resolver) as _);
        config.alpn_protocols = settings.alpn.iter().map(|a| a.id().to_vec()).collect();
        Ok(Terminator {
            listener,
            settings: settings.clone(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            judged: Mutex::new(judged),
        })
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The directories holding the files, for the watcher.
    fn directories(&self) -> BTreeSet<PathBuf> {
        self.settings
            .files()
            .map(|f| {
                f.parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_owned)
            })
            .collect()
    }

    /// Reads the files again and applies each pair that changed and is
    /// whole; a pair that changed and is not keeps the one that served.
    pub fn recheck(&self, rt: &Runtime) {
        let current = self.resolver.current();
        let mut pairs: Vec<CertPair> = current.pairs().to_vec();
        let mut judged = self.judged.lock().unwrap_or_else(PoisonError::into_inner);
        let mut applied = false;
        for (i, files) in self.settings.certificates.iter().enumerate() {
            let read = pair::read_pem(&files.cert)
                .and_then(|c| pair::read_pem(&files.key).map(|k| (c, k)));
            let verdict = match read {
                Err(e) => Err(e.to_string()),
                Ok((cert, key)) => {
                    let fp = pair::fingerprint(&cert, &key);
                    if fp == pairs[i].fingerprint {
                        // What serves: a half-done rotation undone.
                        judged[i] = Judged::default();
                        continue;
                    }
                    if judged[i].broken == Some(fp) {
                        continue;
                    }
                    CertPair::from_pem(&files.cert, &cert, &files.key, &key).map_err(|e| {
                        judged[i].broken = Some(fp);
                        e.to_string()
                    })
                }
            };
            match verdict {
                Ok(pair) => {
                    tracing::info!(
                        "{} changed: serving the new certificate ({}; valid until {})",
                        files.cert.display(),
                        pair.info.names.join(", "),
                        httpdate::fmt_http_date(pair.info.not_after)
                    );
                    judged[i] = Judged::default();
                    pairs[i] = pair;
                    applied = true;
                    rt.tls.reloads.fetch_add(1, Relaxed);
                }
                Err(why) => {
                    if judged[i].error.as_deref() != Some(&why) {
                        tracing::warn!(
                            "{} changed; {}: keeping the current pair",
                            files.cert.display(),
                            not_yet(&why)
                        );
                        rt.tls.reload_failures.fetch_add(1, Relaxed);
                        judged[i].error = Some(why);
                    }
                }
            }
        }
        if applied {
            if let Some(store) = CertStore::new(pairs) {
                self.resolver.swap(store);
            }
        }
        drop(judged);
        self.publish(rt);
    }

    /// Writes the serving certificates into `rt.tls` for `/status` and
    /// `/metrics`.
    pub fn publish(&self, rt: &Runtime) {
        let store = self.resolver.current();
        let judged = self.judged.lock().unwrap_or_else(PoisonError::into_inner);
        let certs = store
            .pairs()
            .iter()
            .zip(judged.iter())
            .map(|(p, judged)| CertStatus {
                cert_file: p.info.cert_file.clone(),
                key_file: p.info.key_file.clone(),
                names: p.info.names.clone(),
                not_after: p.info.not_after,
                error: judged.error.clone(),
            })
            .collect();
        rt.tls.set(self.listener.as_str(), certs);
    }
}

/// What the last look at one pair's files found, when they are not what
/// serves: the bytes judged broken (not read again until they change) and
/// why (logged once, shown on `/status`).
#[derive(Debug, Default, Clone)]
struct Judged {
    broken: Option<u64>,
    error: Option<String>,
}

/// `why`, worded for a rotation that may be half-way.
fn not_yet(why: &str) -> String {
    if why.contains("does not match") {
        "its key does not match (yet)".to_owned()
    } else {
        why.to_owned()
    }
}

/// A listener's TLS, if any: swapped by reloads, read per connection.
#[derive(Debug)]
pub struct TlsSlot {
    listener: ListenerName,
    current: ArcSwapOption<Terminator>,
}

impl TlsSlot {
    /// The slot of the listener named `listener`, empty (plain TCP).
    pub fn new(listener: ListenerName) -> TlsSlot {
        TlsSlot {
            listener,
            current: ArcSwapOption::empty(),
        }
    }

    pub fn current(&self) -> Option<Arc<Terminator>> {
        self.current.load_full()
    }

    /// What `settings` need: the current terminator when it has the same
    /// settings (its files re-read), else a new one. `Err` names the file
    /// that cannot serve.
    pub fn prepare(
        &self,
        settings: Option<&TlsSettings>,
        rt: &Runtime,
    ) -> Result<Option<Arc<Terminator>>, String> {
        let Some(settings) = settings else {
            return Ok(None);
        };
        match self.current() {
            Some(t) if t.settings() == settings => {
                t.recheck(rt);
                Ok(Some(t))
            }
            _ => Terminator::new(settings, self.listener.clone()).map(|t| Some(Arc::new(t))),
        }
    }

    /// Serves `next` from the next connection on.
    pub fn set(&self, next: Option<Arc<Terminator>>, rt: &Runtime) {
        match &next {
            Some(t) => t.publish(rt),
            None => rt.tls.remove(self.listener.as_str()),
        }
        self.current.store(next);
    }
}

/// The TLS of every pool that has some (HTTPS to its backends).
fn backend_tls(rt: &Runtime) -> Vec<(PoolName, Arc<ClientTls>)> {
    rt.snapshot()
        .pools
        .iter()
        .filter_map(|p| Some((p.name().clone(), Arc::clone(p.tls.as_ref()?))))
        .collect()
}

/// Reads every pool's backend TLS files again; a change applies to new
/// backend connections, or is logged (once per state of the files) and
/// the settings that worked go on.
pub fn recheck_backend_tls(rt: &Runtime) {
    for (pool, tls) in backend_tls(rt) {
        match tls.recheck() {
            Rechecked::Same => {}
            Rechecked::Applied => {
                tracing::info!(
                    "pool {pool}: backend TLS files changed: new backend connections use them"
                );
                rt.tls.reloads.fetch_add(1, Relaxed);
            }
            Rechecked::Broken(why) => {
                tracing::warn!(
                    "pool {pool}: backend TLS files changed; {}: keeping the settings that worked",
                    not_yet(&why)
                );
                rt.tls.reload_failures.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Follows the certificate files of every listener's terminator and every
/// pool's backend TLS, until `stop` turns true.
pub async fn follow(listeners: Arc<Listeners>, rt: Arc<Runtime>, mut stop: watch::Receiver<bool>) {
    use notify::Watcher;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watched: BTreeSet<PathBuf> = BTreeSet::new();
    // Made when a terminator first exists: without TLS, no watch thread
    // and no descriptors.
    let mut watcher: Option<notify::RecommendedWatcher> = None;
    loop {
        let current = listeners.terminators();
        let backends = backend_tls(&rt);
        if (!current.is_empty() || !backends.is_empty()) && watcher.is_none() {
            let tx = events_tx.clone();
            watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
                let _ = tx.send(());
            })
            .map_err(|e| {
                tracing::warn!(
                    "cannot watch the certificate files ({e}); looking every {LOOK_EVERY:?}"
                )
            })
            .ok();
        }
        if let Some(w) = watcher.as_mut() {
            let dirs: BTreeSet<PathBuf> = current
                .iter()
                .flat_map(|t| t.directories())
                .chain(backends.iter().flat_map(|(_, b)| b.directories()))
                .collect();
            if dirs != watched {
                for gone in watched.difference(&dirs) {
                    let _ = w.unwatch(gone);
                }
                for new in dirs.difference(&watched) {
                    if let Err(e) = w.watch(new, notify::RecursiveMode::NonRecursive) {
                        tracing::debug!("cannot watch {}: {e}", new.display());
                    }
                }
                watched = dirs;
            }
        }
        drop((current, backends));
        tokio::select! {
            () = crate::http::server::draining(&mut stop) => return,
            Some(()) = events.recv() => {
                tokio::time::sleep(SETTLE).await;
                while events.try_recv().is_ok() {}
            }
            // A directory deleted and recreated loses its watch: watch
            // again at each look.
            () = tokio::time::sleep(LOOK_EVERY) => watched.clear(),
        }
        for t in listeners.terminators() {
            t.recheck(&rt);
        }
        recheck_backend_tls(&rt);
    }
}
