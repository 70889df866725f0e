//! The status page: `GET /` for a browser.
//!
//! `/` is also the Kafka Connect worker's info (JSON), which scripts written for the old
//! deployment ask for. The `Accept` header decides: the page when it ranks `text/html` above
//! `application/json` (a browser's does), the JSON otherwise (`*/*`, no header, JSON asked for).
//! The page is one self-contained file (no external script, style or font: labs run offline) that
//! draws itself from `/status` and `/metrics`; it holds no data, so it is the same for every
//! archiver of this version.

use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("page.html");

/// Only what the page itself needs: its inline script and style, and fetches to this server.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page, with headers that keep it fresh after an upgrade and keep it to itself.
pub fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Revalidated each time: the page changes with the archiver's version.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

/// Marks an answer of `/` that was chosen by `Accept`, for caches between client and archiver.
pub fn vary_on_accept(mut response: Response) -> Response {
    response.headers_mut().insert(header::VARY, HeaderValue::from_static("Accept"));
    response
}

/// Whether a `GET /` asks for the page rather than the worker info.
pub fn wants_page(headers: &HeaderMap) -> bool {
    let accept = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    prefers_html(&accept)
}

/// `Accept` ranks `text/html` strictly above `application/json` (RFC 9110 §12.5.1: a type takes
/// the quality of the most specific range that matches it). Ties go to JSON, the Kafka Connect
/// answer. Java's HttpURLConnection sends `text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2`
/// when a client sets nothing: a Kafka Connect client, not a browser; its bare `*` gives it away.
fn prefers_html(accept: &str) -> bool {
    let ranges: Vec<(&str, &str, f32)> = accept
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';');
            let range = parts.next()?.trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                .find_map(|v| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if range == "*" {
                return Some(("*", "", q));
            }
            let (kind, sub) = range.split_once('/')?;
            Some((kind.trim(), sub.trim(), q))
        })
        .collect();
    if ranges.iter().any(|(kind, sub, _)| *kind == "*" && sub.is_empty()) {
        return false;
    }
    let quality = |kind: &str, sub: &str| {
        let matching = |(k, s, q): &&(&str, &str, f32)| {
            let specificity = match (k.eq_ignore_ascii_case(kind), s.eq_ignore_ascii_case(sub)) {
                (true, true) => 2,
                (true, false) if *s == "*" => 1,
                _ if *k == "*" && *s == "*" => 0,
                _ => return None,
            };
            Some((specificity, *q))
        };
        ranges.iter().filter_map(|r| matching(&r)).max_by(|a, b| a.0.cmp(&b.0)).map_or(0.0, |(_, q)| q)
    };
    let html = quality("text", "html").max(quality("application", "xhtml+xml"));
    html > 0.0 && html > quality("application", "json")
}

#[cfg(test)]
mod tests {
    use super::prefers_html;

    #[test]
    fn browsers_get_the_page_and_kafka_connect_clients_the_json() {
        // Chromium's and Firefox's navigation requests.
        assert!(prefers_html(
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,\
             application/signed-exchange;v=b3;q=0.7"
        ));
        assert!(prefers_html("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"));
        assert!(prefers_html("text/html"));
        // curl, Python requests, Kafka Connect's own clients, no header at all.
        assert!(!prefers_html("*/*"));
        assert!(!prefers_html(""));
        assert!(!prefers_html("application/json"));
        assert!(!prefers_html("application/json, text/plain, */*"));
        // Asked for both, JSON first or equally: the Kafka Connect answer.
        assert!(!prefers_html("text/html, application/json"));
        assert!(!prefers_html("application/json;q=0.9, text/html;q=0.9"));
        assert!(prefers_html("application/json;q=0.5, text/html"));
        // HTML refused.
        assert!(!prefers_html("text/html;q=0, */*"));
        // Java's HttpURLConnection default.
        assert!(!prefers_html("text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2"));
    }
}
