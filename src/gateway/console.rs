//! The web console: three static files built into the binary (no CDN, no build step: the
//! machines it runs on are offline), served at `/` and `/console/*`. It talks to the REST API
//! of [`super::v1`] like any other client; its DOM contract is what `tests/console.rs` drives in
//! a headless Chromium.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::Gateway;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const STYLE_CSS: &str = include_str!("console/style.css");

pub fn router() -> Router<Gateway> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/console/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    // `no-cache`: a browser revalidates, so a new binary's console is picked up at once.
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body)
}
