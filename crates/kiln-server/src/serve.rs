//! `kiln serve`: load the models, bind, serve until SIGTERM or Ctrl-C, then
//! let in-flight requests finish and exit.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use std::time::Duration;

use kiln_store::Database;

use crate::api::calls::Meter;
use crate::api::{self, AppState};
use crate::auth::Auth;
use crate::bootstrap;
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

/// A write past the process's file-size limit (`ulimit -f`) raises SIGXFSZ,
/// which would kill the server mid-request. Ignored, the write fails with
/// `EFBIG` instead, and the ledger answers it like a full disk: the call is
/// refused with 503 `ledger_unavailable`, and service resumes once there is
/// room.
fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler
    // code; it is done once, at start, before any thread writes files.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

pub fn run(cfg: ServeConfig, validate_only: bool) -> anyhow::Result<()> {
    init_tracing(&cfg.log);
    if validate_only {
        return validate(&cfg);
    }
    set_threads(cfg.threads);
    ignore_file_size_signal();
    let models = registry::load(&cfg)?;
    let metrics = Metrics::new().context("cannot register metrics")?;
    let db: Arc<dyn Database> = kiln_store::open_database(&cfg.database)
        .with_context(|| format!("cannot open the database {}", database_label(&cfg.database)))?;
    let (anonymous, admin_secret) =
        bootstrap::run(&*db, cfg.no_auth).context("cannot prepare the database")?;
    if let Some(secret) = admin_secret {
        // Shown once: only its hash is stored.
        eprintln!("created the platform admin API key (shown only now, keep it safe): {secret}");
    }
    if cfg.no_auth {
        tracing::warn!(
            "--no-auth: /v1 accepts requests without a key, charged to the `local` tenant"
        );
    }
    let replica_id = format!("rep-{}", uuid::Uuid::new_v4().simple());
    db.renew_lease(&replica_id, lease_until(cfg.lease))
        .context("cannot register this replica in the database")?;
    let auth = Arc::new(Auth::new(db.clone(), anonymous).context("cannot read keys")?);
    let meter = Meter::new(db.clone(), replica_id).context("cannot read the platform currency")?;
    let mut state = AppState::new(models, metrics, auth, meter);
    state.rerank = match cfg.rerank.clone() {
        Some(r) => Some(Arc::new(
            crate::knowledge::Rerank::new(r).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    state.tools = Arc::new(crate::runs::ServerTools::new(
        crate::runs::toolbox(cfg.http_tool.as_ref()).map_err(|e| anyhow::anyhow!(e))?,
    ));
    let mut jobs = None;
    // Knowledge bases embed with the server's model or an upstream's.
    if state.models.embedding.is_some() || !state.models.upstream.is_empty() {
        let (knowledge, rx) =
            crate::knowledge::Knowledge::open(&cfg.kb_dir, cfg.kb_max_upload_bytes, db.clone())
                .context("cannot open the knowledge bases")?;
        state.knowledge = Some(Arc::new(knowledge));
        jobs = Some(rx);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(crate::runs::add_mcp_tools(&state.tools, &cfg.mcp_servers));
    let state = Arc::new(state);
    runtime.block_on(serve(cfg, state, jobs))
}

/// The database setting for messages: a PostgreSQL URL without its password.
pub fn database_label(spec: &std::path::Path) -> String {
    let text = spec.display().to_string();
    match (text.find("://"), text.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &text[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &text[..scheme + 3], &text[at + 1..])
        }
        _ => text,
    }
}

fn lease_until(lease: Duration) -> i64 {
    kiln_store::now_ms() + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2)
}

/// Renews this replica's lease at a fifth of its length, settles the open
/// reservations of replicas whose lease lapsed (this machine's previous run
/// included), retries settlements that failed, and takes over the agent
/// runs nobody drives.
fn spawn_lease_keeper(state: Arc<AppState>, lease: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(lease / 5);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let s = state.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let m = &s.meter;
                if let Err(e) = m.db.renew_lease(&m.replica_id, lease_until(lease)) {
                    tracing::error!(error = %e, "cannot renew this replica's lease");
                }
                match m.db.recover_lapsed(kiln_store::now_ms()) {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        reservations = n,
                        "settled the open calls of a replica whose lease lapsed, as interrupted"
                    ),
                    Err(e) => tracing::error!(error = %e, "cannot settle lapsed reservations"),
                }
                m.retry_pending();
            })
            .await;
            crate::runs::claim_orphans(&state).await;
        }
    });
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

async fn serve(
    cfg: ServeConfig,
    state: Arc<AppState>,
    jobs: Option<tokio::sync::mpsc::UnboundedReceiver<crate::knowledge::Job>>,
) -> anyhow::Result<()> {
    let addr = SocketAddr::new(cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    spawn_lease_keeper(state.clone(), cfg.lease);
    state.auth.spawn_epoch_watch();
    if let Some(jobs) = jobs {
        crate::knowledge::spawn_worker(state.clone(), jobs);
    }
    if let Some(k) = &state.knowledge {
        let url = cfg
            .advertise_url
            .as_deref()
            .map(|u| crate::config::with_port(u, bound.port()));
        let shared = cfg
            .database
            .to_str()
            .is_some_and(kiln_store::is_postgres_url);
        // The store is synchronous: off the async threads.
        let k = k.clone();
        tokio::task::spawn_blocking(move || k.advertise(url, shared))
            .await
            .context("listing the knowledge bases in the directory failed")?;
    }
    let app = api::router(state.clone(), cfg.max_body_bytes);
    // Tests and scripts read the port from this line.
    eprintln!("kiln listening on http://{bound}");
    tracing::info!(%bound, "serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the server failed")?;
    // Every connection has ended: settle what is left, then let go.
    let m = &state.meter;
    m.retry_pending();
    // Unfinished runs go back to the pool: the next replica to look (or
    // this machine's next start) resumes them from their journals.
    match m.db.release_runs(&m.replica_id) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            runs = n,
            "let go of unfinished runs for another replica to resume"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot let go of this replica's runs"),
    }
    if let Err(e) = m.db.drop_lease(&m.replica_id) {
        tracing::warn!(error = %e, "cannot drop this replica's lease");
    }
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
