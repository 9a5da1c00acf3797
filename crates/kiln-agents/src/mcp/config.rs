//! The operator's description of one MCP server ([`McpServerConfig`]) and
//! its validation.
//!
//! The serialized form is flat. The transport is named by `transport =
//! "stdio" | "http"`, or, when that key is left out, inferred from which of
//! `command` (stdio) or `url` (http) is present:
//!
//! ```toml
//! [[mcp_servers]]
//! name = "files"
//! command = "python3"
//! args = ["server.py", "stdio"]
//! env = { API_TOKEN = "…" }      # secret values
//! timeout_seconds = 30
//!
//! [[mcp_servers]]
//! name = "search"
//! transport = "http"
//! url = "http://127.0.0.1:8931/mcp"
//! headers = { Authorization = "Bearer …" }   # secret values
//! ```
//!
//! Unknown keys, and keys of the other transport, are errors.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::McpError;

/// Per-request timeout when the config gives none.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
/// Longest timeout accepted.
const MAX_TIMEOUT_SECONDS: u64 = 3600;
/// Longest server name.
const MAX_NAME_CHARS: usize = 32;

/// One MCP server the operator configured.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawMcpServerConfig")]
pub struct McpServerConfig {
    /// `[a-z0-9_-]{1,32}`; prefixes the server's tool names (`<name>__<tool>`).
    pub name: String,
    pub transport: McpTransportConfig,
    /// Timeout of each request to the server, in seconds (default
    /// [`DEFAULT_TIMEOUT_SECONDS`]).
    pub timeout_seconds: Option<u64>,
}

/// How to reach an MCP server.
#[derive(Clone, PartialEq, Eq)]
pub enum McpTransportConfig {
    /// Spawn `command` with `args`; newline-delimited JSON-RPC on its stdin
    /// and stdout. The child gets a cleared environment: only `PATH`, `HOME`,
    /// `USER`, `LOGNAME`, `SHELL`, `TERM`, `LANG`, `LC_ALL`, `TMPDIR` and
    /// `TZ` are inherited, plus `env` (whose values are secrets).
    Stdio {
        command: String,
        args: Vec<String>,
        env: BTreeMap<String, String>,
    },
    /// MCP's "streamable HTTP" transport at a plain `http://` URL (no TLS
    /// yet), with extra request headers whose values are secrets.
    Http {
        url: String,
        headers: BTreeMap<String, String>,
    },
}

impl McpServerConfig {
    /// A stdio server with no arguments, no extra env and the default timeout.
    pub fn stdio(name: impl Into<String>, command: impl Into<String>) -> Self {
        McpServerConfig {
            name: name.into(),
            transport: McpTransportConfig::Stdio {
                command: command.into(),
                args: Vec::new(),
                env: BTreeMap::new(),
            },
            timeout_seconds: None,
        }
    }

    /// An HTTP server with no extra headers and the default timeout.
    pub fn http(name: impl Into<String>, url: impl Into<String>) -> Self {
        McpServerConfig {
            name: name.into(),
            transport: McpTransportConfig::Http {
                url: url.into(),
                headers: BTreeMap::new(),
            },
            timeout_seconds: None,
        }
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS))
    }

    /// Checks the name, timeout and transport fields; the error says what is
    /// allowed and never quotes a secret value.
    pub fn validate(&self) -> Result<(), McpError> {
        let bad = |m: String| Err(McpError::InvalidConfig(m));
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_NAME_CHARS
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return bad(format!(
                "server name `{}` must be 1 to {MAX_NAME_CHARS} of a-z, 0-9, `_`, `-`",
                crate::tool::truncate_for_message(&self.name, 40)
            ));
        }
        if let Some(t) = self.timeout_seconds {
            if t == 0 || t > MAX_TIMEOUT_SECONDS {
                return bad(format!(
                    "server `{}`: timeout_seconds must be 1 to {MAX_TIMEOUT_SECONDS}",
                    self.name
                ));
            }
        }
        match &self.transport {
            McpTransportConfig::Stdio { command, env, .. } => {
                if command.trim().is_empty() {
                    return bad(format!("server `{}`: command is empty", self.name));
                }
                for key in env.keys() {
                    if key.is_empty() || key.contains('=') || key.contains('\0') {
                        return bad(format!(
                            "server `{}`: env name `{}` is not a valid variable name",
                            self.name,
                            crate::tool::truncate_for_message(key, 40)
                        ));
                    }
                }
                if env.values().any(|v| v.contains('\0')) {
                    return bad(format!(
                        "server `{}`: an env value contains a NUL byte",
                        self.name
                    ));
                }
            }
            McpTransportConfig::Http { url, headers } => {
                super::http::parse_url(url)
                    .map_err(|m| McpError::InvalidConfig(format!("server `{}`: {m}", self.name)))?;
                for (key, value) in headers {
                    if HeaderName::from_bytes(key.as_bytes()).is_err() {
                        return bad(format!(
                            "server `{}`: `{}` is not a valid header name",
                            self.name,
                            crate::tool::truncate_for_message(key, 40)
                        ));
                    }
                    if HeaderValue::from_str(value).is_err() {
                        return bad(format!(
                            "server `{}`: the value of header `{key}` is not a valid header value",
                            self.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for McpServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("McpServerConfig")
            .field("name", &self.name)
            .field("transport", &self.transport)
            .field("timeout_seconds", &self.timeout_seconds)
            .finish()
    }
}

/// Keys with their values redacted.
struct Redacted<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "[REDACTED]")))
            .finish()
    }
}

impl fmt::Debug for McpTransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            McpTransportConfig::Stdio { command, args, env } => f
                .debug_struct("Stdio")
                .field("command", command)
                .field("args", args)
                .field("env", &Redacted(env))
                .finish(),
            McpTransportConfig::Http { url, headers } => f
                .debug_struct("Http")
                .field("url", url)
                .field("headers", &Redacted(headers))
                .finish(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum TransportKind {
    Stdio,
    Http,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcpServerConfig {
    name: String,
    #[serde(default)]
    transport: Option<TransportKind>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
}

impl TryFrom<RawMcpServerConfig> for McpServerConfig {
    type Error = String;

    fn try_from(raw: RawMcpServerConfig) -> Result<Self, String> {
        let kind = match (&raw.transport, &raw.command, &raw.url) {
            (Some(TransportKind::Stdio), _, _) | (None, Some(_), None) => TransportKind::Stdio,
            (Some(TransportKind::Http), _, _) | (None, None, Some(_)) => TransportKind::Http,
            (None, Some(_), Some(_)) => {
                return Err(format!(
                    "MCP server `{}`: give `command` (stdio) or `url` (http), not both",
                    raw.name
                ))
            }
            (None, None, None) => {
                return Err(format!(
                    "MCP server `{}`: give `command` (stdio) or `url` (http)",
                    raw.name
                ))
            }
        };
        let transport = match kind {
            TransportKind::Stdio => {
                if raw.url.is_some() || raw.headers.is_some() {
                    return Err(format!(
                        "MCP server `{}`: `url` and `headers` belong to the http transport",
                        raw.name
                    ));
                }
                let Some(command) = raw.command else {
                    return Err(format!(
                        "MCP server `{}`: the stdio transport needs `command`",
                        raw.name
                    ));
                };
                McpTransportConfig::Stdio {
                    command,
                    args: raw.args.unwrap_or_default(),
                    env: raw.env.unwrap_or_default(),
                }
            }
            TransportKind::Http => {
                if raw.command.is_some() || raw.args.is_some() || raw.env.is_some() {
                    return Err(format!(
                        "MCP server `{}`: `command`, `args` and `env` belong to the stdio transport",
                        raw.name
                    ));
                }
                let Some(url) = raw.url else {
                    return Err(format!(
                        "MCP server `{}`: the http transport needs `url`",
                        raw.name
                    ));
                };
                McpTransportConfig::Http {
                    url,
                    headers: raw.headers.unwrap_or_default(),
                }
            }
        };
        let config = McpServerConfig {
            name: raw.name,
            transport,
            timeout_seconds: raw.timeout_seconds,
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<McpServerConfig, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn transport_is_inferred_or_named() {
        let c = parse(json!({"name": "files", "command": "srv", "args": ["-v"]})).unwrap();
        assert!(
            matches!(c.transport, McpTransportConfig::Stdio { ref args, .. } if args == &["-v"])
        );
        let c = parse(
            json!({"name": "web", "transport": "http", "url": "http://127.0.0.1:9/mcp",
            "headers": {"Authorization": "Bearer s3cret"}, "timeout_seconds": 5}),
        )
        .unwrap();
        assert!(matches!(c.transport, McpTransportConfig::Http { .. }));
        assert_eq!(c.timeout(), Duration::from_secs(5));
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        for (v, want) in [
            (json!({"name": "Bad", "command": "x"}), "must be 1 to 32"),
            (
                json!({"name": "a", "command": "x", "bogus": 1}),
                "unknown field",
            ),
            (json!({"name": "a"}), "give `command`"),
            (
                json!({"name": "a", "command": "x", "url": "http://h/"}),
                "not both",
            ),
            (
                json!({"name": "a", "command": "x", "headers": {}}),
                "belong to the http",
            ),
            (json!({"name": "a", "url": "https://h/mcp"}), "https"),
            (
                json!({"name": "a", "url": "http://h/", "headers": {"X": "a\nb"}}),
                "not a valid header value",
            ),
            (
                json!({"name": "a", "command": "x", "timeout_seconds": 0}),
                "timeout_seconds",
            ),
        ] {
            let err = parse(v.clone()).unwrap_err();
            assert!(err.contains(want), "{v}: {err}");
        }
    }

    #[test]
    fn debug_redacts_secret_values() {
        let c = parse(json!({"name": "web", "url": "http://h:1/mcp",
            "headers": {"Authorization": "Bearer s3cret"}}))
        .unwrap();
        let s = format!("{c:?}");
        assert!(s.contains("Authorization") && !s.contains("s3cret"), "{s}");
        let c = parse(json!({"name": "f", "command": "x", "env": {"TOKEN": "hunter22"}})).unwrap();
        let s = format!("{c:?}");
        assert!(s.contains("TOKEN") && !s.contains("hunter22"), "{s}");
    }
}
