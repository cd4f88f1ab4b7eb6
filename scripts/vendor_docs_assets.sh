#!/usr/bin/env bash
# Refreshes the browser assets of the gateway's /docs (Swagger UI) and /redoc (ReDoc) pages,
# vendored into src/gateway/assets/vendor/ and built into the binary (src/gateway/docs.rs):
# the gateway serves them itself, nothing comes from a CDN at run time.
#
#   scripts/vendor_docs_assets.sh        # fetch the pinned versions from npm, copy the files
#
# To move to another version: change it below AND in src/gateway/docs.rs (SWAGGER_UI_VERSION,
# REDOC_VERSION; a unit test checks each bundle names its version), run this script, and
# commit the files it changed. The files are copied unmodified from the npm packages (their
# sha256 are listed in SHA256SUMS, next to them).
set -euo pipefail

SWAGGER_UI_DIST_VERSION=5.36.0
# ReDoc 2.x: a classic <script> with <redoc spec-url>, 1.1 MB, and its third-party licenses in
# one file (3.x is an ES module twice that size).
REDOC_VERSION=2.5.4

repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="$repo/src/gateway/assets/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "vendor: fetching swagger-ui-dist@$SWAGGER_UI_DIST_VERSION and redoc@$REDOC_VERSION from npm"
(cd "$work" && npm pack --silent "swagger-ui-dist@$SWAGGER_UI_DIST_VERSION" "redoc@$REDOC_VERSION" >/dev/null)
mkdir -p "$work/swagger" "$work/redoc"
tar xzf "$work/swagger-ui-dist-$SWAGGER_UI_DIST_VERSION.tgz" -C "$work/swagger"
tar xzf "$work/redoc-$REDOC_VERSION.tgz" -C "$work/redoc"

rm -rf "$dest/swagger-ui-dist" "$dest/redoc"
mkdir -p "$dest/swagger-ui-dist" "$dest/redoc"
for f in swagger-ui-bundle.js swagger-ui.css LICENSE NOTICE swagger-ui-bundle.js.LICENSE.txt; do
  cp "$work/swagger/package/$f" "$dest/swagger-ui-dist/$f"
done
cp "$work/redoc/package/bundles/redoc.standalone.js" "$work/redoc/package/bundles/redoc.standalone.js.LICENSE.txt" "$dest/redoc/"
cp "$work/redoc/package/LICENSE" "$dest/redoc/LICENSE"

{
  echo "swagger-ui-dist $SWAGGER_UI_DIST_VERSION"
  echo "redoc $REDOC_VERSION"
} > "$dest/VERSIONS"
(cd "$dest" && find swagger-ui-dist redoc -type f | sort | xargs sha256sum) > "$dest/SHA256SUMS"
echo "vendor: ok, $(du -sh "$dest" | cut -f1) in $dest"
