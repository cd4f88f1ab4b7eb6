//! `/docs` (Swagger UI) and `/redoc` (ReDoc): the API's documentation pages, reading
//! `/openapi.json`, as the FastAPI services Kiln replaces served them. Their scripts and styles
//! are vendored from npm (`assets/vendor/`, refreshed by `scripts/vendor_docs_assets.sh`) and
//! built into the binary: nothing comes from a CDN, so the pages work offline. The asset URLs
//! carry the package's version, so browsers may keep each for a year; the pages themselves
//! are revalidated (`no-cache`) and name the current URLs.

use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;

use super::Gateway;

/// The vendored versions (`assets/vendor/VERSIONS`; a test checks each bundle names its own).
pub const SWAGGER_UI_VERSION: &str = "5.36.0";
pub const REDOC_VERSION: &str = "2.5.4";

/// Where the assets are served: under [`ASSETS_PREFIX`], a folder per package and version.
pub const ASSETS_PREFIX: &str = "/docs/assets/";

/// A vendored file served by the gateway.
pub struct Asset {
    /// Below [`ASSETS_PREFIX`]: `<package>-<version>/<file>`.
    pub path: String,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const SWAGGER_UI_BUNDLE: &[u8] = include_bytes!("assets/vendor/swagger-ui-dist/swagger-ui-bundle.js");
const SWAGGER_UI_CSS: &[u8] = include_bytes!("assets/vendor/swagger-ui-dist/swagger-ui.css");
const REDOC_STANDALONE: &[u8] = include_bytes!("assets/vendor/redoc/redoc.standalone.js");

/// The one thing ReDoc's bundle loads from elsewhere, always: the logo of its "API docs by
/// Redocly" link (no option turns it off). It is served with that URL replaced by an empty
/// image, so the page asks nothing of any other host (the link keeps its text).
const REDOC_LOGO_URL: &[u8] = b"https://cdn.redoc.ly/redoc/logo-mini.svg";

/// [`REDOC_STANDALONE`] without [`REDOC_LOGO_URL`]. Pure.
fn redoc_served() -> &'static [u8] {
    static SERVED: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| replace_bytes(REDOC_STANDALONE, REDOC_LOGO_URL, b"data:,"));
    &SERVED
}

/// `text` with every `from` replaced by `to`. Pure.
fn replace_bytes(text: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}
const SWAGGER_UI_LICENSE: &[u8] = include_bytes!("assets/vendor/swagger-ui-dist/LICENSE");
const REDOC_LICENSE: &[u8] = include_bytes!("assets/vendor/redoc/LICENSE");

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Every served asset; the licenses are served beside the code they cover.
pub fn assets() -> Vec<Asset> {
    let swagger = |file: &str| format!("swagger-ui-dist-{SWAGGER_UI_VERSION}/{file}");
    let redoc = |file: &str| format!("redoc-{REDOC_VERSION}/{file}");
    vec![
        Asset { path: swagger("swagger-ui-bundle.js"), content_type: JS, body: SWAGGER_UI_BUNDLE },
        Asset { path: swagger("swagger-ui.css"), content_type: CSS, body: SWAGGER_UI_CSS },
        Asset { path: swagger("LICENSE"), content_type: TEXT, body: SWAGGER_UI_LICENSE },
        Asset { path: redoc("redoc.standalone.js"), content_type: JS, body: redoc_served() },
        Asset { path: redoc("LICENSE"), content_type: TEXT, body: REDOC_LICENSE },
    ]
}

/// The Swagger UI page: the bundle, its style, and the call that renders `/openapi.json`.
/// `validatorUrl: null`: Swagger UI would otherwise show a badge from validator.swagger.io.
/// `persistAuthorization`: an API key given under "Authorize" survives a reload. Pure.
pub fn swagger_page() -> String {
    format!(
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kiln API: Swagger UI</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{prefix}swagger-ui-dist-{v}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{prefix}swagger-ui-dist-{v}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  persistAuthorization: true,
}});
</script>
</body>
</html>
"##,
        prefix = ASSETS_PREFIX,
        v = SWAGGER_UI_VERSION
    )
}

/// The ReDoc page: the standalone bundle renders the `<redoc>` element's `spec-url`. Pure.
pub fn redoc_page() -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kiln API: ReDoc</title>
<link rel="icon" href="data:,">
<style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
<redoc spec-url="/openapi.json"></redoc>
<script src="{prefix}redoc-{v}/redoc.standalone.js"></script>
</body>
</html>
"#,
        prefix = ASSETS_PREFIX,
        v = REDOC_VERSION
    )
}

pub fn router() -> Router<Gateway> {
    let mut router =
        Router::new().route("/docs", get(|| async { page(swagger_page()) })).route("/redoc", get(|| async { page(redoc_page()) }));
    for asset in assets() {
        let (content_type, body) = (asset.content_type, asset.body);
        router = router.route(
            &format!("{ASSETS_PREFIX}{}", asset.path),
            get(move || async move {
                // The URL names the version: the bytes behind it never change.
                ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=31536000, immutable")], body)
            }),
        );
    }
    router
}

fn page(html: String) -> impl IntoResponse {
    // `no-cache`: a new binary's page (and so its asset URLs) is picked up at once.
    ([(header::CACHE_CONTROL, "no-cache")], Html(html))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refresh of the vendored files (scripts/vendor_docs_assets.sh) without the version
    /// here (or the other way round) would serve one version under another's URL, cached for
    /// a year.
    #[test]
    fn each_bundle_is_the_version_its_url_names() {
        let has = |body: &[u8], needle: String| body.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(has(SWAGGER_UI_BUNDLE, format!("PACKAGE_VERSION:\"{SWAGGER_UI_VERSION}\"")), "swagger-ui-dist is not {SWAGGER_UI_VERSION}");
        assert!(has(REDOC_STANDALONE, format!("\"{REDOC_VERSION}\"")), "redoc is not {REDOC_VERSION}");
        let versions = include_str!("assets/vendor/VERSIONS");
        assert!(
            versions.contains(&format!("swagger-ui-dist {SWAGGER_UI_VERSION}")) && versions.contains(&format!("redoc {REDOC_VERSION}"))
        );
    }

    /// ReDoc's bundle is served without the one URL of another host it would load.
    #[test]
    fn redoc_is_served_without_its_cdn_logo() {
        let has = |body: &[u8], needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(REDOC_STANDALONE, REDOC_LOGO_URL), "the vendored bundle has the logo's URL: drop the replacement if a refresh lost it");
        assert!(!has(redoc_served(), b"cdn.redoc.ly") && has(redoc_served(), b"src:\"data:,\""));
        assert_eq!(replace_bytes(b"a-xx-b-xx", b"xx", b"y"), b"a-y-b-y");
    }

    /// The pages load nothing from elsewhere: every `src` and `href` is one of the served
    /// assets, and the only other URL is the gateway's own `/openapi.json`.
    #[test]
    fn the_pages_refer_only_to_served_assets() {
        let served: Vec<String> = assets().iter().map(|a| format!("{ASSETS_PREFIX}{}", a.path)).collect();
        for page in [swagger_page(), redoc_page()] {
            assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("//cdn"), "{page}");
            let refs: Vec<&str> = page.split(['"', '\'']).filter(|s| s.starts_with('/') && !s.starts_with("//")).collect();
            assert!(refs.iter().filter(|r| r.starts_with(ASSETS_PREFIX)).count() >= 1, "{page}");
            for r in refs {
                assert!(served.iter().any(|s| s == r) || r == "/openapi.json", "{r} is not served");
            }
        }
    }
}
