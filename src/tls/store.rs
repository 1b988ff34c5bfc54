//! The certificates a listener serves, picked by the client's SNI, and the
//! resolver rustls asks on each handshake. The store is swapped whole
//! (`ArcSwap`) when a certificate file changes, so new handshakes get the
//! new pair at once and open connections keep the session they have.
//!
//! Selection: an exact SAN name (case-insensitive, trailing dot ignored)
//! beats a wildcard `*.example.com`, which matches exactly one label
//! (`a.example.com`, not `a.b.example.com` nor `example.com`); no SNI, or a
//! name no certificate has, gets the first certificate.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::pair::CertPair;

/// Pairs in config order, with lookups by name.
#[derive(Debug)]
pub struct CertStore {
    pairs: Vec<CertPair>,
    /// Exact name → index of the first pair with it.
    exact: HashMap<String, usize>,
    /// `example.com` for `*.example.com` → index.
    wildcard: HashMap<String, usize>,
}

impl CertStore {
    /// A store of `pairs`; the first is the default. `None` when empty.
    pub fn new(pairs: Vec<CertPair>) -> Option<CertStore> {
        if pairs.is_empty() {
            return None;
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, pair) in pairs.iter().enumerate() {
            for name in &pair.info.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        Some(CertStore {
            pairs,
            exact,
            wildcard,
        })
    }

    pub fn pairs(&self) -> &[CertPair] {
        &self.pairs
    }

    /// The index of the pair for `server_name` (see the module doc).
    pub fn pick(&self, server_name: Option<&str>) -> usize {
        let Some(name) = server_name else {
            return 0;
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            &lower
        } else {
            name
        };
        if let Some(&i) = self.exact.get(name) {
            return i;
        }
        name.split_once('.')
            .filter(|(label, _)| !label.is_empty())
            .and_then(|(_, parent)| self.wildcard.get(parent).copied())
            .unwrap_or(0)
    }
}

/// What rustls asks per handshake: the current store's pick.
#[derive(Debug)]
pub struct LiveResolver {
    store: ArcSwap<CertStore>,
}

impl LiveResolver {
    pub fn new(store: CertStore) -> LiveResolver {
        LiveResolver {
            store: ArcSwap::from_pointee(store),
        }
    }

    /// Serves `store` to handshakes from now on.
    pub fn swap(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }

    pub fn current(&self) -> Arc<CertStore> {
        self.store.load_full()
    }
}

impl ResolvesServerCert for LiveResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load();
        let i = store.pick(hello.server_name());
        Some(Arc::clone(&store.pairs[i].key))
    }
}

#[cfg(test)]
mod tests {
    use super::super::pair::testing::self_signed;
    use super::*;
    use std::path::Path;

    fn pair(names: &[&str]) -> CertPair {
        let (cert, key) = self_signed(names);
        CertPair::from_pem(
            Path::new("c"),
            cert.as_bytes(),
            Path::new("k"),
            key.as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn exact_beats_wildcard_which_matches_one_label() {
        let store = CertStore::new(vec![
            pair(&["default.test"]),
            pair(&["*.example.com"]),
            pair(&["api.example.com"]),
        ])
        .unwrap();
        assert_eq!(store.pick(None), 0);
        assert_eq!(store.pick(Some("unknown.test")), 0);
        assert_eq!(store.pick(Some("api.example.com")), 2);
        assert_eq!(store.pick(Some("API.Example.COM.")), 2);
        assert_eq!(store.pick(Some("web.example.com")), 1);
        assert_eq!(store.pick(Some("a.b.example.com")), 0);
        assert_eq!(store.pick(Some("example.com")), 0);
        assert_eq!(store.pick(Some(".example.com")), 0);
    }

    #[test]
    fn an_empty_store_is_none() {
        assert!(CertStore::new(Vec::new()).is_none());
    }
}
