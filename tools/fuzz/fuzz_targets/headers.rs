//! Request headers (gRPC metadata) on arbitrary bytes: the caller's `grpc-timeout` deadline and
//! the API-key check. Neither may panic; a deadline is never in the past; a request passes the
//! key check only when it presents the configured key.
//!
//! Input: lines split on `\n`. The first line is the configured API key (no key when it is not a
//! valid one: then every request must pass). Each further line is a header, `name:value`, split
//! at the first `:`, with the spaces after it dropped; names and values that HTTP refuses are
//! skipped, repeated names are all kept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use octserve::deadline::{deadline_from, parse_grpc_timeout, GRPC_TIMEOUT};
use octserve::security::{ApiKey, RequireApiKey};
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;

/// Well below `HeaderMap`'s own capacity (whose overflow is a panic of the map, not ours).
const MAX_HEADERS: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let key = lines
        .next()
        .and_then(|line| std::str::from_utf8(line).ok())
        .and_then(|line| {
            line.parse::<ApiKey>()
                .ok()
                .map(|key| (line.to_owned(), key))
        });

    let mut headers = http::HeaderMap::new();
    for line in lines.take(MAX_HEADERS) {
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => (&line[..colon], &line[colon + 1..]),
            None => (line, &b""[..]),
        };
        let value = value.trim_ascii_start();
        check_timeout(value);
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }

    // The deadline: never before `now`, and exactly the first grpc-timeout's distance away.
    let now = Instant::now();
    let deadline = deadline_from(&headers, now);
    if let Some(d) = deadline {
        assert!(d >= now);
        let first = headers
            .get(GRPC_TIMEOUT)
            .expect("a deadline needs a grpc-timeout");
        assert_eq!(Some(d - now), parse_grpc_timeout(first.as_bytes()));
    } else if let Some(first) = headers.get(GRPC_TIMEOUT) {
        // None for a valid timeout only when it is too far away to represent.
        if let Some(timeout) = parse_grpc_timeout(first.as_bytes()) {
            assert!(now.checked_add(timeout).is_none());
        }
    }

    // The API key, through the interceptor that guards the services.
    let presented: Vec<Vec<u8>> = headers
        .get_all("authorization")
        .iter()
        .filter_map(|v| v.as_bytes().strip_prefix(b"Bearer ").map(<[u8]>::to_vec))
        .chain(
            headers
                .get_all("x-api-key")
                .iter()
                .map(|v| v.as_bytes().to_vec()),
        )
        .collect();
    let credentials = headers.get_all("authorization").iter().count()
        + headers.get_all("x-api-key").iter().count();
    let metadata = MetadataMap::from_headers(headers);
    let request = tonic::Request::from_parts(metadata, tonic::Extensions::default(), ());
    let mut check = RequireApiKey(key.as_ref().map(|(_, key)| key.clone()));
    let admitted = check.call(request).is_ok();
    match &key {
        None => assert!(admitted, "no key configured, yet a request was refused"),
        Some((key, _)) => {
            let right = presented.iter().any(|p| p == key.as_bytes());
            assert!(
                !admitted || right,
                "admitted without the key: {presented:?}"
            );
            // A request whose only credential is the right key passes.
            if credentials == 1 && right {
                assert!(admitted, "the right key was refused: {presented:?}");
            }
        }
    }
});

/// `parse_grpc_timeout` on any bytes: a timeout only for 1 to 8 ASCII digits and a unit.
fn check_timeout(value: &[u8]) {
    let Some(timeout) = parse_grpc_timeout(value) else {
        return;
    };
    let (unit, digits) = value.split_last().expect("a timeout is not empty");
    assert!((1..=8).contains(&digits.len()), "{value:?}");
    assert!(digits.iter().all(u8::is_ascii_digit), "{value:?}");
    assert!(b"HMSmun".contains(unit), "{value:?}");
    assert!(timeout.as_secs() <= 99_999_999 * 3600, "{value:?}");
}
