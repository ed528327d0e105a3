//! The caller's deadline, from gRPC's `grpc-timeout` header.
//!
//! [`StampDeadline`] reads it once, as the request enters the service stack, and keeps it in
//! the request's extensions. tonic's own timeout layer starts its timer just after that, so the
//! handler's deadline is never later than tonic's: an expired request is answered
//! DEADLINE_EXCEEDED and counted by octserve instead of being cut off by tonic (which answers
//! CANCELLED and leaves no trace in the metrics).

use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// When the caller stops waiting, if it said; kept in each request's extensions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deadline(pub Option<Instant>);

/// A `grpc-timeout` value as the gRPC HTTP/2 protocol defines it: 1 to 8 ASCII digits and a
/// unit (`H`, `M`, `S`, `m`, `u`, `n`). Anything else is not a timeout (`None`).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 99,999,999: no unit below can overflow.
    let n: u64 = digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline `headers` ask for, counted from `now`; none when absent, malformed, or too far
/// away to represent.
pub fn deadline_from(headers: &http::HeaderMap, now: Instant) -> Option<Instant> {
    let timeout = parse_grpc_timeout(headers.get(GRPC_TIMEOUT)?.as_bytes())?;
    now.checked_add(timeout)
}

/// The deadline [`StampDeadline`] put on `request`.
pub fn deadline<T>(request: &tonic::Request<T>) -> Option<Instant> {
    request.extensions().get::<Deadline>().and_then(|d| d.0)
}

/// Wraps a service so that every request carries its [`Deadline`].
#[derive(Clone, Copy, Debug, Default)]
pub struct StampDeadlineLayer;

impl<S> Layer<S> for StampDeadlineLayer {
    type Service = StampDeadline<S>;

    fn layer(&self, inner: S) -> StampDeadline<S> {
        StampDeadline(inner)
    }
}

#[derive(Clone, Debug)]
pub struct StampDeadline<S>(S);

impl<S, B> Service<http::Request<B>> for StampDeadline<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        let deadline = deadline_from(request.headers(), Instant::now());
        request.extensions_mut().insert(Deadline(deadline));
        self.0.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_as_the_protocol_defines_them() {
        let parse = |s: &str| parse_grpc_timeout(s.as_bytes());
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [
            "",
            "S",
            "123456789S",
            "18446744073709551615H",
            "-1S",
            "+1S",
            "1x",
            "1.5S",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_deadline_too_far_to_represent_is_no_deadline() {
        let mut headers = http::HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, "99999999H".parse().unwrap());
        let now = Instant::now();
        let deadline = deadline_from(&headers, now);
        assert!(deadline.is_none_or(|d| d > now));
        headers.insert(GRPC_TIMEOUT, "9999999999999999999S".parse().unwrap());
        assert_eq!(deadline_from(&headers, now), None);
    }
}
