//! What client commands print and write: `--output json|table` (one global flag, each command
//! with the default it always had), a reply as JSON or as a table, verified downloads into a
//! folder.

use std::path::Path;

use kiln::client::Client;
use kiln::table::{Align, Table};
use kiln_core::protocol::Artifact;

/// `--output`: how a command that prints data prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The reply as pretty JSON on stdout (one document), for scripts.
    Json,
    /// A table or lines for people.
    Table,
}

impl Format {
    /// The format asked for (`--output`, or a command's older `--json`), else the command's own
    /// default.
    pub fn choose(asked: Option<Format>, json_flag: bool, default: Format) -> Format {
        if json_flag {
            return Format::Json;
        }
        asked.unwrap_or(default)
    }
}

pub fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// A JSON object as a two-column table, one row per top-level field: strings as they are,
/// everything else as compact JSON (empty lists and absent fields left out).
pub fn print_fields<T: serde::Serialize>(v: &T) {
    println!("{}", fields_table(&serde_json::to_value(v).expect("json")));
}

fn fields_table(value: &serde_json::Value) -> String {
    let mut table = Table::new(&[("FIELD", Align::Left), ("VALUE", Align::Left)]);
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let cell = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Array(a) if a.is_empty() => continue,
                    serde_json::Value::Object(o) if o.is_empty() => continue,
                    serde_json::Value::Null => continue,
                    other => other.to_string(),
                };
                table.row(vec![k.clone(), cell]);
            }
        }
        other => table.row(vec!["value".into(), other.to_string()]),
    }
    table.render()
}

/// Prints `v` as JSON or as its field table.
pub fn print_as<T: serde::Serialize>(format: Format, v: &T) {
    match format {
        Format::Json => print_json(v),
        Format::Table => print_fields(v),
    }
}

/// One file `download_all` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Downloaded {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Downloads `artifacts` into `dir` (each checked against its sha256); prints each path in
/// table format, and returns them.
pub async fn download_all(client: &Client, artifacts: &[Artifact], dir: &Path, format: Format) -> Result<Vec<Downloaded>, String> {
    let mut done = Vec::new();
    for a in artifacts {
        let dest = dir.join(&a.name);
        client.download(a, &dest).await.map_err(|e| format!("{}: {e}", a.name))?;
        if format == Format::Table {
            println!("{} ({} bytes, sha256 {})", dest.display(), a.size, &a.sha256[..12.min(a.sha256.len())]);
        }
        done.push(Downloaded { path: dest.display().to_string(), size: a.size, sha256: a.sha256.clone() });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_table_has_a_row_per_present_field() {
        let v = serde_json::json!({"job_id": "j1", "attempt": 2, "artifacts": [], "error": {"code": "x"}, "node": null});
        let text = fields_table(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "FIELD    VALUE");
        assert_eq!(lines.len(), 4, "{text}");
        assert!(text.contains("job_id   j1") && text.contains("attempt  2") && text.contains(r#"error    {"code":"x"}"#), "{text}");
    }

    #[test]
    fn the_json_flag_wins_then_output_then_the_default() {
        assert_eq!(Format::choose(Some(Format::Table), true, Format::Table), Format::Json);
        assert_eq!(Format::choose(Some(Format::Table), false, Format::Json), Format::Table);
        assert_eq!(Format::choose(None, false, Format::Json), Format::Json);
    }
}
