//! gRPC over lb: which requests are gRPC calls, and lb's own answers to
//! them in gRPC's terms.
//!
//! A gRPC client reads the call's outcome from `grpc-status`, not from the
//! HTTP status: a bare 502 or 503 surfaces as `UNKNOWN` or `INTERNAL`. So
//! every answer lb gives itself to a request with `content-type:
//! application/grpc*` (no route, no healthy backend, a backend that could
//! not be reached or broke, a timeout) is a trailers-only gRPC response:
//! HTTP 200, `content-type: application/grpc`, `grpc-status` (14
//! UNAVAILABLE, or 4 DEADLINE_EXCEEDED for timeouts) and `grpc-message`
//! saying why.

use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use std::time::Duration;

use crate::http::body::ResponseBody;

/// `grpc-status` codes lb answers with (grpc/doc/statuscodes.md).
pub const UNAVAILABLE: u32 = 14;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const INTERNAL: u32 = 13;
pub const UNIMPLEMENTED: u32 = 12;
pub const RESOURCE_EXHAUSTED: u32 = 8;

/// Whether a request's headers make it a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| is_grpc_content_type(v.as_bytes()))
}

/// A gRPC call's `grpc-timeout` (`100m`, `5S`, `1H`: up to 8 digits and a
/// unit), which bounds how long lb waits for the call's answer.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `application/grpc`, alone or with a suffix (`+proto`, `+json`) or
/// parameters.
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// The `grpc-status` that stands for lb's own HTTP answer `status`.
pub fn status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        408 | 504 => DEADLINE_EXCEEDED,
        // A request lb could not make sense of: the call cannot succeed.
        400 | 405 | 413 | 414 | 431 => INTERNAL,
        501 => UNIMPLEMENTED,
        429 => RESOURCE_EXHAUSTED,
        // No route, no healthy backend, unreachable or broken backends.
        _ => UNAVAILABLE,
    }
}

/// lb's own answer `resp` (HTTP status and `lb: ...` text) as a gRPC
/// trailers-only response with the same meaning.
pub fn own_answer(resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let (parts, body) = resp.into_parts();
    let text = match &body {
        ResponseBody::Text(Some(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        _ => String::new(),
    };
    let message = text.trim().trim_start_matches("lb: ");
    let message = if message.is_empty() {
        parts.status.canonical_reason().unwrap_or("").to_owned()
    } else {
        message.to_owned()
    };
    answer(status_for(parts.status), &format!("lb: {message}"))
}

/// A trailers-only gRPC response: `grpc-status` `code` and `grpc-message`
/// `message`, no body.
pub fn answer(code: u32, message: &str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::Text(None));
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
    resp
}

/// `grpc-message`'s encoding: printable ASCII but `%` as is, every other
/// byte of the UTF-8 as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        let t = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            timeout(&h)
        };
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "123456789m", "1x", "-1S", "1.5S"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn grpc_content_types() {
        for yes in [
            &b"application/grpc"[..],
            b"application/grpc+proto",
            b"Application/GRPC+json",
            b"application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc_content_type(yes), "{yes:?}");
        }
        for no in [
            &b"application/grpcx"[..],
            b"application/json",
            b"",
            b"application/grp",
        ] {
            assert!(!is_grpc_content_type(no), "{no:?}");
        }
    }

    #[test]
    fn own_answers_become_trailers_only_responses() {
        let own = crate::http::retry::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "lb: no healthy backend available\n".to_owned(),
        );
        let resp = own_answer(own);
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "lb: no healthy backend available");
        assert_eq!(status_for(StatusCode::GATEWAY_TIMEOUT), DEADLINE_EXCEEDED);
        assert_eq!(percent_encode("50% ü"), "50%25 %C3%BC");
    }
}
