//! The command-line commands other than `serve`.

pub mod admin;
pub mod chat;
pub mod kb;
pub mod models;
pub mod pull;
