//! The command-line commands other than `serve`.

pub mod admin;
pub mod agents;
pub mod chat;
mod client;
pub mod kb;
pub mod models;
pub mod pull;
