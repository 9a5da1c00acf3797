//! The command-line commands other than `serve`.

pub mod chat;
pub mod models;
pub mod pull;
