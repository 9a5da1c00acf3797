//! `kiln agents`, `kiln workflows` and `kiln runs`: agents, workflows and
//! their durable runs on a running server, through its `/api/agents`,
//! `/api/workflows` and `/api/runs` routes.
//!
//! ```text
//! kiln agents create maths.yaml          # declare (YAML or JSON); a change is a new version
//! kiln agents ls
//! kiln agents show maths [--version 1]
//! kiln agents rm maths
//! kiln workflows create triage.yaml     # the same four for workflows
//! kiln runs start maths "What is 17 * 23?"   # follows the run to its end
//! kiln runs start --workflow triage '{"ticket": "..."}'
//! kiln runs ls [--status waiting] [--agent maths | --workflow triage]
//! kiln runs show run-...                 # the run and its journal
//! kiln runs approve run-... [--comment "ok"]   # or reject
//! kiln runs cancel run-...
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use super::client::{enc, Api};

/// Where the server is and the key to use.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server's address [env: KILN_URL].
    #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API key (a tenant admin's to declare agents) [env: KILN_API_KEY].
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub command: AgentsCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Declare an agent from a YAML or JSON file.
    Create { file: PathBuf },
    /// List the tenant's agents (newest versions).
    Ls,
    /// Show an agent's declaration.
    Show {
        name: String,
        #[arg(long)]
        version: Option<i64>,
    },
    /// Retire an agent: no new runs; started runs finish.
    Rm { name: String },
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub command: RunsCommand,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Start a run of an agent (or a workflow) and follow it to its end,
    /// or until it waits for an approval.
    Start {
        /// The agent (the workflow with --workflow).
        name: String,
        /// A text for an agent; a JSON object of its inputs for a workflow.
        input: String,
        /// Run the workflow NAME.
        #[arg(long)]
        workflow: bool,
        /// Pin an older version.
        #[arg(long)]
        version: Option<i64>,
        /// Print the run's id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// List runs, newest first.
    Ls {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show a run and its journal.
    Show { id: String },
    /// Approve the step a workflow run waits at, and let it go on.
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Reject the step a workflow run waits at.
    Reject {
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Stop a run before its next step.
    Cancel { id: String },
}

/// Reads a declaration: YAML by its extension, else JSON (YAML when it
/// does not parse as JSON).
pub fn read_declaration(path: &std::path::Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    if !yaml {
        if let Ok(v) = serde_json::from_str(&text) {
            return Ok(v);
        }
    }
    serde_norway::from_str(&text)
        .with_context(|| format!("{} is neither valid YAML nor JSON", path.display()))
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

pub fn run_agents(args: &AgentsArgs) -> anyhow::Result<()> {
    block_on(definitions(args, "agents"))
}

/// `kiln workflows`: the same commands as `kiln agents`.
pub fn run_workflows(args: &AgentsArgs) -> anyhow::Result<()> {
    block_on(definitions(args, "workflows"))
}

pub fn run_runs(args: &RunsArgs) -> anyhow::Result<()> {
    block_on(runs(args))
}

#[allow(clippy::print_stdout)] // listings and results are the output
async fn definitions(args: &AgentsArgs, route: &str) -> anyhow::Result<()> {
    let api = Api::new(&args.server.url, args.server.api_key.clone());
    match &args.command {
        AgentsCommand::Create { file } => {
            let body = read_declaration(file)?;
            let a = api
                .json(Method::POST, &format!("/api/{route}"), body)
                .await?;
            println!(
                "{} version {}",
                a["name"].as_str().unwrap_or(""),
                a["version"]
            );
        }
        AgentsCommand::Ls if route == "workflows" => {
            let list = api.json(Method::GET, "/api/workflows", Value::Null).await?;
            println!("NAME\tVERSION\tSTEPS\tDESCRIPTION");
            for w in list["data"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}",
                    w["name"].as_str().unwrap_or(""),
                    w["version"],
                    w["spec"]["steps"].as_array().map_or(0, Vec::len),
                    w["spec"]["description"].as_str().unwrap_or("")
                );
            }
        }
        AgentsCommand::Ls => {
            let list = api.json(Method::GET, "/api/agents", Value::Null).await?;
            println!("NAME\tVERSION\tMODEL\tTOOLS");
            for a in list["data"].as_array().into_iter().flatten() {
                let tools: Vec<&str> = a["spec"]["tools"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!(
                    "{}\t{}\t{}\t{}",
                    a["name"].as_str().unwrap_or(""),
                    a["version"],
                    a["spec"]["model"].as_str().unwrap_or(""),
                    tools.join(",")
                );
            }
        }
        AgentsCommand::Show { name, version } => {
            let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
            let a = api
                .json(
                    Method::GET,
                    &format!("/api/{route}/{}{query}", enc(name)),
                    Value::Null,
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&a)?);
        }
        AgentsCommand::Rm { name } => {
            api.json(
                Method::DELETE,
                &format!("/api/{route}/{}", enc(name)),
                Value::Null,
            )
            .await?;
            println!("retired {name}");
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)] // listings and results are the output
async fn runs(args: &RunsArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.server.url, args.server.api_key.clone());
    match &args.command {
        RunsCommand::Start {
            name,
            input,
            workflow,
            version,
            no_wait,
        } => {
            let mut body = if *workflow {
                let inputs: Value = serde_json::from_str(input)
                    .context("a workflow's input is a JSON object of its inputs")?;
                json!({"workflow": name, "input": inputs})
            } else {
                json!({"agent": name, "input": input})
            };
            if let Some(v) = version {
                body["version"] = json!(v);
            }
            let run = api.json(Method::POST, "/api/runs", body).await?;
            let id = run["id"].as_str().unwrap_or_default().to_string();
            if *no_wait {
                println!("{id}");
                return Ok(());
            }
            eprintln!("{id}");
            follow(&api, &id).await?;
        }
        RunsCommand::Ls {
            status,
            agent,
            workflow,
            limit,
        } => {
            let mut query = format!("?limit={limit}");
            if let Some(s) = status {
                query.push_str(&format!("&status={}", enc(s)));
            }
            if let Some(a) = agent {
                query.push_str(&format!("&agent={}", enc(a)));
            }
            if let Some(w) = workflow {
                query.push_str(&format!("&workflow={}", enc(w)));
            }
            let list = api
                .json(Method::GET, &format!("/api/runs{query}"), Value::Null)
                .await?;
            println!("ID\tKIND\tNAME\tVERSION\tSTATUS\tSTEPS\tCREATED");
            for r in list["data"].as_array().into_iter().flatten() {
                let kind = r["kind"].as_str().unwrap_or("agent");
                println!(
                    "{}\t{kind}\t{}\t{}\t{}\t{}\t{}",
                    r["id"].as_str().unwrap_or(""),
                    r[kind].as_str().unwrap_or(""),
                    r["version"],
                    r["status"].as_str().unwrap_or(""),
                    r["steps"],
                    r["created_at"]
                );
            }
        }
        RunsCommand::Show { id } => {
            let r = api
                .json(Method::GET, &format!("/api/runs/{}", enc(id)), Value::Null)
                .await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        RunsCommand::Approve { id, comment } | RunsCommand::Reject { id, comment } => {
            let approve = matches!(args.command, RunsCommand::Approve { .. });
            let verb = if approve { "approve" } else { "reject" };
            api.json(
                Method::POST,
                &format!("/api/runs/{}/{verb}", enc(id)),
                json!({"comment": comment}),
            )
            .await?;
            eprintln!("{}d {id}", verb.trim_end_matches('e'));
            follow(&api, id).await?;
        }
        RunsCommand::Cancel { id } => {
            let r = api
                .json(
                    Method::POST,
                    &format!("/api/runs/{}/cancel", enc(id)),
                    Value::Null,
                )
                .await?;
            let status = r["status"].as_str().unwrap_or("");
            if status == "cancelled" {
                println!("cancelled {id}");
            } else {
                println!("{id} is {status}; it stops before its next step");
            }
        }
    }
    Ok(())
}

/// Prints each step of a run as it ends, then the answer (or why it
/// failed); fails when the run did not succeed.
#[allow(clippy::print_stdout)]
async fn follow(api: &Api, id: &str) -> anyhow::Result<()> {
    let mut shown = 0usize;
    loop {
        let r = api
            .json(Method::GET, &format!("/api/runs/{}", enc(id)), Value::Null)
            .await?;
        let journal = r["journal"].as_array().cloned().unwrap_or_default();
        for step in journal.iter().skip(shown) {
            if step["state"] == "started" {
                break;
            }
            eprintln!("  {}", describe(step));
            shown += 1;
        }
        match r["status"].as_str().unwrap_or("") {
            "succeeded" => {
                match (&r["result"]["answer"], &r["result"]["output"]) {
                    (Value::String(answer), _) => println!("{answer}"),
                    (_, Value::String(text)) => println!("{text}"),
                    (_, output) => println!("{}", serde_json::to_string_pretty(output)?),
                }
                return Ok(());
            }
            "waiting" => {
                let w = &r["waiting_for"];
                eprintln!(
                    "waiting at `{}` for an approval: {}",
                    w["step"].as_str().unwrap_or(""),
                    w["message"].as_str().unwrap_or("")
                );
                eprintln!("decide with `kiln runs approve {id}` or `kiln runs reject {id}`");
                return Ok(());
            }
            "failed" | "cancelled" => {
                bail!(
                    "run {id} {}: {}",
                    r["status"].as_str().unwrap_or(""),
                    r["error"].as_str().unwrap_or("")
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// One line about a finished step.
fn describe(step: &Value) -> String {
    let seq = match &step["path"] {
        Value::String(path) => path.clone(),
        _ => step["seq"].to_string(),
    };
    let out = &step["output"];
    match step["kind"].as_str() {
        Some("approval") => format!(
            "[{seq}] {} by {}",
            if out["approved"] == Value::Bool(true) {
                "approved"
            } else {
                "rejected"
            },
            out["by"].as_str().unwrap_or("")
        ),
        Some("retrieve") => format!(
            "[{seq}] search of {} -> {} passages",
            step["name"].as_str().unwrap_or(""),
            out.as_array().map_or(0, Vec::len)
        ),
        Some("agent") => format!(
            "[{seq}] agent {} version {}",
            step["name"].as_str().unwrap_or(""),
            out["version"]
        ),
        Some("model") if out["tool_calls"].as_array().is_none_or(Vec::is_empty) => {
            let text: String = out["content"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(120)
                .collect();
            format!("[{seq}] model -> {}", text.replace('\n', " "))
        }
        Some("model") => {
            let calls: Vec<String> = out["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{}({})",
                        c["name"].as_str().unwrap_or(""),
                        c["arguments"].as_str().unwrap_or("")
                    )
                })
                .collect();
            format!("[{seq}] model calls {}", calls.join(", "))
        }
        _ => {
            let text: String = out["text"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(120)
                .collect();
            format!(
                "[{seq}] {} -> {}",
                step["name"].as_str().unwrap_or(""),
                text.replace('\n', " ")
            )
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn declarations_are_read_as_yaml_or_json() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("maths.yaml");
        std::fs::write(
            &yaml,
            "name: maths\nmodel: smollm2-135m\ntools:\n  - calculator\nmax_steps: 4\n",
        )
        .unwrap();
        let v = read_declaration(&yaml).unwrap();
        assert_eq!(v["tools"][0], "calculator");
        assert_eq!(v["max_steps"], 4);
        let json = dir.path().join("maths.json");
        std::fs::write(&json, r#"{"name": "maths", "model": "m"}"#).unwrap();
        assert_eq!(read_declaration(&json).unwrap()["model"], "m");
        let bad = dir.path().join("bad.yml");
        std::fs::write(&bad, "name: [unclosed").unwrap();
        assert!(read_declaration(&bad).is_err());
    }

    #[test]
    fn steps_are_described_in_one_line() {
        let call = json!({"seq": 0, "kind": "model", "output": {"tool_calls": [
            {"name": "calculator", "arguments": "{\"expression\":\"2*3\"}"}]}});
        assert_eq!(
            describe(&call),
            r#"[0] model calls calculator({"expression":"2*3"})"#
        );
        let tool = json!({"seq": 1, "kind": "tool", "name": "calculator", "output": {"text": "6"}});
        assert_eq!(describe(&tool), "[1] calculator -> 6");
        let approval = json!({"seq": 2, "path": "sign_off", "kind": "approval",
            "output": {"approved": false, "by": "ops (key-1)"}});
        assert_eq!(describe(&approval), "[sign_off] rejected by ops (key-1)");
        let answer = json!({"seq": 3, "path": "each[0]", "kind": "model", "output": {"content": "Hi\nthere"}});
        assert_eq!(describe(&answer), "[each[0]] model -> Hi there");
    }
}
