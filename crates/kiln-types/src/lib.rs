//! Types shared by Kiln's crates that carry no behaviour: the OpenAI wire
//! format ([`openai`]) and the stable error codes clients see ([`error`]).
//!
//! Serde only: no HTTP framework, no engine. Request types accept what
//! OpenAI clients send (unknown fields are ignored); fields whose JSON shape
//! varies (`stop`, message `content`, embedding `input`) are kept as
//! [`serde_json::Value`] so the server can refuse a wrong shape with a
//! message that names the field and what is allowed.

pub mod error;
pub mod openai;
