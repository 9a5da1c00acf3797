//! Kiln's agents: declarations, the loop that runs one ([`run_agent`]),
//! and the built-in tools.
//!
//! An agent loop asks the model for a tool call, looks the tool up in a
//! [`ToolBox`] by name and calls it with the model's JSON arguments. Every
//! failure comes back as a [`ToolError`] whose text is meant to be fed back to
//! the model so it can correct itself; nothing the model or a remote server
//! sends can panic this crate, and no error or output ever carries an
//! operator secret.
//!
//! # Tools
//!
//! - [`Calculator`] (`calculator`): evaluates an arithmetic expression with a
//!   hand-written recursive-descent parser: numbers (decimals, exponents),
//!   `+ - * / % ^` (`^` is right-associative and binds tighter than unary
//!   minus), parentheses, the functions `sqrt abs ln log10 exp sin cos tan
//!   floor ceil round min max` and the constants `pi` and `e`. Input length
//!   and nesting depth are capped; division by zero, non-finite results,
//!   unknown names and trailing junk are errors that name the position.
//! - [`CurrentTime`] (`current_time`): the current UTC time in RFC 3339 and
//!   as unix seconds, plus the local time at an optional `utc_offset` such as
//!   `+05:30`.
//! - [`HttpRequest`] (`http_request`): a GET or POST to an operator-approved
//!   host, returning the status, content type and (size-capped) body.
//!
//! # Security model of `http_request`
//!
//! The operator decides where requests may go ([`HttpRequestConfig`]); the
//! model only chooses a URL, a method (GET or POST), a body and a few plain
//! headers. Every hop, including every redirect, is checked *before* any
//! connection is made:
//!
//! 1. The URL is parsed by this crate's own strict parser: `http` only (https
//!    is refused with a clear error until TLS is added), no userinfo, no
//!    fragments, host names limited to letters, digits, `-`, `_` and `.`.
//! 2. The host must match the allowlist (exact names or `*.suffix`).
//! 3. A host that looks numeric is parsed the way `inet_aton` does, so
//!    `2130706433`, `0177.0.0.1`, `0x7f.0.0.1` and `127.1` are all recognised
//!    as `127.0.0.1`; a numeric-looking host that is not a valid address is
//!    refused rather than handed to a resolver. Bracketed IPv6 literals are
//!    parsed too.
//! 4. Names are resolved once through the injectable [`Resolver`]; *every*
//!    returned address must pass the address policy, and the connection is
//!    made through the injectable [`Connector`] to one of those vetted
//!    addresses. There is no second lookup, so DNS rebinding cannot swap the
//!    address between the check and the connect.
//! 5. Unless `allow_private` is set, loopback, private, link-local,
//!    unique-local, CGNAT, documentation, benchmarking and other
//!    special-purpose ranges are refused, and IPv4-mapped, 6to4 and NAT64
//!    IPv6 addresses are judged by the IPv4 address they embed.
//!    Unspecified, multicast, broadcast and reserved addresses are refused
//!    even when `allow_private` is set.
//! 6. Redirects (301, 302, 303, 307, 308) are followed by hand, up to
//!    `max_redirects`, each new URL going through steps 1–5 again.
//! 7. Operator secret headers (for example `Authorization`) are attached only
//!    to hops whose host matches the secret's host pattern. Their values are
//!    redacted from `Debug` output, never logged, never put in errors, and
//!    scrubbed from response text in case a server echoes them.
//! 8. The whole call (all hops) runs under one timeout; the response body is
//!    read up to `max_response_bytes` and then the connection is dropped and
//!    the output is flagged as truncated. Bodies that are not UTF-8 are
//!    decoded lossily, with a note saying so.
//!
//! # Workflows
//!
//! [`workflow`] holds declared graphs of steps (model calls, tool calls,
//! searches, branches, parallel maps, human approvals, sub-agents) with
//! typed templates between them, checked at registration and run durably
//! through the same [`Journal`] as agents.
//!
//! # MCP servers
//!
//! [`McpClient`] connects to an operator-configured Model Context Protocol
//! server ([`McpServerConfig`]: a child process over stdio, or the
//! streamable HTTP transport at a plain `http://` URL), runs the handshake
//! and turns each of the server's tools into an [`McpTool`] named
//! `<server>__<tool>`. Messages are capped at 4 MiB, every request has a
//! timeout, tool output is cut at [`MAX_TOOL_TEXT`] characters, and header
//! and env values from the config are treated as secrets. A server that
//! goes away (a stdio child that exits, an HTTP server that stops
//! answering) is connected again by the next call, with backoff.

mod agent;
mod calculator;
mod clock;
mod http;
mod mcp;
mod tool;
pub mod workflow;

pub use agent::{
    run_agent, run_durable, AgentSpec, Begun, ChatModel, Event, Journal, JournalError,
    JournalFuture, JournaledStep, MemoryJournal, ModelError, ModelFuture, ModelReply, ModelRequest,
    Outcome, RequestedCall, Run, SpecError, StepKind, StepStart, MAX_RETRIES, MAX_STEPS,
    MAX_TOOL_TEXT,
};
pub use calculator::{evaluate, CalcError, Calculator};
pub use clock::{CurrentTime, UtcOffset};
pub use http::address::{classify_ip, parse_host, parse_ipv4_inet_aton, Host, IpVerdict};
pub use http::net::{
    BoxedStream, ConnectFuture, ConnectTarget, ConnectionIo, Connector, ResolveFuture, Resolver,
    TcpConnector, TokioResolver,
};
pub use http::{
    ConfigError, HostPattern, HttpRequest, HttpRequestConfig, SecretHeader, SecretValue,
};
pub use mcp::{
    McpClient, McpError, McpServerConfig, McpTool, McpTransportConfig, DEFAULT_TIMEOUT_SECONDS,
    MAX_MESSAGE_BYTES, MAX_TOOLS_PER_SERVER, MCP_PROTOCOL_VERSIONS,
};
pub use tool::{Tool, ToolBox, ToolError, ToolFuture, ToolOutput};
