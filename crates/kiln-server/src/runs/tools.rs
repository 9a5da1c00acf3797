//! The tools agents may be given on this server: the built-in ones, the
//! operator's `http_request`, and `kb_search` bound to a run's key.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use kiln_agents::{Calculator, CurrentTime, HttpRequest, HttpRequestConfig, SecretHeader, ToolBox};
use serde_json::{json, Value};

use crate::api::SharedState;
use crate::auth::Principal;

/// `[http_tool]` in the configuration file: where agents' `http_request`
/// tool may go. Secret header values come from environment variables, so
/// they are in neither the file nor any journal or log.
///
/// ```toml
/// [http_tool]
/// allow = ["api.example.com", "*.corp.example"]
/// allow_private = false        # loopback and private ranges stay barred
/// timeout_seconds = 10
/// max_response_kb = 64
/// [[http_tool.secret_headers]]
/// host = "api.example.com"
/// header = "Authorization"
/// value_env = "EXAMPLE_API_TOKEN"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToolConfig {
    pub allow: Vec<String>,
    #[serde(default)]
    pub allow_private: bool,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub max_response_kb: Option<usize>,
    #[serde(default)]
    pub secret_headers: Vec<SecretHeaderConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretHeaderConfig {
    pub host: String,
    pub header: String,
    pub value_env: String,
}

impl HttpToolConfig {
    /// The tool's settings; an error names what is wrong (never a secret).
    pub fn build(&self) -> Result<HttpRequestConfig, String> {
        let mut config =
            HttpRequestConfig::with_allowed_hosts(self.allow.iter().map(String::as_str))
                .map_err(|e| format!("[http_tool] {e}"))?;
        config.allow_private = self.allow_private;
        if let Some(t) = self.timeout_seconds {
            if !(1..=600).contains(&t) {
                return Err("[http_tool] timeout_seconds must be between 1 and 600".into());
            }
            config.timeout = Duration::from_secs(t);
        }
        if let Some(kb) = self.max_response_kb {
            if !(1..=16 * 1024).contains(&kb) {
                return Err("[http_tool] max_response_kb must be between 1 and 16384".into());
            }
            config.max_response_bytes = kb * 1024;
        }
        for h in &self.secret_headers {
            let value = std::env::var(&h.value_env).map_err(|_| {
                format!(
                    "[http_tool] the secret header `{}` reads the environment variable `{}`, which is not set",
                    h.header, h.value_env
                )
            })?;
            let secret = SecretHeader::new(&h.host, &h.header, value)
                .map_err(|e| format!("[http_tool] {e}"))?;
            config.secret_headers.push(secret);
        }
        config.validate().map_err(|e| format!("[http_tool] {e}"))?;
        Ok(config)
    }
}

/// The tools agents may be given on this server: the calculator and the
/// clock, and `http_request` when the operator configured where it may go.
pub fn toolbox(http: Option<&HttpToolConfig>) -> Result<ToolBox, String> {
    let mut tools = default_toolbox();
    if let Some(h) = http {
        let tool = HttpRequest::new(h.build()?).map_err(|e| format!("[http_tool] {e}"))?;
        tools.register(tool);
    }
    Ok(tools)
}

/// The tools without `http_request`.
pub fn default_toolbox() -> ToolBox {
    ToolBox::new()
        .with(Calculator)
        .with(CurrentTime::new())
        .with(KbSearch { bound: None })
}

/// Results one `kb_search` returns at most.
const KB_SEARCH_MAX_K: u64 = 20;

/// `kb_search`: searches one of the tenant's knowledge bases as the run's
/// key sees it (its groups), the query embedding metered to that key. The
/// server's tool box holds it unbound (for checking declarations); each run
/// gets it bound to the run's key.
struct KbSearch {
    bound: Option<(SharedState, Arc<Principal>)>,
}

impl kiln_agents::Tool for KbSearch {
    fn name(&self) -> &str {
        "kb_search"
    }

    fn description(&self) -> &str {
        "Searches a knowledge base of the organisation's documents and returns the most relevant passages with their document names."
    }

    fn parameters(&self) -> Value {
        // Bound to a run, the names it may search are an enum: a model held
        // to the schema can only name one that exists.
        let mut kb = json!({"type": "string", "description": "The knowledge base's name."});
        if let Some((state, p)) = &self.bound {
            let names: Vec<String> = state
                .knowledge
                .as_ref()
                .map(|k| k.list(Some(&p.tenant.id)))
                .unwrap_or_default()
                .iter()
                .map(|kb| kb.settings().name.clone())
                .collect();
            if !names.is_empty() {
                kb["enum"] = json!(names);
            }
        }
        json!({
            "type": "object",
            "properties": {
                "knowledge_base": kb,
                "query": {"type": "string", "description": "What to look for."},
                "k": {"type": "integer", "description": "How many passages (1 to 20, default 5)."},
            },
            "required": ["knowledge_base", "query"],
            "additionalProperties": false,
        })
    }

    fn call<'a>(&'a self, args: &'a Value) -> kiln_agents::ToolFuture<'a> {
        Box::pin(async move {
            let bad = |m: &str| kiln_agents::ToolError::InvalidArguments(m.to_string());
            let Some((state, principal)) = &self.bound else {
                return Err(kiln_agents::ToolError::RequestFailed(
                    "kb_search is only available inside a run".into(),
                ));
            };
            let kb = args["knowledge_base"]
                .as_str()
                .ok_or_else(|| bad("`knowledge_base` must be a string"))?;
            let query = args["query"]
                .as_str()
                .filter(|q| !q.trim().is_empty())
                .ok_or_else(|| bad("`query` must be a non-empty string"))?;
            let k = match &args["k"] {
                Value::Null => 5,
                v => v
                    .as_u64()
                    .filter(|k| (1..=KB_SEARCH_MAX_K).contains(k))
                    .ok_or_else(|| bad("`k` must be a whole number from 1 to 20"))?,
            };
            let hits = crate::api::kb_search(state, principal, kb, query, k as usize)
                .await
                .map_err(|e| kiln_agents::ToolError::RequestFailed(e.message))?;
            if hits.is_empty() {
                return Ok(kiln_agents::ToolOutput::text(
                    "no passage of that knowledge base matches",
                ));
            }
            let text = hits
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    format!(
                        "[{}] {} ({}): {}",
                        i + 1,
                        h.document_name,
                        h.heading,
                        h.text
                    )
                })
                .collect::<Vec<_>>()
                .join("\n\n");
            Ok(kiln_agents::ToolOutput::text(text))
        })
    }
}

/// The server's tools. Declarations and runs read a snapshot; an MCP
/// server that comes up after the start adds its tools to the next one.
#[derive(Default)]
pub struct ServerTools {
    current: RwLock<Arc<ToolBox>>,
}

impl ServerTools {
    pub fn new(tools: ToolBox) -> ServerTools {
        ServerTools {
            current: RwLock::new(Arc::new(tools)),
        }
    }

    /// The tools as they are now.
    pub fn get(&self) -> Arc<ToolBox> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn add(&self, found: Vec<kiln_agents::McpTool>) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let mut tools = (**current).clone();
        for tool in found {
            tools.register(tool);
        }
        *current = Arc::new(tools);
    }
}

/// First wait before connecting again to an MCP server that was down at
/// the start; it doubles up to [`MCP_RETRY_MAX`].
const MCP_RETRY_FIRST: Duration = Duration::from_secs(1);
const MCP_RETRY_MAX: Duration = Duration::from_secs(30);

/// Connects to the operator's MCP servers and adds their tools
/// (`<server>__<tool>`). A server that cannot be reached is logged and
/// tried again in the background (1 s, doubling up to 30 s) until it
/// answers: the platform serves on meanwhile, and a declaration naming its
/// tools is refused until they are there.
pub async fn add_mcp_tools(tools: &Arc<ServerTools>, servers: &[kiln_agents::McpServerConfig]) {
    for config in servers {
        match kiln_agents::McpClient::connect(config).await {
            Ok(client) => tools.add(connected(config, &client)),
            Err(e) => {
                tracing::error!(
                    server = %config.name,
                    error = %e,
                    "cannot connect to an MCP server; its tools are not available until it answers"
                );
                tokio::spawn(connect_later(tools.clone(), config.clone()));
            }
        }
    }
}

fn connected(
    config: &kiln_agents::McpServerConfig,
    client: &kiln_agents::McpClient,
) -> Vec<kiln_agents::McpTool> {
    let found = client.tools();
    tracing::info!(
        server = %config.name,
        tools = found.len(),
        protocol = client.protocol_version(),
        "connected to an MCP server"
    );
    found
}

async fn connect_later(tools: Arc<ServerTools>, config: kiln_agents::McpServerConfig) {
    let mut wait = MCP_RETRY_FIRST;
    loop {
        tokio::time::sleep(wait).await;
        match kiln_agents::McpClient::connect(&config).await {
            Ok(client) => {
                tools.add(connected(&config, &client));
                return;
            }
            Err(e) => {
                tracing::debug!(server = %config.name, error = %e, "the MCP server still does not answer");
                wait = (wait * 2).min(MCP_RETRY_MAX);
            }
        }
    }
}

/// The server's tools with `kb_search` bound to a run's key.
pub(super) fn tools_for_run(state: &SharedState, principal: Arc<Principal>) -> ToolBox {
    let mut tools = (*state.tools.get()).clone();
    if state.knowledge.is_some() {
        tools.register(KbSearch {
            bound: Some((state.clone(), principal)),
        });
    }
    tools
}
