//! The `date` header value, formatted once per second per worker.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

thread_local! {
    /// The IMF-fixdate text, and the instant it stops being right (the
    /// next second of the wall clock).
    static CACHED: RefCell<(Option<Instant>, String)> = const { RefCell::new((None, String::new())) };
}

/// Appends the date at `now` (a reading the caller already took: the
/// wall clock is read once a second, not per response).
pub(super) fn extend(out: &mut Vec<u8>, now: Instant) {
    CACHED.with_borrow_mut(|(until, text)| {
        if until.is_none_or(|until| now >= until) {
            let wall = SystemTime::now();
            let into_second = wall
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            *until =
                Some(now + (Duration::from_secs(1) - Duration::from_nanos(into_second.into())));
            *text = httpdate::fmt_http_date(wall);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_clock_second_cached_until_it_ends() {
        let now = Instant::now();
        let mut text = Vec::new();
        extend(&mut text, now);
        let parsed = httpdate::parse_http_date(std::str::from_utf8(&text).unwrap()).unwrap();
        let off = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(off < Duration::from_secs(3), "{off:?} off");
        let until = CACHED.with_borrow(|(until, _)| until.unwrap());
        assert!(until > now && until <= now + Duration::from_secs(1));
        // Past it, the wall clock is read again and a new end is set.
        extend(&mut Vec::new(), now + Duration::from_secs(2));
        let next = CACHED.with_borrow(|(until, _)| until.unwrap());
        assert!(next > now + Duration::from_secs(2));
    }
}
