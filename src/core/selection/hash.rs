//! The one hash used for steering: stable across processes, builds and
//! platforms, so every replica reading the same config maps a key the same
//! way. `std`'s `DefaultHasher` promises none of that (its algorithm may
//! change between Rust releases), and no seed is random.
//!
//! FNV-1a over the bytes, then MurmurHash3's 64-bit finaliser so that short,
//! similar keys (`user-1`, `user-2`) land far apart.

use std::net::IpAddr;

/// Stable 64-bit hash of `bytes` under `seed` (different seeds give
/// independent hashes of the same bytes).
pub fn stable(bytes: &[u8], seed: u64) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET ^ mix(seed);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix(h)
}

/// The hash key of a client address, as `hash_key: client_ip` uses it (an
/// IPv4-mapped IPv6 address hashes as the IPv4 one). For any listener that
/// wants client-IP affinity: `Steer { key: Some(hash::client_ip(ip)), .. }`.
pub fn client_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(ip) => stable(&ip.octets(), 0),
        IpAddr::V6(ip) => stable(&ip.octets(), 0),
    }
}

/// MurmurHash3's `fmix64`: a bijective scramble of 64 bits.
pub fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// A hash as a fraction in [0, 1).
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_values_never_change() {
        // Replicas of different builds must agree: these values are the contract.
        assert_eq!(stable(b"", 0), mix(0xcbf2_9ce4_8422_2325 ^ mix(0)));
        assert_eq!(stable(b"user-1", 0), stable(b"user-1", 0));
        assert_ne!(stable(b"user-1", 0), stable(b"user-2", 0));
        assert_ne!(stable(b"user-1", 0), stable(b"user-1", 1));
        assert_eq!(stable(b"127.0.0.1:9001", 0), 0x33ac_4f5a_f5b0_6ee4);
    }
}
