//! `kiln models`: a table of installed models.

use std::path::Path;

use kiln_engine::catalog::{self, ModelLocation};

use crate::cli::HomeArgs;
use crate::registry::{self, InstalledModel, ModelKind};

struct Row {
    name: String,
    kind: &'static str,
    size: String,
    architecture: String,
    quantization: String,
    context: String,
}

#[allow(clippy::print_stdout)] // the table is the command's output
pub fn run(args: &HomeArgs) -> anyhow::Result<()> {
    let dir = args.resolve().join("models");
    let models = registry::installed(&dir);
    if models.is_empty() {
        eprintln!(
            "no models installed under {}; try `kiln pull smollm2-135m`",
            dir.display()
        );
        return Ok(());
    }
    let rows: Vec<Row> = models.iter().map(row).collect();
    let header = Row {
        name: "NAME".into(),
        kind: "KIND",
        size: "SIZE".into(),
        architecture: "ARCHITECTURE".into(),
        quantization: "QUANTIZATION".into(),
        context: "CONTEXT".into(),
    };
    let w = |f: fn(&Row) -> usize| rows.iter().chain([&header]).map(f).max().unwrap_or(0);
    let (wn, wk, ws, wa, wq) = (
        w(|r| r.name.len()),
        w(|r| r.kind.len()),
        w(|r| r.size.len()),
        w(|r| r.architecture.len()),
        w(|r| r.quantization.len()),
    );
    for r in [&header].into_iter().chain(rows.iter()) {
        println!(
            "{:wn$}  {:wk$}  {:>ws$}  {:wa$}  {:wq$}  {}",
            r.name, r.kind, r.size, r.architecture, r.quantization, r.context
        );
    }
    Ok(())
}

fn row(m: &InstalledModel) -> Row {
    let mut r = Row {
        name: m.name.clone(),
        kind: m.kind.as_str(),
        size: human_size(disk_size(&m.path)),
        architecture: "-".into(),
        quantization: "-".into(),
        context: "-".into(),
    };
    let location = match m.kind {
        ModelKind::Text => ModelLocation::Gguf {
            path: m.path.clone(),
            name: Some(m.name.clone()),
        },
        ModelKind::Embedding => ModelLocation::SentenceEmbedding {
            dir: m.path.clone(),
            name: Some(m.name.clone()),
        },
    };
    match catalog::describe(&location) {
        Ok(summary) => {
            r.architecture = summary.architecture;
            r.quantization = summary.file_type.unwrap_or(summary.quantization);
            // The longest input Kiln accepts: the context length of a GGUF
            // model, sentence-transformers' max_seq_length of an embedding model.
            r.context = summary
                .max_input_tokens
                .or(summary.context_length)
                .map_or_else(|| "-".to_string(), |c| c.to_string());
        }
        Err(e) => r.architecture = format!("unreadable: {e}"),
    }
    r
}

fn disk_size(path: &Path) -> u64 {
    if path.is_file() {
        return path.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| disk_size(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(98_000_000), "98.0 MB");
    }
}
