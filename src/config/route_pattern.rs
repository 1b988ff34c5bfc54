//! Route patterns as the config writes them: a host pattern
//! ([`HostMatch`]) and the checks on a path prefix. They are parsed and
//! validated here, with the rest of the file; `core::route` matches
//! requests against them (its module doc has the matching rules).

use std::fmt;
use std::net::Ipv6Addr;

/// The longest host name a pattern may have (RFC 1035, without the root dot).
const MAX_NAME: usize = 253;
/// The longest label of a host name (RFC 1035).
const MAX_LABEL: usize = 63;

/// A host pattern: an exact name, or `*.suffix` (one or more labels before
/// the suffix, never the suffix itself). Stored lowercase, without a trailing
/// dot, IPv6 literals bracketed and canonical.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    /// `api.example.com`, `10.0.0.1`, `[::1]`.
    Exact(Box<str>),
    /// The suffix with its leading dot: `*.example.com` is `".example.com"`.
    Wildcard(Box<str>),
}

impl HostMatch {
    /// Parses a host pattern as written in the config: a host name, an IP
    /// literal (IPv6 with or without brackets) or `*.` followed by a host
    /// name. Case and one trailing dot are ignored; a port is an error (the
    /// port a client sends is never compared).
    pub fn parse(s: &str) -> Result<HostMatch, String> {
        let invalid = |why: &str| format!("{s:?} is not a host name or *.suffix pattern ({why})");
        if s.is_empty() {
            return Err(invalid("it is empty"));
        }
        if let Some(ip) = parse_ipv6(s) {
            return Ok(HostMatch::Exact(format!("[{ip}]").into()));
        }
        let lower = s.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if let Some(suffix) = name.strip_prefix("*.").filter(|rest| !rest.contains('*')) {
            check_host_name(suffix).map_err(|why| invalid(&why))?;
            return Ok(HostMatch::Wildcard(format!(".{suffix}").into()));
        }
        if name.contains('*') {
            return Err(invalid(
                "a wildcard is allowed only as the whole first label, as in *.example.com",
            ));
        }
        if let Some((_, port)) = name.rsplit_once(':') {
            if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(
                    "a host pattern has no port: the port a client sends is ignored",
                ));
            }
        }
        check_host_name(name).map_err(|why| invalid(&why))?;
        Ok(HostMatch::Exact(name.into()))
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostMatch::Exact(name) => f.write_str(name),
            HostMatch::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// `[::1]` or `::1` (the brackets optional) as an address; `None` for
/// anything else, zone ids (`%eth0`) included.
pub(crate) fn parse_ipv6(s: &str) -> Option<Ipv6Addr> {
    let inner = match s.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']')?,
        None => s,
    };
    inner.parse().ok()
}

/// A host name as RFC 1123 has it, lowercase (the caller lowercased it),
/// with `_` allowed too (common in internal names): labels of 1 to 63
/// letters, digits, `-` or `_`, not starting or ending with `-`, 253 bytes
/// at most in all.
fn check_host_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("longer than {MAX_NAME} bytes"));
    }
    if !name.is_ascii() {
        return Err("write internationalized names in their xn-- (punycode) form".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label".into());
        }
        if label.len() > MAX_LABEL {
            return Err(format!("a label is longer than {MAX_LABEL} bytes"));
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(format!("{c:?} is not allowed in a host name"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with '-'".into());
        }
    }
    Ok(())
}

/// Checks a route's path prefix: it starts with `/`, is ASCII (non-ASCII
/// arrives percent-encoded, so a raw one would never match), has no query,
/// fragment, space or control character, no empty segment (`//`), no `.` or
/// `..` segment (they would match only unnormalized paths), and every `%` is
/// followed by two hex digits.
pub fn check_path_prefix(p: &str) -> Result<(), String> {
    let invalid = |why: &str| Err(format!("path prefix {p:?} {why}"));
    if !p.starts_with('/') {
        return invalid("does not start with '/'");
    }
    if !p.is_ascii() {
        return invalid("is not ASCII: percent-encode it as clients send it");
    }
    if let Some(c) = p.chars().find(|&c| matches!(c, '?' | '#')) {
        return invalid(&format!(
            "contains {c:?}: a prefix is matched against the path only"
        ));
    }
    if let Some(c) = p
        .chars()
        .find(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return invalid(&format!("contains {c:?}"));
    }
    if p.contains("//") {
        return invalid("has an empty segment (\"//\")");
    }
    if p.split('/').any(|seg| seg == "." || seg == "..") {
        return invalid("has a \".\" or \"..\" segment");
    }
    let bytes = p.as_bytes();
    for (i, _) in p.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3);
        if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
            return invalid("has a '%' not followed by two hex digits");
        }
    }
    Ok(())
}
