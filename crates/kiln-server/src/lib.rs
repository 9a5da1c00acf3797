//! Kiln's server crate: the `kiln` command line ([`cli`]), the
//! OpenAI-compatible HTTP API ([`api`]) and what it runs on — configuration
//! ([`config`]), the served models ([`registry`]), errors as clients see them
//! ([`error`]) and metrics ([`metrics`]).
//!
//! Only this crate knows HTTP; the engine is reached through
//! `kiln_engine::engine::EngineHandle`.

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
pub mod extract;
pub mod forward;
pub mod knowledge;
pub mod metrics;
pub mod ratelimit;
pub mod registry;
pub mod runs;
pub mod serve;
pub mod upstream;
