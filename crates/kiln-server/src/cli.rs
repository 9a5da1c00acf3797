//! The command line: `kiln serve | pull | models | chat | tenants | keys |
//! prices | usage`, as clap
//! definitions, and dispatch to the commands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, ConfigLayer};

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Kiln: a private model platform")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible API.
    Serve(ServeArgs),
    /// Download and install a model from the catalogue.
    Pull(PullArgs),
    /// List installed models.
    Models(HomeArgs),
    /// Chat with a model in the terminal.
    Chat(ChatArgs),
    /// Manage tenants: create, update, credit, budget.
    Tenants(crate::commands::admin::TenantsArgs),
    /// Manage API keys: create, list, revoke, rotate.
    Keys(crate::commands::admin::KeysArgs),
    /// Manage model prices per million tokens.
    Prices(crate::commands::admin::PricesArgs),
    /// Knowledge bases on a running server: create, add, ls, rm, search, ask.
    Kb(crate::commands::kb::KbArgs),
    /// Agents on a running server: create (YAML or JSON), ls, show, rm.
    Agents(crate::commands::agents::AgentsArgs),
    /// Workflows on a running server: create (YAML or JSON), ls, show, rm.
    Workflows(crate::commands::agents::AgentsArgs),
    /// Runs of agents and workflows on a running server: start, ls, show,
    /// approve, reject, cancel.
    Runs(crate::commands::agents::RunsArgs),
    /// Usage report from the ledger, as a table or CSV.
    Usage(crate::commands::admin::UsageArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (default: $KILN_HOME/kiln.toml when present).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Kiln's home directory [env: KILN_HOME] (default ~/.kiln).
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Address to listen on [env: KILN_HOST].
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one [env: KILN_PORT].
    #[arg(long)]
    pub port: Option<u16>,
    /// A text model to serve: NAME, PATH or ALIAS=PATH; repeatable [env: KILN_MODELS].
    #[arg(long = "model", value_name = "NAME_OR_PATH")]
    pub models: Vec<String>,
    /// The embedding model: NAME or directory [env: KILN_EMBEDDING_MODEL].
    #[arg(long, value_name = "NAME_OR_DIR")]
    pub embedding_model: Option<String>,
    /// Requests that may wait per model before 429 [env: KILN_QUEUE_CAPACITY].
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Sequences one model generates together at most [env: KILN_MAX_BATCH].
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// KV cache budget per model in MiB; sequences wait or are preempted past it [env: KILN_KV_CACHE_MB].
    #[arg(long, value_name = "MIB")]
    pub kv_cache_mb: Option<usize>,
    /// Largest request body in bytes [env: KILN_MAX_BODY_BYTES].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Directory of the knowledge bases [env: KILN_KB_DIR] (default $KILN_HOME/kb).
    #[arg(long, value_name = "DIR")]
    pub kb_dir: Option<PathBuf>,
    /// The URL other replicas reach this one at, to forward requests for its knowledge bases [env: KILN_ADVERTISE_URL].
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    /// Largest knowledge-base document upload in MiB [env: KILN_KB_MAX_UPLOAD_MB].
    #[arg(long, value_name = "MIB")]
    pub kb_max_upload_mb: Option<usize>,
    /// Compute threads [env: KILN_THREADS].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Log filter, e.g. `info` or `kiln_server=debug` [env: KILN_LOG].
    #[arg(long)]
    pub log: Option<String>,
    /// Database: a SQLite file, or a postgres:// URL shared by replicas [env: KILN_DATABASE] (default $KILN_HOME/kiln.db).
    #[arg(long, value_name = "PATH")]
    pub database: Option<PathBuf>,
    /// Accept /v1 requests without an API key, charged to the `local` tenant [env: KILN_NO_AUTH].
    #[arg(long)]
    pub no_auth: bool,
    /// Check the configuration and the models it names, then exit.
    #[arg(long)]
    pub validate_config: bool,
}

impl ServeArgs {
    fn layer(&self) -> ConfigLayer {
        ConfigLayer {
            home: self.home.clone(),
            host: self.host.clone(),
            port: self.port,
            models: (!self.models.is_empty()).then(|| self.models.clone()),
            embedding_model: self.embedding_model.clone(),
            queue_capacity: self.queue_capacity,
            max_batch: self.max_batch,
            kv_cache_mb: self.kv_cache_mb,
            max_body_bytes: self.max_body_bytes,
            kb_dir: self.kb_dir.clone(),
            advertise_url: self.advertise_url.clone(),
            kb_max_upload_mb: self.kb_max_upload_mb,
            threads: self.threads,
            log: self.log.clone(),
            embedding_concurrency: None,
            database: self.database.clone(),
            no_auth: self.no_auth.then_some(true),
            lease_seconds: None,
            upstreams: None,
            rerank: None,
            http_tool: None,
            mcp_servers: None,
        }
    }
}

#[derive(Debug, Args)]
pub struct HomeArgs {
    /// Kiln's home directory [env: KILN_HOME] (default ~/.kiln).
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
}

impl HomeArgs {
    pub fn resolve(&self) -> PathBuf {
        self.home
            .clone()
            .or_else(|| std::env::var_os(config::env::KILN_HOME).map(PathBuf::from))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(config::default_home)
    }
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Catalogue name of the model, e.g. `smollm2-135m`.
    pub name: String,
    /// Install from package files already in this directory instead of downloading.
    #[arg(long, value_name = "DIR")]
    pub from: Option<PathBuf>,
    #[command(flatten)]
    pub home: HomeArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Model NAME or PATH (default: the first installed text model).
    #[arg(long)]
    pub model: Option<String>,
    /// Most tokens per reply (default: what fits the context).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0 is greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// A system message to start the chat with.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub home: HomeArgs,
}

/// Parses the command line and runs the command.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let env = ConfigLayer::from_env(|k| std::env::var(k).ok())?;
            let cfg = config::load(args.config.as_deref(), env, args.layer())?;
            crate::serve::run(cfg, args.validate_config)
        }
        Command::Pull(args) => crate::commands::pull::run(&args),
        Command::Models(args) => crate::commands::models::run(&args),
        Command::Chat(args) => crate::commands::chat::run(&args),
        Command::Tenants(args) => crate::commands::admin::tenants(&args),
        Command::Keys(args) => crate::commands::admin::keys(&args),
        Command::Prices(args) => crate::commands::admin::prices(&args),
        Command::Usage(args) => crate::commands::admin::usage(&args),
        Command::Kb(args) => crate::commands::kb::run(&args),
        Command::Agents(args) => crate::commands::agents::run_agents(&args),
        Command::Workflows(args) => crate::commands::agents::run_workflows(&args),
        Command::Runs(args) => crate::commands::agents::run_runs(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Limits given to `kiln tenants update` parse to a value or to
    /// `none` (removed), and an absent flag leaves the limit alone.
    #[test]
    fn tenant_limits_parse_to_a_value_or_none() {
        use crate::commands::admin::TenantsCommand;
        let cli = Cli::try_parse_from([
            "kiln", "tenants", "update", "t", "--rpm", "5", "--tpm", "none",
        ]);
        let Ok(Cli {
            command: Command::Tenants(args),
        }) = cli
        else {
            panic!("tenants update did not parse: {cli:?}");
        };
        let TenantsCommand::Update {
            rpm,
            tpm,
            monthly_limit,
            ..
        } = args.command
        else {
            panic!("not an update");
        };
        assert_eq!(rpm.map(|v| v.value()), Some(Some(5)));
        assert_eq!(tpm.map(|v| v.value()), Some(None));
        assert!(monthly_limit.is_none());
        assert!(Cli::try_parse_from(["kiln", "tenants", "update", "t", "--rpm", "x"]).is_err());
    }

    #[test]
    fn repeated_models_are_collected() {
        let cli = Cli::try_parse_from([
            "kiln",
            "serve",
            "--model",
            "a",
            "--model",
            "b=/x.gguf",
            "--port",
            "0",
        ]);
        let Ok(Cli {
            command: Command::Serve(args),
        }) = cli
        else {
            panic!("serve args did not parse");
        };
        assert_eq!(
            args.layer().models,
            Some(vec!["a".to_string(), "b=/x.gguf".to_string()])
        );
        assert_eq!(args.port, Some(0));
    }
}
