//! What client commands print and write: JSON on stdout, verified downloads into a folder.

use std::path::Path;

use kiln::client::Client;
use kiln_core::protocol::Artifact;

pub fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// Downloads `artifacts` into `dir` (each checked against its sha256) and prints each path.
pub async fn download_all(client: &Client, artifacts: &[Artifact], dir: &Path) -> Result<(), String> {
    for a in artifacts {
        let dest = dir.join(&a.name);
        client.download(a, &dest).await.map_err(|e| format!("{}: {e}", a.name))?;
        println!("{} ({} bytes, sha256 {})", dest.display(), a.size, &a.sha256[..12.min(a.sha256.len())]);
    }
    Ok(())
}
