//! Pools discovered from DNS: one task per discovered pool asks its name
//! (A and AAAA, or SRV) with hickory-resolver, off the request path, and
//! hands each new set of addresses to [`Runtime::rediscovered`], which
//! applies it as a reload applies new backends (state kept by pool and
//! address, health checks and slow start for joiners).
//!
//! The failure rules, from what went wrong elsewhere (HAProxy, Envoy,
//! Traefik, CoreDNS): a timeout, SERVFAIL or REFUSED keeps the last good set
//! serving, logged once when it starts and once when it ends, counted, and
//! retried with a backoff, never a storm; only an answer that says the name
//! has no address (NXDOMAIN, or NOERROR with no records) empties the pool.
//! A name is asked again after its TTL (at least [`MIN_REFRESH`]), at most
//! `refresh` apart. A reload that keeps a pool's `discovery` keeps its task
//! and its set; one that edits it starts over.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::sync::{oneshot, watch};

use crate::config::discovery::{Discovery, Lookup, MIN_REFRESH};
use crate::config::{BackendConfig, PoolName};
use crate::core::runtime::Runtime;

/// How long one resolution may take before it counts as a timeout.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs a follower per discovered pool of the current config until `stop`.
pub async fn supervise(runtime: Arc<Runtime>, mut stop: watch::Receiver<bool>) {
    let mut changes = runtime.subscribe();
    // A follower's stop sender: dropping it ends the follower.
    let mut running: HashMap<PoolName, (Discovery, oneshot::Sender<()>)> = HashMap::new();
    loop {
        let snap = runtime.snapshot();
        let wanted: Vec<(PoolName, Discovery)> = snap
            .config
            .pools
            .iter()
            .filter_map(|p| p.discovery.clone().map(|d| (p.name.clone(), d)))
            .collect();
        drop(snap);
        running.retain(|name, (d, _)| wanted.iter().any(|(n, w)| n == name && w == d));
        for (name, discovery) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            tokio::spawn(follow(
                Arc::downgrade(&runtime),
                name.clone(),
                discovery.clone(),
                rx,
            ));
            running.insert(name, (discovery, tx));
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|stopping| *stopping) => break,
        }
    }
}

/// What one resolution found.
enum Answer {
    /// The backends, the shortest TTL among the records, and each address
    /// with its TTL for `/status`.
    Found(Vec<BackendConfig>, Duration, Vec<(String, u32)>),
    /// The name has no address: NXDOMAIN, or NOERROR without records.
    Empty(&'static str),
    /// The resolver did not say (timeout, SERVFAIL, REFUSED, no answer):
    /// keep what serves.
    Failed(String),
}

/// Follows `discovery` of `pool` until `stop` fires or lb is gone.
async fn follow(
    runtime: std::sync::Weak<Runtime>,
    pool: PoolName,
    discovery: Discovery,
    mut stop: oneshot::Receiver<()>,
) {
    let resolver = match resolver(&discovery) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("pool {pool}: cannot set up DNS discovery ({e}); the pool stays empty");
            return;
        }
    };
    let what = discovery.describe();
    // When failures began, and how long to wait before the next try.
    let mut failing = false;
    let mut backoff = MIN_REFRESH;
    loop {
        let answer = resolve(&resolver, &discovery).await;
        let Some(rt) = runtime.upgrade() else {
            return;
        };
        let counts = rt.discovered.counts(&pool);
        let wait = match answer {
            Answer::Found(backends, ttl, addresses) => {
                counts.ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if std::mem::take(&mut failing) {
                    tracing::info!(
                        "pool {pool}: {what} resolves again ({} addresses)",
                        backends.len()
                    );
                }
                backoff = MIN_REFRESH;
                rt.discovered
                    .record(&pool, "ok".to_owned(), Some(addresses));
                apply(&rt, &pool, &discovery, backends).await;
                ttl.clamp(MIN_REFRESH, discovery.refresh.max(MIN_REFRESH))
            }
            Answer::Empty(why) => {
                counts
                    .empty
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                failing = false;
                backoff = MIN_REFRESH;
                rt.discovered
                    .record(&pool, why.to_owned(), Some(Vec::new()));
                if apply(&rt, &pool, &discovery, Vec::new()).await {
                    tracing::warn!("pool {pool}: {what}: {why}; the pool has no backend (503) until it resolves");
                }
                discovery.refresh
            }
            Answer::Failed(why) => {
                counts
                    .failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!("pool {pool}: {what} failed to resolve ({why}); keeping the last good backends, retrying");
                }
                rt.discovered.record(&pool, why, None);
                let wait = backoff;
                backoff = (backoff * 2).min(discovery.refresh);
                wait
            }
        };
        drop(rt);
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Applies a new set off the async workers (a snapshot over thousands of
/// backends is CPU work). `true` when it changed the pool.
async fn apply(
    rt: &Arc<Runtime>,
    pool: &PoolName,
    discovery: &Discovery,
    backends: Vec<BackendConfig>,
) -> bool {
    let (rt, pool, discovery) = (Arc::clone(rt), pool.clone(), discovery.clone());
    let changed = tokio::task::spawn_blocking(move || {
        let cpu = || rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        let started = cpu();
        let diff = rt.rediscovered(&pool, &discovery, backends)?;
        let took = cpu() - started;
        let took_ms = took.tv_sec as f64 * 1e3 + took.tv_nsec as f64 / 1e6;
        rt.discovered.applied_in(&pool, took_ms);
        if !diff.is_empty() {
            tracing::info!(
                "pool {pool}: {} now: +{} -{}{} (applied in {took_ms:.1} ms of CPU)",
                discovery.describe(),
                diff.added.len(),
                diff.removed.len(),
                summary(&diff)
            );
        }
        Some(())
    })
    .await;
    matches!(changed, Ok(Some(())))
}

fn summary(diff: &crate::config::ListDiff) -> String {
    // Thousands of addresses would make one unreadable line.
    if diff.added.len() + diff.removed.len() > 8 {
        return String::new();
    }
    let mut parts = Vec::new();
    if !diff.added.is_empty() {
        parts.push(format!("added {}", diff.added.join(", ")));
    }
    if !diff.removed.is_empty() {
        parts.push(format!("removed {}", diff.removed.join(", ")));
    }
    format!(" ({})", parts.join("; "))
}

/// A resolver for `discovery`: its nameserver (UDP, TCP when an answer is
/// truncated), or the system's. No cache: lb schedules by the TTL itself
/// and must see a changed answer when it asks.
fn resolver(discovery: &Discovery) -> Result<TokioResolver, ResolveError> {
    let provider = TokioConnectionProvider::default();
    let mut builder = match discovery.resolver {
        Some(at) => {
            let servers = NameServerConfigGroup::from_ips_clear(&[at.ip()], at.port(), true);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                provider,
            )
        }
        None => TokioResolver::builder(provider)?,
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.cache_size = 0;
    opts.timeout = RESOLVE_TIMEOUT;
    opts.attempts = 1;
    opts.ndots = 0;
    opts.try_tcp_on_error = true;
    Ok(builder.build())
}

/// Asks once.
async fn resolve(resolver: &TokioResolver, discovery: &Discovery) -> Answer {
    let asked = tokio::time::timeout(RESOLVE_TIMEOUT * 2, async {
        match &discovery.lookup {
            Lookup::Addresses { name, port } => {
                let fqdn = format!("{name}.");
                resolver.lookup_ip(fqdn).await.map(|found| {
                    let lookup = found.as_lookup();
                    let mut seen = Vec::new();
                    for r in lookup.records() {
                        let ip = match r.data() {
                            RData::A(a) => std::net::IpAddr::V4(a.0),
                            RData::AAAA(a) => std::net::IpAddr::V6(a.0),
                            _ => continue,
                        };
                        seen.push((SocketAddr::new(ip, *port), r.ttl(), discovery.weight));
                    }
                    seen
                })
            }
            Lookup::Service { name } => {
                let fqdn = format!("{name}.");
                match resolver.srv_lookup(fqdn).await {
                    Err(e) => Err(e),
                    Ok(srv) => {
                        let mut seen = Vec::new();
                        // Targets' addresses from the additional section when
                        // given, else asked (few targets: headless Services
                        // answer with them).
                        let additional: Vec<_> = srv
                            .as_lookup()
                            .records()
                            .iter()
                            .filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
                            .cloned()
                            .collect();
                        for r in srv.as_lookup().records() {
                            let RData::SRV(s) = r.data() else { continue };
                            let weight = u32::from(s.weight()).clamp(1, 256);
                            let target = s.target().clone();
                            let mut ips: Vec<(std::net::IpAddr, u32)> = additional
                                .iter()
                                .filter(|a| a.name() == &target)
                                .filter_map(|a| match a.data() {
                                    RData::A(v4) => Some((std::net::IpAddr::V4(v4.0), a.ttl())),
                                    RData::AAAA(v6) => Some((std::net::IpAddr::V6(v6.0), a.ttl())),
                                    _ => None,
                                })
                                .collect();
                            if ips.is_empty() {
                                if let Ok(found) = resolver.lookup_ip(target.clone()).await {
                                    let lookup = found.as_lookup();
                                    ips = lookup
                                        .records()
                                        .iter()
                                        .filter_map(|a| match a.data() {
                                            RData::A(v4) => {
                                                Some((std::net::IpAddr::V4(v4.0), a.ttl()))
                                            }
                                            RData::AAAA(v6) => {
                                                Some((std::net::IpAddr::V6(v6.0), a.ttl()))
                                            }
                                            _ => None,
                                        })
                                        .collect();
                                }
                            }
                            for (ip, ttl) in ips {
                                seen.push((
                                    SocketAddr::new(ip, s.port()),
                                    ttl.min(r.ttl()),
                                    weight,
                                ));
                            }
                        }
                        Ok(seen)
                    }
                }
            }
        }
    })
    .await;
    let found = match asked {
        Err(_) => return Answer::Failed("timeout".to_owned()),
        Ok(Err(e)) => return classify(&e),
        Ok(Ok(found)) => found,
    };
    if found.is_empty() {
        return Answer::Empty("no address records");
    }
    let ttl = found.iter().map(|(_, ttl, _)| *ttl).min().unwrap_or(0);
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(found.len());
    let mut addresses = Vec::with_capacity(found.len());
    for (addr, ttl, weight) in found {
        let address = crate::config::BackendAddr::from_socket(addr);
        if backends.iter().any(|b| b.address == address) {
            continue;
        }
        addresses.push((address.to_string(), ttl));
        backends.push(BackendConfig { address, weight });
    }
    // A stable order whatever order the server answers in: round robin and
    // the selector's reuse see the same pool.
    backends.sort_by(|a, b| a.address.as_str().cmp(b.address.as_str()));
    addresses.sort();
    Answer::Found(backends, Duration::from_secs(u64::from(ttl)), addresses)
}

/// A failed lookup: "no backends" only when the server said so.
fn classify(e: &ResolveError) -> Answer {
    if let Some(proto) = e.proto() {
        if let hickory_resolver::proto::ProtoErrorKind::NoRecordsFound { response_code, .. } =
            proto.kind()
        {
            return match *response_code {
                ResponseCode::NXDomain => Answer::Empty("NXDOMAIN"),
                ResponseCode::NoError => Answer::Empty("no address records"),
                // SERVFAIL, REFUSED and the like say nothing of the name.
                code => Answer::Failed(code.to_string()),
            };
        }
    }
    Answer::Failed(e.to_string())
}

/// `lb --check`: each discovered pool's name asked once now; a warning per
/// name that does not resolve to an address (lb would start and answer 503
/// for that pool until it does).
pub fn check_names(config: &crate::config::Config) -> Vec<String> {
    let pools: Vec<(PoolName, Discovery)> = config
        .pools
        .iter()
        .filter_map(|p| p.discovery.clone().map(|d| (p.name.clone(), d)))
        .collect();
    if pools.is_empty() {
        return Vec::new();
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    rt.block_on(async {
        let mut warnings = Vec::new();
        for (pool, discovery) in pools {
            let what = discovery.describe();
            let why = match resolver(&discovery) {
                Err(e) => e.to_string(),
                Ok(r) => match resolve(&r, &discovery).await {
                    Answer::Found(backends, _, _) => {
                        println!("pool {pool}: {what} resolves to {} backends now", backends.len());
                        continue;
                    }
                    Answer::Empty(why) => why.to_owned(),
                    Answer::Failed(why) => why,
                },
            };
            warnings.push(format!(
                "pool {pool}: {what} does not resolve now ({why}): lb would start and answer 503 for this pool until it does"
            ));
        }
        warnings
    })
}
