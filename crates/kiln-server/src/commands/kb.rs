//! `kiln kb`: knowledge bases on a running server, through its `/api/kbs`
//! routes (ingestion needs the server's embedding model and worker).
//!
//! ```text
//! kiln kb create handbook
//! kiln kb add handbook policies/*.pdf --group hr     # waits, with a progress bar
//! kiln kb ls                                           # knowledge bases
//! kiln kb ls handbook                                  # its documents
//! kiln kb search handbook "parental leave"
//! kiln kb ask handbook "How long is parental leave?"      # answer with citations
//! kiln kb rm handbook doc_1234                         # one document
//! kiln kb rm handbook                                  # the whole knowledge base
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::client::{enc, Api};

#[derive(Debug, Args)]
pub struct KbArgs {
    /// The server's address [env: KILN_URL].
    #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API key (a tenant admin's to change things) [env: KILN_API_KEY].
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(subcommand)]
    pub command: KbCommand,
}

#[derive(Debug, Subcommand)]
pub enum KbCommand {
    /// Create a knowledge base.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Chunk size in the embedding model's tokens.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Tokens a chunk repeats from the one before.
        #[arg(long)]
        overlap_tokens: Option<usize>,
        /// The embedding model to build it with: the server's own (the
        /// default), or one an upstream serves.
        #[arg(long)]
        embedding_model: Option<String>,
    },
    /// Upload documents and wait for their ingestion.
    Add {
        kb: String,
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Restrict the documents to a group (repeatable).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// Metadata KEY:VALUE for filters (repeatable).
        #[arg(long = "meta", value_name = "KEY:VALUE")]
        meta: Vec<String>,
        /// Return once uploaded, without waiting for ingestion.
        #[arg(long)]
        no_wait: bool,
    },
    /// List knowledge bases, or the documents of one.
    Ls { kb: Option<String> },
    /// Delete a document, or a whole knowledge base.
    Rm {
        kb: String,
        document: Option<String>,
    },
    /// Ask a question: a grounded answer with citations, or "not found".
    Ask {
        kb: String,
        question: String,
        /// The text model that answers (default: the server's choice).
        #[arg(long)]
        model: Option<String>,
    },
    /// Search a knowledge base.
    Search {
        kb: String,
        query: String,
        #[arg(long, default_value_t = 5)]
        k: usize,
        /// hybrid, bm25 or vector.
        #[arg(long, default_value = "hybrid")]
        mode: String,
    },
}

pub fn run(args: &KbArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

#[allow(clippy::print_stdout)] // listings and results are the output
async fn run_async(args: &KbArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.url, args.api_key.clone());
    use hyper::Method;
    match &args.command {
        KbCommand::Create {
            name,
            description,
            max_tokens,
            overlap_tokens,
            embedding_model,
        } => {
            let mut body = json!({"name": name, "description": description});
            if let Some(m) = embedding_model {
                body["embedding_model"] = json!(m);
            }
            if max_tokens.is_some() || overlap_tokens.is_some() {
                let d = kiln_rag::chunk::ChunkOptions::default();
                body["chunking"] = json!({
                    "max_tokens": max_tokens.unwrap_or(d.max_tokens),
                    "overlap_tokens": overlap_tokens.unwrap_or(d.overlap_tokens),
                });
            }
            let kb = api.json(Method::POST, "/api/kbs", body).await?;
            println!("{}\t{}", kb["id"].as_str().unwrap_or(""), name);
        }
        KbCommand::Ls { kb: None } => {
            let list = api.json(Method::GET, "/api/kbs", Value::Null).await?;
            println!("ID\tNAME\tDOCUMENTS\tCHUNKS\tMODEL");
            for kb in list["data"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    kb["id"].as_str().unwrap_or(""),
                    kb["name"].as_str().unwrap_or(""),
                    kb["documents"],
                    kb["chunks"],
                    kb["embedding_model"].as_str().unwrap_or("")
                );
            }
        }
        KbCommand::Ls { kb: Some(kb) } => {
            println!("ID\tNAME\tVERSION\tSTATUS\tCHUNKS\tERROR");
            let mut after: Option<String> = None;
            loop {
                let mut path = format!("/api/kbs/{}/documents?limit=1000", enc(kb));
                if let Some(a) = &after {
                    path.push_str(&format!("&after={}", enc(a)));
                }
                let page = api.json(Method::GET, &path, Value::Null).await?;
                for d in page["data"].as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        d["id"].as_str().unwrap_or(""),
                        d["name"].as_str().unwrap_or(""),
                        d["version"],
                        d["status"].as_str().unwrap_or(""),
                        d["chunks"],
                        d["error"].as_str().unwrap_or("")
                    );
                }
                match page["last_id"].as_str() {
                    Some(last) if page["has_more"] == true => after = Some(last.to_string()),
                    _ => break,
                }
            }
        }
        KbCommand::Rm { kb, document } => {
            let path = match document {
                Some(d) => format!("/api/kbs/{}/documents/{}", enc(kb), enc(d)),
                None => format!("/api/kbs/{}", enc(kb)),
            };
            api.json(Method::DELETE, &path, Value::Null).await?;
            eprintln!("deleted");
        }
        KbCommand::Search { kb, query, k, mode } => {
            let hits = api
                .json(
                    Method::POST,
                    &format!("/api/kbs/{}/search", enc(kb)),
                    json!({"query": query, "k": k, "mode": mode}),
                )
                .await?;
            for (i, h) in hits["data"].as_array().into_iter().flatten().enumerate() {
                println!(
                    "[{}] {} (chars {}-{}) score {:.4}\n{}\n",
                    i + 1,
                    h["document_name"].as_str().unwrap_or(""),
                    h["start"],
                    h["end"],
                    h["score"].as_f64().unwrap_or(0.0),
                    h["text"].as_str().unwrap_or("")
                );
            }
        }
        KbCommand::Ask {
            kb,
            question,
            model,
        } => {
            let mut body = json!({"question": question});
            if let Some(m) = model {
                body["model"] = json!(m);
            }
            let a = api
                .json(Method::POST, &format!("/api/kbs/{}/ask", enc(kb)), body)
                .await?;
            println!("{}", a["answer"].as_str().unwrap_or(""));
            for s in a["sentences"].as_array().into_iter().flatten() {
                if s["supported"].as_bool() != Some(true) {
                    println!(
                        "  (unsupported by the sources: {})",
                        s["text"].as_str().unwrap_or("")
                    );
                }
            }
            for c in a["citations"].as_array().into_iter().flatten() {
                println!(
                    "[{}] {} (chars {}-{}): \"{}\"",
                    c["source"],
                    c["document_name"].as_str().unwrap_or(""),
                    c["start"],
                    c["end"],
                    c["quote"].as_str().unwrap_or("")
                );
            }
        }
        KbCommand::Add {
            kb,
            files,
            groups,
            meta,
            no_wait,
        } => add(&api, kb, files, groups, meta, *no_wait).await?,
    }
    Ok(())
}

async fn add(
    api: &Api,
    kb: &str,
    files: &[PathBuf],
    groups: &[String],
    meta: &[String],
    no_wait: bool,
) -> anyhow::Result<()> {
    let mut uploaded = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| f.display().to_string());
        let mut q = format!("name={}", enc(&name));
        for g in groups {
            q.push_str(&format!("&group={}", enc(g)));
        }
        for m in meta {
            q.push_str(&format!("&meta={}", enc(m)));
        }
        let doc = api
            .call(
                hyper::Method::POST,
                &format!("/api/kbs/{}/documents?{q}", enc(kb)),
                "application/octet-stream",
                bytes,
            )
            .await
            .with_context(|| format!("uploading {}", f.display()))?;
        let id = doc["id"].as_str().unwrap_or("").to_string();
        if doc["duplicate"].as_bool() == Some(true) {
            eprintln!("{name}: already in the knowledge base as {id}");
            continue;
        }
        eprintln!("{name}: uploaded as {id}");
        uploaded.push((name, id));
    }
    if no_wait || uploaded.is_empty() {
        return Ok(());
    }
    let bars = indicatif::MultiProgress::new();
    let style =
        indicatif::ProgressStyle::with_template("{prefix:24} [{bar:30}] {pos}/{len} chunks {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    let mut waiting: Vec<(String, String, indicatif::ProgressBar)> = uploaded
        .into_iter()
        .map(|(name, id)| {
            let bar = bars.add(indicatif::ProgressBar::new(0));
            bar.set_style(style.clone());
            bar.set_prefix(name.clone());
            (name, id, bar)
        })
        .collect();
    let mut failed = 0;
    while !waiting.is_empty() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut still = Vec::new();
        for (name, id, bar) in waiting {
            let d = api
                .json(
                    hyper::Method::GET,
                    &format!("/api/kbs/{}/documents/{}", enc(kb), enc(&id)),
                    Value::Null,
                )
                .await?;
            let total = d["progress"]["total"].as_u64().unwrap_or(0);
            bar.set_length(total);
            bar.set_position(d["progress"]["done"].as_u64().unwrap_or(0));
            match d["status"].as_str().unwrap_or("") {
                "queued" | "ingesting" => still.push((name, id, bar)),
                "ready" => bar.finish_with_message("ready"),
                other => {
                    failed += 1;
                    bar.abandon_with_message(format!(
                        "{other}: {}",
                        d["error"].as_str().unwrap_or("")
                    ));
                }
            }
        }
        waiting = still;
    }
    if failed > 0 {
        bail!("{failed} document(s) were not ingested");
    }
    Ok(())
}
