//! The server's configuration: one typed struct ([`ServeConfig`]) built in
//! layers — defaults, then a TOML file (`--config PATH`, else
//! `$KILN_HOME/kiln.toml` when present), then `KILN_*` environment variables
//! ([`env`]), then command-line flags — and validated before anything starts.
//!
//! Every layer is a [`ConfigLayer`] (all fields optional); a later layer's
//! set fields win. A bad value in any layer is a [`ConfigError`] naming
//! where it came from and what is allowed; nothing here panics.

pub mod env;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default request body limit: 8 MiB, so a 10 MB body is refused with 413.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_QUEUE_CAPACITY: usize = 16;
pub const DEFAULT_MAX_BATCH: usize = 16;
pub const DEFAULT_EMBEDDING_CONCURRENCY: usize = 2;
pub const DEFAULT_LEASE_SECONDS: u64 = 10;
/// Default largest knowledge-base upload, in MiB.
pub const DEFAULT_KB_MAX_UPLOAD_MB: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: &'static str, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One layer of settings; `None` means "not set here".
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    pub home: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub models: Option<Vec<String>>,
    pub embedding_model: Option<String>,
    pub queue_capacity: Option<usize>,
    pub max_batch: Option<usize>,
    pub kv_cache_mb: Option<usize>,
    pub max_body_bytes: Option<usize>,
    pub kb_dir: Option<PathBuf>,
    pub advertise_url: Option<String>,
    pub kb_max_upload_mb: Option<usize>,
    pub threads: Option<usize>,
    pub log: Option<String>,
    pub embedding_concurrency: Option<usize>,
    pub database: Option<PathBuf>,
    pub no_auth: Option<bool>,
    pub lease_seconds: Option<u64>,
    /// `[[upstreams]]` tables: models served by other OpenAI-compatible
    /// servers (TOML only).
    pub upstreams: Option<Vec<crate::upstream::UpstreamConfig>>,
    /// `[rerank]`: an upstream rerank endpoint for knowledge-base searches
    /// (TOML only).
    pub rerank: Option<crate::knowledge::RerankConfig>,
    /// `[http_tool]`: the hosts agents' `http_request` tool may reach
    /// (TOML only; without it agents have no such tool).
    pub http_tool: Option<crate::runs::HttpToolConfig>,
    /// `[[mcp_servers]]`: MCP servers whose tools agents may be given
    /// (TOML only: an operator's choice, never a tenant's).
    pub mcp_servers: Option<Vec<kiln_agents::McpServerConfig>>,
}

impl ConfigLayer {
    /// Fields set in `over` replace those here.
    fn merge(&mut self, over: ConfigLayer) {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            home,
            host,
            port,
            models,
            embedding_model,
            queue_capacity,
            max_batch,
            kv_cache_mb,
            max_body_bytes,
            kb_dir,
            advertise_url,
            kb_max_upload_mb,
            threads,
            log,
            embedding_concurrency,
            database,
            no_auth,
            lease_seconds,
            upstreams,
            rerank,
            http_tool,
            mcp_servers
        );
    }

    /// Reads the `KILN_*` variables through `lookup` (the process environment
    /// in production, a map in tests).
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        fn parse<T: std::str::FromStr>(
            var: &'static str,
            raw: Option<String>,
            what: &str,
        ) -> Result<Option<T>, ConfigError> {
            match raw {
                None => Ok(None),
                Some(s) => s.trim().parse().map(Some).map_err(|_| ConfigError::Env {
                    var,
                    reason: format!("`{s}` is not {what}"),
                }),
            }
        }
        let nonempty = |v: &str| lookup(v).filter(|s| !s.trim().is_empty());
        Ok(ConfigLayer {
            home: nonempty(env::KILN_HOME).map(PathBuf::from),
            host: nonempty(env::KILN_HOST),
            port: parse(
                env::KILN_PORT,
                nonempty(env::KILN_PORT),
                "a port number (0-65535)",
            )?,
            models: nonempty(env::KILN_MODELS).map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect()
            }),
            embedding_model: nonempty(env::KILN_EMBEDDING_MODEL),
            queue_capacity: parse(
                env::KILN_QUEUE_CAPACITY,
                nonempty(env::KILN_QUEUE_CAPACITY),
                "a whole number",
            )?,
            max_batch: parse(
                env::KILN_MAX_BATCH,
                nonempty(env::KILN_MAX_BATCH),
                "a whole number",
            )?,
            kv_cache_mb: parse(
                env::KILN_KV_CACHE_MB,
                nonempty(env::KILN_KV_CACHE_MB),
                "a whole number of MiB",
            )?,
            max_body_bytes: parse(
                env::KILN_MAX_BODY_BYTES,
                nonempty(env::KILN_MAX_BODY_BYTES),
                "a number of bytes",
            )?,
            kb_dir: nonempty(env::KILN_KB_DIR).map(PathBuf::from),
            advertise_url: nonempty(env::KILN_ADVERTISE_URL),
            kb_max_upload_mb: parse(
                env::KILN_KB_MAX_UPLOAD_MB,
                nonempty(env::KILN_KB_MAX_UPLOAD_MB),
                "a whole number of MiB",
            )?,
            threads: parse(
                env::KILN_THREADS,
                nonempty(env::KILN_THREADS),
                "a whole number",
            )?,
            log: nonempty(env::KILN_LOG),
            embedding_concurrency: parse(
                env::KILN_EMBEDDING_CONCURRENCY,
                nonempty(env::KILN_EMBEDDING_CONCURRENCY),
                "a whole number",
            )?,
            database: nonempty(env::KILN_DATABASE).map(PathBuf::from),
            no_auth: match nonempty(env::KILN_NO_AUTH).as_deref().map(str::trim) {
                None => None,
                Some("1" | "true" | "yes") => Some(true),
                Some("0" | "false" | "no") => Some(false),
                Some(other) => {
                    return Err(ConfigError::Env {
                        var: env::KILN_NO_AUTH,
                        reason: format!("`{other}` is not true/false"),
                    })
                }
            },
            lease_seconds: parse(
                env::KILN_LEASE_SECONDS,
                nonempty(env::KILN_LEASE_SECONDS),
                "a whole number of seconds",
            )?,
            upstreams: None,
            rerank: None,
            http_tool: None,
            mcp_servers: None,
        })
    }

    pub fn from_toml(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// The validated settings `kiln serve` runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    pub home: PathBuf,
    pub host: IpAddr,
    pub port: u16,
    /// Text models as given (`NAME`, `PATH` or `ALIAS=PATH`); empty means
    /// every installed one.
    pub models: Vec<String>,
    pub embedding_model: Option<String>,
    pub queue_capacity: usize,
    /// Sequences one model generates together at most.
    pub max_batch: usize,
    /// KV cache budget per model, in MiB.
    pub kv_cache_mb: usize,
    pub max_body_bytes: usize,
    /// Where knowledge bases live.
    pub kb_dir: PathBuf,
    /// The base URL other replicas forward knowledge-base requests to.
    pub advertise_url: Option<String>,
    /// Largest knowledge-base upload, in bytes.
    pub kb_max_upload_bytes: usize,
    pub threads: Option<usize>,
    pub log: String,
    pub embedding_concurrency: usize,
    /// The SQLite database: ledger, tenants, keys, prices.
    pub database: PathBuf,
    /// `/v1` without keys, charged to the `local` tenant.
    pub no_auth: bool,
    /// How long this replica's lease lasts without renewal.
    pub lease: std::time::Duration,
    pub upstreams: Vec<crate::upstream::UpstreamConfig>,
    pub rerank: Option<crate::knowledge::RerankConfig>,
    pub http_tool: Option<crate::runs::HttpToolConfig>,
    pub mcp_servers: Vec<kiln_agents::McpServerConfig>,
    /// The TOML file that was read, if any.
    pub config_file: Option<PathBuf>,
}

impl ServeConfig {
    pub fn models_dir(&self) -> PathBuf {
        self.home.join("models")
    }
}

/// A name used in URLs and metrics: 1 to 64 letters, digits, `-`, `_`, `.`.
pub fn validate_plain_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} `{name}` must be 1 to 64 letters, digits, `-`, `_` or `.`"
        ))
    }
}

/// `~/.kiln`, or `.kiln` in the working directory when there is no home.
pub fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".kiln")
}

/// Builds the configuration from all layers. `config_path` is `--config`;
/// `cli` holds the flags given on the command line.
pub fn load(
    config_path: Option<&Path>,
    env_layer: ConfigLayer,
    cli: ConfigLayer,
) -> Result<ServeConfig, ConfigError> {
    // The home directory locates the default config file, so settle it first
    // from the layers that cannot come from that file.
    let home_before_file = cli
        .home
        .clone()
        .or_else(|| env_layer.home.clone())
        .unwrap_or_else(default_home);
    let (file_layer, config_file) = match config_path {
        Some(p) => (ConfigLayer::from_toml(p)?, Some(p.to_path_buf())),
        None => {
            let p = home_before_file.join("kiln.toml");
            if p.is_file() {
                (ConfigLayer::from_toml(&p)?, Some(p))
            } else {
                (ConfigLayer::default(), None)
            }
        }
    };
    let mut merged = ConfigLayer::default();
    merged.merge(file_layer);
    merged.merge(env_layer);
    merged.merge(cli);
    validate(merged, config_file)
}

fn validate(layer: ConfigLayer, config_file: Option<PathBuf>) -> Result<ServeConfig, ConfigError> {
    let invalid = |s: String| Err(ConfigError::Invalid(s));
    let host_text = layer.host.unwrap_or_else(|| "127.0.0.1".to_string());
    let host = match host_text.trim() {
        "localhost" => IpAddr::from([127, 0, 0, 1]),
        h => match h.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => return invalid(format!("host `{host_text}` is not an IP address")),
        },
    };
    let queue_capacity = layer.queue_capacity.unwrap_or(DEFAULT_QUEUE_CAPACITY);
    if !(1..=100_000).contains(&queue_capacity) {
        return invalid(format!(
            "queue_capacity is {queue_capacity}; it must be between 1 and 100000"
        ));
    }
    let max_batch = layer.max_batch.unwrap_or(DEFAULT_MAX_BATCH);
    if !(1..=1024).contains(&max_batch) {
        return invalid(format!(
            "max_batch is {max_batch}; it must be between 1 and 1024"
        ));
    }
    let kv_cache_mb = layer
        .kv_cache_mb
        .unwrap_or(kiln_engine::engine::DEFAULT_KV_CACHE_MB);
    if !(1..=1 << 20).contains(&kv_cache_mb) {
        return invalid(format!(
            "kv_cache_mb is {kv_cache_mb}; it must be between 1 and 1048576"
        ));
    }
    let max_body_bytes = layer.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if !(1024..=1 << 30).contains(&max_body_bytes) {
        return invalid(format!(
            "max_body_bytes is {max_body_bytes}; it must be between 1024 and 1073741824"
        ));
    }
    let kb_max_upload_mb = layer.kb_max_upload_mb.unwrap_or(DEFAULT_KB_MAX_UPLOAD_MB);
    if !(1..=1024).contains(&kb_max_upload_mb) {
        return invalid(format!(
            "kb_max_upload_mb is {kb_max_upload_mb}; it must be between 1 and 1024"
        ));
    }
    if let Some(t) = layer.threads {
        if !(1..=1024).contains(&t) {
            return invalid(format!("threads is {t}; it must be between 1 and 1024"));
        }
    }
    let embedding_concurrency = layer
        .embedding_concurrency
        .unwrap_or(DEFAULT_EMBEDDING_CONCURRENCY);
    if !(1..=64).contains(&embedding_concurrency) {
        return invalid(format!(
            "embedding_concurrency is {embedding_concurrency}; it must be between 1 and 64"
        ));
    }
    let log = layer.log.unwrap_or_else(|| "info".to_string());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
        return invalid(format!("log filter `{log}` is not valid: {e}"));
    }
    let models = layer.models.unwrap_or_default();
    for m in &models {
        if m.trim().is_empty() {
            return invalid("a model name is empty".to_string());
        }
        if let Some((alias, path)) = m.split_once('=') {
            if alias.trim().is_empty() || path.trim().is_empty() {
                return invalid(format!("model `{m}` must be NAME, PATH or ALIAS=PATH"));
            }
        }
    }
    let lease_seconds = layer.lease_seconds.unwrap_or(DEFAULT_LEASE_SECONDS);
    if !(2..=3600).contains(&lease_seconds) {
        return invalid(format!(
            "lease_seconds is {lease_seconds}; it must be between 2 and 3600"
        ));
    }
    let upstreams = layer.upstreams.unwrap_or_default();
    let mut upstream_models = std::collections::BTreeSet::new();
    for (i, u) in upstreams.iter().enumerate() {
        u.validate().map_err(ConfigError::Invalid)?;
        if upstreams[..i].iter().any(|o| o.name == u.name) {
            return invalid(format!("two upstreams are named `{}`", u.name));
        }
        for m in &u.models {
            if !upstream_models.insert(m.clone()) {
                return invalid(format!("the model `{m}` is listed by two upstreams"));
            }
        }
    }
    if let Some(r) = &layer.rerank {
        r.validate().map_err(ConfigError::Invalid)?;
    }
    if let Some(h) = &layer.http_tool {
        h.build().map_err(ConfigError::Invalid)?;
    }
    let mcp_servers = layer.mcp_servers.unwrap_or_default();
    for (i, m) in mcp_servers.iter().enumerate() {
        m.validate()
            .map_err(|e| ConfigError::Invalid(format!("[[mcp_servers]] {e}")))?;
        if mcp_servers[..i].iter().any(|o| o.name == m.name) {
            return invalid(format!("two MCP servers are named `{}`", m.name));
        }
    }
    let advertise_url = match layer.advertise_url {
        None => None,
        Some(u) => Some(check_advertise_url(u.trim())?),
    };
    let home = layer.home.unwrap_or_else(default_home);
    let kb_dir = layer.kb_dir.unwrap_or_else(|| home.join("kb"));
    Ok(ServeConfig {
        upstreams,
        rerank: layer.rerank,
        http_tool: layer.http_tool,
        mcp_servers,
        no_auth: layer.no_auth.unwrap_or(false),
        lease: std::time::Duration::from_secs(lease_seconds),
        database: layer
            .database
            .unwrap_or_else(|| kiln_store::default_db_path(&home)),
        home,
        host,
        port: layer.port.unwrap_or(DEFAULT_PORT),
        models,
        embedding_model: layer.embedding_model.filter(|s| !s.trim().is_empty()),
        queue_capacity,
        max_batch,
        kv_cache_mb,
        max_body_bytes,
        kb_max_upload_bytes: kb_max_upload_mb << 20,
        kb_dir,
        advertise_url,
        threads: layer.threads,
        log,
        embedding_concurrency,
        config_file,
    })
}

/// An advertised URL with `port` added when it names none.
pub fn with_port(url: &str, port: u16) -> String {
    let host = url.trim_start_matches("http://");
    let has_port = match host.rsplit_once(':') {
        // `[::1]` has colons of its own; a port follows the bracket.
        Some((h, p)) => {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.starts_with('[') || h.ends_with(']'))
        }
        None => false,
    };
    if has_port {
        url.to_string()
    } else {
        format!("{url}:{port}")
    }
}

/// An advertised URL: `http://HOST[:PORT]` with nothing after it (TLS
/// between replicas is not supported yet); without a port, the port the
/// server listens on is added.
fn check_advertise_url(url: &str) -> Result<String, ConfigError> {
    let url = url.trim_end_matches('/');
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        ConfigError::Invalid(format!(
            "advertise_url `{url}` must start with http:// (replicas talk plain HTTP to each other)"
        ))
    })?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(ConfigError::Invalid(format!(
            "advertise_url `{url}` must be http://HOST[:PORT] with no path"
        )));
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn layers_override_in_order() -> Result<(), ConfigError> {
        let dir = tempfile::tempdir().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let file = dir.path().join("kiln.toml");
        std::fs::write(&file, "port = 1000\nqueue_capacity = 3\nthreads = 2\n")
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let env = ConfigLayer::from_env(env_of(&[("KILN_PORT", "2000"), ("KILN_THREADS", "4")]))?;
        let cli = ConfigLayer {
            port: Some(3000),
            ..ConfigLayer::default()
        };
        let cfg = load(Some(&file), env, cli)?;
        assert_eq!(cfg.port, 3000);
        assert_eq!(cfg.threads, Some(4));
        assert_eq!(cfg.queue_capacity, 3);
        Ok(())
    }

    #[test]
    fn home_kiln_toml_is_read_when_present() -> Result<(), ConfigError> {
        let dir = tempfile::tempdir().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        std::fs::write(dir.path().join("kiln.toml"), "port = 1234\n")
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let env = ConfigLayer::from_env(env_of(&[(
            "KILN_HOME",
            dir.path().to_str().unwrap_or_default(),
        )]))?;
        let cfg = load(None, env, ConfigLayer::default())?;
        assert_eq!(cfg.port, 1234);
        Ok(())
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        assert!(ConfigLayer::from_env(env_of(&[("KILN_PORT", "http")])).is_err());
        let zero_queue = ConfigLayer {
            queue_capacity: Some(0),
            ..ConfigLayer::default()
        };
        assert!(validate(zero_queue, None).is_err());
        let bad_host = ConfigLayer {
            host: Some("not a host".into()),
            ..ConfigLayer::default()
        };
        assert!(validate(bad_host, None).is_err());
    }

    #[test]
    fn upstreams_come_from_toml() -> Result<(), ConfigError> {
        let dir = tempfile::tempdir().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let file = dir.path().join("k.toml");
        let one =
            "[[upstreams]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = [\"m\"]\n";
        std::fs::write(&file, one).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let cfg = load(Some(&file), ConfigLayer::default(), ConfigLayer::default())?;
        assert_eq!(cfg.upstreams.len(), 1);
        assert_eq!(cfg.upstreams[0].models, vec!["m".to_string()]);
        let twice = format!("{one}{}", one.replace("name = \"a\"", "name = \"b\""));
        std::fs::write(&file, twice).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let err = load(Some(&file), ConfigLayer::default(), ConfigLayer::default());
        assert!(err.is_err_and(|e| e.to_string().contains("two upstreams")));
        Ok(())
    }

    #[test]
    fn a_rerank_endpoint_may_be_https_with_its_tls_files() -> Result<(), ConfigError> {
        let dir = tempfile::tempdir().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let file = dir.path().join("k.toml");
        let load_with = |text: &str| {
            std::fs::write(&file, text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            load(Some(&file), ConfigLayer::default(), ConfigLayer::default())
        };
        let cfg = load_with(
            "[rerank]\nurl = \"https://rr.internal/v1/rerank\"\nmodel = \"bge\"\nca_file = \"/etc/ca.pem\"\n",
        )?;
        let rerank = cfg
            .rerank
            .ok_or(ConfigError::Invalid("no [rerank]".into()))?;
        assert_eq!(rerank.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        for bad in [
            "[rerank]\nurl = \"http://rr/v1/rerank\"\nmodel = \"bge\"\nca_file = \"/etc/ca.pem\"\n",
            "[rerank]\nurl = \"https://rr/v1/rerank\"\nmodel = \"bge\"\nclient_cert_file = \"c.pem\"\n",
            "[rerank]\nurl = \"ftp://rr/v1/rerank\"\nmodel = \"bge\"\n",
        ] {
            let err = load_with(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("rerank url"), "{bad}: {err}");
        }
        Ok(())
    }

    #[test]
    fn unknown_toml_keys_are_refused() -> Result<(), ConfigError> {
        let dir = tempfile::tempdir().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let file = dir.path().join("k.toml");
        std::fs::write(&file, "prot = 1\n").map_err(|e| ConfigError::Invalid(e.to_string()))?;
        assert!(ConfigLayer::from_toml(&file).is_err());
        Ok(())
    }

    #[test]
    fn advertised_urls_are_plain_http_with_the_bound_port_filled_in() {
        assert_eq!(
            check_advertise_url("http://10.0.0.5:8080/").ok().as_deref(),
            Some("http://10.0.0.5:8080")
        );
        for bad in [
            "10.0.0.5:8080",
            "https://a:1",
            "http://",
            "http://a/b",
            "http://u@a",
        ] {
            assert!(check_advertise_url(bad).is_err(), "{bad}");
        }
        assert_eq!(with_port("http://a", 81), "http://a:81");
        assert_eq!(with_port("http://a:8080", 81), "http://a:8080");
        assert_eq!(with_port("http://[::1]", 81), "http://[::1]:81");
        assert_eq!(with_port("http://[::1]:9", 81), "http://[::1]:9");
    }
}
