//! Config errors and warnings in one shape, the one compilers and `nginx -t`
//! use so an editor or terminal can jump to the spot:
//!
//! ```text
//! config.yaml:7:12: timeouts.connect: must be greater than zero
//! environment variable LB_RETRY__ATTEMPTS: retry.attempts: expected an integer, found "three"
//! ```
//!
//! serde's own messages (`invalid type: string "x", expected i64`, `expected
//! struct RawBackend`) are rewritten here into `expected …, found …` with no
//! Rust type in them, whether they come from `yaml_serde` (the file) or from
//! figment (environment overrides).

use std::fmt;
use std::path::PathBuf;

use super::locate::Position;

/// Why a config could not be used. Every variant names the file or the
/// environment variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}", path = path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: file is empty", path = path.display())]
    Empty { path: PathBuf },
    /// YAML syntax, an unknown key, a value of the wrong type or out of
    /// range, a rule between keys: where, which key, what.
    #[error("{0}")]
    Invalid(Diagnostic),
}

impl ConfigError {
    /// Line and column in the file, when the error has them.
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Invalid(Diagnostic {
                origin: Origin::File(position),
                ..
            }) => Some(*position),
            _ => None,
        }
    }
}

/// One error or warning about one place of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The config file (named even when the value came from the environment).
    pub file: PathBuf,
    /// Where the offending value was written.
    pub origin: Origin,
    /// Its key path, like `backends[2].address`; empty when the problem is
    /// not one key's (a YAML syntax error, a file that is not UTF-8).
    pub field: String,
    /// What is wrong, and what is expected.
    pub message: String,
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file, at this position.
    File(Position),
    /// An `LB_*` environment override, by its name as set.
    Env(String),
    /// The file as a whole (too large to be a config).
    WholeFile,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File(Position { line, column }) => {
                write!(f, "{}:{line}:{column}: ", self.file.display())?;
            }
            Origin::Env(variable) => write!(f, "environment variable {variable}: ")?,
            Origin::WholeFile => write!(f, "{}: ", self.file.display())?,
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// A deserialization failure taken apart: the key it is about (relative to
/// the path the deserializer reported) and what to say.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    /// A key to append to the reported path (`unknown field`, `missing
    /// field` and `duplicate field` report the mapping, not the key).
    pub key: Option<String>,
    pub message: String,
}

impl Problem {
    fn plain(message: impl Into<String>) -> Self {
        Problem {
            key: None,
            message: message.into(),
        }
    }

    fn wrong_type(found: &str, expected: &str) -> Self {
        let expected = expected_in_words(expected);
        let found = found_in_words(found);
        if expected == "an integer" {
            // `as u128`: a number too big for any integer type.
            if let Some(number) = found
                .strip_suffix(" as u128")
                .or(found.strip_suffix(" as i128"))
            {
                return Problem::plain(format!("{number} is too large"));
            }
        }
        Problem::plain(format!("expected {expected}, found {found}"))
    }

    fn unknown_key(key: &str, expected: &[&str]) -> Self {
        Problem {
            key: Some(key.to_owned()),
            message: format!("unknown key; expected {}", one_of(expected)),
        }
    }

    fn missing(key: &str) -> Self {
        Problem {
            key: Some(key.to_owned()),
            message: "missing: this key is required".to_owned(),
        }
    }

    fn duplicate(key: &str) -> Self {
        Problem {
            key: Some(key.to_owned()),
            message: "written twice in the same mapping".to_owned(),
        }
    }

    fn unknown_name(name: &str, expected: &[&str]) -> Self {
        Problem::plain(format!("{name:?} is not {}", one_of(expected)))
    }

    /// From serde's messages as `yaml_serde` prints them, its path prefix and
    /// position already removed.
    pub fn from_serde_message(message: &str) -> Self {
        if let Some(rest) = message
            .strip_prefix("invalid type: ")
            .or(message.strip_prefix("invalid value: "))
        {
            if let Some((found, expected)) = rest.rsplit_once(", expected ") {
                return Problem::wrong_type(found, expected);
            }
        }
        if let Some(rest) = message.strip_prefix("unknown field ") {
            let (key, expected) = name_and_list(rest);
            return Problem::unknown_key(
                &key,
                &expected.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
        if let Some(rest) = message.strip_prefix("unknown variant ") {
            let (name, expected) = name_and_list(rest);
            return Problem::unknown_name(
                &name,
                &expected.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
        if let Some(key) = message.strip_prefix("missing field ") {
            return Problem::missing(key.trim_matches('`'));
        }
        if let Some(key) = message.strip_prefix("duplicate field ") {
            return Problem::duplicate(key.trim_matches('`'));
        }
        if message == "unknown anchor" {
            return Problem::plain(
                "unknown anchor: an alias *NAME refers to an &NAME written before it",
            );
        }
        Problem::plain(message)
    }

    /// From figment's structured error kind (environment overrides).
    pub fn from_figment(kind: &figment::error::Kind) -> Self {
        use figment::error::Kind;
        match kind {
            Kind::InvalidType(found, expected) | Kind::InvalidValue(found, expected) => {
                Problem::wrong_type(&actual_in_serde_words(found), expected)
            }
            Kind::UnknownField(key, expected) => Problem::unknown_key(key, expected),
            Kind::UnknownVariant(name, expected) => Problem::unknown_name(name, expected),
            Kind::MissingField(key) => Problem::missing(key),
            Kind::DuplicateField(key) => Problem::duplicate(key),
            Kind::Message(message) => Problem::from_serde_message(message),
            other => Problem::plain(other.to_string()),
        }
    }
}

/// `` `a` `` → `a`; `` `a` or `b` `` → `a or b`; three or more → `one of a, b, c`.
fn one_of(names: &[&str]) -> String {
    match names {
        [] => "no key here".to_owned(),
        [one] => (*one).to_owned(),
        [a, b] => format!("{a} or {b}"),
        many => format!("one of {}", many.join(", ")),
    }
}

/// `` `stratgy`, expected one of `listen`, `mode` `` → (`stratgy`, [listen, mode]).
fn name_and_list(rest: &str) -> (String, Vec<String>) {
    let (name, list) = rest.split_once(", expected ").unwrap_or((rest, ""));
    let list = list.strip_prefix("one of ").unwrap_or(list);
    let names = list
        .split(", ")
        .flat_map(|part| part.split(" or "))
        .map(|n| n.trim().trim_matches('`').to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    (name.trim_matches('`').to_owned(), names)
}

/// serde's "expected" side in words a config author knows.
fn expected_in_words(expected: &str) -> String {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "i128" | "u8" | "u16" | "u32" | "u64" | "u128" | "isize"
        | "usize" => "an integer".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a boolean" | "bool" => "true or false".to_owned(),
        "a sequence" => "a list".to_owned(),
        "a map" => "a mapping".to_owned(),
        // Never shown for lb's own types (they all say what they expect);
        // kept so no Rust name can reach a user.
        s if s.starts_with("struct ") => "a mapping".to_owned(),
        s if s.starts_with("enum ") => "a name".to_owned(),
        s => s.to_owned(),
    }
}

/// serde's `Unexpected` as printed (`string "x"`, ``integer `5` ``, `map`) →
/// the value as written, or what kind of thing it is.
fn found_in_words(found: &str) -> String {
    if let Some(string) = found.strip_prefix("string ") {
        return string.to_owned();
    }
    for prefix in ["integer ", "floating point ", "boolean "] {
        if let Some(value) = found.strip_prefix(prefix) {
            return value.replace('`', "");
        }
    }
    match found {
        "sequence" => "a list".to_owned(),
        "map" => "a mapping".to_owned(),
        "unit value" | "Option value" => "nothing".to_owned(),
        other => other.to_owned(),
    }
}

/// figment's `Actual` printed the way serde prints `Unexpected`, so both go
/// through [`found_in_words`].
fn actual_in_serde_words(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Str(s) => format!("string {s:?}"),
        Actual::Unsigned(n) => format!("integer `{n}`"),
        Actual::Signed(n) => format!("integer `{n}`"),
        Actual::Float(n) => format!("floating point `{n}`"),
        Actual::Bool(b) => format!("boolean `{b}`"),
        Actual::Seq => "sequence".to_owned(),
        Actual::Map => "map".to_owned(),
        Actual::Unit => "unit value".to_owned(),
        other => other.to_string(),
    }
}

/// `(line, column)` from a message containing `line N column M`, or
/// starting with the editor-clickable `FILE:LINE:COLUMN:`.
pub fn line_column(message: &str) -> (Option<u64>, Option<u64>) {
    if !message.contains(" line ") {
        let segments: Vec<&str> = message.split(':').collect();
        let number = |s: &str| s.parse::<u64>().ok().filter(|_| !s.starts_with('+'));
        // A number pair followed by more text: `FILE:4:7: message`.
        for pair in segments.windows(3) {
            if let (Some(line), Some(column)) = (number(pair[0]), number(pair[1])) {
                return (Some(line), Some(column));
            }
        }
        return (None, None);
    }
    let number_after = |key: &str| {
        let at = message.rfind(key)? + key.len();
        let digits: String = message[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    (number_after("line "), number_after("column "))
}

#[cfg(test)]
mod tests {
    use super::Problem;

    #[test]
    fn serde_messages_lose_their_rust() {
        let p = Problem::from_serde_message(r#"invalid type: string "three", expected i64"#);
        assert_eq!(p.message, r#"expected an integer, found "three""#);
        let p = Problem::from_serde_message("invalid type: sequence, expected a boolean");
        assert_eq!(p.message, "expected true or false, found a list");
        let p =
            Problem::from_serde_message("unknown field `wieght`, expected `address` or `weight`");
        assert_eq!(p.key.as_deref(), Some("wieght"));
        assert_eq!(p.message, "unknown key; expected address or weight");
        let p = Problem::from_serde_message("missing field `address`");
        assert_eq!(p.key.as_deref(), Some("address"));
        let p = Problem::from_serde_message("something else entirely");
        assert_eq!(p.message, "something else entirely");
    }
}
