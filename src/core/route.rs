//! The route table: which route (and so which pool) serves a request, from
//! its Host and its path.
//!
//! A [`Route`] has an optional host pattern ([`HostMatch`]), a path prefix and
//! a caller-chosen target. [`Router::new`] builds the table once per config;
//! [`Router::find`] answers per request without allocating.
//!
//! # Host
//!
//! The request's host (the `Host` header or `:authority`, as the client sent
//! it) is compared case-insensitively, without its port and without one
//! trailing dot: `API.Example.com.:8443` is `api.example.com`. An IPv6
//! literal keeps its brackets (`[::1]:8080` is `[::1]`) and is compared in
//! its canonical form (`[0:0::1]` is `[::1]`), as are IPv6 patterns. A
//! pattern is an exact name or `*.suffix`: `*.example.com` matches one or
//! more labels before `.example.com` (`a.example.com`, `a.b.example.com`),
//! never `example.com` itself. An absent or empty host matches only the
//! routes without a host.
//!
//! # Path
//!
//! A prefix matches whole path segments, on the raw bytes the client sent
//! (case-sensitive, no percent-decoding, no `.`/`..` resolution, as Envoy
//! does by default): `/v1` matches `/v1`, `/v1/`, `/v1/x` and `/v1?q`, never
//! `/v10`. A prefix written with a trailing slash, `/v1/`, matches `/v1/`,
//! `/v1/x` and `/v1/?q` but not `/v1` (nginx's `location /v1/`). `/` matches
//! every request, `OPTIONS *` included.
//!
//! # Which route
//!
//! A route matches when both its host pattern (or its lack of one) and its
//! prefix match. Among the matching routes the winner is the one with the
//! most specific host (exact, then the longest wildcard suffix, then no
//! host), then the longest prefix, then the first in the file. So a host
//! whose routes have no matching prefix falls through to the less specific
//! hosts' routes (unlike Envoy, which picks the virtual host first and
//! answers 404 inside it), and a longer prefix later in the file is never
//! hidden by a shorter one before it. Two routes with the same host pattern
//! and the same prefix can never both win: [`Router::duplicates`] lists them
//! so validation can reject them; the table keeps the first.
//!
//! # Cost
//!
//! The request's host is neither copied nor lowercased: one pass over it,
//! from its last byte to its first, hashes every suffix case-insensitively,
//! so each dot costs one lookup among the wildcards (skipped when no
//! wildcard suffix has that length) and the whole name one lookup among the
//! exact hosts; a hit is confirmed by a case-insensitive comparison. IPv6
//! literals are parsed (no formatting) only when an IPv6 route exists.
//! Within a host, prefixes are tried longest first, so that scan is linear
//! in the host's route count. `bench/routing.rs` measures it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv6Addr;

use fnv::FnvHashMap;

use crate::config::parse_ipv6;
pub use crate::config::{check_path_prefix, HostMatch};

/// Whether a request host (as the client sent it: any case, maybe a port
/// or a trailing dot) matches this pattern. [`Router::find`] does not
/// call this; it is the rule stated once, for tests and diagnostics.
pub fn host_matches(pattern: &HostMatch, host: &str) -> bool {
    match (pattern, RequestHost::of(host)) {
        (_, RequestHost::None) => false,
        (HostMatch::Exact(name), RequestHost::Name(host)) => name.eq_ignore_ascii_case(host),
        (HostMatch::Wildcard(suffix), RequestHost::Name(host)) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
        (HostMatch::Exact(name), RequestHost::Ipv6(literal)) => {
            parse_ipv6(literal).is_some_and(|ip| parse_ipv6(name) == Some(ip))
        }
        (HostMatch::Wildcard(_), RequestHost::Ipv6(_)) => false,
    }
}

/// A request's host without its port and one trailing dot, as sent (any
/// case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestHost<'a> {
    /// Absent or empty: only host-less routes.
    None,
    /// A name (or IPv4 address), to compare case-insensitively.
    Name(&'a str),
    /// `[…]`, or a bare address with several colons: an IPv6 literal, or
    /// garbage that [`parse_ipv6`] will refuse.
    Ipv6(&'a str),
}

impl<'a> RequestHost<'a> {
    fn of(raw: &'a str) -> RequestHost<'a> {
        let (name, ipv6) = if raw.starts_with('[') {
            // `[v6]` or `[v6]:port`; the colons inside are not a port.
            (raw.find(']').map_or(raw, |end| &raw[..=end]), true)
        } else {
            match raw.split_once(':') {
                // A bare IPv6 address (not valid in Host, but unambiguous).
                Some((_, rest)) if rest.contains(':') => (raw, true),
                Some((name, _port)) => (name, false),
                None => (raw, false),
            }
        };
        match name.strip_suffix('.').unwrap_or(name) {
            "" => RequestHost::None,
            name if ipv6 => RequestHost::Ipv6(name),
            name => RequestHost::Name(name),
        }
    }
}

/// FNV-1a over ASCII-lowercased bytes fed last byte first, so one pass from
/// the end of a host yields the hash of each of its suffixes in turn.
#[derive(Debug, Clone, Copy)]
struct SuffixHash(u64);

impl SuffixHash {
    const START: SuffixHash = SuffixHash(0xcbf2_9ce4_8422_2325);

    fn push(self, byte: u8) -> SuffixHash {
        SuffixHash((self.0 ^ u64::from(byte.to_ascii_lowercase())).wrapping_mul(0x0100_0000_01b3))
    }

    fn of(s: &str) -> u64 {
        s.bytes().rev().fold(SuffixHash::START, SuffixHash::push).0
    }
}

/// The hasher of maps keyed by a [`SuffixHash`]: the key is a hash already.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; this keeps any other key correct.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Host patterns (names or suffixes) by [`SuffixHash`]; the rare names
/// sharing a hash share a bucket.
type ByHash = HashMap<u64, Vec<Named>, BuildHasherDefault<Prehashed>>;

/// One host pattern's routes, with its lowercase name (or `.suffix`).
#[derive(Debug)]
struct Named {
    name: Box<str>,
    group: Group,
}

/// The group for `name` (lowercase) in `map`, created if new.
fn group_for<'m>(map: &'m mut ByHash, name: &str) -> &'m mut Group {
    let bucket = map.entry(SuffixHash::of(name)).or_default();
    let at = match bucket.iter().position(|n| &*n.name == name) {
        Some(at) => at,
        None => {
            bucket.push(Named {
                name: name.into(),
                group: Group::default(),
            });
            bucket.len() - 1
        }
    };
    &mut bucket[at].group
}

/// The group of the pattern whose hash is `hash` and which is `name` (any
/// case).
fn lookup<'m>(map: &'m ByHash, hash: SuffixHash, name: &[u8]) -> Option<&'m Group> {
    map.get(&hash.0)?
        .iter()
        .find(|n| n.name.as_bytes().eq_ignore_ascii_case(name))
        .map(|n| &n.group)
}

/// Whether `prefix` matches `path` (which may carry `?query`) on whole
/// segments: see the module doc.
pub fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        None => false,
        Some(_) if prefix.ends_with('/') => true,
        Some(rest) => matches!(rest.as_bytes().first(), None | Some(b'/' | b'?')),
    }
}

/// The path to send upstream when a route strips its prefix: `/admin/users?x`
/// with prefix `/admin` is `/users?x`; `/admin` is `/`; `/admin?q` is `/?q`.
/// A prefix with a trailing slash strips as without it (`/v1/x` with `/v1/`
/// is `/x`), and `/` strips nothing. A path the prefix does not match is
/// returned unchanged. Allocates only when a `/` must be put back.
pub fn strip_prefix<'p>(prefix: &str, path: &'p str) -> Cow<'p, str> {
    if prefix == "/" || !path_matches(prefix, path) {
        return Cow::Borrowed(path);
    }
    let segments = prefix.strip_suffix('/').unwrap_or(prefix);
    // `path_matches` checked that `path` starts with `segments`.
    let rest = &path[segments.len()..];
    if rest.starts_with('/') {
        Cow::Borrowed(rest)
    } else {
        Cow::Owned(format!("/{rest}"))
    }
}

/// One route as the table needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<T> {
    /// `None`: any host (and requests without one).
    pub host: Option<HostMatch>,
    /// Starts with `/`; checked by [`check_path_prefix`].
    pub path_prefix: Box<str>,
    /// What the caller wants back: a pool, its options.
    pub target: T,
}

/// The route [`Router::find`] chose.
#[derive(Debug)]
pub struct Found<'a, T> {
    pub route: &'a Route<T>,
    /// Its position in the list given to [`Router::new`] (the file order).
    pub index: usize,
}

// Derived `Clone`/`Copy` would require `T: Clone`.
impl<T> Clone for Found<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Found<'_, T> {}

impl<T> Found<'_, T> {
    /// `path` without the route's prefix, for routes that strip it: see
    /// [`strip_prefix`].
    pub fn stripped<'p>(&self, path: &'p str) -> Cow<'p, str> {
        strip_prefix(&self.route.path_prefix, path)
    }
}

/// One prefix of a host's routes.
#[derive(Debug)]
struct Entry {
    prefix: Box<str>,
    /// Into `Router::routes`.
    index: usize,
}

/// The routes of one host pattern, longest prefix first, file order among
/// equal lengths (only duplicates can both match, and the first wins).
#[derive(Debug, Default)]
struct Group {
    entries: Vec<Entry>,
}

impl Group {
    fn push(&mut self, prefix: &str, index: usize) {
        self.entries.push(Entry {
            prefix: prefix.into(),
            index,
        });
    }

    fn sort(&mut self) {
        // Stable: file order among equal lengths.
        self.entries
            .sort_by_key(|e| std::cmp::Reverse(e.prefix.len()));
    }

    fn find(&self, path: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| path_matches(&e.prefix, path))
            .map(|e| e.index)
    }
}

/// The route table, built once per config, immutable (so `Send + Sync` when
/// the targets are).
#[derive(Debug)]
pub struct Router<T> {
    /// In file order; `Found::index` and `Entry::index` point here.
    routes: Vec<Route<T>>,
    /// Exact names, by the hash of the whole name.
    exact: ByHash,
    /// Exact IPv6 literals.
    ipv6: FnvHashMap<Ipv6Addr, Group>,
    /// Wildcards, by the hash of the suffix with its dot (`.example.com`).
    wildcards: ByHash,
    /// The shortest and longest wildcard suffixes, to skip lookups of
    /// request suffixes no pattern can have.
    wildcard_lengths: (usize, usize),
    /// Routes without a host.
    any_host: Group,
}

impl<T> Router<T> {
    /// Builds the table. Routes are expected valid ([`check_path_prefix`],
    /// no [`Router::duplicates`]); an invalid prefix only never matches what
    /// it seems to, and of duplicates the first wins.
    pub fn new(routes: Vec<Route<T>>) -> Router<T> {
        let mut exact = ByHash::default();
        let mut ipv6: FnvHashMap<Ipv6Addr, Group> = FnvHashMap::default();
        let mut wildcards = ByHash::default();
        let mut any_host = Group::default();
        for (index, route) in routes.iter().enumerate() {
            let group = match &route.host {
                None => &mut any_host,
                Some(HostMatch::Exact(name)) => match parse_ipv6(name) {
                    Some(ip) => ipv6.entry(ip).or_default(),
                    None => group_for(&mut exact, &name.to_ascii_lowercase()),
                },
                Some(HostMatch::Wildcard(suffix)) => {
                    group_for(&mut wildcards, &suffix.to_ascii_lowercase())
                }
            };
            group.push(&route.path_prefix, index);
        }
        let groups = |map: &mut ByHash| {
            map.values_mut()
                .flatten()
                .for_each(|named| named.group.sort());
        };
        groups(&mut exact);
        groups(&mut wildcards);
        ipv6.values_mut().for_each(Group::sort);
        any_host.sort();
        let lengths = wildcards.values().flatten().map(|n| n.name.len());
        let wildcard_lengths = (
            lengths.clone().min().unwrap_or(usize::MAX),
            lengths.max().unwrap_or(0),
        );
        Router {
            routes,
            exact,
            ipv6,
            wildcards,
            wildcard_lengths,
            any_host,
        }
    }

    /// The route for a request: `host` is the Host header or `:authority` as
    /// the client sent it (any case, maybe a port or a trailing dot, maybe
    /// absent), `path` the request target's path, maybe with `?query`.
    /// `None` when no route matches. Does not allocate.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<Found<'_, T>> {
        self.find_index(host, path).map(|index| Found {
            route: &self.routes[index],
            index,
        })
    }

    fn find_index(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let by_host = match host.map(RequestHost::of) {
            Some(RequestHost::Name(name)) => self.find_named(name.as_bytes(), path),
            Some(RequestHost::Ipv6(literal)) if !self.ipv6.is_empty() => parse_ipv6(literal)
                .and_then(|ip| self.ipv6.get(&ip))
                .and_then(|group| group.find(path)),
            _ => None,
        };
        by_host.or_else(|| self.any_host.find(path))
    }

    /// The route of the exact name, else of the longest wildcard suffix,
    /// whose prefixes match `path`. Hashes `name` from its end: each `.`
    /// (but a first one, so a suffix never matches its apex) ends a suffix,
    /// looked up among the wildcards, shortest first (so a longer one's match
    /// replaces a shorter one's); the whole name is looked up last.
    fn find_named(&self, name: &[u8], path: &str) -> Option<usize> {
        if self.exact.is_empty() && self.wildcards.is_empty() {
            return None;
        }
        let (shortest, longest) = self.wildcard_lengths;
        let mut hash = SuffixHash::START;
        let mut by_wildcard = None;
        for (at, &byte) in name.iter().enumerate().rev() {
            hash = hash.push(byte);
            let suffix_len = name.len() - at;
            if byte == b'.' && at > 0 && (shortest..=longest).contains(&suffix_len) {
                if let Some(found) =
                    lookup(&self.wildcards, hash, &name[at..]).and_then(|g| g.find(path))
                {
                    by_wildcard = Some(found);
                }
            }
        }
        lookup(&self.exact, hash, name)
            .and_then(|g| g.find(path))
            .or(by_wildcard)
    }

    /// Every route, in the order given to [`Router::new`] (the file order).
    pub fn routes(&self) -> impl Iterator<Item = &Route<T>> {
        self.routes.iter()
    }

    /// The routes with the same host pattern and the same prefix as an
    /// earlier one, as (earlier index, later index) pairs, in order of the
    /// later; three alike give (a, b) and (a, c). The later ones could never
    /// be chosen.
    pub fn duplicates(routes: &[Route<T>]) -> Vec<(usize, usize)> {
        let mut first: FnvHashMap<(Option<&HostMatch>, &str), usize> = FnvHashMap::default();
        let mut pairs = Vec::new();
        for (index, route) in routes.iter().enumerate() {
            let key = (route.host.as_ref(), &*route.path_prefix);
            match first.get(&key) {
                Some(&earlier) => pairs.push((earlier, index)),
                None => {
                    first.insert(key, index);
                }
            }
        }
        pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostMatch {
        HostMatch::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn route(h: Option<&str>, prefix: &str, target: &'static str) -> Route<&'static str> {
        check_path_prefix(prefix).unwrap_or_else(|e| panic!("{e}"));
        Route {
            host: h.map(host),
            path_prefix: prefix.into(),
            target,
        }
    }

    fn router(routes: &[(Option<&str>, &str, &'static str)]) -> Router<&'static str> {
        Router::new(routes.iter().map(|&(h, p, t)| route(h, p, t)).collect())
    }

    /// The target chosen for (host, path), or `None`.
    fn pick(r: &Router<&'static str>, h: Option<&str>, path: &str) -> Option<&'static str> {
        r.find(h, path).map(|f| f.route.target)
    }

    #[test]
    fn host_patterns_parse_and_normalize() {
        assert_eq!(
            host("API.Example.COM"),
            HostMatch::Exact("api.example.com".into())
        );
        assert_eq!(host("example.com."), HostMatch::Exact("example.com".into()));
        assert_eq!(
            host("*.Example.com"),
            HostMatch::Wildcard(".example.com".into())
        );
        assert_eq!(
            host("*.example.com."),
            HostMatch::Wildcard(".example.com".into())
        );
        assert_eq!(host("10.0.0.1"), HostMatch::Exact("10.0.0.1".into()));
        assert_eq!(host("[::1]"), HostMatch::Exact("[::1]".into()));
        assert_eq!(host("::1"), HostMatch::Exact("[::1]".into()));
        assert_eq!(host("[0:0:0::0:1]"), HostMatch::Exact("[::1]".into()));
        assert_eq!(host("[FE80::A]"), HostMatch::Exact("[fe80::a]".into()));
        assert_eq!(
            host("internal_svc.local"),
            HostMatch::Exact("internal_svc.local".into())
        );
        assert_eq!(
            host("xn--bcher-kva.de"),
            HostMatch::Exact("xn--bcher-kva.de".into())
        );
        for s in ["api.example.com", "*.example.com", "[::1]", "*.com"] {
            assert_eq!(host(s).to_string(), s);
            assert_eq!(host(&host(s).to_string()), host(s), "{s} round-trips");
        }
    }

    #[test]
    fn host_patterns_that_are_rejected_say_why() {
        assert_eq!(
            HostMatch::parse("*foo.com").unwrap_err(),
            "\"*foo.com\" is not a host name or *.suffix pattern (a wildcard is allowed only \
             as the whole first label, as in *.example.com)"
        );
        for (bad, why) in [
            ("", "empty"),
            ("*", "wildcard"),
            ("*.", "wildcard"),
            ("*..", "empty"),
            ("*.*.com", "wildcard"),
            ("a.*.com", "wildcard"),
            ("foo.*", "wildcard"),
            ("example.com:8080", "no port"),
            ("[::1]:8080", "no port"),
            ("a..b", "empty label"),
            (".example.com", "empty label"),
            ("exa mple.com", "' '"),
            ("example.com/", "'/'"),
            ("-a.com", "'-'"),
            ("a-.com", "'-'"),
            ("bücher.de", "punycode"),
        ] {
            let err = HostMatch::parse(bad).expect_err(bad);
            assert!(err.contains("is not a host name"), "{bad}: {err}");
            assert!(err.contains(why), "{bad}: {err} should mention {why}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(HostMatch::parse(&long_label).unwrap_err().contains("label"));
        assert!(HostMatch::parse(&format!("{}.com", "a".repeat(63))).is_ok());
        let long_name = ["a".repeat(63).as_str(); 3].join(".") + "." + &"a".repeat(62);
        assert_eq!(long_name.len(), 254);
        assert!(HostMatch::parse(&long_name).unwrap_err().contains("253"));
    }

    #[test]
    fn path_prefixes_are_checked() {
        for good in [
            "/",
            "/v1",
            "/v1/",
            "/api/v1/users",
            "/a%2Fb",
            "/~user",
            "/a.b/c-d_e",
        ] {
            assert_eq!(check_path_prefix(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "start with '/'"),
            ("v1", "start with '/'"),
            ("/v1?x", "'?'"),
            ("/v1#x", "'#'"),
            ("/v 1", "' '"),
            ("/v1\t", "'\\t'"),
            ("//v1", "empty segment"),
            ("/v1//x", "empty segment"),
            ("/./v1", "segment"),
            ("/v1/..", "segment"),
            ("/caf\u{e9}", "ASCII"),
            ("/a%2", "hex"),
            ("/a%zz", "hex"),
        ] {
            let err = check_path_prefix(bad).expect_err(bad);
            assert!(err.contains(why), "{bad:?}: {err} should mention {why}");
        }
    }

    #[test]
    fn exact_host_ignores_case_port_and_trailing_dot() {
        let r = router(&[(Some("api.example.com"), "/", "api")]);
        for h in [
            "api.example.com",
            "API.Example.Com",
            "api.example.com:8080",
            "api.example.com.",
            "Api.Example.Com.:443",
            "api.example.com:",
        ] {
            assert_eq!(pick(&r, Some(h), "/x"), Some("api"), "{h}");
        }
        for h in [
            "example.com",
            "api.example.com..",
            "api.example.co",
            "xapi.example.com",
        ] {
            assert_eq!(pick(&r, Some(h), "/x"), None, "{h}");
        }
    }

    #[test]
    fn ipv6_hosts_keep_their_colons_and_compare_canonically() {
        let r = router(&[
            (Some("[::1]"), "/", "loopback"),
            (Some("[2001:db8::1]"), "/", "doc"),
            (Some("localhost"), "/", "name"),
        ]);
        for (h, want) in [
            ("[::1]", Some("loopback")),
            ("[::1]:8080", Some("loopback")),
            ("[0:0::1]:8080", Some("loopback")),
            ("::1", Some("loopback")),
            ("[2001:DB8::1]:443", Some("doc")),
            ("[2001:0db8:0:0:0:0:0:1]", Some("doc")),
            ("[2001:db8::2]", None),
            ("[::1", None),
            ("[fe80::1%25eth0]:80", None),
            ("localhost:8080", Some("name")),
        ] {
            assert_eq!(pick(&r, Some(h), "/"), want, "{h}");
        }
    }

    #[test]
    fn wildcard_matches_one_or_more_labels_never_the_apex() {
        let r = router(&[(Some("*.example.com"), "/", "wild")]);
        for h in [
            "a.example.com",
            "a.b.c.example.com",
            "A.EXAMPLE.COM:8443",
            "a.example.com.",
        ] {
            assert_eq!(pick(&r, Some(h), "/"), Some("wild"), "{h}");
        }
        for h in [
            "example.com",
            "example.com.",
            ".example.com",
            "aexample.com",
            "a.example.org",
        ] {
            assert_eq!(pick(&r, Some(h), "/"), None, "{h}");
        }
        assert!(host_matches(&host("*.example.com"), "x.y.Example.com:1"));
        assert!(!host_matches(&host("*.example.com"), "example.com"));
    }

    #[test]
    fn longest_wildcard_suffix_wins_whatever_the_file_order() {
        let r = router(&[
            (Some("*.com"), "/", "com"),
            (Some("*.example.com"), "/", "example"),
            (Some("*.eu.example.com"), "/", "eu"),
        ]);
        assert_eq!(pick(&r, Some("a.eu.example.com"), "/"), Some("eu"));
        assert_eq!(pick(&r, Some("a.b.eu.example.com"), "/"), Some("eu"));
        assert_eq!(pick(&r, Some("eu.example.com"), "/"), Some("example"));
        assert_eq!(pick(&r, Some("a.us.example.com"), "/"), Some("example"));
        assert_eq!(pick(&r, Some("example.com"), "/"), Some("com"));
        assert_eq!(pick(&r, Some("com"), "/"), None);
    }

    #[test]
    fn exact_host_beats_wildcard_beats_no_host() {
        let r = router(&[
            (None, "/", "any"),
            (Some("*.example.com"), "/", "wild"),
            (Some("api.example.com"), "/", "exact"),
        ]);
        assert_eq!(pick(&r, Some("api.example.com"), "/v1"), Some("exact"));
        assert_eq!(pick(&r, Some("www.example.com"), "/v1"), Some("wild"));
        assert_eq!(pick(&r, Some("example.org"), "/v1"), Some("any"));
        // The host decides before the prefix: a longer prefix on a less
        // specific host loses.
        let r = router(&[
            (None, "/api/v1/users", "any"),
            (Some("*.example.com"), "/api/v1", "wild"),
            (Some("api.example.com"), "/", "exact"),
        ]);
        assert_eq!(
            pick(&r, Some("api.example.com"), "/api/v1/users"),
            Some("exact")
        );
        assert_eq!(
            pick(&r, Some("www.example.com"), "/api/v1/users"),
            Some("wild")
        );
    }

    #[test]
    fn absent_empty_or_unknown_host_uses_hostless_routes() {
        let r = router(&[(Some("example.com"), "/", "named"), (None, "/", "any")]);
        assert_eq!(pick(&r, None, "/"), Some("any"));
        assert_eq!(pick(&r, Some(""), "/"), Some("any"));
        assert_eq!(pick(&r, Some(":80"), "/"), Some("any"));
        assert_eq!(pick(&r, Some("."), "/"), Some("any"));
        assert_eq!(pick(&r, Some("other.org"), "/"), Some("any"));
        let wild = router(&[(Some("*.example.com"), "/", "wild")]);
        assert_eq!(pick(&wild, None, "/"), None);
        // No length limit: a host too long for DNS is still compared.
        let overlong = "a.".repeat(200) + "example.com";
        assert_eq!(pick(&r, Some(&overlong), "/"), Some("any"));
        assert_eq!(pick(&wild, Some(&overlong), "/"), Some("wild"));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let r = router(&[(None, "/v1", "v1")]);
        for p in ["/v1", "/v1/", "/v1/x", "/v1?q", "/v1?q=/v10", "/v1/x/y?z"] {
            assert_eq!(pick(&r, None, p), Some("v1"), "{p}");
        }
        for p in [
            "/v10", "/v1x", "/v", "/", "/V1", "/x/v1", "v1", "", "*", "/%76%31",
        ] {
            assert_eq!(pick(&r, None, p), None, "{p}");
        }
        let r = router(&[(None, "/api/v1", "deep")]);
        assert_eq!(pick(&r, None, "/api/v1/users"), Some("deep"));
        assert_eq!(pick(&r, None, "/api/v10"), None);
        assert_eq!(pick(&r, None, "/api"), None);
    }

    #[test]
    fn prefix_with_trailing_slash_needs_the_slash() {
        let r = router(&[(None, "/v1/", "v1/")]);
        for p in ["/v1/", "/v1/x", "/v1/?q"] {
            assert_eq!(pick(&r, None, p), Some("v1/"), "{p}");
        }
        for p in ["/v1", "/v1?q", "/v10", "/v10/"] {
            assert_eq!(pick(&r, None, p), None, "{p}");
        }
        // Both spellings side by side: the slash one is longer, so it wins
        // where both match.
        let r = router(&[(None, "/v1", "bare"), (None, "/v1/", "slash")]);
        assert_eq!(pick(&r, None, "/v1"), Some("bare"));
        assert_eq!(pick(&r, None, "/v1?q"), Some("bare"));
        assert_eq!(pick(&r, None, "/v1/"), Some("slash"));
        assert_eq!(pick(&r, None, "/v1/x"), Some("slash"));
    }

    #[test]
    fn root_prefix_matches_every_request() {
        let r = router(&[(None, "/", "root")]);
        for p in ["/", "/x", "/?q", "/a/b/c", "*", ""] {
            assert_eq!(pick(&r, None, p), Some("root"), "{p}");
        }
    }

    #[test]
    fn longest_prefix_wins_even_later_in_the_file() {
        let r = router(&[
            (None, "/", "root"),
            (None, "/api", "api"),
            (None, "/api/v1/users", "users"),
            (None, "/api/v1", "v1"),
        ]);
        assert_eq!(pick(&r, None, "/api/v1/users/7?x"), Some("users"));
        assert_eq!(pick(&r, None, "/api/v1/orders"), Some("v1"));
        assert_eq!(pick(&r, None, "/api/v2"), Some("api"));
        assert_eq!(pick(&r, None, "/apiv1"), Some("root"));
        assert_eq!(pick(&r, None, "/other"), Some("root"));
    }

    #[test]
    fn first_in_file_wins_among_duplicates_and_they_are_reported() {
        let routes = vec![
            route(Some("a.com"), "/x", "first"),
            route(None, "/x", "hostless"),
            route(Some("A.com."), "/x", "second"),
            route(Some("*.a.com"), "/x", "wild"),
            route(Some("a.com"), "/x/", "slash"),
            route(Some("a.com"), "/x", "third"),
            route(None, "/x", "hostless again"),
        ];
        assert_eq!(Router::duplicates(&routes), vec![(0, 2), (0, 5), (1, 6)]);
        let r = Router::new(routes);
        let found = r.find(Some("a.com"), "/x").expect("a route");
        assert_eq!((found.route.target, found.index), ("first", 0));
        assert_eq!(pick(&r, Some("b.com"), "/x"), Some("hostless"));
        assert!(Router::duplicates(&[route(None, "/a", "a"), route(None, "/b", "b")]).is_empty());
    }

    #[test]
    fn a_host_without_a_matching_prefix_falls_through() {
        let r = router(&[
            (Some("api.example.com"), "/v1", "exact v1"),
            (Some("*.example.com"), "/v2", "wild v2"),
            (Some("*.com"), "/v3", "com v3"),
            (None, "/static", "any static"),
        ]);
        let h = Some("api.example.com");
        assert_eq!(pick(&r, h, "/v1/x"), Some("exact v1"));
        assert_eq!(pick(&r, h, "/v2/x"), Some("wild v2"));
        assert_eq!(pick(&r, h, "/v3/x"), Some("com v3"));
        assert_eq!(pick(&r, h, "/static/app.js"), Some("any static"));
        assert_eq!(pick(&r, h, "/other"), None);
    }

    #[test]
    fn no_match_is_none() {
        let r = router(&[(Some("a.com"), "/a", "a"), (None, "/b", "b")]);
        assert_eq!(pick(&r, Some("a.com"), "/c"), None);
        assert_eq!(pick(&r, None, "/a"), None);
        assert!(pick(&Router::new(Vec::new()), Some("a.com"), "/").is_none());
    }

    #[test]
    fn found_index_and_routes_follow_the_file_order() {
        let r = router(&[
            (None, "/", "0"),
            (Some("b.com"), "/", "1"),
            (Some("*.b.com"), "/", "2"),
            (None, "/long/er", "3"),
        ]);
        let targets: Vec<_> = r.routes().map(|r| r.target).collect();
        assert_eq!(targets, ["0", "1", "2", "3"]);
        for (h, path, want) in [
            (None, "/", 0),
            (Some("b.com"), "/", 1),
            (Some("x.b.com"), "/", 2),
            (None, "/long/er/x", 3),
        ] {
            let found = r.find(h, path).expect("a route");
            assert_eq!(found.index, want, "{h:?} {path}");
            assert_eq!(found.route.target, want.to_string());
        }
    }

    #[test]
    fn stripping_keeps_a_leading_slash_and_the_query() {
        for (prefix, path, want) in [
            ("/admin", "/admin/users?x", "/users?x"),
            ("/admin", "/admin", "/"),
            ("/admin", "/admin?q", "/?q"),
            ("/admin", "/admin/", "/"),
            ("/admin", "/admin/?q", "/?q"),
            ("/api/v1", "/api/v1/a/b", "/a/b"),
            ("/v1/", "/v1/x", "/x"),
            ("/v1/", "/v1/", "/"),
            ("/v1/", "/v1/?q", "/?q"),
            ("/", "/a/b?c", "/a/b?c"),
            ("/", "*", "*"),
            // Not matched: unchanged.
            ("/admin", "/administrator", "/administrator"),
            ("/v1/", "/v1", "/v1"),
        ] {
            assert_eq!(strip_prefix(prefix, path), want, "{prefix} {path}");
        }
        assert!(matches!(strip_prefix("/a", "/a/b"), Cow::Borrowed("/b")));
        let r = router(&[(None, "/admin", "admin")]);
        let found = r.find(None, "/admin?q").expect("a route");
        assert_eq!(found.stripped("/admin?q"), "/?q");
    }

    #[test]
    fn names_sharing_a_hash_are_told_apart() {
        let group = |index| Group {
            entries: vec![Entry {
                prefix: "/".into(),
                index,
            }],
        };
        let mut map = ByHash::default();
        let names = [("a.com", 0), ("b.com", 1)].map(|(name, index)| Named {
            name: name.into(),
            group: group(index),
        });
        map.insert(1, names.into());
        let found = |name: &[u8]| lookup(&map, SuffixHash(1), name).and_then(|g| g.find("/"));
        assert_eq!(found(b"a.com"), Some(0));
        assert_eq!(found(b"B.COM"), Some(1));
        assert_eq!(found(b"c.com"), None);
        assert!(lookup(&map, SuffixHash(2), b"a.com").is_none());
        let mut built = ByHash::default();
        group_for(&mut built, "a.com").push("/x", 0);
        group_for(&mut built, "a.com").push("/y", 1);
        let entries: Vec<_> = built
            .values()
            .flatten()
            .map(|n| n.group.entries.len())
            .collect();
        assert_eq!(entries, [2]);
    }

    #[test]
    fn router_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Router<std::sync::Arc<str>>>();
    }

    /// The rule as the module doc states it, by brute force over every
    /// route: how specific a matching route's host is (higher wins).
    fn reference(routes: &[Route<&'static str>], h: Option<&str>, path: &str) -> Option<usize> {
        let specificity = |route: &Route<_>| match &route.host {
            None => Some(0),
            Some(m) if h.is_some_and(|h| host_matches(m, h)) => Some(match m {
                HostMatch::Exact(_) => usize::MAX,
                HostMatch::Wildcard(suffix) => suffix.len(),
            }),
            Some(_) => None,
        };
        routes
            .iter()
            .enumerate()
            .filter(|(_, r)| path_matches(&r.path_prefix, path))
            .filter_map(|(i, r)| Some((specificity(r)?, r.path_prefix.len(), i)))
            // Highest host, then longest prefix, then lowest index.
            .max_by_key(|&(host, len, i)| (host, len, std::cmp::Reverse(i)))
            .map(|(_, _, i)| i)
    }

    #[test]
    fn the_table_agrees_with_the_rule_by_brute_force() {
        let hosts = [
            None,
            Some("a.x.com"),
            Some("x.com"),
            Some("*.x.com"),
            Some("*.com"),
            Some("[::1]"),
        ];
        let prefixes = ["/", "/a", "/a/", "/a/b", "/ab", "/b"];
        let requests_hosts = [
            None,
            Some("a.x.com"),
            Some("A.X.com:80"),
            Some("b.x.com"),
            Some("x.com."),
            Some("a.a.x.com"),
            Some("y.com"),
            Some("com"),
            Some("other.org"),
            Some("\u{e4}.x.com"),
            Some("[::1]:80"),
            Some("[0::1]"),
            Some("::1"),
            Some("[::2]"),
        ];
        let paths = [
            "/", "/a", "/a/", "/a?q", "/a/b", "/a/bc", "/ab", "/abc", "/b/", "/c", "*",
        ];
        // Route lists drawn from a fixed-seed generator: varied lengths,
        // orders and duplicates.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let routes: Vec<_> = (0..rng.usize(1..12))
                .map(|_| {
                    route(
                        hosts[rng.usize(..hosts.len())],
                        prefixes[rng.usize(..prefixes.len())],
                        "t",
                    )
                })
                .collect();
            let table = Router::new(routes.clone());
            for h in requests_hosts {
                for path in paths {
                    assert_eq!(
                        table.find(h, path).map(|f| f.index),
                        reference(&routes, h, path),
                        "{h:?} {path} in {routes:?}"
                    );
                }
            }
        }
    }
}
