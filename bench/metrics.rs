//! Micro-benchmark of what counting costs a request: the calls the request
//! path makes per proxied request (one attempt outcome, one response by
//! status code into the backend's counters, one histogram observation), on
//! one thread and on two threads hammering the same backend's counters
//! (the worst case: every increment bounces a cache line between cores).
//!
//! `cargo bench --bench metrics` (plain binary, no criterion).
//! `METRICS_BENCH_SECS` (default 1) sets the measuring time per case.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use lb::obs::metrics::{AttemptOutcome, BackendMetrics, Metrics};

/// What the request path records for one request that one attempt served.
fn one_request(m: &Metrics, b: &BackendMetrics, took: Duration) {
    b.attempt(AttemptOutcome::Success);
    m.request(Some(b), None, 200, took);
}

/// Mean ns per request over `secs` seconds on `threads` threads.
fn run(threads: usize, secs: f64) -> f64 {
    let m = Metrics::default();
    let b = BackendMetrics::default();
    let start = Barrier::new(threads);
    let per_thread: Vec<(u64, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (m, b, start) = (&m, &b, &start);
                s.spawn(move || {
                    start.wait();
                    let began = Instant::now();
                    let budget = Duration::from_secs_f64(secs);
                    let mut n = 0u64;
                    while began.elapsed() < budget {
                        for i in 0..1024u64 {
                            // Spread durations over the buckets like real traffic.
                            let took = Duration::from_micros((i * 37 + t as u64) % 5_000);
                            one_request(black_box(m), black_box(b), took);
                        }
                        n += 1024;
                    }
                    (n, began.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ns: f64 = per_thread
        .iter()
        .map(|(n, d)| d.as_nanos() as f64 / *n as f64)
        .sum();
    ns / threads as f64
}

fn main() {
    let secs: f64 = std::env::var("METRICS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    println!("counting one proxied request (attempt + status + histogram):");
    println!("  1 thread : {:6.1} ns/request", run(1, secs));
    println!(
        "  2 threads: {:6.1} ns/request (same backend, contended)",
        run(2, secs)
    );
}
