//! `kiln serve`: load the models, bind, serve until SIGTERM or Ctrl-C, then
//! let in-flight requests finish and exit.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::api::{self, AppState};
use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::registry;

pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Sizes the compute thread pool; must run before any model work.
pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            tracing::warn!(error = %e, "could not size the compute thread pool");
        }
    }
}

pub fn run(cfg: ServeConfig, validate_only: bool) -> anyhow::Result<()> {
    init_tracing(&cfg.log);
    if validate_only {
        return validate(&cfg);
    }
    set_threads(cfg.threads);
    let models = registry::load(&cfg)?;
    let metrics = Metrics::new().context("cannot register metrics")?;
    let store = kiln_store::Store::open(&cfg.database)
        .with_context(|| format!("cannot open the request log {}", cfg.database.display()))?;
    let state = Arc::new(AppState::new(models, metrics, Some(Arc::new(store))));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(cfg, state))
}

/// `--validate-config`: the configuration parsed; check that every model it
/// names can be found, without loading any.
fn validate(cfg: &ServeConfig) -> anyhow::Result<()> {
    for spec in &cfg.models {
        let (_, path) = registry::resolve_text_model(&cfg.home, spec)?;
        if !path.is_file() {
            anyhow::bail!("model `{spec}`: {} is not a file", path.display());
        }
    }
    if let Some(spec) = &cfg.embedding_model {
        registry::resolve_embedding_model(&cfg.home, spec)?;
    }
    eprintln!(
        "configuration is valid (home {}, {}:{}{})",
        cfg.home.display(),
        cfg.host,
        cfg.port,
        cfg.config_file
            .as_ref()
            .map(|p| format!(", file {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

async fn serve(cfg: ServeConfig, state: Arc<AppState>) -> anyhow::Result<()> {
    let addr = SocketAddr::new(cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let app = api::router(state, cfg.max_body_bytes);
    // Tests and scripts read the port from this line.
    eprintln!("kiln listening on http://{bound}");
    tracing::info!(%bound, "serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the server failed")?;
    tracing::info!("shut down cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
