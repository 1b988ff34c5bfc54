//! STUB (replaced by the router branch).
use std::borrow::Cow;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(Box<str>),
    Wildcard(Box<str>),
}

impl HostMatch {
    pub fn parse(s: &str) -> Result<HostMatch, String> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(format!("{s:?} is not a host name or *.suffix pattern"));
            }
            return Ok(HostMatch::Wildcard(format!(".{rest}").into()));
        }
        if s.is_empty() || s.contains('*') || s.contains('/') || s.contains(':') {
            return Err(format!("{s:?} is not a host name or *.suffix pattern"));
        }
        Ok(HostMatch::Exact(s.into()))
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

pub fn check_path_prefix(p: &str) -> Result<(), String> {
    if p.starts_with('/') {
        Ok(())
    } else {
        Err(format!("{p:?} must start with /"))
    }
}

#[derive(Debug)]
pub struct Route<T> {
    pub host: Option<HostMatch>,
    pub path_prefix: Box<str>,
    pub target: T,
}

#[derive(Debug)]
pub struct Router<T> {
    routes: Vec<Route<T>>,
}

pub struct Found<'a, T> {
    pub route: &'a Route<T>,
    pub index: usize,
}

impl<T> Router<T> {
    pub fn new(routes: Vec<Route<T>>) -> Router<T> {
        Router { routes }
    }
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<Found<'_, T>> {
        let host = host.map(|h| {
            let h = h.rsplit_once(':').map_or(h, |(a, p)| {
                if p.bytes().all(|b| b.is_ascii_digit()) {
                    a
                } else {
                    h
                }
            });
            h.trim_end_matches('.').to_ascii_lowercase()
        });
        let rank = |r: &Route<T>| -> Option<(usize, usize)> {
            let hs = match (&r.host, &host) {
                (None, _) => 0,
                (Some(HostMatch::Exact(e)), Some(h)) if **e == **h => usize::MAX,
                (Some(HostMatch::Wildcard(s)), Some(h))
                    if h.ends_with(&**s) && h.len() > s.len() =>
                {
                    s.len()
                }
                _ => return None,
            };
            let p = &*r.path_prefix;
            let ok = p == "/"
                || (path.starts_with(p)
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/') | Some(b'?')));
            ok.then_some((hs, p.len()))
        };
        let mut best: Option<(usize, (usize, usize))> = None;
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(k) = rank(r) {
                if best.is_none_or(|(_, b)| k > b) {
                    best = Some((i, k));
                }
            }
        }
        best.map(|(i, _)| Found {
            route: &self.routes[i],
            index: i,
        })
    }
}

pub fn strip_prefix<'p>(prefix: &str, path: &'p str) -> Cow<'p, str> {
    if prefix == "/" {
        return Cow::Borrowed(path);
    }
    let rest = &path[prefix.len().min(path.len())..];
    if rest.starts_with('/') {
        Cow::Borrowed(rest)
    } else {
        Cow::Owned(format!("/{rest}"))
    }
}
