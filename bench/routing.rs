//! Micro-benchmark of `Router::find`, the per-request route lookup.
//!
//! `cargo bench --bench routing` (plain binary, no criterion). One table of
//! 100 routes over 20 pools, shaped like a real config: 10 exact hosts with 6
//! routes each (half of them without a `/` route, so their other paths fall
//! through), 5 wildcards with 4 routes each (two nested:
//! `*.apps.example.net` and `*.eu.apps.example.net`), and 20 host-less
//! routes (no `/`, so some requests match nothing); prefixes of 1 to 3
//! segments. For each request shape (a hit at every level, the
//! fall-throughs, misses) it reports the mean nanoseconds per `find` on one
//! thread, then the same over all shapes in turn.
//!
//! Every case's answer is checked once outside the clock. Times are the
//! thread's CPU time per call (`CLOCK_THREAD_CPUTIME_ID`), so time spent
//! descheduled on a busy machine does not count; the wall-clock figure is
//! printed beside it. `ROUTING_BENCH_SECS` (default 0.5) sets the measuring
//! time per case.

use std::hint::black_box;
use std::time::{Duration, Instant};

use lb::core::route::{check_path_prefix, HostMatch, Route, Router};

/// `find` calls between two clock reads.
const BATCH: u64 = 1_000;
const WARM_UP: Duration = Duration::from_millis(50);
const POOLS: usize = 20;

/// Routes of the exact hosts that have a `/` route.
const EXACT_WITH_ROOT: [&str; 6] = [
    "/",
    "/api",
    "/api/v1",
    "/api/v1/users",
    "/static/",
    "/admin",
];
/// Routes of the exact hosts without one.
const EXACT_NO_ROOT: [&str; 6] = [
    "/api",
    "/api/v1",
    "/api/v1/users",
    "/static/",
    "/admin",
    "/login",
];
const WILDCARDS: [(&str, [&str; 4]); 5] = [
    ("*.example.com", ["/api/v2", "/health", "/assets/", "/docs"]),
    ("*.apps.example.net", ["/", "/api", "/api/v2", "/ws"]),
    ("*.eu.apps.example.net", ["/", "/api", "/api/v2", "/ws"]),
    ("*.example.org", ["/", "/shop", "/shop/cart", "/img/"]),
    ("*.internal", ["/", "/rpc", "/rpc/v1", "/debug/pprof"]),
];
const HOSTLESS: [&str; 20] = [
    "/health",
    "/metrics",
    "/api",
    "/api/v1",
    "/api/v2",
    "/api/v3",
    "/static/",
    "/assets/",
    "/img",
    "/css",
    "/js",
    "/login",
    "/logout",
    "/admin",
    "/admin/users",
    "/v1",
    "/v2",
    "/v3/x/y",
    "/docs",
    "/.well-known/acme-challenge",
];

/// The 100 routes, in "file order"; the target is a pool number.
fn routes() -> Vec<Route<usize>> {
    let mut spec: Vec<(Option<String>, &str)> = Vec::new();
    for i in 0..10 {
        let prefixes = if i % 2 == 0 {
            EXACT_WITH_ROOT
        } else {
            EXACT_NO_ROOT
        };
        for p in prefixes {
            spec.push((Some(format!("svc{i}.example.com")), p));
        }
    }
    for (host, prefixes) in WILDCARDS {
        for p in prefixes {
            spec.push((Some(host.to_string()), p));
        }
    }
    for p in HOSTLESS {
        spec.push((None, p));
    }
    assert_eq!(spec.len(), 100);
    spec.into_iter()
        .enumerate()
        .map(|(i, (host, prefix))| {
            check_path_prefix(prefix).expect("bench prefix");
            Route {
                host: host.map(|h| HostMatch::parse(&h).expect("bench host")),
                path_prefix: prefix.into(),
                target: i % POOLS,
            }
        })
        .collect()
}

/// One request shape and the route it must reach: (host pattern, prefix),
/// `None` for no match.
struct Case {
    name: &'static str,
    host: Option<&'static str>,
    path: &'static str,
    want: Option<(Option<&'static str>, &'static str)>,
}

const CASES: [Case; 13] = [
    Case {
        name: "exact, 3-segment prefix",
        host: Some("svc4.example.com"),
        path: "/api/v1/users/42?expand=1",
        want: Some((Some("svc4.example.com"), "/api/v1/users")),
    },
    Case {
        name: "exact, /",
        host: Some("svc4.example.com"),
        path: "/index.html",
        want: Some((Some("svc4.example.com"), "/")),
    },
    Case {
        name: "exact, case+dot+port",
        host: Some("SVC4.Example.COM.:8443"),
        path: "/api/v1",
        want: Some((Some("svc4.example.com"), "/api/v1")),
    },
    Case {
        name: "exact -> wildcard",
        host: Some("svc3.example.com"),
        path: "/docs/intro",
        want: Some((Some("*.example.com"), "/docs")),
    },
    Case {
        name: "exact -> host-less",
        host: Some("svc3.example.com"),
        path: "/metrics",
        want: Some((None, "/metrics")),
    },
    Case {
        name: "wildcard, 1 label",
        host: Some("app1.apps.example.net"),
        path: "/api/v2/items",
        want: Some((Some("*.apps.example.net"), "/api/v2")),
    },
    Case {
        name: "wildcard, 4 labels, nested",
        host: Some("a.b.c.eu.apps.example.net"),
        path: "/ws",
        want: Some((Some("*.eu.apps.example.net"), "/ws")),
    },
    Case {
        name: "unknown host -> host-less",
        host: Some("www.unknown.org"),
        path: "/api/v3/x",
        want: Some((None, "/api/v3")),
    },
    Case {
        name: "no host -> host-less",
        host: None,
        path: "/static/app.js",
        want: Some((None, "/static/")),
    },
    Case {
        name: "IPv6 host -> host-less",
        host: Some("[2001:db8::1]:8080"),
        path: "/login",
        want: Some((None, "/login")),
    },
    Case {
        name: "miss, exact host",
        host: Some("svc3.example.com"),
        path: "/nothing/here",
        want: None,
    },
    Case {
        name: "miss, no host",
        host: None,
        path: "/",
        want: None,
    },
    Case {
        name: "miss, 10-label host",
        host: Some("a.b.c.d.e.f.g.h.example.io"),
        path: "/x",
        want: None,
    },
];

/// Checks the case reaches the route it says, outside the clock.
fn check(router: &Router<usize>, case: &Case) {
    let got = router.find(case.host, case.path).map(|f| {
        let host = f.route.host.as_ref().map(|h| h.to_string());
        (host, f.route.path_prefix.to_string())
    });
    let want = case
        .want
        .map(|(h, p)| (h.map(str::to_string), p.to_string()));
    assert_eq!(got, want, "{}", case.name);
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Mean nanoseconds per call: (CPU, wall).
struct Mean {
    cpu: f64,
    wall: f64,
}

/// Calls `find` over `requests` in turn for `time` of wall clock after a
/// warm-up.
fn run(router: &Router<usize>, requests: &[(Option<&str>, &str)], time: Duration) -> Mean {
    let mut next = 0;
    let mut batch = || {
        for _ in 0..BATCH {
            let (host, path) = requests[next];
            // Not `%`: a division would cost as much as a short lookup.
            next = if next + 1 == requests.len() {
                0
            } else {
                next + 1
            };
            black_box(
                router
                    .find(black_box(host), black_box(path))
                    .map(|f| f.index),
            );
        }
    };
    let warm = Instant::now();
    while warm.elapsed() < WARM_UP {
        batch();
    }
    let start = Instant::now();
    let cpu_start = thread_cpu_time();
    let mut calls = 0;
    loop {
        batch();
        calls += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= time {
            let cpu = thread_cpu_time() - cpu_start;
            return Mean {
                cpu: cpu.as_nanos() as f64 / calls as f64,
                wall: elapsed.as_nanos() as f64 / calls as f64,
            };
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let time = std::env::var("ROUTING_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_millis(500), Duration::from_secs_f64);
    let routes = routes();
    let build = Instant::now();
    let router = Router::new(routes);
    let build = build.elapsed();
    for case in &CASES {
        check(&router, case);
    }

    println!(
        "Router::find, 100 routes / {POOLS} pools, single thread, mean ns/find \
         ({} s per case after {} ms warm-up; table built in {} µs)",
        time.as_secs_f64(),
        WARM_UP.as_millis(),
        build.as_micros()
    );
    println!();
    println!(
        "| {:<27} | {:<26} | {:<26} | {:<32} | {:>7} | {:>7} |",
        "case", "host", "path", "route", "cpu ns", "wall ns"
    );
    println!(
        "|{:-<29}|{:-<28}|{:-<28}|{:-<34}|{:->9}|{:->9}|",
        "", "", "", "", "", ""
    );
    for case in &CASES {
        let mean = run(&router, &[(case.host, case.path)], time);
        let route = match case.want {
            None => "none".to_string(),
            Some((host, prefix)) => format!("{} {prefix}", host.unwrap_or("(any)")),
        };
        println!(
            "| {:<27} | {:<26} | {:<26} | {:<32} | {:>7.1} | {:>7.1} |",
            case.name,
            case.host.unwrap_or("(none)"),
            case.path,
            route,
            mean.cpu,
            mean.wall
        );
    }
    let all: Vec<_> = CASES.iter().map(|c| (c.host, c.path)).collect();
    let mean = run(&router, &all, time);
    println!(
        "| {:<27} | {:<26} | {:<26} | {:<32} | {:>7.1} | {:>7.1} |",
        "all of the above in turn", "", "", "", mean.cpu, mean.wall
    );
}
