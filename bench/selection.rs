//! Micro-benchmark of `Selector::select` for every strategy.
//!
//! `cargo bench --bench selection` (plain binary, no criterion). For each
//! strategy (plus `round_robin` wrapped in slow start, nobody warming, to
//! show the wrapper's cost; `consistent_hash` is given a different key on
//! every call) × pool size (3, 100, 10,000) × weights (all 1; 1..=10 cycling) ×
//! eligibility (all; odd indexes down; first half down) it reports the mean
//! nanoseconds per `select` on one thread, then a 2-thread contended run of
//! round_robin and least_connections (one selector shared by both threads),
//! then the time `selection::build` takes for 10,000 backends (for
//! `consistent_hash`, the Maglev table of 1,000,003 slots plus the keyless
//! round-robin schedule).
//!
//! Backends are built exactly as lb builds them: a `Config` parsed from
//! generated YAML, its states from `StateTable::sync`. Every backend is idle
//! (in-flight 0), so least_connections and power_of_two_choices compare equal
//! loads; the cost of reading the counters is the same either way.
//!
//! `SELECTION_BENCH_SECS` (default 0.5) sets the measuring time per case.

use std::hint::black_box;
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use lb::config::{Config, Steering, Strategy};
use lb::core::selection::{self, hash, Backend, Pick, Selector};
use lb::core::state::{Clock, StateTable};

/// A strategy with its parameters, as the bench names it.
#[derive(Clone)]
struct Case {
    /// Row label.
    name: &'static str,
    /// The strategy built.
    strategy: Strategy,
    /// Its parameters (slow start for the wrapper row).
    steering: Steering,
}

impl Case {
    fn plain(strategy: Strategy) -> Case {
        Case {
            name: strategy.name(),
            strategy,
            steering: Steering::default(),
        }
    }

    fn build(&self, backends: &[Backend]) -> std::sync::Arc<dyn Selector> {
        selection::build(self.strategy, &self.steering, backends, Clock::new())
    }

    /// Whether each call gets a (different) hash key.
    fn keyed(&self) -> bool {
        self.strategy == Strategy::ConsistentHash
    }
}

fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = [
        Strategy::RoundRobin,
        Strategy::LeastConnections,
        Strategy::Random,
        Strategy::PowerOfTwoChoices,
        Strategy::ConsistentHash,
        Strategy::PeakEwma,
    ]
    .map(Case::plain)
    .into();
    v.push(Case {
        name: "rr + slow_start",
        strategy: Strategy::RoundRobin,
        steering: Steering {
            slow_start: Some(Duration::from_secs(30)),
            ..Steering::default()
        },
    });
    v
}
const SIZES: [usize; 3] = [3, 100, 10_000];
/// `select` calls between two clock reads.
const BATCH: u64 = 1_000;
const WARM_UP: Duration = Duration::from_millis(50);

#[derive(Clone, Copy)]
enum Weights {
    /// Every backend weight 1.
    Equal,
    /// 1, 2, …, 10, 1, 2, …
    Mixed,
}

impl Weights {
    fn of(self, i: usize) -> u32 {
        match self {
            Weights::Equal => 1,
            Weights::Mixed => 1 + (i % 10) as u32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Weights::Equal => "all 1",
            Weights::Mixed => "1..=10",
        }
    }
}

#[derive(Clone, Copy)]
enum Eligible {
    All,
    /// Every odd index rejected: half the pool down, interleaved.
    OddDown,
    /// Indexes `< n/2` rejected: half the pool down in one block (a zone).
    FirstHalfDown,
}

impl Eligible {
    fn name(self) -> &'static str {
        match self {
            Eligible::All => "all",
            Eligible::OddDown => "odd down",
            Eligible::FirstHalfDown => "1st half down",
        }
    }
}

/// The pool as lb builds it: YAML → `Config` → `StateTable::sync`.
fn pool(n: usize, weights: Weights) -> Vec<Backend> {
    let mut yaml = String::from("listen: 127.0.0.1:18080\nbackends:\n");
    for i in 0..n {
        let port = 20_000 + i;
        let weight = weights.of(i);
        yaml.push_str(&format!(
            "  - address: 127.0.0.1:{port}\n    weight: {weight}\n"
        ));
    }
    let config = Config::parse(yaml.as_bytes(), Path::new("bench")).expect("generated config");
    let states = StateTable::default().sync(&config, &|_| false).remove(0);
    config
        .first_pool()
        .backends
        .iter()
        .zip(states)
        .map(|(b, state)| Backend {
            addr: b.address.clone(),
            weight: b.weight,
            state,
        })
        .collect()
}

/// Calls `select` for `time` after a warm-up; returns (ops, elapsed).
fn run(
    sel: &dyn Selector,
    backends: &[Backend],
    eligible: &dyn Fn(usize) -> bool,
    keyed: bool,
    time: Duration,
) -> (u64, Duration) {
    let mut n = 0u64;
    let mut batch = || {
        for _ in 0..BATCH {
            n += 1;
            let pick = Pick {
                key: keyed.then(|| hash::mix(n)),
                eligible,
            };
            black_box(sel.select(black_box(backends), &pick));
        }
    };
    let warm = Instant::now();
    while warm.elapsed() < WARM_UP {
        batch();
    }
    let start = Instant::now();
    let mut ops = 0;
    loop {
        batch();
        ops += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= time {
            return (ops, elapsed);
        }
    }
}

fn ns_per_op(ops: u64, elapsed: Duration) -> f64 {
    elapsed.as_nanos() as f64 / ops as f64
}

/// One `select` outside the clock, to check the case does what it says.
fn check(sel: &dyn Selector, backends: &[Backend], eligible: &dyn Fn(usize) -> bool) {
    for k in 0..100 {
        let pick = Pick {
            key: Some(hash::mix(k)),
            eligible,
        };
        let i = sel.select(backends, &pick).expect("a backend");
        assert!(eligible(i), "picked ineligible backend {i}");
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let time = std::env::var("SELECTION_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_millis(500), Duration::from_secs_f64);
    let total = Instant::now();

    let pools: Vec<(Weights, usize, Vec<Backend>)> = [Weights::Equal, Weights::Mixed]
        .into_iter()
        .flat_map(|w| SIZES.map(|n| (w, n, pool(n, w))))
        .collect();
    let pool_of = |w: Weights, n: usize| {
        &pools
            .iter()
            .find(|(pw, pn, _)| pw.name() == w.name() && *pn == n)
            .expect("pool")
            .2
    };

    println!(
        "Selector::select, single thread, mean ns/op ({} s per case after {} ms warm-up)",
        time.as_secs_f64(),
        WARM_UP.as_millis()
    );
    println!();
    println!(
        "| {:<20} | {:<7} | {:<13} | {:>9} | {:>9} | {:>9} |",
        "strategy", "weights", "eligible", "n=3", "n=100", "n=10000"
    );
    println!(
        "|{:-<22}|{:-<9}|{:-<15}|{:->11}|{:->11}|{:->11}|",
        "", "", "", "", "", ""
    );
    for case in cases() {
        for weights in [Weights::Equal, Weights::Mixed] {
            for eligibility in [Eligible::All, Eligible::OddDown, Eligible::FirstHalfDown] {
                let mut cells = Vec::new();
                for n in SIZES {
                    let backends = pool_of(weights, n);
                    let sel = case.build(backends);
                    let half = n / 2;
                    let all = |_: usize| true;
                    let odd_down = |i: usize| i % 2 == 0;
                    let first_half_down = move |i: usize| i >= half;
                    let eligible: &dyn Fn(usize) -> bool = match eligibility {
                        Eligible::All => &all,
                        Eligible::OddDown => &odd_down,
                        Eligible::FirstHalfDown => &first_half_down,
                    };
                    check(&*sel, backends, eligible);
                    let (ops, elapsed) = run(&*sel, backends, eligible, case.keyed(), time);
                    cells.push(format!("{:>9.1}", ns_per_op(ops, elapsed)));
                }
                println!(
                    "| {:<20} | {:<7} | {:<13} | {} |",
                    case.name,
                    weights.name(),
                    eligibility.name(),
                    cells.join(" | ")
                );
            }
        }
    }

    println!();
    println!("Contended: 2 threads share one selector, weights all 1, all eligible");
    println!("(ns/op is each thread's wall time per select; total is both threads together)");
    println!();
    println!(
        "| {:<20} | {:>7} | {:>13} | {:>13} | {:>13} |",
        "strategy", "n", "1 thread ns", "2 threads ns", "total Mops/s"
    );
    println!(
        "|{:-<22}|{:->9}|{:->15}|{:->15}|{:->15}|",
        "", "", "", "", ""
    );
    for strategy in [Strategy::RoundRobin, Strategy::LeastConnections] {
        for n in SIZES {
            let backends = pool_of(Weights::Equal, n);
            let sel = Case::plain(strategy).build(backends);
            let (ops1, el1) = run(&*sel, backends, &|_| true, false, time);
            let barrier = Barrier::new(2);
            let results: Vec<(u64, Duration)> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            run(&*sel, backends, &|_| true, false, time)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("bench thread"))
                    .collect()
            });
            let per_thread = results
                .iter()
                .map(|&(ops, el)| ns_per_op(ops, el))
                .sum::<f64>()
                / results.len() as f64;
            let total_ops: u64 = results.iter().map(|r| r.0).sum();
            let wall = results.iter().map(|r| r.1).max().unwrap_or_default();
            println!(
                "| {:<20} | {:>7} | {:>13.1} | {:>13.1} | {:>13.1} |",
                strategy.name(),
                n,
                ns_per_op(ops1, el1),
                per_thread,
                total_ops as f64 / wall.as_secs_f64() / 1e6
            );
        }
    }

    println!();
    println!("selection::build, 10,000 backends");
    println!();
    println!(
        "| {:<20} | {:<7} | {:>6} | {:>11} | {:>11} |",
        "strategy", "weights", "runs", "min ms", "mean ms"
    );
    println!(
        "|{:-<22}|{:-<9}|{:->8}|{:->13}|{:->13}|",
        "", "", "", "", ""
    );
    for (strategy, weights) in [
        (Strategy::RoundRobin, Weights::Mixed),
        (Strategy::RoundRobin, Weights::Equal),
        (Strategy::LeastConnections, Weights::Mixed),
        (Strategy::Random, Weights::Mixed),
        (Strategy::PowerOfTwoChoices, Weights::Mixed),
        (Strategy::ConsistentHash, Weights::Mixed),
        (Strategy::ConsistentHash, Weights::Equal),
        (Strategy::PeakEwma, Weights::Mixed),
    ] {
        let backends = pool_of(weights, 10_000);
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 3 || (start.elapsed() < time && times.len() < 1_000) {
            let t = Instant::now();
            black_box(Case::plain(strategy).build(black_box(backends)));
            times.push(t.elapsed());
        }
        let min = times.iter().min().copied().unwrap_or_default();
        let mean = times.iter().sum::<Duration>() / times.len() as u32;
        println!(
            "| {:<20} | {:<7} | {:>6} | {:>11.3} | {:>11.3} |",
            strategy.name(),
            weights.name(),
            times.len(),
            min.as_secs_f64() * 1e3,
            mean.as_secs_f64() * 1e3
        );
    }

    println!();
    println!("total bench time {:.1} s", total.elapsed().as_secs_f64());
}
