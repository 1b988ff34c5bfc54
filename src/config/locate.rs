//! Where a key path (`backends[2].address`) is in the YAML text, so an error
//! found after parsing (a value check, a cross-field rule) can carry the
//! line and column of the offending value like a parse error does.
//!
//! The lookup reuses `yaml_serde`, the parser that read the config, rather
//! than a second YAML parser whose idea of a position could differ: a
//! [`Probe`] walks the document down the path and fails on purpose at the
//! value (or key) it was sent to, and `yaml_serde` stamps that failure with
//! the position of the event it was reading. It costs one parse of the text,
//! paid only when there is something to report.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A 1-based line and column, as editors count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// One step of a key path: a mapping key or a list index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// `retry.budget.ratio` → keys; `backends[2].address` → key, index, key.
/// An empty path is the document itself.
pub fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut indexes) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(rest) = indexes.strip_prefix('[') {
            let Some((index, after)) = rest.split_once(']') else {
                break;
            };
            match index.parse() {
                Ok(i) => out.push(Segment::Index(i)),
                Err(_) => break,
            }
            indexes = after;
        }
    }
    out
}

/// The position of the value at `path`, or of its nearest ancestor that is
/// in the text (a missing key is reported where its mapping is); the
/// document's start when nothing along the path is.
pub fn value_position(text: &str, path: &str) -> Position {
    let segments = segments(path);
    (0..=segments.len())
        .rev()
        .find_map(|len| probe(text, &segments[..len], Target::Value))
        .unwrap_or(Position { line: 1, column: 1 })
}

/// The position of the `occurrence`-th (0-based) appearance of the last key
/// of `path` in its mapping: where a duplicate key is written again.
pub fn key_position(text: &str, path: &str, occurrence: usize) -> Option<Position> {
    probe(text, &segments(path), Target::Key { occurrence })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The value at the end of the path.
    Value,
    /// The key at the end of the path, the nth time it appears.
    Key { occurrence: usize },
}

/// The message a probe fails with when it reached its target; anything else
/// means the path is not in the text.
const ARRIVED: &str = "\u{1}lb: probe arrived";

fn probe(text: &str, path: &[Segment<'_>], target: Target) -> Option<Position> {
    if path.is_empty() && target != Target::Value {
        return None;
    }
    let result = Probe { path, target }.deserialize(yaml_serde::Deserializer::from_str(text));
    let err = result.err()?;
    if !err.to_string().contains(ARRIVED) {
        return None;
    }
    let location = err.location()?;
    Some(Position {
        line: location.line(),
        column: location.column(),
    })
}

/// Walks down `path`; every way of not finding it is an ordinary error.
struct Probe<'p> {
    path: &'p [Segment<'p>],
    target: Target,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            // Any visit of `Arrive` fails with `ARRIVED`, at this value.
            d.deserialize_any(Arrive)
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping or list on the way to the key")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Segment::Key(wanted), rest)) = self.path.split_first() else {
            return Err(de::Error::custom("not a list"));
        };
        let mut seen = 0;
        loop {
            let stop_at_key = match self.target {
                Target::Key { occurrence } if rest.is_empty() => Some(occurrence),
                _ => None,
            };
            let key = KeySeed {
                wanted,
                arrive: stop_at_key == Some(seen),
            };
            let Some(matched) = map.next_key_seed(key)? else {
                return Err(de::Error::custom("key not found"));
            };
            if matched && stop_at_key.is_none() {
                return map.next_value_seed(Probe {
                    path: rest,
                    target: self.target,
                });
            }
            seen += usize::from(matched);
            map.next_value::<IgnoredAny>()?;
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Segment::Index(wanted), rest)) = self.path.split_first() else {
            return Err(de::Error::custom("not a mapping"));
        };
        for _ in 0..*wanted {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom("index not found"));
            }
        }
        match seq.next_element_seed(Probe {
            path: rest,
            target: self.target,
        })? {
            Some(()) => Err(de::Error::custom("unreachable: the probe always fails")),
            None => Err(de::Error::custom("index not found")),
        }
    }
}

/// Reads a mapping key: `true` when it is the wanted one; fails with
/// [`ARRIVED`] (at the key) when it is and the key itself is the target.
struct KeySeed<'a> {
    wanted: &'a str,
    arrive: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        match (key == self.wanted, self.arrive) {
            (true, true) => Err(E::custom(ARRIVED)),
            (matched, _) => Ok(matched),
        }
    }

    // Keys that are not strings (`1: x`) are never the wanted one.
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

/// Fails on whatever it is given: its `expecting` is the [`ARRIVED`] marker,
/// and serde's default for every `visit_*` is an error naming it.
struct Arrive;

impl Visitor<'_> for Arrive {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(ARRIVED)
    }
}

#[cfg(test)]
mod tests {
    use super::{key_position, segments, value_position, Position, Segment};

    fn at(line: usize, column: usize) -> Position {
        Position { line, column }
    }

    #[test]
    fn paths_split_into_keys_and_indexes() {
        assert_eq!(
            segments("backends[2].address"),
            [
                Segment::Key("backends"),
                Segment::Index(2),
                Segment::Key("address")
            ]
        );
        assert_eq!(
            segments("retry.retry_on[0]"),
            [
                Segment::Key("retry"),
                Segment::Key("retry_on"),
                Segment::Index(0)
            ]
        );
        assert!(segments("").is_empty());
    }

    const TEXT: &str = "# lb\nlisten: 127.0.0.1:8080\nbackends:\n  - address: a:1\n  - {address: \"b\", weight: 2}\ntimeouts:\n  connect: 0s\n";

    #[test]
    fn values_are_found_block_and_flow() {
        assert_eq!(value_position(TEXT, "listen"), at(2, 9));
        assert_eq!(value_position(TEXT, "backends[0].address"), at(4, 14));
        assert_eq!(value_position(TEXT, "backends[1].address"), at(5, 15));
        assert_eq!(value_position(TEXT, "backends[1].weight"), at(5, 28));
        assert_eq!(value_position(TEXT, "timeouts.connect"), at(7, 12));
        // A list value is where its first item starts.
        assert_eq!(value_position(TEXT, "backends"), at(4, 3));
    }

    #[test]
    fn a_missing_key_is_placed_at_its_nearest_ancestor() {
        assert_eq!(value_position(TEXT, "timeouts.request"), at(7, 3));
        assert_eq!(value_position(TEXT, "backends[7].address"), at(4, 3));
        assert_eq!(value_position(TEXT, "health_check.path"), at(2, 1));
        assert_eq!(value_position("", "x"), at(1, 1));
    }

    #[test]
    fn keys_are_found_by_occurrence() {
        let text = "a: 1\nb: 2\na: 3\n";
        assert_eq!(key_position(text, "a", 0), Some(at(1, 1)));
        assert_eq!(key_position(text, "a", 1), Some(at(3, 1)));
        assert_eq!(key_position(text, "a", 2), None);
    }
}
